"""The `tastemaker` command line: serve, recommend, similar, profile, load, keys, encode, fit, eval, train, bench."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from tastemaker.errors import TastemakerError

if TYPE_CHECKING:
    from tastemaker.config import ServiceConfig


def _config_from_args(args: argparse.Namespace):
    from tastemaker.config import load_config

    return load_config(
        args.config,
        overrides={
            ("data_dir",): getattr(args, "data_dir", None),
            ("server", "grpc_port"): getattr(args, "port", None),
            ("server", "http_port"): getattr(args, "http_port", None),
            ("server", "ray_address"): getattr(args, "ray_address", None),
        },
    )


# -- serve --------------------------------------------------------------------------------
def cmd_serve(args: argparse.Namespace) -> int:
    from tastemaker.app import start_service, stop_service
    from tastemaker.client import TastemakerClient
    from tastemaker.datasets.movielens import load_movielens, subsample
    from tastemaker.demo import DEMO_DONE_MARKER, DEMO_PENDING_MARKER, load_dataset

    config = _config_from_args(args)
    data_dir = Path(config.data_dir).expanduser()
    fresh = not data_dir.exists() or not any(data_dir.iterdir())
    data_dir.mkdir(parents=True, exist_ok=True)
    # The demo is loaded into an empty data directory, and resumed if a previous load was cut off
    # (upserts and event ids are idempotent, so resuming never duplicates anything).
    load_demo = not args.no_demo and (fresh or (data_dir / DEMO_PENDING_MARKER).exists())
    if load_demo:
        (data_dir / DEMO_PENDING_MARKER).write_text("loading the MovieLens demo\n")
    target = f"{config.server.host}:{config.server.grpc_port}"
    from tastemaker.store.base import redact_url

    print(f"tastemaker: starting (data in {data_dir}, store {redact_url(config.store_url())})", flush=True)

    def on_signal(signum, frame):  # SIGTERM behaves like Ctrl-C: a clean stop
        raise KeyboardInterrupt

    # SIGINT too: a shell that starts us in the background (`cmd &` without job control) sets
    # SIGINT to ignored, and Python then never installs its Ctrl-C handler.
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        api_key = _serve_api_key(config, data_dir)
        start_service(config, show_progress=not args.quiet)  # progress: re-encoding after a model change
        if load_demo:
            data = load_movielens(args.demo_path)
            if args.demo_items:
                data = subsample(data, max_items=args.demo_items, max_users=args.demo_users)
            with TastemakerClient(target, timeout_s=600, api_key=api_key) as client:
                items, events = load_dataset(client, data, show_progress=not args.quiet)
            (data_dir / DEMO_DONE_MARKER).write_text(f"{items} items, {events} events\n")
            (data_dir / DEMO_PENDING_MARKER).unlink(missing_ok=True)
            print(f"tastemaker: demo loaded: {items} items, {events} rating events", flush=True)
            # What `tastemaker fit` does: transitions, co-occurrence and matrix factors learned from
            # the whole demo log; the replicas swap them in within retrieval.artifact_check_s.
            print(f"tastemaker: {fit_artifact(config, show_progress=not args.quiet)}", flush=True)
        print(f"tastemaker: READY, gRPC on {target} (Ctrl-C to stop)", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("\ntastemaker: stopping...", flush=True)
        return 0
    finally:
        # Snapshots the shards and stops Ray, on Ctrl-C and on errors alike.
        stop_service(config)
        print("tastemaker: stopped", flush=True)


def _serve_api_key(config: "ServiceConfig", data_dir: Path) -> Optional[str]:
    """The key `tastemaker serve` loads the demo with. On the first start of a store without
    keys it creates an admin key, writes it to <data_dir>/admin.key (0600, where the CLI looks)
    and prints it once; later starts reuse the file (or TASTEMAKER_API_KEY). First of all it
    refuses a store whose user ids were written under another pseudonym setting."""
    from tastemaker.auth import ADMIN_KEY_FILE, ensure_admin_key
    from tastemaker.privacy import Pseudonymizer, check_store_key
    from tastemaker.store import open_store

    key = config.privacy.user_id_key
    store = open_store(config.store_url(), config.store)
    try:  # before starting anything: a store written under another pseudonym setting is refused
        check_store_key(store, Pseudonymizer(key.get_secret_value()) if key is not None else None)
    finally:
        store.close()
    if not config.auth.enabled:
        return None
    if config.auth.create_admin_key:
        store = open_store(config.store_url(), config.store)
        try:
            secret = ensure_admin_key(store, data_dir)
        finally:
            store.close()
        if secret is not None:
            print(
                f"tastemaker: created an admin API key, shown only now and written to {data_dir / ADMIN_KEY_FILE} "
                f"(mode 0600; the CLI reads it from there):\n    {secret}",
                flush=True,
            )
            return secret
    return _api_key(config, None)


# -- client commands ----------------------------------------------------------------------
def _api_key(config: "ServiceConfig", key_file: Optional[str]) -> Optional[str]:
    """The API key a client command sends: --api-key-file, else TASTEMAKER_API_KEY (auth.api_key),
    else <data_dir>/admin.key (what `tastemaker serve` wrote), else none."""
    from tastemaker.auth import ADMIN_KEY_FILE, read_key_file

    if key_file:
        secret = read_key_file(Path(key_file))
        if secret is None:
            raise TastemakerError(f"API key file {key_file} does not exist or is empty")
        return secret
    if config.auth.api_key is not None:
        return config.auth.api_key.get_secret_value()
    return read_key_file(Path(config.data_dir).expanduser() / ADMIN_KEY_FILE)


def _client(args: argparse.Namespace):
    from tastemaker.client import TastemakerClient

    credentials = None
    if getattr(args, "tls_ca", None):  # a service behind a TLS-terminating proxy (SECURITY.md)
        import grpc

        credentials = grpc.ssl_channel_credentials(Path(args.tls_ca).read_bytes())
    api_key = _api_key(_config_from_args(args), getattr(args, "api_key_file", None))
    return TastemakerClient(args.target, timeout_s=args.timeout, api_key=api_key, credentials=credentials)


def _print_items(items, as_json: bool, extra: Optional[dict] = None) -> None:
    from tastemaker.v1 import recommender_service_pb2 as pb

    rows = [
        {
            "item_id": i.item_id,
            "title": i.title,
            "score": round(i.score, 4),
            "sources": [pb.CandidateSource.Name(s).removeprefix("CANDIDATE_SOURCE_").lower() for s in i.sources],
            "reason": i.reason,
        }
        for i in items
    ]
    if as_json:
        print(json.dumps({**(extra or {}), "items": rows}, indent=2, ensure_ascii=False))
        return
    for rank, row in enumerate(rows, 1):
        print(f"{rank:>3}. {row['title']}  [{row['score']:.3f}]  — {row['reason']}")
    if extra:
        print("    " + ", ".join(f"{k}: {v}" for k, v in extra.items()))


def _filter(args: argparse.Namespace):
    from tastemaker.client import genre_filter

    return genre_filter(*args.genre) if args.genre else None


def cmd_recommend(args: argparse.Namespace) -> int:
    with _client(args) as client:
        reply = client.recommend(
            args.user,
            page_size=args.k,
            query=args.query or "",
            filter=_filter(args),
            min_profile_version=args.min_profile_version,
            diversity=args.diversity,
        )
    _print_items(
        reply.items,
        args.json,
        {"user_id": args.user, "profile_version": reply.profile_version, "attribution_token": reply.attribution_token},
    )
    return 0


def cmd_similar(args: argparse.Namespace) -> int:
    with _client(args) as client:
        reply = client.similar_items(args.item, page_size=args.k, filter=_filter(args))
    _print_items(reply.items, args.json, {"item_id": args.item})
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    from google.protobuf.json_format import MessageToDict

    with _client(args) as client:
        reply = client.get_user_profile(args.user)
    print(json.dumps(MessageToDict(reply, preserving_proto_field_name=True), indent=2, ensure_ascii=False))
    return 0


def cmd_load(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from tastemaker.demo import events_from_jsonl, items_from_jsonl, load_dataset

    with _client(args) as client:
        if args.kind == "items":
            items = items_from_jsonl(Path(args.file))
            vector_model, desc = "", "encoding items"
            if args.vectors:  # vectors computed off-line by `tastemaker encode`: the service skips encoding them
                from tastemaker.encoder.bulk import attach_vectors, read_vectors

                vectors = read_vectors(args.vectors)
                attached, left = attach_vectors(items, vectors)
                vector_model, desc = vectors.model_identity, "upserting items"
                print(
                    f"{attached} items carry precomputed vectors ({vectors.model_identity}); {left} are "
                    "encoded by the service (not in the vectors folder, or their text changed since)"
                )
            with tqdm(total=len(items), desc=desc, unit="item") as bar:
                written = client.upsert_items(items, progress=bar, vector_model=vector_model)
            print(f"upserted {written} items")
        elif args.kind == "events":
            events = events_from_jsonl(Path(args.file))
            with tqdm(total=len(events), desc="writing events", unit="event") as bar:
                acks = client.write_events(events, progress=bar)
            from tastemaker.v1 import recommender_service_pb2 as pb

            rejected = [a for a in acks if a.status == pb.EVENT_STATUS_REJECTED]
            print(f"{len(acks) - len(rejected)} events accepted or duplicate, {len(rejected)} rejected")
            for ack in rejected[:10]:
                print(f"  rejected {ack.event_id}: {ack.reason}")
            return 1 if rejected else 0
        elif args.vectors:
            raise TastemakerError("--vectors applies to `load items` only")
        else:  # movielens
            from tastemaker.datasets.movielens import load_movielens

            items, events = load_dataset(client, load_movielens(args.file))
            print(f"loaded {items} items and {events} rating events")
    return 0


def cmd_encode(args: argparse.Namespace) -> int:
    """Encode an items file off-line as a Ray Data job: Parquet vectors + manifest for `load --vectors`."""
    from tastemaker.config import load_config
    from tastemaker.encoder.bulk import run_bulk_encode

    config = load_config(
        args.config,
        overrides={
            ("server", "ray_address"): args.ray_address,
            ("bulk_encode", "concurrency"): args.concurrency,
            ("bulk_encode", "max_concurrency"): args.max_concurrency,
            ("bulk_encode", "batch_size"): args.batch_size,
            ("bulk_encode", "num_cpus"): args.num_cpus,
            ("bulk_encode", "num_gpus"): args.num_gpus,
        },
    )
    result = run_bulk_encode(args.file, args.out, config, overwrite=args.overwrite, show_progress=not args.quiet)
    m = result.manifest
    print(
        f"encoded {m['count']} items ({m['dimension']}-d, {m['model_identity']}) in {m['seconds']:.1f} s "
        f"({m['texts_per_s']} items/s, {m['job']['concurrency']} actor(s)) -> {result.out_dir}\n"
        f"load them with: tastemaker load items {args.file} --vectors {result.out_dir}"
    )
    return 0


def fit_artifact(config: ServiceConfig, show_progress: bool = True) -> str:
    """Fit the collaborative/sequential models and the matrix factors from the event log and
    publish them to the store (`tastemaker.startup.publish_fit`, which the application also runs
    at start when no fit exists); returns a one-line summary."""
    from tqdm import tqdm

    from tastemaker.startup import publish_fit
    from tastemaker.store import open_store

    store = open_store(config.store_url(), config.store)
    try:
        with tqdm(desc="fitting from the event log", unit="event", disable=not show_progress) as bar:
            return publish_fit(store, config.retrieval, config.profiles.weights, progress=bar)
    finally:
        store.close()


def cmd_fit(args: argparse.Namespace) -> int:
    """Fit the collaborative/sequential models and matrix factors from the event log and publish
    them to the store; running retrieval replicas swap them in within `retrieval.artifact_check_s`."""
    print(fit_artifact(_config_from_args(args)))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """Offline evaluation against the classic baselines; writes report.json, report.md and plots."""
    from tastemaker.config import load_config
    from tastemaker.evaluation import EvalConfig, run_evaluation
    from tastemaker.evaluation.report import method_table

    def floats(text: Optional[str], default):
        return tuple(float(v) for v in text.split(",") if v.strip()) if text else default

    def names(text: Optional[str]):
        return tuple(v.strip() for v in text.split(",") if v.strip()) if text else None

    defaults = EvalConfig()
    config = EvalConfig(
        dataset=args.dataset,
        out_dir=args.out,
        items_path=args.items,
        protocols=names(args.protocols) or defaults.protocols,
        methods=names(args.methods),
        seed=args.seed,
        max_items=args.max_items,
        max_users=args.max_users,
        quick=args.quick,
        cold_fraction=args.cold_fraction,
        test_quantiles=floats(args.cutoffs, defaults.test_quantiles),
        validation_quantiles=floats(args.validation_cutoffs, defaults.validation_quantiles),
        tuning_rounds=args.tuning_rounds,
        tuning_users=args.tuning_users or None,
        show_progress=not args.quiet,
        service=load_config(args.config),
        compare_encoder=args.compare_encoder,
    )
    try:
        report = run_evaluation(config)
    except ValueError as exc:  # bad protocol options: say so like any other bad argument
        raise TastemakerError(str(exc)) from exc
    for name, protocol in report["protocols"].items():
        print(f"\n{name} (test targets: {protocol['test']['targets']}, cold slice: {protocol['cold_slice_users']})")
        print("\n".join(method_table(protocol)))
    for name, goal in report.get("goals", {}).items():
        print(f"goal {name}: {goal['criterion']}: {'met' if goal['met'] else 'NOT met'}")
    print(f"\nreport: {Path(args.out) / 'report.md'} (and report.json, plots, per-user CSVs)")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """Fine-tune the encoder on an interaction log with Ray Train; writes a model folder that
    `encoder.model_path` loads (the service re-encodes its catalog on the next start)."""
    from tastemaker.training import TrainConfig, train_encoder

    given = {
        "dataset": args.dataset,
        "items_path": args.items,
        "max_items": args.max_items,
        "max_users": args.max_users,
        "holdout": None if args.holdout is None else tuple(v.strip() for v in args.holdout.split(",") if v.strip() and v.strip() != "none"),
        "max_pairs": args.max_pairs,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "learning_rate": args.lr,
        "temperature": args.temperature,
        "max_history_items": args.max_history_items,
        "query_tower": args.query_tower,
        "num_workers": args.workers,
        "cpus_per_worker": args.cpus_per_worker,
        "use_gpu": args.use_gpu or None,
        "base_model_path": args.base_model,
        "seed": args.seed,
        "ray_address": args.ray_address,
    }
    try:
        config = TrainConfig.model_validate({k: v for k, v in given.items() if v is not None})
    except Exception as exc:  # pydantic lists every bad field
        raise TastemakerError(f"invalid training options: {exc}") from exc
    try:
        manifest = train_encoder(config, Path(args.out), show_progress=not args.quiet)
    except ValueError as exc:
        raise TastemakerError(str(exc)) from exc
    print(
        f"trained {manifest['steps']} steps on {manifest['data']['train_pairs']} pairs in {manifest['seconds']:.0f}s: "
        f"final loss {manifest['final_loss']:.4f}, held-out loss {manifest['held_out_loss_before']:.4f} -> "
        f"{manifest['held_out_loss_after']:.4f}\nmodel folder: {args.out} (set encoder.model_path to it; "
        "`tastemaker serve` then re-encodes the catalog and rebuilds profiles)"
    )
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    """`tastemaker keys create|list|revoke`: API keys, managed in the configured store directly
    (run it where the store is reachable). Secrets are shown once, at creation; the store keeps
    only their SHA-256."""
    from datetime import datetime, timezone

    from tastemaker.auth import new_key
    from tastemaker.store import open_store

    def when(t: Optional[float]) -> Optional[str]:
        return None if t is None else datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="seconds")

    config = _config_from_args(args)
    store = open_store(config.store_url(), config.store)
    try:
        if args.keys_command == "create":
            secret, record = new_key(args.role, args.name)
            store.create_api_key(record)
            if args.json:
                print(json.dumps({"key_id": record.key_id, "role": record.role, "name": record.name, "key": secret}))
            else:
                print(f"created key {record.key_id} (role {record.role}, name {record.name!r}); the key, shown only now:")
                print(secret)
            return 0
        if args.keys_command == "list":
            rows = [
                {"key_id": r.key_id, "role": r.role, "name": r.name, "created": when(r.create_time), "revoked": when(r.revoke_time)}
                for r in store.list_api_keys()
            ]
            if args.json:
                print(json.dumps(rows, indent=2, ensure_ascii=False))
            else:
                print(f"{'key_id':<18}{'role':<7}{'created':<27}{'revoked':<27}name")
                for r in rows:
                    print(f"{r['key_id']:<18}{r['role']:<7}{r['created']:<27}{r['revoked'] or '-':<27}{r['name']}")
            return 0
        if not store.revoke_api_key(args.key_id):
            raise TastemakerError(f"no API key with id {args.key_id!r} (see `tastemaker keys list`)")
        print(
            f"revoked key {args.key_id}; running gateways refuse it within auth.cache_ttl_s "
            f"({config.auth.cache_ttl_s:g} s)"
        )
        return 0
    finally:
        store.close()


def cmd_bench(args: argparse.Namespace) -> int:
    from tastemaker_bench import run_benchmark

    return run_benchmark(args.benchmark, args.rest)


# -- parser -------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tastemaker", description="A recommender service that understands text.")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="start the service (local Ray + Serve + gRPC) with the demo data")
    serve.add_argument("--config", help="YAML config file (see README); flags override it")
    serve.add_argument("--data-dir", help="state directory (default ~/.tastemaker)")
    serve.add_argument("--port", type=int, help="gRPC port (default 9000)")
    serve.add_argument("--http-port", type=int, help="Serve HTTP port (default 8000)")
    serve.add_argument("--ray-address", help="join an existing Ray cluster instead of starting one")
    serve.add_argument("--no-demo", action="store_true", help="do not load the MovieLens demo")
    serve.add_argument("--demo-path", help="MovieLens folder (default: the vendored copy)")
    serve.add_argument("--demo-items", type=int, help="load only this many demo items (most rated)")
    serve.add_argument("--demo-users", type=int, default=200, help="with --demo-items: users kept")
    serve.add_argument("--quiet", action="store_true", help="no progress bars")
    serve.set_defaults(func=cmd_serve)

    def client_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--target", default="127.0.0.1:9000", help="host:port of the service")
        p.add_argument("--timeout", type=float, default=30.0, help="per-call deadline in seconds")
        p.add_argument("--json", action="store_true", help="machine-readable output")
        p.add_argument(
            "--api-key-file", metavar="FILE",
            help="file holding the API key (default: TASTEMAKER_API_KEY, else <data dir>/admin.key)",
        )
        p.add_argument("--data-dir", help="where to find admin.key (default ~/.tastemaker)")
        p.add_argument("--config", help="YAML config file (auth section, data_dir)")
        p.add_argument("--tls-ca", metavar="PEM", help="connect with TLS, trusting this CA certificate")

    rec = sub.add_parser("recommend", help="recommendations for a user")
    rec.add_argument("--user", required=True)
    rec.add_argument("--k", type=int, default=10, help="how many items (page_size)")
    rec.add_argument("--query", help="natural-language steering, e.g. 'animated movie for kids about toys'")
    rec.add_argument("--genre", action="append", help="only items of this genre (repeatable)")
    rec.add_argument("--diversity", type=float, default=0.0, help="0..1")
    rec.add_argument("--min-profile-version", type=int, default=0)
    client_args(rec)
    rec.set_defaults(func=cmd_recommend)

    sim = sub.add_parser("similar", help="items similar to an item")
    sim.add_argument("--item", required=True)
    sim.add_argument("--k", type=int, default=10)
    sim.add_argument("--genre", action="append")
    client_args(sim)
    sim.set_defaults(func=cmd_similar)

    prof = sub.add_parser("profile", help="what the service knows about a user")
    prof.add_argument("--user", required=True)
    client_args(prof)
    prof.set_defaults(func=cmd_profile)

    load = sub.add_parser("load", help="load items or events from a JSON Lines file, or a MovieLens folder")
    load.add_argument("kind", choices=["items", "events", "movielens"])
    load.add_argument("file")
    load.add_argument(
        "--vectors", metavar="DIR",
        help="items: attach the vectors `tastemaker encode` wrote to DIR (matched by item_id and text), so the "
        "service does not encode those items; it refuses vectors of another model",
    )
    client_args(load)
    load.set_defaults(func=cmd_load)

    enc = sub.add_parser(
        "encode", help="encode an items file off-line as a Ray Data job (vectors for `load items --vectors`)"
    )
    enc.add_argument("file", help="items JSON Lines file (the format of `load items`)")
    enc.add_argument("--out", required=True, metavar="DIR", help="output folder: Parquet vectors + manifest.json")
    enc.add_argument("--config", help="service YAML: the encoder section (model, backend) and bulk_encode")
    enc.add_argument("--ray-address", help="run on this Ray cluster (default: a local Ray); paths must be shared")
    enc.add_argument("--concurrency", type=int, help="encoder actors (bulk_encode.concurrency, default 1)")
    enc.add_argument("--max-concurrency", type=int, help="autoscale the actors up to this many")
    enc.add_argument("--batch-size", type=int, help="items per batch (bulk_encode.batch_size, default 256)")
    enc.add_argument("--num-cpus", type=float, help="CPUs per actor (default 1)")
    enc.add_argument("--num-gpus", type=float, help="GPUs per actor (default 0)")
    enc.add_argument("--overwrite", action="store_true", help="replace a previous output in --out")
    enc.add_argument("--quiet", action="store_true", help="no progress bars")
    enc.set_defaults(func=cmd_encode)

    fit = sub.add_parser("fit", help="fit collaborative/sequential models from the event log (hot-reloaded)")
    fit.add_argument("--config", help="YAML config file")
    fit.add_argument("--data-dir", help="state directory (default ~/.tastemaker)")
    fit.set_defaults(func=cmd_fit)

    ev = sub.add_parser("eval", help="offline evaluation against classic baselines (report + plots)")
    ev.add_argument(
        "--dataset", default="movielens",
        help="'movielens' (the vendored copy), a MovieLens folder, or a .csv/.parquet interactions file "
        "with columns user_id,item_id,timestamp[,rating,event_type]",
    )
    ev.add_argument("--items", help="with an interactions file: items file (.csv/.parquet/.jsonl) with item_id,title[,description,tags]")
    ev.add_argument("--out", default="eval-out", help="output folder (report.json, report.md, plots, vector cache)")
    ev.add_argument("--protocols", help="comma-separated subset of leave_last_out,time_cutoff,cold_items (default all)")
    ev.add_argument("--methods", help="comma-separated subset of the methods (default all; see the evaluation README)")
    ev.add_argument("--config", help="service YAML: encoder model, profile settings, starting retrieval weights")
    ev.add_argument("--seed", type=int, default=0, help="seed of every random choice (ties, hidden items, ALS)")
    ev.add_argument("--max-items", type=int, help="keep only the N most-interacted items")
    ev.add_argument("--max-users", type=int, help="keep only the N most active users on those items")
    ev.add_argument("--quick", action="store_true", help="small tuning grids (CI smoke runs)")
    ev.add_argument("--cold-fraction", type=float, default=0.1, help="share of items hidden by cold_items")
    ev.add_argument("--cutoffs", help="time_cutoff test moments as event-time quantiles (default 0.7,0.75,0.8,0.85,0.9)")
    ev.add_argument("--validation-cutoffs", help="time_cutoff validation moments (default 0.3,0.35,...,0.65: eight moments)")
    ev.add_argument("--tuning-rounds", type=int, default=1, help="coordinate-search passes over Tastemaker's weights")
    ev.add_argument("--tuning-users", type=int, default=0, help="validation users per Tastemaker trial (0 = all; a sample is faster but overfits)")
    ev.add_argument(
        "--compare-encoder", metavar="MODEL_DIR",
        help="a fine-tuned model folder (tastemaker train --out): adds text_finetuned next to text_zero_shot",
    )
    ev.add_argument("--quiet", action="store_true", help="no progress bars")
    ev.set_defaults(func=cmd_eval)

    tr = sub.add_parser("train", help="fine-tune the encoder on interactions with Ray Train (two-tower, in-batch softmax)")
    tr.add_argument("--dataset", default="movielens", help="as for eval: 'movielens', a MovieLens folder, or a .csv/.parquet file")
    tr.add_argument("--items", help="with an interactions file: the items file")
    tr.add_argument("--out", required=True, help="output model folder (config.json, weights, tokenizer, tastemaker_train.json)")
    tr.add_argument("--holdout", help="protocols whose targets training never sees (default leave_last_out,time_cutoff,cold_items; 'none' = the whole log)")
    tr.add_argument("--max-items", type=int, help="keep only the N most-interacted items (as eval)")
    tr.add_argument("--max-users", type=int, help="keep only the N most active users (as eval)")
    tr.add_argument("--max-pairs", type=int, help="training pairs kept, a seeded sample (default 2000)")
    tr.add_argument("--epochs", type=int, help="passes over the pairs (default 1)")
    tr.add_argument("--batch-size", type=int, help="global batch over all workers (default 32)")
    tr.add_argument("--lr", type=float, help="AdamW learning rate (default 3e-5)")
    tr.add_argument("--temperature", type=float, help="in-batch softmax temperature (default 0.05)")
    tr.add_argument("--max-history-items", type=int, help="items in a history text (default 5)")
    tr.add_argument(
        "--query-tower", choices=["history_text", "mean_of_items"],
        help="history_text (default): the history texts joined into one text; mean_of_items: the mean of each history item's vector",
    )
    tr.add_argument("--workers", type=int, help="Ray Train workers (default 2)")
    tr.add_argument("--cpus-per-worker", type=float, help="CPUs per worker (default 1)")
    tr.add_argument("--use-gpu", action="store_true", help="one GPU per worker")
    tr.add_argument("--base-model", help="model folder to start from (default: the bundled MiniLM)")
    tr.add_argument("--seed", type=int, help="seed (default 0; keep it equal to eval's --seed)")
    tr.add_argument("--ray-address", help="join an existing Ray cluster")
    tr.add_argument("--quiet", action="store_true", help="no progress bar")
    tr.set_defaults(func=cmd_train)

    keys = sub.add_parser("keys", help="API keys: create, list, revoke (in the configured store)")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)

    def store_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", help="YAML config file (store url, data_dir)")
        p.add_argument("--data-dir", help="state directory (default ~/.tastemaker)")
        p.add_argument("--json", action="store_true", help="machine-readable output")
        p.set_defaults(func=cmd_keys)

    kc = keys_sub.add_parser("create", help="create a key and print it (once)")
    kc.add_argument("--role", required=True, choices=["read", "write", "admin"], help="admin ⊇ write ⊇ read")
    kc.add_argument("--name", required=True, help="who or what uses the key")
    store_args(kc)
    kl = keys_sub.add_parser("list", help="every key: id, role, name, created, revoked (never the secret)")
    store_args(kl)
    kr = keys_sub.add_parser("revoke", help="revoke a key by its id")
    kr.add_argument("key_id")
    store_args(kr)

    bench = sub.add_parser("bench", help="benchmarks (see bench/README.md)")
    bench.add_argument("benchmark", help="e.g. e2e")
    bench.add_argument("rest", nargs=argparse.REMAINDER, help="benchmark arguments (--help for each)")
    bench.set_defaults(func=cmd_bench)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except TastemakerError as exc:
        print(f"tastemaker: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # gRPC errors from client commands: say what the server said
        import grpc

        if isinstance(exc, grpc.RpcError):
            print(f"tastemaker: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())

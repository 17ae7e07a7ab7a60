"""`tastemaker bench encoder`: texts/s of the encoder backends and of the Serve encoder pool,
against plain `sentence-transformers` on the same model in the same run.

Two workloads: the demo catalog (`Item.text()` of every vendored MovieLens movie: short texts,
~15-40 tokens) and synthetic review-length texts (40-120 words, ~60-170 tokens, seeded). For each
workload and each of `--runs` repetitions (candidates interleaved, so drift in the machine's load
hits all of them), it times:

* **baseline**: `SentenceTransformer(model).encode(texts, batch_size=32, normalize_embeddings=True)`,
  the obvious way to embed with this model (sentence-transformers' default batch size);
* **direct**: our backends called in-process, `backend.encode(texts)`: `transformers` fp32,
  `onnx` fp32, `onnx` int8, and `onnx` fp32 with `tokenize_ahead` off (what the overlap buys);
* **pool**: a minimal Serve application holding only the encoder deployment (local Ray with all of
  the machine's CPUs, HTTP on a free port), fed by `--pool-callers` concurrent callers in this
  process, each sending requests of `--pool-texts-per-request` texts through a deployment handle
  until the workload is done; the texts share `@serve.batch` batches inside the replica.

Every candidate encodes the same texts; texts/s = texts / wall time of the whole workload. It
reports medians over runs (ratios from medians) as JSON (conventions in bench/README.md) and a
table on stdout, plus the accuracy of the ONNX paths (cosine to transformers fp32 on the catalog)
and the pool's mean batch size. Progress goes to stderr. Clients and service share the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from tastemaker_bench.figures import figure

#: Default output: bench/results/encoder.json in the source tree.
DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "encoder.json"

_T0 = time.monotonic()

# Review-like vocabulary for the synthetic texts (sentences are drawn from these parts).
_OPENERS = (
    "I watched this last weekend", "Honestly", "My partner picked this one", "Saw it in the cinema",
    "Second time watching it", "Not what I expected", "After all the hype", "On a rainy Sunday",
)
_SUBJECTS = (
    "the plot", "the acting", "the soundtrack", "the ending", "the dialogue", "the pacing",
    "the cinematography", "the lead actress", "the villain", "the special effects", "the script",
    "the second half", "the director's choices", "the supporting cast", "the opening scene",
)
_VERDICTS = (
    "was absolutely stunning", "felt slow and predictable", "kept me on the edge of my seat",
    "made no sense at all", "was funnier than I thought", "dragged on far too long",
    "was beautifully shot", "carried the whole film", "fell completely flat", "surprised me",
    "was a bit forgettable", "stayed with me for days", "was clumsy but charming",
)
_CLOSERS = (
    "Would recommend to anyone who likes a good story.", "Not for kids, though.",
    "I would not watch it again.", "Bring tissues.", "Overall a solid evening.",
    "Skip it unless you are a fan of the genre.", "Five stars from me.", "Two stars, generously.",
)


def progress(message: str) -> None:
    """One progress line on stderr, with the seconds since the benchmark started."""
    print(f"[encoder {time.monotonic() - _T0:7.1f}s] {message}", file=sys.stderr, flush=True)


def synthetic_reviews(count: int, seed: int = 0, min_words: int = 40, max_words: int = 120) -> list[str]:
    """`count` review-like texts of `min_words`..`max_words` words, the same for the same seed."""
    rng = np.random.default_rng(seed)
    texts = []
    for _ in range(count):
        target = int(rng.integers(min_words, max_words + 1))
        words: list[str] = []
        sentences = [str(rng.choice(_OPENERS)) + ","]
        while len(words) < target:
            sentence = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERDICTS)}."
            sentences.append(sentence)
            words = " ".join(sentences).split()
        sentences.append(str(rng.choice(_CLOSERS)))
        texts.append(" ".join(" ".join(sentences).split()[: target + 8]))
    return texts


def catalog_texts(limit: Optional[int] = None) -> list[str]:
    """`Item.text()` of the vendored MovieLens movies (all 9,742 by default)."""
    from tastemaker.datasets.movielens import load_movielens

    items = load_movielens().items
    return [item.text() for item in (items[:limit] if limit else items)]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def host_block() -> dict:
    """The `host` object of the JSON: CPUs, GPU (null without one) and the versions that matter."""
    import ray
    import torch

    versions = {}
    for name in ("onnxruntime", "transformers", "sentence_transformers"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            versions[name] = None
    return {
        "cpus": os.cpu_count(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "ray": ray.__version__,
        **versions,
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tastemaker bench encoder",
        description=(
            "texts/s of the encoder backends (direct) and of the Serve encoder pool vs sentence-transformers "
            "on the same model, on the demo catalog and on synthetic review-length texts. Writes JSON "
            "(see bench/README.md) and prints a table; progress goes to stderr."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    data = parser.add_argument_group("workloads")
    data.add_argument("--catalog-items", type=int, default=0, help="demo catalog texts to encode; 0 = all 9,742")
    data.add_argument("--reviews", type=int, default=10_000, help="synthetic review-length texts")
    data.add_argument("--seed", type=int, default=0, help="seed of the synthetic reviews")
    run = parser.add_argument_group("runs")
    run.add_argument("--runs", type=int, default=3, help="repetitions; medians are reported")
    run.add_argument(
        "--candidates",
        default="st,transformers,onnx-fp32,onnx-int8,onnx-fp32-serial,pool",
        help="comma-separated subset of: st,transformers,onnx-fp32,onnx-int8,onnx-fp32-serial,pool",
    )
    pool = parser.add_argument_group("the Serve pool")
    pool.add_argument("--pool-backend", default="onnx", choices=["transformers", "onnx"], help="backend of the pool")
    pool.add_argument("--pool-precision", default="int8", choices=["fp32", "int8"], help="onnx precision of the pool")
    pool.add_argument("--pool-replicas", type=int, default=1, help="encoder replicas")
    pool.add_argument("--pool-num-cpus", type=float, default=0, help="CPUs per replica; 0 = all CPUs / replicas")
    pool.add_argument("--pool-callers", type=int, default=32, help="concurrent callers")
    pool.add_argument("--pool-texts-per-request", type=int, default=16, help="texts in each caller's request")
    pool.add_argument("--pool-max-batch-size", type=int, default=64, help="@serve.batch max_batch_size")
    pool.add_argument("--pool-batch-wait-s", type=float, default=0.005, help="@serve.batch batch_wait_timeout_s")
    out = parser.add_argument_group("output")
    out.add_argument("--json", default=None, help="where to write the JSON result; None = bench/results/encoder.json")
    return parser


CANDIDATES = ("st", "transformers", "onnx-fp32", "onnx-int8", "onnx-fp32-serial", "pool")

#: Candidate -> (figure prefix, description for the table).
LABELS = {
    "st": ("sentence_transformers", "sentence-transformers (baseline)"),
    "transformers": ("direct_transformers_fp32", "our transformers backend, fp32"),
    "onnx-fp32": ("direct_onnx_fp32", "our onnx backend, fp32"),
    "onnx-int8": ("direct_onnx_int8", "our onnx backend, int8"),
    "onnx-fp32-serial": ("direct_onnx_fp32_no_tokenize_ahead", "onnx fp32, tokenize_ahead off"),
    "pool": ("pool", "Serve pool (batching, concurrent callers)"),
}


class Pool:
    """A minimal Serve application with only the encoder deployment, and concurrent callers."""

    def __init__(self, args: argparse.Namespace, cache_dir: str):
        import ray
        from ray import serve

        from tastemaker.config import EncoderConfig
        from tastemaker.encoder.deployment import EncoderDeployment, deployment_options

        cpus = os.cpu_count() or 1
        if not ray.is_initialized():
            ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
        serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
        num_cpus = args.pool_num_cpus or cpus / args.pool_replicas
        self.config = EncoderConfig(
            backend=args.pool_backend,
            onnx_precision=args.pool_precision,
            onnx_cache_dir=cache_dir,
            num_replicas=args.pool_replicas,
            num_cpus=num_cpus,
            intra_op_threads=max(1, int(num_cpus)),
            max_batch_size=args.pool_max_batch_size,
            batch_wait_timeout_s=args.pool_batch_wait_s,
            max_ongoing_requests=max(256, args.pool_callers * 2),
        )
        self.app_name = "bench-encoder-pool"
        self.handle = serve.run(
            EncoderDeployment.options(**deployment_options(self.config)).bind(self.config),
            name=self.app_name,
            route_prefix=None,
        )
        self.callers = args.pool_callers
        self.per_request = args.pool_texts_per_request
        self.dimension = self.handle.dimension.remote().result()

    def encode(self, texts: list[str]) -> np.ndarray:
        """All `texts` through the pool, by `callers` concurrent callers; rows in input order."""
        requests = [list(range(s, min(s + self.per_request, len(texts)))) for s in range(0, len(texts), self.per_request)]
        out = np.zeros((len(texts), self.dimension), dtype=np.float32)

        async def caller(queue: asyncio.Queue) -> None:
            while True:
                try:
                    idx = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                vectors = await self.handle.encode.remote([texts[i] for i in idx])
                if vectors.shape[1] != out.shape[1]:
                    raise RuntimeError(f"pool returned dimension {vectors.shape[1]}")
                out[idx] = vectors

        async def run() -> None:
            queue: asyncio.Queue = asyncio.Queue()
            for idx in requests:
                queue.put_nowait(idx)
            await asyncio.gather(*(caller(queue) for _ in range(self.callers)))

        asyncio.run(run())
        return out

    def stats(self) -> dict:
        return self.handle.stats.remote().result()

    def close(self) -> None:
        import ray
        from ray import serve

        try:
            serve.delete(self.app_name)
            serve.shutdown()
        finally:
            ray.shutdown()


def _median(values) -> float:
    return float(statistics.median(values))


def _r(x: float, digits: int = 3) -> float:
    return round(float(x), digits)


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    candidates = [c.strip() for c in args.candidates.split(",") if c.strip()]
    unknown = set(candidates) - set(CANDIDATES)
    if unknown or "st" not in candidates:
        parser.error(f"--candidates must include st and only name {', '.join(CANDIDATES)} (got {sorted(unknown)})")
    if args.runs < 1 or args.reviews < 0 or args.catalog_items < 0:
        parser.error("--runs must be >= 1; --reviews and --catalog-items >= 0")

    from tastemaker.config import EncoderConfig
    from tastemaker.encoder import create_backend
    from tastemaker.encoder.base import bundled_model_path

    started = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    load_before = round(os.getloadavg()[0], 2)
    json_path = Path(args.json) if args.json else DEFAULT_JSON
    workloads = {"catalog": catalog_texts(args.catalog_items or None)}
    if args.reviews:
        workloads["reviews"] = synthetic_reviews(args.reviews, args.seed)
    progress(
        "workloads: "
        + ", ".join(f"{name} {len(t)} texts, {np.mean([len(x.split()) for x in t]):.0f} words avg" for name, t in workloads.items())
    )
    tmp = tempfile.TemporaryDirectory(prefix="tastemaker-bench-encoder-")
    encoders: dict[str, Callable[[list[str]], np.ndarray]] = {}
    pool: Optional[Pool] = None
    timings: dict[tuple[str, str], list[float]] = {}
    vectors: dict[tuple[str, str], np.ndarray] = {}
    pool_stats: dict = {}
    try:
        progress("loading sentence-transformers")
        from sentence_transformers import SentenceTransformer

        st_model = SentenceTransformer(str(bundled_model_path()), device="cpu")
        encoders["st"] = lambda texts: st_model.encode(texts, batch_size=32, normalize_embeddings=True)
        backend_configs = {
            "transformers": EncoderConfig(),
            "onnx-fp32": EncoderConfig(backend="onnx", onnx_precision="fp32", onnx_cache_dir=tmp.name),
            "onnx-int8": EncoderConfig(backend="onnx", onnx_precision="int8", onnx_cache_dir=tmp.name),
            "onnx-fp32-serial": EncoderConfig(
                backend="onnx", onnx_precision="fp32", tokenize_ahead=False, onnx_cache_dir=tmp.name
            ),
        }
        for name, config in backend_configs.items():
            if name in candidates:
                progress(f"starting backend {name} (exports ONNX on first use)")
                backend = create_backend(config)
                backend.start()
                encoders[name] = backend.encode
        if "pool" in candidates:
            progress("starting Ray, Serve and the encoder pool")
            pool = Pool(args, tmp.name)
            encoders["pool"] = pool.encode
        for fn in encoders.values():  # warm every path (first-call allocations, thread pools)
            fn(workloads["catalog"][:64])

        for run in range(1, args.runs + 1):
            for workload, texts in workloads.items():
                for name in candidates:
                    start = time.perf_counter()
                    result = encoders[name](texts)
                    elapsed = time.perf_counter() - start
                    timings.setdefault((name, workload), []).append(len(texts) / elapsed)
                    if run == 1:
                        vectors[(name, workload)] = np.asarray(result, dtype=np.float32)
                    progress(f"run {run}/{args.runs} {workload:8s} {name:18s} {len(texts) / elapsed:8.1f} texts/s")
        if pool is not None:
            pool_stats = pool.stats()
    finally:
        load_after = round(os.getloadavg()[0], 2)
        if pool is not None:
            progress("stopping the pool")
            pool.close()
        tmp.cleanup()

    figures = _figures(candidates, workloads, timings, vectors, pool_stats)
    params = {
        "workloads": {name: len(texts) for name, texts in workloads.items()},
        "words_avg": {name: _r(np.mean([len(x.split()) for x in texts]), 1) for name, texts in workloads.items()},
        "model": "all-MiniLM-L6-v2 (bundled), max_length 256",
        "baseline": "SentenceTransformer.encode(batch_size=32, normalize_embeddings=True)",
        "candidates": candidates,
        "runs": args.runs,
        "aggregate": "median of runs; ratio = value / baseline_value (> 1 = faster than sentence-transformers)",
        "seed": args.seed,
        "forward_batch_size": {"transformers": EncoderConfig().resolved_forward_batch_size(), "onnx": EncoderConfig(backend="onnx").resolved_forward_batch_size()},
        "pool": {
            "backend": args.pool_backend,
            "precision": args.pool_precision if args.pool_backend == "onnx" else None,
            "replicas": args.pool_replicas,
            "num_cpus_per_replica": args.pool_num_cpus or (os.cpu_count() or 1) / args.pool_replicas,
            "callers": args.pool_callers,
            "texts_per_request": args.pool_texts_per_request,
            "max_batch_size": args.pool_max_batch_size,
            "batch_wait_timeout_s": args.pool_batch_wait_s,
            "client": "in-process asyncio callers through a DeploymentHandle",
        },
        "load_avg_1m_before": load_before,
        "load_avg_1m_after": load_after,
    }
    report = {"benchmark": "encoder", "started": started, "host": host_block(), "params": params, "figures": figures}
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    progress(f"wrote {json_path}")
    _print_table(report, candidates, list(workloads))
    return 0


def _figures(candidates, workloads, timings, vectors, pool_stats) -> list[dict]:
    figures: list[dict] = []

    def fig(*args, **kwargs) -> None:
        figures.append(figure(*args, **kwargs))

    for workload in list(workloads) + ["all"]:
        def rate(name: str) -> float:
            if workload != "all":
                return _median(timings[(name, workload)])
            # Combined: all texts over the summed median time of each workload.
            total = sum(len(t) for t in workloads.values())
            return total / sum(len(t) / _median(timings[(name, w)]) for w, t in workloads.items())

        base_name = f"sentence_transformers_texts_per_s_{workload}"
        base = rate("st")
        fig(base_name, base, "texts/s")
        for name in candidates:
            if name == "st":
                continue
            value = rate(name)
            fig(f"{LABELS[name][0]}_texts_per_s_{workload}", value, "texts/s", base_name, base, value / base)
    reference = vectors.get(("transformers", "catalog"))
    if reference is None:
        reference = vectors[("st", "catalog")]
    for name in ("onnx-fp32", "onnx-int8", "pool", "st"):
        got = vectors.get((name, "catalog"))
        if got is not None and got is not reference:
            cosine = (got * reference).sum(axis=1)
            fig(f"{LABELS[name][0]}_min_cosine_to_fp32_catalog", float(cosine.min()), "cosine")
            fig(f"{LABELS[name][0]}_mean_cosine_to_fp32_catalog", float(cosine.mean()), "cosine")
    if pool_stats:
        fig("pool_mean_batch_size", pool_stats["mean_batch"], "texts")
        fig("pool_largest_batch_size", pool_stats["largest_batch"], "texts")
    return figures


def _print_table(report: dict, candidates: list[str], workloads: list[str]) -> None:
    f = {x["name"]: x for x in report["figures"]}
    h = report["host"]
    p = report["params"]
    print(
        f"encoder: {p['workloads']} texts, {p['runs']} runs (medians); {h['cpus']} CPUs, gpu {h['gpu']}; "
        f"load avg {p['load_avg_1m_before']} -> {p['load_avg_1m_after']}"
    )
    columns = workloads + ["all"]
    rows = [("texts/s (ratio vs sentence-transformers)", *columns)]
    for name in candidates:
        prefix = LABELS[name][0]
        cells = []
        for w in columns:
            x = f[f"{prefix}_texts_per_s_{w}"]
            cells.append(f"{x['value']:.1f}" + (f" ({x['ratio']:.2f}x)" if "ratio" in x else ""))
        rows.append((LABELS[name][1], *cells))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(c.ljust(widths[0]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(row)))
    for name in ("direct_onnx_fp32", "direct_onnx_int8", "pool"):
        if f"{name}_min_cosine_to_fp32_catalog" in f:
            print(
                f"{name}: cosine to transformers fp32 on the catalog: min "
                f"{f[name + '_min_cosine_to_fp32_catalog']['value']:.4f}, mean {f[name + '_mean_cosine_to_fp32_catalog']['value']:.4f}"
            )
    if "pool_mean_batch_size" in f:
        print(f"pool: mean batch {f['pool_mean_batch_size']['value']:.1f} texts, largest {f['pool_largest_batch_size']['value']:.0f}")


if __name__ == "__main__":
    sys.exit(main())

"""`tastemaker bench stores`: the cost of the shared store — `bench e2e` and `bench freshness` run
once on SQLite (the baseline) and once on PostgreSQL, in the same run, side by side.

Each of the four measurements is a child process (`tastemaker bench e2e|freshness --store-url ...
--json ...`), so every one starts its own service and Ray from scratch; the order is e2e on SQLite,
e2e on PostgreSQL, freshness on SQLite, freshness on PostgreSQL. Every PostgreSQL measurement gets
a schema of its own (created, used through `options=-csearch_path=...`, dropped at the end), so the
database given by `--postgres-url` must let the role create schemas. Without `--postgres-url` a
temporary PostgreSQL server is started on a free loopback port (tests/pgserver.py; needs the source
checkout and the PostgreSQL server binaries) and stopped at the end.

Output: one JSON (`bench/README.md` conventions) whose figures are the PostgreSQL values of the
key figures of both benchmarks with the SQLite value as the baseline and `ratio` oriented so that
> 1 means PostgreSQL is better (for latencies: sqlite / postgres), plus the two children's full
reports under `runs`. The PostgreSQL URL is recorded without its password.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

from tastemaker_bench.figures import figure

DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "stores.json"

#: benchmark -> (figure name, higher is better) compared between the stores.
KEY_FIGURES = {
    "e2e": [
        ("recommend_p50_ms", False),
        ("recommend_p99_ms", False),
        ("recommend_rps", True),
        ("recommend_concurrent_p99_ms", False),
    ],
    "freshness": [
        ("events_per_s_no_text", True),
        ("events_per_s_review_text", True),
        ("ack_p50_ms", False),
        ("ack_p99_ms", False),
        ("capped_ack_p99_ms", False),
        ("write_ack_p99_ms", False),
        ("visible_p99_ms", False),
    ],
}

#: benchmark -> (name here, figure of the child whose `ratio` is against that run's echo).
ECHO_RATIOS = {
    "e2e": [
        ("recommend_p50_echo_ratio", "recommend_p50_speedup_vs_echo"),
        ("recommend_p99_echo_ratio", "recommend_p99_speedup_vs_echo"),
        ("recommend_rps_echo_ratio", "recommend_rps"),
    ],
    "freshness": [
        ("events_per_s_no_text_echo_ratio", "events_per_s_no_text"),
        ("ack_p99_echo_ratio", "ack_p99_speedup_vs_echo"),
        ("capped_ack_incl_linger_p99_echo_ratio", "capped_ack_incl_linger_p99_speedup_vs_echo"),
        ("visible_p99_echo_ratio", "visible_p99_speedup_vs_echo"),
    ],
}

_T0 = time.monotonic()


def progress(message: str) -> None:
    print(f"[stores {time.monotonic() - _T0:7.1f}s] {message}", file=sys.stderr, flush=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tastemaker bench stores",
        description="bench e2e and bench freshness on SQLite (baseline) and on PostgreSQL in the same run.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--postgres-url",
        default=None,
        help="postgresql://user:password@host:port/db where the role may create schemas; None = start a "
        "temporary PostgreSQL server on loopback (source checkout + PostgreSQL server binaries)",
    )
    parser.add_argument("--e2e-args", default="", help="extra arguments for bench e2e (one string, shell-quoted)")
    parser.add_argument(
        "--freshness-args", default="", help="extra arguments for bench freshness (one string, shell-quoted)"
    )
    parser.add_argument(
        "--only",
        choices=["direct", *sorted(KEY_FIGURES)],
        action="append",
        help="run only this part (repeatable): direct (the stores in-process), e2e, freshness",
    )
    parser.add_argument(
        "--direct-rounds", type=int, default=5, help="rounds of the in-process store measurement (0 = skip it)"
    )
    parser.add_argument("--direct-calls", type=int, default=200, help="calls per round of the in-process measurement")
    parser.add_argument("--json", default=None, help="where to write the JSON; None = bench/results/stores.json")
    return parser


def _start_temporary_postgres():
    """A PostgreSQL server for this run from the source checkout's test helper."""
    root = Path(__file__).resolve().parent.parent
    if not (root / "tests" / "pgserver.py").exists():
        raise SystemExit("no --postgres-url and no source checkout with tests/pgserver.py: give --postgres-url")
    sys.path.insert(0, str(root))
    from tests.pgserver import start_postgres

    return start_postgres()


def _schema_url(base_url: str, schema: str) -> str:
    import psycopg

    with psycopg.connect(base_url, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    return f"{base_url}{'&' if '?' in base_url else '?'}options=-csearch_path%3D{schema}"


def _drop_schema(base_url: str, schema: str) -> None:
    import psycopg

    with psycopg.connect(base_url, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def _run_child(name: str, extra: list[str], store_url: Optional[str], json_path: Path) -> dict:
    argv = [
        sys.executable,
        "-c",
        "import sys; from tastemaker_bench import run_benchmark; sys.exit(run_benchmark(sys.argv[1], sys.argv[2:]))",
        name,
        *extra,
        "--json",
        str(json_path),
    ]
    if store_url:
        argv += ["--store-url", store_url]
    started = time.monotonic()
    done = subprocess.run(argv)
    if done.returncode != 0:
        raise SystemExit(f"bench {name} exited with {done.returncode}")
    report = json.loads(json_path.read_text())
    report["wall_s"] = round(time.monotonic() - started, 1)
    return report


def measure_direct(postgres_url: str, sqlite_url: str, rounds: int, calls: int) -> tuple[list[dict], dict]:
    """The stores alone, in this process (no Ray, no gRPC): `append_events` of 1 and of 500 events
    per call (one transaction each, durable before it returns) and the event-feed read a follower
    makes, alternating SQLite and PostgreSQL round by round so that drift hits both. Medians over
    rounds of each round's p50/p99."""
    import statistics

    from tastemaker.domain import EventType, UserEvent
    from tastemaker.store import open_store

    stores = {"sqlite": open_store(sqlite_url), "postgres": open_store(postgres_url)}
    counters = {"sqlite": 0, "postgres": 0}
    samples: dict[str, dict[str, list[float]]] = {name: {} for name in stores}

    def batch(store_name: str, size: int) -> list[UserEvent]:
        start = counters[store_name]
        counters[store_name] += size
        return [
            UserEvent(event_id=f"e{n}", user_id=f"u{n % 1000}", event_type=EventType.CLICK, item_id=f"i{n % 500}", event_time=1e9)
            for n in range(start, start + size)
        ]

    def timed(store_name: str, key: str, call) -> None:
        started = time.perf_counter()
        call()
        samples[store_name].setdefault(key, []).append((time.perf_counter() - started) * 1000)

    def percentile(values: list[float], q: float) -> float:
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]

    per_round: dict[str, dict[str, list[float]]] = {name: {} for name in stores}
    try:
        for _ in range(rounds):
            for name, store in stores.items():
                samples[name] = {}
                for _ in range(calls):
                    timed(name, "append_1", lambda: store.append_events(0, batch(name, 1)))
                for _ in range(max(1, calls // 10)):
                    timed(name, "append_500", lambda: store.append_events(0, batch(name, 500)))
                for _ in range(calls):
                    timed(name, "events_after_1000", lambda: store.events_after(counters[name] - 1000, limit=1000))
                for key, values in samples[name].items():
                    per_round[name].setdefault(f"{key}_p50_ms", []).append(percentile(values, 50))
                    per_round[name].setdefault(f"{key}_p99_ms", []).append(percentile(values, 99))
                    if key == "append_500":
                        per_round[name].setdefault("append_500_events_per_s", []).append(
                            500 * len(values) / (sum(values) / 1000)
                        )
    finally:
        for store in stores.values():
            store.close()
    medians = {name: {k: statistics.median(v) for k, v in figures.items()} for name, figures in per_round.items()}
    out = []
    for key in sorted(medians["postgres"]):
        pg, base = medians["postgres"][key], medians["sqlite"][key]
        higher_is_better = key.endswith("_per_s")
        ratio = (pg / base) if higher_is_better else (base / pg)
        unit = "events/s" if higher_is_better else "ms"
        out.append(figure(f"direct_postgres_{key}", pg, unit, f"direct_sqlite_{key}", base, ratio))
    return out, {"rounds": rounds, "calls_per_round": calls, "order": "sqlite then postgres, each round"}


def compare(runs: dict[str, dict[str, dict]], benchmarks: list[str]) -> list[dict]:
    """The figures of the report from the children's reports (`runs[benchmark][store]`)."""
    figures = []
    for name in benchmarks:
        sqlite = {f["name"]: f["value"] for f in runs[name]["sqlite"]["figures"]}
        postgres = {f["name"]: f["value"] for f in runs[name]["postgres"]["figures"]}
        for key, higher_is_better in KEY_FIGURES[name]:
            pg, base = postgres[key], sqlite[key]
            if higher_is_better:
                ratio = pg / base if base else None
            else:
                ratio = base / pg if pg else None
            unit = next(f["unit"] for f in runs[name]["postgres"]["figures"] if f["name"] == key)
            figures.append(figure(f"postgres_{key}", pg, unit, f"sqlite_{key}", base, ratio))
        # The same comparison on each run's ratio against its own echo baseline (> 1: better than
        # the echo), which cancels much of the drift of a shared machine between the two runs.
        sqlite_vs_echo = {f["name"]: f.get("ratio") for f in runs[name]["sqlite"]["figures"]}
        postgres_vs_echo = {f["name"]: f.get("ratio") for f in runs[name]["postgres"]["figures"]}
        for key, echo_key in ECHO_RATIOS.get(name, []):
            pg, base = postgres_vs_echo.get(echo_key), sqlite_vs_echo.get(echo_key)
            if pg is not None and base:
                figures.append(figure(f"postgres_{key}", pg, "ratio vs echo", f"sqlite_{key}", base, pg / base))
    return figures


def load_averages(runs: dict[str, dict[str, dict]]) -> dict[str, list]:
    """How busy the machine was around each measurement (shared machines drift)."""
    return {
        f"{name} on {store}": [
            runs[name][store]["params"].get("load_avg_1m_before"),
            runs[name][store]["params"].get("load_avg_1m_after"),
        ]
        for name in runs
        for store in runs[name]
    }


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from tastemaker.store.base import redact_url
    from tastemaker_bench.e2e import host_block

    started = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    json_path = Path(args.json) if args.json else DEFAULT_JSON
    parts = args.only or ["direct", "e2e", "freshness"]
    benchmarks = [name for name in parts if name in KEY_FIGURES]
    extra = {"e2e": shlex.split(args.e2e_args), "freshness": shlex.split(args.freshness_args)}
    server = None
    base_url = args.postgres_url
    if base_url is None:
        progress("starting a temporary PostgreSQL server")
        server = _start_temporary_postgres()
        base_url = server.url
    schemas: list[str] = []
    runs: dict[str, dict[str, dict]] = {}
    direct: list[dict] = []
    direct_params: dict = {}
    try:
        with tempfile.TemporaryDirectory(prefix="tastemaker-bench-stores-") as tmp:
            if "direct" in parts and args.direct_rounds > 0:
                schema = f"bench_direct_{uuid.uuid4().hex[:8]}"
                schemas.append(schema)
                progress(f"in-process store measurement ({args.direct_rounds} rounds)")
                direct, direct_params = measure_direct(
                    _schema_url(base_url, schema), f"sqlite:///{tmp}/direct.db", args.direct_rounds, args.direct_calls
                )
            for name in benchmarks:
                runs[name] = {}
                for store in ("sqlite", "postgres"):
                    url = None
                    if store == "postgres":
                        schema = f"bench_{name}_{uuid.uuid4().hex[:8]}"
                        schemas.append(schema)
                        url = _schema_url(base_url, schema)
                    progress(f"bench {name} on {store}")
                    runs[name][store] = _run_child(name, extra[name], url, Path(tmp) / f"{name}-{store}.json")
                    progress(f"bench {name} on {store}: done in {runs[name][store]['wall_s']} s")
    finally:
        for schema in schemas:
            try:
                _drop_schema(base_url, schema)
            except Exception as exc:  # cleanup only; the figures are what matters
                progress(f"could not drop schema {schema}: {type(exc).__name__}")
        if server is not None:
            server.stop()

    figures = direct + compare(runs, benchmarks)
    report = {
        "benchmark": "stores",
        "started": started,
        "host": host_block(),
        "params": {
            "postgres": redact_url(base_url) + " (a schema per measurement)",
            "postgres_server": "temporary, started by the benchmark (tests/pgserver.py)" if server else "given",
            "benchmarks": benchmarks,
            "extra_args": {name: extra[name] for name in benchmarks},
            "order": [f"{name} on {store}" for name in benchmarks for store in ("sqlite", "postgres")],
            "ratio": "> 1: PostgreSQL better; latencies sqlite/postgres, rates postgres/sqlite",
            "direct": direct_params,
            "load_avg_1m_before_after": load_averages(runs),
            "wall_s": {f"{name} on {store}": runs[name][store]["wall_s"] for name in runs for store in runs[name]},
        },
        "figures": figures,
        "runs": runs,
    }
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    progress(f"wrote {json_path}")
    width = max(len(f["name"]) for f in figures)
    print(f"{'figure':<{width}}  {'postgres':>10}  {'sqlite':>10}  ratio")
    for f in figures:
        ratio = f"{f['ratio']:.3f}" if "ratio" in f else "-"
        print(f"{f['name']:<{width}}  {f['value']:>10.3f}  {f['baseline_value']:>10.3f}  {ratio}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

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
        "--only", choices=sorted(KEY_FIGURES), action="append", help="run only this benchmark (repeatable)"
    )
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


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from tastemaker.store.base import redact_url

    started = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    json_path = Path(args.json) if args.json else DEFAULT_JSON
    benchmarks = args.only or ["e2e", "freshness"]
    extra = {"e2e": shlex.split(args.e2e_args), "freshness": shlex.split(args.freshness_args)}
    server = None
    base_url = args.postgres_url
    if base_url is None:
        progress("starting a temporary PostgreSQL server")
        server = _start_temporary_postgres()
        base_url = server.url
    schemas: list[str] = []
    runs: dict[str, dict[str, dict]] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="tastemaker-bench-stores-") as tmp:
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
    report = {
        "benchmark": "stores",
        "started": started,
        "host": runs[benchmarks[0]]["sqlite"]["host"],
        "params": {
            "postgres": redact_url(base_url) + " (a schema per measurement)",
            "postgres_server": "temporary, started by the benchmark (tests/pgserver.py)" if server else "given",
            "benchmarks": benchmarks,
            "extra_args": {name: extra[name] for name in benchmarks},
            "order": [f"{name} on {store}" for name in benchmarks for store in ("sqlite", "postgres")],
            "ratio": "> 1: PostgreSQL better; latencies sqlite/postgres, rates postgres/sqlite",
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

"""`tastemaker bench e2e`: Recommend latency and throughput through gRPC, against a bare Serve
gRPC round trip measured in the same run.

The benchmark is self-contained: it starts its own service in-process (temporary data directory,
free ports, local Ray with all of the machine's CPUs), loads a MovieLens subsample through the
public API, and deploys the echo application (`bench/echo.py`) into the same Serve instance. Then,
`--runs` times, it measures

* sequential latency (one call at a time, p50/p99 over `--requests` calls after `--warmup`) of
  the echo, of `Recommend` for random loaded users, and of `Recommend` with a `query` text;
* concurrent throughput (`--concurrency` client threads, each with its own channel, for
  `--duration` seconds) of the same three, with p50/p99 under that load,

and reports the median of the runs as JSON (conventions in /work/shared/design/bench.md and
bench/README.md) plus a short table on stdout. Progress goes to stderr. The service is always
stopped at the end.

The load generator runs in this process, on the same machine as the service: on a small machine
the client threads compete with the service for the CPUs, equally for the echo and the service.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from tastemaker_bench.figures import figure

#: Natural-language steering texts for the `query` variant; one is drawn at random per call.
QUERIES = (
    "animated movie for kids about toys",
    "a scary horror film in a haunted house",
    "romantic comedy set in New York",
    "space adventure with aliens and starships",
    "crime thriller about a bank heist",
)

PAGE_SIZE = 10
#: Default output: bench/results/e2e.json in the source tree (independent of the working directory).
DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "e2e.json"

_T0 = time.monotonic()


#: The admin key of the benchmark's own service (auth is on by default), set in main().
_API_KEY: Optional[str] = None

def progress(message: str) -> None:
    """One progress line on stderr, with the seconds since the benchmark started."""
    print(f"[e2e {time.monotonic() - _T0:7.1f}s] {message}", file=sys.stderr, flush=True)


# -- measurement ---------------------------------------------------------------------------------
@dataclass
class Sequential:
    """Latencies of calls made one after another."""

    latencies_s: list[float]

    def p(self, q: float) -> float:
        return float(np.percentile(self.latencies_s, q)) * 1000.0


@dataclass
class Concurrent:
    """Calls made by several threads at once for a fixed time."""

    latencies_s: list[float]
    elapsed_s: float
    errors: int = 0
    first_error: Optional[str] = None

    @property
    def rps(self) -> float:
        return len(self.latencies_s) / self.elapsed_s

    def p(self, q: float) -> float:
        return float(np.percentile(self.latencies_s, q)) * 1000.0 if self.latencies_s else float("nan")


def measure_sequential(call: Callable[[], object], requests: int, warmup: int) -> Sequential:
    """`warmup` unrecorded calls, then `requests` timed calls; any error aborts the benchmark."""
    for _ in range(warmup):
        call()
    latencies = []
    for _ in range(requests):
        start = time.perf_counter()
        call()
        latencies.append(time.perf_counter() - start)
    return Sequential(latencies)


def measure_concurrent(
    make_call: Callable[[int], tuple[Callable[[], object], Callable[[], None]]],
    threads: int,
    duration_s: float,
) -> Concurrent:
    """`threads` closed-loop clients for `duration_s`; `make_call(i)` gives thread i its call and
    a close function (each thread has its own channel, like independent callers). Errors are
    counted, not timed; throughput is completed calls over the time until the last thread ends."""
    import grpc

    calls = [make_call(i) for i in range(threads)]
    per_thread: list[list[float]] = [[] for _ in range(threads)]
    errors = [0] * threads
    first_error: list[str] = []
    deadline = [0.0]
    started = [0.0]

    def start_clock() -> None:  # runs once, when every thread has connected, before any is released
        started[0] = time.perf_counter()
        deadline[0] = started[0] + duration_s

    barrier = threading.Barrier(threads, action=start_clock)

    def worker(i: int) -> None:
        call = calls[i][0]
        out = per_thread[i]
        try:  # connect the channel before the clock starts
            call()
        except grpc.RpcError:
            pass
        barrier.wait()
        while True:
            start = time.perf_counter()
            if start >= deadline[0]:
                return
            try:
                call()
            except grpc.RpcError as exc:
                errors[i] += 1
                if not first_error:
                    first_error.append(f"{exc.code().name}: {exc.details()}")
                continue
            out.append(time.perf_counter() - start)

    pool = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    elapsed = time.perf_counter() - started[0]
    for _, close in calls:
        close()
    return Concurrent(
        [x for lat in per_thread for x in lat], elapsed, sum(errors), first_error[0] if first_error else None
    )


# -- the service -----------------------------------------------------------------------------------
def free_port() -> int:
    """A port the OS considers free right now (bound to port 0, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def host_block() -> dict:
    """The `host` object of the JSON: CPUs, GPU (null without one) and the versions that matter."""
    import ray
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpus": os.cpu_count(),
        "gpu": gpu,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "ray": ray.__version__,
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tastemaker bench e2e",
        description=(
            "Recommend latency/throughput through the Serve gRPC proxy vs a bare Serve gRPC round trip "
            "(an echo deployment on the same proto, in the same Serve instance). Starts and stops its own "
            "service; writes JSON (see bench/README.md) and prints a table; progress goes to stderr."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    data = parser.add_argument_group("data (MovieLens latest-small, loaded through the public API)")
    data.add_argument("--items", type=int, default=1500, help="catalog size: the most-rated items kept by subsample()")
    data.add_argument("--users", type=int, default=200, help="users kept by subsample() (with their ratings)")
    data.add_argument("--full", action="store_true", help="load the whole data set (ignores --items/--users)")
    data.add_argument("--movielens-path", help="MovieLens folder; None = the vendored copy in data/")
    data.add_argument(
        "--fit",
        action="store_true",
        help="after loading, run what `tastemaker fit` does (transitions, co-occurrence, matrix factors) and "
        "time Recommend once the replicas serve it, as `make serve` does after the demo",
    )
    load = parser.add_argument_group("load")
    load.add_argument("--requests", type=int, default=300, help="timed sequential calls per measurement")
    load.add_argument("--warmup", type=int, default=20, help="untimed sequential calls before each measurement")
    load.add_argument("--concurrency", type=int, default=8, help="client threads in the throughput measurement")
    load.add_argument("--duration", type=float, default=10.0, help="seconds of each throughput measurement")
    load.add_argument("--runs", type=int, default=3, help="repetitions of every measurement; medians are reported")
    load.add_argument("--seed", type=int, default=0, help="seed of the random user ids and query texts")
    out = parser.add_argument_group("service and output")
    out.add_argument(
        "--store-url",
        default=None,
        help="the service's store: postgresql://user:password@host:port/db (an empty database or schema: the "
        "benchmark loads its data into it) or sqlite:////abs/path.db; None = SQLite in the temporary data dir",
    )
    out.add_argument(
        "--config",
        help="service YAML config to benchmark (data dir, ports and Ray address are set by the benchmark; "
        "environment variables are ignored so runs are reproducible)",
    )
    out.add_argument(
        "--json", default=None, help="where to write the JSON result (folders are created); None = bench/results/e2e.json"
    )
    return parser


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for name in ("items", "users", "requests", "concurrency", "runs"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    if args.warmup < 0:
        parser.error("--warmup must be >= 0")
    if args.duration <= 0:
        parser.error("--duration must be > 0")


@dataclass
class RunResult:
    """What one run measured; keys are the target names ("echo", "recommend", "recommend_query")."""

    sequential: dict[str, Sequential] = field(default_factory=dict)
    concurrent: dict[str, Concurrent] = field(default_factory=dict)


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)

    from tastemaker.app import start_service, stop_service
    from tastemaker.auth import create_key_in_store
    from tastemaker.client import TastemakerClient
    from tastemaker.config import load_config
    from tastemaker.store.base import redact_url
    from tastemaker.datasets.movielens import load_movielens, subsample
    from tastemaker.demo import load_dataset
    from tastemaker_bench.echo import ECHO_APP_NAME, deploy_echo

    started = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    # Other work on a shared machine shifts absolute times (the ratios much less): say how busy it was.
    load_before = round(os.getloadavg()[0], 2)
    json_path = Path(args.json) if args.json else DEFAULT_JSON
    tmp = tempfile.TemporaryDirectory(prefix="tastemaker-bench-e2e-")
    grpc_port, http_port = free_port(), free_port()
    while http_port == grpc_port:
        http_port = free_port()
    config = load_config(
        args.config,
        overrides={
            ("data_dir",): tmp.name,
            ("server", "grpc_port"): grpc_port,
            ("server", "http_port"): http_port,
            ("store", "url"): args.store_url,
        },
        environ={},
    )
    # A local Ray with every CPU of the machine, whatever a config file says.
    config.server.ray_address = None
    config.server.ray_num_cpus = None
    target = f"{config.server.host}:{grpc_port}"
    app_name = config.server.app_name
    rng = np.random.default_rng(args.seed)
    results: list[RunResult] = []
    loaded_items = loaded_events = 0
    users: list[str] = []
    ray_cpus = None
    try:
        progress(f"starting the service on {target} (data in {tmp.name}); this takes a while")
        start_service(config)
        progress("service SERVING")
        global _API_KEY
        if config.auth.enabled:  # both applications get the same metadata; the echo ignores it
            _API_KEY = create_key_in_store(config.store_url(), "admin", "bench e2e")
        import ray

        ray_cpus = ray.cluster_resources().get("CPU")

        progress("reading MovieLens")
        data = load_movielens(args.movielens_path)
        if not args.full:
            data = subsample(data, max_items=args.items, max_users=args.users)
        users = sorted({r.user_id for r in data.ratings})
        progress(f"loading {len(data.items)} items and {len(data.ratings)} ratings of {len(users)} users")
        with TastemakerClient(target, api_key=_API_KEY, timeout_s=600, application=app_name) as client:
            loaded_items, loaded_events = load_dataset(client, data, show_progress=sys.stderr.isatty())
        progress(f"loaded {loaded_items} items, {loaded_events} rating events")
        if args.fit:
            from tastemaker.cli import fit_artifact

            progress(fit_artifact(config, show_progress=sys.stderr.isatty()))

        progress(f"deploying the echo application {ECHO_APP_NAME!r}")
        deploy_echo(num_cpus=config.gateway.num_cpus, max_ongoing_requests=config.gateway.max_ongoing_requests)

        service = TastemakerClient(target, api_key=_API_KEY, timeout_s=30, application=app_name)
        echo = TastemakerClient(target, api_key=_API_KEY, timeout_s=30, application=ECHO_APP_NAME)
        try:
            _sanity_check(service, echo, users[0])
            if args.fit:
                _wait_for_factors(service, users[0], config.retrieval.artifact_check_s)
            for run in range(1, args.runs + 1):
                results.append(_one_run(run, args, target, app_name, ECHO_APP_NAME, service, echo, users, rng))
        finally:
            service.close()
            echo.close()
    finally:
        load_after = round(os.getloadavg()[0], 2)
        progress("stopping the service")
        try:
            stop_service(config)
        finally:
            tmp.cleanup()
        progress("stopped")

    params = {
        "items": len(data.items) if args.full else args.items,
        "users": len(users) if args.full else args.users,
        "full": args.full,
        "fitted": args.fit,
        "loaded_items": loaded_items,
        "loaded_events": loaded_events,
        "page_size": PAGE_SIZE,
        "queries": list(QUERIES),
        "requests": args.requests,
        "warmup": args.warmup,
        "concurrency": args.concurrency,
        "duration_s": args.duration,
        "runs": args.runs,
        "aggregate": "median of runs",
        "seed": args.seed,
        "ray_cpus": ray_cpus,
        "client": "in-process, one gRPC channel per client thread",
        "store": redact_url(config.store_url()),
        "load_avg_1m_before": load_before,
        "load_avg_1m_after": load_after,
    }
    figures = _figures(results)
    report = {"benchmark": "e2e", "started": started, "host": host_block(), "params": params, "figures": figures}
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    progress(f"wrote {json_path}")
    _print_table(report)
    return 0


def _wait_for_factors(service, user_id: str, check_s: float) -> None:
    """Until the replicas serve the fitted artefact: the matrix factors propose candidates."""
    from tastemaker.v1 import recommender_service_pb2 as pb

    deadline = time.monotonic() + 10 * check_s + 60
    while not any(pb.CANDIDATE_SOURCE_FACTORS in r.sources for r in service.recommend(user_id, page_size=PAGE_SIZE).items):
        if time.monotonic() > deadline:
            raise RuntimeError("the replicas did not swap in the fitted artefact; nothing meaningful to time")
        time.sleep(check_s / 2)  # poll the replicas' artefact check
    progress("replicas serve the fitted graph and factors")


def _sanity_check(service, echo, user_id: str) -> None:
    """Both applications answer, and the service answers with items (else we'd time an empty path)."""
    import grpc

    deadline = time.monotonic() + 120
    while True:  # the echo replica may need a moment after serve.run returns
        try:
            echo.recommend(user_id, page_size=PAGE_SIZE)
            break
        except grpc.RpcError as exc:
            if time.monotonic() > deadline:
                raise
            progress(f"echo not answering yet ({exc.code().name}); retrying")
            time.sleep(1.0)
    reply = service.recommend(user_id, page_size=PAGE_SIZE)
    if len(reply.items) == 0:
        raise RuntimeError(f"Recommend for loaded user {user_id!r} returned no items; nothing meaningful to time")
    progress(f"sanity check: Recommend({user_id!r}) gave {len(reply.items)} items; echo answers")


def _one_run(run, args, target, app_name, echo_name, service, echo, users, rng) -> RunResult:
    """One repetition: sequential then concurrent, echo and service interleaved so that drift in
    the machine's load hits both."""
    from tastemaker.client import TastemakerClient

    def pick_user() -> str:
        return users[int(rng.integers(len(users)))]

    def pick_query() -> str:
        return QUERIES[int(rng.integers(len(QUERIES)))]

    result = RunResult()
    sequential_calls: dict[str, Callable[[], object]] = {
        "echo": lambda: echo.recommend(pick_user(), page_size=PAGE_SIZE),
        "recommend": lambda: service.recommend(pick_user(), page_size=PAGE_SIZE),
        "recommend_query": lambda: service.recommend(pick_user(), page_size=PAGE_SIZE, query=pick_query()),
    }
    for name, call in sequential_calls.items():
        progress(f"run {run}/{args.runs}: sequential {name} ({args.warmup} warmup + {args.requests} calls)")
        m = measure_sequential(call, args.requests, args.warmup)
        result.sequential[name] = m
        progress(f"run {run}/{args.runs}: sequential {name}: p50 {m.p(50):.2f} ms, p99 {m.p(99):.2f} ms")

    for name in sequential_calls:
        application = echo_name if name == "echo" else app_name

        def make_call(i: int, name=name, application=application):
            # Each thread draws from its own generator: numpy generators are not thread-safe.
            thread_rng = np.random.default_rng([args.seed, run, i])
            client = TastemakerClient(target, api_key=_API_KEY, timeout_s=30, application=application)

            def call():
                user = users[int(thread_rng.integers(len(users)))]
                query = QUERIES[int(thread_rng.integers(len(QUERIES)))] if name == "recommend_query" else ""
                return client.recommend(user, page_size=PAGE_SIZE, query=query)

            return call, client.close

        progress(f"run {run}/{args.runs}: concurrent {name} ({args.concurrency} threads, {args.duration:g} s)")
        m = measure_concurrent(make_call, args.concurrency, args.duration)
        result.concurrent[name] = m
        note = f", {m.errors} errors (first: {m.first_error})" if m.errors else ""
        progress(
            f"run {run}/{args.runs}: concurrent {name}: {m.rps:.1f} req/s, p50 {m.p(50):.2f} ms, "
            f"p99 {m.p(99):.2f} ms{note}"
        )
    return result


# -- report ------------------------------------------------------------------------------------
def _median(values) -> float:
    return float(statistics.median(values))


def _figures(results: list[RunResult]) -> list[dict]:
    """Median over runs of every figure; ratios are computed from the medians."""

    def seq(name: str, q: float) -> float:
        return _median(r.sequential[name].p(q) for r in results)

    def conc(name: str, q: float) -> float:
        return _median(r.concurrent[name].p(q) for r in results)

    def rps(name: str) -> float:
        return _median(r.concurrent[name].rps for r in results)

    echo_p50, echo_p99 = seq("echo", 50), seq("echo", 99)
    rec_p50, rec_p99 = seq("recommend", 50), seq("recommend", 99)
    recq_p50, recq_p99 = seq("recommend_query", 50), seq("recommend_query", 99)
    echo_rps, rec_rps, recq_rps = rps("echo"), rps("recommend"), rps("recommend_query")
    errors = sum(c.errors for r in results for c in r.concurrent.values())
    return [
        # Sequential latency (one call in flight).
        figure("recommend_p50_ms", rec_p50, "ms"),
        figure("recommend_p99_ms", rec_p99, "ms"),
        figure("recommend_query_p50_ms", recq_p50, "ms"),
        figure("recommend_query_p99_ms", recq_p99, "ms"),
        figure("echo_p50_ms", echo_p50, "ms"),
        figure("echo_p99_ms", echo_p99, "ms"),
        figure("recommend_p50_overhead_vs_echo_ms", rec_p50 - echo_p50, "ms", "echo_p50_ms", echo_p50),
        figure("recommend_query_p50_overhead_vs_echo_ms", recq_p50 - echo_p50, "ms", "echo_p50_ms", echo_p50),
        # Latency ratios: baseline/value, so > 1 would mean faster than the bare round trip.
        figure("recommend_p50_speedup_vs_echo", rec_p50, "ms", "echo_p50_ms", echo_p50, echo_p50 / rec_p50),
        figure("recommend_p99_speedup_vs_echo", rec_p99, "ms", "echo_p99_ms", echo_p99, echo_p99 / rec_p99),
        figure("recommend_query_p50_speedup_vs_echo", recq_p50, "ms", "echo_p50_ms", echo_p50, echo_p50 / recq_p50),
        # Throughput: value/baseline, > 1 better.
        figure("recommend_rps", rec_rps, "requests/s", "echo_rps", echo_rps, rec_rps / echo_rps),
        figure("recommend_query_rps", recq_rps, "requests/s", "echo_rps", echo_rps, recq_rps / echo_rps),
        figure("echo_rps", echo_rps, "requests/s"),
        # Latency under the concurrent load.
        figure("recommend_concurrent_p50_ms", conc("recommend", 50), "ms"),
        figure("recommend_concurrent_p99_ms", conc("recommend", 99), "ms"),
        figure("recommend_query_concurrent_p50_ms", conc("recommend_query", 50), "ms"),
        figure("recommend_query_concurrent_p99_ms", conc("recommend_query", 99), "ms"),
        figure("echo_concurrent_p50_ms", conc("echo", 50), "ms"),
        figure("echo_concurrent_p99_ms", conc("echo", 99), "ms"),
        figure("concurrent_errors", errors, "requests"),
    ]


def _print_table(report: dict) -> None:
    """The short human table on stdout."""
    f = {x["name"]: x for x in report["figures"]}
    p = report["params"]
    h = report["host"]

    def v(name: str) -> str:
        return f"{f[name]['value']:.2f}"

    print(
        f"e2e: {p['loaded_items']} items, {p['loaded_events']} ratings, {p['runs']} runs (medians), "
        f"{p['concurrency']} threads x {p['duration_s']:g} s; {h['cpus']} CPUs, gpu {h['gpu']}"
    )
    rows = [
        ("", "seq p50 ms", "seq p99 ms", "req/s", "conc p50 ms", "conc p99 ms"),
        ("echo (bare Serve gRPC)", v("echo_p50_ms"), v("echo_p99_ms"), v("echo_rps"),
         v("echo_concurrent_p50_ms"), v("echo_concurrent_p99_ms")),
        ("Recommend", v("recommend_p50_ms"), v("recommend_p99_ms"), v("recommend_rps"),
         v("recommend_concurrent_p50_ms"), v("recommend_concurrent_p99_ms")),
        ("Recommend + query", v("recommend_query_p50_ms"), v("recommend_query_p99_ms"), v("recommend_query_rps"),
         v("recommend_query_concurrent_p50_ms"), v("recommend_query_concurrent_p99_ms")),
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(c.ljust(widths[0]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(row)))
    print(
        f"Recommend p50 overhead vs echo: {v('recommend_p50_overhead_vs_echo_ms')} ms; "
        f"throughput ratio vs echo: {f['recommend_rps']['ratio']:.3f}; "
        f"errors under load: {int(f['concurrent_errors']['value'])}"
    )


if __name__ == "__main__":
    sys.exit(main())

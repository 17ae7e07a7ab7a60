"""`tastemaker bench overload`: past capacity, does the service refuse fast and keep the latency of
the requests it admits?

Self-contained like `bench e2e`: it starts its own service in-process (temporary data directory,
free ports, local Ray with all of the machine's CPUs), loads a MovieLens subsample through the
public API, then

1. **unloaded**: `--requests` sequential `Recommend` calls (random loaded user, page_size 10):
   p50/p99, the baseline of every latency figure;
2. **capacity**: `--capacity-clients` closed-loop clients for `--duration` s; capacity = completed
   calls per second (refused calls do not count);
3. **overload at 2× and 4× capacity**: open-loop arrivals (a request every 1/rate s, whether or not
   earlier ones have answered, as independent callers do) spread over `--channels` gRPC channels for
   `--duration` s: the share refused (RESOURCE_EXHAUSTED), how fast a refusal comes back, the p99 of
   the admitted requests against the unloaded p99 (goal ≤ 3×), any other status (goal: none), and
   the **recovery time**: from the moment the load stops until `--recovery-probes` consecutive
   sequential calls succeed within 3× the unloaded p99;
4. with `--limits 2,8`: the same offered load at the highest multiple again with other admission
   bounds (`gateway.max_in_flight_per_rpc`), to size the default;
5. unless `--no-unbounded`: the same offered 4× load (4× the capacity of step 2) against the same
   service redeployed with the old
   unbounded limits (admission off, 256 ongoing requests and Serve queues of 2,000), the same-run
   baseline of what shedding changes.

Medians over `--runs`. JSON as in bench/README.md; a table on stdout; progress on stderr. The load
generator runs in this process on the same machine as the service, so at 4× it competes with the
service for CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

import numpy as np

from tastemaker_bench.e2e import PAGE_SIZE, free_port, host_block
from tastemaker_bench.figures import figure

DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "overload.json"
#: Admitted requests may be this much slower than unloaded ones (the goal of issue 13).
P99_GOAL = 3.0
#: The limits of the service before load shedding: the same-run "unbounded" baseline.
UNBOUNDED = {
    "max_in_flight_per_rpc": 100_000,
    "max_ongoing_requests": 256,
    "max_queued_requests": 2_000,
    "internal_max_queued_requests": 2_000,
}

_T0 = time.monotonic()


def progress(message: str) -> None:
    """One progress line on stderr, with the seconds since the benchmark started."""
    print(f"[overload {time.monotonic() - _T0:7.1f}s] {message}", file=sys.stderr, flush=True)


@dataclass
class LoadResult:
    """One open-loop load: every call's status and latency."""

    offered_rps: float
    duration_s: float
    ok_s: list[float] = field(default_factory=list)
    refused_s: list[float] = field(default_factory=list)
    other: dict[str, int] = field(default_factory=dict)
    recovery_s: float = float("nan")

    @property
    def total(self) -> int:
        return len(self.ok_s) + len(self.refused_s) + sum(self.other.values())

    @property
    def refused_share(self) -> float:
        return len(self.refused_s) / self.total if self.total else float("nan")

    def p(self, latencies: list[float], q: float) -> float:
        return float(np.percentile(latencies, q)) * 1000.0 if latencies else float("nan")


class Caller:
    """Async Recommend calls over a few channels, round robin (like independent callers)."""

    def __init__(self, target: str, metadata: tuple, channels: int, users: list[str], seed: int):
        import grpc

        from tastemaker.v1 import recommender_service_pb2_grpc as pb_grpc

        self.channels = [grpc.aio.insecure_channel(target) for _ in range(channels)]
        self.stubs = [pb_grpc.RecommenderServiceStub(c) for c in self.channels]
        self.metadata = metadata
        self.users = users
        self.rng = np.random.default_rng(seed)
        self.next = 0

    async def call(self, timeout_s: float = 30.0) -> tuple[str, float]:
        """One Recommend; (status name, seconds)."""
        import grpc

        from tastemaker.v1 import recommender_service_pb2 as pb

        stub = self.stubs[self.next % len(self.stubs)]
        self.next += 1
        request = pb.RecommendRequest(user_id=self.users[int(self.rng.integers(len(self.users)))], page_size=PAGE_SIZE)
        started = time.perf_counter()
        try:
            await stub.Recommend(request, timeout=timeout_s, metadata=self.metadata)
            code = "OK"
        except grpc.aio.AioRpcError as exc:
            code = exc.code().name
        return code, time.perf_counter() - started

    async def close(self) -> None:
        for channel in self.channels:
            await channel.close()


async def sequential(caller: Caller, requests: int, warmup: int) -> list[float]:
    """Latencies of calls made one at a time; any error aborts (the service must answer unloaded)."""
    out = []
    for n in range(warmup + requests):
        code, seconds = await caller.call()
        if code != "OK":
            raise RuntimeError(f"unloaded Recommend failed with {code}; nothing meaningful to measure")
        if n >= warmup:
            out.append(seconds)
    return out


async def closed_loop(caller: Caller, clients: int, duration_s: float) -> float:
    """Completed calls per second of `clients` callers that each wait for their answer."""
    deadline = time.perf_counter() + duration_s
    done = [0]

    async def client() -> None:
        while time.perf_counter() < deadline:
            code, _ = await caller.call()
            if code == "OK":
                done[0] += 1

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return done[0] / (time.perf_counter() - started)


async def open_loop(caller: Caller, rate: float, duration_s: float, probes: int, probe_limit_s: float) -> LoadResult:
    """Requests at `rate`/s for `duration_s` whatever the answers, then the recovery probes."""
    result = LoadResult(offered_rps=rate, duration_s=duration_s)

    async def one() -> None:
        code, seconds = await caller.call()
        if code == "OK":
            result.ok_s.append(seconds)
        elif code == "RESOURCE_EXHAUSTED":
            result.refused_s.append(seconds)
        else:
            result.other[code] = result.other.get(code, 0) + 1

    tasks = []
    started = time.perf_counter()
    n = 0
    while True:
        due = started + n / rate
        now = time.perf_counter()
        if due - started >= duration_s:
            break
        if due > now:
            await asyncio.sleep(due - now)
        tasks.append(asyncio.ensure_future(one()))
        n += 1
    stopped = time.perf_counter()
    # Recovery: sequential probes until `probes` in a row succeed within the limit.
    in_a_row = 0
    recovered_at = None
    while time.perf_counter() - stopped < 120:
        code, seconds = await caller.call()
        if code == "OK" and seconds <= probe_limit_s:
            in_a_row += 1
            if in_a_row == 1:
                recovered_at = time.perf_counter() - seconds
            if in_a_row >= probes:
                break
        else:
            in_a_row = 0
            recovered_at = None
    result.recovery_s = max(0.0, recovered_at - stopped) if recovered_at is not None and in_a_row >= probes else float("nan")
    await asyncio.gather(*tasks)
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tastemaker bench overload",
        description="Recommend past capacity: share refused, p99 of admitted requests vs unloaded, recovery time. "
        "Starts and stops its own service; writes JSON (bench/README.md); progress on stderr.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--items", type=int, default=1000, help="catalog size (most-rated MovieLens items)")
    parser.add_argument("--users", type=int, default=150, help="users kept, with their ratings")
    parser.add_argument("--requests", type=int, default=200, help="sequential calls of the unloaded measurement")
    parser.add_argument("--warmup", type=int, default=20, help="untimed calls before it")
    parser.add_argument("--capacity-clients", type=int, default=None, help="closed-loop clients of the capacity measurement; None = the gateway's admission bound")
    parser.add_argument("--multiples", default="2,4", help="offered load as multiples of the measured capacity")
    parser.add_argument("--duration", type=float, default=15.0, help="seconds of each load")
    parser.add_argument("--channels", type=int, default=16, help="gRPC channels of the open-loop load")
    parser.add_argument("--recovery-probes", type=int, default=5, help="consecutive fast answers that count as recovered")
    parser.add_argument("--runs", type=int, default=1, help="repetitions; medians are reported")
    parser.add_argument(
        "--limits",
        default="",
        help="other gateway.max_in_flight_per_rpc values to measure at the highest multiple after the configured "
        "one, e.g. 2,8 (each redeploys the gateway; the capacity clients stay the same)",
    )
    parser.add_argument("--no-unbounded", action="store_true", help="skip the same-run baseline with the old unbounded limits")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--config", help="service YAML config (data dir, ports, Ray address are set by the benchmark)")
    parser.add_argument("--json", default=None, help="where to write the JSON; None = bench/results/overload.json")
    return parser


def _api_key(config) -> Optional[str]:
    """An admin key for the benchmark's own service when auth is on (as `tastemaker keys create`)."""
    auth = getattr(config, "auth", None)
    if auth is None or not getattr(auth, "enabled", False):
        return None
    from tastemaker.auth import new_key
    from tastemaker.store import open_store

    secret, record = new_key("admin", "bench overload")
    store = open_store(config.store_url())
    try:
        store.create_api_key(record)
    finally:
        store.close()
    return secret


async def _measure(args, target, metadata, users, clients, multiples, label, rate_base: Optional[float] = None) -> dict:
    """Unloaded latency, capacity, then the loads at `multiples` of `rate_base` (None = of the
    capacity just measured; the comparison phases pass the first phase's, so that every phase
    gets the same offered load)."""
    caller = Caller(target, metadata, args.channels, users, args.seed)
    try:
        unloaded = await sequential(caller, args.requests, args.warmup)
        unloaded_p99 = float(np.percentile(unloaded, 99))
        capacity = await closed_loop(caller, clients, args.duration)
        progress(f"{label}: unloaded p50 {np.percentile(unloaded, 50) * 1000:.1f} ms, p99 {unloaded_p99 * 1000:.1f} ms; "
                 f"capacity {capacity:.1f}/s with {clients} closed-loop clients")
        if rate_base is None:
            rate_base = capacity
        loads = {}
        for k in multiples:
            load = await open_loop(caller, k * rate_base, args.duration, args.recovery_probes, P99_GOAL * unloaded_p99)
            loads[k] = load
            progress(
                f"{label}: {k:g}x ({k * rate_base:.1f}/s offered): {len(load.ok_s)} OK, {len(load.refused_s)} refused "
                f"({load.refused_share:.0%}), other {load.other}; admitted p99 {load.p(load.ok_s, 99):.1f} ms, refused p50 "
                f"{load.p(load.refused_s, 50):.1f} ms; recovered in {load.recovery_s:.2f} s"
            )
        return {"unloaded": unloaded, "capacity": capacity, "clients": clients, "loads": loads}
    finally:
        await caller.close()


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    multiples = [float(x) for x in args.multiples.split(",") if x.strip()]
    if not multiples or min(multiples) <= 0 or args.duration <= 0 or args.requests < 1 or args.runs < 1:
        parser.error("--multiples must be positive numbers; --duration, --requests and --runs positive")

    from tastemaker.app import deploy, start_service, stop_service
    from tastemaker.client import TastemakerClient
    from tastemaker.config import load_config
    from tastemaker.datasets.movielens import load_movielens, subsample
    from tastemaker.demo import load_dataset

    started = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    load_before = round(os.getloadavg()[0], 2)
    json_path = Path(args.json) if args.json else DEFAULT_JSON
    tmp = tempfile.TemporaryDirectory(prefix="tastemaker-bench-overload-")
    grpc_port, http_port = free_port(), free_port()
    while http_port == grpc_port:
        http_port = free_port()
    config = load_config(
        args.config,
        overrides={("data_dir",): tmp.name, ("server", "grpc_port"): grpc_port, ("server", "http_port"): http_port},
        environ={},
    )
    config.server.ray_address = None
    config.server.ray_num_cpus = None
    target = f"{config.server.host}:{grpc_port}"
    bounded_limits = {name: getattr(config.gateway, name) for name in UNBOUNDED}
    alternatives = [int(x) for x in args.limits.split(",") if x.strip()] if args.limits else []
    sizing: dict[int, list[dict]] = {}
    runs: list[dict] = []
    baseline_runs: list[dict] = []
    try:
        progress(f"starting the service on {target}")
        start_service(config)
        key = _api_key(config)
        metadata = (("application", config.server.app_name),) + ((("authorization", f"Bearer {key}"),) if key else ())
        data = subsample(load_movielens(), max_items=args.items, max_users=args.users)
        users = sorted({r.user_id for r in data.ratings})
        progress(f"loading {len(data.items)} items and {len(data.ratings)} ratings")
        with TastemakerClient(target, timeout_s=600, application=config.server.app_name, api_key=key) as client:
            load_dataset(client, data, show_progress=False)
        # Closed-loop clients of the capacity measurement: as many as the gateway admits at once
        # (more would only queue or be refused). The unbounded baseline uses the same number.
        clients = args.capacity_clients or config.gateway.max_in_flight_per_rpc
        for run in range(args.runs):
            runs.append(asyncio.run(_measure(args, target, metadata, users, clients, multiples, f"run {run + 1} bounded")))
        from tastemaker.app import wait_serving

        for limit in alternatives:
            progress(f"redeploying with gateway.max_in_flight_per_rpc = {limit} (sizing the default)")
            config.gateway.max_in_flight_per_rpc = limit
            deploy(config)
            wait_serving(target)
            sizing[limit] = [
                asyncio.run(
                    _measure(args, target, metadata, users, clients, [max(multiples)], f"run {run + 1} limit {limit}",
                             rate_base=runs[run]["capacity"])
                )
                for run in range(args.runs)
            ]
        if not args.no_unbounded:
            progress("redeploying with the old unbounded limits (the same-run baseline)")
            for name, value in UNBOUNDED.items():
                setattr(config.gateway, name, value)
            deploy(config)
            wait_serving(target)
            top = [max(multiples)]
            for run in range(args.runs):
                baseline_runs.append(
                    asyncio.run(
                        _measure(args, target, metadata, users, clients, top, f"run {run + 1} unbounded",
                                 rate_base=runs[run]["capacity"])
                    )
                )
    finally:
        load_after = round(os.getloadavg()[0], 2)
        progress("stopping the service")
        try:
            stop_service(config)
        finally:
            tmp.cleanup()

    figures = _figures(runs, baseline_runs, multiples)
    top = max(multiples)
    for limit, limit_runs in sizing.items():
        loads = [r["loads"][top] for r in limit_runs]
        tag = f"{top:g}x_limit_{limit}"
        figures += [
            figure(f"admitted_rps_at_{tag}", _median(len(load.ok_s) / load.duration_s for load in loads), "requests/s"),
            figure(f"admitted_p50_ms_at_{tag}", _median(load.p(load.ok_s, 50) for load in loads), "ms"),
            figure(f"admitted_p99_ms_at_{tag}", _median(load.p(load.ok_s, 99) for load in loads), "ms"),
            figure(f"refused_share_at_{tag}", _median(load.refused_share for load in loads), "fraction"),
        ]
    params = {
        "items": args.items,
        "users": args.users,
        "page_size": PAGE_SIZE,
        "requests": args.requests,
        "warmup": args.warmup,
        "capacity_clients": runs[0]["clients"],
        "multiples": multiples,
        "duration_s": args.duration,
        "channels": args.channels,
        "recovery_probes": args.recovery_probes,
        "recovery_limit": f"{P99_GOAL:g}x unloaded p99",
        "runs": args.runs,
        "aggregate": "median of runs",
        "limits": bounded_limits,
        "unbounded_limits": None if args.no_unbounded else UNBOUNDED,
        "other_in_flight_limits": alternatives,
        "client": "in-process grpc.aio, open loop over several channels",
        "load_avg_1m_before": load_before,
        "load_avg_1m_after": load_after,
    }
    report = {"benchmark": "overload", "started": started, "host": host_block(), "params": params, "figures": figures}
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    progress(f"wrote {json_path}")
    for f in figures:
        extra = f"  (baseline {f['baseline']} = {f['baseline_value']}, ratio {f['ratio']})" if "baseline" in f else ""
        print(f"{f['name']:<44} {f['value']:>10} {f['unit']}{extra}")
    return 0


def _median(values) -> float:
    values = [v for v in values if v == v]  # drop NaN
    return float(statistics.median(values)) if values else float("nan")


def _figures(runs: list[dict], baseline_runs: list[dict], multiples: list[float]) -> list[dict]:
    unloaded_p50 = _median(np.percentile(r["unloaded"], 50) * 1000 for r in runs)
    unloaded_p99 = _median(np.percentile(r["unloaded"], 99) * 1000 for r in runs)
    out = [
        figure("unloaded_p50_ms", unloaded_p50, "ms"),
        figure("unloaded_p99_ms", unloaded_p99, "ms"),
        figure("capacity_rps", _median(r["capacity"] for r in runs), "requests/s"),
    ]
    for k in multiples:
        tag = f"{k:g}x"
        loads = [r["loads"][k] for r in runs]
        admitted_p99 = _median(load.p(load.ok_s, 99) for load in loads)
        out += [
            figure(f"offered_rps_at_{tag}", _median(load.offered_rps for load in loads), "requests/s"),
            figure(f"admitted_rps_at_{tag}", _median(len(load.ok_s) / load.duration_s for load in loads), "requests/s"),
            figure(f"refused_share_at_{tag}", _median(load.refused_share for load in loads), "fraction"),
            figure(f"refused_p50_ms_at_{tag}", _median(load.p(load.refused_s, 50) for load in loads), "ms"),
            figure(f"other_errors_at_{tag}", _median(sum(load.other.values()) for load in loads), "calls"),
            figure(f"admitted_p50_ms_at_{tag}", _median(load.p(load.ok_s, 50) for load in loads), "ms"),
            # ratio = unloaded / admitted p99: ≥ 1/3 meets the goal (admitted p99 ≤ 3x unloaded).
            figure(
                f"admitted_p99_ms_at_{tag}", admitted_p99, "ms", baseline="unloaded_p99_ms",
                baseline_value=unloaded_p99, ratio=unloaded_p99 / admitted_p99,
            ),
            figure(f"recovery_s_after_{tag}", _median(load.recovery_s for load in loads), "s"),
        ]
    if baseline_runs:
        k = max(multiples)
        tag = f"{k:g}x"
        loads = [r["loads"][k] for r in baseline_runs]
        unbounded_p99 = _median(load.p(load.ok_s, 99) for load in loads)
        bounded_p99 = _median(r["loads"][k].p(r["loads"][k].ok_s, 99) for r in runs)
        out += [
            figure(f"unbounded_capacity_rps", _median(r["capacity"] for r in baseline_runs), "requests/s"),
            figure(f"unbounded_refused_share_at_{tag}", _median(load.refused_share for load in loads), "fraction"),
            figure(f"unbounded_other_errors_at_{tag}", _median(sum(load.other.values()) for load in loads), "calls"),
            figure(f"unbounded_admitted_p50_ms_at_{tag}", _median(load.p(load.ok_s, 50) for load in loads), "ms"),
            # ratio = unbounded / bounded p99 of the admitted requests: how much shedding buys.
            figure(
                f"admitted_p99_speedup_vs_unbounded_at_{tag}", bounded_p99, "ms", baseline=f"unbounded_admitted_p99_ms_at_{tag}",
                baseline_value=unbounded_p99, ratio=unbounded_p99 / bounded_p99,
            ),
            figure(f"unbounded_recovery_s_after_{tag}", _median(load.recovery_s for load in loads), "s"),
        ]
    return out

"""`tastemaker bench auth`: what the gateway's admission step (API key, role, rate limit, optional
user-id pseudonym; `tastemaker.gateway.guard`) costs per call, next to the same call with auth
disabled, in one run, on a real SQLite store.

Cases, each timed over `--calls` calls of `EdgeGuard.admit` on a `RecommendRequest`:
* `auth_off` (the baseline): auth disabled, no pseudonyms — the step does nothing.
* `key_cached`: a valid read key whose lookup is cached (the steady state).
* `key_cached_pseudonym`: the same plus the HMAC-SHA256 pseudonym of the user id.
* `key_lookup`: the cache disabled (`auth.cache_ttl_s: 0`), so every call reads the store.

Prints JSON: per case p50/p99/mean in microseconds and the overhead over the baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional


class _Context:
    def __init__(self, metadata):
        self._metadata = metadata

    def invocation_metadata(self):
        return self._metadata


def _measure(guard, request_factory, context, calls: int, warmup: int) -> list[float]:
    async def run() -> list[float]:
        times = []
        for n in range(warmup + calls):
            request = request_factory(n)
            started = time.perf_counter()
            await guard.admit("Recommend", request, context)
            if n >= warmup:
                times.append((time.perf_counter() - started) * 1e6)
        return times

    return asyncio.run(run())


def _summary(times: list[float]) -> dict:
    ordered = sorted(times)
    return {
        "p50_us": round(ordered[len(ordered) // 2], 2),
        "p99_us": round(ordered[int(len(ordered) * 0.99) - 1], 2),
        "mean_us": round(statistics.fmean(ordered), 2),
        "calls": len(ordered),
    }


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="tastemaker bench auth", description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=20_000, help="timed calls per case")
    parser.add_argument("--warmup", type=int, default=500)
    parser.add_argument("--json", help="also write the result to this file")
    args = parser.parse_args(argv)

    from tastemaker.auth import new_key
    from tastemaker.config import AuthConfig, GatewayConfig, PrivacyConfig
    from tastemaker.gateway.guard import EdgeGuard
    from tastemaker.store.sqlite import SQLiteStore
    from tastemaker.v1 import recommender_service_pb2 as pb

    with tempfile.TemporaryDirectory(prefix="tastemaker-bench-auth-") as tmp:
        store = SQLiteStore(str(Path(tmp) / "keys.db"))
        secret, record = new_key("read", "bench")
        store.create_api_key(record)
        context = _Context([("authorization", f"Bearer {secret}")])
        unlimited = {"read_rate_per_s": 0.0}
        guards = {
            "auth_off": EdgeGuard(AuthConfig(enabled=False), PrivacyConfig(), store, GatewayConfig()),
            "key_cached": EdgeGuard(AuthConfig(**unlimited), PrivacyConfig(), store, GatewayConfig()),
            "key_cached_pseudonym": EdgeGuard(
                AuthConfig(**unlimited), PrivacyConfig(user_id_key="b" * 32), store, GatewayConfig()
            ),
            "key_lookup": EdgeGuard(AuthConfig(cache_ttl_s=0.0, **unlimited), PrivacyConfig(), store, GatewayConfig()),
        }

        def request(n: int):
            return pb.RecommendRequest(user_id=f"user-{n % 1000}", page_size=10)

        cases = {name: _summary(_measure(guard, request, context, args.calls, args.warmup)) for name, guard in guards.items()}
        store.close()
    base = cases["auth_off"]["p50_us"]
    for name, case in cases.items():
        case["p50_overhead_us"] = round(case["p50_us"] - base, 2)
    result = {
        "benchmark": "auth",
        "method": "EdgeGuard.admit on a RecommendRequest, sequential, one process; baseline auth_off in the same run",
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cases": cases,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

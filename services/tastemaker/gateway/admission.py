"""Admission control at the gateway: a bounded number of calls of each RPC doing work at once.

Past that bound a call is refused at once with RESOURCE_EXHAUSTED instead of joining a queue
whose wait would grow without limit (a closed loop of 64 clients otherwise drove Recommend to a
4 s median). The bound is per RPC, so a burst of one kind (a bulk UpsertItems load) cannot starve
another (Recommend), and per gateway replica. Streams are not counted here: each stream is bounded
by its own window (`gateway.stream_window`) and the shard mailboxes.
"""

from __future__ import annotations

from collections import defaultdict
from contextlib import contextmanager
from typing import Iterator, Mapping

from tastemaker.errors import ResourceExhausted


class Admission:
    """Counts the calls in flight per RPC name and refuses those over the limit.

    Single-threaded use (one asyncio loop per replica): `enter` checks and increments with no
    await in between, so it needs no lock."""

    def __init__(self, default_limit: int, limits: Mapping[str, int] | None = None):
        if default_limit < 1:
            raise ValueError("default_limit must be at least 1")
        self.default_limit = default_limit
        self.limits = dict(limits or {})
        self.in_flight: defaultdict[str, int] = defaultdict(int)
        self.refused: defaultdict[str, int] = defaultdict(int)

    def limit(self, rpc: str) -> int:
        """The bound for one RPC (its own entry, else the default)."""
        return self.limits.get(rpc, self.default_limit)

    @contextmanager
    def enter(self, rpc: str) -> Iterator[None]:
        """Hold one of `rpc`'s slots for the `with` block, or raise ResourceExhausted now."""
        limit = self.limit(rpc)
        if self.in_flight[rpc] >= limit:
            self.refused[rpc] += 1
            raise ResourceExhausted(
                f"the service is at capacity for {rpc} ({limit} calls in progress); "
                "retry with exponential backoff"
            )
        self.in_flight[rpc] += 1
        try:
            yield
        finally:
            self.in_flight[rpc] -= 1

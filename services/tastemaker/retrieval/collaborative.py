"""Collaborative and sequential signals learned from the event log. Plain Python, no Ray.

`InteractionGraph` keeps three aggregates, all updated incrementally one event at a time (so a
fresh fit over the log and an incremental follow of the same log give identical models):

- **transitions** `next_counts[i][j]`: how often item j was consumed within the next
  `sequential_window` items after item i in one user's time-ordered history, weighted
  `1 / distance`. Scored from the user's last few items: "what people consumed right after what
  you just consumed".
- **co-occurrence** `co_counts[i][j]` (symmetric): how often i and j were both liked within
  `cooccurrence_window` liked items of one user. Scored as cosine-normalised neighbours of the
  user's recent liked items.
- **trending**: per-item counts decayed with `trending_half_life_days`, relative to the newest
  event time seen (not the wall clock, so replays and old data behave the same).

A full fit (`fit`, `fit_graph`) also learns **matrix factors** (`factors.FactorModel`: implicit
ALS item factors; users are folded in per request). They are not updated incrementally: items
that arrive after the fit score 0 on that signal until the next `tastemaker fit`.

Serialised without pickle: arrays in an `.npz` plus JSON for ids and user tails.
"""

from __future__ import annotations

import heapq
import io
import json
import math
from collections import deque
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import numpy as np

from tastemaker.config import EventWeights
from tastemaker.domain import EventType, HistoryEntry, UserEvent
from tastemaker.profiles.state import event_weight
from tastemaker.retrieval.factors import FactorModel, FactorParams, PairCollector
from tastemaker.store.base import user_hash

#: Event types that mean "the user consumed the item" for transitions (skips/dislikes do not).
CONSUMED = frozenset(
    {EventType.VIEW, EventType.CLICK, EventType.ADD_TO_CART, EventType.PURCHASE, EventType.RATING, EventType.REVIEW}
)
#: Rescale trending counts before 2^x overflows (float64 holds up to 2^1023).
_TREND_RESCALE_HALF_LIVES = 400.0


@dataclass
class GraphParams:
    """Shapes of the aggregates; part of `RetrievalConfig`."""

    sequential_window: int = 3
    cooccurrence_window: int = 10
    trending_half_life_days: float = 7.0
    user_tail: int = 10
    #: Matrix factors learned by a full fit; None = none.
    factors: Optional[FactorParams] = None


class InteractionGraph:
    """Transitions, co-occurrence and trending, learned from events in log order."""

    def __init__(self, params: GraphParams, weights: EventWeights):
        self.params = params
        self.weights = weights
        self.next_counts: dict[str, dict[str, float]] = {}
        self.next_totals: dict[str, float] = {}
        self.co_counts: dict[str, dict[str, float]] = {}
        self.co_degree: dict[str, float] = {}
        self.trend: dict[str, float] = {}
        self.trend_origin: Optional[float] = None
        #: The largest value in `trend`, kept up to date (trend_score divides by it).
        self.trend_top = 0.0
        self.newest_time = 0.0
        self.consumed_tail: dict[str, deque] = {}
        self.liked_tail: dict[str, deque] = {}
        self.events_seen = 0
        #: Item factors from the last full fit (None before one, or when turned off).
        self.factors: Optional[FactorModel] = None

    # -- learning -------------------------------------------------------------------------
    def observe(self, event: UserEvent) -> None:
        """Fold one event (in log order) into every aggregate."""
        if not event.item_id or event.event_type not in CONSUMED:
            return
        self.events_seen += 1
        item, user = event.item_id, event.user_id
        tail = self.consumed_tail.setdefault(user, deque(maxlen=max(self.params.user_tail, self.params.sequential_window)))
        for distance, previous in enumerate(reversed(tail), start=1):
            if distance > self.params.sequential_window:
                break
            if previous != item:
                row = self.next_counts.setdefault(previous, {})
                row[item] = row.get(item, 0.0) + 1.0 / distance
                self.next_totals[previous] = self.next_totals.get(previous, 0.0) + 1.0 / distance
        tail.append(item)
        if event_weight(event, self.weights) > 0:
            liked = self.liked_tail.setdefault(user, deque(maxlen=self.params.cooccurrence_window))
            for other in liked:
                if other != item:
                    for a, b in ((other, item), (item, other)):
                        row = self.co_counts.setdefault(a, {})
                        row[b] = row.get(b, 0.0) + 1.0
                        self.co_degree[a] = self.co_degree.get(a, 0.0) + 1.0
            liked.append(item)
        self.count_trend(item, event.event_time)

    def count_trend(self, item: str, event_time: float) -> None:
        """Add one consumption of `item` at `event_time` to the decayed trending counts."""
        half_life = self.params.trending_half_life_days * 86_400.0
        if self.trend_origin is None:
            self.trend_origin = event_time
        exponent = (event_time - self.trend_origin) / half_life
        if exponent > _TREND_RESCALE_HALF_LIVES:
            factor = 2.0 ** (-exponent)
            self.trend = {k: v * factor for k, v in self.trend.items() if v * factor > 1e-12}
            self.trend_top = max(self.trend.values(), default=0.0)
            self.trend_origin, exponent = event_time, 0.0
        value = self.trend[item] = self.trend.get(item, 0.0) + 2.0 ** exponent
        if value > self.trend_top:
            self.trend_top = value
        self.newest_time = max(self.newest_time, event_time)

    def fit(self, events: Iterable[UserEvent]) -> "InteractionGraph":
        """Learn from a whole log in order (the offline job), matrix factors included; returns self."""
        pairs = PairCollector()
        for event in events:
            self.observe(event)
            self.collect(event, pairs)
        self.fit_factors(pairs)
        return self

    @staticmethod
    def collect(event: UserEvent, pairs: PairCollector) -> None:
        """Note a consumption for the matrix factors (same events as the transitions)."""
        if event.item_id and event.event_type in CONSUMED:
            pairs.add(event.user_id, event.item_id)

    def fit_factors(self, pairs: PairCollector) -> None:
        """Learn the item factors from the pairs of a full pass (when `params.factors` is set)."""
        if self.params.factors is not None and self.params.factors.factors > 0:
            self.factors = FactorModel.fit(pairs, self.params.factors)

    def factor_user(self, recent: Sequence[HistoryEntry]) -> Optional[np.ndarray]:
        """The user's factors folded in from their consumed history items (None without any)."""
        if self.factors is None:
            return None
        return self.factors.user_vector(h.item_id for h in recent if h.event_type in CONSUMED)

    def factor_anchors(self, item_ids: Sequence[str], recent: Sequence[HistoryEntry]) -> dict[str, str]:
        """Per item, the consumed history item whose factors agree with it most."""
        if self.factors is None:
            return {}
        return self.factors.anchors(item_ids, [h.item_id for h in recent if h.event_type in CONSUMED])

    def forget_users(self, user_hashes: Iterable[str]) -> int:
        """Drop the per-user tails of erased users (named by `store.user_hash`); the anonymous
        aggregate counts stay until the next fit. Returns how many users were dropped."""
        wanted = set(user_hashes)
        if not wanted:
            return 0
        doomed = [u for u in set(self.consumed_tail) | set(self.liked_tail) if user_hash(u) in wanted]
        for user in doomed:
            self.consumed_tail.pop(user, None)
            self.liked_tail.pop(user, None)
        return len(doomed)

    def forget_items(self, item_ids: Sequence[str]) -> None:
        """Deleted items stop being proposed (they stay in other rows' totals, which only
        scales scores and needs no rewrite)."""
        for item_id in item_ids:
            self.next_counts.pop(item_id, None)
            self.co_counts.pop(item_id, None)
            self.trend.pop(item_id, None)
        self.trend_top = max(self.trend.values(), default=0.0)
        if self.factors is not None:
            self.factors.forget_items(item_ids)

    # -- scoring --------------------------------------------------------------------------
    def sequential_scores(
        self, recent: Sequence[HistoryEntry], history: int, decay: float, normalise: bool = True
    ) -> dict[str, tuple[float, str]]:
        """item -> (score, the history item it follows best). Uses the last `history` consumed
        items, the most recent weighted 1, the one before `decay`, and so on. With `normalise`
        each anchor's counts are divided by its total (a transition probability); without, the
        raw distance-weighted counts are summed, so a popular follower of the last item outranks
        a rare one that always follows it."""
        consumed = [h.item_id for h in recent if h.event_type in CONSUMED][-history:]
        totals: dict[str, float] = {}
        best: dict[str, tuple[float, str]] = {}
        for age, anchor in enumerate(reversed(consumed)):
            row = self.next_counts.get(anchor)
            if not row:
                continue
            scale = decay**age / self.next_totals[anchor] if normalise else decay**age
            for item, count in row.items():
                part = scale * count
                totals[item] = totals.get(item, 0.0) + part
                if part > best.get(item, (0.0, ""))[0]:
                    best[item] = (part, anchor)
        return {item: (total, best[item][1]) for item, total in totals.items()}

    def cooccurrence_scores(self, recent: Sequence[HistoryEntry]) -> dict[str, tuple[float, str]]:
        """item -> (score, the liked history item it co-occurs with most), cosine-normalised."""
        totals: dict[str, float] = {}
        best: dict[str, tuple[float, str]] = {}
        for entry in recent:
            if entry.weight <= 0:
                continue
            row = self.co_counts.get(entry.item_id)
            if not row:
                continue
            anchor_degree = self.co_degree[entry.item_id]
            for item, count in row.items():
                part = entry.weight * count / math.sqrt(anchor_degree * self.co_degree[item])
                totals[item] = totals.get(item, 0.0) + part
                if part > best.get(item, (0.0, ""))[0]:
                    best[item] = (part, entry.item_id)
        return {item: (total, best[item][1]) for item, total in totals.items()}

    def trending(self, k: int, eligible=None) -> list[tuple[str, float]]:
        """Top-k items by decayed recent count, optionally restricted by a predicate."""
        items = self.trend.items() if eligible is None else ((i, v) for i, v in self.trend.items() if eligible(i))
        return heapq.nlargest(k, items, key=lambda kv: (kv[1], kv[0]))

    def trend_score(self, item_id: str) -> float:
        """Trending count of an item relative to the top item, in [0, 1]."""
        top = self.trend_top
        return self.trend.get(item_id, 0.0) / top if top > 0 else 0.0

    # -- serialisation --------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        """npz: item id table, COO arrays of both count matrices, trend vector; JSON tails."""
        ids: dict[str, int] = {}

        def idx(item: str) -> int:
            return ids.setdefault(item, len(ids))

        def coo(matrix: dict[str, dict[str, float]]):
            rows, cols, vals = [], [], []
            for a, row in matrix.items():
                ia = idx(a)
                for b, v in row.items():
                    rows.append(ia)
                    cols.append(idx(b))
                    vals.append(v)
            return np.asarray(rows, np.int64), np.asarray(cols, np.int64), np.asarray(vals, np.float64)

        next_r, next_c, next_v = coo(self.next_counts)
        co_r, co_c, co_v = coo(self.co_counts)
        trend_i = np.asarray([idx(i) for i in self.trend], np.int64)
        trend_v = np.asarray(list(self.trend.values()), np.float64)
        factor_arrays = self.factors.arrays(idx) if self.factors is not None else {}
        meta = {
            "ids": list(ids),
            "trend_origin": self.trend_origin,
            "newest_time": self.newest_time,
            "events_seen": self.events_seen,
            "consumed_tail": {u: list(t) for u, t in self.consumed_tail.items()},
            "liked_tail": {u: list(t) for u, t in self.liked_tail.items()},
        }
        buffer = io.BytesIO()
        np.savez_compressed(
            buffer,
            meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8),
            next_r=next_r, next_c=next_c, next_v=next_v,
            co_r=co_r, co_c=co_c, co_v=co_v,
            trend_i=trend_i, trend_v=trend_v,
            **factor_arrays,
        )
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, blob: bytes, params: GraphParams, weights: EventWeights) -> "InteractionGraph":
        """Inverse of `to_bytes` (allow_pickle stays off)."""
        data = np.load(io.BytesIO(blob), allow_pickle=False)
        meta = json.loads(data["meta"].tobytes().decode())
        ids = meta["ids"]
        graph = cls(params, weights)
        for r, c, v in zip(data["next_r"], data["next_c"], data["next_v"]):
            graph.next_counts.setdefault(ids[r], {})[ids[c]] = float(v)
            graph.next_totals[ids[r]] = graph.next_totals.get(ids[r], 0.0) + float(v)
        for r, c, v in zip(data["co_r"], data["co_c"], data["co_v"]):
            graph.co_counts.setdefault(ids[r], {})[ids[c]] = float(v)
            graph.co_degree[ids[r]] = graph.co_degree.get(ids[r], 0.0) + float(v)
        graph.trend = {ids[i]: float(v) for i, v in zip(data["trend_i"], data["trend_v"])}
        graph.trend_top = max(graph.trend.values(), default=0.0)
        graph.trend_origin = meta["trend_origin"]
        graph.newest_time = meta["newest_time"]
        graph.events_seen = meta["events_seen"]
        if params.factors is not None and params.factors.factors > 0:
            graph.factors = FactorModel.from_arrays(data, ids, params.factors)
        tail_len = max(params.user_tail, params.sequential_window)
        graph.consumed_tail = {u: deque(t, maxlen=tail_len) for u, t in meta["consumed_tail"].items()}
        graph.liked_tail = {u: deque(t, maxlen=params.cooccurrence_window) for u, t in meta["liked_tail"].items()}
        return graph


#: Name of the fitted-graph artefact in the store.
GRAPH_ARTIFACT = "interaction_graph"


def graph_params(config) -> GraphParams:
    """The graph's slice of a `RetrievalConfig`."""
    return GraphParams(
        sequential_window=config.sequential_window,
        cooccurrence_window=config.cooccurrence_window,
        trending_half_life_days=config.trending_half_life_days,
        factors=FactorParams(
            factors=config.factors,
            regularization=config.factor_regularization,
            alpha=config.factor_alpha,
            iterations=config.factor_iterations,
        )
        if config.factors > 0
        else None,
    )


class GraphFollower:
    """Keeps an `InteractionGraph` in step with a store: start from the newest fitted artefact,
    replay the events after it, then follow the event feed incrementally; swap in a newer
    artefact (from `tastemaker fit`) when one appears, without a restart."""

    def __init__(self, store, params: GraphParams, weights: EventWeights, page: int = 20_000):
        self.store = store
        self.params = params
        self.weights = weights
        self.page = page
        self.graph = InteractionGraph(params, weights)
        self.seq = 0
        self.erasure_seq = 0
        self.artifact_version: Optional[int] = None

    def start(self) -> InteractionGraph:
        """Load the artefact if there is one, then catch up with the log."""
        loaded = self.store.load_artifact(GRAPH_ARTIFACT)
        if loaded is not None:
            version, blob = loaded
            self.graph = InteractionGraph.from_bytes(blob, self.params, self.weights)
            self.seq = self.artifact_version = version
            self._apply_erasures(self.graph, since=0)  # the artefact may predate erasures
        self.catch_up()
        return self.graph

    def _apply_erasures(self, graph: InteractionGraph, since: int) -> None:
        erasures = self.store.erasures_after(since)
        if erasures:
            graph.forget_users(h for _, h in erasures)
            self.erasure_seq = max(self.erasure_seq, erasures[-1][0])

    def catch_up(self, graph: Optional[InteractionGraph] = None, max_events: Optional[int] = None) -> int:
        """Observe the events after the last one seen (at most about `max_events`, so a
        serving replica never stalls for long on a backlog); returns how many."""
        graph = graph or self.graph
        self._apply_erasures(graph, since=self.erasure_seq)
        applied = 0
        while max_events is None or applied < max_events:
            batch = self.store.events_after(self.seq, limit=self.page if max_events is None else min(self.page, max_events))
            if not batch:
                return applied
            for stored in batch:
                graph.observe(stored.event)
            self.seq = batch[-1].seq
            applied += len(batch)
        return applied

    def maybe_reload(self) -> bool:
        """Swap in a newer artefact, caught up to the log; True when swapped."""
        version = self.store.artifact_version(GRAPH_ARTIFACT)
        if version is None or version == self.artifact_version:
            return False
        loaded = self.store.load_artifact(GRAPH_ARTIFACT)
        if loaded is None:
            return False
        version, blob = loaded
        fresh = InteractionGraph.from_bytes(blob, self.params, self.weights)
        self._apply_erasures(fresh, since=0)
        follower_seq, self.seq = self.seq, version
        self.catch_up(fresh)
        # Events of erased users vanish from the log; never step back behind what was seen.
        self.seq = max(self.seq, follower_seq)
        self.graph, self.artifact_version = fresh, version
        return True


def fit_graph(store, params: GraphParams, weights: EventWeights, progress=None) -> tuple[InteractionGraph, int]:
    """The offline job: learn the graph from the whole event log; returns (graph, last seq)."""
    graph = InteractionGraph(params, weights)
    pairs = PairCollector()
    seq = 0
    while True:
        batch = store.events_after(seq, limit=20_000)
        if not batch:
            graph.fit_factors(pairs)
            return graph, seq
        for stored in batch:
            graph.observe(stored.event)
            graph.collect(stored.event, pairs)
        seq = batch[-1].seq
        if progress is not None:
            progress.update(len(batch))

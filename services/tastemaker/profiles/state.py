"""Profile math: time-decayed weighted means of item and text vectors. Plain Python + numpy.

A profile keeps two decayed sums, positive and negative. Each event adds `weight * vector` where
the weight comes from the event table (`event_weight`), decayed by the time between the event
and the sum's reference time with half-life `half_life_days`. Because every term decays at the
same rate, the sum can be rescaled lazily: moving the reference time forward by dt multiplies the
whole sum by 2^(-dt / half_life).
"""

from __future__ import annotations

import json
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from tastemaker.config import EventWeights, ProfileConfig
from tastemaker.domain import EventType, HistoryEntry, ProfileView, UserEvent


def event_weight(event: UserEvent, weights: EventWeights) -> float:
    """Signed weight of one event: > 0 pulls the profile towards the vector, < 0 pushes away."""
    t = event.event_type
    if t == EventType.VIEW:
        return weights.view
    if t == EventType.CLICK:
        return weights.click
    if t == EventType.ADD_TO_CART:
        return weights.add_to_cart
    if t == EventType.PURCHASE:
        return weights.purchase
    if t == EventType.RATING:
        return (event.value - weights.rating_centre) * weights.rating_scale
    if t == EventType.REVIEW:
        # With a rating, the review leans the way the rating does; without one, the way its text
        # does (sentiment from the encoder, see `review_sentiment`).
        if event.value > 0:
            sign = 1.0 if event.value >= weights.rating_centre else -1.0
        else:
            sign = -1.0 if event.sentiment < 0 else 1.0
        return sign * weights.review
    if t == EventType.SEARCH:
        return weights.search
    if t == EventType.SKIP:
        return weights.skip
    if t == EventType.DISLIKE:
        return weights.dislike
    raise ValueError(f"unknown event type {t!r}")


@dataclass
class _DecayedSum:
    """sum_i w_i * 2^(-(ref_time - t_i)/half_life) * v_i, kept at reference time `ref_time`."""

    vector: Optional[np.ndarray] = None
    ref_time: float = 0.0
    total_weight: float = 0.0

    def add(self, vector: np.ndarray, weight: float, event_time: float, half_life_s: float) -> None:
        if self.vector is None:
            self.vector = np.zeros_like(vector, dtype=np.float64)
            self.ref_time = event_time
        if event_time >= self.ref_time:
            factor = 2.0 ** (-(event_time - self.ref_time) / half_life_s)
            self.vector *= factor
            self.total_weight *= factor
            self.ref_time = event_time
            decayed = weight
        else:  # a late event counts with the decay it would have had by now
            decayed = weight * 2.0 ** (-(self.ref_time - event_time) / half_life_s)
        self.vector += decayed * vector
        self.total_weight += decayed

    def direction(self) -> Optional[np.ndarray]:
        if self.vector is None:
            return None
        norm = float(np.linalg.norm(self.vector))
        if norm < 1e-12:
            return None
        return (self.vector / norm).astype(np.float32)


@dataclass
class ProfileState:
    """Everything the service knows about one user; owned by exactly one shard."""

    user_id: str
    version: int = 0
    last_event_seq: int = 0
    last_event_time: float = 0.0
    positive: _DecayedSum = field(default_factory=_DecayedSum)
    negative: _DecayedSum = field(default_factory=_DecayedSum)
    counts: dict[int, int] = field(default_factory=dict)
    recent: deque = field(default_factory=deque)
    seen: dict[str, None] = field(default_factory=dict)  # insertion-ordered set

    def apply(
        self,
        event: UserEvent,
        item_vector: Optional[np.ndarray],
        seq: int,
        config: ProfileConfig,
    ) -> None:
        """Fold one event into the profile and bump the version."""
        weight = event_weight(event, config.weights)
        half_life_s = config.half_life_days * 86_400.0
        vectors = [v for v in (item_vector, event.text_vector) if v is not None]
        for vector in vectors:
            target = self.positive if weight > 0 else self.negative
            if weight != 0:
                target.add(np.asarray(vector, dtype=np.float64), abs(weight), event.event_time, half_life_s)
        self.version += 1
        self.last_event_seq = max(self.last_event_seq, seq)
        self.last_event_time = max(self.last_event_time, event.event_time)
        self.counts[int(event.event_type)] = self.counts.get(int(event.event_type), 0) + 1
        if event.item_id:
            self.recent.append(
                HistoryEntry(event.item_id, event.event_type, event.value, weight, event.event_time)
            )
            while len(self.recent) > config.recent_items:
                self.recent.popleft()
            self.seen.pop(event.item_id, None)
            self.seen[event.item_id] = None
            while len(self.seen) > config.max_seen_items:
                self.seen.pop(next(iter(self.seen)))

    def view(self) -> ProfileView:
        """A copy of what retrieval needs."""
        return ProfileView(
            user_id=self.user_id,
            profile_version=self.version,
            vector=self.positive.direction(),
            negative_vector=self.negative.direction(),
            seen_item_ids=list(self.seen),
            recent=list(self.recent),
        )

    # -- serialisation without pickle -----------------------------------------------------
    def to_snapshot(self) -> tuple[str, bytes]:
        """JSON state plus the two sum vectors as float64 bytes."""
        dim = 0
        for s in (self.positive, self.negative):
            if s.vector is not None:
                dim = s.vector.shape[0]
        state = {
            "version": self.version,
            "last_event_seq": self.last_event_seq,
            "last_event_time": self.last_event_time,
            "dim": dim,
            "positive": [self.positive.vector is not None, self.positive.ref_time, self.positive.total_weight],
            "negative": [self.negative.vector is not None, self.negative.ref_time, self.negative.total_weight],
            "counts": self.counts,
            "recent": [[h.item_id, int(h.event_type), h.value, h.weight, h.event_time] for h in self.recent],
            "seen": list(self.seen),
        }
        blobs = b"".join(
            s.vector.astype(np.float64).tobytes() for s in (self.positive, self.negative) if s.vector is not None
        )
        return json.dumps(state), blobs

    @classmethod
    def from_snapshot(cls, user_id: str, state_json: str, blobs: bytes) -> "ProfileState":
        """Inverse of `to_snapshot`."""
        state = json.loads(state_json)
        dim = state["dim"]
        arrays = np.frombuffer(blobs, dtype=np.float64) if blobs else np.zeros(0)
        offset = 0
        sums = []
        for present, ref_time, total in (state["positive"], state["negative"]):
            vector = None
            if present:
                vector = arrays[offset : offset + dim].copy()
                offset += dim
            sums.append(_DecayedSum(vector, ref_time, total))
        profile = cls(
            user_id=user_id,
            version=state["version"],
            last_event_seq=state["last_event_seq"],
            last_event_time=state["last_event_time"],
            positive=sums[0],
            negative=sums[1],
            counts={int(k): v for k, v in state["counts"].items()},
            recent=deque(HistoryEntry(i, EventType(t), v, w, tm) for i, t, v, w, tm in state["recent"]),
            seen=dict.fromkeys(state["seen"]),
        )
        return profile


#: Texts whose encodings anchor review sentiment: praise and complaint.
SENTIMENT_ANCHORS = (
    "I loved it. Wonderful, brilliant, great fun, highly recommended.",
    "I hated it. Terrible, boring, awful, a complete waste of time.",
)


def review_sentiment(text_vector: np.ndarray, praise: np.ndarray, complaint: np.ndarray) -> float:
    """Zero-shot review sentiment in [-1, 1]: cosine to praise minus cosine to complaint.

    All vectors are unit norm (the encoder's contract), so the difference of two cosines is
    already bounded by [-2, 2]; halving it keeps the result in [-1, 1].
    """
    return float(np.clip((text_vector @ praise - text_vector @ complaint) / 2.0, -1.0, 1.0))


def shard_of(user_id: str, num_shards: int) -> int:
    """Stable user → shard assignment (FNV-1a, not Python's salted hash)."""
    h = 0xCBF29CE484222325
    for byte in user_id.encode("utf-8"):
        h = ((h ^ byte) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h % num_shards


def half_life_factor(dt_seconds: float, half_life_days: float) -> float:
    """2^(-dt / half_life): exposed for tests and documentation."""
    return math.pow(2.0, -dt_seconds / (half_life_days * 86_400.0))

"""One profile shard: the users with `shard_of(user_id) == shard_id`, their durable event log and
their in-memory profiles. Pure Python over a `Store`; the Ray actor is a thin shell around it."""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Optional, Sequence

import numpy as np

from tastemaker.config import ProfileConfig
from tastemaker.domain import (
    ITEM_EVENT_TYPES,
    EventAck,
    EventStatus,
    ProfileView,
    UserEvent,
)
from tastemaker.profiles.state import ProfileState
from tastemaker.store import SnapshotRow, Store

logger = logging.getLogger(__name__)


class ProfileShard:
    """Applies events in arrival order, durably before acknowledging, and serves profile views."""

    def __init__(self, shard_id: int, store: Store, config: ProfileConfig):
        self.shard_id = shard_id
        self.store = store
        self.config = config
        self.profiles: dict[str, ProfileState] = {}
        self._vector_cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._dirty: set[str] = set()
        self._applied_since_snapshot = 0

    # -- lifecycle ------------------------------------------------------------------------
    def recover(self) -> int:
        """Rebuild memory from snapshots plus replay of later events; returns events replayed."""
        self.profiles.clear()
        for row in self.store.load_snapshots(self.shard_id):
            self.profiles[row.user_id] = ProfileState.from_snapshot(row.user_id, row.state, row.vectors)
        replayed = 0
        batch: list = []
        for stored in self.store.events_for_replay(self.shard_id, self.config.num_shards):
            batch.append(stored)
            if len(batch) >= 2_000:
                replayed += self._replay(batch)
                batch = []
        replayed += self._replay(batch)
        return replayed

    def rebuild(self) -> int:
        """Rebuild every profile of the shard from the whole event log, ignoring snapshots (after
        the encoder changed and item and text vectors were re-encoded): drop the shard's
        snapshots and cached item vectors, replay, and snapshot the result. Returns events replayed."""
        self.store.delete_snapshots(self.shard_id)
        self._vector_cache.clear()
        self._dirty.clear()
        replayed = self.recover()
        self.snapshot()
        return replayed

    def _replay(self, batch: list) -> int:
        vectors = self._item_vectors([s.event.item_id for s in batch if s.event.item_id])
        for stored in batch:
            self._apply(stored.event, vectors.get(stored.event.item_id), stored.seq)
        return len(batch)

    def snapshot(self) -> int:
        """Write snapshots of profiles changed since the last one; returns how many."""
        if not self._dirty:
            return 0
        rows = []
        for user_id in self._dirty:
            profile = self.profiles.get(user_id)
            if profile is None:
                continue
            state, vectors = profile.to_snapshot()
            rows.append(SnapshotRow(user_id, self.shard_id, profile.last_event_seq, state, vectors))
        self.store.save_snapshots(rows)
        self._dirty.clear()
        self._applied_since_snapshot = 0
        return len(rows)

    # -- events ---------------------------------------------------------------------------
    def apply_events(self, events: Sequence[UserEvent]) -> list[EventAck]:
        """Validate item references, append durably, then apply; one ack per event, in order."""
        needed = [e.item_id for e in events if e.item_id]
        vectors = self._item_vectors(needed)
        acks: list[Optional[EventAck]] = [None] * len(events)
        to_write: list[tuple[int, UserEvent]] = []
        for i, event in enumerate(events):
            if event.event_type in ITEM_EVENT_TYPES and event.item_id not in vectors:
                acks[i] = EventAck(
                    event.event_id,
                    event.user_id,
                    EventStatus.REJECTED,
                    reason=f"item_id {event.item_id!r} is not in the catalog; upsert the item first",
                )
            elif event.item_id and event.item_id not in vectors:
                # Optional item reference (e.g. a review of an unknown item): keep the text only.
                to_write.append((i, event))
            else:
                to_write.append((i, event))
        seqs = self.store.append_events(self.shard_id, [e for _, e in to_write]) if to_write else []
        for (i, event), seq in zip(to_write, seqs):
            if seq is None:
                profile = self.profiles.get(event.user_id)
                acks[i] = EventAck(
                    event.event_id,
                    event.user_id,
                    EventStatus.DUPLICATE,
                    profile_version=profile.version if profile else 0,
                )
                continue
            profile = self._apply(event, vectors.get(event.item_id), seq)
            acks[i] = EventAck(event.event_id, event.user_id, EventStatus.ACCEPTED, profile.version)
        if self._applied_since_snapshot >= self.config.snapshot_every_events:
            self.snapshot()
        return [a for a in acks if a is not None]

    def _apply(self, event: UserEvent, item_vector: Optional[np.ndarray], seq: int) -> ProfileState:
        profile = self.profiles.get(event.user_id)
        if profile is None:
            profile = self.profiles[event.user_id] = ProfileState(event.user_id)
        profile.apply(event, item_vector, seq, self.config)
        self._dirty.add(event.user_id)
        self._applied_since_snapshot += 1
        return profile

    def _item_vectors(self, item_ids: Sequence[str]) -> dict[str, np.ndarray]:
        """Vectors of items, from an LRU cache backed by the store."""
        out: dict[str, np.ndarray] = {}
        missing = []
        for item_id in dict.fromkeys(item_ids):
            vector = self._vector_cache.get(item_id)
            if vector is None:
                missing.append(item_id)
            else:
                self._vector_cache.move_to_end(item_id)
                out[item_id] = vector
        if missing:
            fetched = self.store.get_item_vectors(missing)
            out.update(fetched)
            if self.config.item_vector_cache:
                self._vector_cache.update(fetched)
                while len(self._vector_cache) > self.config.item_vector_cache:
                    self._vector_cache.popitem(last=False)
        return out

    def forget_items(self, item_ids: Sequence[str]) -> None:
        """Drop cached vectors of deleted or re-encoded items."""
        for item_id in item_ids:
            self._vector_cache.pop(item_id, None)

    # -- reads ----------------------------------------------------------------------------
    def profile_view(self, user_id: str) -> ProfileView:
        """The user's profile; an empty one (version 0) for users never seen."""
        profile = self.profiles.get(user_id)
        return profile.view() if profile else ProfileView(user_id=user_id)

    def profile_state(self, user_id: str) -> Optional[ProfileState]:
        """The live state object (for summaries)."""
        return self.profiles.get(user_id)

    def delete_user(self, user_id: str) -> int:
        """Erase the user's events, snapshot and memory; returns events deleted from the store."""
        deleted = self.store.delete_user(user_id)
        self.profiles.pop(user_id, None)
        self._dirty.discard(user_id)
        return deleted

    def stats(self) -> dict[str, int]:
        """Counts for health and tests."""
        return {"users": len(self.profiles), "cached_vectors": len(self._vector_cache)}

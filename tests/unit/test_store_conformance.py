"""Conformance suite for the `Store` protocol (`tastemaker.store.base.Store`).

Every test runs once per backend in `BACKENDS`. A backend is a factory that, given a pytest
`tmp_path`, returns an `opener`: a zero-argument callable that opens a *new* store object on the
same underlying storage (same file, same database). Calling the opener twice gives two independent
connections, standing in for two processes (gateway and shard) sharing one store.

To add a backend, append a `pytest.param(factory, id="...")` to `BACKENDS`; the factory gets the
pytest request and a fresh folder and must hand back an opener of a new, empty store. The
PostgreSQL backend takes a fresh database on one real server per session (`postgres_server`). Tests use only the
protocol's methods, never SQL, so they stay backend-agnostic.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pytest

from tastemaker.domain import EventType, Item, UserEvent
from tastemaker.store import SnapshotRow, Store, open_store
from tastemaker.store.base import ApiKeyRecord, DuplicateApiKey

Opener = Callable[[], Store]


def _sqlite_backend(request, folder: Path) -> Opener:
    # "sqlite:///" + "/abs/path" = four slashes: SQLAlchemy's spelling of an absolute path.
    url = "sqlite:///" + str(folder / "x.db")
    return lambda: open_store(url)


def _postgres_backend(request, folder: Path) -> Opener:
    """A fresh schema (as good as a fresh database here, and much faster to make) on the session's
    real PostgreSQL server (tests/pgserver.py)."""
    import uuid

    server = request.getfixturevalue("postgres_server")
    url = server.create_schema(f"conformance_{uuid.uuid4().hex[:12]}")
    return lambda: open_store(url)


BACKENDS = [
    pytest.param(_sqlite_backend, id="sqlite"),
    pytest.param(_postgres_backend, id="postgres"),
]


@pytest.fixture(params=BACKENDS)
def new_backing_store(request, tmp_path):
    """Makes fresh, empty backing stores (files, databases) and returns an `Opener` for each;
    every store object opened through them is closed at the end."""
    opened: list[Store] = []
    count = 0

    def make() -> Opener:
        nonlocal count
        count += 1
        folder = tmp_path / f"store{count}"
        folder.mkdir()
        open_raw = request.param(request, folder)

        def open_one() -> Store:
            store = open_raw()
            opened.append(store)
            return store

        return open_one

    yield make
    for store in reversed(opened):
        try:
            store.close()
        except Exception:  # a test may already have closed it
            pass


@pytest.fixture
def opener(new_backing_store) -> Opener:
    """Opens store objects on one fresh backing store."""
    return new_backing_store()


@pytest.fixture
def store(opener) -> Store:
    return opener()


# -- helpers ------------------------------------------------------------------------------

DIM = 8


def _vec(seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)
    return v / np.linalg.norm(v)


def _item(item_id: str, seed: int = 0, **kw) -> Item:
    kw.setdefault("title", f"Title {item_id}")
    return Item(item_id=item_id, vector=_vec(seed), **kw)


def _event(user: str, eid: str, item: str = "", etype: EventType = EventType.VIEW, **kw) -> UserEvent:
    kw.setdefault("event_time", 1_000.0)
    return UserEvent(event_id=eid, user_id=user, event_type=etype, item_id=item, **kw)


def _mod_shard(user_id: str, num_shards: int) -> int:
    """A transparent shard function for tests: users are named 'u<number>'."""
    return int(user_id[1:]) % num_shards


def _replay(store: Store, shard: int, num_shards: int = 1) -> list:
    return list(store.events_for_replay(shard, num_shards))


class TestStoreConformance:
    # -- items --------------------------------------------------------------------------------
    def test_upsert_get_roundtrip_with_vector(self, store):
        item = Item(
            item_id="i1",
            title="Toy Story (1995)",
            description="A cowboy doll is threatened by a new spaceman figure.",
            tags=["pixar", "toys"],
            attributes={"genres": "Animation|Children", "year": "1995"},
            vector=_vec(1),
        )
        assert store.upsert_items([item]) == 1
        got = store.get_item("i1")
        assert got is not None
        assert got.item_id == "i1"
        assert got.title == item.title
        assert got.description == item.description
        assert got.tags == ["pixar", "toys"]
        assert got.attributes == {"genres": "Animation|Children", "year": "1995"}
        assert got.vector is not None
        assert got.vector.dtype == np.float32
        assert got.vector.shape == (DIM,)
        np.testing.assert_allclose(got.vector, item.vector, atol=1e-6)
        assert store.count_items() == 1

    def test_get_unknown_item_is_none(self, store):
        assert store.get_item("nope") is None
        assert store.get_item_vectors(["nope"]) == {}

    def test_upsert_empty_batch_writes_nothing(self, store):
        assert store.upsert_items([]) == 0
        assert store.count_items() == 0
        assert store.item_changes(0) == []

    def test_upsert_is_idempotent_and_replaces_fields(self, store):
        store.upsert_items([_item("i1", seed=1, tags=["a"], attributes={"k": "1"})])
        store.upsert_items([_item("i1", seed=1, tags=["a"], attributes={"k": "1"})])
        assert store.count_items() == 1

        store.upsert_items(
            [_item("i1", seed=2, title="New", description="d2", tags=["b", "c"], attributes={"k": "2"})]
        )
        assert store.count_items() == 1
        got = store.get_item("i1")
        assert got.title == "New"
        assert got.description == "d2"
        assert got.tags == ["b", "c"]
        assert got.attributes == {"k": "2"}
        np.testing.assert_allclose(got.vector, _vec(2), atol=1e-6)
        assert not np.allclose(got.vector, _vec(1), atol=1e-3)
        np.testing.assert_allclose(store.get_item_vectors(["i1"])["i1"], _vec(2), atol=1e-6)

    def test_get_item_vectors_returns_only_existing(self, store):
        store.upsert_items([_item("a", 1), _item("b", 2), Item(item_id="novec", title="no vector")])
        vectors = store.get_item_vectors(["a", "b", "missing", "novec", "a"])
        assert set(vectors) == {"a", "b"}
        np.testing.assert_allclose(vectors["a"], _vec(1), atol=1e-6)
        np.testing.assert_allclose(vectors["b"], _vec(2), atol=1e-6)

    def test_delete_returns_count_and_missing_ids(self, store):
        store.upsert_items([_item("a", 1), _item("b", 2), _item("c", 3)])
        deleted, missing = store.delete_items(["a", "x", "c", "y"])
        assert deleted == 2
        assert sorted(missing) == ["x", "y"]
        assert store.count_items() == 1
        # Deleting again: the item is gone, so it is now reported missing.
        deleted, missing = store.delete_items(["a"])
        assert (deleted, missing) == (0, ["a"])

    def test_deleted_item_is_invisible_and_tombstoned_in_feed(self, store):
        store.upsert_items([_item("a", 1), _item("b", 2)])
        before = {c.item_id: c.seq for c in store.item_changes(0)}
        store.delete_items(["a"])

        assert store.get_item("a") is None
        assert "a" not in store.get_item_vectors(["a", "b"])
        assert "b" in store.get_item_vectors(["a", "b"])

        changes = store.item_changes(0)
        last_a = [c for c in changes if c.item_id == "a"][-1]
        assert last_a.item is None
        assert last_a.seq > before["a"]
        assert last_a.seq > max(before.values())
        # A follower that already read the upserts sees the tombstone as the only new change.
        newer = store.item_changes(max(before.values()))
        assert [(c.item_id, c.item) for c in newer] == [("a", None)]

    def test_each_tombstone_gets_its_own_seq(self, store):
        store.upsert_items([_item("a", 1), _item("b", 2), _item("c", 3)])
        cursor = store.item_changes(0)[-1].seq
        deleted, _ = store.delete_items(["a", "b", "c"])
        assert deleted == 3
        tombstones = store.item_changes(cursor)
        assert sorted(c.item_id for c in tombstones) == ["a", "b", "c"]
        assert all(c.item is None for c in tombstones)
        seqs = [c.seq for c in tombstones]
        assert len(set(seqs)) == 3 and seqs == sorted(seqs)
        # A follower paging one change at a time sees every tombstone exactly once.
        walked = []
        while page := store.item_changes(cursor, limit=1):
            walked.append(page[0].item_id)
            cursor = page[0].seq
        assert sorted(walked) == ["a", "b", "c"]

    def test_reupsert_after_delete_revives_item(self, store):
        store.upsert_items([_item("a", 1)])
        store.delete_items(["a"])
        store.upsert_items([_item("a", 3, title="Back")])
        got = store.get_item("a")
        assert got is not None and got.title == "Back"
        assert store.count_items() == 1
        last = store.item_changes(0)[-1]
        assert last.item_id == "a" and last.item is not None and last.item.title == "Back"

    def test_item_changes_ordering_and_paging(self, store):
        store.upsert_items([_item("a", 1), _item("b", 2)])
        store.upsert_items([_item("c", 3)])
        store.upsert_items([_item("a", 4, title="A2")])  # a moves to the end of the feed

        changes = store.item_changes(0)
        seqs = [c.seq for c in changes]
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
        # The feed holds the latest state per item, in the order of the latest writes.
        assert [c.item_id for c in changes][-1] == "a"
        assert [c.item_id for c in changes if c.item_id != "a"] == ["b", "c"]
        assert changes[-1].item.title == "A2"
        np.testing.assert_allclose(changes[-1].item.vector, _vec(4), atol=1e-6)

        # Paging with after_seq and limit walks the feed exactly once, in order.
        walked, cursor = [], 0
        while True:
            page = store.item_changes(cursor, limit=1)
            if not page:
                break
            assert len(page) == 1
            walked.append(page[0].item_id)
            assert page[0].seq > cursor
            cursor = page[0].seq
        assert walked == [c.item_id for c in changes]
        assert store.item_changes(seqs[-1]) == []
        assert [c.seq for c in store.item_changes(seqs[0])] == seqs[1:]

    def test_item_interaction_counts(self, store):
        store.upsert_items([_item("a", 1), _item("b", 2)])
        store.append_events(
            0,
            [
                _event("u1", "e1", "a"),
                _event("u1", "e2", "a", EventType.CLICK),
                _event("u2", "e1", "a"),
                _event("u2", "e2", "b"),
                _event("u2", "e3", "", EventType.SEARCH, text="space movies"),
            ],
        )
        counts = store.item_interaction_counts()
        assert counts == {"a": 3, "b": 1}

    # -- events -------------------------------------------------------------------------------
    def test_append_events_returns_increasing_seqs(self, store):
        seqs = store.append_events(0, [_event("u1", "e1", "a"), _event("u1", "e2", "a"), _event("u2", "e1", "a")])
        assert all(isinstance(s, int) for s in seqs)
        assert seqs == sorted(seqs) and len(set(seqs)) == 3
        more = store.append_events(0, [_event("u3", "e1", "a")])
        assert more[0] > seqs[-1]
        assert store.event_seq("u1", "e2") == seqs[1]
        assert store.event_seq("u2", "e1") == seqs[2]
        assert store.event_seq("u1", "nope") is None
        assert store.event_seq("nobody", "e1") is None

    def test_append_events_dedupes_on_user_and_event_id(self, store):
        first = store.append_events(0, [_event("u1", "e1", "a")])
        # Same event_id for another user is a different event; same (user, event) is a duplicate.
        again = store.append_events(0, [_event("u1", "e1", "a"), _event("u2", "e1", "a")])
        assert again[0] is None
        assert isinstance(again[1], int)
        assert store.event_seq("u1", "e1") == first[0]
        assert len(_replay(store, 0)) == 2

    def test_append_events_dedupes_inside_one_batch(self, store):
        seqs = store.append_events(
            0,
            [
                _event("u1", "e1", "a", value=1.0),
                _event("u1", "e2", "b"),
                _event("u1", "e1", "a", value=2.0),  # retry inside the same batch
            ],
        )
        assert seqs[0] is not None and seqs[1] is not None
        assert seqs[2] is None
        replayed = _replay(store, 0)
        assert [(s.event.user_id, s.event.event_id) for s in replayed] == [("u1", "e1"), ("u1", "e2")]
        assert replayed[0].event.value == pytest.approx(1.0)  # the first write wins

    def test_events_roundtrip_through_replay(self, store):
        text_vec = _vec(7)
        events = [
            _event("u1", "e1", "a", EventType.RATING, value=4.5, event_time=123.25, attribution_token="tok"),
            _event("u1", "e2", "", EventType.SEARCH, text="space opera", text_vector=text_vec, event_time=200.0),
        ]
        seqs = store.append_events(3, events)
        replayed = _replay(store, 3, 4)
        assert [s.seq for s in replayed] == seqs
        assert all(s.shard == 3 for s in replayed)
        r0, r1 = replayed[0].event, replayed[1].event
        assert (r0.event_id, r0.user_id, r0.event_type, r0.item_id) == ("e1", "u1", EventType.RATING, "a")
        assert r0.value == pytest.approx(4.5)
        assert r0.event_time == pytest.approx(123.25)
        assert r0.attribution_token == "tok"
        assert r0.text_vector is None
        assert r1.event_type == EventType.SEARCH and r1.text == "space opera" and r1.item_id == ""
        assert r1.text_vector is not None
        np.testing.assert_allclose(r1.text_vector, text_vec, atol=1e-6)
        assert _replay(store, 0, 4) == []

    def test_events_for_replay_is_per_shard_in_seq_order(self, store):
        store.append_events(1, [_event("u1", "e1", "a")])
        store.append_events(0, [_event("u2", "e1", "a")])
        store.append_events(1, [_event("u3", "e1", "a"), _event("u1", "e2", "a")])
        shard1 = _replay(store, 1, 2)
        assert [(s.event.user_id, s.event.event_id) for s in shard1] == [("u1", "e1"), ("u3", "e1"), ("u1", "e2")]
        seqs = [s.seq for s in shard1]
        assert seqs == sorted(seqs)
        assert [s.event.user_id for s in _replay(store, 0, 2)] == ["u2"]

    def test_events_for_replay_skips_events_covered_by_snapshot(self, store):
        s = store.append_events(0, [_event("u1", "e1", "a"), _event("u1", "e2", "a"), _event("u2", "e1", "a")])
        later = store.append_events(0, [_event("u1", "e3", "a")])
        # u1's snapshot covers e1 and e2 (event_seq = seq of e2); u2 has no snapshot.
        store.save_snapshots([SnapshotRow("u1", 0, s[1], "{}", b"")])
        replayed = [(x.event.user_id, x.event.event_id) for x in _replay(store, 0)]
        assert replayed == [("u2", "e1"), ("u1", "e3")]
        assert _replay(store, 0)[-1].seq == later[0]

        # A snapshot covering everything leaves nothing of that user to replay.
        store.save_snapshots([SnapshotRow("u1", 0, later[0], "{}", b"")])
        assert [(x.event.user_id, x.event.event_id) for x in _replay(store, 0)] == [("u2", "e1")]

    def test_delete_user_removes_events_and_snapshot(self, store):
        store.append_events(0, [_event("u1", "e1", "a"), _event("u1", "e2", "b"), _event("u2", "e1", "a")])
        store.save_snapshots(
            [SnapshotRow("u1", 0, 1, '{"v": 1}', b"\x00" * 8), SnapshotRow("u2", 0, 1, '{"v": 2}', b"")]
        )
        assert store.delete_user("u1") == 2
        assert store.event_seq("u1", "e1") is None
        assert store.event_seq("u1", "e2") is None
        assert [r.user_id for r in store.load_snapshots(0)] == ["u2"]
        assert all(s.event.user_id != "u1" for s in _replay(store, 0))
        assert store.item_interaction_counts() == {"a": 1}
        # The other user is untouched; deleting an unknown user deletes nothing.
        assert store.event_seq("u2", "e1") is not None
        assert store.delete_user("nobody") == 0
        # After erasure the same event id is new again (no stale dedupe key).
        assert store.append_events(0, [_event("u1", "e1", "a")])[0] is not None

    # -- snapshots ----------------------------------------------------------------------------
    def test_snapshots_roundtrip_and_replace(self, store):
        blob = np.arange(6, dtype=np.float32).tobytes()
        store.save_snapshots(
            [
                SnapshotRow("u1", 0, 5, '{"version": 3}', blob),
                SnapshotRow("u2", 1, 7, '{"version": 1}', b""),
            ]
        )
        rows = {r.user_id: r for r in store.load_snapshots(0)}
        assert set(rows) == {"u1"}
        r = rows["u1"]
        assert (r.user_id, r.shard, r.event_seq, r.state) == ("u1", 0, 5, '{"version": 3}')
        assert bytes(r.vectors) == blob
        np.testing.assert_allclose(np.frombuffer(bytes(r.vectors), dtype=np.float32), np.arange(6))
        assert [x.user_id for x in store.load_snapshots(1)] == ["u2"]
        assert list(store.load_snapshots(2)) == []

        store.save_snapshots([SnapshotRow("u1", 0, 9, '{"version": 4}', b"\x01\x02")])
        rows = list(store.load_snapshots(0))
        assert len(rows) == 1
        assert (rows[0].event_seq, rows[0].state, bytes(rows[0].vectors)) == (9, '{"version": 4}', b"\x01\x02")

    def test_save_empty_snapshots_is_a_no_op(self, store):
        store.save_snapshots([])
        assert list(store.load_snapshots(0)) == []

    # -- lifecycle ----------------------------------------------------------------------------
    def test_ensure_num_shards_reassigns_when_count_changes(self, store):
        users = ["u0", "u1", "u2", "u3", "u4", "u5"]
        store.ensure_num_shards(1, _mod_shard)
        for u in users:
            store.append_events(0, [_event(u, "e1", "a"), _event(u, "e2", "a")])
        store.save_snapshots([SnapshotRow(u, 0, 0, "{}", b"") for u in users[:3]])

        store.ensure_num_shards(3, _mod_shard)
        for shard in range(3):
            expected = [u for u in users if int(u[1:]) % 3 == shard]
            replayed = _replay(store, shard, 3)
            assert sorted({s.event.user_id for s in replayed}) == expected
            assert len(replayed) == 2 * len(expected)
            assert all(s.shard == shard for s in replayed)
            assert sorted(r.user_id for r in store.load_snapshots(shard)) == [u for u in users[:3] if u in expected]
        assert sum(len(_replay(store, s, 3)) for s in range(3)) == 12

        # Back to two shards: everything moves again, nothing is lost or duplicated.
        store.ensure_num_shards(2, _mod_shard)
        for shard in range(2):
            expected = [u for u in users if int(u[1:]) % 2 == shard]
            assert sorted({s.event.user_id for s in _replay(store, shard, 2)}) == expected
            assert sorted(r.user_id for r in store.load_snapshots(shard)) == [u for u in users[:3] if u in expected]
        assert _replay(store, 2, 2) == []
        assert sum(len(_replay(store, s, 2)) for s in range(2)) == 12

    def test_ensure_num_shards_keeps_assignment_when_count_unchanged(self, store):
        store.ensure_num_shards(2, _mod_shard)
        store.append_events(1, [_event("u1", "e1", "a")])
        store.append_events(0, [_event("u2", "e1", "a")])
        # Same count as last start: nothing is re-assigned (even with a different function).
        store.ensure_num_shards(2, lambda user_id, n: 0)
        assert [s.event.user_id for s in _replay(store, 1, 2)] == ["u1"]
        assert [s.event.user_id for s in _replay(store, 0, 2)] == ["u2"]

    def test_second_store_object_sees_committed_writes(self, opener):
        writer = opener()
        reader = opener()
        # Open the reader before any write, so it cannot just be reading a copy made at open.
        assert reader.count_items() == 0

        writer.upsert_items([_item("a", 1, title="Alpha")])
        got = reader.get_item("a")
        assert got is not None and got.title == "Alpha"
        np.testing.assert_allclose(reader.get_item_vectors(["a"])["a"], _vec(1), atol=1e-6)
        assert [c.item_id for c in reader.item_changes(0)] == ["a"]

        seqs = writer.append_events(0, [_event("u1", "e1", "a")])
        assert reader.event_seq("u1", "e1") == seqs[0]
        # Dedupe holds across connections: the reader's retry of the same event is a duplicate.
        assert reader.append_events(0, [_event("u1", "e1", "a")]) == [None]
        assert reader.item_interaction_counts() == {"a": 1}

        writer.save_snapshots([SnapshotRow("u1", 0, seqs[0], "{}", b"")])
        assert [r.user_id for r in reader.load_snapshots(0)] == ["u1"]
        assert _replay(reader, 0) == []

        writer.delete_items(["a"])
        assert reader.get_item("a") is None
        assert reader.item_changes(0)[-1].item is None

        # Writes flow the other way too.
        reader.upsert_items([_item("b", 2)])
        assert writer.get_item("b") is not None

    def test_reopened_store_keeps_everything(self, opener):
        first = opener()
        first.upsert_items([_item("a", 1)])
        seqs = first.append_events(0, [_event("u1", "e1", "a")])
        first.save_snapshots([SnapshotRow("u1", 0, seqs[0], "{}", b"\x05")])
        first.close()

        second = opener()
        assert second.get_item("a") is not None
        assert second.event_seq("u1", "e1") == seqs[0]
        assert bytes(next(iter(second.load_snapshots(0))).vectors) == b"\x05"
        # Sequence numbers keep growing after a reopen.
        assert second.append_events(0, [_event("u1", "e2", "a")])[0] > seqs[0]
        old_item_seq = second.item_changes(0)[-1].seq
        second.upsert_items([_item("b", 2)])
        assert second.item_changes(0)[-1].seq > old_item_seq


class TestEventFeedAndArtifacts:
    """The event feed collaborative models follow, and artefacts of offline jobs."""

    @staticmethod
    def _event(user: str, event_id: str, item: str = "i1") -> UserEvent:
        return UserEvent(event_id=event_id, user_id=user, event_type=EventType.CLICK, item_id=item, event_time=5.0)

    def test_events_after_pages_in_seq_order_across_shards(self, store):
        seqs = store.append_events(0, [self._event("a", "1"), self._event("a", "2")])
        seqs += store.append_events(1, [self._event("b", "1", "i2")])
        feed = store.events_after(0)
        assert [s.seq for s in feed] == seqs
        assert [(s.event.user_id, s.event.item_id, s.shard) for s in feed] == [("a", "i1", 0), ("a", "i1", 0), ("b", "i2", 1)]
        assert [s.seq for s in store.events_after(seqs[0], limit=1)] == [seqs[1]]
        assert store.events_after(seqs[-1]) == []

    def test_erased_users_leave_the_feed(self, store):
        store.append_events(0, [self._event("gone", "1"), self._event("kept", "1")])
        store.delete_user("gone")
        assert [s.event.user_id for s in store.events_after(0)] == ["kept"]

    def test_artifacts_roundtrip_and_replace(self, opener):
        first = opener()
        assert first.load_artifact("model") is None and first.artifact_version("model") is None
        first.save_artifact("model", 7, b"\x00\x01binary")
        first.save_artifact("model", 9, b"newer")
        second = opener()
        assert second.load_artifact("model") == (9, b"newer")
        assert second.artifact_version("model") == 9

    def test_delete_user_is_recorded_in_the_erasure_feed_without_the_user_id(self, store):
        import hashlib

        store.append_events(0, [self._event("someone", "1")])
        assert store.erasures_after(0) == []
        store.delete_user("someone")
        store.delete_user("never-existed")  # erasure requests are recorded even for unknown users
        feed = store.erasures_after(0)
        assert [h for _, h in feed] == [hashlib.sha256(u.encode()).hexdigest() for u in ("someone", "never-existed")]
        assert feed[0][0] < feed[1][0] and store.erasures_after(feed[0][0]) == feed[1:]
        assert all("someone" not in h for _, h in feed)

    # -- re-encoding after an encoder change ---------------------------------------------------
    def test_meta_roundtrip_and_removal(self, opener):
        first = opener()
        assert first.get_meta("encoder_identity") is None
        first.set_meta("encoder_identity", "sha256:a")
        first.set_meta("encoder_identity", "sha256:b")
        second = opener()
        assert second.get_meta("encoder_identity") == "sha256:b"
        second.set_meta("encoder_identity", None)
        assert first.get_meta("encoder_identity") is None

    def test_compare_and_set_meta_sets_only_over_the_expected_value(self, opener):
        first, second = opener(), opener()
        assert first.compare_and_set_meta("lease", None, "a") is True
        assert second.compare_and_set_meta("lease", None, "b") is False  # not absent any more
        assert second.compare_and_set_meta("lease", "x", "b") is False
        assert second.get_meta("lease") == "a"
        assert second.compare_and_set_meta("lease", "a", "b") is True
        assert first.compare_and_set_meta("lease", "a", None) is False
        assert first.compare_and_set_meta("lease", "b", None) is True
        assert second.get_meta("lease") is None

    def test_compare_and_set_meta_has_one_winner_among_concurrent_writers(self, opener):
        """Eight connections race to take the same absent key: exactly one succeeds."""
        import threading

        stores = [opener() for _ in range(8)]
        start = threading.Barrier(len(stores))
        wins: list[int] = []

        def race(n: int) -> None:
            start.wait()
            if stores[n].compare_and_set_meta("lease", None, f"owner-{n}"):
                wins.append(n)

        threads = [threading.Thread(target=race, args=(n,)) for n in range(len(stores))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert len(wins) == 1
        assert stores[0].get_meta("lease") == f"owner-{wins[0]}"

    def test_live_items_pages_in_item_id_order_without_deleted(self, store):
        store.upsert_items([_item(i, n) for n, i in enumerate(["c", "a", "d", "b"])])
        store.delete_items(["d"])
        first = store.live_items("", limit=2)
        assert [item.item_id for _, item in first] == ["a", "b"]
        assert [item.item_id for _, item in store.live_items(first[-1][1].item_id, limit=2)] == ["c"]
        assert all(item.vector is not None for _, item in first)

    def test_replace_item_vectors_feeds_changes_and_spares_items_changed_meanwhile(self, store):
        store.upsert_items([_item("a", 1), _item("b", 2), _item("c", 3)])
        read = {item.item_id: seq for seq, item in store.live_items("", 10)}
        last_seq = max(read.values())
        store.upsert_items([_item("b", 9, title="B, edited")])  # a concurrent upsert after the read
        store.delete_items(["c"])  # and a concurrent delete
        skipped = store.replace_item_vectors([(i, read[i], _vec(100 + n)) for n, i in enumerate(["a", "b", "c"])])
        assert sorted(skipped) == ["b", "c"]
        assert np.allclose(store.get_item("a").vector, _vec(100))
        assert np.allclose(store.get_item("b").vector, _vec(9)) and store.get_item("b").title == "B, edited"
        assert store.get_item("c") is None
        # The re-encoded item is on the change feed again, after everything before it.
        feed = store.item_changes(last_seq)
        assert feed[-1].item_id == "a" and np.allclose(feed[-1].item.vector, _vec(100))

    def test_text_events_and_their_vectors_are_replaced_by_seq(self, store):
        seqs = store.append_events(0, [
            _event("u1", "1"),
            _event("u1", "2", etype=EventType.SEARCH, text="scary films", text_vector=_vec(1)),
            _event("u2", "3", etype=EventType.REVIEW, text="loved it", text_vector=_vec(2)),
        ])
        assert store.text_events(0) == [(seqs[1], "scary films"), (seqs[2], "loved it")]
        assert store.text_events(seqs[1]) == [(seqs[2], "loved it")]
        store.replace_event_text_vectors([(seqs[1], _vec(7))])
        replayed = {s.seq: s.event for s in _replay(store, 0)}
        assert np.allclose(replayed[seqs[1]].text_vector, _vec(7))
        assert np.allclose(replayed[seqs[2]].text_vector, _vec(2))

    def test_delete_snapshots_per_shard(self, store):
        store.save_snapshots([SnapshotRow("u1", 0, 1, "{}", b""), SnapshotRow("u2", 1, 1, "{}", b"")])
        assert store.delete_snapshots(0) == 1
        assert [r.user_id for r in store.load_snapshots(0)] == []
        assert [r.user_id for r in store.load_snapshots(1)] == ["u2"]
        assert store.delete_snapshots() == 1 and list(store.load_snapshots(1)) == []


class TestApiKeysAndInstanceId:
    """API key records (hashes only) and the store's instance id."""

    @staticmethod
    def _key(key_id: str, key_hash: str, role: str = "read", create_time: float = 100.0) -> ApiKeyRecord:
        return ApiKeyRecord(key_id=key_id, key_hash=key_hash, role=role, name=f"name {key_id}", create_time=create_time)

    def test_create_find_and_list_in_creation_order(self, opener):
        first = opener()
        first.create_api_key(self._key("k2", "h" * 64, "admin", 100.0))
        first.create_api_key(self._key("k1", "a" * 64, "write", 200.0))
        second = opener()  # another process sees the keys
        found = second.find_api_key("a" * 64)
        assert found == ApiKeyRecord("k1", "a" * 64, "write", "name k1", 200.0, None)
        assert [r.key_id for r in second.list_api_keys()] == ["k2", "k1"]
        assert second.list_api_keys()[0] == ApiKeyRecord("k2", "h" * 64, "admin", "name k2", 100.0, None)

    def test_unknown_key_is_none_and_unknown_revoke_is_false(self, store):
        assert store.find_api_key("0" * 64) is None
        assert store.list_api_keys() == []
        assert store.revoke_api_key("nope") is False

    def test_key_id_and_hash_are_unique(self, store):
        store.create_api_key(self._key("k1", "a" * 64))
        with pytest.raises(DuplicateApiKey):
            store.create_api_key(self._key("k1", "b" * 64))
        with pytest.raises(DuplicateApiKey):
            store.create_api_key(self._key("k2", "a" * 64))
        # The failed attempts left nothing behind, and the store still takes new keys.
        assert [(r.key_id, r.key_hash) for r in store.list_api_keys()] == [("k1", "a" * 64)]
        assert store.find_api_key("b" * 64) is None
        store.create_api_key(self._key("k2", "b" * 64))
        assert store.find_api_key("b" * 64).key_id == "k2"

    def test_revoke_is_idempotent_and_revoked_key_is_still_found(self, opener):
        store = opener()
        store.create_api_key(self._key("k1", "a" * 64))
        store.create_api_key(self._key("k2", "b" * 64))
        assert store.revoke_api_key("k1") is True
        revoked = opener().find_api_key("a" * 64)
        assert revoked is not None and revoked.key_id == "k1"
        assert revoked.revoke_time is not None and revoked.revoke_time > 0
        # Revoking again succeeds and keeps the first revoke time.
        assert store.revoke_api_key("k1") is True
        assert store.find_api_key("a" * 64).revoke_time == revoked.revoke_time
        # The other key is untouched; the revoked one stays listed.
        assert store.find_api_key("b" * 64).revoke_time is None
        assert [(r.key_id, r.revoke_time is None) for r in store.list_api_keys()] == [("k1", False), ("k2", True)]

    def test_instance_id_is_shared_by_openers_of_one_store_and_differs_between_stores(self, new_backing_store):
        open_a = new_backing_store()
        first, second = open_a(), open_a()
        ids = {first.instance_id(), second.instance_id()}
        assert len(ids) == 1
        (instance,) = ids
        assert isinstance(instance, str) and len(instance) >= 16
        first.close()
        assert open_a().instance_id() == instance  # kept across reopen
        other = new_backing_store()()
        assert other.instance_id() != instance

    def test_concurrent_first_opens_agree_on_the_instance_id(self, new_backing_store):
        import threading

        open_a = new_backing_store()
        stores: list[Store] = []
        errors: list[BaseException] = []

        def open_and_record() -> None:
            try:
                stores.append(open_a())
            except BaseException as exc:  # reported below, not swallowed
                errors.append(exc)

        threads = [threading.Thread(target=open_and_record) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert errors == [] and len(stores) == 4
        assert len({s.instance_id() for s in stores}) == 1


# -- feeds under concurrent writers ---------------------------------------------------------


def _write_event(store: Store, n: int) -> None:
    store.append_events(0, [_event(f"u{n}", f"e{n}", "a")])


def _read_events(store: Store, cursor: int) -> list[tuple[int, str]]:
    return [(s.seq, s.event.user_id) for s in store.events_after(cursor)]


def _write_item(store: Store, n: int) -> None:
    store.upsert_items([_item(f"u{n}", n)])


def _read_items(store: Store, cursor: int) -> list[tuple[int, str]]:
    return [(c.seq, c.item_id) for c in store.item_changes(cursor)]


def _write_erasure(store: Store, n: int) -> None:
    store.delete_user(f"u{n}")


def _read_erasures(store: Store, cursor: int) -> list[tuple[int, str]]:
    import hashlib

    names = {hashlib.sha256(f"u{n}".encode()).hexdigest(): f"u{n}" for n in (1, 2)}
    return [(seq, names.get(hashed, hashed)) for seq, hashed in store.erasures_after(cursor)]


FEEDS = [
    pytest.param(_write_event, _read_events, id="events"),
    pytest.param(_write_item, _read_items, id="items"),
    pytest.param(_write_erasure, _read_erasures, id="erasures"),
]


def _late_committer_race(writer_a: Store, writer_b: Store, reader: Store, write, read) -> list[str]:
    """Writer A writes entry "u1" and is held after its seqs are taken, right before COMMIT (the
    stores' `_before_commit` seam); writer B then writes "u2". While A is held, a follower polls
    the feed as followers do (cursor = last seq seen). Then A commits, both writers return, and
    the follower polls once more. Returns what the follower saw, in order."""
    import threading
    import time

    a_held, release_a, b_returned = threading.Event(), threading.Event(), threading.Event()
    errors: list[BaseException] = []
    commit = writer_a._before_commit

    def hold_before_commit(*args):
        a_held.set()
        if not release_a.wait(timeout=60):
            raise RuntimeError("writer A was never released")
        return commit(*args)

    writer_a._before_commit = hold_before_commit  # an instance attribute: only writer A is held

    def run(store: Store, n: int, done: Optional[threading.Event] = None) -> None:
        try:
            write(store, n)
        except BaseException as exc:  # reported by the caller's assert
            errors.append(exc)
        finally:
            if done is not None:
                done.set()

    seen: list[str] = []
    cursor = 0

    def poll() -> None:
        nonlocal cursor
        for seq, key in read(reader, cursor):
            assert seq > cursor
            seen.append(key)
            cursor = seq

    thread_a = threading.Thread(target=run, args=(writer_a, 1))
    thread_a.start()
    try:
        assert a_held.wait(timeout=60), "writer A never reached its commit"
        thread_b = threading.Thread(target=run, args=(writer_b, 2, b_returned))
        thread_b.start()
        # B's chance to get ahead of A. A correct store makes B wait for A (a lock) or keeps B
        # invisible until A commits; a naive one lets B commit and the follower move past A's
        # seq. Poll until B returned, or for one second if B is (correctly) waiting on A.
        deadline = time.monotonic() + 1.0
        while not b_returned.is_set() and time.monotonic() < deadline:
            poll()
            b_returned.wait(timeout=0.01)
        poll()
    finally:
        release_a.set()
        thread_a.join(timeout=60)
    thread_b.join(timeout=60)
    assert errors == [] and not thread_a.is_alive() and not thread_b.is_alive()
    # Both writes have returned, so both are committed: one poll must find whatever is left.
    poll()
    return seen


class TestFeedsWithConcurrentWriters:
    """The item change feed, the event feed and the erasure feed are followed as "seq > last
    seen". If seqs were handed out in one order and committed in another (a plain PostgreSQL
    sequence), a follower could see seq N+1 while N is still in flight, move its cursor past N and
    never see N: a retrieval replica would miss an item, a collaborative model an event. This
    guards that every follower sees every entry exactly once when two writers race, with the
    late committer holding the *earlier* seq. `test_naive_sequence_loses_the_late_committer`
    shows the same race does lose an entry when seqs come from a plain sequence."""

    @pytest.mark.parametrize("write, read", FEEDS)
    def test_follower_sees_every_entry_once_when_the_earlier_seq_commits_last(self, opener, write, read):
        seen = _late_committer_race(opener(), opener(), opener(), write, read)
        assert sorted(seen) == ["u1", "u2"], f"the follower saw {seen}"

    def test_follower_of_many_concurrent_writers_sees_every_event_once(self, opener):
        """Four writers (own connections) append small batches as fast as they can while a
        follower polls the event feed; at the end it has seen every event exactly once."""
        import threading

        writers, batches, per_batch = 4, 25, 3
        stores = [opener() for _ in range(writers)]
        follower = opener()
        done = threading.Event()
        errors: list[BaseException] = []
        seen: list[tuple[str, str]] = []

        def write(n: int) -> None:
            try:
                for b in range(batches):
                    stores[n].append_events(
                        n, [_event(f"u{n}", f"e{b}-{k}", "a") for k in range(per_batch)]
                    )
            except BaseException as exc:  # reported by the assert below
                errors.append(exc)

        def follow() -> None:
            cursor = 0
            while True:
                finished = done.is_set()  # read before polling: a last poll after the writers
                page = follower.events_after(cursor, limit=7)
                for stored in page:
                    assert stored.seq > cursor
                    seen.append((stored.event.user_id, stored.event.event_id))
                    cursor = stored.seq
                if finished and len(page) < 7:  # a full page may have more behind it
                    break

        threads = [threading.Thread(target=write, args=(n,)) for n in range(writers)]
        reader = threading.Thread(target=follow)
        reader.start()
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        done.set()
        reader.join(timeout=120)
        assert errors == [] and not reader.is_alive()
        expected = {(f"u{n}", f"e{b}-{k}") for n in range(writers) for b in range(batches) for k in range(per_batch)}
        assert len(seen) == len(expected) and set(seen) == expected


def test_naive_sequence_loses_the_late_committer(postgres_server):
    """The race of `TestFeedsWithConcurrentWriters` against a PostgresStore whose item seqs are
    taken like `nextval()` (committed at once, outside the writing transaction): the follower
    loses writer A's item. Proves the race test can fail, i.e. that it tests something."""
    import uuid

    from tastemaker.store.postgres import PostgresStore

    class NaiveSequenceStore(PostgresStore):
        def _reserve_seqs(self, cur, feed, count):
            with self._pool.connection() as other:  # autocommit: no lock held until our commit
                (last,) = other.execute(
                    "UPDATE counters SET value = value + %s WHERE name = %s RETURNING value", (count, feed)
                ).fetchone()
            return last - count + 1

    url = postgres_server.create_schema(f"naive_{uuid.uuid4().hex[:12]}")
    stores = [NaiveSequenceStore(url) for _ in range(3)]
    try:
        seen = _late_committer_race(*stores, _write_item, _read_items)
        assert seen == ["u2"]  # u1 committed later with the smaller seq: skipped for good
        assert sorted(c.item_id for c in stores[2].item_changes(0)) == ["u1", "u2"]
    finally:
        for store in stores:
            store.close()

"""The application's own start-up (`tastemaker.startup`): the store lease and the idempotent steps,
on a real SQLite file and a real PostgreSQL database, without Ray."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from tastemaker.config import EventWeights, RetrievalConfig
from tastemaker.domain import EventType, Item, UserEvent
from tastemaker.reencode import synchronous
from tastemaker.retrieval.collaborative import GRAPH_ARTIFACT
from tastemaker.startup import ServiceStartup, StartupSteps, StoreLease, fit_if_missing, mark_encoder_swap
from tastemaker.store import open_store
from tastemaker.store.base import ENCODER_IDENTITY_KEY, ENCODER_SWAP_PENDING_KEY

DIM = 8
#: A small fit: the factors need only a few sweeps here.
RETRIEVAL = RetrievalConfig(factors=4, factor_iterations=2)


def _model(name: str):
    """A stand-in encoder: a fixed random unit vector per (model, text), counting its texts."""
    calls: list[int] = []

    def encode(texts: list[str]) -> np.ndarray:
        calls.append(len(texts))
        rows = []
        for text in texts:
            seed = int.from_bytes(hashlib.sha256(f"{name}\x00{text}".encode()).digest()[:8], "little")
            v = np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)
            rows.append(v / np.linalg.norm(v))
        return np.stack(rows)

    encode.calls = calls  # type: ignore[attr-defined]
    return encode


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request, tmp_path) -> str:
    """One fresh store per test: a SQLite file, or a database on the session's PostgreSQL server."""
    if request.param == "sqlite":
        return "sqlite:///" + str(tmp_path / "s.db")
    import uuid

    return request.getfixturevalue("postgres_server").create_database(f"startup_{uuid.uuid4().hex[:12]}")


@pytest.fixture
def opened(store_url):
    """Opens store objects on the test's store (each one standing for a process); closes them."""
    stores = []

    def open_one():
        stores.append(open_store(store_url))
        return stores[-1]

    yield open_one
    for store in stores:
        store.close()


def _fill(store, encode) -> None:
    """Items and events (one of them a search text) encoded with `encode`'s model."""
    titles = ["Toy Story", "Finding Nemo", "The Shining", "Heat", "Amelie"]
    items = [Item(item_id=f"i{n}", title=t) for n, t in enumerate(titles)]
    for item, vector in zip(items, encode([i.text() for i in items])):
        item.vector = vector
    store.upsert_items(items)
    events = [
        UserEvent(event_id=f"e{n}", user_id=f"u{n % 2}", event_type=EventType.CLICK, item_id=f"i{n % 5}",
                  event_time=1_000.0 + n)
        for n in range(8)
    ]
    search = UserEvent(event_id="q", user_id="u0", event_type=EventType.SEARCH, text="a film about fish",
                       event_time=2_000.0, text_vector=encode(["a film about fish"])[0])
    store.append_events(0, [*events, search])


def _steps(encode, identity: str, rebuilt: list[int]) -> StartupSteps:
    def rebuild() -> int:
        rebuilt.append(1)
        return 0

    return StartupSteps(
        encoder_identity=lambda: identity,
        encode_async=synchronous(encode),
        rebuild_profiles=rebuild,
        retrieval=RETRIEVAL,
        weights=EventWeights(),
    )


def test_lease_is_exclusive_until_released_or_expired(opened):
    now = [1_000.0]
    store_a, store_b = opened(), opened()
    a = StoreLease(store_a, "a", ttl_s=60, clock=lambda: now[0])
    b = StoreLease(store_b, "b", ttl_s=60, clock=lambda: now[0])
    assert a.try_acquire() and not b.try_acquire()
    assert a.try_acquire()  # ours already: renewed
    now[0] += 59
    assert not b.try_acquire()
    assert a.renew()
    now[0] += 59  # within the renewed lease
    assert not b.try_acquire()
    now[0] += 2  # a stopped renewing: expired
    assert b.try_acquire()
    assert not a.renew()  # taken over
    a.release()  # not ours any more: leaves b's lease alone
    assert not a.try_acquire()
    b.release()
    assert a.try_acquire()


def test_startup_reencodes_and_fits_once_across_replicas(opened):
    """Two replicas start at once over a store whose vectors another model made: the catalog and
    the texts are re-encoded exactly once, the profiles rebuilt once, a fit is published, and
    both replicas end up done."""
    old, new = _model("old"), _model("new")
    store = opened()
    _fill(store, old)
    store.set_meta(ENCODER_IDENTITY_KEY, "old-model:mean:256:sha256=0000000000000000")
    seq_before = store.item_changes(0)[-1].seq
    rebuilt: list[int] = []
    replicas = [ServiceStartup(opened(), _steps(new, "new-model:mean:256:sha256=1111111111111111", rebuilt))
                for _ in range(2)]
    for replica in replicas:
        replica.start()
    assert all(replica.wait(timeout=120) for replica in replicas)

    assert sum(new.calls) == 5 + 1  # five item texts and one search text, once
    assert len(rebuilt) == 1
    assert store.item_changes(0)[-1].seq == seq_before + 5  # one new feed entry per item, not two
    vectors = store.get_item_vectors(["i0"])
    assert np.allclose(vectors["i0"], new([Item(item_id="i0", title="Toy Story").text()])[0])
    assert store.get_meta(ENCODER_IDENTITY_KEY).startswith("new-model")
    assert store.get_meta(ENCODER_SWAP_PENDING_KEY) is None
    assert store.artifact_version(GRAPH_ARTIFACT) is not None
    results = [r.result for r in replicas]
    assert sum(r["encoder"]["swapped"] for r in results) == 1
    assert sum(r["fitted"] is not None for r in results) == 1
    assert store.get_meta("startup_lease") is None  # released


def test_an_interrupted_swap_is_finished_by_the_next_start(opened):
    """A replica that died half-way left the swap marker: the next start redoes the swap."""
    old, new = _model("old"), _model("new")
    store = opened()
    _fill(store, old)
    store.set_meta(ENCODER_IDENTITY_KEY, "old-model:mean:256:sha256=0000000000000000")
    identity = "new-model:mean:256:sha256=1111111111111111"
    assert mark_encoder_swap(store, identity)  # the dead replica got this far
    rebuilt: list[int] = []
    startup = ServiceStartup(opened(), _steps(new, identity, rebuilt))
    assert startup.run_once()
    assert startup.done and startup.result["encoder"]["swapped"] and rebuilt == [1]
    assert store.get_meta(ENCODER_SWAP_PENDING_KEY) is None


def test_a_fresh_store_records_the_model_and_needs_no_fit(opened):
    store = opened()
    encode = _model("new")
    startup = ServiceStartup(opened(), _steps(encode, "new-model:mean:256:sha256=1111111111111111", []))
    assert startup.run_once()
    assert startup.result == {"encoder": {"swapped": False}, "fitted": None}
    assert encode.calls == []
    assert store.get_meta(ENCODER_IDENTITY_KEY).startswith("new-model")
    assert fit_if_missing(store, RETRIEVAL, EventWeights()) is None


def test_a_replica_waits_while_another_holds_the_lease(opened):
    store = opened()
    holder = StoreLease(opened(), "someone-else")
    assert holder.try_acquire()
    startup = ServiceStartup(opened(), _steps(_model("new"), "new-model:mean:256:sha256=1", []))
    assert startup.run_once() is False and not startup.done
    startup.start()
    assert not startup.wait(timeout=1.5)  # still held
    holder.release()
    assert startup.wait(timeout=30)
    startup.stop()
    assert store.get_meta("startup_lease") is None


def test_failing_steps_are_retried(opened):
    """A step that fails (e.g. the encoder not answering yet) is retried; done only after success."""
    attempts: list[int] = []
    steps = _steps(_model("new"), "new-model:mean:256:sha256=1", [])

    def flaky_identity() -> str:
        attempts.append(1)
        if len(attempts) < 3:
            raise RuntimeError("encoder not ready")
        return "new-model:mean:256:sha256=1"

    steps.encoder_identity = flaky_identity
    startup = ServiceStartup(opened(), steps, retry_s=0.05)
    startup.start()
    assert startup.wait(timeout=30)
    assert len(attempts) == 3 and startup.last_error == "RuntimeError"
    assert opened().get_meta("startup_lease") is None  # released after each failure

"""`RetrievalReplica` (the retrieval deployment without Ray) over a real SQLite store: the index
trains in a worker thread while the replica keeps answering and applying the feed, and a replica
restarted against the same store loads the saved index and catches up from the feed instead of
training again."""

from __future__ import annotations

import threading

import numpy as np

from tastemaker.config import EventWeights, RetrievalConfig
from tastemaker.domain import AttributeCondition, Item, ProfileView, RecommendQuery
from tastemaker.retrieval.ann import PQIndex
from tastemaker.retrieval.deployment import RetrievalReplica, snapshot_key
from tastemaker.store import open_store
from tastemaker.store.base import ENCODER_IDENTITY_KEY

D = 16
CONFIG = RetrievalConfig(index="pq", pq_rerank=40)  # PQ from the first 624 items: small and approximate


def make_items(start: int, stop: int, seed: int) -> list[Item]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((stop - start, D)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return [
        Item(item_id=f"i{j}", title=f"Item {j}", attributes={"bucket": str(j % 4)}, vector=x[j - start])
        for j in range(start, stop)
    ]


def queries(count: int = 8) -> list[np.ndarray]:
    rng = np.random.default_rng(99)
    q = rng.standard_normal((count, D)).astype(np.float32)
    return list(q / np.linalg.norm(q, axis=1, keepdims=True))


def answers(replica: RetrievalReplica) -> list:
    """Index searches (with and without a filter) and whole recommendations, for comparison."""
    out = []
    only = [AttributeCondition("bucket", any_of=["1"])]
    for n, q in enumerate(queries()):
        allowed = replica.retriever.catalog.matching_ids(only)
        out.append(replica.retriever.index.search(q, 30, None, {"i3", "i7"}))
        out.append(replica.retriever.index.search(q, 30, allowed, None))
        profile = ProfileView(user_id=f"u{n}", vector=q, seen_item_ids=["i3"])
        out.append([(s.item_id, round(s.score, 5)) for s in replica.retriever.recommend(RecommendQuery(user_id=f"u{n}", page_size=10), profile)])
    return out


def test_restarted_replica_loads_the_saved_index_and_catches_up_without_training(tmp_path):
    store = open_store("sqlite:///" + str(tmp_path / "s.db"))
    store.upsert_items(make_items(0, 1_500, seed=1))
    first = RetrievalReplica(CONFIG, store, EventWeights(), tmp_path / "idx")
    index = first.retriever.index
    assert isinstance(index, PQIndex) and index.approximate and index.trainings == 1
    assert first.saves == 1 and first.started_from_seq is None

    second = RetrievalReplica(CONFIG, open_store("sqlite:///" + str(tmp_path / "s.db")), EventWeights(), tmp_path / "idx")
    assert second.started_from_seq == first.seq and second.seq == first.seq
    assert second.retriever.index.trainings == 0 and second.builds == 0  # loaded, not trained
    assert second.retriever.index.approximate and len(second.retriever.catalog.items) == 1_500
    assert answers(second) == answers(first)

    # Changes after the snapshot: both replicas apply them from the feed and still agree.
    store.upsert_items(make_items(1_500, 1_700, seed=2) + make_items(0, 20, seed=3))  # new and changed
    store.delete_items([f"i{j}" for j in range(100, 130)])
    first.sync()
    third = RetrievalReplica(CONFIG, open_store("sqlite:///" + str(tmp_path / "s.db")), EventWeights(), tmp_path / "idx")
    assert third.retriever.index.trainings == 0 and third.started_from_seq == second.started_from_seq  # caught up past the snapshot
    assert len(third.retriever.index) == len(first.retriever.index) == 1_670
    assert answers(third) == answers(first)

    # A snapshot made for another configuration, or for another model's vectors, is never loaded.
    other = RetrievalConfig(index="pq", pq_rerank=40, pq_subquantizers=4)
    assert snapshot_key(other, "") != snapshot_key(CONFIG, "") != snapshot_key(CONFIG, "model-b")
    fourth = RetrievalReplica(other, open_store("sqlite:///" + str(tmp_path / "s.db")), EventWeights(), tmp_path / "idx")
    assert fourth.started_from_seq is None and fourth.retriever.index.trainings == 1
    store.set_meta(ENCODER_IDENTITY_KEY, "model-b")  # what the store says made its vectors
    fifth = RetrievalReplica(CONFIG, open_store("sqlite:///" + str(tmp_path / "s.db")), EventWeights(), tmp_path / "idx")
    assert fifth.started_from_seq is None and fifth.retriever.index.trainings == 1


def test_a_snapshot_that_disagrees_with_the_store_is_dropped(tmp_path):
    store = open_store("sqlite:///" + str(tmp_path / "s.db"))
    store.upsert_items(make_items(0, 1_000, seed=4))
    RetrievalReplica(CONFIG, store, EventWeights(), tmp_path / "idx")
    # Another store (same seqs, other vectors) with the same snapshot folder.
    other = open_store("sqlite:///" + str(tmp_path / "other.db"))
    other.upsert_items(make_items(0, 1_000, seed=5))
    replica = RetrievalReplica(CONFIG, other, EventWeights(), tmp_path / "idx")
    assert replica.started_from_seq is None and replica.retriever.index.trainings == 1  # rebuilt from its own feed
    item = other.get_item("i0")
    np.testing.assert_allclose(replica.retriever.index.vector("i0"), item.vector, atol=1e-6)


def test_training_runs_in_a_worker_thread_while_the_replica_answers_and_follows_the_feed(tmp_path):
    store = open_store("sqlite:///" + str(tmp_path / "s.db"))
    store.upsert_items(make_items(0, 700, seed=6))
    replica = RetrievalReplica(CONFIG, store, EventWeights(), tmp_path / "idx")
    index = replica.retriever.index
    assert index.trainings == 1 and index._trained_at == 700 and (replica.builds, replica.saves) == (1, 1)

    # Hold the worker's build just before its swap, to act while it is in progress.
    reached, release = threading.Event(), threading.Event()
    rebuild = index.rebuild

    def held_rebuild(before_swap=None):
        def hold():
            reached.set()
            assert release.wait(120)

        return rebuild(before_swap=hold)

    index.rebuild = held_rebuild
    store.upsert_items(make_items(700, 2_800, seed=7))  # 4x: retraining is due
    replica.sync()  # applies the feed (encoded with the old codebooks) and starts the worker
    try:
        assert reached.wait(120)
        assert index.trainings == 2 and index._trained_at == 700  # trained, not swapped in yet
        before = answers(replica)  # answered during the build
        index.rerank = 10_000  # re-rank every code: the old codes must hold every item, right
        names = list(replica.retriever.catalog.items)
        vectors = np.stack([index.vector(i) for i in names])
        for q in queries():
            want = [names[j] for j in np.argsort(-(vectors @ q), kind="stable")[:20]]
            assert [i for i, _ in index.search(q, 20)] == want
        index.rerank = CONFIG.pq_rerank
        store.upsert_items(make_items(2_800, 2_900, seed=8))
        store.delete_items(["i5", "i6"])
        assert replica.sync() == 102  # the feed keeps being applied during the build
        assert len(before) == 24 and "i5" not in index
    finally:
        release.set()
        assert replica.wait_for_build(120)
    assert replica.builds == 2 and index._trained_at == 2_800 and len(index) == 2_898
    assert replica.saves == 2  # the new index was saved after the swap
    hits = {i for i, _ in index.search(queries()[1], 3_000)}
    assert len(hits) == 2_898 and {"i2850", "i2899"} <= hits and not {"i5", "i6"} & hits  # nothing lost

"""The default approximate index (`PQIndex`) beyond the conformance suite: recall against brute
force, filters and exclude-seen on the approximate path, dead codes and compaction, the automatic
exact <-> PQ switch, and the factory / config.

Data: seeded 384-d topic mixtures (each item mixes 4 of 600 topic directions, plus a direction all
items share and noise), the kind of data on which IVF lists lose neighbours of profile queries;
queries look like user profiles (the normalised mean of 50 items). Expected neighbours come from
numpy brute force in float64."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from tastemaker.config import RetrievalConfig, load_config
from tastemaker.errors import InvalidArgument
from tastemaker.retrieval.ann import IVFIndex, PQIndex, default_subquantizers
from tastemaker.retrieval.index import FlatIndex, create_index, load_index


def topic_mixture(n: int, d: int, topics: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    directions = rng.standard_normal((topics, d))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    picks = rng.integers(0, topics, (n, 4))
    weights = rng.dirichlet(np.full(4, 0.5), n)
    shared = rng.standard_normal(d)
    x = np.einsum("nj,njd->nd", weights, directions[picks]) + 1.2 * shared / np.linalg.norm(shared)
    x += 1.2 * rng.standard_normal((n, d)) / np.sqrt(d)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), picks[np.arange(n), weights.argmax(axis=1)]


def profile_queries(x: np.ndarray, labels: np.ndarray, count: int, seed: int) -> list[tuple[np.ndarray, list[int]]]:
    """(profile vector, rows of the 50 items it is the mean of) for users of 1-3 main topics."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        topics = rng.choice(labels, size=rng.integers(1, 4))
        members = np.flatnonzero(np.isin(labels, topics))
        rows = rng.choice(members, size=min(50, len(members)), replace=False)
        q = x[rows].astype(np.float64).mean(axis=0)
        out.append(((q / np.linalg.norm(q)).astype(np.float32), rows.tolist()))
    return out


def brute_force(x64: np.ndarray, q: np.ndarray, k: int, excluded_rows=()) -> list[int]:
    scores = x64 @ q.astype(np.float64)
    scores[list(excluded_rows)] = -np.inf
    return np.argsort(-scores)[:k].tolist()


def recall(got, want_rows) -> float:
    return len({int(i[1:]) for i, _ in got} & set(want_rows)) / len(want_rows)


@pytest.fixture(scope="module")
def catalog():
    """20k items in a trained PQIndex with the default parameters, and in an exact index."""
    x, labels = topic_mixture(20_000, 384, topics=600, seed=5)
    ids = [f"i{j}" for j in range(len(x))]
    pq = create_index(RetrievalConfig(index="pq"), 384)
    pq.upsert(ids, x)
    flat = FlatIndex(384)
    flat.upsert(ids, x)
    return ids, x, x.astype(np.float64), labels, pq, flat


def test_recall_at_100_against_brute_force(catalog):
    ids, x, x64, labels, pq, flat = catalog
    assert isinstance(pq, PQIndex) and pq.approximate
    assert (pq.subquantizers, pq.rerank) == (192, RetrievalConfig().pq_rerank)
    recalls = []
    for q, _ in profile_queries(x, labels, 30, seed=6):
        want = brute_force(x64, q, 100)
        assert recall(flat.search(q, 100), want) >= 0.99  # the exact reference, up to float32 rounding
        got = pq.search(q, 100)
        # Scores are exact inner products, not code approximations.
        np.testing.assert_allclose([s for _, s in got], [float(x64[int(i[1:])] @ q) for i, _ in got], atol=1e-5)
        recalls.append(recall(got, want))
    assert np.mean(recalls) >= 0.95, np.mean(recalls)
    assert min(recalls) >= 0.8, min(recalls)


def test_reranking_more_candidates_is_what_buys_recall(catalog):
    """Guards the recall test: ranking by codes alone (100 candidates for k=100) must lose
    neighbours on this data, or it would be too easy to say anything."""
    ids, x, x64, labels, pq, flat = catalog
    codes_only = PQIndex(384, rerank=100)
    codes_only._codes, codes_only._trained_at = pq._codes, pq._trained_at  # share the trained codes
    codes_only._matrix, codes_only._ids, codes_only._slot_of = pq._matrix, pq._ids, pq._slot_of
    codes_only._node_slot, codes_only._slot_node = pq._node_slot, pq._slot_node
    queries = profile_queries(x, labels, 20, seed=7)
    few = [recall(codes_only.search(q, 100), brute_force(x64, q, 100)) for q, _ in queries]
    many = [recall(pq.search(q, 100), brute_force(x64, q, 100)) for q, _ in queries]
    assert np.mean(few) < 0.85 and np.mean(many) > np.mean(few) + 0.1


def test_recall_with_exclude_seen_and_filters(catalog):
    ids, x, x64, labels, pq, flat = catalog
    rng = np.random.default_rng(8)
    broad_rows = np.flatnonzero(rng.random(len(ids)) < 0.4)  # 40 %: filtered on the code scan
    narrow_rows = rng.choice(len(ids), size=800, replace=False)  # small: scored exactly
    for rows in (None, broad_rows, narrow_rows):
        allowed = None if rows is None else {ids[j] for j in rows}
        recalls = []
        for q, seen_rows in profile_queries(x, labels, 15, seed=9):
            seen = {ids[j] for j in seen_rows}
            want = [i for i, _ in flat.search(q, 100, allowed=allowed, excluded=seen)]
            got = pq.search(q, 100, allowed=allowed, excluded=seen)
            assert len(got) == 100
            assert not seen & {i for i, _ in got}
            assert allowed is None or {i for i, _ in got} <= allowed
            recalls.append(len(set(want) & {i for i, _ in got}) / 100)
        assert np.mean(recalls) >= 0.95, (None if rows is None else len(rows), np.mean(recalls))
        if rows is narrow_rows:
            assert recalls == [1.0] * len(recalls)


def test_excluded_ids_near_the_query_grow_the_reranked_pool(catalog):
    """A profile's seen items rank at the top of the code scan; excluding them must not cost recall:
    the pool re-scored exactly grows with the excluded ids the scan ranks inside it."""
    ids, x, x64, labels, pq, flat = catalog
    small = PQIndex(384, rerank=500)  # a small pool, where the depth lost to exclusions shows
    small._codes, small._trained_at = pq._codes, pq._trained_at  # share the trained codes
    small._matrix, small._ids, small._slot_of = pq._matrix, pq._ids, pq._slot_of
    small._node_slot, small._slot_node = pq._node_slot, pq._slot_node
    plain, excluding, grown = [], [], []
    for q, seen_rows in profile_queries(x, labels, 20, seed=14):
        plain.append(recall(small.search(q, 100), brute_force(x64, q, 100)))
        assert small.last_reranked == 500
        seen = {ids[j] for j in seen_rows}
        got = small.search(q, 100, excluded=seen)
        assert not seen & {i for i, _ in got}
        excluding.append(recall(got, brute_force(x64, q, 100, seen_rows)))
        grown.append(small.last_reranked - 500)
    assert np.mean(grown) > 25, grown  # most of the 50 seen items rank inside the pool
    assert np.mean(excluding) >= np.mean(plain) - 0.01, (np.mean(excluding), np.mean(plain))


def test_selective_filter_far_from_the_query_still_fills_k():
    """Only 60 items far from the query qualify and the exact subset path is off: the code scan
    must keep fetching until it has k of them."""
    x, labels = topic_mixture(3_000, 32, topics=40, seed=10)
    ids = [f"i{j}" for j in range(len(x))]
    index = PQIndex(32, rerank=30, filtered_exact_max=0)
    index.upsert(ids, x)
    assert index.approximate
    q = x[:5].mean(axis=0)
    far_rows = np.argsort(x.astype(np.float64) @ q)[:60]
    allowed = {ids[j] for j in far_rows}
    got = index.search(q, 40, allowed=allowed)
    assert len(got) == 40 and {i for i, _ in got} <= allowed
    want = [ids[j] for j in far_rows[np.argsort(-(x[far_rows].astype(np.float64) @ q))][:40]]
    assert [i for i, _ in got] == want  # re-ranked exactly among every qualifying candidate
    assert len(index.search(q, 100, allowed=allowed)) == 60


def test_dead_codes_are_skipped_then_compacted(tmp_path):
    x, _ = topic_mixture(2_000, 16, topics=30, seed=11)
    ids = [f"i{j}" for j in range(len(x))]
    index = PQIndex(16, rerank=50)
    index.upsert(ids, x)
    index.remove(ids[:100])  # 5 % of the codes: left in place, skipped
    index.upsert(ids[100:150], x[1_000:1_050])  # replacements: 50 more dead codes
    assert index.dead_codes == 150 and index._codes.ntotal == 2_050
    q = x[1_000]
    hits = index.search(q, 2_000)
    assert len(hits) == 1_900 and not {i for i, _ in hits} & set(ids[:100])
    assert [i for i, _ in hits[:2]] in (["i100", "i1000"], ["i1000", "i100"])  # i100 now holds x[1000]
    index.save(tmp_path / "pq")
    back = load_index(tmp_path / "pq")
    assert back.dead_codes == 150 and back.search(q, 50) == index.search(q, 50)
    index.remove(ids[150:300])  # past 10 % dead: re-encoded without the dead codes
    assert index.dead_codes == 0 and index._codes.ntotal == len(index) == 1_750
    assert index.search(q, 1)[0][0] in ("i100", "i1000")
    assert len(index.search(q, 2_000)) == 1_750


def test_auto_is_exact_up_to_the_threshold_then_pq_and_back():
    config = RetrievalConfig(index="auto", exact_max_items=1_000, pq_rerank=4_000)
    index = create_index(config, 24)
    assert isinstance(index, PQIndex) and index.exact_max_items == 1_000 and index.rerank == 4_000
    x, _ = topic_mixture(1_600, 24, topics=20, seed=12)
    ids = [f"i{j}" for j in range(len(x))]
    index.upsert(ids[:1_000], x[:1_000])
    assert not index.approximate  # at the threshold: still exact
    index.upsert(ids[1_000:], x[1_000:])
    assert index.approximate and len(index) == 1_600
    q = x[7]
    want = [ids[j] for j in np.argsort(-(x.astype(np.float64) @ q))[:50]]
    assert [i for i, _ in index.search(q, 50)] == want  # re-ranking every code: exact
    index.remove(ids[:700])
    assert index.approximate and len(index) == 900  # hysteresis: back to exact only at half the threshold
    index.remove(ids[700:1_200])
    assert not index.approximate and len(index) == 400
    want = [ids[1_200 + j] for j in np.argsort(-(x[1_200:].astype(np.float64) @ q))[:50]]
    assert [i for i, _ in index.search(q, 50)] == want


def test_codebooks_retrained_when_the_catalog_grows_4x():
    x, _ = topic_mixture(4_000, 16, topics=30, seed=13)
    ids = [f"i{j}" for j in range(len(x))]
    index = PQIndex(16)
    index.upsert(ids[:800], x[:800])
    first = index._codes
    index.upsert(ids[800:3_000], x[800:3_000])
    assert index._codes is first  # < 4x: codes added with the same codebooks
    index.upsert(ids[3_000:], x[3_000:])
    assert index._codes is not first and index._trained_at == 4_000 and index._codes.ntotal == 4_000


def test_factory_and_config():
    assert RetrievalConfig().index == "auto"
    assert default_subquantizers(384) == 192 and default_subquantizers(15) == 5 and default_subquantizers(7) == 1
    assert isinstance(create_index("flat", 4), FlatIndex)
    assert isinstance(create_index(RetrievalConfig(index="flat"), 4), FlatIndex)
    auto = create_index("auto", 4)
    assert isinstance(auto, PQIndex) and auto.exact_max_items == RetrievalConfig().exact_max_items
    pq = create_index(RetrievalConfig(index="pq", pq_rerank=300, pq_subquantizers=2, exact_max_items=10), 4)
    assert (type(pq), pq.rerank, pq.subquantizers, pq.exact_max_items) == (PQIndex, 300, 2, 0)
    ivf = create_index(RetrievalConfig(index="ivf", ivf_nlist=32, ivf_nprobe=4), 4)
    assert (type(ivf), ivf.nlist, ivf.nprobe, ivf.exact_max_items) == (IVFIndex, 32, 4, 0)
    with pytest.raises(ValueError, match="must divide"):
        PQIndex(10, subquantizers=3)
    with pytest.raises(ValueError, match="unknown index type"):
        create_index("hnsw", 4)
    with pytest.raises(InvalidArgument, match="index"):
        load_config(overrides={("retrieval", "index"): "hnsw"}, environ={})
    with pytest.raises(InvalidArgument, match="pq_rerank"):
        load_config(overrides={("retrieval", "pq_rerank"): 0}, environ={})


def test_rebuild_in_a_worker_thread_keeps_answering_and_loses_no_change():
    """With `train_inline` off, training waits for `rebuild`, which a worker thread runs: while it
    builds, searches are answered (right) from the old codes and changes are accepted; at the swap
    every change made meanwhile is in the new codes. The build is held mid-way with events, so
    the interleaving is certain, not timed."""
    x, _ = topic_mixture(6_000, 32, topics=40, seed=15)
    ids = [f"i{j}" for j in range(len(x))]
    index = PQIndex(32, rerank=10_000)  # re-ranks every code: results must equal brute force
    index.train_inline = False
    model: dict[str, np.ndarray] = {}

    def upsert(rows, vector_rows=None):
        vector_rows = rows if vector_rows is None else vector_rows
        index.upsert([ids[j] for j in rows], x[vector_rows])
        model.update({ids[j]: x[v] for j, v in zip(rows, vector_rows)})

    def check(queries):
        names = sorted(model)
        matrix = np.stack([model[i] for i in names]).astype(np.float64)
        for q in queries:
            got = index.search(q, 10_000)
            assert len(got) == len(model) == len({i for i, _ in got})  # every live id, once
            want = [names[j] for j in np.argsort(-(matrix @ q), kind="stable")[:20]]
            assert [i for i, _ in got[:20]] == want

    queries = [x[j] for j in (3, 1_500, 4_500)]
    upsert(range(1_000))
    assert not index.approximate and index.rebuild_due() and index.trainings == 0  # waits
    assert index.rebuild() == "train" and index.approximate and index.trainings == 1
    upsert(range(1_000, 4_000))  # 4x the trained size: retraining is due, old codebooks encode meanwhile
    assert index.rebuild_due() and index.trainings == 1
    old_codes = index._codes

    reached, release, result = threading.Event(), threading.Event(), []

    def hold():
        reached.set()
        assert release.wait(120)

    worker = threading.Thread(target=lambda: result.append(index.rebuild(before_swap=hold)))
    worker.start()
    try:
        assert reached.wait(120)
        assert not index.rebuild_due() and index._codes is old_codes  # building; the old codes answer
        check(queries)
        upsert(range(4_000, 5_000))  # new ids
        upsert(range(0, 100), range(5_000, 5_100))  # new vectors for ids the build has encoded
        index.remove([ids[j] for j in range(100, 300)])
        for j in range(100, 300):
            model.pop(ids[j])
        check(queries)  # mid-build changes visible at once, through the old codes
    finally:
        release.set()
        worker.join()
    assert result == ["train"] and index.trainings == 2 and index._trained_at == 4_000
    assert index._codes is not old_codes and index.dead_codes == 300  # 100 replaced + 200 removed
    check(queries)  # nothing lost in the swap
    small = PQIndex(32, rerank=10_000)
    assert small.rebuild() is None and not small.rebuild_due()  # nothing to do

    index.remove([ids[j] for j in range(300, 1_000)])  # dead codes past 10 %: compaction is due
    for j in range(300, 1_000):
        model.pop(ids[j])
    assert index.rebuild_due() and index.rebuild() == "compact"
    assert index.dead_codes == 0 and index.trainings == 2 and index._codes.ntotal == len(index)
    check(queries)

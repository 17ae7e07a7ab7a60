"""`IVFIndex` (the optional IVF-Flat index, `index: ivf`) beyond the conformance suite: recall
against brute force on clustered 384-d data (the kind of data IVF suits; on topic mixtures the PQ
index is the default, see test_index_pq.py), filters on the approximate path, switching between
exact and IVF search by size, and lists that follow the catalog size.

Recall is measured against numpy brute force on the same vectors; the data are seeded clusters
(unit vectors around random centres, a third of them mixed with a second centre) and queries look
like user profiles (the normalised mean of a few items from one to three clusters)."""

from __future__ import annotations

import numpy as np
import pytest

from tastemaker.config import RetrievalConfig
from tastemaker.retrieval.ann import IVFIndex, auto_nlist
from tastemaker.retrieval.index import FlatIndex, create_index


def clustered(n: int, d: int, clusters: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    labels = rng.integers(0, clusters, n)
    second = rng.integers(0, clusters, n)
    mix = np.where(rng.random(n) < 0.3, rng.uniform(0.2, 0.8, n), 0.0).astype(np.float32)
    x = centres[labels] + mix[:, None] * centres[second] + rng.standard_normal((n, d)).astype(np.float32) / np.sqrt(d)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), labels


def profile_queries(x: np.ndarray, labels: np.ndarray, count: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        chosen = rng.choice(labels, size=rng.integers(1, 4))
        rows = np.concatenate([rng.choice(np.flatnonzero(labels == c), size=5) for c in chosen])
        q = x[rows].mean(axis=0)
        out.append(q / np.linalg.norm(q))
    return np.stack(out).astype(np.float32)


def recall(got: list[tuple[str, float]], want: list[str]) -> float:
    return len({i for i, _ in got} & set(want)) / len(want)


@pytest.fixture(scope="module")
def catalog():
    """20k clustered 384-d items in a trained IVF index (default parameters) and an exact one."""
    x, labels = clustered(20_000, 384, clusters=40, seed=5)
    ids = [f"i{j}" for j in range(len(x))]
    ivf = create_index(RetrievalConfig(index="ivf"), 384)
    ivf.upsert(ids, x)
    flat = FlatIndex(384)
    flat.upsert(ids, x)
    return ids, x, labels, ivf, flat


def test_recall_at_100_against_brute_force(catalog):
    ids, x, labels, ivf, flat = catalog
    assert isinstance(ivf, IVFIndex) and ivf.approximate
    assert ivf.lists == auto_nlist(20_000) == 256 and ivf.nprobe == RetrievalConfig().ivf_nprobe
    queries = profile_queries(x, labels, 40, seed=6)
    recalls = []
    x64 = x.astype(np.float64)
    for q in queries:
        scores = x64 @ q.astype(np.float64)
        best = np.argsort(-scores)[:100]
        want = [ids[j] for j in best]
        exact = flat.search(q, 100)  # the exact index agrees with float64 brute force, up to rounding
        np.testing.assert_allclose([s for _, s in exact], scores[best], atol=1e-5)
        assert recall(exact, want) >= 0.99
        recalls.append(recall(ivf.search(q, 100), want))
    assert np.mean(recalls) >= 0.95, np.mean(recalls)
    assert min(recalls) >= 0.8, min(recalls)


def test_probing_fewer_lists_really_is_approximate(catalog):
    """Guards the recall test: one probed list must lose neighbours, or the data would be too easy."""
    ids, x, labels, ivf, flat = catalog
    queries = profile_queries(x, labels, 20, seed=7)
    one_list = IVFIndex(384, nprobe=1)
    one_list._ivf, one_list._trained_at = ivf._ivf, ivf._trained_at  # share the trained lists
    one_list._matrix, one_list._ids, one_list._slot_of = ivf._matrix, ivf._ids, ivf._slot_of
    recalls = [recall(one_list.search(q, 100), [i for i, _ in flat.search(q, 100)]) for q in queries]
    assert np.mean(recalls) < 0.9


def test_recall_with_exclude_seen_and_filters(catalog):
    ids, x, labels, ivf, flat = catalog
    rng = np.random.default_rng(8)
    queries = profile_queries(x, labels, 20, seed=9)
    # A broad filter (about 30 % of the catalog) goes through the FAISS bitmap selector ...
    broad = {ids[j] for j in np.flatnonzero(rng.random(len(ids)) < 0.3)}
    # ... a narrow one (500 ids) is scored exactly.
    narrow = set(rng.choice(ids, size=500, replace=False))
    for allowed in (None, broad, narrow):
        recalls = []
        for q in queries:
            seen = {ids[j] for j in np.argsort(-(x @ q))[:50:2]}  # 25 of the user's best matches
            want = [i for i, _ in flat.search(q, 100, allowed=allowed, excluded=seen)]
            got = ivf.search(q, 100, allowed=allowed, excluded=seen)
            assert len(got) == 100
            assert not seen & {i for i, _ in got}
            assert allowed is None or {i for i, _ in got} <= allowed
            recalls.append(recall(got, want))
        assert np.mean(recalls) >= 0.95, (None if allowed is None else len(allowed), np.mean(recalls))
        if allowed is narrow:
            assert recalls == [1.0] * len(recalls)


def test_selective_filter_far_from_the_query_still_fills_k():
    """Only items of one distant cluster qualify: the probes nearest the query hold none of them,
    so the search must widen until it has k (with the exact subset path switched off)."""
    x, labels = clustered(4_000, 32, clusters=16, seed=10)
    ids = [f"i{j}" for j in range(len(x))]
    index = IVFIndex(32, nlist=32, nprobe=1, filtered_exact_max=0)
    index.upsert(ids, x)
    assert index.approximate
    q = x[np.flatnonzero(labels == 0)[:5]].mean(axis=0)
    far = int(np.argmin([(x[labels == c].mean(axis=0) @ q) for c in range(16)]))
    allowed = {ids[j] for j in np.flatnonzero(labels == far)[:60]}
    got = index.search(q, 40, allowed=allowed)
    assert len(got) == 40 and {i for i, _ in got} <= allowed
    scores = {ids[j]: float(x[j] @ q) for j in range(len(x))}
    best = sorted(allowed, key=lambda i: -scores[i])[:40]
    assert recall(got, best) >= 0.9
    assert len(index.search(q, 100, allowed=allowed)) == 60


def test_exact_up_to_the_threshold_then_ivf_and_back():
    index = IVFIndex(24, nlist=16, nprobe=16, exact_max_items=1_000)
    x, _ = clustered(1_600, 24, clusters=8, seed=11)
    ids = [f"i{j}" for j in range(len(x))]
    index.upsert(ids[:1_000], x[:1_000])
    assert not index.approximate  # at the threshold: still exact
    index.upsert(ids[1_000:], x[1_000:])
    assert index.approximate and index.lists == 16 and len(index) == 1_600
    # Probing every list, answers equal brute force over the whole catalog.
    q = x[7]
    want = [ids[j] for j in np.argsort(-(x @ q))[:50]]
    assert [i for i, _ in index.search(q, 50)] == want
    index.remove(ids[:700])
    assert index.approximate and len(index) == 900  # hysteresis: back to exact only at half the threshold
    index.remove(ids[700:1_200])
    assert not index.approximate and len(index) == 400
    want = [ids[1_200 + j] for j in np.argsort(-(x[1_200:].astype(np.float64) @ q))[:50]]
    assert [i for i, _ in index.search(q, 50)] == want


def test_lists_follow_catalog_size():
    assert [auto_nlist(n) for n in (10, 700, 3_000, 50_000, 1_000_000, 4_000_000)] == [16, 16, 64, 512, 2048, 4096]
    index = IVFIndex(8, nprobe=4)
    x, _ = clustered(12_000, 8, clusters=8, seed=12)
    ids = [f"i{j}" for j in range(len(x))]
    index.upsert(ids[:700], x[:700])
    assert index.lists == 16
    index.upsert(ids[700:2_000], x[700:2_000])
    assert index.lists == 16  # grown < 4x: same lists, vectors added incrementally
    index.upsert(ids[2_000:3_000], x[2_000:3_000])
    assert index.lists == 64  # 3000 ≥ 4 x 700: retrained for the new size
    index.upsert(ids[3_000:], x[3_000:])
    assert index.lists == 256 and len(index) == 12_000
    index.remove(ids[2_000:])
    assert index.lists == 32  # shrunk 6x: retrained smaller
    assert len(index.search(x[0], 2_000)) == 2_000

"""Conformance suite for `VectorIndex`: every implementation must pass every test here.

Implementations under test:
- `flat`: the exact `FlatIndex`;
- `auto`: what `create_index("auto")` builds; at this size it searches exactly;
- `pq-exhaustive`: a trained `PQIndex` re-ranking every code's vector, so its answers must equal
  brute force exactly (this checks that the FAISS codes and the node -> slot map stay in step with
  upserts, replacements and removes);
- `pq`: a trained `PQIndex` re-ranking only 20 candidates and filtering on the scan (never the
  exact subset path), so the guarantees must hold on the approximate path itself;
- `ivf-exhaustive` / `ivf`: the same two for `IVFIndex` (every list probed / 1 list of 8, filters
  through FAISS selectors).

Expected answers come from numpy brute force over a plain dict of the vectors, never from the code
under test. Approximate-only properties (recall, switching by size) are in test_index_ivf.py."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tastemaker.retrieval.ann import IVFIndex, PQIndex
from tastemaker.retrieval.index import FlatIndex, create_index, load_index

D = 16
N = 700  # enough for the approximate variants to train (PQ: 16 x 39 = 624 vectors)


def _unit_rows(n: int, d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((6, d))
    m = centres[rng.integers(0, 6, n)] + 0.6 * rng.standard_normal((n, d))
    return (m / np.linalg.norm(m, axis=1, keepdims=True)).astype(np.float32)


IMPLEMENTATIONS = {
    "flat": (lambda d: FlatIndex(d), True),
    "auto": (lambda d: create_index("auto", d), True),
    "pq-exhaustive": (lambda d: PQIndex(d, rerank=10_000), True),
    "pq": (lambda d: PQIndex(d, rerank=20, filtered_exact_max=0), False),
    "ivf-exhaustive": (lambda d: IVFIndex(d, nlist=8, nprobe=8), True),
    "ivf": (lambda d: IVFIndex(d, nlist=8, nprobe=1, filtered_exact_max=0), False),
}


@pytest.fixture(params=list(IMPLEMENTATIONS))
def impl(request):
    """(name, factory, exact): `exact` says the results must equal brute force."""
    factory, exact = IMPLEMENTATIONS[request.param]
    return request.param, factory, exact


class Model:
    """The reference: a dict of vectors and brute-force search."""

    def __init__(self):
        self.vectors: dict[str, np.ndarray] = {}

    def upsert(self, ids, matrix):
        for item_id, v in zip(ids, matrix):
            self.vectors[item_id] = np.asarray(v, dtype=np.float32)

    def remove(self, ids):
        for item_id in ids:
            self.vectors.pop(item_id, None)

    def qualifying(self, allowed=None, excluded=None):
        return [
            i for i in self.vectors if (allowed is None or i in allowed) and not (excluded and i in excluded)
        ]

    def search(self, query, k, allowed=None, excluded=None):
        ids = self.qualifying(allowed, excluded)
        if not ids:
            return [], {}
        scores = np.stack([self.vectors[i] for i in ids]).astype(np.float64) @ np.asarray(query, np.float64)
        order = np.argsort(-scores, kind="stable")[:k]
        return [ids[j] for j in order], {ids[j]: float(scores[j]) for j in range(len(ids))}


def check(index, model, query, k, allowed=None, excluded=None, exact=True):
    """Assert every `VectorIndex.search` guarantee against the model; returns the result ids."""
    got = index.search(query, k, allowed=allowed, excluded=excluded)
    want, true_scores = model.search(query, k, allowed, excluded)
    ids = [g[0] for g in got]
    qualifying = set(model.qualifying(allowed, excluded))
    # Exactly min(k, qualifying) results, distinct, all qualifying.
    assert len(got) == min(k, len(qualifying)), (len(got), k, len(qualifying))
    assert len(set(ids)) == len(ids)
    assert set(ids) <= qualifying
    # Scores are the true inner products of the stored vectors, best first.
    np.testing.assert_allclose([g[1] for g in got], [true_scores[i] for i in ids], atol=1e-5)
    assert all(a[1] >= b[1] - 1e-6 for a, b in zip(got, got[1:]))
    if exact:
        assert ids == want
    return ids


@pytest.fixture
def loaded(impl):
    name, factory, exact = impl
    ids = [f"it{i}" for i in range(N)]
    matrix = _unit_rows(N, D, seed=11)
    index = factory(D)
    index.upsert(ids, matrix)
    model = Model()
    model.upsert(ids, matrix)
    if name.startswith("ivf"):
        assert index.approximate and index.lists == 8  # the FAISS path is really under test
    if name.startswith("pq"):
        assert index.approximate
    return index, model, exact


def _queries(n=6, seed=12):
    return _unit_rows(n, D, seed)


def test_empty_index(impl):
    _, factory, _ = impl
    index = factory(D)
    assert len(index) == 0
    assert "a" not in index
    assert index.search(np.ones(D, dtype=np.float32), 5) == []
    assert index.search(np.ones(D, dtype=np.float32), 5, allowed={"a"}, excluded={"b"}) == []
    assert index.vector("a") is None
    assert index.vectors([]).shape == (0, D)
    index.remove(["a"])  # unknown ids are ignored
    index.upsert([], np.zeros((0, D), dtype=np.float32))
    assert len(index) == 0


def test_search_matches_brute_force(loaded):
    index, model, exact = loaded
    assert len(index) == N
    for query in _queries():
        for k in (1, 10, 50):
            check(index, model, query, k, exact=exact)
    assert index.search(_queries()[0], 0) == []


def test_k_larger_than_the_set_returns_everything(loaded):
    index, model, exact = loaded
    query = _queries()[1]
    ids = check(index, model, query, N + 50, exact=exact)
    assert sorted(ids) == sorted(model.vectors)


def test_allowed_restricts_results(loaded):
    index, model, exact = loaded
    allowed = {f"it{i}" for i in range(0, N, 7)} | {"ghost"}
    for query in _queries(3, seed=13):
        check(index, model, query, 10, allowed=allowed, exact=exact)
        ids = check(index, model, query, 500, allowed=allowed, exact=exact)  # more than qualify
        assert len(ids) == len(allowed) - 1
    assert index.search(_queries()[0], 10, allowed={"ghost"}) == []
    assert index.search(_queries()[0], 10, allowed=set()) == []


def test_excluded_never_returned(loaded):
    index, model, exact = loaded
    query = _queries(1, seed=14)[0]
    top = [i for i, _ in index.search(query, 5)]
    excluded = set(top[:3]) | {"not-in-index"}
    ids = check(index, model, query, 5, excluded=excluded, exact=exact)
    assert not excluded & set(ids)
    ids = check(index, model, query, N, excluded=excluded, exact=exact)
    assert len(ids) == N - 3


def test_allowed_and_excluded_together(loaded):
    index, model, exact = loaded
    query = _queries(1, seed=15)[0]
    allowed = {f"it{i}" for i in range(40)}
    excluded = {f"it{i}" for i in range(0, 40, 2)}
    ids = check(index, model, query, 50, allowed=allowed, excluded=excluded, exact=exact)
    assert len(ids) == 20  # only 20 ids qualify
    check(index, model, query, 7, allowed=allowed, excluded=excluded, exact=exact)


def test_upsert_replaces_vector(loaded):
    index, model, exact = loaded
    new = _queries(1, seed=17)[0]
    old = model.vectors["it5"].copy()
    index.upsert(["it5"], new.reshape(1, -1))
    model.upsert(["it5"], [new])
    assert len(index) == N
    got = index.search(new, 3)
    assert got[0][0] == "it5" and got[0][1] == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_allclose(index.vector("it5"), new, atol=1e-7)
    # The old vector is gone: it5 appears once, scored with its new vector.
    hits = index.search(old, N)
    assert [i for i, _ in hits].count("it5") == 1
    assert dict(hits)["it5"] == pytest.approx(float(new @ old), abs=1e-5)
    check(index, model, old, 20, exact=exact)


def test_repeated_id_in_one_batch_last_wins(impl):
    _, factory, _ = impl
    index = factory(3)
    index.upsert(["a", "b", "a"], np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=np.float32))
    assert len(index) == 2
    np.testing.assert_allclose(index.vector("a"), [0, 0, 1])
    assert index.search(np.array([1, 0, 0], dtype=np.float32), 5)[0][1] == pytest.approx(0.0, abs=1e-7)


def test_remove_and_re_add(loaded):
    index, model, exact = loaded
    query = model.vectors["it10"]
    assert index.search(query, 1)[0][0] == "it10"
    index.remove(["it10", "unknown", "it11"])
    model.remove(["it10", "it11"])
    assert len(index) == N - 2
    assert "it10" not in index and "it12" in index
    assert index.vector("it10") is None
    ids = check(index, model, query, N, exact=exact)
    assert "it10" not in ids and len(ids) == N - 2
    check(index, model, query, 5, exact=exact)
    # A freed slot is reused by a new id; the removed ids stay gone.
    fresh = _queries(2, seed=18)
    index.upsert(["new1", "it10"], fresh)
    model.upsert(["new1", "it10"], fresh)
    assert len(index) == N
    assert index.search(fresh[0], 1)[0][0] == "new1"
    assert index.search(fresh[1], 1)[0][0] == "it10"
    check(index, model, query, N, exact=exact)


def test_vectors_in_requested_order(loaded):
    index, model, _ = loaded
    got = index.vectors(["it3", "it1", "it3"])
    np.testing.assert_array_equal(got, np.stack([model.vectors["it3"], model.vectors["it1"], model.vectors["it3"]]))
    got[0] = 0.0  # a copy: callers cannot corrupt the index
    np.testing.assert_array_equal(index.vector("it3"), model.vectors["it3"])
    with pytest.raises(KeyError):
        index.vectors(["it1", "ghost"])


def test_dimension_mismatch_errors(impl):
    _, factory, _ = impl
    index = factory(D)
    with pytest.raises(ValueError, match="dimension 16"):
        index.upsert(["a"], np.ones((1, D + 1), dtype=np.float32))
    with pytest.raises(ValueError, match="expected 2 vectors"):
        index.upsert(["a", "b"], np.ones((3, D), dtype=np.float32))
    index.upsert(["a"], np.ones((1, D), dtype=np.float32) / 4)
    with pytest.raises(ValueError, match="dimension"):
        index.search(np.ones(D - 1, dtype=np.float32), 3)
    assert len(index) == 1


def test_random_operations_against_the_model(impl):
    """Random interleaved upserts, replacements and removes; every search checked against the model."""
    name, factory, exact = impl
    rng = np.random.default_rng(21)
    index, model = factory(D), Model()
    pool = [f"x{i}" for i in range(900)]
    for step in range(12):
        ids = list(rng.choice(pool, size=150, replace=False))
        matrix = _unit_rows(150, D, seed=100 + step)
        index.upsert(ids, matrix)
        model.upsert(ids, matrix)
        gone = list(rng.choice(pool, size=40, replace=False))
        index.remove(gone)
        model.remove(gone)
        assert len(index) == len(model.vectors)
        assert all(i in index for i in model.vectors)
        query = _unit_rows(1, D, seed=200 + step)[0]
        excluded = set(rng.choice(pool, size=30, replace=False))
        allowed = set(rng.choice(pool, size=300, replace=False))
        check(index, model, query, 25, excluded=excluded, exact=exact)
        check(index, model, query, 25, allowed=allowed, excluded=excluded, exact=exact)
        check(index, model, query, 2000, exact=exact)
    if name.startswith(("ivf", "pq")):
        assert index.approximate


def test_save_load_roundtrip(loaded, tmp_path):
    index, model, exact = loaded
    index.remove(["it1", "it2", "it3"])  # leave free slots in the saved matrix
    model.remove(["it1", "it2", "it3"])
    index.save(tmp_path / "idx")
    manifest = json.loads((tmp_path / "idx" / "manifest.json").read_text())
    assert manifest["kind"] == index.kind and manifest["count"] == N - 3
    assert not list((tmp_path / "idx").glob("*.pkl"))
    back = load_index(tmp_path / "idx")
    assert type(back) is type(index)
    assert len(back) == N - 3 and "it1" not in back and "it4" in back
    assert getattr(back, "approximate", False) == getattr(index, "approximate", False)
    allowed = {f"it{i}" for i in range(0, N, 3)}
    for query in _queries(4, seed=19):
        for kwargs in ({}, {"excluded": {"it4", "it7"}}, {"allowed": allowed}):
            assert back.search(query, 30, **kwargs) == index.search(query, 30, **kwargs)
    np.testing.assert_array_equal(back.vectors(["it4", "it599"]), index.vectors(["it4", "it599"]))
    # The loaded index keeps working: new ids fill the free slots and are found.
    fresh = _queries(1, seed=20)
    back.upsert(["brand-new"], fresh)
    model.upsert(["brand-new"], fresh)
    assert back.search(fresh[0], 1)[0][0] == "brand-new"
    check(back, model, fresh[0], N, exact=exact)
    # Saving again over the same folder replaces it.
    back.save(tmp_path / "idx")
    assert len(load_index(tmp_path / "idx")) == N - 2


def test_load_errors(impl, tmp_path):
    _, factory, _ = impl
    with pytest.raises(FileNotFoundError):
        load_index(tmp_path / "nothing-here")
    index = factory(D)
    index.upsert(["a"], np.ones((1, D), dtype=np.float32))
    index.save(tmp_path / "one")
    other = IVFIndex if isinstance(index, FlatIndex) else FlatIndex
    with pytest.raises(ValueError, match="holds a"):
        other.load(tmp_path / "one")
    assert type(index).load(tmp_path / "one").search(np.ones(D, dtype=np.float32), 1)[0][0] == "a"
    (tmp_path / "one" / "manifest.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError, match="manifest"):
        load_index(tmp_path / "one")

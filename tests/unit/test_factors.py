"""Matrix factorisation signal (`tastemaker.retrieval.factors`): ALS item factors from `implicit`,
users folded in per request, inside the graph artefact and the ranking."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from tastemaker.config import EventWeights, RetrievalConfig
from tastemaker.domain import CandidateSource, EventType, HistoryEntry, Item, ProfileView, RecommendQuery, UserEvent
from tastemaker.retrieval.collaborative import InteractionGraph, graph_params
from tastemaker.retrieval.factors import FactorModel, FactorParams, PairCollector
from tastemaker.retrieval.ranking import Retriever

PARAMS = FactorParams(factors=2, regularization=1.0, alpha=10.0, iterations=10, seed=0)


def _two_tastes(n_users: int = 60, seed: int = 0) -> list[UserEvent]:
    """Half the users consume only items a0..a9, the other half only b0..b9."""
    rng = np.random.default_rng(seed)
    events, n = [], 0
    for u in range(n_users):
        group = "a" if u % 2 == 0 else "b"
        for t, i in enumerate(rng.choice(10, size=8, replace=False)):
            events.append(UserEvent(event_id=f"e{n}", user_id=f"u{u}", event_type=EventType.CLICK, item_id=f"{group}{i}", event_time=float(n)))
            n += 1
    return events


def _hist(*items: str) -> list[HistoryEntry]:
    return [HistoryEntry(item_id=i, event_type=EventType.CLICK, weight=0.5, value=0.0, event_time=0.0) for i in items]


def _fit(events, params=PARAMS) -> FactorModel:
    pairs = PairCollector()
    for e in events:
        pairs.add(e.user_id, e.item_id)
    model = FactorModel.fit(pairs, params)
    assert model is not None
    return model


def test_the_fold_in_is_implicits_own_user_step():
    from implicit.cpu.als import AlternatingLeastSquares

    rng = np.random.default_rng(1)
    dense = (rng.random((30, 25)) < 0.2).astype(np.float32)
    dense[:, 0] = 1.0  # no empty user
    matrix = sp.csr_matrix(dense * PARAMS.alpha)
    reference = AlternatingLeastSquares(
        factors=PARAMS.factors, regularization=PARAMS.regularization, alpha=1.0,
        iterations=PARAMS.iterations, use_cg=False, random_state=0, num_threads=1,
    )
    reference.fit(matrix, show_progress=False)
    model = FactorModel([f"i{j}" for j in range(25)], np.asarray(reference.item_factors), PARAMS)
    for user in range(5):
        consumed = [f"i{j}" for j in np.nonzero(dense[user])[0]]
        expected = np.asarray(reference.recalculate_user(user, matrix[user])).ravel()
        np.testing.assert_allclose(model.user_vector(consumed), expected, rtol=1e-3, atol=1e-4)


def test_a_new_user_is_matched_to_the_taste_of_their_items():
    model = _fit(_two_tastes())
    user = model.user_vector(["a1", "a2", "a3"])  # never seen by the fit as a user
    top = model.top(user, 5, eligible=lambda i: i not in {"a1", "a2", "a3"})
    assert len(top) == 5 and all(i.startswith("a") for i, _ in top)
    scores = model.scores(user, ["a4", "b4", "unknown"])
    assert scores[0] > scores[1] and scores[2] == 0.0
    # Repeats count once, unknown items are skipped, nothing known gives no vector.
    np.testing.assert_allclose(model.user_vector(["a1", "a2", "a3", "a1", "zzz"]), user)
    assert model.user_vector(["zzz"]) is None
    # The history item that explains a candidate comes from the same taste.
    anchors = model.anchors(["a4", "b4"], ["b9", "a1"])
    assert anchors["a4"] == "a1" and anchors["b4"] == "b9"


def test_top_respects_filters_and_deletions():
    model = _fit(_two_tastes())
    user = model.user_vector(["a1", "a2"])
    only_b = model.top(user, 3, eligible=lambda i: i.startswith("b"))
    assert len(only_b) == 3 and all(i.startswith("b") for i, _ in only_b)  # looks further down
    best = model.top(user, 1, eligible=lambda i: True)[0][0]
    model.forget_items([best])
    assert best not in [i for i, _ in model.top(user, 20, eligible=lambda i: True)]
    assert model.scores(user, [best])[0] == 0.0


def test_too_little_data_gives_no_model():
    pairs = PairCollector()
    pairs.add("u1", "a")
    pairs.add("u1", "b")
    assert FactorModel.fit(pairs, PARAMS) is None


def test_the_graph_fits_factors_on_consumption_and_keeps_them_through_serialisation():
    config = RetrievalConfig(factors=2, factor_regularization=1.0, factor_iterations=10)
    params = graph_params(config)
    events = _two_tastes()
    # A dislike is not consumption: it must not make d0 part of anybody's taste.
    events.append(UserEvent(event_id="x", user_id="u0", event_type=EventType.DISLIKE, item_id="d0", event_time=1e6))
    graph = InteractionGraph(params, EventWeights()).fit(events)
    assert graph.factors is not None and "d0" not in graph.factors.row
    recent = _hist("a1", "a2", "a3")
    user = graph.factor_user(recent)
    loaded = InteractionGraph.from_bytes(graph.to_bytes(), params, EventWeights())
    np.testing.assert_allclose(loaded.factor_user(recent), user, rtol=1e-6)
    graph.forget_items(["a4"])
    reloaded = InteractionGraph.from_bytes(graph.to_bytes(), params, EventWeights())
    assert "a4" not in reloaded.factors.row
    # Turned off: no factors fitted or loaded.
    off = graph_params(RetrievalConfig(factors=0))
    assert InteractionGraph(off, EventWeights()).fit(events).factors is None
    assert InteractionGraph.from_bytes(graph.to_bytes(), off, EventWeights()).factors is None


def _unit(v):
    v = np.asarray(v, dtype=np.float32)
    return v / np.linalg.norm(v)


def _factors_only(**overrides) -> tuple[Retriever, RetrievalConfig, ProfileView]:
    """A retriever over the two-taste catalog that scores by the factors alone, and a newcomer
    who consumed a1 and a2."""
    config = RetrievalConfig(
        factors=2, factor_regularization=1.0, factor_iterations=10, factor_weight=1.0, profile_weight=0.0,
        sequential_weight=0.0, collaborative_weight=0.0, popularity_weight=0.0, trending_weight=0.0,
        exploration_slots=0, **overrides,
    )
    retriever = Retriever(config, InteractionGraph(graph_params(config), EventWeights()).fit(_two_tastes()))
    rng = np.random.default_rng(2)
    retriever.upsert([Item(item_id=f"{g}{i}", title=f"{g.upper()} film {i}", vector=_unit(rng.normal(size=8))) for g in "ab" for i in range(10)])
    return retriever, config, ProfileView(user_id="new", recent=_hist("a1", "a2"), seen_item_ids=["a1", "a2"])


def test_ranking_proposes_factor_matches_with_a_grounded_reason():
    retriever, config, profile = _factors_only()
    ranked = retriever.recommend(RecommendQuery(user_id="new", page_size=5), profile)
    assert [s.item_id[0] for s in ranked] == ["a"] * 5
    assert all(CandidateSource.FACTORS in s.sources for s in ranked)
    assert all(s.reason.startswith("people who share your taste for A film") for s in ranked)
    # With the weight at 0 the signal is neither proposed nor scored.
    retriever.config = config.model_copy(update={"factor_weight": 0.0})
    ranked = retriever.recommend(RecommendQuery(user_id="new", page_size=5), profile)
    assert not any(CandidateSource.FACTORS in s.sources for s in ranked)


def test_above_the_scan_limit_factors_only_rescore_other_candidates():
    retriever, _, profile = _factors_only(factor_scan_max_items=5)
    ranked = retriever.recommend(RecommendQuery(user_id="new", page_size=5), profile)
    assert not any(CandidateSource.FACTORS in s.sources for s in ranked)  # not a source any more
    assert [s.item_id[0] for s in ranked] == ["a"] * 5  # but still the score of the popular candidates

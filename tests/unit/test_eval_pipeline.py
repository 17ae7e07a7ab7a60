"""Tastemaker under evaluation (`tastemaker.evaluation.pipeline`): it must be the service's own
profile + graph + ranking path, and the weight search must find what it is asked to find."""

from __future__ import annotations

import numpy as np
import pytest

from tastemaker.config import ProfileConfig, RetrievalConfig
from tastemaker.domain import EventType, Item, RecommendQuery
from tastemaker.evaluation.baselines import TrainData
from tastemaker.evaluation.data import InteractionRow, build_interactions
from tastemaker.evaluation.pipeline import (
    ServiceEvents,
    TastemakerPipeline,
    _FrozenGraph,
    coordinate_search,
    item_alias,
    text_only,
    user_alias,
)
from tastemaker.profiles.state import ProfileState
from tastemaker.retrieval.collaborative import InteractionGraph, graph_params
from tastemaker.retrieval.ranking import Retriever


def _toy(seed: int = 0, n_items: int = 40, n_users: int = 25, dim: int = 16):
    rng = np.random.default_rng(seed)
    items = [Item(item_id=f"m{i}", title=f"Movie {i}", tags=[f"g{i % 4}"]) for i in range(n_items)]
    rows = []
    for u in range(n_users):
        for t, i in enumerate(rng.choice(n_items, size=12, replace=False)):
            rows.append(InteractionRow(f"u{u}", f"m{i}", float(u * 100 + t * 3600), float(rng.choice([1, 2, 3, 4, 5])), EventType.RATING))
    data = build_interactions("toy", items, rows, seed=seed)
    vectors = rng.normal(size=(n_items, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return data, vectors


def test_pipeline_is_the_service_path_applied_to_the_training_events():
    data, vectors = _toy()
    service = ServiceEvents(data, vectors)
    train = TrainData(data, np.arange(data.n_events - 30))
    retrieval, profiles = RetrievalConfig(), ProfileConfig()
    fitted = TastemakerPipeline(service, retrieval, profiles).fit(train, {})
    users = np.arange(data.n_users)
    ranked = fitted.recommend(users, 10)

    # The same thing built by hand from the service's classes, as a shard + replica would: the
    # graph as `tastemaker fit` learns it (matrix factors included), and its trending counts as a
    # replica holds them when this user asks, right after their last training event.
    states: dict[int, ProfileState] = {}
    graph = InteractionGraph(graph_params(retrieval), profiles.weights).fit(service.events[e] for e in train.events)
    assert graph.factors is not None
    for e in train.events:
        u = int(data.user[e])
        states.setdefault(u, ProfileState(user_id=user_alias(u))).apply(service.events[e], vectors[data.item[e]], int(e), profiles)
    retriever = Retriever(retrieval, graph)
    retriever.upsert(service.items)
    retriever.catalog.set_popularity({item_alias(i): int(c) for i, c in enumerate(train.popularity) if c})
    for u in users:
        until = train.events[: int(np.nonzero(data.user[train.events] == u)[0][-1]) + 1]
        then = InteractionGraph(graph_params(retrieval), profiles.weights).fit(service.events[e] for e in until)
        graph.trend, graph.trend_top = then.trend, then.trend_top
        expected = [s.item_id for s in retriever.recommend(RecommendQuery(user_id=user_alias(u), page_size=10), states[u].view())]
        got = [item_alias(i) for i in ranked[u] if i >= 0]
        assert got == expected
        assert not set(ranked[u].tolist()) & set(train.seen(int(u)).tolist())  # exclude-seen
        assert len(got) == 10


def test_text_only_ranks_by_cosine_to_the_decayed_profile():
    data, vectors = _toy(seed=1)
    service = ServiceEvents(data, vectors)
    train = TrainData(data, np.arange(data.n_events))
    fitted = text_only(service, RetrievalConfig(), ProfileConfig()).fit(train, {})
    assert fitted.retriever.graph is None
    for user in range(5):
        profile = fitted.profiles[user].vector
        seen = set(train.seen(user).tolist())
        expected = [i for i in np.argsort(-(vectors @ profile), kind="stable") if i not in seen][:5]
        assert fitted.recommend(np.array([user]), 5)[0].tolist() == expected


def test_the_frozen_graph_scores_exactly_like_the_service_graph():
    data, vectors = _toy(seed=2)
    service = ServiceEvents(data, vectors)
    profiles = ProfileConfig()
    params = graph_params(RetrievalConfig())
    plain = InteractionGraph(params, profiles.weights).fit(service.events)
    frozen = _FrozenGraph(params, profiles.weights).fit(service.events).freeze()
    state = ProfileState(user_id="x")
    for e in np.nonzero(data.user == 0)[0]:
        state.apply(service.events[e], vectors[data.item[e]], int(e), profiles)
    recent = state.view().recent
    for _ in range(2):  # the second call is served from the memo
        assert frozen.cooccurrence_scores(recent) == plain.cooccurrence_scores(recent)
        assert frozen.sequential_scores(recent, 3, 0.7) == plain.sequential_scores(recent, 3, 0.7)
        assert frozen.sequential_scores(recent, 3, 0.7, False) == plain.sequential_scores(recent, 3, 0.7, False)
    for item in service.items[:10]:
        assert frozen.trend_score(item.item_id) == pytest.approx(plain.trend_score(item.item_id))


def test_coordinate_search_climbs_a_separable_objective():
    target = {"a": 2.0, "b": 0.5}
    space = {"a": [0.0, 1.0, 2.0, 3.0], "b": [0.0, 0.5, 1.0]}
    best, value, trials = coordinate_search(
        lambda p: -((p["a"] - target["a"]) ** 2) - (p["b"] - target["b"]) ** 2, {"a": 0.0, "b": 0.0}, space
    )
    assert best == target and value == 0.0
    assert len(trials) == len({tuple(sorted(t["params"].items())) for t in trials})  # no trial twice


def test_coordinate_search_seeds_escape_a_plateau():
    # Only a = b = 0 scores: no single-coordinate move from (1, 1) can find it.
    objective = lambda p: 1.0 if p["a"] == 0 and p["b"] == 0 else 0.0  # noqa: E731
    space = {"a": [0, 1], "b": [0, 1]}
    stuck, value, _ = coordinate_search(objective, {"a": 1, "b": 1}, space)
    assert value == 0.0 and stuck == {"a": 1, "b": 1}
    found, value, _ = coordinate_search(objective, {"a": 1, "b": 1}, space, seeds=[{"a": 0, "b": 0}])
    assert value == 1.0 and found == {"a": 0, "b": 0}


def test_tuned_params_map_onto_the_service_configs_and_yaml_sections():
    from tastemaker.evaluation.pipeline import config_tree, configs_for, fit_key

    params = {"profile_weight": 0.5, "sequential_window": 2, "profiles.weights.rating_centre": 0.0}
    retrieval, profiles = configs_for(RetrievalConfig(), ProfileConfig(), params)
    assert retrieval.profile_weight == 0.5 and retrieval.sequential_window == 2
    assert profiles.weights.rating_centre == 0.0 and ProfileConfig().weights.rating_centre == 3.0
    assert fit_key(params) == (("profiles.weights.rating_centre", 0.0), ("sequential_window", 2))
    assert config_tree(params) == {
        "retrieval": {"profile_weight": 0.5, "sequential_window": 2},
        "profiles": {"weights": {"rating_centre": 0.0}},
    }
    with pytest.raises(Exception):
        configs_for(RetrievalConfig(), ProfileConfig(), {"sequential_decay": 2.0})  # validated like a file


def test_a_fit_field_changes_the_profiles():
    data, vectors = _toy(seed=3)
    service = ServiceEvents(data, vectors)
    train = TrainData(data, np.arange(data.n_events))
    method = TastemakerPipeline(service, RetrievalConfig(), ProfileConfig())
    default = method.fit(train, {})
    everything_liked = method.fit(train, {"profiles.weights.rating_centre": 0.0})
    user = 0
    assert default.profiles[user].negative_vector is not None  # 1-2 star ratings push away
    assert everything_liked.profiles[user].negative_vector is None


def test_the_learned_ranker_experiment_learns_which_signal_picks_the_next_item():
    from tastemaker.evaluation.experiments import LearnedRanker

    rng = np.random.default_rng(0)
    lists = []
    for _ in range(60):
        n = 12
        features = {"profile": rng.random(n), "sequential": rng.random(n), "popularity": rng.random(n)}
        target = int(np.argmax(features["sequential"]))  # the next item is always the best transition
        lists.append((LearnedRanker.matrix(features, n), target))
    ranker = LearnedRanker.fit(lists, l2=1e-4)
    weights = dict(zip(ranker.columns, ranker.weights))
    assert weights["sequential"] > abs(weights["popularity"]) and weights["sequential"] > abs(weights["profile"])
    features = {"profile": rng.random(8), "sequential": rng.random(8), "popularity": rng.random(8)}
    parts = ranker.parts(features, 8)
    assert set(parts) == {"profile", "sequential", "popularity"}
    np.testing.assert_allclose(sum(parts.values()), ranker.score(features, 8), atol=1e-9)
    assert int(np.argmax(ranker.score(features, 8))) == int(np.argmax(features["sequential"]))


def test_the_text_baseline_ranks_by_text_alone_without_exploration_slots():
    from tastemaker.evaluation.pipeline import text_only

    data, vectors = _toy(seed=5)
    baseline = text_only(ServiceEvents(data, vectors), RetrievalConfig(exploration_slots=3), ProfileConfig())
    assert baseline.retrieval.exploration_slots == 0 and baseline.use_graph is False


def test_trending_is_read_at_each_users_request_moment_never_from_later_events():
    items = [Item(item_id=f"m{i}", title=f"Movie {i}") for i in range(6)]
    rows = [InteractionRow("early", "m0", 0.0, 4.0, EventType.RATING), InteractionRow("early", "m1", 60.0, 4.0, EventType.RATING)]
    # After "early" stopped, m5 became the hit of the day.
    rows += [InteractionRow(f"fan{u}", "m5", 86_400.0 + u, 4.0, EventType.RATING) for u in range(8)]
    rows += [InteractionRow(f"fan{u}", "m2", 86_500.0 + u, 4.0, EventType.RATING) for u in range(8)]
    rows += [InteractionRow("late", "m3", 90_000.0, 4.0, EventType.RATING)]
    data = build_interactions("toy", items, rows, seed=0)
    vectors = np.eye(6, dtype=np.float32)
    service = ServiceEvents(data, vectors)
    index = {item.item_id: i for i, item in enumerate(data.items)}
    user = {name: i for i, name in enumerate(data.user_ids)}
    m5 = item_alias(index["m5"])

    def trend(fitted, name):
        graph = fitted.retriever.graph
        graph.at_moment(user[name])
        return graph.trend_score(m5)

    own_moment = TastemakerPipeline(service, RetrievalConfig(), ProfileConfig()).fit(TrainData(data, np.arange(data.n_events)), {})
    assert trend(own_moment, "early") == 0.0  # m5's run came after early's last event
    assert trend(own_moment, "late") == pytest.approx(1.0, rel=1e-3)  # about the top item when late asks
    shared = TastemakerPipeline(service, RetrievalConfig(), ProfileConfig()).fit(
        TrainData(data, np.arange(data.n_events), moment=1e6), {}
    )
    assert trend(shared, "early") == pytest.approx(1.0, rel=1e-3)  # one moment for all: after every event

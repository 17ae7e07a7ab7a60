"""Collaborative and sequential signals: known answers on hand-made logs, incremental == fit,
serialisation, the follower over a real SQLite store, and their use in ranking."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tastemaker.config import EventWeights, RetrievalConfig
from tastemaker.domain import CandidateSource, EventType, HistoryEntry, Item, ProfileView, RecommendQuery, UserEvent
from tastemaker.retrieval.collaborative import (
    GRAPH_ARTIFACT,
    GraphFollower,
    GraphParams,
    InteractionGraph,
    fit_graph,
)
from tastemaker.retrieval.ranking import Retriever
from tastemaker.store import open_store

W = EventWeights()


def _ev(user: str, item: str, t: float = 0.0, etype: EventType = EventType.CLICK, value: float = 0.0, n: int = 0):
    return UserEvent(event_id=f"{user}-{item}-{n}", user_id=user, event_type=etype, item_id=item, value=value, event_time=t)


def _graph(events, **params) -> InteractionGraph:
    return InteractionGraph(GraphParams(**params), W).fit(events)


def _hist(*items: str, etype: EventType = EventType.CLICK, weight: float = 0.5) -> list[HistoryEntry]:
    return [HistoryEntry(i, etype, 0.0, weight, float(n)) for n, i in enumerate(items)]


def test_transitions_are_counted_within_the_window_weighted_by_distance():
    g = _graph([_ev("u", i) for i in "abcd"], sequential_window=3)
    assert g.next_counts["a"] == pytest.approx({"b": 1.0, "c": 0.5, "d": 1 / 3})
    assert g.next_counts["b"] == pytest.approx({"c": 1.0, "d": 0.5})
    assert g.next_counts["c"] == {"d": 1.0} and "d" not in g.next_counts
    assert g.next_totals["a"] == pytest.approx(1 + 0.5 + 1 / 3)


def test_sequential_scores_blend_recent_items_with_decay_and_name_the_anchor():
    g = _graph([_ev("u", i) for i in "abcd"], sequential_window=3)
    scores = g.sequential_scores(_hist("b", "c"), history=2, decay=0.5)
    # c (age 0): d gets 1/1. b (age 1): scale 0.5 / 1.5: c gets 1/3, d gets 0.5 * 0.5 / 1.5.
    assert scores["d"][0] == pytest.approx(1 + 0.25 / 1.5) and scores["d"][1] == "c"
    assert scores["c"][0] == pytest.approx(0.5 / 1.5) and scores["c"][1] == "b"
    assert set(scores) == {"c", "d"}


def test_raw_transition_scores_favour_the_frequent_follower():
    # After "a": "b" followed 3 times (of 4 for a), "c" once. After "x": "c" once (of 1 for x).
    events = [_ev(f"u{k}", i, n=k) for k in range(3) for i in "ab"]
    events += [_ev("v", "a"), _ev("v", "c"), _ev("w", "x"), _ev("w", "c")]
    g = _graph(events, sequential_window=1)
    recent = _hist("x", "a")
    normalised = g.sequential_scores(recent, history=2, decay=1.0)
    raw = g.sequential_scores(recent, history=2, decay=1.0, normalise=False)
    # Probabilities: b = 3/4, c = 1/4 + 1/1. Raw counts: b = 3, c = 1 + 1.
    assert normalised["c"][0] == pytest.approx(1.25) and normalised["b"][0] == pytest.approx(0.75)
    assert raw["b"][0] == pytest.approx(3.0) and raw["c"][0] == pytest.approx(2.0)
    assert raw["b"][1] == "a" and raw["c"][1] in {"a", "x"}


def test_trend_top_is_kept_up_to_date_through_rescales_deletes_and_reloads():
    day = 86_400.0
    g = _graph([_ev("u", "a", t=0.0, n=k) for k in range(3)] + [_ev("u", "b", t=1.0)])
    assert g.trend_top == pytest.approx(max(g.trend.values())) and g.trend_score("a") == pytest.approx(1.0)
    g.forget_items(["a"])
    assert g.trend_top == pytest.approx(g.trend["b"]) and g.trend_score("b") == pytest.approx(1.0)
    g.observe(_ev("u", "c", t=1e5 * day))  # a rescale
    assert g.trend_top == pytest.approx(max(g.trend.values())) and g.trend_score("c") == pytest.approx(1.0)
    restored = InteractionGraph.from_bytes(g.to_bytes(), g.params, W)
    assert restored.trend_top == pytest.approx(g.trend_top)


def test_skips_and_dislikes_are_not_consumption_and_users_do_not_mix():
    g = _graph([_ev("u", "a"), _ev("u", "b", etype=EventType.SKIP), _ev("v", "c"), _ev("u", "d")])
    assert g.next_counts["a"] == {"d": 1.0}
    assert "c" not in g.next_counts.get("a", {})


def test_cooccurrence_is_cosine_normalised_and_only_from_liked_items():
    events = [
        _ev("u1", "x", etype=EventType.RATING, value=5), _ev("u1", "y", etype=EventType.RATING, value=5),
        _ev("u2", "x", etype=EventType.RATING, value=5), _ev("u2", "y", etype=EventType.RATING, value=4),
        _ev("u3", "x", etype=EventType.RATING, value=5), _ev("u3", "z", etype=EventType.RATING, value=5),
        _ev("u3", "w", etype=EventType.RATING, value=1),  # disliked: no co-occurrence
    ]
    g = _graph(events)
    assert g.co_counts["x"] == {"y": 2.0, "z": 1.0} and "w" not in g.co_counts
    scores = g.cooccurrence_scores([HistoryEntry("x", EventType.RATING, 5, 2.0, 0.0)])
    assert scores["y"] == (pytest.approx(2.0 * 2 / math.sqrt(3 * 2)), "x")
    assert scores["z"] == (pytest.approx(2.0 * 1 / math.sqrt(3 * 1)), "x")


def _random_log(n=400, seed=3):
    rng = np.random.default_rng(seed)
    return [
        _ev(f"u{rng.integers(8)}", f"i{rng.integers(30)}", t=float(k * 3600), etype=EventType.RATING,
            value=float(rng.choice([1, 2, 3, 4, 5])), n=k)
        for k in range(n)
    ]


def test_incremental_observation_equals_a_fit_and_survives_serialisation():
    log = _random_log()
    fitted = _graph(log)
    incremental = _graph(log[:150])
    for event in log[150:]:
        incremental.observe(event)
    restored = InteractionGraph.from_bytes(fitted.to_bytes(), GraphParams(), W)
    for g in (incremental, restored):
        for name in ("next_counts", "co_counts"):
            a, b = getattr(g, name), getattr(fitted, name)
            assert a.keys() == b.keys()
            for key in a:
                assert a[key] == pytest.approx(b[key])
        assert g.trend == pytest.approx(fitted.trend)
        assert {u: list(t) for u, t in g.consumed_tail.items()} == {u: list(t) for u, t in fitted.consumed_tail.items()}
    # A restored graph keeps learning exactly like the original.
    extra = _ev("u1", "i5", t=1e7, n=999)
    restored.observe(extra)
    fitted.observe(extra)
    assert restored.next_counts == fitted.next_counts


def test_trending_prefers_recent_items_and_never_overflows():
    day = 86_400.0
    events = [_ev("u", "old", t=0.0, n=k) for k in range(20)]
    events += [_ev("u", "new", t=30 * day, n=100 + k) for k in range(3)]
    g = _graph(events, trending_half_life_days=7.0)
    assert [i for i, _ in g.trending(2)] == ["new", "old"]
    # Thousands of half-lives later (older data replayed) the counts still compare correctly.
    g.observe(_ev("u", "later", t=1e5 * day))
    assert g.trending(1)[0][0] == "later" and all(math.isfinite(v) for v in g.trend.values())
    assert g.trend_score("later") == pytest.approx(1.0)


def test_follower_catches_up_and_swaps_in_a_fitted_artifact(tmp_path):
    store = open_store("sqlite:///" + str(tmp_path / "s.db"))
    store.append_events(0, [_ev("u", i, n=k) for k, i in enumerate("abc")])
    follower = GraphFollower(store, GraphParams(), W)
    follower.start()
    assert follower.graph.next_counts["a"] == pytest.approx({"b": 1.0, "c": 0.5})
    store.append_events(0, [_ev("u", "d", n=9)])
    assert follower.catch_up() == 1 and follower.graph.next_counts["c"] == {"d": 1.0}
    assert follower.maybe_reload() is False  # nothing published yet
    graph, seq = fit_graph(store, GraphParams(), W)
    store.save_artifact(GRAPH_ARTIFACT, seq, graph.to_bytes())
    store.append_events(1, [_ev("v", "a", n=1), _ev("v", "e", n=2)])
    old = follower.graph
    assert follower.maybe_reload() is True and follower.graph is not old
    # The swapped-in graph was caught up past the artefact with the later events.
    assert follower.graph.next_counts["a"] == pytest.approx({"b": 1.0, "c": 0.5, "d": 1 / 3, "e": 1.0})
    assert follower.seq == max(s.seq for s in store.events_after(0))
    # A new follower starts from the artefact and replays only what came after it.
    fresh = GraphFollower(store, GraphParams(), W)
    fresh.start()
    assert fresh.artifact_version == seq and fresh.graph.next_counts == follower.graph.next_counts


def _unit(v):
    v = np.asarray(v, dtype=np.float32)
    return v / np.linalg.norm(v)


def test_ranking_uses_next_item_transitions_with_a_grounded_reason():
    # Everyone who watched "first" went on to "sequel"; text alone prefers "lookalike".
    log = []
    for n in range(6):
        log += [_ev(f"u{n}", "first", t=n, n=1), _ev(f"u{n}", "sequel", t=n + 0.5, n=2)]
    graph = _graph(log)
    retriever = Retriever(RetrievalConfig(popularity_weight=0.0, trending_weight=0.0), graph)
    retriever.upsert([
        Item("first", "The First One", vector=_unit([1, 0, 0])),
        Item("sequel", "The Sequel", vector=_unit([0.2, 1, 0])),
        Item("lookalike", "Looks Like The First", vector=_unit([1, 0.1, 0])),
        Item("other", "Something Else", vector=_unit([0, 0, 1])),
    ])
    profile = ProfileView("me", 1, vector=_unit([1, 0, 0]), seen_item_ids=["first"],
                          recent=[HistoryEntry("first", EventType.CLICK, 0, 0.5, 10.0)])
    top = retriever.recommend(RecommendQuery(page_size=2), profile)
    assert top[0].item_id == "sequel"
    assert CandidateSource.SEQUENTIAL in top[0].sources
    assert top[0].reason.startswith("people often pick this right after The First One")
    # Switched off by weight, text similarity wins again.
    plain = Retriever(RetrievalConfig(popularity_weight=0.0, trending_weight=0.0, sequential_weight=0.0,
                                      collaborative_weight=0.0), graph)
    plain.upsert([Item(i.item_id, i.title, vector=retriever.index.vector(i.item_id)) for i in
                  [Item("first"), Item("sequel"), Item("lookalike"), Item("other")]])
    assert plain.recommend(RecommendQuery(page_size=1), profile)[0].item_id == "lookalike"


def test_similar_items_blend_text_neighbours_with_items_liked_together():
    liked = lambda u, i: _ev(u, i, etype=EventType.RATING, value=5.0)  # noqa: E731
    graph = _graph([e for n in range(4) for e in (liked(f"u{n}", "anchor"), liked(f"u{n}", "partner"))])
    retriever = Retriever(RetrievalConfig(collaborative_weight=1.0), graph)
    retriever.upsert([
        Item("anchor", "Anchor", vector=_unit([1, 0, 0])),
        Item("twin", "Text Twin", vector=_unit([1, 0.2, 0])),
        Item("partner", "Liked Together", vector=_unit([0, 1, 0])),
    ])
    similar = retriever.similar_items("anchor", RecommendQuery(page_size=2))
    assert [s.item_id for s in similar] == ["partner", "twin"]
    assert CandidateSource.COLLABORATIVE in similar[0].sources
    assert similar[0].reason == "people who liked Anchor also liked this"
    assert similar[1].reason == "similar to Anchor"
    # Without the graph it is text similarity alone.
    text_only = Retriever(RetrievalConfig(), None)
    text_only.upsert([Item(i, i, vector=retriever.index.vector(i)) for i in ("anchor", "twin", "partner")])
    assert [s.item_id for s in text_only.similar_items("anchor", RecommendQuery(page_size=2))] == ["twin", "partner"]


def test_erased_users_leave_no_per_user_state_in_followers_or_loaded_artifacts(tmp_path):
    store = open_store("sqlite:///" + str(tmp_path / "s.db"))
    store.append_events(0, [_ev("alice", "a", n=1), _ev("alice", "b", n=2), _ev("bob", "a", n=3)])
    graph, seq = fit_graph(store, GraphParams(), W)
    store.save_artifact(GRAPH_ARTIFACT, seq, graph.to_bytes())  # fitted while alice existed
    follower = GraphFollower(store, GraphParams(), W)
    follower.start()
    assert "alice" in follower.graph.consumed_tail
    store.delete_user("alice")
    follower.catch_up()
    assert "alice" not in follower.graph.consumed_tail and "alice" not in follower.graph.liked_tail
    assert "bob" in follower.graph.consumed_tail
    # A replica starting later from the old artefact drops her too.
    late = GraphFollower(store, GraphParams(), W)
    late.start()
    assert "alice" not in late.graph.consumed_tail and "bob" in late.graph.consumed_tail
    # A returning user id starts a fresh tail from new events only.
    store.append_events(0, [_ev("alice", "c", n=9)])
    late.catch_up()
    assert list(late.graph.consumed_tail["alice"]) == ["c"]

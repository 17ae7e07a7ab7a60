"""Baselines and full-catalog ranking (`tastemaker.evaluation.baselines`) on small logs with a
known answer."""

from __future__ import annotations

import numpy as np
import pytest

from tastemaker.domain import EventType, Item
from tastemaker.evaluation.baselines import (
    ALS,
    ItemKNN,
    Popularity,
    RandomRanker,
    TrainData,
    Transitions,
    backoff_rank,
    top_k,
)
from tastemaker.evaluation.data import InteractionRow, build_interactions


def test_top_k_excludes_pads_and_breaks_ties_by_the_tie_rank():
    scores = np.array([0.5, 0.9, 0.5, 0.5, 0.1])
    assert top_k(scores, 3, np.array([1])).tolist() == [0, 2, 3]  # ties: lower index first
    assert top_k(scores, 3, np.array([1]), tie_rank=np.array([4, 0, 3, 1, 2])).tolist() == [3, 2, 0]
    assert top_k(scores, 4, np.array([0, 1, 2])).tolist() == [3, 4, -1, -1]
    assert top_k(scores, 2, np.arange(5)).tolist() == [-1, -1]
    flat = np.zeros(1000)
    assert top_k(flat, 3, np.array([0]), tie_rank=np.arange(1000)[::-1]).tolist() == [999, 998, 997]


def test_backoff_rank_orders_by_popularity_then_index():
    assert backoff_rank(np.array([1, 5, 1, 0])).tolist() == [1, 0, 2, 3]


def _data(sequences: dict[str, list[str]], n_items: int):
    items = [Item(item_id=f"m{i}", title=f"Movie {i}") for i in range(n_items)]
    rows = [
        InteractionRow(user, item, float(t), 4.0, EventType.RATING)
        for user, seq in sequences.items()
        for t, item in enumerate(seq)
    ]
    data = build_interactions("toy", items, rows, seed=0)
    return data, {it.item_id: i for i, it in enumerate(data.items)}


def _train(data):
    return TrainData(data, np.arange(data.n_events))


def _names(data, indices):
    return [data.items[i].item_id for i in indices if i >= 0]


def test_popularity_ranks_by_training_count_and_skips_seen_items():
    data, idx = _data({"u0": ["m0", "m1"], "u1": ["m0", "m2"], "u2": ["m0", "m1", "m3"], "u3": ["m3"]}, 5)
    train = _train(data)
    ranked = Popularity().fit(train, {}).recommend(np.array([data.user_ids.index("u3")]), 4)
    assert _names(data, ranked[0])[:2] == ["m0", "m1"]  # m3 is seen; m0 (3) then m1 (2)
    assert "m3" not in _names(data, ranked[0])


def test_transitions_recommend_what_follows_the_last_items():
    chains = {f"u{n}": ["m0", "m1", "m2", "m3"] for n in range(5)}
    chains["probe"] = ["m5", "m1"]
    data, idx = _data(chains, 8)
    train = _train(data)
    model = Transitions().fit(train, {"window": 1, "history": 1, "decay": 0.5})
    ranked = model.recommend(np.array([data.user_ids.index("probe")]), 3)
    assert _names(data, ranked[0])[0] == "m2"  # m1 is followed by m2
    wider = Transitions().fit(train, {"window": 2, "history": 1, "decay": 0.5, "normalise": True})
    assert _names(data, wider.recommend(np.array([data.user_ids.index("probe")]), 2)[0]) == ["m2", "m3"]


def test_item_knn_recommends_items_consumed_with_the_users_items():
    logs = {f"a{n}": ["m0", "m1", "m2"] for n in range(4)} | {f"b{n}": ["m3", "m4", "m5"] for n in range(4)}
    logs["probe"] = ["m3"]
    data, idx = _data(logs, 6)
    ranked = ItemKNN().fit(_train(data), {"k": 2}).recommend(np.array([data.user_ids.index("probe")]), 2)
    assert sorted(_names(data, ranked[0])) == ["m4", "m5"]


def test_als_recovers_two_blocks():
    logs = {f"a{n}": ["m0", "m1", "m2", "m3"] for n in range(12)} | {f"b{n}": ["m4", "m5", "m6", "m7"] for n in range(12)}
    logs["probe_a"] = ["m0", "m1"]
    logs["probe_b"] = ["m6", "m7"]
    data, idx = _data(logs, 8)
    # Two factors for two blocks; too many factors with little regularisation memorise the probes.
    model = ALS(seed=0, iterations=10).fit(_train(data), {"factors": 2, "regularization": 1.0, "alpha": 10.0})
    ranked = model.recommend(np.array([data.user_ids.index("probe_a"), data.user_ids.index("probe_b")]), 2)
    assert sorted(_names(data, ranked[0])) == ["m2", "m3"]
    assert sorted(_names(data, ranked[1])) == ["m4", "m5"]


def test_random_ranker_is_seeded_and_never_returns_seen_items():
    data, idx = _data({"u": ["m0", "m1"], "v": ["m2"]}, 30)
    users = np.array([data.user_ids.index("u")])
    first = RandomRanker(seed=1).fit(_train(data), {}).recommend(users, 10)
    assert first.tolist() == RandomRanker(seed=1).fit(_train(data), {}).recommend(users, 10).tolist()
    assert first.tolist() != RandomRanker(seed=2).fit(_train(data), {}).recommend(users, 10).tolist()
    assert not {"m0", "m1"} & set(_names(data, first[0]))


@pytest.mark.parametrize("method", [Popularity(), ItemKNN(), ALS(iterations=3), Transitions(), RandomRanker()])
def test_every_baseline_ranks_only_unseen_items_without_duplicates(method):
    rng = np.random.default_rng(0)
    logs = {f"u{u}": [f"m{i}" for i in rng.choice(40, size=8, replace=False)] for u in range(20)}
    data, idx = _data(logs, 40)
    train = _train(data)
    params = method.grid(quick=True)[0]
    ranked = method.fit(train, params).recommend(np.arange(data.n_users), 20)
    for user, row in enumerate(ranked):
        items = row[row >= 0]
        assert len(items) == 20 and len(set(items.tolist())) == 20
        assert not set(items.tolist()) & set(train.seen(user).tolist())

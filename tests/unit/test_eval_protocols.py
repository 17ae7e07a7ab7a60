"""Evaluation splits (`tastemaker.evaluation.protocols`) and the orders they rest on: log order
with seeded tie-breaks, and the seeded internal item order."""

from __future__ import annotations

import numpy as np
import pytest

from tastemaker.domain import EventType, Item
from tastemaker.evaluation.data import InteractionRow, build_interactions
from tastemaker.evaluation.protocols import cold_items, leave_last_out, make_split, time_cutoff


def _items(n: int) -> list[Item]:
    return [Item(item_id=f"m{i:03d}", title=f"Movie {i}") for i in range(n)]


def _random_log(seed: int = 0, users: int = 40, items: int = 60, events: int = 1200):
    rng = np.random.default_rng(seed)
    rows = [
        InteractionRow(f"u{rng.integers(users)}", f"m{rng.integers(items):03d}", float(rng.integers(0, 10_000)), 4.0, EventType.RATING)
        for _ in range(events)
    ]
    return build_interactions("random", _items(items), rows, seed=seed)


def _pairs(data, events) -> set[tuple[int, int]]:
    return set(zip(data.user[events].tolist(), data.item[events].tolist()))


def test_log_order_is_time_then_a_seeded_draw_never_file_order():
    # 300 users each rate A then B (file order) at the same second.
    rows = []
    for u in range(300):
        rows += [InteractionRow(f"u{u}", "m000", 100.0, 4.0, EventType.RATING), InteractionRow(f"u{u}", "m001", 100.0, 4.0, EventType.RATING)]
    data = build_interactions("ties", _items(2), rows, seed=0)
    a = next(i for i, it in enumerate(data.items) if it.item_id == "m000")
    first_is_a = [data.item[data.user == u][0] == a for u in range(300)]
    assert 0.35 < np.mean(first_is_a) < 0.65  # file order would give 1.0
    again = build_interactions("ties", _items(2), rows, seed=0)
    assert np.array_equal(again.item, data.item) and np.array_equal(again.user, data.user)
    other = build_interactions("ties", _items(2), rows, seed=1)
    assert not np.array_equal(other.item, data.item)


def test_internal_item_order_is_a_seeded_permutation_not_the_id_order():
    data = _random_log(seed=0)
    ids = [it.item_id for it in data.items]
    assert ids != sorted(ids)
    assert [it.item_id for it in _random_log(seed=0).items] == ids
    assert [it.item_id for it in _random_log(seed=5).items] != ids


def test_repeated_pairs_keep_the_first_interaction():
    rows = [
        InteractionRow("u", "m001", 5.0, 2.0, EventType.RATING),
        InteractionRow("u", "m001", 1.0, 5.0, EventType.RATING),
        InteractionRow("u", "m002", 3.0, 4.0, EventType.RATING),
    ]
    data = build_interactions("repeats", _items(3), rows)
    assert data.n_events == 2 and data.stats["repeated_pairs_dropped"] == 1
    assert data.time.tolist() == [1.0, 3.0] and data.rating.tolist() == [5.0, 4.0]


def test_leave_last_out_targets_are_each_users_last_events_and_never_in_training():
    data = _random_log()
    split = leave_last_out(data)
    test, val = split.test.segments[0], split.validation.segments[0]
    for segment in (test, val):
        assert not _pairs(data, segment.train) & set(zip(segment.users.tolist(), segment.targets.tolist()))
    for user, target in zip(test.users, test.targets):
        events = np.nonzero(data.user == user)[0]
        assert data.item[events[-1]] == target
        assert data.item[events[-2]] == val.targets[val.users.tolist().index(user)]
        assert set(test.train[np.isin(test.train, events)]) == set(events[:-1])
    assert set(val.train) < set(test.train)
    assert len(test.users) == len(set(test.users.tolist()))


def test_leave_last_out_needs_three_events_per_user():
    rows = [InteractionRow("a", f"m00{i}", float(i), 4.0, EventType.RATING) for i in range(3)]
    rows += [InteractionRow("b", f"m00{i}", float(i), 4.0, EventType.RATING) for i in range(2)]
    data = build_interactions("small", _items(3), rows)
    split = leave_last_out(data)
    assert [data.user_ids[u] for u in split.test.segments[0].users] == ["a"]
    b = data.user_ids.index("b")
    assert (data.user[split.test.segments[0].train] == b).sum() == 2  # b's events are training only


def test_time_cutoff_trains_on_the_past_and_targets_the_first_later_event():
    data = _random_log(events=2000)
    split = time_cutoff(data, test_quantiles=(0.6, 0.8), validation_quantiles=(0.3, 0.5))
    first_test_moment = split.params["test_moments"][0]
    for segment, moment in zip(split.test.segments, split.params["test_moments"]):
        assert data.time[segment.train].max() < moment
        for user, target in zip(segment.users, segment.targets):
            later = np.nonzero((data.user == user) & (data.time >= moment))[0]
            assert data.item[later[0]] == target
            assert (data.user[segment.train] == user).any()  # evaluated users have history
    for segment, moment in zip(split.validation.segments, split.params["validation_moments"]):
        assert data.time[segment.train].max() < moment
        target_times = [data.time[(data.user == u) & (data.item == i)][0] for u, i in zip(segment.users, segment.targets)]
        assert all(moment <= t < first_test_moment for t in target_times)  # tuning never sees test time
    with pytest.raises(ValueError):
        time_cutoff(data, test_quantiles=(0.5,), validation_quantiles=(0.6,))


def test_cold_items_hides_a_seeded_tenth_of_the_items_from_every_training_set():
    data = _random_log(events=3000)
    split = cold_items(data, fraction=0.1, seed=3)
    hidden = set(split.hidden_items.tolist())
    assert len(hidden) == round(0.1 * len(np.unique(data.item)))
    assert set(cold_items(data, fraction=0.1, seed=3).hidden_items.tolist()) == hidden
    assert set(cold_items(data, fraction=0.1, seed=4).hidden_items.tolist()) != hidden
    for fold in (split.validation, split.test):
        segment = fold.segments[0]
        assert not set(data.item[segment.train].tolist()) & hidden
        assert set(segment.targets.tolist()) <= hidden
    test = split.test.segments[0]
    for user, target in zip(test.users, test.targets):
        hidden_events = np.nonzero((data.user == user) & np.isin(data.item, list(hidden)))[0]
        assert data.item[hidden_events[-1]] == target
        own = test.train[data.user[test.train] == user]
        assert own.max() < hidden_events[-1]  # the user's training ends before their target


def test_make_split_names_every_protocol():
    data = _random_log()
    for name in ("leave_last_out", "time_cutoff", "cold_items"):
        assert make_split(name, data).protocol == name
    with pytest.raises(ValueError, match="unknown protocol"):
        make_split("random_split", data)

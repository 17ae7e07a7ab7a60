"""Encoder fine-tuning logic without Ray: training pairs (hand-computed, no held-out event
leaks in), the in-batch softmax loss (hand-computed on 3x3), and the config checks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tastemaker.domain import EventType, Item
from tastemaker.evaluation.data import InteractionRow, build_interactions
from tastemaker.evaluation.protocols import make_split
from tastemaker.training.config import TrainConfig
from tastemaker.training.model import in_batch_softmax_loss
from tastemaker.training.pairs import HISTORY_SEPARATOR, build_pairs, training_events


def _items(n: int) -> list[Item]:
    return [Item(item_id=f"i{k}", title=f"Movie {k}") for k in range(1, n + 1)]


def _row(user: str, item: str, day: int) -> InteractionRow:
    return InteractionRow(user, item, 1_000_000.0 + day * 86_400, 4.0, EventType.RATING)


def _hand_data():
    # a: i1, i2, i3, i4 in this order; b: i2 then i1 (two events: training only under leave_last_out).
    rows = [_row("a", "i1", 1), _row("a", "i2", 2), _row("a", "i3", 3), _row("a", "i4", 4), _row("b", "i2", 1), _row("b", "i1", 5)]
    return build_interactions("hand", _items(4), rows, seed=0)


def _summary(pairs):
    return [(p.user_id, p.history_item_ids, p.target_item_id) for p in pairs]


def test_pairs_from_the_whole_log_hand_computed():
    data = _hand_data()
    pairs = build_pairs(data, np.ones(data.n_events, dtype=bool), max_history_items=2)
    assert _summary(pairs) == [
        ("a", ("i1",), "i2"),
        ("a", ("i2", "i1"), "i3"),  # newest first
        ("a", ("i3", "i2"), "i4"),  # only the 2 latest items
        ("b", ("i2",), "i1"),
    ]
    assert pairs[1].query_text == f"Movie 2{HISTORY_SEPARATOR}Movie 1"
    assert pairs[1].item_text == "Movie 3"


def test_leave_last_out_targets_never_reach_training_hand_computed():
    data = _hand_data()
    mask = training_events(data, ["leave_last_out"])
    pairs = build_pairs(data, mask, max_history_items=5)
    # a's last two events (i3: validation target, i4: test target) are gone; b (2 events) keeps all.
    assert _summary(pairs) == [("a", ("i1",), "i2"), ("b", ("i2",), "i1")]


def _random_data(seed: int = 3):
    rng = np.random.default_rng(seed)
    items = _items(40)
    rows = [
        _row(f"u{u}", f"i{int(rng.integers(1, 41))}", int(rng.integers(0, 400)))
        for u in range(30)
        for _ in range(int(rng.integers(2, 25)))
    ]
    return build_interactions("random", items, rows, seed=seed)


@pytest.mark.parametrize("holdout", [("leave_last_out",), ("cold_items",), ("time_cutoff",), ("leave_last_out", "time_cutoff", "cold_items")])
def test_no_validation_or_test_target_of_a_held_out_protocol_appears_in_any_pair(holdout):
    data = _random_data()
    mask = training_events(data, holdout, seed=0)
    pairs = build_pairs(data, mask, max_history_items=3)
    assert pairs, "the example should leave something to train on"
    used = {(p.user_id, i) for p in pairs for i in (*p.history_item_ids, p.target_item_id)}
    for protocol in holdout:
        split = make_split(protocol, data, seed=0)
        for fold in (split.validation, split.test):
            for segment in fold.segments:
                # (user, item) pairs are unique in the log (repeats are dropped), so a target
                # (user, item) seen in a pair means the target event itself was trained on.
                targets = {(data.user_ids[int(u)], data.items[int(i)].item_id) for u, i in zip(segment.users, segment.targets)}
                assert not targets & used, f"{protocol}/{fold.name} target leaked into training"
        hidden = {data.items[int(i)].item_id for i in split.hidden_items}
        assert not hidden & {i for _, i in used}, "an item hidden by cold_items was trained on"


def test_max_pairs_is_a_seeded_sample():
    data = _random_data()
    mask = np.ones(data.n_events, dtype=bool)
    everything = _summary(build_pairs(data, mask, 3))
    sample = _summary(build_pairs(data, mask, 3, max_pairs=10, seed=1))
    assert len(sample) == 10 and set(sample) <= set(everything)
    assert sample == _summary(build_pairs(data, mask, 3, max_pairs=10, seed=1))
    assert sample != _summary(build_pairs(data, mask, 3, max_pairs=10, seed=2))


def test_in_batch_softmax_loss_hand_computed_3x3():
    query = torch.eye(3)
    item = torch.tensor([[1.0, 0, 0], [0, 0, 1], [0, 1, 0]])
    # logits = q·dᵀ/τ with τ = 0.5: rows [2,0,0], [0,0,2], [0,2,0]; positives on the diagonal.
    e2 = math.exp(2)
    row0 = math.log(e2 + 2) - 2  # positive logit 2 among (2, 0, 0)
    row1 = math.log(2 + e2) - 0  # positive logit 0 among (0, 0, 2)
    row2 = math.log(2 + e2) - 0
    assert float(in_batch_softmax_loss(query, item, 0.5)) == pytest.approx((row0 + row1 + row2) / 3, rel=1e-6)


def test_same_item_in_one_batch_is_not_a_negative():
    query = torch.eye(3)
    item = torch.tensor([[1.0, 0, 0], [0, 0, 1], [0, 1, 0]])
    # Rows 0 and 2 share their next item (key 7): each one's logit for the other is masked.
    e2 = math.exp(2)
    row0 = math.log(e2 + 1) - 2  # (2, 0, masked)
    row1 = math.log(2 + e2)  # (0, 0, 2), nothing masked
    row2 = math.log(1 + e2)  # (masked, 2, 0), positive logit 0
    loss = in_batch_softmax_loss(query, item, 0.5, item_keys=[7, 8, 7])
    assert float(loss) == pytest.approx((row0 + row1 + row2) / 3, rel=1e-6)


def test_config_rejects_a_batch_too_small_for_in_batch_negatives():
    with pytest.raises(ValueError, match="at least 2 pairs"):
        TrainConfig(batch_size=4, num_workers=4)
    assert TrainConfig(batch_size=32, num_workers=2).per_worker_batch_size == 16


class _TokenEncoder(torch.nn.Module):
    """A stand-in encoder: each token id's hidden state is a fixed random vector."""

    def __init__(self):
        super().__init__()
        self.table = torch.nn.Embedding(50, 6)

    def forward(self, input_ids, attention_mask):
        from types import SimpleNamespace

        return SimpleNamespace(last_hidden_state=self.table(input_ids))


def test_mean_of_items_query_is_the_normalised_mean_of_the_history_item_vectors():
    from tastemaker.training.model import TwoTowerEncoder

    torch.manual_seed(0)
    model = TwoTowerEncoder(_TokenEncoder())
    ones = lambda ids: {"input_ids": torch.tensor(ids), "attention_mask": torch.ones(len(ids), len(ids[0]), dtype=torch.long)}
    history = ones([[1, 2], [3, 4], [5, 6]])  # pair 0 has items 0 and 1, pair 1 has item 2
    items = ones([[7, 8], [9, 10]])
    query, item = model(history, items, torch.tensor([0, 0, 1]))
    each = model.embed(history)
    want0 = torch.nn.functional.normalize(each[0] + each[1], dim=0)
    assert torch.allclose(query[0], want0, atol=1e-6) and torch.allclose(query[1], each[2], atol=1e-6)
    assert torch.allclose(item, model.embed(items))

"""Splitting an interaction log into what models learn from and what they must find.

Every protocol yields a validation fold (for tuning) and a test fold (for the report). A fold is
one or more *segments*; a segment is a training set (event indices into `Interactions`, in log
order) plus one held-out target item per evaluated user. Only users with at least one training
event in a segment are evaluated there (users with no history are a different problem).

- **leave_last_out** — per user, in log order: the last event is the test target, the
  second-to-last the validation target; everything before is training. Users with fewer than 3
  events are training data only.
- **time_cutoff** — everyone's training data ends at one moment T and each user's first event at
  or after T is the target. On a small log few users straddle any single moment, so several
  moments can be given (quantiles of the event times); each moment is its own segment and the
  results are pooled. Validation moments all lie before the first test moment and their targets
  are the first events before it, so tuning never sees a test target.
- **cold_items** — a seeded fraction of the items that have events is hidden: all their
  interactions are removed from every model's training data. Per user, the last interaction with
  a hidden item is the test target and the one before it the validation target; training holds
  the non-hidden events before the user's target (other users' non-hidden events in full).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np

from tastemaker.evaluation.data import Interactions

PROTOCOLS = ("leave_last_out", "time_cutoff", "cold_items")
#: time_cutoff moments as quantiles of event time: five test moments, and eight earlier validation
#: moments (a validation fold of about 180 targets on MovieLens-small; four gave 91, too few to tune on).
TEST_QUANTILES = (0.7, 0.75, 0.8, 0.85, 0.9)
VALIDATION_QUANTILES = (0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65)


@dataclass
class Segment:
    """One training set and the targets to find after it."""

    train: np.ndarray  # int64 event indices, ascending (= log order)
    users: np.ndarray  # int32 evaluated users
    targets: np.ndarray  # int32 their target item
    label: str = ""
    #: When the recommendations are asked for, if one moment for everybody (time_cutoff: the
    #: cutoff); None = each user right after their own last training event.
    moment: Optional[float] = None


@dataclass
class Fold:
    """Validation or test: one or more segments whose results are pooled."""

    name: str
    segments: list[Segment]

    @property
    def n_targets(self) -> int:
        return int(sum(s.users.shape[0] for s in self.segments))


@dataclass
class Split:
    """A protocol applied to one data set."""

    protocol: str
    description: str
    validation: Fold
    test: Fold
    params: dict[str, Any] = field(default_factory=dict)
    hidden_items: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int32))


def _positions(data: Interactions) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(events grouped by user in log order, start offset per user, count per user)."""
    by_user = np.argsort(data.user, kind="stable")  # events are already in log order
    counts = np.bincount(data.user, minlength=data.n_users)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    return by_user, starts, counts


def _segment(
    data: Interactions, train_mask: np.ndarray, target_events: np.ndarray, label: str, moment: Optional[float] = None
) -> Segment:
    """Keep only targets whose user has a training event."""
    train = np.nonzero(train_mask)[0]
    has_history = np.zeros(data.n_users, dtype=bool)
    has_history[data.user[train]] = True
    target_events = np.sort(target_events)
    target_events = target_events[has_history[data.user[target_events]]]
    return Segment(
        train=train.astype(np.int64),
        users=data.user[target_events].astype(np.int32),
        targets=data.item[target_events].astype(np.int32),
        label=label,
        moment=moment,
    )


def leave_last_out(data: Interactions) -> Split:
    """Last event per user = test, second-to-last = validation."""
    by_user, starts, counts = _positions(data)
    eligible = np.nonzero(counts >= 3)[0]
    last = by_user[starts[eligible] + counts[eligible] - 1]
    second = by_user[starts[eligible] + counts[eligible] - 2]
    test_train = np.ones(data.n_events, dtype=bool)
    test_train[last] = False
    val_train = test_train.copy()
    val_train[second] = False
    return Split(
        protocol="leave_last_out",
        description="per user by time: last event = test target, second-to-last = validation target",
        validation=Fold("validation", [_segment(data, val_train, second, "second-to-last")]),
        test=Fold("test", [_segment(data, test_train, last, "last")]),
        params={"min_events_per_user": 3},
    )


def _first_in_window(data: Interactions, start: float, end: float) -> np.ndarray:
    """Per user, the index of the first event with start <= time < end."""
    in_window = np.nonzero((data.time >= start) & (data.time < end))[0]
    _, first = np.unique(data.user[in_window], return_index=True)
    return in_window[first]


def time_cutoff(
    data: Interactions,
    test_quantiles: Sequence[float] = TEST_QUANTILES,
    validation_quantiles: Sequence[float] = VALIDATION_QUANTILES,
) -> Split:
    """Global moments at quantiles of the event times; the first later event per user is the target."""
    test_q = sorted(float(q) for q in test_quantiles)
    val_q = sorted(float(q) for q in validation_quantiles)
    if not test_q or not val_q:
        raise ValueError("time_cutoff needs at least one test and one validation quantile")
    if any(not 0 < q < 1 for q in test_q + val_q):
        raise ValueError(f"cutoff quantiles must lie in (0, 1), got test {test_q} validation {val_q}")
    if max(val_q) >= min(test_q):
        raise ValueError(f"validation cutoffs {val_q} must all lie before the first test cutoff {min(test_q)}")
    test_moments = [float(np.quantile(data.time, q)) for q in test_q]
    val_moments = [float(np.quantile(data.time, q)) for q in val_q]
    first_test = test_moments[0]
    test_segments = [
        _segment(data, data.time < moment, _first_in_window(data, moment, np.inf), f"q{q:g}", moment)
        for q, moment in zip(test_q, test_moments)
    ]
    val_segments = [
        _segment(data, data.time < moment, _first_in_window(data, moment, first_test), f"q{q:g}", moment)
        for q, moment in zip(val_q, val_moments)
    ]
    return Split(
        protocol="time_cutoff",
        description=(
            "global moments (quantiles of event time): training = every event before the moment, "
            "target = each user's first event at or after it; segments pooled"
        ),
        validation=Fold("validation", val_segments),
        test=Fold("test", test_segments),
        params={
            "test_quantiles": test_q,
            "validation_quantiles": val_q,
            "test_moments": test_moments,
            "validation_moments": val_moments,
        },
    )


def cold_items(data: Interactions, fraction: float = 0.1, seed: int = 0) -> Split:
    """Hide a seeded `fraction` of the items with events from every model's training data."""
    if not 0 < fraction < 1:
        raise ValueError(f"cold item fraction must lie in (0, 1), got {fraction}")
    rng = np.random.default_rng([seed, 41])
    with_events = np.unique(data.item)
    n_hidden = max(1, int(round(fraction * with_events.shape[0])))
    hidden = np.sort(rng.choice(with_events, size=n_hidden, replace=False)).astype(np.int32)
    is_hidden = np.zeros(data.n_items, dtype=bool)
    is_hidden[hidden] = True
    hidden_events = np.nonzero(is_hidden[data.item])[0]  # log order
    # Per user: last and second-to-last hidden-item events.
    users = data.user[hidden_events]
    order = np.argsort(users, kind="stable")
    grouped, grouped_users = hidden_events[order], users[order]
    last_of_user = np.nonzero(np.r_[grouped_users[1:] != grouped_users[:-1], True])[0]
    test_targets = grouped[last_of_user]
    previous = last_of_user - 1
    same_user = (previous >= 0) & (grouped_users[np.maximum(previous, 0)] == grouped_users[last_of_user])
    val_targets = grouped[previous[same_user]]
    infinity = np.iinfo(np.int64).max
    test_cut = np.full(data.n_users, infinity, dtype=np.int64)
    test_cut[data.user[test_targets]] = test_targets
    val_cut = test_cut.copy()
    val_cut[data.user[val_targets]] = val_targets
    index = np.arange(data.n_events)
    visible = ~is_hidden[data.item]
    test_train = visible & (index < test_cut[data.user])
    val_train = visible & (index < val_cut[data.user])
    return Split(
        protocol="cold_items",
        description=(
            f"a seeded {fraction:.0%} of the items with events hidden from all training data; target = "
            "each user's last (validation: second-to-last) interaction with a hidden item"
        ),
        validation=Fold("validation", [_segment(data, val_train, val_targets, "second-to-last hidden")]),
        test=Fold("test", [_segment(data, test_train, test_targets, "last hidden")]),
        params={"fraction": fraction, "hidden_items": int(n_hidden)},
        hidden_items=hidden,
    )


def make_split(protocol: str, data: Interactions, seed: int = 0, **options: Any) -> Split:
    """Build the split named `protocol` (one of `PROTOCOLS`)."""
    if protocol == "leave_last_out":
        return leave_last_out(data)
    if protocol == "time_cutoff":
        kwargs = {k: options[k] for k in ("test_quantiles", "validation_quantiles") if options.get(k)}
        return time_cutoff(data, **kwargs)
    if protocol == "cold_items":
        return cold_items(data, fraction=options.get("cold_fraction") or 0.1, seed=seed)
    raise ValueError(f"unknown protocol {protocol!r}; allowed: {', '.join(PROTOCOLS)}")

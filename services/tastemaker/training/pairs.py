"""Training pairs: (user history text → next item text) from an interaction log, never from
events an evaluation protocol holds out.

The log is loaded and ordered exactly as `tastemaker eval` loads it (`evaluation.data`: time
order, equal times in a seeded order), and the protocols are the evaluation's own
(`evaluation.protocols.make_split`, same seed and options). `training_events` keeps an event
only when it lies in the training set of *every* segment of *every* fold (validation and test)
of every protocol named in `holdout`; a segment's targets are never in its own training set, so
no validation or test target of those protocols — and, for cold_items, no interaction with a
hidden item — reaches the encoder. The pairs are then built per user from the kept events only,
in log order: each kept event after the user's first kept one is a target, the `max_history_items`
kept events before it are the history.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from tastemaker.evaluation.data import Interactions
from tastemaker.evaluation.protocols import TEST_QUANTILES, VALIDATION_QUANTILES, make_split

#: Joins item texts in a history text (newest first, so truncation drops the oldest).
HISTORY_SEPARATOR = " | "


@dataclass(frozen=True)
class TrainingPair:
    """One example: the user's recent items (newest first) and the item that came next."""

    user_id: str
    history_item_ids: tuple[str, ...]
    target_item_id: str
    query_text: str
    item_text: str
    history_texts: tuple[str, ...] = ()  # the history items' texts, newest first


def training_events(
    data: Interactions,
    holdout: Sequence[str],
    seed: int = 0,
    cold_fraction: float = 0.1,
    test_quantiles: Sequence[float] = TEST_QUANTILES,
    validation_quantiles: Sequence[float] = VALIDATION_QUANTILES,
) -> np.ndarray:
    """Boolean mask over `data`'s events: those every named protocol lets every model train on."""
    mask = np.ones(data.n_events, dtype=bool)
    for protocol in holdout:
        split = make_split(
            protocol,
            data,
            seed=seed,
            cold_fraction=cold_fraction,
            test_quantiles=test_quantiles,
            validation_quantiles=validation_quantiles,
        )
        for fold in (split.validation, split.test):
            for segment in fold.segments:
                allowed = np.zeros(data.n_events, dtype=bool)
                allowed[segment.train] = True
                mask &= allowed
    return mask


def history_text(texts: Sequence[str]) -> str:
    """The query tower's input: item texts, newest first."""
    return HISTORY_SEPARATOR.join(t for t in texts if t)


def build_pairs(
    data: Interactions,
    event_mask: np.ndarray,
    max_history_items: int = 5,
    max_pairs: Optional[int] = None,
    seed: int = 0,
) -> list[TrainingPair]:
    """Pairs from the events where `event_mask` is True, in log order per user; with `max_pairs`,
    a seeded sample (returned in (user, time) order so the result does not depend on sampling
    order)."""
    if event_mask.shape[0] != data.n_events:
        raise ValueError(f"event_mask has {event_mask.shape[0]} entries for {data.n_events} events")
    kept = np.nonzero(event_mask)[0]  # log order
    order = kept[np.argsort(data.user[kept], kind="stable")]  # grouped by user, log order inside
    users, items = data.user[order], data.item[order]
    # Position k is a target when the event before it (k - 1) belongs to the same user.
    starts = np.r_[True, users[1:] != users[:-1]]
    candidates = np.nonzero(~starts)[0]
    if max_pairs is not None and candidates.shape[0] > max_pairs:
        rng = np.random.default_rng([seed, 53])
        candidates = np.sort(rng.choice(candidates, size=max_pairs, replace=False))
    first_of_run = np.maximum.accumulate(np.where(starts, np.arange(users.shape[0]), 0))
    texts = [item.text() for item in data.items]
    pairs = []
    for k in candidates:
        low = max(int(first_of_run[k]), int(k) - max_history_items)
        history = items[low:k][::-1]  # newest first
        target = int(items[k])
        pairs.append(
            TrainingPair(
                user_id=data.user_ids[int(users[k])],
                history_item_ids=tuple(data.items[int(i)].item_id for i in history),
                target_item_id=data.items[target].item_id,
                query_text=history_text([texts[int(i)] for i in history]),
                item_text=texts[target],
                history_texts=tuple(texts[int(i)] for i in history),
            )
        )
    return pairs

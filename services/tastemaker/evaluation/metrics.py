"""Ranking metrics. Plain functions over one ranked list (item indices, best first) and the set of
relevant items, plus the beyond-accuracy measures computed over the lists of many users.

With one held-out target per user (every protocol here), HR@k and Recall@k coincide and
NDCG@k = 1 / log2(1 + rank) when the target is at `rank` <= k.
"""

from __future__ import annotations

import math
from typing import Collection, Iterable, Sequence

import numpy as np

#: Cut-offs used in reports: metric name -> (function name, k).
ACCURACY_METRICS = ("hr@10", "ndcg@10", "recall@20", "mrr@10")
BEYOND_ACCURACY_METRICS = ("coverage@10", "diversity@10", "novelty@10")
ALL_METRICS = ACCURACY_METRICS + BEYOND_ACCURACY_METRICS


def hit_rate_at_k(ranked: Sequence[int], relevant: Collection[int], k: int) -> float:
    """1.0 if any relevant item is among the first k, else 0.0."""
    return 1.0 if any(i in relevant for i in list(ranked)[:k]) else 0.0


def recall_at_k(ranked: Sequence[int], relevant: Collection[int], k: int) -> float:
    """Share of the relevant items found among the first k (0.0 when nothing is relevant)."""
    if not relevant:
        return 0.0
    return len(set(list(ranked)[:k]) & set(relevant)) / len(relevant)


def ndcg_at_k(ranked: Sequence[int], relevant: Collection[int], k: int) -> float:
    """Binary-relevance NDCG: DCG = sum over hits of 1/log2(1 + rank); IDCG puts all relevant
    items (at most k) first."""
    if not relevant:
        return 0.0
    dcg = sum(1.0 / math.log2(rank + 1) for rank, i in enumerate(list(ranked)[:k], start=1) if i in relevant)
    ideal = sum(1.0 / math.log2(rank + 1) for rank in range(1, min(len(relevant), k) + 1))
    return dcg / ideal


def mrr_at_k(ranked: Sequence[int], relevant: Collection[int], k: int) -> float:
    """1 / rank of the first relevant item within the first k, else 0.0."""
    for rank, i in enumerate(list(ranked)[:k], start=1):
        if i in relevant:
            return 1.0 / rank
    return 0.0


def catalog_coverage(lists: Iterable[Sequence[int]], n_items: int, k: int) -> float:
    """Share of the catalog that appears in at least one user's top-k."""
    if n_items <= 0:
        return 0.0
    shown: set[int] = set()
    for ranked in lists:
        shown.update(i for i in list(ranked)[:k] if i >= 0)
    return len(shown) / n_items


def intra_list_diversity(ranked: Sequence[int], vectors: np.ndarray, k: int) -> float:
    """1 - mean pairwise cosine of the item vectors in the top-k; NaN for fewer than 2 items.
    Vectors are unit norm (the encoder's contract), so dot products are cosines."""
    items = [i for i in list(ranked)[:k] if i >= 0]
    if len(items) < 2:
        return math.nan
    v = vectors[items].astype(np.float64)
    sims = v @ v.T
    n = len(items)
    mean_pairwise = (sims.sum() - np.trace(sims)) / (n * (n - 1))
    return float(1.0 - mean_pairwise)


def popularity_share(interaction_counts: np.ndarray, n_users: int) -> np.ndarray:
    """Add-one smoothed share of users who interacted with each item: (count + 1) / (users + 1),
    so never-seen items get a finite, maximal novelty."""
    return (np.asarray(interaction_counts, dtype=np.float64) + 1.0) / (max(n_users, 0) + 1.0)


def novelty(ranked: Sequence[int], share: np.ndarray, k: int) -> float:
    """Mean self-information -log2(popularity share) of the top-k, in bits; NaN for an empty list."""
    items = [i for i in list(ranked)[:k] if i >= 0]
    if not items:
        return math.nan
    return float(np.mean(-np.log2(share[items])))


def per_user_accuracy(ranked: np.ndarray, targets: np.ndarray) -> dict[str, np.ndarray]:
    """HR@10, NDCG@10, Recall@20 and MRR@10 for each row of `ranked` (n x >= 20, -1 padded)
    against that user's single target."""
    out = {name: np.zeros(len(targets)) for name in ACCURACY_METRICS}
    for row, (ranked_row, target) in enumerate(zip(ranked, targets)):
        relevant = {int(target)}
        items = [int(i) for i in ranked_row if i >= 0]
        out["hr@10"][row] = hit_rate_at_k(items, relevant, 10)
        out["ndcg@10"][row] = ndcg_at_k(items, relevant, 10)
        out["recall@20"][row] = recall_at_k(items, relevant, 20)
        out["mrr@10"][row] = mrr_at_k(items, relevant, 10)
    return out


def summarise(
    ranked: np.ndarray,
    targets: np.ndarray,
    vectors: np.ndarray,
    share: np.ndarray,
    n_items: int,
    accuracy: dict[str, np.ndarray] | None = None,
) -> dict[str, float]:
    """All report metrics for one group of users: means of the per-user accuracy metrics,
    catalog coverage of their top-10 lists, mean intra-list diversity and mean novelty."""
    if len(targets) == 0:
        return {name: math.nan for name in ALL_METRICS} | {"users": 0}
    accuracy = accuracy if accuracy is not None else per_user_accuracy(ranked, targets)
    result: dict[str, float] = {name: float(np.mean(values)) for name, values in accuracy.items()}
    result["coverage@10"] = catalog_coverage(ranked, n_items, 10)
    diversity = [intra_list_diversity(r, vectors, 10) for r in ranked]
    result["diversity@10"] = float(np.nanmean(diversity)) if not all(math.isnan(d) for d in diversity) else math.nan
    novelties = [novelty(r, share, 10) for r in ranked]
    result["novelty@10"] = float(np.nanmean(novelties)) if not all(math.isnan(n) for n in novelties) else math.nan
    result["users"] = int(len(targets))
    return result


def paired_bootstrap(a: np.ndarray, b: np.ndarray, seed: int = 0, resamples: int = 2000) -> dict[str, float]:
    """Relative gain mean(a)/mean(b) - 1 with a 95% percentile interval from resampling users
    (the same resample for both methods, since both ranked the same users)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.size == 0:
        raise ValueError("paired_bootstrap needs two non-empty arrays of equal length")
    rng = np.random.default_rng([seed, 53])
    idx = rng.integers(0, a.size, size=(resamples, a.size))
    mean_a, mean_b = a[idx].mean(axis=1), b[idx].mean(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        gains = np.where(mean_b > 0, mean_a / mean_b - 1.0, np.nan)
    point = float(a.mean() / b.mean() - 1.0) if b.mean() > 0 else math.nan
    lo, hi = (np.nanpercentile(gains, [2.5, 97.5]) if np.isfinite(gains).any() else (math.nan, math.nan))
    return {"gain": point, "ci95_low": float(lo), "ci95_high": float(hi), "resamples": resamples}

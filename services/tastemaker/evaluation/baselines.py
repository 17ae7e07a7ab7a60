"""The classic methods Tastemaker is measured against, and what every method shares: the training
data of one segment (`TrainData`), the `Method` interface and full-catalog top-k ranking.

Every method ranks the whole catalog minus the user's training items (no sampled negatives).
Equal scores are ordered by the internal item index, which is a seeded permutation of the catalog
(see `data`), never by id. Item-kNN and the transition model back off to training popularity for
items their signal does not reach, so their lists are always full and ties among zero scores are
not decided by chance alone; that backoff is part of those models, stated here and in the report.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np
import scipy.sparse as sp

from tastemaker.evaluation.data import Interactions


# -- shared -------------------------------------------------------------------------------
class TrainData:
    """What a model may learn from in one segment: events in log order and derived matrices."""

    def __init__(self, data: Interactions, events: np.ndarray, moment: Optional[float] = None):
        self.data = data
        self.events = np.asarray(events, dtype=np.int64)
        #: The segment's request moment (`Segment.moment`; None = each user's last training event).
        self.moment = moment
        self.n_users, self.n_items = data.n_users, data.n_items
        users, items = data.user[self.events], data.item[self.events]
        #: Binary user x item matrix (pairs are unique after loading).
        self.user_items = sp.csr_matrix(
            (np.ones(len(users), dtype=np.float32), (users, items)), shape=(self.n_users, self.n_items)
        )
        self.user_items.sum_duplicates()
        self.user_items.data[:] = 1.0
        #: Training events per item.
        self.popularity = np.bincount(items, minlength=self.n_items).astype(np.int64)
        self.n_train_users = int(np.unique(users).shape[0])
        self.history_length = np.bincount(users, minlength=self.n_users)
        self.cache: dict[str, Any] = {}

    def histories(self) -> list[np.ndarray]:
        """Per user, their training items in log order."""
        if "histories" not in self.cache:
            users = self.data.user[self.events]
            order = np.argsort(users, kind="stable")
            items = self.data.item[self.events][order]
            splits = np.cumsum(np.bincount(users, minlength=self.n_users))[:-1]
            self.cache["histories"] = np.split(items, splits)
        return self.cache["histories"]

    def seen(self, user: int) -> np.ndarray:
        """The user's training items (excluded from their ranking)."""
        row = self.user_items
        return row.indices[row.indptr[user] : row.indptr[user + 1]]


def top_k(scores: np.ndarray, k: int, exclude: np.ndarray, tie_rank: Optional[np.ndarray] = None) -> np.ndarray:
    """Indices of the k best items, excluding `exclude`, padded with -1 when too few qualify.

    Equal scores are ordered by `tie_rank` (lower first), by default the item index itself (the
    seeded item order). Only the items at or above the k-th best score are sorted, and of those
    tied exactly at it only the ones with the best tie ranks, so a flat tail of equal scores (a
    model with no signal for most items) costs O(items), not a full sort."""
    n = scores.shape[0]
    out = np.full(k, -1, dtype=np.int64)
    s = scores.astype(np.float64, copy=True)
    s[exclude] = -np.inf
    valid = n - np.unique(exclude).shape[0]
    kk = min(k, valid)
    if kk <= 0:
        return out
    rank = np.arange(n) if tie_rank is None else tie_rank
    threshold = np.partition(s, n - kk)[n - kk]
    above = np.nonzero(s > threshold)[0]
    tied = np.nonzero(s == threshold)[0]
    need = kk - above.shape[0]
    if tied.shape[0] > need:
        tied = tied[np.argpartition(rank[tied], need - 1)[:need]]
    candidates = np.concatenate([above, tied])
    chosen = candidates[np.lexsort((rank[candidates], -s[candidates]))][:kk]
    out[:kk] = chosen
    return out


def backoff_rank(popularity: np.ndarray) -> np.ndarray:
    """Tie ranks for a popularity backoff: more training events first, then the seeded order."""
    order = np.lexsort((np.arange(popularity.shape[0]), -popularity))
    rank = np.empty_like(order)
    rank[order] = np.arange(order.shape[0])
    return rank


class Method:
    """A recommender under evaluation. `fit` learns from one segment with one parameter set and
    returns something with `recommend(users, k) -> (len(users), k)` item indices (-1 padded)."""

    name: str = ""
    #: "baseline" (counts for the goals), "reference" (a floor, e.g. random) or "tastemaker".
    kind: str = "baseline"
    description: str = ""

    def grid(self, quick: bool) -> list[dict[str, Any]]:
        """Parameter sets tried on validation; one empty dict = nothing to tune."""
        return [{}]

    def fit(self, train: TrainData, params: dict[str, Any]) -> "Fitted":
        raise NotImplementedError


class Fitted:
    """A fitted model: ranks the catalog for users."""

    def recommend(self, users: np.ndarray, k: int, progress: Optional[Callable[[int], None]] = None) -> np.ndarray:
        raise NotImplementedError


@dataclass
class ScoreModel(Fitted):
    """A model that scores every item for a batch of users (a dense matrix)."""

    train: TrainData
    score_fn: Callable[[np.ndarray], np.ndarray]
    backoff: bool = False
    batch: int = 256
    extra: dict[str, Any] = field(default_factory=dict)

    def recommend(self, users, k, progress=None):
        users = np.asarray(users, dtype=np.int64)
        out = np.full((len(users), k), -1, dtype=np.int64)
        tie_rank = backoff_rank(self.train.popularity) if self.backoff else None
        for start in range(0, len(users), self.batch):
            chunk = users[start : start + self.batch]
            scores = self.score_fn(chunk)
            for row, user in enumerate(chunk):
                out[start + row] = top_k(scores[row], k, self.train.seen(int(user)), tie_rank)
            if progress:
                progress(len(chunk))
        return out


def _grid(**axes: list) -> list[dict[str, Any]]:
    keys = list(axes)
    return [dict(zip(keys, values)) for values in itertools.product(*(axes[k] for k in keys))]


# -- the methods ----------------------------------------------------------------------------
class RandomRanker(Method):
    """A seeded random order of the unseen catalog: the floor every method must clear."""

    name, kind = "random", "reference"
    description = "uniformly random ranking (a floor, not a baseline)"

    def __init__(self, seed: int = 0):
        self.seed = seed

    def fit(self, train, params):
        rng = np.random.default_rng([self.seed, 61])
        return ScoreModel(train, lambda users: rng.random((len(users), train.n_items)))


class Popularity(Method):
    """Most interacted-with items in training."""

    name = "popularity"
    description = "items by training interaction count"

    def fit(self, train, params):
        pop = train.popularity.astype(np.float64)
        return ScoreModel(train, lambda users: np.broadcast_to(pop, (len(users), train.n_items)))


class ItemKNN(Method):
    """Item-based nearest neighbours: cosine similarity of item columns of the binary user-item
    matrix; each of the user's items votes for its `k` nearest neighbours with their similarity."""

    name = "item_knn"
    description = "item-kNN, cosine on the user-item matrix; k tuned"
    max_k = 400

    def grid(self, quick):
        return _grid(k=[50, 200] if quick else [10, 25, 50, 100, 200, 400])

    def _neighbours(self, train: TrainData) -> tuple[np.ndarray, np.ndarray]:
        """Top `max_k` neighbours per item (indices, similarities), best first; cached per segment."""
        if "knn" in train.cache:
            return train.cache["knn"]
        x = train.user_items.tocsc()
        norms = np.sqrt(np.asarray(x.sum(axis=0)).ravel())
        norms[norms == 0] = 1.0
        xn = (x @ sp.diags(1.0 / norms)).tocsc().astype(np.float32)
        xt = xn.T.tocsr()
        n = train.n_items
        width = min(self.max_k, max(n - 1, 1))
        neighbours = np.zeros((n, width), dtype=np.int32)
        sims = np.zeros((n, width), dtype=np.float32)
        step = 1024
        for start in range(0, n, step):
            block = (xt[start : start + step] @ xn).toarray()
            rows = np.arange(block.shape[0])
            block[rows, start + rows] = 0.0  # an item is not its own neighbour
            part = np.argpartition(-block, width - 1, axis=1)[:, :width]
            part_sims = np.take_along_axis(block, part, axis=1)
            # best first; equal similarity by the seeded item order
            order = np.lexsort((part, -part_sims), axis=1)
            neighbours[start : start + step] = np.take_along_axis(part, order, axis=1)
            sims[start : start + step] = np.take_along_axis(part_sims, order, axis=1)
        train.cache["knn"] = (neighbours, sims)
        return neighbours, sims

    def fit(self, train, params):
        k = int(params.get("k", 100))
        neighbours, sims = self._neighbours(train)
        k = min(k, neighbours.shape[1])
        rows = np.repeat(np.arange(train.n_items), k)
        similarity = sp.csr_matrix(
            (sims[:, :k].ravel(), (rows, neighbours[:, :k].ravel())), shape=(train.n_items, train.n_items)
        )
        similarity.eliminate_zeros()
        user_items = train.user_items
        return ScoreModel(train, lambda users: (user_items[users] @ similarity).toarray(), backoff=True)


class ALS(Method):
    """Implicit-feedback matrix factorisation (Hu, Koren & Volinsky) from the `implicit` library."""

    name = "als"
    description = "ALS (implicit library) on binary interactions; factors, regularisation, alpha tuned"

    def __init__(self, seed: int = 0, iterations: int = 15):
        self.seed = seed
        self.iterations = iterations

    def grid(self, quick):
        if quick:
            return _grid(factors=[32], regularization=[0.1], alpha=[1.0, 10.0])
        return _grid(factors=[32, 64, 128], regularization=[0.01, 0.1, 1.0], alpha=[1.0, 10.0])

    def fit(self, train, params):
        from implicit.cpu.als import AlternatingLeastSquares
        from threadpoolctl import threadpool_limits

        # implicit runs its own threads; BLAS threads on top of them only oversubscribe the cores
        # (implicit checks this when the model is built, so the limit covers construction too).
        with threadpool_limits(1, "blas"):
            model = AlternatingLeastSquares(
                factors=int(params.get("factors", 64)),
                regularization=float(params.get("regularization", 0.1)),
                alpha=float(params.get("alpha", 1.0)),
                iterations=self.iterations,
                random_state=self.seed,
            )
            model.fit(train.user_items.astype(np.float32).tocsr(), show_progress=False)
        user_factors = np.asarray(model.user_factors)
        item_factors = np.asarray(model.item_factors)
        return ScoreModel(train, lambda users: user_factors[users] @ item_factors.T)


class Transitions(Method):
    """Sequential next-item model: counts of item j following item i within `window` positions in
    users' time-ordered training histories (weighted 1/distance), optionally row-normalised;
    scored from the user's last `history` items, the most recent weighted 1, older ones `decay`^age."""

    name = "sequential"
    description = "next-item transitions within a window, scored from the last items; window/history/decay tuned"

    def grid(self, quick):
        if quick:
            return _grid(window=[1, 3], history=[3], decay=[0.7], normalise=[False])
        return _grid(window=[1, 3, 5], history=[1, 3, 5, 10], decay=[0.8], normalise=[False, True])

    def _transitions(self, train: TrainData, window: int) -> sp.csr_matrix:
        key = f"transitions-{window}"
        if key in train.cache:
            return train.cache[key]
        rows, cols, vals = [], [], []
        for history in train.histories():
            for distance in range(1, window + 1):
                if history.shape[0] > distance:
                    rows.append(history[:-distance])
                    cols.append(history[distance:])
                    vals.append(np.full(history.shape[0] - distance, 1.0 / distance, dtype=np.float32))
        if rows:
            matrix = sp.csr_matrix(
                (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(train.n_items, train.n_items)
            )
        else:
            matrix = sp.csr_matrix((train.n_items, train.n_items), dtype=np.float32)
        matrix.sum_duplicates()
        train.cache[key] = matrix
        return matrix

    def fit(self, train, params):
        window = int(params.get("window", 3))
        history = int(params.get("history", 3))
        decay = float(params.get("decay", 0.7))
        transitions = self._transitions(train, window)
        if params.get("normalise"):
            totals = np.asarray(transitions.sum(axis=1)).ravel()
            totals[totals == 0] = 1.0
            transitions = sp.diags(1.0 / totals) @ transitions
        histories = train.histories()

        def scores(users: np.ndarray) -> np.ndarray:
            rows, cols, vals = [], [], []
            for row, user in enumerate(users):
                last = histories[int(user)][-history:][::-1]  # most recent first
                rows.extend([row] * len(last))
                cols.extend(last.tolist())
                vals.extend(decay ** np.arange(len(last)))
            anchors = sp.csr_matrix((vals, (rows, cols)), shape=(len(users), train.n_items))
            return (anchors @ transitions).toarray()

        return ScoreModel(train, scores, backoff=True)


def baseline_methods(seed: int = 0) -> list[Method]:
    """The classic baselines plus the random floor."""
    return [RandomRanker(seed), Popularity(), ItemKNN(), ALS(seed), Transitions()]

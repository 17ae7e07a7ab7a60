"""Matrix factorisation signal: implicit-feedback ALS item factors, user vectors folded in per
request. Plain Python + numpy, no Ray.

`tastemaker fit` learns the item factors from the whole event log with the `implicit` library's
ALS (binary "consumed" user x item matrix, confidence `alpha`), as part of the interaction-graph
artefact. A replica never stores user factors: each request folds the user in from the items of
their live profile (`ProfileView.recent`, the last 50), with ALS's own closed-form user step,

    u = (YᵀY + λI + Σ_h (α − 1) y_h y_hᵀ)⁻¹ Σ_h α y_h,

so a profile that changed a millisecond ago is scored as it is now, and a user the fit never saw
gets factors too. Items that arrived after the fit have no factors (score 0) until the next fit;
the other signals cover them meanwhile.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence

import numpy as np
import scipy.sparse as sp
from threadpoolctl import threadpool_limits


@dataclass
class FactorParams:
    """ALS shape; part of `RetrievalConfig` (`factors`, `factor_*`)."""

    factors: int = 64
    regularization: float = 0.1
    alpha: float = 10.0
    iterations: int = 15
    seed: int = 0


class PairCollector:
    """(user, item) consumption pairs gathered during a fit pass, interned to int32 indices (the
    log can be long; tuples of strings would not fit in memory)."""

    def __init__(self) -> None:
        self.users: dict[str, int] = {}
        self.items: dict[str, int] = {}
        self.rows = array("i")
        self.cols = array("i")

    def add(self, user_id: str, item_id: str) -> None:
        self.rows.append(self.users.setdefault(user_id, len(self.users)))
        self.cols.append(self.items.setdefault(item_id, len(self.items)))

    def __len__(self) -> int:
        return len(self.rows)


class FactorModel:
    """Item factors of one fit, and the per-request user fold-in."""

    def __init__(self, item_ids: Sequence[str], item_factors: np.ndarray, params: FactorParams):
        self.params = params
        self.item_ids = list(item_ids)
        self.row = {item_id: r for r, item_id in enumerate(self.item_ids)}
        self.item_factors = np.ascontiguousarray(item_factors, dtype=np.float32)
        y = self.item_factors.astype(np.float64)
        #: YᵀY + λI: the part of every user's normal equations that does not depend on the user.
        self.base = y.T @ y + params.regularization * np.eye(y.shape[1])
        #: Rows of items deleted since the fit (never proposed, score 0).
        self.removed: set[int] = set()

    @property
    def dim(self) -> int:
        return int(self.item_factors.shape[1])

    # -- fitting --------------------------------------------------------------------------
    @classmethod
    def fit(cls, pairs: PairCollector, params: FactorParams) -> Optional["FactorModel"]:
        """ALS over the binary user x item matrix; None when there is too little to factorise
        (fewer than two users or two items)."""
        if len(pairs.users) < 2 or len(pairs.items) < 2:
            return None
        from implicit.cpu.als import AlternatingLeastSquares

        matrix = sp.csr_matrix(
            (np.ones(len(pairs), dtype=np.float32), (np.frombuffer(pairs.rows, np.int32), np.frombuffer(pairs.cols, np.int32))),
            shape=(len(pairs.users), len(pairs.items)),
        )
        matrix.sum_duplicates()
        matrix.data[:] = params.alpha  # binary: repeats of a pair count once
        # implicit runs its own threads; BLAS threads inside them would only contend.
        with threadpool_limits(1, "blas"):
            model = AlternatingLeastSquares(
                factors=params.factors,
                regularization=params.regularization,
                alpha=1.0,  # the confidence is already in the matrix
                iterations=params.iterations,
                use_cg=False,  # exact least squares: the fold-in below is then the same step
                random_state=params.seed,
                num_threads=1,
            )
            model.fit(matrix, show_progress=False)
        return cls(list(pairs.items), np.asarray(model.item_factors), params)

    # -- scoring --------------------------------------------------------------------------
    def user_vector(self, item_ids: Iterable[str]) -> Optional[np.ndarray]:
        """ALS's user step for a user who consumed `item_ids` (repeats count once; unknown and
        deleted items are skipped); None when none of them has factors."""
        rows = sorted({r for r in (self.row.get(i) for i in item_ids) if r is not None and r not in self.removed})
        if not rows:
            return None
        y = self.item_factors[rows].astype(np.float64)
        alpha = self.params.alpha
        lhs = self.base + (alpha - 1.0) * (y.T @ y)
        rhs = alpha * y.sum(axis=0)
        return np.linalg.solve(lhs, rhs)

    def scores(self, user: np.ndarray, item_ids: Sequence[str]) -> np.ndarray:
        """Predicted preference y_i · u per item (0 for items without factors)."""
        out = np.zeros(len(item_ids))
        rows = [self.row.get(i) for i in item_ids]
        known = [(pos, r) for pos, r in enumerate(rows) if r is not None and r not in self.removed]
        if known:
            positions, idx = zip(*known)
            out[list(positions)] = self.item_factors[list(idx)] @ user.astype(np.float32)
        return out

    def top(self, user: np.ndarray, k: int, eligible: Callable[[str], bool]) -> list[tuple[str, float]]:
        """The k eligible items with the highest predicted preference (deterministic order on ties)."""
        scores = self.item_factors @ user.astype(np.float32)
        if self.removed:
            scores[list(self.removed)] = -np.inf
        n = len(scores)
        want = min(n, max(4 * k, 64))
        done = 0
        out: list[tuple[str, float]] = []
        while True:
            head = np.argpartition(-scores, want - 1)[:want] if want < n else np.arange(n)
            head = head[np.argsort(-scores[head], kind="stable")]
            for r in head[done:].tolist():  # rows before `done` were looked at in a shorter pass
                if not np.isfinite(scores[r]):
                    return out
                item_id = self.item_ids[r]
                if eligible(item_id):
                    out.append((item_id, float(scores[r])))
                    if len(out) == k:
                        return out
            if want >= n:
                return out
            done, want = want, min(n, want * 4)  # strict filters: look further down
    def anchors(self, item_ids: Sequence[str], history: Sequence[str]) -> dict[str, str]:
        """Per item, the history item whose factors agree with it most (what a reason names)."""
        hist_rows = [(h, self.row[h]) for h in dict.fromkeys(history) if h in self.row and self.row[h] not in self.removed]
        cand = [(i, self.row[i]) for i in item_ids if i in self.row and self.row[i] not in self.removed]
        if not hist_rows or not cand:
            return {}
        affinity = self.item_factors[[r for _, r in cand]] @ self.item_factors[[r for _, r in hist_rows]].T
        best = affinity.argmax(axis=1)
        return {item: hist_rows[int(b)][0] for (item, _), b in zip(cand, best)}

    def forget_items(self, item_ids: Iterable[str]) -> None:
        for item_id in item_ids:
            r = self.row.get(item_id)
            if r is not None:
                self.removed.add(r)

    # -- serialisation (inside the graph artefact's npz) ----------------------------------
    def arrays(self, index: Callable[[str], int]) -> dict[str, np.ndarray]:
        """`f_idx` (positions in the artefact's id table, from `index`) and `f_items`."""
        kept = [r for r in range(len(self.item_ids)) if r not in self.removed]
        return {
            "f_idx": np.asarray([index(self.item_ids[r]) for r in kept], np.int64),
            "f_items": self.item_factors[kept],
        }

    @classmethod
    def from_arrays(cls, data, ids: Sequence[str], params: FactorParams) -> Optional["FactorModel"]:
        if "f_items" not in data.files or len(data["f_idx"]) == 0:
            return None
        return cls([ids[int(i)] for i in data["f_idx"]], data["f_items"], params)

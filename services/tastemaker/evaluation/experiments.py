"""EXPERIMENT — a learned ranker over the candidate signals, measured through the evaluation;
NOT part of `tastemaker eval` or of the service (it did not beat the tuned blend, see below).

`LearnedRanker` is a listwise (softmax) linear model with a few pairwise interactions over the
signals `Retriever.candidates` computes for each candidate (profile / query cosine, negative,
popularity, trending, transitions and co-occurrence, scaled and absolute, plus transitions under
the other normalisation). For each training request the candidates form a matrix X and the item
the user picked next is one of its rows; the model maximises log p = s_target - log Σ exp(s_j),
s = X·w, with an L2 penalty (L-BFGS). Signals are divided by their spread but not centred, so an
absent signal contributes nothing and a score splits into named parts for grounded reasons.

Measured (MovieLens latest-small, leave_last_out, seed 0, blend settings: raw transitions,
window 5, history 5, decay 0.8, sequential 2.0, profile 2.0, co-occurrence 0.4, popularity 0,
negative 0.5, trending 0.05): the blend scores validation NDCG@10 0.0801 / test 0.0717; the
ranker fitted on the 382 validation requests whose next item is a candidate (of 610) scores
0.085–0.086 on validation (in-sample) and 0.0696 / 0.0713 / 0.0715 on test for L2 1e-4 / 1e-3 /
1e-2: no gain. One held-out item per user is too little to learn from; more training requests
(several held-out positions per user, each with its own refit) would be the next step.

    python -m tastemaker.evaluation.experiments --out /tmp/experiment
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

#: Signals read from `Candidates.features` (absent ones are 0). `.abs` values enter as log1p.
SIGNALS = (
    "profile",
    "query",
    "negative",
    "popularity",
    "trending",
    "sequential",
    "sequential.abs",
    "sequential.other",
    "collaborative",
    "collaborative.abs",
)
#: Products of two signals (interactions a linear blend cannot express).
INTERACTIONS = (
    ("profile", "sequential"),
    ("profile", "collaborative"),
    ("profile", "popularity"),
    ("sequential", "collaborative"),
    ("sequential", "popularity"),
    ("sequential", "sequential.other"),
)


def group(signal: str) -> str:
    """The score part a signal belongs to (the reason's vocabulary)."""
    return signal.split(".")[0]


class LearnedRanker:
    """Listwise linear scoring of candidate signals; see the module docstring."""

    def __init__(self, weights: np.ndarray, scale: np.ndarray, meta: Optional[dict[str, Any]] = None):
        self.columns = [*SIGNALS, *(f"{a}*{b}" for a, b in INTERACTIONS)]
        if weights.shape != (len(self.columns),) or scale.shape != weights.shape:
            raise ValueError(f"a ranker needs {len(self.columns)} weights and scales, got {weights.shape}, {scale.shape}")
        self.weights = weights.astype(np.float64)
        self.scale = scale.astype(np.float64)
        self.meta = dict(meta or {})
        # Each column's share of each group's part.
        groups = list(dict.fromkeys(group(s) for s in SIGNALS))
        self.groups = groups
        share = np.zeros((len(self.columns), len(groups)))
        for c, name in enumerate(SIGNALS):
            share[c, groups.index(group(name))] = 1.0
        for c, (a, b) in enumerate(INTERACTIONS, start=len(SIGNALS)):
            share[c, groups.index(group(a))] += 0.5
            share[c, groups.index(group(b))] += 0.5
        self._share = share

    # -- features -------------------------------------------------------------------------
    @staticmethod
    def matrix(features: dict[str, np.ndarray], n: int) -> np.ndarray:
        """Unscaled design matrix (n candidates × columns) from a request's signals."""
        raw = {}
        for name in SIGNALS:
            values = features.get(name)
            values = np.zeros(n) if values is None else np.asarray(values, dtype=np.float64)
            raw[name] = np.log1p(np.maximum(values, 0.0)) if name.endswith(".abs") else values
        columns = [raw[name] for name in SIGNALS] + [raw[a] * raw[b] for a, b in INTERACTIONS]
        return np.stack(columns, axis=1) if n else np.zeros((0, len(columns)))

    # -- scoring --------------------------------------------------------------------------
    def parts(self, features: dict[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
        """Score of each candidate as named parts that sum to it; only groups with a signal."""
        x = self.matrix(features, n) / self.scale
        contributions = (x * self.weights) @ self._share  # n × groups
        present = {group(name) for name in features if name in SIGNALS}
        return {g: contributions[:, k] for k, g in enumerate(self.groups) if g in present}

    def score(self, features: dict[str, np.ndarray], n: int) -> np.ndarray:
        return (self.matrix(features, n) / self.scale) @ self.weights

    # -- fitting --------------------------------------------------------------------------
    @classmethod
    def fit(
        cls,
        lists: Sequence[tuple[np.ndarray, int]],
        l2: float = 1e-3,
        meta: Optional[dict[str, Any]] = None,
    ) -> "LearnedRanker":
        """Fit on (unscaled design matrix of one request's candidates, index of the item picked
        next) pairs; requests whose pick was not a candidate cannot teach anything and are left
        out by the caller."""
        from scipy.optimize import minimize

        lists = [(x, t) for x, t in lists if x.shape[0] > 1 and 0 <= t < x.shape[0]]
        if not lists:
            raise ValueError("no training request has its next item among the candidates")
        stacked = np.concatenate([x for x, _ in lists])
        scale = np.sqrt(np.mean(stacked**2, axis=0))
        scale[~(scale > 1e-12)] = 1.0
        stacked = stacked / scale
        sizes = np.array([x.shape[0] for x, _ in lists])
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        target_rows = starts + np.array([t for _, t in lists])
        owner = np.repeat(np.arange(len(lists)), sizes)
        n_lists = len(lists)

        def loss(w: np.ndarray) -> tuple[float, np.ndarray]:
            s = stacked @ w
            top = np.maximum.reduceat(s, starts)
            e = np.exp(s - top[owner])
            z = np.add.reduceat(e, starts)
            p = e / z[owner]
            value = -(s[target_rows] - top - np.log(z)).sum() / n_lists + l2 * float(w @ w)
            grad = (p @ stacked - stacked[target_rows].sum(axis=0)) / n_lists + 2 * l2 * w
            return value, grad

        w0 = np.zeros(stacked.shape[1])
        result = minimize(loss, w0, jac=True, method="L-BFGS-B", options={"maxiter": 500})
        info = {"requests": n_lists, "candidates": int(sizes.sum()), "loss": float(result.fun), "l2": l2}
        return cls(result.x, scale, {**(meta or {}), "fit": info})


def _lists(fitted, segment, other_normalise: bool) -> list[tuple[np.ndarray, int]]:
    """(design matrix, index of the next item) for each request whose next item is a candidate."""
    from tastemaker.domain import ProfileView, RecommendQuery
    from tastemaker.evaluation.pipeline import item_alias, user_alias

    retriever, out = fitted.retriever, []
    cfg = retriever.config
    for user, target in zip(segment.users, segment.targets):
        view = fitted.profiles.get(int(user)) or ProfileView(user_id=user_alias(int(user)))
        found = retriever.candidates(RecommendQuery(user_id=view.user_id, page_size=20), view)
        if found is None:
            continue
        _add_other(found, retriever, view, cfg, other_normalise)
        try:
            index = found.ids.index(item_alias(int(target)))
        except ValueError:
            continue
        out.append((LearnedRanker.matrix(found.features, len(found.ids)), index))
    return out


def _add_other(found, retriever, view, cfg, other_normalise: bool) -> None:
    if retriever.graph is None:
        return
    other = retriever.graph.sequential_scores(view.recent, cfg.sequential_history, cfg.sequential_decay, other_normalise)
    raw = np.array([other[i][0] if i in other else 0.0 for i in found.ids])
    found.features["sequential.other"] = raw / (raw.max() or 1.0)


def learned_ranker(out: Path, params: Optional[dict[str, Any]] = None, seed: int = 0) -> dict[str, Any]:
    """Leave-last-out on MovieLens: blend vs a `LearnedRanker` fitted on the validation fold."""
    from tastemaker.config import ServiceConfig
    from tastemaker.domain import ProfileView, RecommendQuery
    from tastemaker.evaluation import pipeline
    from tastemaker.evaluation.baselines import TrainData
    from tastemaker.evaluation.data import load_interactions
    from tastemaker.evaluation.encoding import item_vectors
    from tastemaker.evaluation.metrics import per_user_accuracy
    from tastemaker.evaluation.protocols import leave_last_out

    service_config = ServiceConfig()
    data = load_interactions("movielens", seed=seed)
    vectors, _ = item_vectors(data.items, service_config.encoder, out / "cache")
    service = pipeline.ServiceEvents(data, vectors)
    split = leave_last_out(data)
    params = params or dict(
        sequential_normalise=False, sequential_window=5, sequential_history=5, sequential_decay=0.8,
        sequential_weight=2.0, profile_weight=2.0, collaborative_weight=0.4, popularity_weight=0.0,
        negative_weight=0.5, trending_weight=0.05,
    )
    method = pipeline.TastemakerPipeline(service, service_config.retrieval, service_config.profiles)
    retrieval, _ = pipeline.configs_for(service_config.retrieval, service_config.profiles, params)
    fitted = {}
    for name in ("validation", "test"):
        segment = getattr(split, name).segments[0]
        fitted[name] = (method.fit(TrainData(data, segment.train, segment.moment), params), segment)
        fitted[name][0].set_retrieval(retrieval)
    other = not retrieval.sequential_normalise

    def ndcg(name: str, ranker: Optional[LearnedRanker] = None) -> float:
        model, segment = fitted[name]
        if ranker is None:
            ranked = model.recommend(segment.users, 20)
        else:
            ranked = np.full((len(segment.users), 20), -1)
            for row, user in enumerate(segment.users):
                view = model.profiles.get(int(user)) or ProfileView(user_id=pipeline.user_alias(int(user)))
                found = model.retriever.candidates(RecommendQuery(user_id=view.user_id, page_size=20), view)
                if found is None:
                    continue
                _add_other(found, model.retriever, view, retrieval, other)
                top = np.argsort(-ranker.score(found.features, len(found.ids)), kind="stable")[:20]
                ranked[row, : len(top)] = [service.alias_to_index[found.ids[i]] for i in top]
        return float(per_user_accuracy(ranked, segment.targets)["ndcg@10"].mean())

    result: dict[str, Any] = {"experiment": "learned_ranker", "params": params}
    result["blend"] = {"validation_ndcg@10": ndcg("validation"), "test_ndcg@10": ndcg("test")}
    lists = _lists(*fitted["validation"], other)
    result["training_requests"] = len(lists)
    result["ranker"] = []
    for l2 in (1e-4, 1e-3, 1e-2):
        ranker = LearnedRanker.fit(lists, l2=l2)
        result["ranker"].append({
            "l2": l2, "validation_ndcg@10_in_sample": ndcg("validation", ranker), "test_ndcg@10": ndcg("test", ranker),
            "weights": dict(zip(ranker.columns, ranker.weights.round(4).tolist())),
        })
    out.mkdir(parents=True, exist_ok=True)
    (out / "experiment_learned_ranker.json").write_text(json.dumps(result, indent=2))
    return result


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="EXPERIMENT: a learned ranker over Tastemaker's candidate signals")
    parser.add_argument("--out", default="eval-out", help="folder for the result and the vector cache")
    args = parser.parse_args(argv)
    result = learned_ranker(Path(args.out))
    print(json.dumps({k: v for k, v in result.items() if k != "params"}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

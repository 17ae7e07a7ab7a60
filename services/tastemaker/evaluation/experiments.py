"""EXPERIMENTS — proposed ranking changes measured through the evaluation, NOT the service's code.

Nothing here is used by `tastemaker eval` or by the service. Each experiment swaps one piece of
the service path for a subclass, so its effect can be measured on the same splits before anyone
changes `retrieval/` for real.

`raw_transitions`: `InteractionGraph.sequential_scores` divides each anchor's transition counts
by the anchor's total (a transition probability). The `sequential` baseline does better with raw
counts (its validation picks `normalise=False`): a popular follower of the last item is a better
guess than a rare one that always follows it. The experiment scores transitions by raw counts.

    python -m tastemaker.evaluation.experiments --out /tmp/experiment   # leave_last_out, MovieLens
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Optional, Sequence


from tastemaker.retrieval.collaborative import _CONSUMED
from tastemaker.evaluation.pipeline import _FrozenGraph


class RawTransitionsGraph(_FrozenGraph):
    """EXPERIMENT: transitions scored by raw (distance-weighted) counts, not by count / total."""

    def sequential_scores(self, recent, history, decay):
        memo = getattr(self, "_memo", None)
        key = ("raw-seq", self._history_key(recent), history, decay)
        if memo is not None and key in memo:
            return memo[key]
        consumed = [h.item_id for h in recent if h.event_type in _CONSUMED][-history:]
        totals: dict[str, float] = {}
        best: dict[str, tuple[float, str]] = {}
        for age, anchor in enumerate(reversed(consumed)):
            row = self.next_counts.get(anchor)
            if not row:
                continue
            scale = decay**age  # the service divides by self.next_totals[anchor] here
            for item, count in row.items():
                part = scale * count
                totals[item] = totals.get(item, 0.0) + part
                if part > best.get(item, (0.0, ""))[0]:
                    best[item] = (part, anchor)
        scores = {item: (total, best[item][1]) for item, total in totals.items()}
        if memo is not None:
            memo[key] = scores
        return scores


def raw_transitions(out: Path, trials: Optional[Sequence[dict[str, Any]]] = None, seed: int = 0) -> dict[str, Any]:
    """Leave-last-out on MovieLens: the pipeline with `RawTransitionsGraph`, a few weight sets
    scored on validation, the best one reported on test (next to the unchanged pipeline's
    numbers in the main report)."""
    from tastemaker.config import ServiceConfig
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
    # The weights the first full run tuned on leave_last_out validation, with the transition
    # window the sequential baseline chose (5), then the baseline's history/decay and stronger
    # transition weights.
    base = {
        "profile_weight": 2.0, "sequential_weight": 0.6, "collaborative_weight": 0.4, "popularity_weight": 0.0,
        "negative_weight": 0.5, "trending_weight": 0.05, "sequential_history": 3, "sequential_decay": 0.7,
        "sequential_window": 5,
    }
    longer = dict(base, sequential_history=5, sequential_decay=0.8)
    trials = list(trials or [
        base,
        longer,
        dict(longer, sequential_weight=1.0),
        dict(longer, sequential_weight=2.0),
        dict(longer, sequential_weight=1.0, profile_weight=0.5),
    ])
    method = pipeline.TastemakerPipeline(service, service_config.retrieval, service_config.profiles)
    result: dict[str, Any] = {"experiment": "raw_transitions", "trials": []}
    original = pipeline._FrozenGraph
    fitted = {}
    try:
        pipeline._FrozenGraph = RawTransitionsGraph  # type: ignore[misc]
        for name in ("validation", "test"):
            segment = getattr(split, name).segments[0]
            fitted[name] = (method.fit(TrainData(data, segment.train), {"sequential_window": 5}), segment)
    finally:
        pipeline._FrozenGraph = original  # type: ignore[misc]

    def score(name: str, params: dict[str, Any]) -> float:
        model, segment = fitted[name]
        retrieval, _ = pipeline.configs_for(service_config.retrieval, service_config.profiles, params)
        model.set_retrieval(retrieval)
        return float(per_user_accuracy(model.recommend(segment.users, 20), segment.targets)["ndcg@10"].mean())

    for params in trials:
        result["trials"].append({"params": params, "validation_ndcg@10": score("validation", params)})
    best = max(result["trials"], key=lambda t: t["validation_ndcg@10"])
    result["best"] = {**best, "test_ndcg@10": score("test", best["params"])}
    out.mkdir(parents=True, exist_ok=True)
    (out / "experiment_raw_transitions.json").write_text(json.dumps(result, indent=2))
    return result


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="EXPERIMENT: raw-count transitions in the service pipeline")
    parser.add_argument("--out", default="eval-out", help="folder for the result and the vector cache")
    args = parser.parse_args(argv)
    result = raw_transitions(Path(args.out))
    print(json.dumps(result["best"], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

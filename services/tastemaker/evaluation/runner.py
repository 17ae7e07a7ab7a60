"""`run_evaluation`: data → item vectors → per protocol: tune every method on validation, rank
the whole catalog for every test user, score, compare → report files."""

from __future__ import annotations

import math
from collections import OrderedDict
import platform
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from tastemaker.config import ProfileConfig, RetrievalConfig, ServiceConfig
from tastemaker.errors import InvalidArgument
from tastemaker.evaluation.baselines import Method, TrainData, baseline_methods
from tastemaker.evaluation.data import Interactions, load_interactions
from tastemaker.evaluation.encoding import item_vectors
from tastemaker.evaluation.metrics import (
    paired_bootstrap,
    per_user_accuracy,
    popularity_share,
    summarise,
)
from tastemaker.evaluation.pipeline import (
    QUICK_SEARCH_SEEDS,
    QUICK_SEARCH_SPACE,
    SEARCH_SEEDS,
    SEARCH_SPACE,
    TUNED_FIELDS,
    FittedPipeline,
    ServiceEvents,
    TastemakerPipeline,
    config_tree,
    configs_for,
    coordinate_search,
    fit_key,
    text_only,
)
from tastemaker.evaluation.protocols import (
    PROTOCOLS,
    TEST_QUANTILES,
    VALIDATION_QUANTILES,
    Fold,
    Segment,
    Split,
    make_split,
)

#: Length of every ranked list (Recall@20 needs 20).
LIST_LENGTH = 20
#: Metric that tuning maximises and the goals compare.
OBJECTIVE = "ndcg@10"
#: A test item with at most this many training interactions is in the cold-item slice.
COLD_MAX_TRAIN_INTERACTIONS = 2
#: Baselines that learn only from interactions (they cannot know a hidden item).
COLLABORATIVE_BASELINES = ("popularity", "item_knn", "als", "sequential")
ALL_METHODS = ("random", "popularity", "item_knn", "als", "sequential", "text_zero_shot", "tastemaker_defaults", "tastemaker")
#: User history-length buckets for the NDCG@10-vs-history plot: [low, high).
HISTORY_BUCKETS = ((1, 10), (10, 20), (20, 50), (50, 100), (100, 200), (200, 500), (500, None))


@dataclass
class EvalConfig:
    """What `tastemaker eval` runs. Defaults are the documented full run."""

    dataset: str = "movielens"
    out_dir: str = "eval-out"
    items_path: Optional[str] = None
    protocols: Sequence[str] = PROTOCOLS
    methods: Optional[Sequence[str]] = None  # None = ALL_METHODS
    seed: int = 0
    max_items: Optional[int] = None
    max_users: Optional[int] = None
    quick: bool = False  # small tuning grids (CI)
    cold_fraction: float = 0.1
    test_quantiles: Sequence[float] = TEST_QUANTILES
    validation_quantiles: Sequence[float] = VALIDATION_QUANTILES
    tuning_rounds: int = 1  # coordinate-search passes for Tastemaker's weights
    tuning_users: Optional[int] = None  # validation users scoring each Tastemaker trial (None = all)
    show_progress: bool = True
    service: ServiceConfig = field(default_factory=ServiceConfig)
    compare_encoder: Optional[str] = None  # a fine-tuned model folder: adds the text_finetuned method


def _progress(show: bool, **kwargs):
    from tqdm import tqdm

    return tqdm(disable=not show, leave=False, dynamic_ncols=True, **kwargs)


def _build_methods(config: EvalConfig, service_events: ServiceEvents) -> list[Method]:
    wanted = list(config.methods or ALL_METHODS)
    unknown = [m for m in wanted if m not in ALL_METHODS]
    if unknown:
        raise InvalidArgument(f"unknown method(s) {unknown}; allowed: {', '.join(ALL_METHODS)}")
    retrieval, profiles = config.service.retrieval, config.service.profiles
    defaults = TastemakerPipeline(
        service_events, retrieval, profiles, name="tastemaker_defaults",
        description="Tastemaker's full pipeline with the service config's weights (untuned)",
    )
    available: dict[str, Method] = {m.name: m for m in baseline_methods(config.seed)}
    available["text_zero_shot"] = text_only(service_events, retrieval, profiles)
    available["tastemaker_defaults"] = defaults
    available["tastemaker"] = TastemakerPipeline(service_events, retrieval, profiles)
    return [available[name] for name in ALL_METHODS if name in wanted]


class _FoldRunner:
    """Fits methods on the segments of one fold and pools their rankings."""

    def __init__(self, data: Interactions, fold: Fold):
        self.fold = fold
        self.trains = [TrainData(data, s.train, s.moment) for s in fold.segments]

    def sample(self, max_users: Optional[int], seed: int) -> "_FoldRunner":
        """The same training sets with at most `max_users` targets in all (a seeded sample), to
        bound the cost of a search that ranks every target once per trial."""
        if not max_users or self.fold.n_targets <= max_users:
            return self
        rng = np.random.default_rng([seed, 71])
        chosen = np.sort(rng.choice(self.fold.n_targets, size=max_users, replace=False))
        segments, offset = [], 0
        for segment in self.fold.segments:
            n = segment.users.shape[0]
            mine = chosen[(chosen >= offset) & (chosen < offset + n)] - offset
            segments.append(Segment(segment.train, segment.users[mine], segment.targets[mine], segment.label, segment.moment))
            offset += n
        sampled = _FoldRunner.__new__(_FoldRunner)
        sampled.fold = Fold(self.fold.name, segments)
        sampled.trains = self.trains
        return sampled

    def rank(self, fitted: Sequence[Any], show: bool, desc: str) -> list[np.ndarray]:
        with _progress(show, total=self.fold.n_targets, desc=desc, unit="user") as bar:
            return [f.recommend(s.users, LIST_LENGTH, progress=bar.update) for f, s in zip(fitted, self.fold.segments)]

    def objective(self, ranked: Sequence[np.ndarray]) -> float:
        values = [per_user_accuracy(r[:, :10], s.targets)[OBJECTIVE] for r, s in zip(ranked, self.fold.segments)]
        pooled = np.concatenate(values) if values else np.zeros(0)
        return float(pooled.mean()) if pooled.size else 0.0


def _tune(method: Method, runner: _FoldRunner, config: EvalConfig, label: str) -> tuple[dict[str, Any], float, list[dict]]:
    """Best parameters on validation (pooled NDCG@10) and every trial."""
    show = config.show_progress
    if isinstance(method, TastemakerPipeline) and method.name == "tastemaker":
        runner = runner.sample(config.tuning_users, config.seed)
        base, profiles = method.retrieval, method.profile_config
        space = QUICK_SEARCH_SPACE if config.quick else SEARCH_SPACE
        seeds = QUICK_SEARCH_SEEDS if config.quick else SEARCH_SEEDS
        fields = sorted(set(space) | {k for seed in seeds for k in seed}, key=TUNED_FIELDS.index)
        start = {name: _current(base, profiles, name) for name in fields}
        fitted_by_key: "OrderedDict[tuple, list[FittedPipeline]]" = OrderedDict()
        bar = _progress(show, desc=f"{label}: tuning tastemaker weights", unit="trial")

        def fitted_for(params: dict[str, Any]) -> list[FittedPipeline]:
            # Profiles and graph depend only on the fit fields; keep the last two fits.
            key = fit_key(params)
            if key in fitted_by_key:
                fitted_by_key.move_to_end(key)
                return fitted_by_key[key]
            while len(fitted_by_key) >= 2:
                for old in fitted_by_key.popitem(last=False)[1]:
                    _release(old)
            fitted_by_key[key] = [method.fit(t, dict(key)) for t in runner.trains]
            return fitted_by_key[key]

        def evaluate(params: dict[str, Any]) -> float:
            fitted = fitted_for(params)
            retrieval, _ = configs_for(base, profiles, params)
            for f in fitted:
                f.set_retrieval(retrieval)
            return runner.objective([f.recommend(s.users, LIST_LENGTH) for f, s in zip(fitted, runner.fold.segments)])

        def on_trial(params, value):
            bar.update(1)
            bar.set_postfix({OBJECTIVE: f"{value:.4f}"})

        best, value, trials = coordinate_search(
            evaluate, start, space, rounds=1 if config.quick else config.tuning_rounds, on_trial=on_trial, seeds=seeds
        )
        bar.close()
        for fitted in fitted_by_key.values():
            for f in fitted:
                _release(f)
        return best, value, trials
    grid = method.grid(config.quick)
    if len(grid) == 1:
        return grid[0], math.nan, []
    trials = []
    best, best_value = grid[0], -math.inf
    with _progress(show, total=len(grid), desc=f"{label}: tuning {method.name}", unit="trial") as bar:
        for params in grid:
            fitted = [method.fit(t, params) for t in runner.trains]
            value = runner.objective([f.recommend(s.users, LIST_LENGTH) for f, s in zip(fitted, runner.fold.segments)])
            trials.append({"params": params, "value": value})
            if value > best_value + 1e-12:
                best, best_value = params, value
            bar.update(1)
            bar.set_postfix({OBJECTIVE: f"{best_value:.4f}"})
    return best, best_value, trials


def _current(retrieval: RetrievalConfig, profiles: ProfileConfig, name: str) -> Any:
    """The value of a tuned field in the given service configs."""
    if name.startswith("profiles."):
        node: Any = profiles
        for part in name.split(".")[1:]:
            node = getattr(node, part)
        return node
    return getattr(retrieval, name)


def _release(fitted: Any) -> None:
    graph = getattr(getattr(fitted, "retriever", None), "graph", None)
    if graph is not None and hasattr(graph, "release"):
        graph.release()


def _bucket(length: int) -> str:
    for low, high in HISTORY_BUCKETS:
        if length >= low and (high is None or length < high):
            return f"{low}+" if high is None else f"{low}-{high - 1}"
    return "0"


def run_protocol(
    protocol: str, data: Interactions, vectors: np.ndarray, methods: Sequence[Method], config: EvalConfig
) -> dict[str, Any]:
    """One protocol: split, tune each method on validation, rank and score the test fold."""
    split: Split = make_split(
        protocol,
        data,
        seed=config.seed,
        test_quantiles=config.test_quantiles,
        validation_quantiles=config.validation_quantiles,
        cold_fraction=config.cold_fraction,
    )
    started = time.monotonic()
    validation, test = _FoldRunner(data, split.validation), _FoldRunner(data, split.test)
    if split.test.n_targets == 0:
        raise InvalidArgument(f"{protocol}: no test users (each needs a training event and a target)")
    # Per test user (pooled over segments): what every method is scored against.
    users = np.concatenate([s.users for s in split.test.segments])
    targets = np.concatenate([s.targets for s in split.test.segments])
    segment_of = np.concatenate([[s.label] * len(s.users) for s in split.test.segments])
    history = np.concatenate([t.history_length[s.users] for t, s in zip(test.trains, split.test.segments)])
    target_count = np.concatenate([t.popularity[s.targets] for t, s in zip(test.trains, split.test.segments)])
    cold = target_count <= COLD_MAX_TRAIN_INTERACTIONS
    # Popularity share for novelty: pooled segments use the largest training set's counts.
    reference = max(test.trains, key=lambda t: t.events.shape[0])
    share = popularity_share(reference.popularity, reference.n_train_users)
    result: dict[str, Any] = {
        "protocol": protocol,
        "description": split.description,
        "params": split.params,
        "validation": {"segments": [_segment_info(s) for s in split.validation.segments], "targets": split.validation.n_targets},
        "test": {"segments": [_segment_info(s) for s in split.test.segments], "targets": split.test.n_targets},
        "cold_slice_users": int(cold.sum()),
        "methods": {},
    }
    per_user: dict[str, dict[str, np.ndarray]] = {}
    for method in methods:
        label = f"{protocol}"
        t0 = time.monotonic()
        params, val_value, trials = (
            _tune(method, validation, config, label) if split.validation.n_targets else (method.grid(config.quick)[0], math.nan, [])
        )
        fitted = [method.fit(t, params) for t in test.trains]
        ranked_parts = test.rank(fitted, config.show_progress, f"{label}: ranking with {method.name}")
        for f in fitted:
            _release(f)
        ranked = np.concatenate(ranked_parts)
        accuracy = per_user_accuracy(ranked, targets)
        per_user[method.name] = accuracy
        entry = {
            "kind": method.kind,
            "description": method.description,
            "params": params,
            "validation_" + OBJECTIVE: None if math.isnan(val_value) else val_value,
            "trials": len(trials),
            "tuning_targets": (
                min(split.validation.n_targets, config.tuning_users or split.validation.n_targets)
                if method.name == "tastemaker" else split.validation.n_targets
            ),
            "test": summarise(ranked, targets, vectors, share, data.n_items, accuracy),
            "test_cold_slice": summarise(
                ranked[cold], targets[cold], vectors, share, data.n_items, {k: v[cold] for k, v in accuracy.items()}
            ),
            "ndcg@10_by_history_length": _by_history(history, accuracy[OBJECTIVE]),
            "seconds": round(time.monotonic() - t0, 1),
        }
        if trials:
            entry["tuning_trials"] = trials
        result["methods"][method.name] = entry
    result["comparison"] = _compare(result, per_user, config.seed)
    if "tastemaker" in result["methods"]:
        result["tuned_retrieval_config"] = config_tree(
            {k: v for k, v in result["methods"]["tastemaker"]["params"].items() if k in TUNED_FIELDS}
        )
    result["per_user"] = {
        "user_id": [data.user_ids[int(u)] for u in users],
        "segment": segment_of.tolist(),
        "history_length": history.tolist(),
        "target_item_id": [data.items[int(i)].item_id for i in targets],
        "target_train_interactions": target_count.tolist(),
        **{f"{name}:{metric}": values.tolist() for name, acc in per_user.items() for metric, values in acc.items()},
    }
    result["seconds"] = round(time.monotonic() - started, 1)
    return result


def _segment_info(segment) -> dict[str, Any]:
    return {"label": segment.label, "train_events": int(segment.train.shape[0]), "users": int(segment.users.shape[0])}


def _by_history(history: np.ndarray, values: np.ndarray) -> dict[str, dict[str, float]]:
    out = {}
    for low, high in HISTORY_BUCKETS:
        mask = (history >= low) & (history < (high if high is not None else np.inf))
        if mask.any():
            out[_bucket(low)] = {"users": int(mask.sum()), "mean": float(values[mask].mean())}
    return out


def _compare(result: dict[str, Any], per_user: dict[str, dict[str, np.ndarray]], seed: int) -> dict[str, Any]:
    """Tastemaker against the best baseline of this run, on test NDCG@10 (paired bootstrap CI)."""
    methods = result["methods"]
    baselines = [n for n, m in methods.items() if m["kind"] == "baseline"]
    if "tastemaker" not in methods or not baselines:
        return {}
    best = max(baselines, key=lambda n: methods[n]["test"][OBJECTIVE])
    comparison = {
        "metric": OBJECTIVE,
        "best_baseline": best,
        "best_baseline_value": methods[best]["test"][OBJECTIVE],
        "tastemaker_value": methods["tastemaker"]["test"][OBJECTIVE],
    }
    comparison.update(paired_bootstrap(per_user["tastemaker"][OBJECTIVE], per_user[best][OBJECTIVE], seed=seed))
    return comparison


def _goals(protocols: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The issue's goals, each with its numbers and whether it is met."""
    goals: dict[str, Any] = {}
    llo = protocols.get("leave_last_out", {}).get("comparison")
    if llo:
        ratio = llo["tastemaker_value"] / llo["best_baseline_value"] if llo["best_baseline_value"] > 0 else math.inf
        goals["leave_last_out"] = {
            "criterion": "tastemaker NDCG@10 >= 1.10 x the best baseline's",
            "tastemaker": llo["tastemaker_value"], "best_baseline": llo["best_baseline"],
            "best_baseline_value": llo["best_baseline_value"], "ratio": ratio,
            "gain_ci95": [llo["ci95_low"], llo["ci95_high"]], "met": bool(ratio >= 1.10),
        }
    cutoff = protocols.get("time_cutoff", {}).get("comparison")
    if cutoff:
        ratio = cutoff["tastemaker_value"] / cutoff["best_baseline_value"] if cutoff["best_baseline_value"] > 0 else math.inf
        goals["time_cutoff"] = {
            "criterion": "tastemaker NDCG@10 >= the best baseline's",
            "tastemaker": cutoff["tastemaker_value"], "best_baseline": cutoff["best_baseline"],
            "best_baseline_value": cutoff["best_baseline_value"], "ratio": ratio,
            "gain_ci95": [cutoff["ci95_low"], cutoff["ci95_high"]], "met": bool(ratio >= 1.0),
        }
    cold = protocols.get("cold_items", {}).get("methods")
    if cold and "tastemaker" in cold and "text_zero_shot" in cold:
        hr = {name: m["test_cold_slice"]["hr@10"] for name, m in cold.items()}
        collaborative = {n: hr[n] for n in COLLABORATIVE_BASELINES if n in hr}
        text_hr = hr["text_zero_shot"]
        kept = hr["tastemaker"] >= 0.95 * text_hr
        goals["cold_items"] = {
            "criterion": "cold-slice HR@10: tastemaker >= 0.95 x text_zero_shot, every collaborative baseline = 0",
            "tastemaker_hr@10": hr["tastemaker"], "text_zero_shot_hr@10": text_hr,
            "ratio": hr["tastemaker"] / text_hr if text_hr > 0 else math.nan,
            "collaborative_hr@10": collaborative,
            "met": bool(kept and all(v == 0 for v in collaborative.values())),
        }
        if "tastemaker_llo_weights" in hr:
            # The same criterion for the single config tuned on leave_last_out (what a service runs).
            goals["cold_items"]["tastemaker_llo_weights_hr@10"] = hr["tastemaker_llo_weights"]
            goals["cold_items"]["met_with_llo_weights"] = bool(
                hr["tastemaker_llo_weights"] >= 0.95 * text_hr and all(v == 0 for v in collaborative.values())
            )
    return goals


def _host() -> dict[str, Any]:
    import os

    info = {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()}
    for name in ("numpy", "scipy", "torch", "transformers", "implicit", "faiss"):
        try:
            module = __import__(name)
            info[name] = getattr(module, "__version__", "?")
        except Exception:  # noqa: BLE001 - a missing optional package is just not listed
            pass
    return info


def run_evaluation(config: EvalConfig) -> dict[str, Any]:
    """Run every protocol and write the report into `config.out_dir`; returns the report."""
    from tastemaker.evaluation.report import write_report

    unknown = [p for p in config.protocols if p not in PROTOCOLS]
    if unknown or not config.protocols:
        raise InvalidArgument(f"unknown or no protocol(s) {unknown}; allowed: {', '.join(PROTOCOLS)}")
    out = Path(config.out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    started = datetime.now(timezone.utc)
    t0 = time.monotonic()
    say = print if config.show_progress else (lambda *a, **k: None)
    data = load_interactions(
        config.dataset, items_path=config.items_path, seed=config.seed, max_items=config.max_items, max_users=config.max_users
    )
    say(f"eval: {data.name}: {data.n_items} items, {data.n_users} users, {data.n_events} events", flush=True)
    vectors, encoding = item_vectors(data.items, config.service.encoder, out / "cache", show_progress=config.show_progress)
    service_events = ServiceEvents(data, vectors)
    methods = _build_methods(config, service_events)
    finetuned_info = None
    if config.compare_encoder:  # the fine-tuned encoder next to the zero-shot one (evaluation/finetuned.py)
        from tastemaker.evaluation.finetuned import finetuned_method

        finetuned, finetuned_info = finetuned_method(config, data, out / "cache")
        methods.append(finetuned)
    protocols: dict[str, Any] = {}
    for protocol in config.protocols:
        say(f"eval: protocol {protocol}", flush=True)
        protocols[protocol] = run_protocol(protocol, data, vectors, methods, config)
        tuned = protocols[protocol].get("tuned_retrieval_config")
        if protocol == "leave_last_out" and tuned is not None:
            # The other protocols also show the one config a service would run with.
            tuned_params = protocols[protocol]["methods"]["tastemaker"]["params"]
            retrieval, profiles = configs_for(config.service.retrieval, config.service.profiles, tuned_params)
            methods = [*methods, TastemakerPipeline(
                service_events,
                retrieval,
                profiles,
                name="tastemaker_llo_weights",
                description="Tastemaker's full pipeline with the weights tuned on leave_last_out validation",
            )]
    report = {
        "report": "tastemaker-offline-evaluation",
        "started": started.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "seconds": round(time.monotonic() - t0, 1),
        "command": None,
        "config": {
            k: (list(v) if isinstance(v, tuple) else v)
            for k, v in asdict(config).items()
            if k not in ("service", "show_progress")
        },
        "dataset": {"name": data.name, **data.stats},
        "encoder": {"model_path": config.service.encoder.model_path or "bundled all-MiniLM-L6-v2", **encoding},
        "service_defaults": config_tree(
            {k: _current(config.service.retrieval, config.service.profiles, k) for k in TUNED_FIELDS}
        ),
        "host": _host(),
        "protocols": protocols,
        "goals": _goals(protocols),
    }
    if finetuned_info is not None:
        from tastemaker.evaluation.finetuned import compare

        report["encoder_comparison"] = compare(protocols, finetuned_info, config.seed)
    tuned_from = next((p for p in ("leave_last_out", "time_cutoff", "cold_items") if "tuned_retrieval_config" in protocols.get(p, {})), None)
    if tuned_from:
        report["tuned_retrieval_config"] = {"from_protocol": tuned_from, **protocols[tuned_from]["tuned_retrieval_config"]}
    write_report(report, out)
    return report

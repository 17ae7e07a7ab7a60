"""Report files (`tastemaker.evaluation.report`): tables with the best per column marked, plots,
per-user CSVs, and a tuned config that the service accepts as it is."""

from __future__ import annotations

import csv
import json
import math

from tastemaker.config import load_config
from tastemaker.evaluation.report import method_table, write_report


def _metrics(hr: float, ndcg: float, coverage: float) -> dict:
    return {
        "hr@10": hr, "ndcg@10": ndcg, "recall@20": hr, "mrr@10": ndcg, "coverage@10": coverage,
        "diversity@10": 0.5, "novelty@10": 3.0, "users": 2,
    }


def _method(kind: str, test: dict, params=None) -> dict:
    return {
        "kind": kind, "description": "", "params": params or {}, "validation_ndcg@10": 0.1, "trials": 3,
        "test": test, "test_cold_slice": _metrics(math.nan, math.nan, math.nan) | {"users": 0},
        "ndcg@10_by_history_length": {"1-9": {"users": 1, "mean": test["ndcg@10"]}, "10-19": {"users": 1, "mean": 0.0}},
    }


def _report() -> dict:
    protocol = {
        "protocol": "leave_last_out", "description": "last event per user", "params": {},
        "validation": {"segments": [{"label": "v", "train_events": 10, "users": 2}], "targets": 2},
        "test": {"segments": [{"label": "t", "train_events": 12, "users": 2}], "targets": 2},
        "cold_slice_users": 0,
        "methods": {
            "random": _method("reference", _metrics(0.5, 0.5, 1.0)),
            "popularity": _method("baseline", _metrics(0.5, 0.2, 0.1)),
            "tastemaker": _method("tastemaker", _metrics(0.5, 0.4, 0.2), {"profile_weight": 0.5, "sequential_weight": 2.0}),
        },
        "comparison": {"metric": "ndcg@10", "best_baseline": "popularity", "best_baseline_value": 0.2,
                       "tastemaker_value": 0.4, "gain": 1.0, "ci95_low": 0.2, "ci95_high": 2.0, "resamples": 10},
        "tuned_retrieval_config": {"profile_weight": 0.5, "sequential_weight": 2.0},
        "per_user": {"user_id": ["1", "2"], "segment": ["t", "t"], "tastemaker:ndcg@10": [0.8, 0.0]},
    }
    return {
        "report": "tastemaker-offline-evaluation", "started": "2026-11-22T00:00:00Z", "seconds": 1.0,
        "config": {"seed": 0, "quick": True},
        "dataset": {"name": "toy", "items": 4, "users": 2, "events": 14},
        "encoder": {"model_path": "bundled", "from_cache": True},
        "host": {"cpus": 2, "python": "3.11"},
        "protocols": {"leave_last_out": protocol},
        "goals": {"leave_last_out": {"criterion": "x", "tastemaker": 0.4, "best_baseline": "popularity",
                                     "best_baseline_value": 0.2, "ratio": 2.0, "gain_ci95": [0.2, 2.0], "met": True}},
        "tuned_retrieval_config": {
            "from_protocol": "leave_last_out",
            "retrieval": {"profile_weight": 0.5, "sequential_weight": 2.0},
            "profiles": {"weights": {"rating_centre": 0.0}},
        },
    }


def test_table_marks_the_best_per_column_but_never_the_random_floor():
    rows = method_table(_report()["protocols"]["leave_last_out"])
    random_row = next(r for r in rows if r.startswith("| random"))
    assert "**" not in random_row and "(floor)" in random_row
    tastemaker_row = next(r for r in rows if r.startswith("| tastemaker"))
    assert "**0.4000**" in tastemaker_row  # best NDCG@10 among non-reference methods
    popularity_row = next(r for r in rows if r.startswith("| popularity"))
    assert "**0.5000**" in popularity_row and "**0.5000**" in tastemaker_row  # ties are both marked
    assert "| – |" in tastemaker_row  # no cold slice: a dash, not NaN


def test_write_report_writes_every_file_and_strict_json(tmp_path):
    files = write_report(_report(), tmp_path)
    for name in ("report.md", "report.json", "metrics_leave_last_out.png", "ndcg_by_history_leave_last_out.png",
                 "per_user_leave_last_out.csv", "tuned_retrieval_config.yaml"):
        assert (tmp_path / name).is_file(), name
    assert (tmp_path / "metrics_leave_last_out.png").read_bytes()[:4] == b"\x89PNG"
    loaded = json.loads((tmp_path / "report.json").read_text())  # NaN became null: strict JSON
    assert loaded["protocols"]["leave_last_out"]["methods"]["random"]["test_cold_slice"]["hr@10"] is None
    assert "per_user" not in loaded["protocols"]["leave_last_out"]
    assert loaded["files"] == files
    with (tmp_path / "per_user_leave_last_out.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["tastemaker:ndcg@10"] for r in rows] == ["0.8", "0.0"]
    md = (tmp_path / "report.md").read_text()
    assert "## Goals" in md and "## leave_last_out" in md and "```yaml" in md and "+100.0%" not in md


def test_tuned_config_yaml_is_accepted_by_the_service_config(tmp_path):
    write_report(_report(), tmp_path)
    config = load_config(tmp_path / "tuned_retrieval_config.yaml", environ={})
    assert config.retrieval.profile_weight == 0.5 and config.retrieval.sequential_weight == 2.0
    assert config.profiles.weights.rating_centre == 0.0

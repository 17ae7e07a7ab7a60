"""`tastemaker eval` end to end on a MovieLens subsample, through the CLI entry point, with the
real bundled encoder: report files, every method in every protocol, metrics in range, and
properties that fail if the evaluation leaks or ranks nonsense."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest

from tastemaker.cli import main
from tastemaker.evaluation.data import load_interactions
from tastemaker.evaluation.protocols import leave_last_out
from tastemaker.evaluation.runner import ALL_METHODS, COLLABORATIVE_BASELINES

pytestmark = pytest.mark.integration

SUBSAMPLE = ["--max-items", "800", "--max-users", "150"]
UNIT_METRICS = ("hr@10", "ndcg@10", "recall@20", "mrr@10", "coverage@10")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval-out")
    code = main(
        ["eval", "--dataset", "movielens", *SUBSAMPLE, "--quick", "--cutoffs", "0.8", "--validation-cutoffs", "0.6",
         "--out", str(out), "--quiet"]
    )
    assert code == 0
    return out, json.loads((out / "report.json").read_text())


def test_report_files_exist(report):
    out, data = report
    for name in ("report.md", "report.json", "tuned_retrieval_config.yaml"):
        assert (out / name).is_file()
    for protocol in ("leave_last_out", "time_cutoff", "cold_items"):
        for prefix in ("metrics_", "ndcg_by_history_"):
            assert (out / f"{prefix}{protocol}.png").stat().st_size > 1000
        assert (out / f"per_user_{protocol}.csv").is_file()
    assert list((out / "cache").glob("item_vectors-*.npy")), "item vectors are cached in the out dir"
    md = (out / "report.md").read_text()
    assert "| tastemaker |" in md and "**" in md


def test_every_method_is_present_with_metrics_in_range(report):
    _, data = report
    for name, protocol in data["protocols"].items():
        expected = set(ALL_METHODS) | ({"tastemaker_llo_weights"} if name != "leave_last_out" else set())
        assert set(protocol["methods"]) == expected, name
        for method, entry in protocol["methods"].items():
            for metric in UNIT_METRICS:
                value = entry["test"][metric]
                assert 0.0 <= value <= 1.0, (name, method, metric, value)
            assert 0.0 <= entry["test"]["diversity@10"] <= 2.0
            assert 0.0 <= entry["test"]["novelty@10"] <= math.log2(data["dataset"]["users"] + 1) + 1e-9
        assert protocol["test"]["targets"] > 0


def test_popularity_beats_the_random_floor(report):
    _, data = report
    methods = data["protocols"]["leave_last_out"]["methods"]
    assert methods["popularity"]["test"]["hr@10"] > methods["random"]["test"]["hr@10"]
    assert methods["sequential"]["test"]["ndcg@10"] > methods["random"]["test"]["ndcg@10"]


def test_hidden_items_never_reach_the_collaborative_baselines(report):
    # If a hidden item leaked into any training set, some collaborative baseline would find it.
    _, data = report
    cold = data["protocols"]["cold_items"]
    assert cold["cold_slice_users"] == cold["test"]["targets"]
    for name in COLLABORATIVE_BASELINES:
        assert cold["methods"][name]["test"]["hr@10"] == 0.0, name
    assert cold["methods"]["text_zero_shot"]["test"]["recall@20"] > 0.0


def test_leave_last_out_test_items_are_never_training_items(report):
    out, _ = report
    data = load_interactions("movielens", max_items=800, max_users=150)
    test = leave_last_out(data).test.segments[0]
    train_pairs = set(zip(data.user[test.train].tolist(), data.item[test.train].tolist()))
    assert not train_pairs & set(zip(test.users.tolist(), test.targets.tolist()))
    with (out / "per_user_leave_last_out.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(test.users)
    # The report's targets are the split's: each user's last item.
    by_user = {data.user_ids[u]: data.items[i].item_id for u, i in zip(test.users, test.targets)}
    assert all(by_user[r["user_id"]] == r["target_item_id"] for r in rows)
    assert np.all(np.array([int(r["history_length"]) for r in rows]) >= 2)

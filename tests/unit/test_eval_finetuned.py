"""`tastemaker eval --compare-encoder`: a fine-tuned model is judged only if its training could
not have seen this run's targets, and the comparison pairs both text methods per protocol."""

from __future__ import annotations

import pytest

from tastemaker.errors import InvalidArgument
from tastemaker.evaluation.finetuned import FINETUNED, ZERO_SHOT, check_training_data, compare, markdown_lines
from tastemaker.evaluation.runner import EvalConfig
from tastemaker.training.config import TrainConfig


def _manifest(**train) -> dict:
    return {"config": TrainConfig(**train).model_dump(mode="json"), "steps": 58, "data": {"train_pairs": 1872}}


def test_model_trained_with_every_protocol_held_out_is_accepted():
    info = check_training_data(EvalConfig(protocols=("leave_last_out", "cold_items")), _manifest())
    assert "no target of this run was trained on" in info["training_data"] and info["steps"] == 58


@pytest.mark.parametrize(
    "train, evaluate, complaint",
    [
        ({"holdout": ("leave_last_out",)}, {"protocols": ("leave_last_out", "cold_items")}, "not held out"),
        ({}, {"seed": 1}, "seed"),
        ({"cold_fraction": 0.2}, {}, "cold_fraction"),
        ({"max_items": 500}, {}, "max_items"),
        ({"test_quantiles": (0.8,)}, {"protocols": ("time_cutoff",)}, "test_quantiles"),
    ],
)
def test_model_that_may_have_seen_targets_is_refused(train, evaluate, complaint):
    with pytest.raises(InvalidArgument, match=complaint):
        check_training_data(EvalConfig(**evaluate), _manifest(**train))


def test_model_without_manifest_is_marked_unknown():
    assert "unknown" in check_training_data(EvalConfig(), None)["training_data"]


def test_comparison_rows_and_markdown():
    def method(ndcg, hr, cold):
        return {"test": {"ndcg@10": ndcg, "hr@10": hr}, "test_cold_slice": {"hr@10": cold}}

    protocols = {
        "leave_last_out": {
            "methods": {ZERO_SHOT: method(0.01, 0.02, 0.0), FINETUNED: method(0.02, 0.03, 0.0)},
            "per_user": {f"{ZERO_SHOT}:ndcg@10": [0.0, 0.02, 0.01], f"{FINETUNED}:ndcg@10": [0.02, 0.02, 0.02]},
        }
    }
    out = compare(protocols, {"model_path": "/m", "training_data": "held out"}, seed=0)
    row = out["protocols"]["leave_last_out"]
    assert row[FINETUNED]["ndcg@10"] == 0.02 and row[ZERO_SHOT]["hr@10"] == 0.02
    assert row["ndcg@10_gain"]["gain"] == pytest.approx(0.06 / 0.03 - 1)
    text = "\n".join(markdown_lines({"encoder_comparison": out}))
    assert "| leave_last_out | 0.0100 | 0.0200 | 100.0% (" in text

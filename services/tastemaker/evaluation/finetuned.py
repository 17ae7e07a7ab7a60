"""The fine-tuned encoder against the zero-shot one (`tastemaker eval --compare-encoder DIR`).

`text_finetuned` is the `text_zero_shot` method — profile = decayed mean of item vectors,
cosine ranking, the service's own code path — with item vectors from the model folder `DIR`
(usually a `tastemaker train` output) instead of the configured encoder. Both run in the same
evaluation over the same splits, so their rows compare like for like.

A model trained by `tastemaker train` carries a manifest saying which events it learned from;
the comparison refuses a model whose training could have seen a validation or test target of
this run (different data, seed, cold fraction or cutoffs, or a protocol it did not hold out).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np

from tastemaker.errors import InvalidArgument
from tastemaker.evaluation.metrics import paired_bootstrap

#: Name of the added method.
FINETUNED = "text_finetuned"
ZERO_SHOT = "text_zero_shot"


def check_training_data(config: Any, manifest: Optional[dict[str, Any]]) -> dict[str, Any]:
    """What is known about the model's training data; raises when it may hold this run's targets."""
    if manifest is None:
        return {"training_data": "unknown (no tastemaker_train.json): the model may have seen test targets"}
    trained = manifest.get("config", {})
    problems = []
    for key in ("dataset", "items_path", "seed", "max_items", "max_users", "cold_fraction"):
        if trained.get(key) != getattr(config, key):
            problems.append(f"{key}: trained with {trained.get(key)!r}, evaluating with {getattr(config, key)!r}")
    for key in ("test_quantiles", "validation_quantiles"):
        if "time_cutoff" in config.protocols and [float(v) for v in trained.get(key, [])] != [float(v) for v in getattr(config, key)]:
            problems.append(f"{key}: trained with {trained.get(key)}, evaluating with {list(getattr(config, key))}")
    missing = [p for p in config.protocols if p not in trained.get("holdout", [])]
    if missing:
        problems.append(f"protocols {missing} were not held out in training (holdout {trained.get('holdout')})")
    if problems:
        raise InvalidArgument(
            "--compare-encoder: the model's training may have seen this evaluation's targets: "
            + "; ".join(problems)
            + ". Train with the same data options and --holdout covering every evaluated protocol."
        )
    return {
        "training_data": f"held out {', '.join(trained['holdout'])} (seed {trained['seed']}): no target of this run was trained on",
        "steps": manifest.get("steps"),
        "train_pairs": manifest.get("data", {}).get("train_pairs"),
        "final_loss": manifest.get("final_loss"),
        "held_out_loss_before": manifest.get("held_out_loss_before"),
        "held_out_loss_after": manifest.get("held_out_loss_after"),
    }


def finetuned_method(config: Any, data: Any, vectors_out: Path) -> tuple[Any, dict[str, Any]]:
    """(the text_finetuned method, report info) for `config.compare_encoder`."""
    from tastemaker.evaluation.encoding import item_vectors
    from tastemaker.evaluation.pipeline import ServiceEvents, text_only
    from tastemaker.training.trainer import read_manifest

    folder = Path(config.compare_encoder).expanduser()
    if not (folder / "config.json").is_file():
        raise InvalidArgument(f"--compare-encoder {folder}: not a model folder (no config.json)")
    info = {"model_path": str(folder), **check_training_data(config, read_manifest(folder))}
    encoder = config.service.encoder.model_copy(update={"model_path": str(folder)})
    vectors, encoding = item_vectors(data.items, encoder, vectors_out, show_progress=config.show_progress)
    info.update({k: v for k, v in encoding.items() if k in ("from_cache", "model_fingerprint", "cache_file")})
    method = text_only(ServiceEvents(data, vectors), config.service.retrieval, config.service.profiles)
    method.name = FINETUNED
    method.description = f"text only with the fine-tuned encoder ({folder.name}): same profile math and ranking as text_zero_shot"
    return method, info


def compare(protocols: dict[str, Any], info: dict[str, Any], seed: int) -> dict[str, Any]:
    """Per protocol: both methods' test NDCG@10 / HR@10 / cold-slice HR@10 and the paired
    bootstrap of the NDCG@10 difference (fine-tuned − zero-shot)."""
    out: dict[str, Any] = {**info, "protocols": {}}
    for name, protocol in protocols.items():
        methods = protocol["methods"]
        if FINETUNED not in methods or ZERO_SHOT not in methods:
            continue
        row = {
            method: {
                "ndcg@10": methods[method]["test"]["ndcg@10"],
                "hr@10": methods[method]["test"]["hr@10"],
                "cold_slice_hr@10": methods[method]["test_cold_slice"].get("hr@10"),
            }
            for method in (ZERO_SHOT, FINETUNED)
        }
        per_user = protocol.get("per_user", {})
        a, b = per_user.get(f"{FINETUNED}:ndcg@10"), per_user.get(f"{ZERO_SHOT}:ndcg@10")
        if a is not None and b is not None:
            row["ndcg@10_gain"] = paired_bootstrap(np.asarray(a, dtype=float), np.asarray(b, dtype=float), seed=seed)
        out["protocols"][name] = row
    return out


def markdown_lines(report: dict[str, Any]) -> list[str]:
    """The report.md section (empty without --compare-encoder)."""
    comparison = report.get("encoder_comparison")
    if not comparison:
        return []

    def fmt(value: Any, digits: int = 4) -> str:
        return "–" if value is None else f"{value:.{digits}f}"

    lines = [
        "## Fine-tuned encoder vs zero-shot (text-only method)",
        "",
        f"- model: {comparison['model_path']}; {comparison['training_data']}"
        + (f"; {comparison['steps']} steps on {comparison['train_pairs']} pairs" if comparison.get("steps") else ""),
        "",
        "| protocol | zero-shot NDCG@10 | fine-tuned NDCG@10 | gain (95% CI) | zero-shot HR@10 | fine-tuned HR@10 | zero-shot cold HR@10 | fine-tuned cold HR@10 |",
        "|---|---:|---:|---|---:|---:|---:|---:|",
    ]
    for name, row in comparison["protocols"].items():
        zs, ft = row[ZERO_SHOT], row[FINETUNED]
        gain = row.get("ndcg@10_gain") or {}
        gain_text = (
            f"{fmt(gain.get('gain') * 100 if gain.get('gain') is not None else None, 1)}% "
            f"({fmt(gain.get('ci95_low') * 100 if gain.get('ci95_low') is not None else None, 1)}% … "
            f"{fmt(gain.get('ci95_high') * 100 if gain.get('ci95_high') is not None else None, 1)}%)"
        )
        lines.append(
            f"| {name} | {fmt(zs['ndcg@10'])} | {fmt(ft['ndcg@10'])} | {gain_text} | {fmt(zs['hr@10'])} | "
            f"{fmt(ft['hr@10'])} | {fmt(zs['cold_slice_hr@10'])} | {fmt(ft['cold_slice_hr@10'])} |"
        )
    return lines + [""]

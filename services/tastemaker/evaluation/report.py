"""Report files: report.json (everything), report.md (tables with the best per column marked),
per-user CSVs, PNG plots (matplotlib, Agg backend) and the tuned weights as a YAML snippet."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import yaml

#: Columns of the markdown table: (report key, header, where).
TABLE_COLUMNS = (
    ("hr@10", "HR@10", "test"),
    ("ndcg@10", "NDCG@10", "test"),
    ("recall@20", "Recall@20", "test"),
    ("mrr@10", "MRR@10", "test"),
    ("coverage@10", "Coverage@10", "test"),
    ("diversity@10", "ILD@10", "test"),
    ("novelty@10", "Novelty@10 (bits)", "test"),
    ("hr@10", "cold HR@10", "test_cold_slice"),
    ("ndcg@10", "cold NDCG@10", "test_cold_slice"),
)


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _json_safe(value: Any) -> Any:
    """NaN/inf are not JSON: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return _json_safe(value.item())
    return value


def method_table(protocol: dict[str, Any]) -> list[str]:
    """Markdown rows: method x metric, the best value per column in bold (the random floor is
    shown but never marked)."""
    methods = protocol["methods"]
    header = "| method | " + " | ".join(h for _, h, _ in TABLE_COLUMNS) + " |"
    rule = "|---|" + "---:|" * len(TABLE_COLUMNS)
    best: dict[int, float] = {}
    for col, (key, _, where) in enumerate(TABLE_COLUMNS):
        values = [
            m[where].get(key)
            for m in methods.values()
            if m["kind"] != "reference" and m[where].get(key) is not None and not math.isnan(m[where].get(key))
        ]
        if values:
            best[col] = max(values)
    rows = [header, rule]
    for name, m in methods.items():
        cells = []
        for col, (key, _, where) in enumerate(TABLE_COLUMNS):
            value = m[where].get(key)
            text = _fmt(value, 2 if key == "novelty@10" else 4)
            if m["kind"] != "reference" and col in best and value is not None and not math.isnan(value) and value == best[col]:
                text = f"**{text}**"
            cells.append(text)
        label = f"{name} (floor)" if m["kind"] == "reference" else name
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
    return rows


def tuned_yaml(tuned: dict[str, Any]) -> str:
    """The tuned settings as `retrieval:` (and `profiles:`) sections of the service YAML."""
    return yaml.safe_dump(_json_safe({k: v for k, v in tuned.items() if k != "from_protocol"}), sort_keys=False)


def markdown(report: dict[str, Any]) -> str:
    ds = report["dataset"]
    lines = [
        "# Tastemaker offline evaluation",
        "",
        f"- started {report['started']}, {report['seconds']:.0f} s; seed {report['config']['seed']}"
        + (", quick tuning grids" if report["config"].get("quick") else ""),
        f"- data: **{ds['name']}**, {ds['items']} items, {ds['users']} users, {ds['events']} events"
        + (f" ({ds.get('first_event', '')[:10]} – {ds.get('last_event', '')[:10]})" if ds.get("first_event") else ""),
        f"- encoder: {report['encoder']['model_path']} (vectors {'from cache' if report['encoder'].get('from_cache') else 'encoded'})",
        f"- host: {report['host'].get('cpus')} CPUs, Python {report['host'].get('python')}",
        "- full ranking over the whole catalog minus each user's training items; no sampled negatives; "
        "every method tuned on validation only (NDCG@10), reported on test. Best per column in **bold** "
        "(the random floor is never marked). Cold slice = test items with ≤ 2 training interactions.",
        "",
    ]
    from tastemaker.evaluation.finetuned import markdown_lines

    lines += markdown_lines(report)  # fine-tuned vs zero-shot encoder, with --compare-encoder
    goals = report.get("goals") or {}
    if goals:
        lines += ["## Goals", "", "| protocol | criterion | numbers | met |", "|---|---|---|---|"]
        for name, goal in goals.items():
            if name == "cold_items":
                collab = ", ".join(f"{k} {_fmt(v)}" for k, v in goal["collaborative_hr@10"].items())
                numbers = (
                    f"tastemaker {_fmt(goal['tastemaker_hr@10'])} vs text {_fmt(goal['text_zero_shot_hr@10'])} "
                    f"({_fmt(goal['ratio'], 3)}x); {collab}"
                )
                if "tastemaker_llo_weights_hr@10" in goal:
                    numbers += (
                        f"; with the leave_last_out weights tastemaker gets {_fmt(goal['tastemaker_llo_weights_hr@10'])} "
                        f"({'met' if goal['met_with_llo_weights'] else 'not met'})"
                    )
            else:
                low, high = goal["gain_ci95"]
                numbers = (
                    f"tastemaker {_fmt(goal['tastemaker'])} vs {goal['best_baseline']} {_fmt(goal['best_baseline_value'])} "
                    f"= {_fmt(goal['ratio'], 3)}x (gain 95% CI {_fmt(low * 100 if low is not None else None, 1)}% … "
                    f"{_fmt(high * 100 if high is not None else None, 1)}%)"
                )
            lines.append(f"| {name} | {goal['criterion']} | {numbers} | {'yes' if goal['met'] else '**no**'} |")
        lines.append("")
    for name, protocol in report["protocols"].items():
        segments = protocol["test"]["segments"]
        segment_text = ", ".join(f"{s['label']}: {s['users']}" for s in segments)
        lines += [
            f"## {name}",
            "",
            f"{protocol['description']}. Test: {protocol['test']['targets']} targets in {len(segments)} segment(s) "
            f"({segment_text}); validation: {protocol['validation']['targets']} "
            f"targets; cold slice: {protocol['cold_slice_users']} test users.",
            "",
            *method_table(protocol),
            "",
        ]
        comparison = protocol.get("comparison")
        if comparison:
            lines.append(
                f"Tastemaker vs the best baseline ({comparison['best_baseline']}) on NDCG@10: "
                f"{_fmt(comparison['gain'] * 100, 1)}% (paired bootstrap over users, 95% CI "
                f"{_fmt(comparison['ci95_low'] * 100, 1)}% … {_fmt(comparison['ci95_high'] * 100, 1)}%)."
            )
            lines.append("")
        lines += ["Tuned on validation:", ""]
        for method, m in protocol["methods"].items():
            if m["params"]:
                value = m.get("validation_ndcg@10")
                lines.append(f"- {method}: `{json.dumps(_json_safe(m['params']))}` (validation NDCG@10 {_fmt(value)}, {m['trials']} trials)")
        lines += [
            "",
            f"![metrics per method](metrics_{name}.png)",
            f"![NDCG@10 by history length](ndcg_by_history_{name}.png)",
            "",
        ]
    tuned = report.get("tuned_retrieval_config")
    if tuned:
        lines += [
            "## Tuned retrieval config",
            "",
            f"Tuned on {tuned['from_protocol']} validation; paste into the service YAML (`--config`), also written "
            "to `tuned_retrieval_config.yaml`:",
            "",
            "```yaml",
            tuned_yaml(tuned).rstrip(),
            "```",
            "",
        ]
    return "\n".join(lines)


def plot(report: dict[str, Any], out: Path) -> list[str]:
    """Metric bars per method and NDCG@10 by history length, one pair of PNGs per protocol."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    written = []
    metrics = ("hr@10", "ndcg@10", "recall@20", "mrr@10")
    for name, protocol in report["protocols"].items():
        methods = list(protocol["methods"])
        fig, ax = plt.subplots(figsize=(10, 4.5))
        width = 0.8 / max(len(methods), 1)
        x = np.arange(len(metrics) + 1)
        for i, method in enumerate(methods):
            m = protocol["methods"][method]
            values = [m["test"].get(k) or 0.0 for k in metrics] + [m["test_cold_slice"].get("hr@10") or 0.0]
            values = [0.0 if (isinstance(v, float) and math.isnan(v)) else v for v in values]
            ax.bar(x + (i - (len(methods) - 1) / 2) * width, values, width, label=method)
        ax.set_xticks(x, [*metrics, "cold hr@10"])
        ax.set_ylabel("test value")
        ax.set_title(f"{report['dataset']['name']} — {name}")
        ax.legend(fontsize=8, ncol=2)
        fig.tight_layout()
        path = out / f"metrics_{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path.name)

        fig, ax = plt.subplots(figsize=(8, 4.5))
        for method in methods:
            buckets = protocol["methods"][method]["ndcg@10_by_history_length"]
            labels = [b for b, v in buckets.items() if v["users"] >= 1]
            ax.plot(labels, [buckets[b]["mean"] for b in labels], marker="o", label=method)
        ax.set_xlabel("training events of the user")
        ax.set_ylabel("test NDCG@10")
        ax.set_title(f"NDCG@10 by history length — {name}")
        ax.legend(fontsize=8, ncol=2)
        fig.tight_layout()
        path = out / f"ndcg_by_history_{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path.name)
    return written


def write_report(report: dict[str, Any], out: Path) -> dict[str, str]:
    """Write every report file into `out`; per-user rows go to CSVs, not into report.json."""
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, str] = {}
    for name, protocol in report["protocols"].items():
        per_user = protocol.pop("per_user", None)
        if per_user:
            path = out / f"per_user_{name}.csv"
            columns = list(per_user)
            with path.open("w", newline="", encoding="utf-8") as f:
                writer = csv.writer(f)
                writer.writerow(columns)
                writer.writerows(zip(*(per_user[c] for c in columns)))
            files[f"per_user_{name}"] = path.name
    for png in plot(report, out):
        files[png.removesuffix(".png")] = png
    tuned = report.get("tuned_retrieval_config")
    if tuned:
        (out / "tuned_retrieval_config.yaml").write_text(
            f"# Tastemaker retrieval weights tuned on {tuned['from_protocol']} validation ({report['started']}).\n"
            + tuned_yaml(tuned)
        )
        files["tuned_retrieval_config"] = "tuned_retrieval_config.yaml"
    files["report_md"] = "report.md"
    files["report_json"] = "report.json"
    report["files"] = files
    (out / "report.md").write_text(markdown(report))
    tmp = out / "report.json.tmp"
    tmp.write_text(json.dumps(_json_safe(report), indent=2, allow_nan=False))
    tmp.replace(out / "report.json")
    return files

"""One shape for a benchmark figure: its value, and where it has one, the baseline measured in the
same run and the ratio value / baseline."""

from __future__ import annotations

from typing import Optional


def figure(
    name: str,
    value: float,
    unit: str,
    baseline: Optional[str] = None,
    baseline_value: Optional[float] = None,
    ratio: Optional[float] = None,
    digits: int = 3,
) -> dict:
    """`value` and `baseline_value` rounded to `digits`, the ratio to 3 decimals."""
    out = {"name": name, "value": round(float(value), digits), "unit": unit}
    if baseline is not None:
        out.update(baseline=baseline, baseline_value=round(float(baseline_value), digits))
    if ratio is not None:
        out["ratio"] = round(float(ratio), 3)
    return out

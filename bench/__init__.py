"""Tastemaker benchmarks (importable as `tastemaker_bench`). Each prints JSON as described in
`bench/README.md`; `tastemaker bench NAME ...` runs them."""

from __future__ import annotations

import importlib

#: benchmark name -> module under this package with a `main(argv) -> int`.
BENCHMARKS = {
    "auth": "tastemaker_bench.auth",
    "bulk-encode": "tastemaker_bench.bulk_encode",
    "e2e": "tastemaker_bench.e2e",
    "encoder": "tastemaker_bench.encoder",
    "freshness": "tastemaker_bench.freshness",
    "overload": "tastemaker_bench.overload",
    "retrieval": "tastemaker_bench.retrieval",
    "stores": "tastemaker_bench.stores",
}


def run_benchmark(name: str, argv: list[str]) -> int:
    """Run one benchmark by name with its own arguments."""
    if name not in BENCHMARKS:
        raise SystemExit(f"unknown benchmark {name!r}; available: {', '.join(sorted(BENCHMARKS))}")
    return importlib.import_module(BENCHMARKS[name]).main(argv)

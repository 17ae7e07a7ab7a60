"""Item vectors for evaluation: the service's encoder over `Item.text()`, computed once and cached.

The cache is an ``.npy`` file in the output folder named by a hash of the model (its folder's
file names, sizes and modification times, plus pooling and max length) and of every item text in
order, so a changed catalog, text or model never reuses stale vectors.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Sequence

import numpy as np

from tastemaker.config import EncoderConfig
from tastemaker.domain import Item


def model_fingerprint(config: EncoderConfig) -> str:
    """What identifies the encoder's output: its files (names, sizes, mtimes) and settings."""
    from tastemaker.encoder.transformers_backend import TransformersBackend

    folder = TransformersBackend(config).model_path
    parts = [f"backend={config.backend}", f"pooling={config.pooling}", f"max_length={config.max_length}"]
    if folder.is_dir():
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            stat = path.stat()
            parts.append(f"{path.relative_to(folder)}:{stat.st_size}:{int(stat.st_mtime)}")
    else:
        parts.append(f"missing:{folder}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def texts_key(texts: Sequence[str], fingerprint: str) -> str:
    """Cache key of a list of texts encoded by one model."""
    h = hashlib.sha256(fingerprint.encode())
    for text in texts:
        h.update(b"\x00")
        h.update(text.encode("utf-8"))
    return h.hexdigest()[:20]


def item_vectors(
    items: Sequence[Item],
    config: EncoderConfig,
    cache_dir: Path,
    show_progress: bool = True,
    chunk: int = 256,
) -> tuple[np.ndarray, dict]:
    """Vectors of `Item.text()` for every item (rows in `items` order), from the cache when the
    same texts were encoded by the same model before; returns (vectors, info)."""
    texts = [item.text() for item in items]
    fingerprint = model_fingerprint(config)
    key = texts_key(texts, fingerprint)
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / f"item_vectors-{key}.npy"
    info = {"cache_file": str(path), "texts": len(texts), "model_fingerprint": fingerprint[:20]}
    if path.is_file():
        vectors = np.load(path, allow_pickle=False)
        if vectors.shape[0] == len(texts):
            return vectors, info | {"from_cache": True, "dimension": int(vectors.shape[1])}
    from tqdm import tqdm

    from tastemaker.encoder import create_backend

    backend = create_backend(config)
    backend.start()
    parts = []
    with tqdm(total=len(texts), desc="encoding item texts", unit="item", disable=not show_progress) as bar:
        for start in range(0, len(texts), chunk):
            parts.append(backend.encode(texts[start : start + chunk]))
            bar.update(min(chunk, len(texts) - start))
    vectors = np.concatenate(parts) if parts else np.zeros((0, backend.dimension), dtype=np.float32)
    vectors = vectors.astype(np.float32)
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, vectors, allow_pickle=False)
    tmp.replace(path)  # atomic: a cut-off run never leaves a truncated cache behind
    path.with_suffix(".json").write_text(json.dumps(info | {"dimension": int(vectors.shape[1])}, indent=2))
    return vectors, info | {"from_cache": False, "dimension": int(vectors.shape[1])}

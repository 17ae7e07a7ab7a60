"""The GPU backend: embeddings through vLLM's pooling runner, and short-text generation.

Follows vLLM's documented offline API (vLLM >= 0.10; the old `task="embed"` is gone):

* embeddings: `LLM(model=..., runner="pooling", pooler_config=PoolerConfig(pooling_type=..., normalize=True))`
  and `llm.embed(prompts)`, each output carrying `.outputs.embedding`;
* generation: a second `LLM(model=..., runner="generate")` and `llm.generate(prompts, SamplingParams(...))`,
  each output carrying `.outputs[0].text`.

vLLM is an optional extra (`pip install '.[vllm]'`: it pins its own torch and transformers), imported
only in `start()`; `create_backend` refuses a vllm config up front when the package is missing.
Texts are tokenised here with vLLM's own tokenizer and truncated on the right to `max_length`
(like the other backends; vLLM's `truncate_prompt_tokens` would keep the *last* tokens), then
passed as token-id prompts, so an over-long text never reaches vLLM's length check.

Where this was run: its logic is tested on CPU against a stand-in module that follows the API above
(tests/unit/test_encoder_vllm.py); see services/tastemaker/encoder/README.md for what ran on a GPU.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from tastemaker.config import EncoderConfig
from tastemaker.encoder.base import BackendUnavailable, l2_normalise, resolve_model_path

#: config.pooling -> vLLM's pooling_type.
POOLING_TYPES = {"mean": "MEAN", "cls": "CLS", "last": "LAST"}


def import_vllm() -> Any:
    """The vllm module, or `BackendUnavailable` naming the install command."""
    try:
        return importlib.import_module("vllm")
    except ImportError as exc:
        raise BackendUnavailable(
            "encoder.backend 'vllm' needs vLLM, which is not installed: run `pip install '.[vllm]'` on a "
            f"machine with a CUDA GPU (or choose encoder.backend 'transformers') ({exc})"
        ) from exc


class VLLMBackend:
    """`EncoderBackend` over a vLLM pooling engine, plus `generate` for short texts."""

    def __init__(self, config: EncoderConfig):
        self.config = config
        self.model_path: Path = resolve_model_path(config)
        self.dimension = 0
        self.max_length = config.vllm_max_model_len or config.max_length
        self._vllm: Any = None
        self._llm: Any = None
        self._generator: Any = None
        self._tokenizer: Any = None
        self._filler_ids: list[int] = []

    # -- lifecycle ------------------------------------------------------------------------------
    def _engine_args(self, model: Path, runner: str) -> dict[str, Any]:
        # Embedding prompts are truncated to max_length, so the pooling engine needs no longer
        # context; a generation engine keeps the model's own unless vllm_max_model_len says otherwise.
        return {
            "model": str(model),
            "runner": runner,
            "dtype": self.config.dtype,
            "max_model_len": self.max_length if runner == "pooling" else self.config.vllm_max_model_len,
            "gpu_memory_utilization": self.config.vllm_gpu_memory_utilization,
            "enforce_eager": self.config.vllm_enforce_eager,
        }

    def start(self) -> None:
        """Start the pooling engine (and load the tokenizer), then warm up."""
        self._vllm = import_vllm()
        from_config = importlib.import_module("vllm.config")
        pooler_config = from_config.PoolerConfig(pooling_type=POOLING_TYPES[self.config.pooling], normalize=True)
        self._llm = self._vllm.LLM(**self._engine_args(self.model_path, "pooling"), pooler_config=pooler_config)
        self._tokenizer = self._llm.get_tokenizer()
        # A text with no tokens at all (empty, for tokenizers without special tokens) is not a
        # valid prompt; it is embedded as this instead.
        self._filler_ids = list(self._tokenizer(" ")["input_ids"]) or [int(self._tokenizer.eos_token_id or 0)]
        warm = self._embed(["warm-up text for the encoder"])
        self.dimension = int(warm.shape[1])

    # -- embeddings -------------------------------------------------------------------------
    def _prompts(self, texts: Sequence[str]) -> list[dict[str, list[int]]]:
        ids = self._tokenizer(list(texts), truncation=True, max_length=self.max_length)["input_ids"]
        return [{"prompt_token_ids": list(row) or list(self._filler_ids)} for row in ids]

    def _embed(self, texts: Sequence[str]) -> np.ndarray:
        outputs = self._llm.embed(self._prompts(texts), use_tqdm=False)
        if len(outputs) != len(texts):
            raise RuntimeError(f"vLLM returned {len(outputs)} embeddings for {len(texts)} texts")
        return l2_normalise(np.asarray([out.outputs.embedding for out in outputs], dtype=np.float32))

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Vectors in input order. vLLM schedules and batches internally (continuous batching),
        so the whole list goes in one call."""
        if self._llm is None:
            raise RuntimeError("VLLMBackend.encode called before start()")
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        return self._embed(texts)

    # -- generation -------------------------------------------------------------------------
    def generate(self, prompts: Sequence[str], max_tokens: Optional[int] = None) -> list[str]:
        """Greedy completions of short prompts (e.g. explanations), by the generation model.

        The generation engine starts on first use: it needs `encoder.generation_model_path`."""
        if self._llm is None:
            raise RuntimeError("VLLMBackend.generate called before start()")
        if not self.config.generation_model_path:
            raise RuntimeError("text generation needs encoder.generation_model_path (a local generative model folder)")
        if not prompts:
            return []
        if self._generator is None:
            self._generator = self._vllm.LLM(
                **self._engine_args(Path(self.config.generation_model_path).expanduser(), "generate")
            )
        params = self._vllm.SamplingParams(
            max_tokens=max_tokens or self.config.generation_max_tokens, temperature=0.0
        )
        outputs = self._generator.generate(list(prompts), params, use_tqdm=False)
        return [out.outputs[0].text for out in outputs]

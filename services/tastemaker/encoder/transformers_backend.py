"""A BERT-class encoder run with `transformers` (CPU or CUDA): mean, CLS or last-token pooling,
fp32 / fp16 / bf16 weights, SDPA attention, length-sorted batches, tokenisation overlapped with
the forward pass (`BatchPipeline`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from tastemaker.config import EncoderConfig
from tastemaker.encoder.base import (
    WARM_UP_TEXTS,
    BatchPipeline,
    bundled_model_path,
    check_model_folder,
    effective_max_length,
    resolve_model_path,
)

__all__ = ["TransformersBackend", "bundled_model_path", "pool_hidden_states"]


def pool_hidden_states(hidden: Any, attention_mask: Any, pooling: str) -> Any:
    """One vector per sequence from token vectors (torch tensors), not yet normalised.

    mean: average of the non-padding tokens; cls: the first token; last: the last non-padding
    token (for decoder embedding models; assumes right padding, which the tokenizers here use)."""
    import torch

    if pooling == "cls":
        return hidden[:, 0]
    if pooling == "last":
        last = attention_mask.sum(dim=1) - 1
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


class TransformersBackend:
    """`EncoderBackend` over `transformers.AutoModel` loaded from a local folder, never a hub."""

    def __init__(self, config: EncoderConfig):
        self.config = config
        self.model_path: Path = resolve_model_path(config)
        self.dimension = 0
        self.max_length = config.max_length
        self.device = config.device
        self._model = None
        self._tokenizer = None
        self._pipeline: BatchPipeline | None = None

    def start(self) -> None:
        """Load tokenizer and model offline, then warm up with one batch."""
        # No hub access exists here or in CI; refuse it explicitly so a bad path fails fast.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        import torch
        from transformers import AutoModel, AutoTokenizer

        check_model_folder(self.model_path)
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeError(f"encoder.device is {self.device!r} but torch sees no CUDA device")
        if self.config.intra_op_threads:
            torch.set_num_threads(self.config.intra_op_threads)
        dtype = getattr(torch, self.config.resolved_dtype())
        self._tokenizer = AutoTokenizer.from_pretrained(str(self.model_path))
        model = AutoModel.from_pretrained(
            str(self.model_path), dtype=dtype, attn_implementation=self.config.attention
        )
        self._model = model.to(self.device).eval()
        self.dimension = int(model.config.hidden_size)
        self.max_length = effective_max_length(self.config.max_length, self._tokenizer, model.config)
        self._pipeline = BatchPipeline.from_config(self._tokenize, self._forward, self.dimension, self.config)
        self.encode(list(WARM_UP_TEXTS))

    def _tokenize(self, texts: list[str]) -> Any:
        batch = self._tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        if self.device.startswith("cuda"):
            # Pinned host memory lets the copy to the GPU overlap with the previous batch's kernels.
            batch = {k: v.pin_memory() for k, v in batch.items()}
        return batch

    def _forward(self, batch: Any) -> np.ndarray:
        import torch

        with torch.inference_mode():
            inputs = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
            hidden = self._model(**inputs).last_hidden_state
            pooled = pool_hidden_states(hidden, inputs["attention_mask"], self.config.pooling)
            pooled = torch.nn.functional.normalize(pooled.float(), p=2, dim=1)
            return pooled.cpu().numpy()

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Encode texts; sorted by length inside so padding is minimal, returned in input order."""
        if self._pipeline is None:
            raise RuntimeError("TransformersBackend.encode called before start()")
        return self._pipeline.encode(list(texts))

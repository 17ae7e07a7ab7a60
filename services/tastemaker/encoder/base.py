"""The encoder backend protocol and the factory that picks a backend from config."""

from __future__ import annotations

from typing import Protocol, Sequence

import numpy as np

from tastemaker.config import EncoderConfig


class EncoderBackend(Protocol):
    """Turns texts into L2-normalised float32 vectors of a fixed dimension.

    Lifecycle is explicit: constructing a backend loads nothing; `start()` loads the model and
    warms it up; `encode` may be called only after `start()`.
    """

    dimension: int

    def start(self) -> None:
        """Load weights and run one warm-up batch."""

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Return an array of shape (len(texts), dimension), dtype float32, rows of unit norm."""


def create_backend(config: EncoderConfig) -> EncoderBackend:
    """Build (but do not start) the backend named by `config.backend`."""
    if config.backend == "transformers":
        from tastemaker.encoder.transformers_backend import TransformersBackend

        return TransformersBackend(config)
    raise ValueError(f"unknown encoder backend {config.backend!r}; allowed: 'transformers'")

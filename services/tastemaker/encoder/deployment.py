"""The encoder pool: a Serve deployment around an `EncoderBackend`, with dynamic batching.

Callers send lists of texts; each text joins the shared `@serve.batch` queue so texts from many
concurrent callers fill one forward pass. Batch size and linger are hot-reloadable through
`user_config` (`reconfigure`)."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
from ray import serve

from tastemaker.config import EncoderConfig
from tastemaker.encoder.base import create_backend


@serve.deployment(name="Encoder")
class EncoderDeployment:
    """Thin shell: loads the backend at start-up (warm before the replica reports healthy)."""

    def __init__(self, config: EncoderConfig):
        self.config = config
        self.backend = create_backend(config)
        self.backend.start()  # the replica is not ready until this returns: health follows warmth

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Hot reload of batching knobs, e.g. {"max_batch_size": 128, "batch_wait_timeout_s": 0.01}."""
        if "max_batch_size" in user_config:
            self._encode_batch.set_max_batch_size(int(user_config["max_batch_size"]))
        if "batch_wait_timeout_s" in user_config:
            self._encode_batch.set_batch_wait_timeout_s(float(user_config["batch_wait_timeout_s"]))

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.005)
    async def _encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        # Run the forward pass off the event loop so new requests keep queueing into the next batch.
        vectors = await asyncio.to_thread(self.backend.encode, texts)
        return list(vectors)

    async def encode(self, texts: list[str]) -> np.ndarray:
        """Vectors for `texts`, shape (len(texts), dimension)."""
        if not texts:
            return np.zeros((0, self.backend.dimension), dtype=np.float32)
        vectors = await asyncio.gather(*(self._encode_batch(t) for t in texts))
        return np.stack(vectors)

    def dimension(self) -> int:
        return self.backend.dimension

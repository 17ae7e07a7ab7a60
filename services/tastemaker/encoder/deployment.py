"""The encoder pool: a Serve deployment around an `EncoderBackend`, with dynamic batching.

Callers send lists of texts; each text joins the shared `@serve.batch` queue, so texts from many
concurrent callers fill one forward pass. Batch size and linger are hot-reloadable through
`user_config` (`reconfigure`). With `max_concurrent_batches` = 2 the next batch is tokenised while
the current one runs (the backend's model lock keeps forward passes one at a time).

`deployment_options(config)` turns an `EncoderConfig` into the `.options(...)` of the deployment
(replicas or autoscaling, resources, request limits, the batching `user_config`); `build_app` and
the encoder benchmark both use it.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import Any, Callable, Optional

import numpy as np
from ray import serve

from tastemaker.config import EncoderConfig
from tastemaker.encoder.base import EncoderBackend, create_backend
from tastemaker.encoder.identity import model_identity

#: Keys `reconfigure` accepts, with their checks (the same bounds as `EncoderConfig`).
HOT_RELOADABLE = {
    "max_batch_size": lambda v: isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 4096,
    "batch_wait_timeout_s": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1,
}


def batching_user_config(config: EncoderConfig) -> dict[str, Any]:
    """The hot-reloadable part of the config, as Serve's `user_config`."""
    return {"max_batch_size": config.max_batch_size, "batch_wait_timeout_s": config.batch_wait_timeout_s}


def deployment_options(config: EncoderConfig, max_queued_requests: Optional[int] = None) -> dict[str, Any]:
    """`EncoderDeployment.options(**deployment_options(config))`: replicas (fixed or autoscaled),
    per-replica resources and request limit, and the batching `user_config`.

    `max_queued_requests` bounds each caller's queue for this deployment (Serve then fails fast
    with BackPressureError, which the gateway maps to RESOURCE_EXHAUSTED); None = unbounded."""
    options: dict[str, Any] = {
        "max_ongoing_requests": config.max_ongoing_requests,
        "ray_actor_options": {"num_cpus": config.num_cpus, "num_gpus": config.num_gpus},
        "user_config": batching_user_config(config),
        "logging_config": {"enable_access_log": False},
    }
    if max_queued_requests is not None:
        options["max_queued_requests"] = max_queued_requests
    if config.autoscaling:
        options["autoscaling_config"] = {
            "min_replicas": config.min_replicas,
            "initial_replicas": min(max(config.num_replicas, config.min_replicas), config.max_replicas),
            "max_replicas": config.max_replicas,
            "target_ongoing_requests": config.target_ongoing_requests,
            "upscale_delay_s": config.upscale_delay_s,
            "downscale_delay_s": config.downscale_delay_s,
        }
    else:
        options["num_replicas"] = config.num_replicas
    return options


class BatchStats:
    """Counters of the batches the backend ran (what `stats()` reports): are batches filling?"""

    def __init__(self, window: int = 1024):
        self.batches = 0
        self.texts = 0
        self.largest = 0
        self.busy_s = 0.0
        self.recent: deque[int] = deque(maxlen=window)

    def record(self, size: int, seconds: float) -> None:
        self.batches += 1
        self.texts += size
        self.largest = max(self.largest, size)
        self.busy_s += seconds
        self.recent.append(size)

    def snapshot(self) -> dict[str, Any]:
        return {
            "batches": self.batches,
            "texts": self.texts,
            "largest_batch": self.largest,
            "mean_batch": (self.texts / self.batches) if self.batches else 0.0,
            "recent_batch_sizes": list(self.recent),
            "busy_s": self.busy_s,
        }


@serve.deployment(name="Encoder")
class EncoderDeployment:
    """Thin shell: builds and starts the backend (warm before the replica reports healthy), and
    batches texts from all callers into it.

    `backend_factory` exists for tests that run the real deployment logic with a stand-in backend;
    the service always uses `create_backend`."""

    def __init__(self, config: EncoderConfig, backend_factory: Optional[Callable[[EncoderConfig], EncoderBackend]] = None):
        self.config = config
        self.backend = (backend_factory or create_backend)(config)
        self.backend.start()  # the replica is not ready until this returns: health follows warmth
        self.batch_stats = BatchStats()
        self._model_identity: Optional[str] = None  # hashed on first use (~0.2 s for MiniLM)
        # Built per instance (not as a class decorator) so max_concurrent_batches comes from config.
        self._encode_batch = serve.batch(
            max_batch_size=config.max_batch_size,
            batch_wait_timeout_s=config.batch_wait_timeout_s,
            max_concurrent_batches=config.max_concurrent_batches,
        )(self._run_batch)

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Hot reload of batching knobs, e.g. {"max_batch_size": 128, "batch_wait_timeout_s": 0.01}.

        Unknown keys or out-of-range values are errors (the deployment update fails and says why)."""
        user_config = dict(user_config or {})
        unknown = set(user_config) - set(HOT_RELOADABLE)
        if unknown:
            raise ValueError(f"unknown encoder user_config keys {sorted(unknown)}; allowed: {sorted(HOT_RELOADABLE)}")
        for key, value in user_config.items():
            if not HOT_RELOADABLE[key](value):
                raise ValueError(f"encoder user_config {key}={value!r} is out of range (see EncoderConfig.{key})")
        if "max_batch_size" in user_config:
            self._encode_batch.set_max_batch_size(int(user_config["max_batch_size"]))
        if "batch_wait_timeout_s" in user_config:
            self._encode_batch.set_batch_wait_timeout_s(float(user_config["batch_wait_timeout_s"]))

    def batching(self) -> dict[str, Any]:
        """The batching settings in force now (after any hot reload)."""
        return {
            "max_batch_size": self._encode_batch._get_max_batch_size(),
            "batch_wait_timeout_s": self._encode_batch._get_batch_wait_timeout_s(),
            "max_concurrent_batches": self.config.max_concurrent_batches,
        }

    async def _run_batch(self, texts: list[str]) -> list[np.ndarray]:
        # Run the forward pass off the event loop so new requests keep queueing into the next batch.
        start = time.perf_counter()
        vectors = await asyncio.to_thread(self.backend.encode, texts)
        self.batch_stats.record(len(texts), time.perf_counter() - start)
        return list(vectors)

    async def encode(self, texts: list[str]) -> np.ndarray:
        """Vectors for `texts`, shape (len(texts), dimension)."""
        if not texts:
            return np.zeros((0, self.backend.dimension), dtype=np.float32)
        vectors = await asyncio.gather(*(self._encode_batch(t) for t in texts))
        return np.stack(vectors)

    async def generate(self, prompts: list[str], max_tokens: Optional[int] = None) -> list[str]:
        """Short-text generation, for backends that have it (vllm with a generation model)."""
        generate = getattr(self.backend, "generate", None)
        if generate is None:
            raise RuntimeError(f"encoder backend {self.config.backend!r} cannot generate text; use backend 'vllm'")
        return await asyncio.to_thread(generate, list(prompts), max_tokens)

    def dimension(self) -> int:
        return self.backend.dimension

    def model_identity(self) -> str:
        """Which model this replica encodes with (`tastemaker.encoder.identity`); the gateway
        accepts precomputed item vectors only from the same model."""
        if self._model_identity is None:
            self._model_identity = model_identity(self.config)
        return self._model_identity

    def stats(self) -> dict[str, Any]:
        """Batch counters since start (batches, texts, mean and largest batch, recent sizes)."""
        return {**self.batch_stats.snapshot(), **self.batching()}

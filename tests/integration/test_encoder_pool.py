"""The encoder deployment in a real Serve instance, alone (no gateway): concurrent callers share
`@serve.batch` batches, results equal the backend's own, one large request is split into
batches, and a new batch size applied to the live replica shapes the batches that follow."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from tastemaker.config import EncoderConfig
from tastemaker.encoder import create_backend
from tastemaker.encoder.deployment import EncoderDeployment, deployment_options
from tests.integration.conftest import make_config

pytestmark = pytest.mark.integration

APP = "encoder-pool-test"
TEXTS = [f"Movie number {i}: a story about {'space ' * (i % 7)}and friendship" for i in range(60)]


@pytest.fixture(scope="module")
def pool(ray_session, tmp_path_factory):
    from ray import serve

    from tastemaker.app import start_ray_and_serve

    start_ray_and_serve(make_config(tmp_path_factory.mktemp("encoder-pool")))
    config = EncoderConfig(max_batch_size=16, batch_wait_timeout_s=0.05, num_cpus=1, max_ongoing_requests=512)
    handle = serve.run(EncoderDeployment.options(**deployment_options(config)).bind(config), name=APP, route_prefix=None)
    yield handle, config
    serve.delete(APP)


@pytest.fixture(scope="module")
def direct_vectors():
    backend = create_backend(EncoderConfig())
    backend.start()
    return backend.encode(TEXTS)


def _concurrent_single_text_calls(handle) -> np.ndarray:
    async def run():
        responses = [handle.encode.remote([text]) for text in TEXTS]
        return await asyncio.gather(*responses)

    return np.concatenate(asyncio.run(run()))


def test_concurrent_callers_are_batched_and_get_the_backends_vectors(pool, direct_vectors):
    handle, _ = pool
    vectors = _concurrent_single_text_calls(handle)
    np.testing.assert_allclose((vectors * direct_vectors).sum(axis=1), 1.0, atol=1e-4)
    stats = handle.stats.remote().result()
    assert stats["texts"] >= len(TEXTS)
    assert 1 < stats["largest_batch"] <= 16  # texts of different callers shared forward passes
    assert stats["batches"] < stats["texts"]


def test_one_large_request_is_split_into_batches_and_keeps_order(pool, direct_vectors):
    handle, _ = pool
    before = handle.stats.remote().result()["batches"]
    vectors = handle.encode.remote(TEXTS).result()
    np.testing.assert_allclose((vectors * direct_vectors).sum(axis=1), 1.0, atol=1e-4)
    after = handle.stats.remote().result()
    assert after["batches"] - before >= len(TEXTS) // 16
    assert max(after["recent_batch_sizes"][-(after["batches"] - before):]) <= 16
    assert handle.encode.remote([]).result().shape == (0, 384)
    assert handle.dimension.remote().result() == 384


def test_reconfigure_on_the_running_replica_changes_the_batches_it_forms(pool, direct_vectors):
    """Serve calls `reconfigure` with the new `user_config` on a live replica (a user_config-only
    update through `serve deploy`); here the test calls it the same way, through the handle, and
    checks that the batches formed afterwards follow the new size."""
    handle, _ = pool
    handle.reconfigure.remote({"max_batch_size": 4, "batch_wait_timeout_s": 0.05}).result()
    assert handle.batching.remote().result()["max_batch_size"] == 4
    before = handle.stats.remote().result()
    vectors = _concurrent_single_text_calls(handle)
    np.testing.assert_allclose((vectors * direct_vectors).sum(axis=1), 1.0, atol=1e-4)
    after = handle.stats.remote().result()
    new_sizes = after["recent_batch_sizes"][-(after["batches"] - before["batches"]):]
    assert max(new_sizes) <= 4 and len(new_sizes) >= len(TEXTS) // 4
    with pytest.raises(Exception, match="unknown encoder user_config"):
        handle.reconfigure.remote({"batch_size": 4}).result()

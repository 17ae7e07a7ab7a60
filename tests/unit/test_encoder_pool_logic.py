"""Encoder pool logic without a model or Ray cluster: the batch pipeline (order, normalisation,
tokenisation overlapped with the model), truncation limits, backend selection and its start-up
errors, the encoder config checks, the Serve deployment options (replicas vs autoscaling) and the
hot reload of the batching knobs on the deployment class itself."""

from __future__ import annotations

import sys
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest

from tastemaker.config import EncoderConfig, load_config
from tastemaker.encoder.base import (
    BackendUnavailable,
    BatchPipeline,
    create_backend,
    effective_max_length,
    l2_normalise,
)
from tastemaker.encoder.deployment import (
    EncoderDeployment,
    batching_user_config,
    deployment_options,
)


# -- BatchPipeline ---------------------------------------------------------------------------------
def _length_pipeline(batch_size: int, tokenize_ahead: bool, calls: list | None = None) -> BatchPipeline:
    """A pipeline whose 'model' maps a text to a vector made of its length and first character."""

    def tokenize(texts):
        if calls is not None:
            calls.append(("tokenize", list(texts)))
        return list(texts)

    def forward(texts):
        if calls is not None:
            calls.append(("forward", list(texts)))
        return np.array([[len(t) + 1.0, ord(t[0]) if t else 0.0, 3.0] for t in texts], dtype=np.float64)

    return BatchPipeline(tokenize, forward, dimension=3, batch_size=batch_size, tokenize_ahead=tokenize_ahead)


@pytest.mark.parametrize("tokenize_ahead", [True, False])
def test_pipeline_returns_rows_in_input_order_normalised_float32(tokenize_ahead):
    texts = ["ccc", "a", "", "bbbbbbbb", "dd", "eeeeee", "f"]
    out = _length_pipeline(batch_size=2, tokenize_ahead=tokenize_ahead).encode(texts)
    expected = l2_normalise(np.array([[len(t) + 1.0, ord(t[0]) if t else 0.0, 3.0] for t in texts]))
    assert out.dtype == np.float32 and out.shape == (7, 3)
    np.testing.assert_allclose(out, expected, rtol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-6)


def test_pipeline_sorts_by_length_and_splits_into_forward_batches():
    calls: list = []
    _length_pipeline(batch_size=3, tokenize_ahead=False, calls=calls).encode(["xxxxx", "x", "xxx", "xx", "xxxx"])
    forwards = [batch for kind, batch in calls if kind == "forward"]
    assert forwards == [["x", "xx", "xxx"], ["xxxx", "xxxxx"]]


def test_pipeline_empty_input_is_an_empty_array():
    out = _length_pipeline(batch_size=4, tokenize_ahead=True).encode([])
    assert out.shape == (0, 3) and out.dtype == np.float32


def test_tokenisation_of_the_next_batch_overlaps_the_forward_pass():
    """forward(batch 0) waits for tokenize(batch 1) to start: only an overlapping pipeline gets
    there; a serial one would make forward time out."""
    second_tokenize_started = threading.Event()
    seen_during_forward: list[bool] = []

    def tokenize(texts):
        if texts[0].startswith("second"):
            second_tokenize_started.set()
        return texts

    def forward(texts):
        if texts[0].startswith("first"):
            seen_during_forward.append(second_tokenize_started.wait(timeout=5))
        return np.ones((len(texts), 2))

    pipeline = BatchPipeline(tokenize, forward, dimension=2, batch_size=2, tokenize_ahead=True)
    pipeline.encode(["first a", "first b", "second a", "second b"])
    assert seen_during_forward == [True]


def test_concurrent_callers_never_run_two_forward_passes_at_once():
    active = [0]
    most = [0]
    lock = threading.Lock()

    def forward(texts):
        with lock:
            active[0] += 1
            most[0] = max(most[0], active[0])
        time.sleep(0.01)
        with lock:
            active[0] -= 1
        return np.ones((len(texts), 2))

    pipeline = BatchPipeline(lambda t: t, forward, dimension=2, batch_size=2, tokenize_ahead=True)
    threads = [threading.Thread(target=pipeline.encode, args=([f"t{i}-{j}" for j in range(6)],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert most[0] == 1


def test_l2_normalise_keeps_zero_rows_finite():
    out = l2_normalise(np.array([[3.0, 4.0], [0.0, 0.0]]))
    np.testing.assert_allclose(out, [[0.6, 0.8], [0.0, 0.0]])


# -- truncation limit ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "requested, tokenizer_limit, positions, model_type, pad, expected",
    [
        (256, 512, 512, "bert", 0, 256),  # the default: the configured length
        (8192, 512, 512, "bert", 0, 512),  # capped at the model's limit: a longer text would crash it
        (8192, int(1e30), 512, "bert", 0, 512),  # tokenizer without a real limit: position table
        (8192, int(1e30), 514, "roberta", 1, 512),  # RoBERTa numbers positions after the padding index
        (128, None, None, "bert", 0, 128),
    ],
)
def test_effective_max_length(requested, tokenizer_limit, positions, model_type, pad, expected):
    tokenizer = SimpleNamespace(model_max_length=tokenizer_limit)
    model_config = SimpleNamespace(max_position_embeddings=positions, model_type=model_type, pad_token_id=pad)
    assert effective_max_length(requested, tokenizer, model_config) == expected


# -- backend selection ---------------------------------------------------------------------------
def test_vllm_config_without_vllm_fails_at_start_up_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # makes any import of vllm fail, installed or not
    with pytest.raises(BackendUnavailable, match=r"pip install '\.\[vllm\]'"):
        create_backend(EncoderConfig(backend="vllm", device="cuda"))


def test_onnx_config_without_onnxruntime_fails_naming_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(BackendUnavailable, match="onnxruntime"):
        create_backend(EncoderConfig(backend="onnx"))


def test_backends_are_built_but_not_started():
    backend = create_backend(EncoderConfig(backend="onnx"))
    assert type(backend).__name__ == "OnnxBackend" and backend.dimension == 0
    with pytest.raises(RuntimeError, match="before start"):
        backend.encode(["x"])
    assert type(create_backend(EncoderConfig())).__name__ == "TransformersBackend"


# -- config ------------------------------------------------------------------------------------------
def test_encoder_config_cross_field_checks():
    with pytest.raises(ValueError, match="min_replicas"):
        EncoderConfig(min_replicas=3, max_replicas=2)
    with pytest.raises(ValueError, match="runs on CPU"):
        EncoderConfig(backend="onnx", device="cuda")
    with pytest.raises(ValueError):
        EncoderConfig(backend="tensorflow")


def test_encoder_config_from_yaml_and_dtype_resolution(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "encoder:\n  backend: onnx\n  onnx_precision: fp32\n  autoscaling: true\n  max_replicas: 3\n"
        "  target_ongoing_requests: 16\n  torch_threads: 2\n"
    )
    enc = load_config(path, environ={}).encoder
    assert (enc.backend, enc.onnx_precision, enc.autoscaling, enc.max_replicas) == ("onnx", "fp32", True, 3)
    assert enc.intra_op_threads == 2  # the deprecated alias still works
    assert EncoderConfig().resolved_dtype() == "float32"
    assert EncoderConfig(device="cuda").resolved_dtype() == "bfloat16"
    assert EncoderConfig(device="cuda", dtype="float16").resolved_dtype() == "float16"


# -- deployment options ------------------------------------------------------------------------------
def test_deployment_options_fixed_replicas():
    cfg = EncoderConfig(num_replicas=3, num_cpus=2, num_gpus=0.5, max_ongoing_requests=512, max_batch_size=32)
    opts = deployment_options(cfg)
    assert opts["num_replicas"] == 3 and "autoscaling_config" not in opts
    assert opts["ray_actor_options"] == {"num_cpus": 2, "num_gpus": 0.5}
    assert opts["max_ongoing_requests"] == 512
    assert opts["user_config"] == {"max_batch_size": 32, "batch_wait_timeout_s": cfg.batch_wait_timeout_s}


def test_deployment_options_autoscaling():
    cfg = EncoderConfig(
        autoscaling=True, num_replicas=1, min_replicas=2, max_replicas=6, target_ongoing_requests=24,
        upscale_delay_s=3, downscale_delay_s=30,
    )
    opts = deployment_options(cfg)
    assert "num_replicas" not in opts
    assert opts["autoscaling_config"] == {
        "min_replicas": 2,
        "initial_replicas": 2,  # num_replicas clamped into [min, max]
        "max_replicas": 6,
        "target_ongoing_requests": 24,
        "upscale_delay_s": 3,
        "downscale_delay_s": 30,
    }


def test_deployment_options_bound_the_callers_queue_when_asked():
    assert "max_queued_requests" not in deployment_options(EncoderConfig())
    assert deployment_options(EncoderConfig(), max_queued_requests=100)["max_queued_requests"] == 100


def test_build_app_wires_the_encoder_from_its_config(tmp_path):
    from tastemaker.app import build_app

    config = load_config(
        environ={},
        overrides={
            ("data_dir",): str(tmp_path),
            ("encoder", "backend"): "onnx",
            ("encoder", "autoscaling"): True,
            ("encoder", "max_replicas"): 3,
            ("encoder", "max_batch_size"): 24,
        },
    )
    gateway = build_app(config)._bound_deployment
    # The gateway is bound to (settings, encoder app, retrieval app).
    encoder = next(
        arg._bound_deployment
        for arg in gateway.init_args
        if hasattr(arg, "_bound_deployment") and arg._bound_deployment.name == "Encoder"
    )
    assert encoder._deployment_config.autoscaling_config.max_replicas == 3
    assert encoder.user_config == {"max_batch_size": 24, "batch_wait_timeout_s": 0.005}
    assert encoder.max_queued_requests == config.gateway.internal_max_queued_requests
    (bound_config,) = encoder.init_args
    assert bound_config.backend == "onnx"
    assert bound_config.onnx_cache_dir == str(tmp_path.resolve() / "encoder-cache")


def test_deployment_options_are_accepted_by_serve():
    """Serve validates options eagerly; a wrong key or value would raise here."""
    cfg = EncoderConfig(autoscaling=True, min_replicas=1, max_replicas=4)
    app = EncoderDeployment.options(**deployment_options(cfg))
    assert app._deployment_config.autoscaling_config.max_replicas == 4
    assert app._deployment_config.max_ongoing_requests == cfg.max_ongoing_requests


# -- hot reload on the deployment class --------------------------------------------------------------
class _StubBackend:
    dimension = 4

    def __init__(self, config):
        self.started = False

    def start(self):
        self.started = True

    def encode(self, texts):
        return np.ones((len(texts), 4), dtype=np.float32) / 2.0


def _replica(**config) -> object:
    cls = EncoderDeployment.func_or_class  # the plain class under the Serve decorator
    return cls(EncoderConfig(**config), backend_factory=_StubBackend)


def test_replica_starts_backend_and_takes_batching_from_config():
    replica = _replica(max_batch_size=48, batch_wait_timeout_s=0.02, max_concurrent_batches=3)
    assert replica.backend.started
    assert replica.batching() == {"max_batch_size": 48, "batch_wait_timeout_s": 0.02, "max_concurrent_batches": 3}


def test_reconfigure_changes_batch_size_and_wait():
    replica = _replica(max_batch_size=64)
    replica.reconfigure({"max_batch_size": 8, "batch_wait_timeout_s": 0.05})
    assert replica.batching()["max_batch_size"] == 8
    assert replica.batching()["batch_wait_timeout_s"] == 0.05
    # Each replica object has its own batch queue settings.
    assert _replica(max_batch_size=64).batching()["max_batch_size"] == 64


def test_reconfigure_applies_the_user_config_build_app_sends():
    cfg = EncoderConfig(max_batch_size=100, batch_wait_timeout_s=0.001)
    replica = _replica()
    replica.reconfigure(batching_user_config(cfg))
    assert replica.batching()["max_batch_size"] == 100 and replica.batching()["batch_wait_timeout_s"] == 0.001


@pytest.mark.parametrize(
    "user_config, message",
    [({"max_batch_sz": 8}, "unknown"), ({"max_batch_size": 0}, "out of range"), ({"batch_wait_timeout_s": -1}, "out of range")],
)
def test_reconfigure_rejects_bad_user_config(user_config, message):
    replica = _replica(max_batch_size=64)
    with pytest.raises(ValueError, match=message):
        replica.reconfigure(user_config)
    assert replica.batching()["max_batch_size"] == 64


def test_generate_on_a_backend_without_generation_says_which_backend_can():
    import asyncio

    replica = _replica()
    with pytest.raises(RuntimeError, match="vllm"):
        asyncio.run(replica.generate(["hello"]))

"""Every encoder backend that can run here, on the real bundled MiniLM model (no Ray): the
conformance suite (`tastemaker.encoder.conformance`), accuracy of the ONNX speed path against the
fp32 transformers output on the demo catalog, and the export step's cache and CLI.

The vLLM backend needs a GPU; its adapter runs the same conformance suite against a stand-in in
tests/unit/test_encoder_vllm.py."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from tastemaker.config import EncoderConfig
from tastemaker.datasets.movielens import load_movielens
from tastemaker.encoder import conformance, create_backend

pytestmark = pytest.mark.integration

#: backend id -> EncoderConfig fields (the ONNX cache dir is added per session).
BACKENDS = {
    "transformers": {"backend": "transformers"},
    "transformers-cls-no-overlap": {"backend": "transformers", "pooling": "cls", "tokenize_ahead": False},
    "onnx-fp32": {"backend": "onnx", "onnx_precision": "fp32", "forward_batch_size": 8},
    "onnx-int8": {"backend": "onnx", "onnx_precision": "int8"},
}

#: How many demo catalog items the accuracy test encodes (the full 9,742 take minutes on 2 cores).
CATALOG_SAMPLE = 300


@pytest.fixture(scope="session")
def onnx_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("onnx-cache")


@pytest.fixture(scope="session")
def started_backends(onnx_cache):
    """Backends are started once per session and shared (each start loads or exports the model)."""
    cache: dict = {}

    def get(name: str):
        if name not in cache:
            fields = dict(BACKENDS[name])
            if fields["backend"] == "onnx":
                fields["onnx_cache_dir"] = str(onnx_cache)
            backend = create_backend(EncoderConfig(**fields))
            backend.start()
            cache[name] = backend
        return cache[name]

    return get


@pytest.mark.parametrize("check", list(conformance.CHECKS))
@pytest.mark.parametrize("backend_name", list(BACKENDS))
def test_conformance(started_backends, backend_name, check):
    conformance.CHECKS[check](started_backends(backend_name))


def test_max_length_beyond_the_model_limit_is_capped_not_a_crash(onnx_cache):
    for fields in ({"backend": "transformers"}, {"backend": "onnx", "onnx_precision": "fp32", "onnx_cache_dir": str(onnx_cache)}):
        backend = create_backend(EncoderConfig(max_length=8192, **fields))
        backend.start()
        assert backend.max_length == 512  # MiniLM's position table
        vectors = backend.encode([conformance.VERY_LONG_TEXT])
        assert vectors.shape == (1, 384) and np.isfinite(vectors).all()


@pytest.fixture(scope="module")
def catalog_texts() -> list[str]:
    items = load_movielens().items
    step = max(1, len(items) // CATALOG_SAMPLE)  # spread over the whole catalog, not only its start
    return [item.text() for item in items[::step][:CATALOG_SAMPLE]]


@pytest.fixture(scope="module")
def reference_vectors(started_backends, catalog_texts) -> np.ndarray:
    return started_backends("transformers").encode(catalog_texts)


@pytest.mark.parametrize("backend_name, min_cosine", [("onnx-fp32", 0.9999), ("onnx-int8", 0.99)])
def test_onnx_matches_fp32_transformers_on_the_demo_catalog(started_backends, catalog_texts, reference_vectors, backend_name, min_cosine):
    vectors = started_backends(backend_name).encode(catalog_texts)
    cosine = (vectors * reference_vectors).sum(axis=1)
    worst = int(np.argmin(cosine))
    assert cosine.min() >= min_cosine, f"{backend_name}: cosine {cosine.min():.4f} on {catalog_texts[worst]!r}"


def test_onnx_int8_start_up_check_measured_on_this_cpu(started_backends):
    """The int8 backend checks itself against the fp32 export where it runs; with unsigned (u8u8)
    weights the integer kernels are exact on every x86-64 CPU, so the check passes without falling
    back (on an AVX2-only EPYC too: see the encoder README for the emulated run)."""
    check = started_backends("onnx-int8").int8_check
    assert check["fell_back_to_fp32"] is False, check
    assert check["min_cosine"] >= check["bar"] == 0.99


def test_onnx_int8_falls_back_to_fp32_below_its_bar(onnx_cache, caplog, catalog_texts, reference_vectors):
    """A CPU whose int8 kernels miss the bar gets the fp32 export, with a warning, not bad vectors
    (an unreachable bar of 1.0 stands in for such a CPU)."""
    backend = create_backend(
        EncoderConfig(backend="onnx", onnx_precision="int8", onnx_int8_min_cosine=1.0, onnx_cache_dir=str(onnx_cache))
    )
    with caplog.at_level("WARNING"):
        backend.start()
    assert backend.int8_check["fell_back_to_fp32"] is True
    assert backend.onnx_path.name.endswith("-fp32.onnx")
    assert any("serving the fp32 export instead" in r.getMessage() for r in caplog.records)
    vectors = backend.encode(catalog_texts[:50])
    assert float((vectors * reference_vectors[:50]).sum(axis=1).min()) >= 0.9999


def test_onnx_int8_keeps_catalog_neighbours(started_backends, catalog_texts, reference_vectors):
    """What retrieval needs from int8: each item's nearest neighbours barely change."""
    int8 = started_backends("onnx-int8").encode(catalog_texts)
    k = 10
    ref_top = np.argsort(-(reference_vectors @ reference_vectors.T), axis=1)[:, 1 : k + 1]
    got_top = np.argsort(-(int8 @ int8.T), axis=1)[:, 1 : k + 1]
    overlap = np.mean([len(set(a) & set(b)) / k for a, b in zip(ref_top, got_top)])
    assert overlap >= 0.85, overlap


def test_transformers_backend_matches_sentence_transformers(started_backends, catalog_texts, reference_vectors):
    """Our pooling and truncation reproduce the model's reference implementation."""
    st = pytest.importorskip("sentence_transformers")
    from tastemaker.encoder.base import bundled_model_path

    model = st.SentenceTransformer(str(bundled_model_path()), device="cpu")
    expected = model.encode(catalog_texts[:100] + [conformance.VERY_LONG_TEXT], normalize_embeddings=True)
    got = started_backends("transformers").encode(catalog_texts[:100] + [conformance.VERY_LONG_TEXT])
    np.testing.assert_allclose((got * expected).sum(axis=1), 1.0, atol=1e-4)


def test_export_is_cached_and_reused(onnx_cache, started_backends):
    from tastemaker.encoder.onnx_export import ensure_exported

    backend = started_backends("onnx-int8")  # exported both files already
    files_before = {p.name: p.stat().st_mtime_ns for p in onnx_cache.glob("*.onnx")}
    assert len(files_before) == 2
    again = ensure_exported(EncoderConfig(backend="onnx", onnx_cache_dir=str(onnx_cache)))
    assert again.path == backend.onnx_path
    assert {p.name: p.stat().st_mtime_ns for p in onnx_cache.glob("*.onnx")} == files_before
    assert again.info["fp32_nodes_kept"] == [
        f"/model/encoder/layer.{i}/{block}/dense/MatMul" for i in (0, 1) for block in ("intermediate", "output")
    ]
    # A different pooling is a different graph: a new file, not the cached one.
    cls = ensure_exported(EncoderConfig(backend="onnx", pooling="cls", onnx_precision="fp32", onnx_cache_dir=str(onnx_cache)))
    assert cls.path.name not in files_before


def test_export_command_line(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "tastemaker.encoder.onnx_export", "--cache-dir", str(tmp_path), "--precision", "fp32"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout)
    assert report["dimension"] == 384 and report["min_cosine_vs_torch"] >= 0.9999
    assert (tmp_path / report["path"].split("/")[-1]).is_file()

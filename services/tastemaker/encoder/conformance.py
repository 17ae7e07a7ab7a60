"""The `EncoderBackend` contract as reusable checks: every backend must pass all of them.

Each check takes a started backend and raises `AssertionError` with a precise message when the
backend breaks the contract. The test suites call `CHECKS` for every backend that can run on the
machine (tests/integration/test_encoder_conformance.py on the real model, the vLLM adapter against
a stand-in in tests/unit/test_encoder_vllm.py), and a new backend gets the same suite by adding
itself to those parametrisations.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from tastemaker.encoder.base import EncoderBackend

#: Texts with different lengths, punctuation, non-ASCII, an empty one and a whitespace-only one.
SAMPLE_TEXTS = (
    "Toy Story (1995). Genres: Adventure, Animation, Children, Comedy, Fantasy",
    "",
    "Alien (1979). Genres: Horror, Sci-Fi. Tags: space, claustrophobic",
    "   ",
    "Amélie (2001) — a whimsical Parisian comedy; très charmant!",
    "ok",
    "A slow, beautiful film about memory and loss. The ending stayed with me for days. " * 3,
)

#: Far beyond any BERT-class model's 512-token limit (about 20k tokens).
VERY_LONG_TEXT = "a very long review that goes on and on " * 2500

#: Cosine tolerance for "the same vector" (float32 noise of different batch padding).
SAME_VECTOR_ATOL = 1e-4


def _check_array(backend: EncoderBackend, vectors: np.ndarray, count: int) -> None:
    assert isinstance(vectors, np.ndarray), f"encode returned {type(vectors).__name__}, not a numpy array"
    assert vectors.dtype == np.float32, f"dtype {vectors.dtype}, expected float32"
    assert vectors.shape == (count, backend.dimension), f"shape {vectors.shape}, expected ({count}, {backend.dimension})"
    assert np.all(np.isfinite(vectors)), "non-finite values in the vectors"


def check_dimension(backend: EncoderBackend) -> None:
    """A started backend reports a positive dimension."""
    assert isinstance(backend.dimension, int) and backend.dimension > 0, f"dimension {backend.dimension!r}"


def check_shape_dtype_and_unit_norm(backend: EncoderBackend) -> None:
    """(n, dimension) float32, every row of unit L2 norm (including the empty text's)."""
    vectors = backend.encode(list(SAMPLE_TEXTS))
    _check_array(backend, vectors, len(SAMPLE_TEXTS))
    norms = np.linalg.norm(vectors, axis=1)
    assert np.allclose(norms, 1.0, atol=1e-4), f"row norms {norms}"


def check_empty_list(backend: EncoderBackend) -> None:
    """No texts give a (0, dimension) float32 array, not an error."""
    vectors = backend.encode([])
    _check_array(backend, vectors, 0)


def check_deterministic(backend: EncoderBackend) -> None:
    """The same texts twice give the same vectors."""
    first = backend.encode(list(SAMPLE_TEXTS))
    second = backend.encode(list(SAMPLE_TEXTS))
    np.testing.assert_allclose(first, second, atol=SAME_VECTOR_ATOL, err_msg="encode is not deterministic")


def check_batch_order_independent(backend: EncoderBackend) -> None:
    """A text's vector does not depend on its position or on the other texts in the call."""
    texts = list(SAMPLE_TEXTS)
    forward = backend.encode(texts)
    backward = backend.encode(texts[::-1])[::-1]
    np.testing.assert_allclose(forward, backward, atol=SAME_VECTOR_ATOL, err_msg="vectors depend on batch order")
    for i in (0, 2, len(texts) - 1):
        alone = backend.encode([texts[i]])[0]
        np.testing.assert_allclose(
            alone, forward[i], atol=SAME_VECTOR_ATOL, err_msg=f"text {i} differs alone vs in a batch"
        )
    # Many copies of short texts around one long one: padding must not leak into the short ones.
    mixed = [texts[5]] * 10 + [texts[6]] + [texts[0]] * 10
    got = backend.encode(mixed)
    np.testing.assert_allclose(got[0], forward[5], atol=SAME_VECTOR_ATOL, err_msg="padding changed a short text")
    np.testing.assert_allclose(got[-1], forward[0], atol=SAME_VECTOR_ATOL, err_msg="padding changed a short text")


def check_very_long_input_is_truncated(backend: EncoderBackend) -> None:
    """A text far over the model's limit encodes (no crash) to the vector of its truncated head:
    appending more text past the limit changes nothing."""
    long_vectors = backend.encode([VERY_LONG_TEXT, VERY_LONG_TEXT + " and a different ending entirely", "short"])
    _check_array(backend, long_vectors, 3)
    assert np.allclose(np.linalg.norm(long_vectors, axis=1), 1.0, atol=1e-4)
    np.testing.assert_allclose(
        long_vectors[0], long_vectors[1], atol=SAME_VECTOR_ATOL, err_msg="text past the max length changed the vector"
    )


def check_distinguishes_texts(backend: EncoderBackend) -> None:
    """Different texts get different vectors (a constant encoder would pass every other check)."""
    vectors = backend.encode([SAMPLE_TEXTS[0], SAMPLE_TEXTS[2], SAMPLE_TEXTS[4]])
    cos = vectors @ vectors.T
    off_diagonal = cos[~np.eye(3, dtype=bool)]
    assert np.all(off_diagonal < 0.999), f"different texts got (nearly) the same vector: cosines {off_diagonal}"


#: name -> check, in the order a report should list them.
CHECKS: dict[str, Callable[[EncoderBackend], None]] = {
    "dimension": check_dimension,
    "shape_dtype_unit_norm": check_shape_dtype_and_unit_norm,
    "empty_list": check_empty_list,
    "deterministic": check_deterministic,
    "batch_order_independent": check_batch_order_independent,
    "very_long_input_truncated": check_very_long_input_is_truncated,
    "distinguishes_texts": check_distinguishes_texts,
}


def run_all(backend: EncoderBackend) -> None:
    """Every check; raises on the first failure."""
    for check in CHECKS.values():
        check(backend)

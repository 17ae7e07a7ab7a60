"""The real bundled encoder (no Ray): the backend contract and zero-shot review sentiment."""

from __future__ import annotations

import numpy as np
import pytest

from tastemaker.config import EncoderConfig
from tastemaker.encoder import create_backend
from tastemaker.profiles.state import SENTIMENT_ANCHORS, review_sentiment

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def backend():
    b = create_backend(EncoderConfig(max_length=32))
    b.start()
    return b


def test_vectors_are_unit_norm_deterministic_and_order_independent(backend):
    texts = ["Toy Story (1995)", "", "a much longer text " * 200, "Alien (1979). Genres: Horror, Sci-Fi."]
    first = backend.encode(texts)
    assert first.shape == (4, backend.dimension) and first.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(first, axis=1), 1.0, atol=1e-5)
    # Same text, same vector, whatever batch it is in and in whatever position (length sorting).
    again = backend.encode(list(reversed(texts)))[::-1]
    np.testing.assert_allclose(first, again, atol=1e-5)
    np.testing.assert_allclose(backend.encode([texts[3]])[0], first[3], atol=1e-5)


@pytest.mark.parametrize(
    "text, positive",
    [
        ("An absolute masterpiece, I adored every minute of it.", True),
        ("Funny, warm and beautifully animated. My kids loved it.", True),
        ("Dreadful and dull. I walked out halfway through.", False),
        ("The worst film I have seen this year, boring and stupid.", False),
    ],
)
def test_review_sentiment_sign_on_the_real_model(backend, text, positive):
    praise, complaint = backend.encode(list(SENTIMENT_ANCHORS))
    score = review_sentiment(backend.encode([text])[0], praise, complaint)
    assert -1.0 <= score <= 1.0
    assert (score > 0) == positive, score

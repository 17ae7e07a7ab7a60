"""`tastemaker train`'s Ray Train path on the session's Ray: a TorchTrainer with two CPU workers
runs a few steps on a handful of pairs, lowers the training loss, and leaves a checkpoint that
the serving backend loads and that computes what the trained tower computes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tastemaker.config import EncoderConfig
from tastemaker.encoder.base import bundled_model_path
from tastemaker.encoder.transformers_backend import TransformersBackend
from tastemaker.training.config import TrainConfig
from tastemaker.training.model import PairCollator, TwoTowerEncoder, load_base, pair_loss
from tastemaker.training.pairs import TrainingPair, history_text
from tastemaker.training.trainer import MANIFEST_NAME, pair_rows, run_training
from tests.integration.conftest import make_config

pytestmark = pytest.mark.integration

#: Users who watch one kind of film go on to another film of that kind.
KINDS = {
    "animation": ["Toy Story (1995). Genres: Animation, Children.", "Finding Nemo (2003). Genres: Animation, Children.",
                  "Up (2009). Genres: Animation, Adventure.", "Shrek (2001). Genres: Animation, Comedy."],
    "horror": ["The Shining (1980). Genres: Horror.", "Halloween (1978). Genres: Horror.",
               "Alien (1979). Genres: Horror, Sci-Fi.", "The Ring (2002). Genres: Horror, Mystery."],
    "western": ["Unforgiven (1992). Genres: Western.", "Tombstone (1993). Genres: Western, Action.",
                "True Grit (2010). Genres: Western, Drama.", "Rio Bravo (1959). Genres: Western."],
}


def _pairs() -> list[TrainingPair]:
    pairs = []
    for kind, texts in KINDS.items():
        for target in range(4):
            for offset in (1, 2):
                history = [texts[(target + offset) % 4], texts[(target + offset + 1) % 4]]
                pairs.append(TrainingPair(f"{kind}{target}{offset}", (), f"{kind}{target}", history_text(history), texts[target]))
    return pairs  # 24 pairs


def test_torch_trainer_two_workers_lowers_the_loss_and_writes_a_loadable_checkpoint(ray_session, tmp_path):
    from tastemaker.app import start_ray_and_serve

    start_ray_and_serve(make_config(tmp_path / "service"))  # the session's Ray (started here if first)
    # One epoch of 5 steps per worker (2 pairs each): one checkpoint, a few seconds of training.
    config = TrainConfig(
        num_workers=2, cpus_per_worker=1, batch_size=4, epochs=1, learning_rate=3e-4, warmup_ratio=0.0, max_pairs=None
    )
    pairs = _pairs()
    out = tmp_path / "model"
    manifest = run_training(config, pairs, out, show_progress=False)

    for name in ("config.json", "model.safetensors", "tokenizer.json", MANIFEST_NAME):
        assert (out / name).is_file(), name
    written = json.loads((out / MANIFEST_NAME).read_text())
    assert written["steps"] == manifest["steps"] == (22 // 2) // 2  # 2 held out; 11 pairs per worker
    assert written["seed"] == 0 and np.isfinite(written["final_loss"])

    # The training loss on the same pairs and batches, before and after.
    rows = pair_rows(pairs)
    tokenizer, base = load_base(bundled_model_path())
    collator = PairCollator(tokenizer, config.max_query_length, config.max_item_length)
    before = pair_loss(TwoTowerEncoder(base), collator, rows, config.temperature, 8)
    _, tuned = load_base(out)
    tuned_model = TwoTowerEncoder(tuned)
    after = pair_loss(tuned_model, collator, rows, config.temperature, 8)
    assert after < before - 0.05, (before, after)

    # The serving backend loads the folder and computes the trained tower's vectors.
    backend = TransformersBackend(EncoderConfig(model_path=str(out)))
    backend.start()
    texts = [p.item_text for p in pairs[:6]]
    served = backend.encode(texts)
    with torch.no_grad():
        batch = tokenizer(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
        trained = tuned_model.eval().embed(dict(batch)).numpy()
    assert np.allclose((served * trained).sum(1), 1.0, atol=1e-5)
    zero_shot = TransformersBackend(EncoderConfig())
    zero_shot.start()
    assert float((served * zero_shot.encode(texts)).sum(1).min()) < 0.9999

"""Switching the encoder model: a service started over a data directory whose vectors came from
model A, restarted with model B (a copy of the bundled MiniLM with perturbed word embeddings),
re-encodes every item and search text with B and rebuilds every profile before it serves."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import grpc

import numpy as np
import pytest
import ray

from tastemaker.config import EncoderConfig
from tastemaker.domain import EventType, UserEvent
from tastemaker.encoder.base import bundled_model_path
from tastemaker.encoder.transformers_backend import TransformersBackend
from tastemaker.profiles.actor import shard_actor_name
from tastemaker.profiles.state import ProfileState, shard_of
from tastemaker.store import open_store
from tastemaker.store.base import ENCODER_IDENTITY_KEY, ENCODER_SWAP_PENDING_KEY
from tastemaker.v1 import recommender_service_pb2 as pb
from tests.integration.conftest import MOVIE_ITEMS, make_config, start

pytestmark = pytest.mark.integration

ITEMS = MOVIE_ITEMS
USER = "swap-user"
#: (event type, item id, value, text); event n happens at time 1e9 + n days.
EVENTS = [
    (EventType.CLICK, "m1", 0.0, ""),
    (EventType.RATING, "m2", 5.0, ""),
    (EventType.SEARCH, "", 0.0, "a scary film for halloween night"),
    (EventType.RATING, "m5", 4.0, ""),
]
#: Text-only ranking (no popularity, no co-occurrence), so scores are plain cosines.
TEXT_ONLY = {"popularity_weight": 0.0, "collaborative_weight": 0.0, "sequential_weight": 0.0, "trending_weight": 0.0}


def _item_text(item: pb.Item) -> str:
    from tastemaker.domain import Item

    return Item(item_id=item.item_id, title=item.title, description=item.description, tags=list(item.tags)).text()


def _events_pb() -> list[pb.UserEvent]:
    out = []
    for n, (etype, item_id, value, text) in enumerate(EVENTS):
        event = pb.UserEvent(event_id=f"e{n}", user_id=USER, event_type=int(etype), item_id=item_id, value=value, text=text)
        event.event_time.FromSeconds(1_000_000_000 + n * 86_400)
        out.append(event)
    return out


@pytest.fixture(scope="module")
def model_b(tmp_path_factory) -> Path:
    """The bundled model with noise added to its word embeddings: a different, working encoder."""
    from safetensors.numpy import load_file, save_file

    folder = tmp_path_factory.mktemp("model-b")
    shutil.copytree(bundled_model_path(), folder, dirs_exist_ok=True)
    weights = load_file(str(folder / "model.safetensors"))
    key = "embeddings.word_embeddings.weight"
    noise = np.random.default_rng(0).standard_normal(weights[key].shape)
    weights[key] = (weights[key] + 0.5 * weights[key].std() * noise).astype(np.float32)
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def _backend(model_path) -> TransformersBackend:
    backend = TransformersBackend(EncoderConfig(model_path=None if model_path is None else str(model_path)))
    backend.start()
    return backend


def _expected_profile(backend: TransformersBackend, config) -> np.ndarray:
    """The profile the shard must hold: the events folded with this model's vectors."""
    vectors = dict(zip([i.item_id for i in ITEMS], backend.encode([_item_text(i) for i in ITEMS])))
    state = ProfileState(USER)
    for n, (etype, item_id, value, text) in enumerate(EVENTS):
        event = UserEvent(
            event_id=f"e{n}", user_id=USER, event_type=etype, item_id=item_id, value=value, text=text,
            event_time=1_000_000_000 + n * 86_400.0,
            text_vector=backend.encode([text])[0] if text else None,
        )
        state.apply(event, vectors.get(item_id), n + 1, config.profiles)
    return state.view().vector


def _similar_when_indexed(client, accept, timeout_s: float = 30.0):
    """SimilarItems(m1) once the retrieval replica holds all 6 items and `accept(hits)` holds (the
    replica follows the store's change feed with a bounded delay)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            hits = list(client.similar_items("m1", page_size=5).items)
            if len(hits) == 5 and accept(hits):
                return hits
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                raise
        assert time.monotonic() < deadline, "the retrieval replica did not catch up within the bound"
        time.sleep(0.1)


def test_restart_with_another_model_reencodes_items_and_rebuilds_profiles(ray_session, tmp_path, model_b):
    config_a = make_config(tmp_path, retrieval=TEXT_ONLY, snapshot_every_events=1)
    running = start(config_a)
    try:
        running.client.upsert_items(ITEMS)
        acks = running.client.write_events(_events_pb())
        assert [a.status for a in acks] == [pb.EVENT_STATUS_ACCEPTED] * len(EVENTS)
        similar_a = {i.item_id: i.score for i in _similar_when_indexed(running.client, lambda hits: True)}
    finally:
        running.stop()
    store = open_store(config_a.store_url())
    identity_a = store.get_meta(ENCODER_IDENTITY_KEY)
    store.close()
    assert identity_a is not None

    config_b = config_a.model_copy(update={"encoder": config_a.encoder.model_copy(update={"model_path": str(model_b)})})
    running = start(config_b)
    try:
        b = _backend(model_b)
        texts = {i.item_id: _item_text(i) for i in ITEMS}
        expected_b = dict(zip(texts, b.encode(list(texts.values()))))
        # Stored vectors are model B's (cosine within 1e-4 of a direct encode) ...
        store = open_store(config_b.store_url())
        try:
            stored = store.get_item_vectors(list(texts))
            assert store.get_meta(ENCODER_IDENTITY_KEY) not in (None, identity_a)
            assert store.get_meta(ENCODER_SWAP_PENDING_KEY) is None
        finally:
            store.close()
        for item_id, vector in expected_b.items():
            assert float(stored[item_id] @ vector) > 1 - 1e-4, item_id
        # ... and so are the retrieval replica's (it follows the change feed): SimilarItems scores
        # become B's cosines, not A's, within the feed's bounded delay.
        def all_b(hits) -> bool:
            return all(abs(h.score - float(expected_b["m1"] @ expected_b[h.item_id])) <= 1e-4 for h in hits)

        hits = _similar_when_indexed(running.client, all_b)
        assert max(abs(hit.score - similar_a[hit.item_id]) for hit in hits) > 1e-3
        # The profile was rebuilt from the log with B's item vectors and B's search-text vector.
        shard = shard_of(USER, config_b.profiles.num_shards)
        actor = ray.get_actor(shard_actor_name(config_b.server.app_name, shard), namespace=config_b.server.namespace)
        profile = ray.get(actor.get_profile.remote(USER)).vector
        want_b = _expected_profile(b, config_b)
        want_a = _expected_profile(_backend(None), config_a)
        assert float(profile @ want_b) > 1 - 1e-4
        assert float(profile @ want_a) < float(profile @ want_b) - 1e-3
        assert running.client.get_user_profile(USER).profile_version == len(EVENTS)
    finally:
        running.stop()

    # Starting again with the same model re-encodes nothing (the recorded identity matches).
    from tastemaker.app import swap_encoder_if_changed

    assert swap_encoder_if_changed(config_b) == {"swapped": False}

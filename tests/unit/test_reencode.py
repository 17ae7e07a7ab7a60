"""Switching the encoder model, without Ray: the model identity, re-encoding a real SQLite store
(items and event texts) with another encode function, and a profile shard rebuilt from the log."""

from __future__ import annotations

import hashlib
import shutil

import numpy as np
import pytest

from tastemaker.config import EncoderConfig, ProfileConfig
from tastemaker.domain import EventType, Item, UserEvent
from tastemaker.encoder.base import bundled_model_path
from tastemaker.profiles.shard import ProfileShard
from tastemaker.profiles.state import ProfileState
from tastemaker.reencode import encoder_identity, reencode_event_texts, reencode_items, same_vectors, synchronous
from tastemaker.store import open_store

DIM = 16


def _model(name: str):
    """A stand-in encoder: a fixed random unit vector per (model, text)."""

    def encode(texts: list[str]) -> np.ndarray:
        rows = []
        for text in texts:
            seed = int.from_bytes(hashlib.sha256(f"{name}\x00{text}".encode()).digest()[:8], "little")
            v = np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)
            rows.append(v / np.linalg.norm(v))
        return np.stack(rows)

    return encode


ITEMS = [Item(item_id=f"i{k}", title=f"Movie {k}", tags=[f"tag{k % 3}"]) for k in range(7)]
EVENTS = [
    UserEvent("e1", "u", EventType.CLICK, item_id="i1", event_time=1_000.0),
    UserEvent("e2", "u", EventType.RATING, item_id="i2", value=5.0, event_time=2_000.0),
    UserEvent("e3", "u", EventType.SEARCH, text="films about space", event_time=3_000.0),
    UserEvent("e4", "u", EventType.RATING, item_id="i3", value=1.0, event_time=4_000.0),
    UserEvent("e5", "v", EventType.REVIEW, item_id="i4", text="wonderful", value=0.0, event_time=5_000.0, sentiment=1.0),
]
CFG = ProfileConfig(num_shards=1, snapshot_every_events=1)


def _encoded_items(encode) -> list[Item]:
    vectors = encode([i.text() for i in ITEMS])
    return [Item(item_id=i.item_id, title=i.title, tags=i.tags, vector=v) for i, v in zip(ITEMS, vectors)]


def _encoded_events(encode) -> list[UserEvent]:
    out = []
    for e in EVENTS:
        copy = UserEvent(**{**e.__dict__})
        copy.text_vector = encode([e.text])[0] if e.text else None
        out.append(copy)
    return out


def _expected_profiles(encode) -> dict[str, np.ndarray]:
    vectors = dict(zip([i.item_id for i in ITEMS], encode([i.text() for i in ITEMS])))
    states: dict[str, ProfileState] = {}
    for seq, event in enumerate(_encoded_events(encode), 1):
        state = states.setdefault(event.user_id, ProfileState(event.user_id))
        state.apply(event, vectors.get(event.item_id), seq, CFG)
    return {user: state.view().vector for user, state in states.items()}


@pytest.fixture
def store_url(tmp_path):
    return "sqlite:///" + str(tmp_path / "t.db")


def test_reencoded_store_and_rebuilt_shard_hold_the_new_models_vectors(store_url):
    a, b = _model("A"), _model("B")
    store = open_store(store_url)
    store.upsert_items(_encoded_items(a))
    shard = ProfileShard(0, store, CFG)
    shard.apply_events(_encoded_events(a))  # snapshots every event: model A's profiles are on disk
    assert float(shard.profile_view("u").vector @ _expected_profiles(a)["u"]) > 1 - 1e-6

    seen: list[int] = []
    counts = reencode_items(store, synchronous(b), batch_size=3, progress=seen.append)
    assert counts == {"items": len(ITEMS), "skipped": 0} and seen == [3, 3, 1]
    assert reencode_event_texts(store, synchronous(b), batch_size=1) == 2
    want = b([i.text() for i in ITEMS])
    got = store.get_item_vectors([i.item_id for i in ITEMS])
    for item, vector in zip(ITEMS, want):
        assert np.allclose(got[item.item_id], vector, atol=1e-6)

    # A shard that only recovers comes back with model A's snapshots: stale.
    stale = ProfileShard(0, open_store(store_url), CFG)
    stale.recover()
    assert float(stale.profile_view("u").vector @ _expected_profiles(b)["u"]) < 0.99
    # Rebuilding drops the snapshots and replays the log with model B's item and text vectors.
    replayed = shard.rebuild()
    assert replayed == len(EVENTS)
    expected = _expected_profiles(b)
    for user in ("u", "v"):
        assert float(shard.profile_view(user).vector @ expected[user]) > 1 - 1e-5
    # ... and snapshots them, so the next plain recovery is right too.
    fresh = ProfileShard(0, open_store(store_url), CFG)
    assert fresh.recover() == 0
    assert float(fresh.profile_view("u").vector @ expected["u"]) > 1 - 1e-5


def test_encoder_identity_follows_weights_and_pooling_not_docs_or_folder_name(tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(bundled_model_path(), folder)
    base = EncoderConfig(model_path=str(folder))
    first = encoder_identity(base)
    assert same_vectors(encoder_identity(EncoderConfig()), first)  # same files, another folder
    (folder / "README.md").write_text("notes that change nothing")
    assert same_vectors(first, encoder_identity(base))
    assert same_vectors(first, encoder_identity(base.model_copy(update={"backend": "onnx"})))  # same function
    assert not same_vectors(first, encoder_identity(base.model_copy(update={"pooling": "cls"})))
    assert not same_vectors(None, first)
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # one bit of one weight
    weights.write_bytes(bytes(data))
    assert not same_vectors(first, encoder_identity(base))


def test_mark_encoder_swap_records_a_new_store_and_flags_a_changed_model(tmp_path):
    from tastemaker.app import mark_encoder_swap
    from tastemaker.config import ServiceConfig
    from tastemaker.store.base import ENCODER_IDENTITY_KEY, ENCODER_SWAP_PENDING_KEY

    config = ServiceConfig(data_dir=str(tmp_path))
    store = open_store(config.store_url())
    try:
        assert mark_encoder_swap(config) is False  # empty store: the model is just recorded
        assert same_vectors(store.get_meta(ENCODER_IDENTITY_KEY), encoder_identity(config.encoder))
        store.upsert_items(_encoded_items(_model("A")))
        assert mark_encoder_swap(config) is False  # same model: nothing to do
        store.set_meta(ENCODER_IDENTITY_KEY, "other:mean:256:sha256=0000000000000000")
        assert mark_encoder_swap(config) is True
        assert store.get_meta(ENCODER_SWAP_PENDING_KEY) == encoder_identity(config.encoder)
        store.set_meta(ENCODER_SWAP_PENDING_KEY, None)
        store.set_meta(ENCODER_IDENTITY_KEY, None)  # a store written before identities were recorded
        assert mark_encoder_swap(config) is True
    finally:
        store.close()

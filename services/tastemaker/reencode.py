"""Switching the service to another encoder model: identify the model that made the stored
vectors, and re-encode every stored item and event text with the new one.

The store records the identity of the model its vectors came from (`ENCODER_IDENTITY_KEY` in its
meta table). At start-up (`tastemaker.startup`, run by the gateway) the encoder's identity is compared
with it; when they differ, every item vector is rewritten (each a new entry of the item
change feed, so retrieval replicas pick it up) and every review/search text vector, through any
`encode` function — the service passes the encoder pool's — and the profile shards then rebuild
their profiles from the event log. The plain functions here need no Ray.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Sequence

import numpy as np

from tastemaker.config import EncoderConfig
from tastemaker.store import Store

Encode = Callable[[list[str]], np.ndarray]


def encoder_identity(config: EncoderConfig) -> str:
    """The identity the store records for its vectors: `encoder.identity.model_identity` (the
    content of the model folder's files, pooling and max length; not the backend or dtype, which
    compute the same function within rounding), the same string `tastemaker encode` stamps on
    vectors computed off-line."""
    from tastemaker.encoder.identity import model_identity

    return model_identity(config)


def same_vectors(recorded: str | None, identity: str) -> bool:
    """Whether vectors made by the model `recorded` names are valid for `identity`: equal pooling,
    max length and file digest. The readable name in front (the folder's name) is ignored, so a
    model folder moved or renamed does not re-encode the catalog."""
    from tastemaker.encoder.identity import same_model

    return recorded is not None and same_model(identity, recorded)


def _pipelined(encode_async: Callable[[list[str]], Callable[[], np.ndarray]], batches: Iterable[list[str]], window: int) -> Iterator[np.ndarray]:
    """Results of `encode_async(batch)()` in order, with up to `window` batches submitted ahead."""
    pending: list[Callable[[], np.ndarray]] = []
    for batch in batches:
        pending.append(encode_async(batch))
        if len(pending) >= window:
            yield pending.pop(0)()
    while pending:
        yield pending.pop(0)()


def reencode_items(
    store: Store,
    encode_async: Callable[[list[str]], Callable[[], np.ndarray]],
    batch_size: int = 256,
    window: int = 2,
    progress: Optional[Callable[[int], None]] = None,
) -> dict[str, int]:
    """Re-encode `Item.text()` of every live item in batches and write the vectors (a new change
    feed entry each). `encode_async(texts)` submits a batch and returns a function that waits for
    its vectors, so `window` batches are in flight at once. Items changed meanwhile are left
    alone (the concurrent writer encoded them with the current model)."""
    counts = {"items": 0, "skipped": 0}

    def pages() -> Iterator[list[tuple[int, object]]]:
        after = ""
        while True:
            page = store.live_items(after, limit=batch_size)
            if not page:
                return
            after = page[-1][1].item_id
            yield page

    page_list: list[list[tuple[int, object]]] = []

    def batches() -> Iterator[list[str]]:
        for page in pages():
            page_list.append(page)
            yield [item.text() for _, item in page]

    for vectors in _pipelined(encode_async, batches(), window):
        page = page_list.pop(0)
        skipped = store.replace_item_vectors([(item.item_id, seq, vector) for (seq, item), vector in zip(page, vectors)])
        counts["items"] += len(page) - len(skipped)
        counts["skipped"] += len(skipped)
        if progress:
            progress(len(page))
    return counts


def reencode_event_texts(
    store: Store,
    encode_async: Callable[[list[str]], Callable[[], np.ndarray]],
    batch_size: int = 256,
    window: int = 2,
    progress: Optional[Callable[[int], None]] = None,
) -> int:
    """Re-encode the text of every review and search event; returns how many."""
    page_list: list[list[tuple[int, str]]] = []

    def batches() -> Iterator[list[str]]:
        after = 0
        while True:
            page = store.text_events(after, limit=batch_size)
            if not page:
                return
            after = page[-1][0]
            page_list.append(page)
            yield [text for _, text in page]

    done = 0
    for vectors in _pipelined(encode_async, batches(), window):
        page = page_list.pop(0)
        store.replace_event_text_vectors([(seq, vector) for (seq, _), vector in zip(page, vectors)])
        done += len(page)
        if progress:
            progress(len(page))
    return done


def count_text_events(store: Store) -> int:
    """How many events carry text (for a progress bar total)."""
    total, after = 0, 0
    while page := store.text_events(after, limit=10_000):
        total += len(page)
        after = page[-1][0]
    return total


def synchronous(encode: Encode) -> Callable[[list[str]], Callable[[], np.ndarray]]:
    """Adapts a plain `encode(texts)` (e.g. a backend's) to the submit-then-wait form."""

    def submit(texts: list[str]) -> Callable[[], np.ndarray]:
        vectors = encode(texts)
        return lambda: vectors

    return submit


def model_folder_label(config: EncoderConfig) -> str:
    """The model folder, for messages."""
    from tastemaker.encoder.base import resolve_model_path

    return str(Path(resolve_model_path(config)))


__all__: Sequence[str] = (
    "encoder_identity",
    "reencode_items",
    "reencode_event_texts",
    "count_text_events",
    "synchronous",
)

"""The store protocol and the URL-based factory."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Iterator, Optional, Protocol, Sequence

import numpy as np

from tastemaker.domain import Item, UserEvent

if TYPE_CHECKING:
    from tastemaker.config import StoreConfig


#: Store meta key: the identity of the encoder model that made the stored item and text vectors.
ENCODER_IDENTITY_KEY = "encoder_identity"
#: Store meta key, present while vectors are being re-encoded for a new model (its identity).
ENCODER_SWAP_PENDING_KEY = "encoder_swap_pending"
#: Store meta key: the random id of this store (`Store.instance_id`), written once at creation.
INSTANCE_ID_KEY = "instance_id"


class DuplicateApiKey(ValueError):
    """`Store.create_api_key` was given a `key_id` or `key_hash` that is already stored."""


@dataclass
class ItemChange:
    """One entry of the item change feed: an upsert (item set) or a delete (item None)."""

    seq: int
    item_id: str
    item: Optional[Item]


@dataclass
class StoredEvent:
    """An event as written: its durable sequence number and the shard that owns its user."""

    seq: int
    shard: int
    event: UserEvent


@dataclass
class ApiKeyRecord:
    """An API key as stored: never the secret itself, only its SHA-256 (`key_hash`).

    `key_id` is the public, non-secret handle (`tastemaker keys list|revoke` name keys by it);
    `role` is one of `read`, `write`, `admin`; `revoke_time` is None while the key is valid."""

    key_id: str
    key_hash: str
    role: str
    name: str
    create_time: float
    revoke_time: Optional[float] = None


@dataclass
class SnapshotRow:
    """A serialised profile: `state` is JSON text, `vectors` raw float32 bytes (no pickle)."""

    user_id: str
    shard: int
    event_seq: int
    state: str
    vectors: bytes


class Store(Protocol):
    """Everything the service persists. Implementations must be safe to open from many processes."""

    # Items -------------------------------------------------------------------------------
    def upsert_items(self, items: Sequence[Item]) -> int:
        """Insert or replace items (with vectors); returns how many were written."""

    def delete_items(self, item_ids: Sequence[str]) -> tuple[int, list[str]]:
        """Delete items; returns (deleted count, ids that did not exist)."""

    def get_item(self, item_id: str) -> Optional[Item]:
        """One item with its vector, or None."""

    def get_item_vectors(self, item_ids: Sequence[str]) -> dict[str, np.ndarray]:
        """Vectors of the items that exist (missing ids are absent from the result)."""

    def count_items(self) -> int:
        """Number of live items."""

    def item_changes(self, after_seq: int, limit: int = 10_000) -> list[ItemChange]:
        """Changes with seq > after_seq in seq order; the feed retrieval replicas follow."""

    def item_interaction_counts(self) -> dict[str, int]:
        """Events per item id (popularity)."""

    # Events ------------------------------------------------------------------------------
    def append_events(self, shard: int, events: Sequence[UserEvent]) -> list[Optional[int]]:
        """Durably append events in one transaction; per event its seq, or None for a duplicate
        (same user_id and event_id already stored). Returns only after the commit is durable."""

    def events_after(self, after_seq: int, limit: int = 10_000) -> list[StoredEvent]:
        """All events with seq > after_seq in seq order (the feed collaborative models follow);
        text vectors are not loaded. Events of erased users disappear from the feed."""

    def event_seq(self, user_id: str, event_id: str) -> Optional[int]:
        """The seq of a stored event, or None."""

    def events_for_replay(self, shard: int, num_shards: int) -> Iterator[StoredEvent]:
        """Events of a shard not covered by its users' snapshots, in seq order."""

    def delete_user(self, user_id: str) -> int:
        """Erase a user's events and snapshot, and record the erasure (as a hash of the user id)
        in the erasure feed; returns the number of events deleted."""

    def erasures_after(self, after_seq: int) -> list[tuple[int, str]]:
        """(seq, user_hash) of erasures after `after_seq`, so derived state (collaborative
        models in other processes) can drop what it kept about erased users."""

    # Snapshots ---------------------------------------------------------------------------
    def save_snapshots(self, rows: Iterable[SnapshotRow]) -> None:
        """Insert or replace snapshots in one transaction."""

    def load_snapshots(self, shard: int) -> Iterator[SnapshotRow]:
        """All snapshots of a shard."""

    # Artefacts of offline jobs ---------------------------------------------------------
    def save_artifact(self, name: str, version: int, blob: bytes) -> None:
        """Store (replace) a named artefact, e.g. fitted collaborative models; `version` is the
        event seq the artefact covers."""

    def load_artifact(self, name: str) -> Optional[tuple[int, bytes]]:
        """(version, blob) of a named artefact, or None."""

    def artifact_version(self, name: str) -> Optional[int]:
        """The version of a named artefact without loading it, or None."""

    # Re-encoding (the encoder model changed) --------------------------------------------
    def live_items(self, after_item_id: str = "", limit: int = 1_000) -> list[tuple[int, Item]]:
        """(seq, item) of live items with item_id > `after_item_id`, in item_id order (a paging
        order that re-encoding, which changes seqs, does not disturb)."""

    def replace_item_vectors(self, updates: Sequence[tuple[str, int, np.ndarray]]) -> list[str]:
        """Set new vectors for (item_id, seq read, vector), each as a new entry of the item change
        feed, in one transaction; an item whose seq changed since it was read (upserted or deleted
        meanwhile, so already encoded by the current model) is left alone. Returns the ids left
        alone."""

    def text_events(self, after_seq: int = 0, limit: int = 1_000) -> list[tuple[int, str]]:
        """(seq, text) of events that carry text (reviews, searches), seq > `after_seq`, in seq order."""

    def replace_event_text_vectors(self, updates: Sequence[tuple[int, np.ndarray]]) -> None:
        """Set the text vector of events by seq, in one transaction."""

    def delete_snapshots(self, shard: Optional[int] = None) -> int:
        """Drop the profile snapshots of one shard (all shards with None); returns how many."""

    def get_meta(self, key: str) -> Optional[str]:
        """A value of the store's small key-value table (e.g. the encoder identity), or None."""

    def set_meta(self, key: str, value: Optional[str]) -> None:
        """Set (or with None remove) a key of the key-value table."""

    def compare_and_set_meta(self, key: str, expected: Optional[str], value: Optional[str]) -> bool:
        """Atomically set `key` to `value` (None removes it) only if its current value is
        `expected` (None: absent); True if set. The start-up lease (`tastemaker.startup`) is
        built on it, so two processes on any nodes never both take it."""

    # API keys (hashes only) ----------------------------------------------------------------
    def create_api_key(self, record: ApiKeyRecord) -> None:
        """Store a new key record; a `key_id` or `key_hash` that already exists is an error."""

    def find_api_key(self, key_hash: str) -> Optional[ApiKeyRecord]:
        """The record with this hash (revoked ones too, so callers can tell revoked from unknown)."""

    def list_api_keys(self) -> list[ApiKeyRecord]:
        """Every key record, revoked ones included, in creation order."""

    def revoke_api_key(self, key_id: str) -> bool:
        """Mark a key revoked (idempotent); False if no key has this id."""

    # Lifecycle ---------------------------------------------------------------------------
    def instance_id(self) -> str:
        """A random id created once with the store's schema: every process that opens the same
        store (file or database) sees the same id, and two different stores never do. Health
        compares the ids the components report, so a split (each node on its own file) is seen."""

    def ensure_num_shards(self, num_shards: int, shard_of: "ShardFunction") -> None:
        """Re-assign events and snapshots when the shard count changed since the last start."""

    def close(self) -> None:
        """Release connections."""


class ShardFunction(Protocol):
    def __call__(self, user_id: str, num_shards: int) -> int: ...


def user_hash(user_id: str) -> str:
    """How erasure records name a user: a SHA-256, so the record itself keeps no user id."""
    import hashlib

    return hashlib.sha256(user_id.encode("utf-8")).hexdigest()


def redact_url(url: str) -> str:
    """The URL with its password replaced by `***` (in the user part and in a `password=` query
    parameter), for logs, banners and error messages. Other URLs come back unchanged."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        # Not a URL we understand: show nothing of it rather than risk showing a secret.
        return "<store URL without a scheme>"
    netloc, slash, tail = rest.partition("/")
    if "@" in netloc:
        userinfo, hostinfo = netloc.rsplit("@", 1)
        if ":" in userinfo:
            netloc = userinfo.split(":", 1)[0] + ":***@" + hostinfo
    path, question, query = tail.partition("?")
    if query:
        query = "&".join(
            "password=***" if pair.split("=", 1)[0].lower() == "password" else pair for pair in query.split("&")
        )
    return f"{scheme}://{netloc}{slash}{path}{question}{query}"


def open_store(url: str, config: Optional["StoreConfig"] = None) -> Store:
    """Open a store by URL: `sqlite:///absolute/path.db` (embedded, one node) or
    `postgresql://user:password@host:port/database` (`postgres://` too; shared by every node).

    `config` (the service's `store` section) sets SQLite's busy timeout and PostgreSQL's pool;
    defaults without it. An unreachable PostgreSQL raises `tastemaker.errors.Unavailable` naming
    host:port, never the password."""
    if url.startswith("sqlite:///"):
        from tastemaker.store.sqlite import SQLiteStore

        # SQLAlchemy's convention: sqlite:///relative.db, sqlite:////absolute/path.db
        if config is None:
            return SQLiteStore(url[len("sqlite:///") :])
        return SQLiteStore(url[len("sqlite:///") :], busy_timeout_s=config.busy_timeout_s)
    if url.startswith(("postgresql://", "postgres://")):
        from tastemaker.store.postgres import PostgresStore

        return PostgresStore(url, config)
    from tastemaker.errors import InvalidArgument

    raise InvalidArgument(
        f"unsupported store URL {redact_url(url)!r}; allowed: sqlite:///path/to/file.db, "
        "postgresql://user:password@host:port/database"
    )

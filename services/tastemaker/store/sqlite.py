"""SQLite store: the embedded default. WAL mode with synchronous=FULL, so a committed event
survives a crash of the process or the machine; many processes (gateway, shards, retrieval
replicas) open the same file, each with its own connection."""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
import uuid
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence

import numpy as np

from tastemaker.domain import EventType, Item, UserEvent
from tastemaker.store.base import (
    INSTANCE_ID_KEY,
    ApiKeyRecord,
    DuplicateApiKey,
    ItemChange,
    ShardFunction,
    SnapshotRow,
    StoredEvent,
    user_hash,
)

logger = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    item_id TEXT PRIMARY KEY,
    seq INTEGER NOT NULL,
    deleted INTEGER NOT NULL DEFAULT 0,
    title TEXT NOT NULL DEFAULT '',
    description TEXT NOT NULL DEFAULT '',
    tags TEXT NOT NULL DEFAULT '[]',
    attributes TEXT NOT NULL DEFAULT '{}',
    update_time REAL NOT NULL DEFAULT 0,
    vector BLOB
);
CREATE INDEX IF NOT EXISTS items_by_seq ON items(seq);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id TEXT NOT NULL,
    event_id TEXT NOT NULL,
    shard INTEGER NOT NULL,
    event_type INTEGER NOT NULL,
    item_id TEXT NOT NULL DEFAULT '',
    value REAL NOT NULL DEFAULT 0,
    text TEXT NOT NULL DEFAULT '',
    event_time REAL NOT NULL,
    attribution_token TEXT NOT NULL DEFAULT '',
    text_vector BLOB,
    sentiment REAL NOT NULL DEFAULT 0,
    UNIQUE (user_id, event_id)
);
CREATE INDEX IF NOT EXISTS events_by_shard ON events(shard, seq);
CREATE INDEX IF NOT EXISTS events_by_item ON events(item_id);
CREATE TABLE IF NOT EXISTS snapshots (
    user_id TEXT PRIMARY KEY,
    shard INTEGER NOT NULL,
    event_seq INTEGER NOT NULL,
    state TEXT NOT NULL,
    vectors BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS snapshots_by_shard ON snapshots(shard);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS erasures (seq INTEGER PRIMARY KEY AUTOINCREMENT, user_hash TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS artifacts (name TEXT PRIMARY KEY, version INTEGER NOT NULL, blob BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS api_keys (
    key_id TEXT PRIMARY KEY,
    key_hash TEXT NOT NULL UNIQUE,
    role TEXT NOT NULL,
    name TEXT NOT NULL DEFAULT '',
    create_time REAL NOT NULL,
    revoke_time REAL
);
"""


def _vector_bytes(vector: Optional[np.ndarray]) -> Optional[bytes]:
    return None if vector is None else np.asarray(vector, dtype=np.float32).tobytes()


def _vector_from(blob: Optional[bytes]) -> Optional[np.ndarray]:
    return None if blob is None else np.frombuffer(blob, dtype=np.float32).copy()


class SQLiteStore:
    """`Store` over one SQLite file. Thread-safe: one connection guarded by a lock."""

    def __init__(self, path: str | Path, busy_timeout_s: float = 30.0):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._conn = sqlite3.connect(
            str(self.path), timeout=busy_timeout_s, isolation_level=None, check_same_thread=False
        )
        self._conn.execute("PRAGMA journal_mode=WAL")
        # FULL: the WAL is fsynced at every commit, so an acknowledged event survives power loss.
        self._conn.execute("PRAGMA synchronous=FULL")
        # Deleted rows are overwritten with zeros, not left in free pages: DeleteUser must leave
        # no copy of the user's id or text in the file (tests/integration/test_privacy.py).
        self._conn.execute("PRAGMA secure_delete=ON")
        self._conn.execute(f"PRAGMA busy_timeout={int(busy_timeout_s * 1000)}")
        with self._lock:
            self._conn.executescript(_SCHEMA)
            self._migrate()
            # Insert-if-absent: two processes opening a new file at once both keep the first id.
            self._conn.execute(
                "INSERT OR IGNORE INTO meta(key, value) VALUES (?, ?)", (INSTANCE_ID_KEY, uuid.uuid4().hex)
            )
        self._instance_id: Optional[str] = None  # the id never changes, so it is read once

    def _migrate(self) -> None:
        """Bring files written by older versions up to the current schema (additive only)."""
        columns = {row[1] for row in self._conn.execute("PRAGMA table_info(events)")}
        if "sentiment" not in columns:
            self._conn.execute("ALTER TABLE events ADD COLUMN sentiment REAL NOT NULL DEFAULT 0")

    # -- helpers --------------------------------------------------------------------------
    def _write(self):
        """A write transaction taken eagerly (BEGIN IMMEDIATE) so it never deadlocks on upgrade."""
        store = self

        class _Tx:
            def __enter__(self_inner):
                store._lock.acquire()
                store._conn.execute("BEGIN IMMEDIATE")
                return store._conn

            def __exit__(self_inner, exc_type, exc, tb):
                try:
                    if exc_type is None:
                        store._before_commit(store._conn)
                    store._conn.execute("ROLLBACK" if exc_type else "COMMIT")
                except BaseException:
                    if exc_type is None and store._conn.in_transaction:
                        store._conn.execute("ROLLBACK")
                    raise
                finally:
                    store._lock.release()
                return False

        return _Tx()

    def _before_commit(self, conn: sqlite3.Connection) -> None:
        """Called inside every write transaction right before its COMMIT. A seam for tests that
        hold a writer between reserving seqs and committing; does nothing."""

    def _next_seq(self, conn: sqlite3.Connection, name: str, count: int) -> int:
        """Reserve `count` consecutive sequence numbers inside the current transaction."""
        row = conn.execute("SELECT value FROM counters WHERE name = ?", (name,)).fetchone()
        first = (row[0] if row else 0) + 1
        conn.execute(
            "INSERT INTO counters(name, value) VALUES (?, ?) "
            "ON CONFLICT(name) DO UPDATE SET value = excluded.value",
            (name, first + count - 1),
        )
        return first

    @staticmethod
    def _item_from_row(row) -> Item:
        item_id, title, description, tags, attributes, update_time, vector = row
        return Item(
            item_id=item_id,
            title=title,
            description=description,
            tags=json.loads(tags),
            attributes=json.loads(attributes),
            update_time=update_time,
            vector=_vector_from(vector),
        )

    # -- items ----------------------------------------------------------------------------
    def upsert_items(self, items: Sequence[Item]) -> int:
        if not items:
            return 0
        now = time.time()
        with self._write() as conn:
            first = self._next_seq(conn, "items", len(items))
            conn.executemany(
                "INSERT INTO items(item_id, seq, deleted, title, description, tags, attributes, "
                "update_time, vector) VALUES (?, ?, 0, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT(item_id) DO UPDATE SET seq=excluded.seq, deleted=0, "
                "title=excluded.title, description=excluded.description, tags=excluded.tags, "
                "attributes=excluded.attributes, update_time=excluded.update_time, "
                "vector=excluded.vector",
                [
                    (
                        item.item_id,
                        first + i,
                        item.title,
                        item.description,
                        json.dumps(list(item.tags)),
                        json.dumps(dict(item.attributes), sort_keys=True),
                        now,
                        _vector_bytes(item.vector),
                    )
                    for i, item in enumerate(items)
                ],
            )
        return len(items)

    def delete_items(self, item_ids: Sequence[str]) -> tuple[int, list[str]]:
        ids = list(dict.fromkeys(item_ids))
        with self._write() as conn:
            live = {
                row[0]
                for row in conn.execute(
                    f"SELECT item_id FROM items WHERE deleted = 0 AND item_id IN ({','.join('?' * len(ids))})",
                    ids,
                )
            } if ids else set()
            doomed = [i for i in ids if i in live]
            if doomed:
                first = self._next_seq(conn, "items", len(doomed))
                # A tombstone (not a DELETE) so followers of the change feed see the removal.
                conn.executemany(
                    "UPDATE items SET deleted = 1, seq = ?, vector = NULL, update_time = ? WHERE item_id = ?",
                    [(first + i, time.time(), item_id) for i, item_id in enumerate(doomed)],
                )
        return len(doomed), [i for i in ids if i not in live]

    def get_item(self, item_id: str) -> Optional[Item]:
        with self._lock:
            row = self._conn.execute(
                "SELECT item_id, title, description, tags, attributes, update_time, vector "
                "FROM items WHERE item_id = ? AND deleted = 0",
                (item_id,),
            ).fetchone()
        return None if row is None else self._item_from_row(row)

    def get_item_vectors(self, item_ids: Sequence[str]) -> dict[str, np.ndarray]:
        ids = list(dict.fromkeys(item_ids))
        out: dict[str, np.ndarray] = {}
        with self._lock:
            for start in range(0, len(ids), 500):
                chunk = ids[start : start + 500]
                for item_id, blob in self._conn.execute(
                    f"SELECT item_id, vector FROM items WHERE deleted = 0 AND vector IS NOT NULL "
                    f"AND item_id IN ({','.join('?' * len(chunk))})",
                    chunk,
                ):
                    out[item_id] = _vector_from(blob)
        return out

    def count_items(self) -> int:
        with self._lock:
            return self._conn.execute("SELECT COUNT(*) FROM items WHERE deleted = 0").fetchone()[0]

    def item_changes(self, after_seq: int, limit: int = 10_000) -> list[ItemChange]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT seq, deleted, item_id, title, description, tags, attributes, update_time, vector "
                "FROM items WHERE seq > ? ORDER BY seq LIMIT ?",
                (after_seq, limit),
            ).fetchall()
        return [
            ItemChange(seq=row[0], item_id=row[2], item=None if row[1] else self._item_from_row(row[2:]))
            for row in rows
        ]

    def item_interaction_counts(self) -> dict[str, int]:
        with self._lock:
            return dict(
                self._conn.execute(
                    "SELECT item_id, COUNT(*) FROM events WHERE item_id != '' GROUP BY item_id"
                ).fetchall()
            )

    # -- events ---------------------------------------------------------------------------
    def append_events(self, shard: int, events: Sequence[UserEvent]) -> list[Optional[int]]:
        seqs: list[Optional[int]] = []
        with self._write() as conn:
            for event in events:
                cursor = conn.execute(
                    "INSERT OR IGNORE INTO events(user_id, event_id, shard, event_type, item_id, value, "
                    "text, event_time, attribution_token, text_vector, sentiment) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                    (
                        event.user_id,
                        event.event_id,
                        shard,
                        int(event.event_type),
                        event.item_id,
                        float(event.value),
                        event.text,
                        float(event.event_time),
                        event.attribution_token,
                        _vector_bytes(event.text_vector),
                        float(event.sentiment),
                    ),
                )
                seqs.append(cursor.lastrowid if cursor.rowcount == 1 else None)
        return seqs

    def events_after(self, after_seq: int, limit: int = 10_000) -> list[StoredEvent]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT seq, shard, event_id, user_id, event_type, item_id, value, event_time, sentiment "
                "FROM events WHERE seq > ? ORDER BY seq LIMIT ?",
                (after_seq, limit),
            ).fetchall()
        return [
            StoredEvent(
                seq=row[0],
                shard=row[1],
                event=UserEvent(
                    event_id=row[2],
                    user_id=row[3],
                    event_type=EventType(row[4]),
                    item_id=row[5],
                    value=row[6],
                    event_time=row[7],
                    sentiment=row[8],
                ),
            )
            for row in rows
        ]

    def save_artifact(self, name: str, version: int, blob: bytes) -> None:
        with self._write() as conn:
            conn.execute(
                "INSERT INTO artifacts(name, version, blob) VALUES (?, ?, ?) "
                "ON CONFLICT(name) DO UPDATE SET version = excluded.version, blob = excluded.blob",
                (name, version, blob),
            )

    def load_artifact(self, name: str) -> Optional[tuple[int, bytes]]:
        with self._lock:
            row = self._conn.execute("SELECT version, blob FROM artifacts WHERE name = ?", (name,)).fetchone()
        return None if row is None else (row[0], bytes(row[1]))

    def artifact_version(self, name: str) -> Optional[int]:
        with self._lock:
            row = self._conn.execute("SELECT version FROM artifacts WHERE name = ?", (name,)).fetchone()
        return None if row is None else row[0]

    def event_seq(self, user_id: str, event_id: str) -> Optional[int]:
        with self._lock:
            row = self._conn.execute(
                "SELECT seq FROM events WHERE user_id = ? AND event_id = ?", (user_id, event_id)
            ).fetchone()
        return None if row is None else row[0]

    def events_for_replay(self, shard: int, num_shards: int) -> Iterator[StoredEvent]:
        del num_shards  # shard ids are kept consistent by ensure_num_shards
        with self._lock:
            rows = self._conn.execute(
                "SELECT e.seq, e.shard, e.event_id, e.user_id, e.event_type, e.item_id, e.value, "
                "e.text, e.event_time, e.attribution_token, e.text_vector, e.sentiment "
                "FROM events e LEFT JOIN snapshots s ON s.user_id = e.user_id "
                "WHERE e.shard = ? AND (s.event_seq IS NULL OR e.seq > s.event_seq) ORDER BY e.seq",
                (shard,),
            ).fetchall()
        for row in rows:
            yield StoredEvent(
                seq=row[0],
                shard=row[1],
                event=UserEvent(
                    event_id=row[2],
                    user_id=row[3],
                    event_type=EventType(row[4]),
                    item_id=row[5],
                    value=row[6],
                    text=row[7],
                    event_time=row[8],
                    attribution_token=row[9],
                    text_vector=_vector_from(row[10]),
                    sentiment=row[11],
                ),
            )

    def delete_user(self, user_id: str) -> int:
        with self._write() as conn:
            deleted = conn.execute("DELETE FROM events WHERE user_id = ?", (user_id,)).rowcount
            conn.execute("DELETE FROM snapshots WHERE user_id = ?", (user_id,))
            conn.execute("INSERT INTO erasures(user_hash) VALUES (?)", (user_hash(user_id),))
        self._truncate_wal()
        return deleted

    def _truncate_wal(self) -> None:
        """Copy the WAL into the database and empty it: the WAL still holds the frames that wrote
        an erased user's rows. TRUNCATE waits (busy timeout) for readers of older snapshots."""
        with self._lock:
            busy, _, _ = self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        if busy:
            logger.warning("the WAL could not be emptied after an erasure (readers busy); the next erasure retries")

    def erasures_after(self, after_seq: int) -> list[tuple[int, str]]:
        with self._lock:
            return self._conn.execute(
                "SELECT seq, user_hash FROM erasures WHERE seq > ? ORDER BY seq", (after_seq,)
            ).fetchall()

    # -- snapshots ------------------------------------------------------------------------
    def save_snapshots(self, rows: Iterable[SnapshotRow]) -> None:
        with self._write() as conn:
            conn.executemany(
                "INSERT INTO snapshots(user_id, shard, event_seq, state, vectors) VALUES (?,?,?,?,?) "
                "ON CONFLICT(user_id) DO UPDATE SET shard=excluded.shard, event_seq=excluded.event_seq, "
                "state=excluded.state, vectors=excluded.vectors",
                [(r.user_id, r.shard, r.event_seq, r.state, r.vectors) for r in rows],
            )

    def load_snapshots(self, shard: int) -> Iterator[SnapshotRow]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT user_id, shard, event_seq, state, vectors FROM snapshots WHERE shard = ?",
                (shard,),
            ).fetchall()
        for row in rows:
            yield SnapshotRow(*row)

    # -- re-encoding ----------------------------------------------------------------------
    def live_items(self, after_item_id: str = "", limit: int = 1_000) -> list[tuple[int, Item]]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT seq, item_id, title, description, tags, attributes, update_time, vector "
                "FROM items WHERE deleted = 0 AND item_id > ? ORDER BY item_id LIMIT ?",
                (after_item_id, limit),
            ).fetchall()
        return [(row[0], self._item_from_row(row[1:])) for row in rows]

    def replace_item_vectors(self, updates: Sequence[tuple[str, int, np.ndarray]]) -> list[str]:
        if not updates:
            return []
        skipped = []
        with self._write() as conn:
            first = self._next_seq(conn, "items", len(updates))
            for i, (item_id, read_seq, vector) in enumerate(updates):
                # Conditional on the seq read: a concurrent upsert (already encoded by the current
                # model) or delete wins. The new seq puts the item on the change feed again.
                changed = conn.execute(
                    "UPDATE items SET vector = ?, seq = ? WHERE item_id = ? AND seq = ? AND deleted = 0",
                    (_vector_bytes(vector), first + i, item_id, read_seq),
                ).rowcount
                if not changed:
                    skipped.append(item_id)
        return skipped

    def text_events(self, after_seq: int = 0, limit: int = 1_000) -> list[tuple[int, str]]:
        with self._lock:
            return self._conn.execute(
                "SELECT seq, text FROM events WHERE seq > ? AND text != '' ORDER BY seq LIMIT ?",
                (after_seq, limit),
            ).fetchall()

    def replace_event_text_vectors(self, updates: Sequence[tuple[int, np.ndarray]]) -> None:
        if not updates:
            return
        with self._write() as conn:
            conn.executemany(
                "UPDATE events SET text_vector = ? WHERE seq = ?",
                [(_vector_bytes(vector), seq) for seq, vector in updates],
            )

    def delete_snapshots(self, shard: Optional[int] = None) -> int:
        with self._write() as conn:
            if shard is None:
                return conn.execute("DELETE FROM snapshots").rowcount
            return conn.execute("DELETE FROM snapshots WHERE shard = ?", (shard,)).rowcount

    def get_meta(self, key: str) -> Optional[str]:
        with self._lock:
            row = self._conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def set_meta(self, key: str, value: Optional[str]) -> None:
        with self._write() as conn:
            if value is None:
                conn.execute("DELETE FROM meta WHERE key = ?", (key,))
            else:
                conn.execute(
                    "INSERT INTO meta(key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                    (key, value),
                )

    def compare_and_set_meta(self, key: str, expected: Optional[str], value: Optional[str]) -> bool:
        with self._write() as conn:  # BEGIN IMMEDIATE: the read and the write are one transaction
            row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
            if (None if row is None else row[0]) != expected:
                return False
            if value is None:
                conn.execute("DELETE FROM meta WHERE key = ?", (key,))
            else:
                conn.execute(
                    "INSERT INTO meta(key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                    (key, value),
                )
            return True

    # -- API keys -------------------------------------------------------------------------
    _KEY_COLUMNS = "key_id, key_hash, role, name, create_time, revoke_time"

    def create_api_key(self, record: ApiKeyRecord) -> None:
        try:
            with self._write() as conn:
                conn.execute(
                    f"INSERT INTO api_keys({self._KEY_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)",
                    (
                        record.key_id,
                        record.key_hash,
                        record.role,
                        record.name,
                        float(record.create_time),
                        None if record.revoke_time is None else float(record.revoke_time),
                    ),
                )
        except sqlite3.IntegrityError:
            raise DuplicateApiKey(f"an API key with id {record.key_id!r} or the same secret already exists") from None

    def find_api_key(self, key_hash: str) -> Optional[ApiKeyRecord]:
        with self._lock:
            row = self._conn.execute(
                f"SELECT {self._KEY_COLUMNS} FROM api_keys WHERE key_hash = ?", (key_hash,)
            ).fetchone()
        return None if row is None else ApiKeyRecord(*row)

    def list_api_keys(self) -> list[ApiKeyRecord]:
        with self._lock:
            rows = self._conn.execute(
                f"SELECT {self._KEY_COLUMNS} FROM api_keys ORDER BY create_time, rowid"
            ).fetchall()
        return [ApiKeyRecord(*row) for row in rows]

    def revoke_api_key(self, key_id: str) -> bool:
        with self._write() as conn:
            # COALESCE keeps the first revoke time: revoking again changes nothing.
            changed = conn.execute(
                "UPDATE api_keys SET revoke_time = COALESCE(revoke_time, ?) WHERE key_id = ?",
                (time.time(), key_id),
            ).rowcount
        return changed == 1

    # -- lifecycle ------------------------------------------------------------------------
    def instance_id(self) -> str:
        if self._instance_id is None:
            with self._write() as conn:
                # Written at open; inserted again only if someone removed it with set_meta.
                conn.execute(
                    "INSERT OR IGNORE INTO meta(key, value) VALUES (?, ?)", (INSTANCE_ID_KEY, uuid.uuid4().hex)
                )
                self._instance_id = conn.execute(
                    "SELECT value FROM meta WHERE key = ?", (INSTANCE_ID_KEY,)
                ).fetchone()[0]
        return self._instance_id

    def ensure_num_shards(self, num_shards: int, shard_of: ShardFunction) -> None:
        with self._write() as conn:
            row = conn.execute("SELECT value FROM meta WHERE key = 'num_shards'").fetchone()
            if row is not None and int(row[0]) == num_shards:
                return
            users = [u for (u,) in conn.execute("SELECT DISTINCT user_id FROM events")]
            assignments = [(shard_of(u, num_shards), u) for u in users]
            conn.executemany("UPDATE events SET shard = ? WHERE user_id = ?", assignments)
            conn.executemany("UPDATE snapshots SET shard = ? WHERE user_id = ?", assignments)
            conn.execute(
                "INSERT INTO meta(key, value) VALUES ('num_shards', ?) "
                "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                (str(num_shards),),
            )

    def close(self) -> None:
        with self._lock:
            self._conn.close()

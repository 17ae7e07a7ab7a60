"""PostgreSQL store: the shared store of a multi-node cluster (psycopg 3 with a connection pool).

It keeps every promise of the SQLite store:
- durable before acknowledged: every connection runs with `synchronous_commit = on`, set
  explicitly, so a server configured otherwise cannot turn an acknowledged event into a lost one;
- duplicates: a UNIQUE (user_id, event_id) constraint, `INSERT ... ON CONFLICT DO NOTHING`;
- erasure complete on return: events, snapshot and the erasure record go in one transaction;
- the schema is versioned (`schema_version`) and migrated at start under an advisory lock, so many
  replicas starting at once do not race.

Feeds in commit order. The item change feed and the event feed are read as "seq > last seen".
With a plain sequence, seqs are handed out at insert time and transactions commit in any order: a
reader can see seq 11 committed while seq 10 is still in flight, move its cursor past 10 and never
see it. Here each feed's seqs are reserved from a `counters` row with `UPDATE ... RETURNING`,
whose row lock is held until the transaction ends. The next writer of that feed waits for the
lock, so it reserves its seqs only after the previous one has committed and become visible: seq
order is commit order, and every snapshot sees a gap-free prefix of each feed (the same
serialisation SQLite's single writer gives). Writers of different feeds do not wait on each other.
"""

from __future__ import annotations

import json
import time
import uuid
from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterable, Iterator, Optional, Sequence
from urllib.parse import urlsplit

import numpy as np
import psycopg
from psycopg_pool import ConnectionPool, PoolTimeout

from tastemaker.domain import EventType, Item, UserEvent
from tastemaker.errors import FailedPrecondition, InvalidArgument, Unavailable
from tastemaker.store.base import (
    INSTANCE_ID_KEY,
    ApiKeyRecord,
    DuplicateApiKey,
    ItemChange,
    ShardFunction,
    SnapshotRow,
    StoredEvent,
    redact_url,
    user_hash,
)

if TYPE_CHECKING:
    from tastemaker.config import StoreConfig

#: Advisory lock keys (64-bit, arbitrary but fixed): schema migration and shard re-assignment.
_MIGRATION_LOCK = 0x7461_7374_656D_0001
_SHARDS_LOCK = 0x7461_7374_656D_0002

#: The feeds whose seqs come from `counters` (see the module docstring).
_FEEDS = ("items", "events", "erasures")

#: Reserves `count` seqs of `feed` (named parameters): returns `base`, the seqs are base+1..base+count.
_RESERVE_SQL = "UPDATE counters SET value = value + %(count)s WHERE name = %(feed)s RETURNING value - %(count)s AS base"

#: Schema migrations: version -> statements. Append new versions; never edit an applied one.
_MIGRATIONS: dict[int, list[str]] = {
    1: [
        """CREATE TABLE items (
            item_id TEXT PRIMARY KEY,
            seq BIGINT NOT NULL,
            deleted BOOLEAN NOT NULL DEFAULT FALSE,
            title TEXT NOT NULL DEFAULT '',
            description TEXT NOT NULL DEFAULT '',
            tags TEXT NOT NULL DEFAULT '[]',
            attributes TEXT NOT NULL DEFAULT '{}',
            update_time DOUBLE PRECISION NOT NULL DEFAULT 0,
            vector BYTEA
        )""",
        "CREATE INDEX items_by_seq ON items(seq)",
        """CREATE TABLE events (
            seq BIGINT PRIMARY KEY,
            user_id TEXT NOT NULL,
            event_id TEXT NOT NULL,
            shard INTEGER NOT NULL,
            event_type INTEGER NOT NULL,
            item_id TEXT NOT NULL DEFAULT '',
            value DOUBLE PRECISION NOT NULL DEFAULT 0,
            text TEXT NOT NULL DEFAULT '',
            event_time DOUBLE PRECISION NOT NULL,
            attribution_token TEXT NOT NULL DEFAULT '',
            text_vector BYTEA,
            sentiment DOUBLE PRECISION NOT NULL DEFAULT 0,
            CONSTRAINT events_user_event UNIQUE (user_id, event_id)
        )""",
        "CREATE INDEX events_by_shard ON events(shard, seq)",
        "CREATE INDEX events_by_item ON events(item_id)",
        "CREATE INDEX events_with_text ON events(seq) WHERE text <> ''",
        """CREATE TABLE snapshots (
            user_id TEXT PRIMARY KEY,
            shard INTEGER NOT NULL,
            event_seq BIGINT NOT NULL,
            state TEXT NOT NULL,
            vectors BYTEA NOT NULL
        )""",
        "CREATE INDEX snapshots_by_shard ON snapshots(shard)",
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
        "CREATE TABLE erasures (seq BIGINT PRIMARY KEY, user_hash TEXT NOT NULL)",
        "CREATE TABLE artifacts (name TEXT PRIMARY KEY, version BIGINT NOT NULL, blob BYTEA NOT NULL)",
        "CREATE TABLE counters (name TEXT PRIMARY KEY, value BIGINT NOT NULL)",
        """CREATE TABLE api_keys (
            key_id TEXT PRIMARY KEY,
            key_hash TEXT NOT NULL UNIQUE,
            role TEXT NOT NULL,
            name TEXT NOT NULL DEFAULT '',
            create_time DOUBLE PRECISION NOT NULL,
            revoke_time DOUBLE PRECISION,
            position BIGINT GENERATED ALWAYS AS IDENTITY
        )""",
    ],
    # live_items pages in byte order (COLLATE "C", SQLite's order) whatever the database's locale:
    # without this index every page would sort the whole catalog.
    2: ['CREATE INDEX items_live_by_id_c ON items ((item_id COLLATE "C")) WHERE NOT deleted'],
}
SCHEMA_VERSION = max(_MIGRATIONS)


def _vector_bytes(vector: Optional[np.ndarray]) -> Optional[bytes]:
    return None if vector is None else np.asarray(vector, dtype=np.float32).tobytes()


def _vector_from(blob: Optional[bytes]) -> Optional[np.ndarray]:
    return None if blob is None else np.frombuffer(blob, dtype=np.float32).copy()


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


def _nul_refused(exc: psycopg.DataError) -> Exception:
    """PostgreSQL text cannot hold U+0000 (SQLite's can): a precise INVALID_ARGUMENT instead of an
    internal error. Other data errors pass unchanged."""
    if "NUL" in str(exc):
        return InvalidArgument("ids and texts must not contain the NUL character (U+0000)")
    return exc


def server_address(url: str) -> str:
    """`host:port/database` of a PostgreSQL URL, for messages (never the user or password)."""
    parts = urlsplit(url)
    host = parts.hostname or "localhost"
    try:
        port = parts.port or 5432
    except ValueError:
        port = "?"
    database = parts.path.lstrip("/") or "(default database)"
    return f"{host}:{port}/{database}"


class PostgresStore:
    """`Store` on a PostgreSQL server. Thread-safe: every call borrows a pooled connection."""

    def __init__(self, url: str, config: Optional["StoreConfig"] = None):
        from tastemaker.config import StoreConfig

        self.config = config or StoreConfig()
        self._url = url
        self._where = server_address(url)
        self._password = urlsplit(url).password
        try:
            with psycopg.connect(url, autocommit=True, connect_timeout=self._connect_timeout()) as conn:
                self._configure(conn)
                self._migrate(conn)
        except psycopg.OperationalError as exc:
            raise self._unavailable(exc) from None
        except psycopg.errors.InsufficientPrivilege as exc:
            raise FailedPrecondition(
                f"the PostgreSQL store at {self._where} refused to set up the schema ({exc.diag.message_primary}): "
                "the role needs to create tables in its schema, at least at the first start"
            ) from None
        self._pool = ConnectionPool(
            url,
            min_size=self.config.pool_min_size,
            max_size=self.config.pool_max_size,
            timeout=self.config.pool_timeout_s,
            kwargs={"autocommit": True, "connect_timeout": self._connect_timeout()},
            configure=self._configure,
            name="tastemaker-store",
            open=False,
        )
        try:
            self._pool.open(wait=True, timeout=self.config.connect_timeout_s)
        except PoolTimeout:
            self._pool.close()
            raise Unavailable(
                f"the PostgreSQL store at {self._where} did not accept {self.config.pool_min_size} "
                f"connection(s) within {self.config.connect_timeout_s:g} s"
            ) from None
        self._instance_id: Optional[str] = None

    # -- connections ----------------------------------------------------------------------
    def _connect_timeout(self) -> int:
        # libpq takes whole seconds and treats values under 2 as 2.
        return max(2, int(round(self.config.connect_timeout_s)))

    @staticmethod
    def _configure(conn: psycopg.Connection) -> None:
        """Run on every new connection: an acknowledged write is on disk, whatever the server's
        default (a database or role set to synchronous_commit=off would otherwise lose acks)."""
        conn.execute("SET synchronous_commit TO on")

    def _unavailable(self, exc: BaseException) -> Unavailable:
        """A clear error naming host:port/database, with the password scrubbed from the cause."""
        reason = " ".join(line.strip() for line in str(exc).splitlines() if line.strip()) or type(exc).__name__
        if self._password:
            reason = reason.replace(self._password, "***")
        return Unavailable(f"cannot reach the PostgreSQL store at {self._where}: {reason}")

    @contextmanager
    def _read(self) -> Iterator[psycopg.Cursor]:
        """A cursor on a pooled autocommit connection: each statement sees the latest commits."""
        try:
            with self._pool.connection() as conn, conn.cursor() as cur:
                yield cur
        except (psycopg.OperationalError, PoolTimeout) as exc:
            raise self._unavailable(exc) from None
        except psycopg.DataError as exc:
            raise _nul_refused(exc) from None

    @contextmanager
    def _write(self) -> Iterator[psycopg.Cursor]:
        """One transaction on a pooled connection, committed (durably) when the block ends."""
        try:
            with self._pool.connection() as conn, conn.transaction(), conn.cursor() as cur:
                yield cur
                self._before_commit(cur)
        except (psycopg.OperationalError, PoolTimeout) as exc:
            raise self._unavailable(exc) from None
        except psycopg.DataError as exc:
            raise _nul_refused(exc) from None

    def _before_commit(self, cur: psycopg.Cursor) -> None:
        """Called inside every write transaction right before its COMMIT. A seam for tests that
        hold a writer between reserving seqs and committing; does nothing."""

    def _reserve_seqs(self, cur: psycopg.Cursor, feed: str, count: int) -> int:
        """Reserve `count` consecutive seqs of a feed; returns the first. The counter row stays
        locked until this transaction ends, which is what makes seq order commit order."""
        (base,) = cur.execute(_RESERVE_SQL, {"feed": feed, "count": count}).fetchone()
        return base + 1

    # -- schema ---------------------------------------------------------------------------
    def _migrate(self, conn: psycopg.Connection) -> None:
        """Create or upgrade the schema in one transaction under an advisory lock: concurrent
        starters wait, and the one that comes second finds the work done."""
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_version "
                "(version INTEGER PRIMARY KEY, apply_time DOUBLE PRECISION NOT NULL)"
            )
            current = conn.execute("SELECT COALESCE(MAX(version), 0) FROM schema_version").fetchone()[0]
            if current > SCHEMA_VERSION:
                raise Unavailable(
                    f"the PostgreSQL store at {self._where} has schema version {current}, newer than this "
                    f"Tastemaker's {SCHEMA_VERSION}: upgrade Tastemaker on this node"
                )
            for version in sorted(v for v in _MIGRATIONS if v > current):
                for statement in _MIGRATIONS[version]:
                    conn.execute(statement)
                conn.execute("INSERT INTO schema_version(version, apply_time) VALUES (%s, %s)", (version, time.time()))
            with conn.cursor() as cur:
                cur.executemany(
                    "INSERT INTO counters(name, value) VALUES (%s, 0) ON CONFLICT (name) DO NOTHING",
                    [(feed,) for feed in _FEEDS],
                )
            conn.execute(
                "INSERT INTO meta(key, value) VALUES (%s, %s) ON CONFLICT (key) DO NOTHING",
                (INSTANCE_ID_KEY, uuid.uuid4().hex),
            )

    def schema_version(self) -> int:
        """The schema version the database is at."""
        with self._read() as cur:
            return cur.execute("SELECT MAX(version) FROM schema_version").fetchone()[0]

    # -- items ----------------------------------------------------------------------------
    def upsert_items(self, items: Sequence[Item]) -> int:
        if not items:
            return 0
        now = time.time()
        with self._write() as cur:
            first = self._reserve_seqs(cur, "items", len(items))
            cur.executemany(
                "INSERT INTO items(item_id, seq, deleted, title, description, tags, attributes, update_time, vector) "
                "VALUES (%s, %s, FALSE, %s, %s, %s, %s, %s, %s) "
                "ON CONFLICT (item_id) DO UPDATE SET seq = excluded.seq, deleted = FALSE, "
                "title = excluded.title, description = excluded.description, tags = excluded.tags, "
                "attributes = excluded.attributes, update_time = excluded.update_time, vector = excluded.vector",
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
        if not ids:
            return 0, []
        with self._write() as cur:
            first = self._reserve_seqs(cur, "items", len(ids))
            # A tombstone (not a DELETE) so followers of the change feed see the removal. Seqs go
            # by position in `ids`; ids that were not live leave harmless gaps.
            cur.execute(
                "UPDATE items AS i SET deleted = TRUE, seq = %s + d.n - 1, vector = NULL, update_time = %s "
                "FROM unnest(%s::text[]) WITH ORDINALITY AS d(item_id, n) "
                "WHERE i.item_id = d.item_id AND NOT i.deleted RETURNING i.item_id",
                (first, time.time(), ids),
            )
            deleted = {row[0] for row in cur.fetchall()}
        return len(deleted), [i for i in ids if i not in deleted]

    def get_item(self, item_id: str) -> Optional[Item]:
        with self._read() as cur:
            row = cur.execute(
                "SELECT item_id, title, description, tags, attributes, update_time, vector "
                "FROM items WHERE item_id = %s AND NOT deleted",
                (item_id,),
            ).fetchone()
        return None if row is None else _item_from_row(row)

    def get_item_vectors(self, item_ids: Sequence[str]) -> dict[str, np.ndarray]:
        ids = list(dict.fromkeys(item_ids))
        if not ids:
            return {}
        with self._read() as cur:
            rows = cur.execute(
                "SELECT item_id, vector FROM items WHERE NOT deleted AND vector IS NOT NULL AND item_id = ANY(%s)",
                (ids,),
            ).fetchall()
        return {item_id: _vector_from(blob) for item_id, blob in rows}

    def count_items(self) -> int:
        with self._read() as cur:
            return cur.execute("SELECT COUNT(*) FROM items WHERE NOT deleted").fetchone()[0]

    def item_changes(self, after_seq: int, limit: int = 10_000) -> list[ItemChange]:
        with self._read() as cur:
            rows = cur.execute(
                "SELECT seq, deleted, item_id, title, description, tags, attributes, update_time, vector "
                "FROM items WHERE seq > %s ORDER BY seq LIMIT %s",
                (after_seq, limit),
            ).fetchall()
        return [
            ItemChange(seq=row[0], item_id=row[2], item=None if row[1] else _item_from_row(row[2:]))
            for row in rows
        ]

    def item_interaction_counts(self) -> dict[str, int]:
        with self._read() as cur:
            return dict(
                cur.execute("SELECT item_id, COUNT(*) FROM events WHERE item_id <> '' GROUP BY item_id").fetchall()
            )

    # -- events ---------------------------------------------------------------------------
    def append_events(self, shard: int, events: Sequence[UserEvent]) -> list[Optional[int]]:
        if not events:
            return []
        # A retry inside the batch is a duplicate of its first occurrence (the first write wins),
        # as in SQLite, where the rows are inserted one after another.
        first_index: dict[tuple[str, str], int] = {}
        for i, event in enumerate(events):
            first_index.setdefault((event.user_id, event.event_id), i)
        unique = sorted(first_index.values())
        columns = list(
            zip(
                *[
                    (
                        events[i].user_id,
                        events[i].event_id,
                        shard,
                        int(events[i].event_type),
                        events[i].item_id,
                        float(events[i].value),
                        events[i].text,
                        float(events[i].event_time),
                        events[i].attribution_token,
                        _vector_bytes(events[i].text_vector),
                        float(events[i].sentiment),
                    )
                    for i in unique
                ]
            )
        )
        with self._write() as cur:
            # One statement reserves the seqs (the counter row stays locked until COMMIT, as in
            # _reserve_seqs) and inserts: one round trip fewer on the hottest write path.
            cur.execute(
                f"WITH reserved AS ({_RESERVE_SQL}) "
                "INSERT INTO events(seq, user_id, event_id, shard, event_type, item_id, value, text, event_time, "
                "attribution_token, text_vector, sentiment) "
                "SELECT reserved.base + u.n, u.user_id, u.event_id, u.shard, u.event_type, u.item_id, u.value, "
                "u.text, u.event_time, u.attribution_token, u.text_vector, u.sentiment "
                "FROM reserved, unnest(%(user_id)s::text[], %(event_id)s::text[], %(shard)s::int[], "
                "%(event_type)s::int[], %(item_id)s::text[], %(value)s::float8[], %(text)s::text[], "
                "%(event_time)s::float8[], %(token)s::text[], %(text_vector)s::bytea[], %(sentiment)s::float8[]) "
                "WITH ORDINALITY AS u(user_id, event_id, shard, event_type, item_id, value, text, event_time, "
                "attribution_token, text_vector, sentiment, n) "
                "ON CONFLICT (user_id, event_id) DO NOTHING RETURNING seq, user_id, event_id",
                {
                    "feed": "events",
                    "count": len(unique),
                    **dict(
                        zip(
                            ("user_id", "event_id", "shard", "event_type", "item_id", "value", "text",
                             "event_time", "token", "text_vector", "sentiment"),
                            [list(column) for column in columns],
                        )
                    ),
                },
            )
            stored = {(user_id, event_id): seq for seq, user_id, event_id in cur.fetchall()}
        # A duplicate's reserved seq is left unused: a gap, which followers of the feed skip.
        out: list[Optional[int]] = [None] * len(events)
        for i in unique:
            out[i] = stored.get((events[i].user_id, events[i].event_id))
        return out

    def events_after(self, after_seq: int, limit: int = 10_000) -> list[StoredEvent]:
        with self._read() as cur:
            rows = cur.execute(
                "SELECT seq, shard, event_id, user_id, event_type, item_id, value, event_time, sentiment "
                "FROM events WHERE seq > %s ORDER BY seq LIMIT %s",
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

    def event_seq(self, user_id: str, event_id: str) -> Optional[int]:
        with self._read() as cur:
            row = cur.execute(
                "SELECT seq FROM events WHERE user_id = %s AND event_id = %s", (user_id, event_id)
            ).fetchone()
        return None if row is None else row[0]

    def events_for_replay(self, shard: int, num_shards: int) -> Iterator[StoredEvent]:
        del num_shards  # shard ids are kept consistent by ensure_num_shards
        with self._read() as cur:
            rows = cur.execute(
                "SELECT e.seq, e.shard, e.event_id, e.user_id, e.event_type, e.item_id, e.value, "
                "e.text, e.event_time, e.attribution_token, e.text_vector, e.sentiment "
                "FROM events e LEFT JOIN snapshots s ON s.user_id = e.user_id "
                "WHERE e.shard = %s AND (s.event_seq IS NULL OR e.seq > s.event_seq) ORDER BY e.seq",
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
        with self._write() as cur:
            seq = self._reserve_seqs(cur, "erasures", 1)
            deleted = cur.execute("DELETE FROM events WHERE user_id = %s", (user_id,)).rowcount
            cur.execute("DELETE FROM snapshots WHERE user_id = %s", (user_id,))
            cur.execute("INSERT INTO erasures(seq, user_hash) VALUES (%s, %s)", (seq, user_hash(user_id)))
        return deleted

    def erasures_after(self, after_seq: int) -> list[tuple[int, str]]:
        with self._read() as cur:
            rows = cur.execute(
                "SELECT seq, user_hash FROM erasures WHERE seq > %s ORDER BY seq", (after_seq,)
            ).fetchall()
        return [(seq, hashed) for seq, hashed in rows]

    # -- snapshots ------------------------------------------------------------------------
    def save_snapshots(self, rows: Iterable[SnapshotRow]) -> None:
        params = [(r.user_id, r.shard, r.event_seq, r.state, bytes(r.vectors)) for r in rows]
        if not params:
            return
        with self._write() as cur:
            cur.executemany(
                "INSERT INTO snapshots(user_id, shard, event_seq, state, vectors) VALUES (%s, %s, %s, %s, %s) "
                "ON CONFLICT (user_id) DO UPDATE SET shard = excluded.shard, event_seq = excluded.event_seq, "
                "state = excluded.state, vectors = excluded.vectors",
                params,
            )

    def load_snapshots(self, shard: int) -> Iterator[SnapshotRow]:
        with self._read() as cur:
            rows = cur.execute(
                "SELECT user_id, shard, event_seq, state, vectors FROM snapshots WHERE shard = %s", (shard,)
            ).fetchall()
        for user_id, row_shard, event_seq, state, vectors in rows:
            yield SnapshotRow(user_id, row_shard, event_seq, state, bytes(vectors))

    # -- artefacts ------------------------------------------------------------------------
    def save_artifact(self, name: str, version: int, blob: bytes) -> None:
        with self._write() as cur:
            cur.execute(
                "INSERT INTO artifacts(name, version, blob) VALUES (%s, %s, %s) "
                "ON CONFLICT (name) DO UPDATE SET version = excluded.version, blob = excluded.blob",
                (name, version, bytes(blob)),
            )

    def load_artifact(self, name: str) -> Optional[tuple[int, bytes]]:
        with self._read() as cur:
            row = cur.execute("SELECT version, blob FROM artifacts WHERE name = %s", (name,)).fetchone()
        return None if row is None else (row[0], bytes(row[1]))

    def artifact_version(self, name: str) -> Optional[int]:
        with self._read() as cur:
            row = cur.execute("SELECT version FROM artifacts WHERE name = %s", (name,)).fetchone()
        return None if row is None else row[0]

    # -- re-encoding ----------------------------------------------------------------------
    def live_items(self, after_item_id: str = "", limit: int = 1_000) -> list[tuple[int, Item]]:
        with self._read() as cur:
            # COLLATE "C": byte order, the order SQLite's TEXT comparison uses, whatever the
            # database's locale, so paging by item_id never skips an item.
            rows = cur.execute(
                "SELECT seq, item_id, title, description, tags, attributes, update_time, vector "
                'FROM items WHERE NOT deleted AND item_id COLLATE "C" > %s ORDER BY item_id COLLATE "C" LIMIT %s',
                (after_item_id, limit),
            ).fetchall()
        return [(row[0], _item_from_row(row[1:])) for row in rows]

    def replace_item_vectors(self, updates: Sequence[tuple[str, int, np.ndarray]]) -> list[str]:
        if not updates:
            return []
        # An id given twice: the first update applies, the second finds its read seq changed
        # (as it would in SQLite, where they run one after another).
        first_index: dict[str, int] = {}
        for i, (item_id, _, _) in enumerate(updates):
            first_index.setdefault(item_id, i)
        unique = sorted(first_index.values())
        with self._write() as cur:
            first = self._reserve_seqs(cur, "items", len(unique))
            # Conditional on the seq read: a concurrent upsert (already encoded by the current
            # model) or delete wins. The new seq puts the item on the change feed again.
            cur.execute(
                "UPDATE items AS i SET vector = u.vector, seq = %s + u.n - 1 "
                "FROM unnest(%s::text[], %s::bigint[], %s::bytea[]) WITH ORDINALITY AS u(item_id, read_seq, vector, n) "
                "WHERE i.item_id = u.item_id AND i.seq = u.read_seq AND NOT i.deleted RETURNING i.item_id",
                (
                    first,
                    [updates[i][0] for i in unique],
                    [int(updates[i][1]) for i in unique],
                    [_vector_bytes(updates[i][2]) for i in unique],
                ),
            )
            changed = {row[0] for row in cur.fetchall()}
        return [
            item_id for i, (item_id, _, _) in enumerate(updates) if not (item_id in changed and first_index[item_id] == i)
        ]

    def text_events(self, after_seq: int = 0, limit: int = 1_000) -> list[tuple[int, str]]:
        with self._read() as cur:
            rows = cur.execute(
                "SELECT seq, text FROM events WHERE seq > %s AND text <> '' ORDER BY seq LIMIT %s",
                (after_seq, limit),
            ).fetchall()
        return [(seq, text) for seq, text in rows]

    def replace_event_text_vectors(self, updates: Sequence[tuple[int, np.ndarray]]) -> None:
        if not updates:
            return
        with self._write() as cur:
            cur.executemany(
                "UPDATE events SET text_vector = %s WHERE seq = %s",
                [(_vector_bytes(vector), int(seq)) for seq, vector in updates],
            )

    def delete_snapshots(self, shard: Optional[int] = None) -> int:
        with self._write() as cur:
            if shard is None:
                return cur.execute("DELETE FROM snapshots").rowcount
            return cur.execute("DELETE FROM snapshots WHERE shard = %s", (shard,)).rowcount

    def get_meta(self, key: str) -> Optional[str]:
        with self._read() as cur:
            row = cur.execute("SELECT value FROM meta WHERE key = %s", (key,)).fetchone()
        return None if row is None else row[0]

    def set_meta(self, key: str, value: Optional[str]) -> None:
        with self._write() as cur:
            if value is None:
                cur.execute("DELETE FROM meta WHERE key = %s", (key,))
            else:
                cur.execute(
                    "INSERT INTO meta(key, value) VALUES (%s, %s) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    (key, value),
                )

    def compare_and_set_meta(self, key: str, expected: Optional[str], value: Optional[str]) -> bool:
        # Each branch is one statement, atomic on its own: an UPDATE/DELETE re-checks its WHERE on
        # the row version it locks, and INSERT ... ON CONFLICT DO NOTHING inserts at most once.
        with self._write() as cur:
            if expected is None and value is None:
                return cur.execute("SELECT 1 FROM meta WHERE key = %s", (key,)).fetchone() is None
            if expected is None:
                return cur.execute(
                    "INSERT INTO meta(key, value) VALUES (%s, %s) ON CONFLICT (key) DO NOTHING", (key, value)
                ).rowcount == 1
            if value is None:
                return cur.execute("DELETE FROM meta WHERE key = %s AND value = %s", (key, expected)).rowcount == 1
            return cur.execute(
                "UPDATE meta SET value = %s WHERE key = %s AND value = %s", (value, key, expected)
            ).rowcount == 1

    # -- API keys -------------------------------------------------------------------------
    _KEY_COLUMNS = "key_id, key_hash, role, name, create_time, revoke_time"

    def create_api_key(self, record: ApiKeyRecord) -> None:
        try:
            with self._write() as cur:
                cur.execute(
                    f"INSERT INTO api_keys({self._KEY_COLUMNS}) VALUES (%s, %s, %s, %s, %s, %s)",
                    (
                        record.key_id,
                        record.key_hash,
                        record.role,
                        record.name,
                        float(record.create_time),
                        None if record.revoke_time is None else float(record.revoke_time),
                    ),
                )
        except psycopg.errors.UniqueViolation:
            raise DuplicateApiKey(f"an API key with id {record.key_id!r} or the same secret already exists") from None

    def find_api_key(self, key_hash: str) -> Optional[ApiKeyRecord]:
        with self._read() as cur:
            row = cur.execute(f"SELECT {self._KEY_COLUMNS} FROM api_keys WHERE key_hash = %s", (key_hash,)).fetchone()
        return None if row is None else ApiKeyRecord(*row)

    def list_api_keys(self) -> list[ApiKeyRecord]:
        with self._read() as cur:
            rows = cur.execute(f"SELECT {self._KEY_COLUMNS} FROM api_keys ORDER BY create_time, position").fetchall()
        return [ApiKeyRecord(*row) for row in rows]

    def revoke_api_key(self, key_id: str) -> bool:
        with self._write() as cur:
            # COALESCE keeps the first revoke time: revoking again changes nothing.
            changed = cur.execute(
                "UPDATE api_keys SET revoke_time = COALESCE(revoke_time, %s) WHERE key_id = %s", (time.time(), key_id)
            ).rowcount
        return changed == 1

    # -- lifecycle ------------------------------------------------------------------------
    def instance_id(self) -> str:
        if self._instance_id is None:
            with self._write() as cur:
                # Written by the migration; inserted again only if someone removed it with set_meta.
                cur.execute(
                    "INSERT INTO meta(key, value) VALUES (%s, %s) ON CONFLICT (key) DO NOTHING",
                    (INSTANCE_ID_KEY, uuid.uuid4().hex),
                )
                self._instance_id = cur.execute("SELECT value FROM meta WHERE key = %s", (INSTANCE_ID_KEY,)).fetchone()[0]
        return self._instance_id

    def ensure_num_shards(self, num_shards: int, shard_of: ShardFunction) -> None:
        with self._write() as cur:
            # Starters of many shards may call this at once: one re-assigns, the others then find
            # the count already recorded.
            cur.execute("SELECT pg_advisory_xact_lock(%s)", (_SHARDS_LOCK,))
            row = cur.execute("SELECT value FROM meta WHERE key = 'num_shards'").fetchone()
            if row is not None and int(row[0]) == num_shards:
                return
            users = [u for (u,) in cur.execute("SELECT DISTINCT user_id FROM events").fetchall()]
            shards = [shard_of(u, num_shards) for u in users]
            if users:
                for table in ("events", "snapshots"):
                    cur.execute(
                        f"UPDATE {table} AS t SET shard = m.shard FROM unnest(%s::text[], %s::int[]) AS m(user_id, shard) "
                        "WHERE t.user_id = m.user_id AND t.shard <> m.shard",
                        (users, shards),
                    )
            cur.execute(
                "INSERT INTO meta(key, value) VALUES ('num_shards', %s) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (str(num_shards),),
            )

    def close(self) -> None:
        self._pool.close()

    def __repr__(self) -> str:
        return f"PostgresStore({self._where})"

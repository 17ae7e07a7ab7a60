"""Privacy through the public gRPC API of the real Serve application:

- with `privacy.user_id_key` set, user ids are pseudonymised at the gateway: the raw id never
  reaches the store, and responses carry the caller's own id back;
- `DeleteUser` erases the user: afterwards neither the id nor its pseudonym nor the user's review
  text is found in any table (every text/blob column) or in any file under the data directory
  (SQLite database, WAL, index and cache files) — checked with and without pseudonyms, and on
  PostgreSQL (every table of the database) when the PostgreSQL store is available;
- no user-written text (reviews, searches, Recommend queries) appears in any log file of the Ray
  session (Serve replicas, actors, proxy) or in the test process's log records.
"""

from __future__ import annotations

import logging
import sqlite3
import uuid
from pathlib import Path

import pytest

from tastemaker.config import PrivacyConfig, StoreConfig
from tastemaker.privacy import Pseudonymizer
from tastemaker.v1 import recommender_service_pb2 as pb
from tests.integration.conftest import MOVIE_ITEMS, make_config, start

pytestmark = pytest.mark.integration

USER_ID_KEY = "privacy-test-key-" + "k" * 32


@pytest.fixture(scope="module", params=["pseudonymised", "plain", "postgres"])
def service(request, ray_session, tmp_path_factory):
    # A snapshot after every event: the user's profile is in the snapshots table before deletion.
    config = make_config(tmp_path_factory.mktemp(f"privacy-{request.param}"), snapshot_every_events=1)
    if request.param == "pseudonymised":
        config.privacy = PrivacyConfig(user_id_key=USER_ID_KEY)  # validated (model_copy would not)
    if request.param == "postgres":  # a real PostgreSQL server (tests/pgserver.py), a fresh database
        server = request.getfixturevalue("postgres_server")
        config.store = StoreConfig(url=server.create_database("privacy_erasure"))
    running = start(config)
    running.client.upsert_items(MOVIE_ITEMS)
    running.mode = request.param
    yield running
    running.stop()


def _sqlite_rows_containing(db_path: Path, needles: list[str]) -> dict[str, list[str]]:
    """needle -> the `table.column` entries of every text or blob column that contain it."""
    found: dict[str, list[str]] = {n: [] for n in needles}
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        for table in tables:
            columns = [r[1] for r in conn.execute(f'PRAGMA table_info("{table}")')]
            for column in columns:
                for (value,) in conn.execute(f'SELECT "{column}" FROM "{table}"'):
                    if isinstance(value, (str, bytes)):
                        raw = value.encode("utf-8") if isinstance(value, str) else value
                        for needle in needles:
                            if needle.encode("utf-8") in raw:
                                found[needle].append(f"{table}.{column}")
    finally:
        conn.close()
    return found


def _postgres_rows_containing(url: str, needles: list[str]) -> dict[str, list[str]]:
    """As _sqlite_rows_containing, over every table of the database's current schema."""
    import psycopg

    found: dict[str, list[str]] = {n: [] for n in needles}
    with psycopg.connect(url) as conn:
        tables = [
            r[0]
            for r in conn.execute(
                "SELECT table_name FROM information_schema.tables "
                "WHERE table_schema = current_schema() AND table_type = 'BASE TABLE'"
            )
        ]
        assert "events" in tables and "snapshots" in tables, tables
        for table in tables:
            cursor = conn.execute(f'SELECT * FROM "{table}"')
            columns = [d.name for d in cursor.description]
            for row in cursor:
                for column, value in zip(columns, row):
                    if isinstance(value, memoryview):
                        value = bytes(value)
                    raw = value if isinstance(value, bytes) else str(value).encode("utf-8")
                    for needle in needles:
                        if needle.encode("utf-8") in raw:
                            found[needle].append(f"{table}.{column}")
    return found


def _rows_containing(service, needles: list[str]) -> dict[str, list[str]]:
    """Every table of the service's store (SQLite file or PostgreSQL database)."""
    if service.mode == "postgres":
        return _postgres_rows_containing(service.config.store.url, needles)
    return _sqlite_rows_containing(Path(service.config.data_dir) / "tastemaker.db", needles)


def _files_containing(data_dir: Path, needles: list[str]) -> dict[str, list[str]]:
    """needle -> the files under data_dir whose bytes contain it (UTF-8 or UTF-16, as SQLite may store)."""
    found: dict[str, list[str]] = {n: [] for n in needles}
    for path in sorted(p for p in data_dir.rglob("*") if p.is_file()):
        raw = path.read_bytes()
        for needle in needles:
            if any(needle.encode(enc) in raw for enc in ("utf-8", "utf-16-le", "utf-16-be")):
                found[needle].append(str(path.relative_to(data_dir)))
    return found


def _stored_id(service, user_id: str) -> str:
    return Pseudonymizer(USER_ID_KEY).pseudonym(user_id) if service.mode == "pseudonymised" else user_id


def test_pseudonyms_at_the_edge_and_the_callers_id_in_responses(service):
    if service.mode != "pseudonymised":
        pytest.skip("pseudonyms only with privacy.user_id_key")
    client = service.client
    user = f"alice-{uuid.uuid4().hex[:8]}"
    acks = client.write_events(
        [pb.UserEvent(event_id="p1", user_id=user, event_type=pb.EVENT_TYPE_RATING, item_id="m1", value=5.0)]
    )
    assert [(a.user_id, a.status) for a in acks] == [(user, pb.EVENT_STATUS_ACCEPTED)]
    streamed = list(
        client.stream_events(
            [pb.UserEvent(event_id="p2", user_id=user, event_type=pb.EVENT_TYPE_CLICK, item_id="m2")], max_batch=1
        )
    )
    assert [(a.user_id, a.status, a.profile_version) for a in streamed] == [(user, pb.EVENT_STATUS_ACCEPTED, 2)]
    profile = client.get_user_profile(user)
    assert profile.user_id == user and profile.profile_version == 2
    assert client.recommend(user, page_size=3, min_profile_version=2).profile_version == 2

    db = Path(service.config.data_dir) / "tastemaker.db"
    pseudonym = Pseudonymizer(USER_ID_KEY).pseudonym(user)
    in_tables = _sqlite_rows_containing(db, [user, pseudonym])
    assert in_tables[user] == [], f"the raw user id reached the store: {in_tables[user]}"
    assert "events.user_id" in in_tables[pseudonym]
    # An invalid id is refused as sent (not as a pseudonym that would pass the length check).
    rejected = client.write_events([pb.UserEvent(event_id="p3", user_id="x" * 200, event_type=pb.EVENT_TYPE_CLICK, item_id="m1")])
    assert rejected[0].status == pb.EVENT_STATUS_REJECTED and "user_id" in rejected[0].reason


def test_delete_user_leaves_no_trace_in_any_table_or_file(service):
    client = service.client
    user = f"erase-me-{uuid.uuid4().hex}"
    review = f"my private review {uuid.uuid4().hex}"
    stored = _stored_id(service, user)
    client.write_events(
        [
            pb.UserEvent(event_id="e1", user_id=user, event_type=pb.EVENT_TYPE_RATING, item_id="m1", value=4.5),
            pb.UserEvent(event_id="e2", user_id=user, event_type=pb.EVENT_TYPE_REVIEW, item_id="m2", text=review, value=5.0),
            pb.UserEvent(event_id="e3", user_id=user, event_type=pb.EVENT_TYPE_CLICK, item_id="m3"),
        ]
    )
    assert client.get_user_profile(user).profile_version == 3
    data_dir = Path(service.config.data_dir)
    needles = [user, stored, review]

    # Positive control: the scans do see the user's data while it exists.
    before = _rows_containing(service, needles)
    assert "events.user_id" in before[stored] and "events.text" in before[review]
    assert "snapshots.user_id" in before[stored], "the profile snapshot exists before deletion"
    if service.mode != "postgres":  # (PostgreSQL's files are the server's, not under data_dir)
        assert _files_containing(data_dir, [stored])[stored], "the user's rows are in the store's files"

    assert client.delete_user(user).deleted_event_count == 3
    after_tables = _rows_containing(service, needles)
    after_files = _files_containing(data_dir, needles)
    assert all(not v for v in after_tables.values()), f"left in tables: {after_tables}"
    assert all(not v for v in after_files.values()), f"left in files: {after_files}"
    assert client.get_user_profile(user).profile_version == 0  # the in-memory profile is gone too


def test_no_user_written_text_in_any_log(service, caplog):
    import ray

    if service.mode == "postgres":
        pytest.skip("the log paths do not depend on the store; checked on SQLite")
    client = service.client
    marker = uuid.uuid4().hex
    texts = {
        "review": f"review text {marker}-review",
        "search": f"search text {marker}-search",
        "query": f"recommend query {marker}-query",
        "too_long": f"{marker}-long " * 500,
    }
    user = f"logged-{marker[:8]}"
    with caplog.at_level(logging.DEBUG):
        client.write_events(
            [
                pb.UserEvent(event_id="l1", user_id=user, event_type=pb.EVENT_TYPE_REVIEW, item_id="m1", text=texts["review"], value=2.0),
                pb.UserEvent(event_id="l2", user_id=user, event_type=pb.EVENT_TYPE_SEARCH, text=texts["search"]),
                pb.UserEvent(event_id="l3", user_id=user, event_type=pb.EVENT_TYPE_REVIEW, item_id="m1", text=texts["too_long"]),
                pb.UserEvent(event_id="l4", user_id=user, event_type=pb.EVENT_TYPE_REVIEW, item_id="no-such-item", text=texts["review"]),
            ]
        )
        client.recommend(user, page_size=3, query=texts["query"])
        list(client.stream_events([pb.UserEvent(event_id="l5", user_id=user, event_type=pb.EVENT_TYPE_SEARCH, text=texts["search"])]))
    assert marker not in caplog.text
    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    assert logs.is_dir() and any(logs.rglob("*.log")), "the Ray session's log files are where we look"
    leaked = []
    for path in logs.rglob("*"):
        if path.is_file():
            try:
                if marker.encode() in path.read_bytes():
                    leaked.append(str(path.relative_to(logs)))
            except OSError:
                continue  # a log being rotated away
    assert not leaked, f"user-written text in logs: {leaked}"

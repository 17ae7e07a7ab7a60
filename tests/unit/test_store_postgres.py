"""What the PostgreSQL store adds to the conformance suite (tests/unit/test_store_conformance.py):
secrets kept out of messages, clear errors for an unreachable server, durability settings, schema
versioning. Runs against real PostgreSQL servers (tests/pgserver.py)."""

from __future__ import annotations

import logging
import threading
import uuid

import pytest

from tastemaker.config import StoreConfig, load_config
from tastemaker.errors import InvalidArgument, Unavailable
from tastemaker.store import open_store
from tastemaker.store.base import redact_url

FAST = StoreConfig(connect_timeout_s=2, pool_timeout_s=2)


def _fresh_url(server) -> str:
    return server.create_schema(f"store_{uuid.uuid4().hex[:12]}")


# -- redaction --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "url, expected",
    [
        ("postgresql://app:s3cr%40t@db.internal:5432/tm", "postgresql://app:***@db.internal:5432/tm"),
        ("postgres://app:pw@db/tm?sslmode=require", "postgres://app:***@db/tm?sslmode=require"),
        ("postgresql://app@db/tm?password=pw&sslmode=require", "postgresql://app@db/tm?password=***&sslmode=require"),
        ("postgresql://app:p@ss@db/tm", "postgresql://app:***@db/tm"),  # an unencoded @ in the password
        ("postgresql://db.internal/tm", "postgresql://db.internal/tm"),
        ("sqlite:////var/lib/tastemaker/tastemaker.db", "sqlite:////var/lib/tastemaker/tastemaker.db"),
        ("app:pw@db/tm", "<store URL without a scheme>"),
    ],
)
def test_redact_url_hides_the_password_and_keeps_the_rest(url, expected):
    assert redact_url(url) == expected


def test_unsupported_url_is_refused_without_its_password():
    with pytest.raises(InvalidArgument) as caught:
        open_store("postgresq://app:TOPSECRET@db/tm")
    assert "TOPSECRET" not in str(caught.value)
    assert "postgresq://app:***@db/tm" in str(caught.value)


def test_store_url_comes_from_the_allowlisted_env_var_and_stays_out_of_reprs():
    url = "postgresql://app:TOPSECRET@db.internal:5432/tm"
    config = load_config(environ={"TASTEMAKER_STORE_URL": url})
    assert config.store_url() == url
    assert "TOPSECRET" not in repr(config) and "TOPSECRET" not in str(config.store)


def test_bad_store_config_error_has_no_password():
    url = "postgresql://app:TOPSECRET@db.internal:5432/tm"
    with pytest.raises(InvalidArgument) as caught:
        load_config(environ={"TASTEMAKER_STORE_URL": url}, overrides={("store", "pool_min_size"): 5, ("store", "pool_max_size"): 2})
    assert "pool_max_size" in str(caught.value)
    assert "TOPSECRET" not in str(caught.value) and "TOPS" not in str(caught.value)


# -- unreachable servers ----------------------------------------------------------------------
def test_nothing_listening_names_host_and_port_not_the_password(caplog):
    from tests.conftest import free_port

    port = free_port()
    caplog.set_level(logging.DEBUG)
    with pytest.raises(Unavailable) as caught:
        open_store(f"postgresql://app:TOPSECRET@127.0.0.1:{port}/tm", FAST)
    message = str(caught.value)
    assert f"127.0.0.1:{port}/tm" in message and "PostgreSQL" in message
    assert "TOPSECRET" not in message and "TOPSECRET" not in caplog.text


def test_wrong_password_is_a_clear_error_without_either_password(postgres_server, caplog):
    caplog.set_level(logging.DEBUG)
    bad = postgres_server.url.replace(f":{postgres_server.password}@", ":WRONGPASSWORD@")
    with pytest.raises(Unavailable) as caught:
        open_store(bad, FAST)
    message = str(caught.value)
    assert f"127.0.0.1:{postgres_server.port}" in message
    assert "password authentication failed" in message
    for secret in ("WRONGPASSWORD", postgres_server.password):
        assert secret not in message and secret not in caplog.text


def test_server_gone_after_start_is_unavailable_without_the_password(caplog):
    """A store whose server stops: calls fail fast with UNAVAILABLE naming host:port."""
    from tests.pgserver import start_postgres

    server = start_postgres()
    try:
        store = open_store(server.url, FAST)
        assert store.count_items() == 0
    finally:
        server.stop()
    caplog.set_level(logging.DEBUG)
    try:
        with pytest.raises(Unavailable) as caught:
            store.count_items()
        message = str(caught.value)
        assert f"127.0.0.1:{server.port}" in message
        assert server.password not in message and server.password not in caplog.text
    finally:
        store.close()


# -- durability and schema --------------------------------------------------------------------
def test_every_pooled_connection_commits_synchronously_even_if_the_database_says_off(postgres_server):
    import psycopg

    url = postgres_server.create_database(f"async_{uuid.uuid4().hex[:12]}")
    with psycopg.connect(url, autocommit=True) as admin:
        admin.execute(f"ALTER DATABASE {url.rsplit('/', 1)[1]} SET synchronous_commit = off")
    with psycopg.connect(url) as plain:  # the database default is really off...
        assert plain.execute("SHOW synchronous_commit").fetchone()[0] == "off"
    store = open_store(url, StoreConfig(pool_min_size=3, pool_max_size=3))
    try:
        # ...and every connection of the store's pool turned it on (hold all three at once).
        conns = [store._pool.getconn() for _ in range(3)]
        try:
            assert [c.execute("SHOW synchronous_commit").fetchone()[0] for c in conns] == ["on"] * 3
        finally:
            for c in conns:
                store._pool.putconn(c)
    finally:
        store.close()


def test_concurrent_starters_migrate_once_and_agree(postgres_server):
    from tastemaker.store.postgres import SCHEMA_VERSION

    url = _fresh_url(postgres_server)
    stores, errors = [], []

    def start() -> None:
        try:
            stores.append(open_store(url, FAST))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    try:
        assert errors == [] and len(stores) == 6
        assert {s.schema_version() for s in stores} == {SCHEMA_VERSION}
        assert len({s.instance_id() for s in stores}) == 1
        with stores[0]._read() as cur:
            versions = [v for (v,) in cur.execute("SELECT version FROM schema_version ORDER BY version")]
        assert versions == list(range(1, SCHEMA_VERSION + 1))
    finally:
        for s in stores:
            s.close()


def test_a_newer_schema_is_refused_with_a_clear_message(postgres_server):
    from tastemaker.store.postgres import SCHEMA_VERSION

    url = _fresh_url(postgres_server)
    store = open_store(url, FAST)
    with store._write() as cur:
        cur.execute("INSERT INTO schema_version(version, apply_time) VALUES (%s, 0)", (SCHEMA_VERSION + 1,))
    store.close()
    with pytest.raises(Unavailable) as caught:
        open_store(url, FAST)
    assert f"schema version {SCHEMA_VERSION + 1}" in str(caught.value) and "upgrade" in str(caught.value)
    assert postgres_server.password not in str(caught.value)


def test_postgres_scheme_alias_opens_the_same_store(postgres_server):
    url = _fresh_url(postgres_server)
    first = open_store(url, FAST)
    second = open_store(url.replace("postgresql://", "postgres://", 1), FAST)
    try:
        assert type(first).__name__ == type(second).__name__ == "PostgresStore"
        assert first.instance_id() == second.instance_id()
        assert postgres_server.password not in repr(first)
    finally:
        first.close()
        second.close()


def test_an_older_schema_is_migrated_at_start_keeping_its_data(postgres_server, monkeypatch):
    """A database made by the previous version (schema 1) gets the later migrations at the next
    start, and its data stays."""
    from tastemaker.domain import Item
    from tastemaker.store import postgres

    assert postgres.SCHEMA_VERSION >= 2
    url = _fresh_url(postgres_server)
    with monkeypatch.context() as patch:
        patch.setattr(postgres, "_MIGRATIONS", {1: postgres._MIGRATIONS[1]})
        patch.setattr(postgres, "SCHEMA_VERSION", 1)
        old = open_store(url, FAST)
        old.upsert_items([Item(item_id="kept", title="Kept")])
        assert old.schema_version() == 1
        old.close()
    new = open_store(url, FAST)
    try:
        assert new.schema_version() == postgres.SCHEMA_VERSION
        assert new.get_item("kept").title == "Kept"
        with new._read() as cur:
            indexes = {name for (name,) in cur.execute("SELECT indexname FROM pg_indexes WHERE schemaname = current_schema() AND tablename = 'items'")}
        assert "items_live_by_id_c" in indexes
    finally:
        new.close()


def test_serve_with_an_unreachable_store_fails_fast_without_the_password(tmp_path):
    """`tastemaker serve` prints its banner with the URL redacted, then stops with a clear error
    naming host:port before starting anything (no Ray is started: the store is opened first)."""
    import os
    import subprocess
    import sys

    from tests.conftest import free_port

    port = free_port()
    env = {
        **os.environ,
        "TASTEMAKER_STORE_URL": f"postgresql://app:TOPSECRET@127.0.0.1:{port}/tm",
        "TASTEMAKER_DATA_DIR": str(tmp_path / "data"),
    }
    done = subprocess.run(
        [sys.executable, "-m", "tastemaker.cli", "serve", "--no-demo", "--quiet"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 2, output
    assert f"store postgresql://app:***@127.0.0.1:{port}/tm" in done.stdout
    assert f"cannot reach the PostgreSQL store at 127.0.0.1:{port}/tm" in done.stderr
    assert "TOPSECRET" not in output
    assert "Traceback" not in output


def test_nul_characters_are_an_invalid_argument_and_nothing_is_written(postgres_server):
    """PostgreSQL text cannot hold U+0000: the store says so precisely (INVALID_ARGUMENT), writes
    nothing of the batch, and keeps working."""
    from tastemaker.domain import EventType, Item, UserEvent

    store = open_store(_fresh_url(postgres_server), FAST)
    try:
        good = UserEvent(event_id="e1", user_id="u1", event_type=EventType.SEARCH, text="fine", event_time=1.0)
        bad = UserEvent(event_id="e2", user_id="u1", event_type=EventType.SEARCH, text="a\x00b", event_time=1.0)
        with pytest.raises(InvalidArgument, match="NUL"):
            store.append_events(0, [good, bad])
        with pytest.raises(InvalidArgument, match="NUL"):
            store.upsert_items([Item(item_id="i\x00", title="t")])
        assert store.events_after(0) == [] and store.count_items() == 0
        assert store.append_events(0, [good]) != [None]
    finally:
        store.close()


def test_acknowledged_events_survive_a_server_crash_and_the_store_reconnects():
    """Every `append_events` that returned is durable: the server is stopped like a crash right
    after the last one (no checkpoint; WAL buffers not yet written are lost) and restarted. The
    same store object then works again after at most one UNAVAILABLE (its pooled connections
    died with the server)."""
    from tastemaker.domain import EventType, UserEvent
    from tests.pgserver import start_postgres

    server = start_postgres()
    try:
        store = open_store(server.url, FAST)
        acked: dict[tuple[str, str], int] = {}
        for b in range(40):
            events = [
                UserEvent(event_id=f"e{b}-{k}", user_id=f"u{k}", event_type=EventType.CLICK, item_id="i", event_time=1.0)
                for k in range(5)
            ]
            for event, seq in zip(events, store.append_events(0, events)):
                acked[(event.user_id, event.event_id)] = seq
        server.crash_and_restart()
        failures = 0
        while True:
            try:
                stored = store.events_after(0)
                break
            except Unavailable:
                failures += 1
                assert failures <= 1, "the store did not reconnect after the server came back"
        assert {(s.event.user_id, s.event.event_id): s.seq for s in stored} == acked
        # Writing goes on where it stopped: new seqs are larger than every acknowledged one.
        more = store.append_events(0, [UserEvent(event_id="after", user_id="u0", event_type=EventType.CLICK, item_id="i", event_time=1.0)])
        assert more[0] > max(acked.values())
        store.close()
    finally:
        server.stop()


def test_a_role_that_may_not_create_tables_gets_a_clear_start_error(postgres_server):
    """A first start with a role that lacks CREATE on the schema: FAILED_PRECONDITION naming the
    server and the missing right, not a driver traceback."""
    import psycopg

    from tastemaker.errors import FailedPrecondition

    schema = f"locked_{uuid.uuid4().hex[:12]}"
    role = f"reader_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(postgres_server.url, autocommit=True) as admin:
        admin.execute(f'CREATE SCHEMA "{schema}"')
        admin.execute(f"CREATE ROLE {role} LOGIN PASSWORD 'READERPW'")
        admin.execute(f'GRANT USAGE ON SCHEMA "{schema}" TO {role}')
    url = (
        f"postgresql://{role}:READERPW@127.0.0.1:{postgres_server.port}/{postgres_server.database}"
        f"?options=-csearch_path%3D{schema}"
    )
    with pytest.raises(FailedPrecondition) as caught:
        open_store(url, FAST)
    message = str(caught.value)
    assert f"127.0.0.1:{postgres_server.port}" in message and "permission denied" in message
    assert "READERPW" not in message

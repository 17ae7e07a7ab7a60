"""Shared fixtures. Integration tests start the real Serve application on free loopback ports and
talk to it only through gRPC, as a client would."""

from __future__ import annotations

import os
import socket

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def free_port() -> int:
    """A port nobody listens on right now (bound then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def postgres_server():
    """One real PostgreSQL server for the test session (tests/pgserver.py), stopped at the end.
    Tests take a fresh database each: `postgres_server.create_database(name)` returns its URL."""
    from tests.pgserver import start_postgres

    server = start_postgres()
    yield server
    server.stop()

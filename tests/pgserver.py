"""A real PostgreSQL server for tests, started on a free loopback port in a private temp dir.

    from tests.pgserver import start_postgres

    server = start_postgres()          # initdb + pg_ctl start; takes a few seconds
    server.url                         # postgresql://tastemaker:<password>@127.0.0.1:<port>/tastemaker
    url = server.create_database("x")  # a fresh, empty database on the same server; returns its URL
    url = server.create_schema("y")    # or a fresh schema (cheaper); the URL sets search_path to it
    server.crash_and_restart()         # pg_ctl restart -m immediate: a crash, then WAL recovery
    server.stop()                      # pg_ctl stop -m immediate on this data dir, then rm the dir

The session fixture `postgres_server` (tests/conftest.py) shares one server per test session.

The role has a password (random per server) and connects over TCP with scram-sha-256, so tests
can check that the password never reaches a log or an error. Binaries are looked up on PATH, then in
/usr/lib/postgresql/*/bin (Debian's layout; `scripts/install-system-deps.sh` installs them).
initdb refuses to run as root, so as root the server runs as an unprivileged system user
(`tastemaker-test`, created once with useradd) through `runuser`. Only the server started here is
ever stopped: pg_ctl acts on this data directory alone.
"""

from __future__ import annotations

import atexit
import glob
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

#: The unprivileged user that runs the server when the tests run as root.
SERVER_USER = "tastemaker-test"
#: The role and database every server starts with.
ROLE = "tastemaker"
DATABASE = "tastemaker"


class PostgresUnavailable(RuntimeError):
    """The PostgreSQL server binaries are missing or the server would not start."""


def find_bin_dir() -> Path:
    """The folder holding initdb and pg_ctl: PATH first, then the newest /usr/lib/postgresql/*/bin."""
    on_path = shutil.which("initdb")
    if on_path and shutil.which("pg_ctl"):
        return Path(os.path.realpath(on_path)).parent
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parent.parent.name)
    )
    if candidates:
        return Path(candidates[-1]).parent
    raise PostgresUnavailable(
        "PostgreSQL server binaries (initdb, pg_ctl) not found on PATH or in /usr/lib/postgresql/*/bin; "
        "install them with scripts/install-system-deps.sh (Debian package postgresql-15)"
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_user_lock = threading.Lock()


def _ensure_server_user() -> None:
    """Create the unprivileged system user once (idempotent, also against a concurrent useradd)."""
    with _user_lock:
        if subprocess.run(["id", "-u", SERVER_USER], capture_output=True).returncode == 0:
            return
        made = subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", SERVER_USER],
            capture_output=True,
            text=True,
        )
        # Another process may have created it in between: only "still missing" is an error.
        if subprocess.run(["id", "-u", SERVER_USER], capture_output=True).returncode != 0:
            raise PostgresUnavailable(f"could not create the user {SERVER_USER!r}: {made.stderr.strip()}")


@dataclass
class PostgresServer:
    """A running server. `url` names the default database; `create_database` makes more."""

    host: str
    port: int
    user: str
    password: str = field(repr=False)
    database: str
    base_dir: Path
    _bin_dir: Path = field(repr=False)
    _as_user: Optional[str] = field(default=None, repr=False)
    _stopped: bool = field(default=False, repr=False)

    @property
    def url(self) -> str:
        """postgresql://user:password@host:port/database (the default database; host = listen_host)."""
        return self.url_for(self.database)

    @property
    def data_dir(self) -> Path:
        return self.base_dir / "data"

    def url_for(self, database: str) -> str:
        """The URL of another database on this server."""
        return f"postgresql://{self.user}:{self.password}@{self.host}:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """Create an empty database (name: letters, digits, underscores) and return its URL."""
        if not name.replace("_", "").isalnum() or not name[0].isalpha():
            raise ValueError(f"database name {name!r}: use letters, digits and underscores")
        import psycopg

        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url_for(name)

    def create_schema(self, name: str) -> str:
        """Create an empty schema in the default database and return a URL whose connections use
        it (`options=-csearch_path=<name>`): a fresh store in milliseconds, where a database
        takes about a second."""
        if not name.replace("_", "").isalnum() or not name[0].isalpha():
            raise ValueError(f"schema name {name!r}: use letters, digits and underscores")
        import psycopg

        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(f'CREATE SCHEMA "{name}"')
        return f"{self.url}?options=-csearch_path%3D{name}"

    def crash_and_restart(self, timeout_s: int = 60) -> None:
        """Stop this server the way a crash does (`-m immediate`: no checkpoint, shared buffers
        and unwritten WAL buffers lost) and start it again on the same port and data, which
        replays the WAL. What was committed durably is there afterwards; connections are not."""
        _run(
            self._bin_dir,
            self._as_user,
            ["pg_ctl", "-D", str(self.data_dir), "-l", str(self.base_dir / "server.log"), "restart", "-m", "immediate",
             "-w", "-t", str(timeout_s)],
            cwd=self.base_dir,
        )

    def stop(self) -> None:
        """Stop this server (immediate mode: a test server keeps nothing) and remove its files."""
        if self._stopped:
            return
        self._stopped = True
        _run(self._bin_dir, self._as_user, ["pg_ctl", "-D", str(self.data_dir), "stop", "-m", "immediate", "-w"],
             check=False, cwd=self.base_dir)
        shutil.rmtree(self.base_dir, ignore_errors=True)


def _run(bin_dir: Path, as_user: Optional[str], argv: list[str], check: bool = True, cwd: Optional[Path] = None):
    command = [str(bin_dir / argv[0]), *argv[1:]]
    if as_user:
        command = ["runuser", "-u", as_user, "--", *command]
    done = subprocess.run(command, capture_output=True, text=True, cwd=cwd, timeout=120)
    if check and done.returncode != 0:
        raise PostgresUnavailable(f"{argv[0]} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    return done


def start_postgres(
    start_timeout_s: int = 60, attempts: int = 3, listen_host: str = "127.0.0.1", client_cidr: Optional[str] = None
) -> PostgresServer:
    """Start a fresh PostgreSQL server on a free 127.0.0.1 port in a new temp dir.

    `listen_host` (an address of this machine, e.g. a veth end that other network namespaces
    reach) is listened on too and named in `url`; `client_cidr` admits password logins from that
    network (by default only loopback). Retries on another port when the chosen one was taken
    between picking and binding. The server is also stopped at interpreter exit if the caller
    forgets."""
    bin_dir = find_bin_dir()
    as_user = None
    if os.geteuid() == 0:
        _ensure_server_user()
        as_user = SERVER_USER
    base_dir = Path(tempfile.mkdtemp(prefix="tastemaker-pg-"))
    password = secrets.token_hex(12)
    (base_dir / "pwfile").write_text(password + "\n")
    if as_user:
        shutil.chown(base_dir, user=as_user)
        shutil.chown(base_dir / "pwfile", user=as_user)
    try:
        _run(
            bin_dir,
            as_user,
            ["initdb", "-D", str(base_dir / "data"), "-U", ROLE, f"--pwfile={base_dir / 'pwfile'}",
             "--auth=scram-sha-256", "--encoding=UTF8", "--no-locale", "--no-sync"],
            cwd=base_dir,
        )
        if client_cidr is not None:
            with open(base_dir / "data" / "pg_hba.conf", "a") as hba:
                hba.write(f"host all all {client_cidr} scram-sha-256\n")
        listen = "127.0.0.1" if listen_host == "127.0.0.1" else f"127.0.0.1,{listen_host}"
        last_error: Optional[Exception] = None
        for _ in range(attempts):
            port = _free_port()
            options = (
                f"-p {port} -c listen_addresses={listen} -c unix_socket_directories={base_dir} "
                "-c max_connections=200"
            )
            started = _run(
                bin_dir,
                as_user,
                ["pg_ctl", "-D", str(base_dir / "data"), "-l", str(base_dir / "server.log"), "-o", options,
                 "-w", "-t", str(start_timeout_s), "start"],
                check=False,
                cwd=base_dir,
            )
            if started.returncode == 0:
                break
            log = (base_dir / "server.log").read_text(errors="replace")[-2000:] if (base_dir / "server.log").exists() else ""
            last_error = PostgresUnavailable(f"pg_ctl start failed: {started.stderr.strip()} {log}")
        else:
            raise last_error or PostgresUnavailable("pg_ctl start failed")
        server = PostgresServer(
            host=listen_host, port=port, user=ROLE, password=password, database=DATABASE, base_dir=base_dir,
            _bin_dir=bin_dir, _as_user=as_user,
        )
    except BaseException:
        shutil.rmtree(base_dir, ignore_errors=True)
        raise
    atexit.register(server.stop)
    try:
        # initdb made the role and the `postgres` database, not one named after the role.
        import psycopg

        with psycopg.connect(server.url_for("postgres"), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{DATABASE}"')
    except BaseException:
        server.stop()
        raise
    return server

"""`tastemaker serve` as a user runs it: a separate process with its own Ray instance, the demo
loaded, `tastemaker recommend` talking to it, Ctrl-C (SIGINT) stopping it, and a restart that
keeps the data without loading the demo again."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import free_port

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent
START_TIMEOUT_S = 420


class ServeProcess:
    """`tastemaker serve` in a subprocess, its output read line by line on a thread."""

    def __init__(self, data_dir: Path, port: int, http_port: int):
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
        self.proc = subprocess.Popen(
            [
                str(BIN / "tastemaker"), "serve", "--data-dir", str(data_dir), "--port", str(port),
                "--http-port", str(http_port), "--demo-items", "150", "--demo-users", "40", "--quiet",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        self.lines: "queue.Queue[str | None]" = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def wait_for(self, text: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                break
            if line is None:
                break
            self.seen.append(line)
            if text in line:
                return
        tail = "\n".join(self.seen[-40:])
        raise AssertionError(f"{text!r} not printed within {timeout_s}s; output tail:\n{tail}")

    def interrupt(self) -> int:
        self.proc.send_signal(signal.SIGINT)
        self.wait_for("tastemaker: stopped", 180)
        return self.proc.wait(timeout=120)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _cli_json(port: int, command: str, *extra: str) -> dict:
    out = subprocess.run(
        [str(BIN / "tastemaker"), command, "--target", f"127.0.0.1:{port}", "--json", *extra],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def _recommend_json(port: int, *extra: str) -> dict:
    return _cli_json(port, "recommend", *extra)


def test_serve_recommend_ctrl_c_and_restart_keeps_data(tmp_path):
    from tastemaker.datasets.movielens import load_movielens, subsample

    # The demo subset the server loads with --demo-items 150 --demo-users 40: pick one of its users.
    user = subsample(load_movielens(), max_items=150, max_users=40).ratings[0].user_id
    port, http_port = free_port(), free_port()
    data_dir = tmp_path / "tm-data"
    server = ServeProcess(data_dir, port, http_port)
    try:
        server.wait_for("demo loaded", START_TIMEOUT_S)
        server.wait_for("READY", 60)
        first = _recommend_json(port, "--user", user, "--k", "5")
        assert len(first["items"]) == 5 and first["profile_version"] > 0
        assert all(i["title"] and i["reason"] for i in first["items"])
        profile_before = _cli_json(port, "profile", "--user", user)
        assert int(profile_before["profile_version"]) == first["profile_version"]
        steered = _recommend_json(port, "--user", "nobody", "--k", "3", "--query", "animated movie for kids about toys")
        assert steered["profile_version"] == 0 and len(steered["items"]) == 3
        assert server.interrupt() == 0
    finally:
        server.kill()
    assert (data_dir / "tastemaker.db").is_file() and (data_dir / "demo.done").is_file()

    server = ServeProcess(data_dir, port, http_port)
    try:
        server.wait_for("READY", START_TIMEOUT_S)
        assert not any("demo loaded" in line for line in server.seen), "the demo must not load twice"
        again = _recommend_json(port, "--user", user, "--k", "5")
        assert again["profile_version"] == first["profile_version"]
        assert _cli_json(port, "profile", "--user", user) == profile_before
        assert server.interrupt() == 0
    finally:
        server.kill()

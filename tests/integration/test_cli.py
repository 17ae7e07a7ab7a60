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

    def __init__(self, data_dir: Path, port: int, http_port: int, *extra: str):
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
        demo = list(extra) or ["--demo-items", "150", "--demo-users", "40"]
        self.proc = subprocess.Popen(
            [
                str(BIN / "tastemaker"), "serve", "--data-dir", str(data_dir), "--port", str(port),
                "--http-port", str(http_port), "--quiet", *demo,
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

    def crash(self) -> None:
        """SIGKILL the service and every process it started (Ray's GCS, raylet, replicas, shard
        actors) at once, as a power cut or the OOM killer would: no shutdown code runs."""
        doomed = [self.proc.pid, *_descendants(self.proc.pid)]
        for pid in doomed:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait()


def _descendants(root: int) -> list[int]:
    """All processes below `root`, from /proc (Ray daemonises some of them into new sessions)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, stack = [], [root]
    while stack:
        for child in children.get(stack.pop(), []):
            out.append(child)
            stack.append(child)
    return out


def _cli_json(port: int, data_dir: Path, command: str, *extra: str) -> dict:
    # --data-dir: where `tastemaker serve --data-dir` wrote the admin key the CLI sends.
    out = subprocess.run(
        [str(BIN / "tastemaker"), command, "--target", f"127.0.0.1:{port}", "--data-dir", str(data_dir), "--json", *extra],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def _recommend_json(port: int, data_dir: Path, *extra: str) -> dict:
    return _cli_json(port, data_dir, "recommend", *extra)


def _admin_key(data_dir: Path) -> str:
    """The admin key `tastemaker serve` created on its first start (private to its owner)."""
    path = data_dir / "admin.key"
    assert path.stat().st_mode & 0o777 == 0o600
    return path.read_text().strip()


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
        key = _admin_key(data_dir)
        assert sum(key in line for line in server.seen) == 1, "the new admin key is printed once"
        first = _recommend_json(port, data_dir, "--user", user, "--k", "5")
        assert len(first["items"]) == 5 and first["profile_version"] > 0
        assert all(i["title"] and i["reason"] for i in first["items"])
        profile_before = _cli_json(port, data_dir, "profile", "--user", user)
        assert int(profile_before["profile_version"]) == first["profile_version"]
        steered = _recommend_json(port, data_dir, "--user", "nobody", "--k", "3", "--query", "animated movie for kids about toys")
        assert steered["profile_version"] == 0 and len(steered["items"]) == 3
        assert server.interrupt() == 0
    finally:
        server.kill()
    assert (data_dir / "tastemaker.db").is_file() and (data_dir / "demo.done").is_file()

    server = ServeProcess(data_dir, port, http_port)
    try:
        server.wait_for("READY", START_TIMEOUT_S)
        assert not any("demo loaded" in line for line in server.seen), "the demo must not load twice"
        assert not any(key in line or "created an admin API key" in line for line in server.seen)
        again = _recommend_json(port, data_dir, "--user", user, "--k", "5")
        assert again["profile_version"] == first["profile_version"]
        assert _cli_json(port, data_dir, "profile", "--user", user) == profile_before
        assert server.interrupt() == 0
    finally:
        server.kill()


def test_service_killed_mid_stream_loses_no_acknowledged_event(tmp_path):
    from tastemaker.client import TastemakerClient
    from tastemaker.v1 import recommender_service_pb2 as pb

    port, http_port = free_port(), free_port()
    data_dir = tmp_path / "crash-data"
    items = [pb.Item(item_id=f"i{n}", title=f"Item number {n}", tags=["t"]) for n in range(20)]
    total = 4_000
    events = [
        pb.UserEvent(event_id=f"n{n}", user_id=f"user-{n % 7}", event_type=pb.EVENT_TYPE_CLICK, item_id=f"i{n % 20}")
        for n in range(total)
    ]
    acked: list[str] = []
    server = ServeProcess(data_dir, port, http_port, "--no-demo")
    try:
        server.wait_for("READY", START_TIMEOUT_S)
        with TastemakerClient(f"127.0.0.1:{port}", api_key=_admin_key(data_dir)) as client:
            client.upsert_items(items)
            try:
                for ack in client.stream_events(events, max_batch=50, linger_s=0.001):
                    assert ack.status == pb.EVENT_STATUS_ACCEPTED
                    acked.append(ack.event_id)
                    if len(acked) == 1_000:
                        server.crash()  # in the middle of the numbered events
            except Exception:  # the stream breaks when the service dies; that is the point
                pass
    finally:
        server.kill()
    assert 1_000 <= len(acked) < total, "the crash must land mid-stream"

    server = ServeProcess(data_dir, port, http_port, "--no-demo")
    try:
        server.wait_for("READY", START_TIMEOUT_S)
        with TastemakerClient(f"127.0.0.1:{port}", api_key=_admin_key(data_dir)) as client:
            # The client retries everything: acknowledged events must come back as duplicates,
            # the rest get applied now, and each exactly once.
            acks = client.write_events(events, batch_size=500)
            status = {a.event_id: a.status for a in acks}
            lost = [e for e in acked if status[e] != pb.EVENT_STATUS_DUPLICATE]
            assert not lost, f"{len(lost)} acknowledged events were lost, e.g. {lost[:3]}"
            for user in range(7):
                profile = client.get_user_profile(f"user-{user}")
                expected = len(range(user, total, 7))
                assert profile.profile_version == expected
                assert sum(c.count for c in profile.event_counts) == expected
        assert server.interrupt() == 0
    finally:
        server.kill()

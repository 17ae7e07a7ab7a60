"""A real two-node Ray cluster on one machine, for the multi-host test (tests/integration/test_multinode.py).

The two nodes share neither an address nor a disk, as two machines would not:

* **network**: the worker node runs in its own network namespace, joined to the root namespace
  by a veth pair on a private /30 (`ip netns add`, `ip link add ... type veth`). The head node
  runs in the root namespace on its end of the pair; PostgreSQL listens there too. Each node
  binds its own ports in its own namespace, so the worker's Serve proxies never collide with the
  head's.
* **disk**: the worker also runs in its own mount namespace (`unshare -m`) with a tmpfs over its
  Ray temp dir, over the service's data dir and over /dev/shm: what the worker writes there, the
  head never sees, and the other way round.

Ray runs with token authentication (`RAY_AUTH_MODE=token`, a random `RAY_AUTH_TOKEN` shared by
both nodes and every CLI call), as Ray 2.60 clusters do by default. Every process started here is
found again for clean-up without any broad kill: the head's processes by their session id (the
`ray start --block` process is started in a new session), the worker's as the processes inside
its network namespace (`ip netns pids`). `close()` removes the namespace and the veth pair even
after a failure.

Needs root and iproute2 (`ip`); `unavailable_reason()` says why not when they are missing.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


def unavailable_reason() -> Optional[str]:
    """None when this machine can build the two-node topology; else why not."""
    if os.geteuid() != 0:
        return "needs root (network and mount namespaces)"
    if shutil.which("ip") is None:
        return "needs iproute2 (`ip`)"
    if shutil.which("unshare") is None:
        return "needs util-linux (`unshare`)"
    probe = f"tmprobe{secrets.token_hex(3)}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot create a network namespace: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on right now on `host` (bound then released)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _run(argv: list[str], check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run(argv, capture_output=True, text=True, **kwargs)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    return done


def _pids_of_session(sid: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getsid(int(entry)) == sid:
                    pids.append(int(entry))
            except (ProcessLookupError, PermissionError):
                continue
    return pids


class TwoNodeCluster:
    """Head in the root network namespace, worker in its own network + mount namespace."""

    def __init__(self, head_cpus: int = 3, worker_cpus: int = 3, object_store_bytes: int = 150 * 1024 * 1024):
        tag = secrets.token_hex(3)
        self.netns = f"tmw{tag}"
        self.host_if, self.worker_if = f"tmh{tag}", f"tmw{tag}"
        # A random private /30 in 100.64.0.0/10 ("carrier-grade NAT" space, unused on test machines).
        second, third, fourth = 64 + secrets.randbelow(64), secrets.randbelow(256), secrets.randbelow(64) * 4
        prefix = f"100.{second}.{third}"
        self.host_ip, self.worker_ip = f"{prefix}.{fourth + 1}", f"{prefix}.{fourth + 2}"
        self.cidr = f"{prefix}.{fourth}/30"
        self.head_cpus, self.worker_cpus = head_cpus, worker_cpus
        self.object_store_bytes = object_store_bytes
        # Short paths: Ray's unix sockets live under the temp dir (108-byte limit).
        self.base = Path(tempfile.mkdtemp(prefix=f"tm{tag}-", dir="/tmp"))
        self.head_temp = self.base / "h"
        self.worker_temp = self.base / "w"
        self.head_temp.mkdir()
        self.worker_temp.mkdir()
        self.gcs_port = free_port()
        self.dashboard_port = free_port()
        self.token = secrets.token_hex(32)
        self.head: Optional[subprocess.Popen] = None
        self.worker: Optional[subprocess.Popen] = None
        self.head_node_id: Optional[str] = None
        self.network_up = False
        self.masked_dirs: list[Path] = []

    # -- environment ----------------------------------------------------------------------------
    def env(self, **extra: str) -> dict[str, str]:
        """Environment for every Ray process and CLI call of this cluster."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "TASTEMAKER_"))}
        env.update(
            PATH=f"{VENV_BIN}:{env.get('PATH', '/usr/bin:/bin')}",
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN=self.token,
            RAY_USAGE_STATS_ENABLED="0",
            HF_HUB_OFFLINE="1",
            TRANSFORMERS_OFFLINE="1",
            # A node that stops answering is declared dead in ~3 s instead of ~30 s.
            RAY_health_check_initial_delay_ms="1000",
            RAY_health_check_period_ms="1000",
            RAY_health_check_timeout_ms="1000",
            RAY_health_check_failure_threshold="3",
        )
        env.update(extra)
        return env

    @property
    def address(self) -> str:
        """The GCS address (`ray start --address`, `RAY_ADDRESS`)."""
        return f"{self.host_ip}:{self.gcs_port}"

    @property
    def dashboard(self) -> str:
        """The dashboard address the Serve CLI talks to (`serve deploy -a`)."""
        return f"http://{self.host_ip}:{self.dashboard_port}"

    # -- network ------------------------------------------------------------------------------
    def start_network(self) -> None:
        """The worker's namespace and the veth pair between it and the root namespace."""
        _run(["ip", "netns", "add", self.netns])
        self.network_up = True
        _run(["ip", "link", "add", self.host_if, "type", "veth", "peer", "name", self.worker_if])
        _run(["ip", "link", "set", self.worker_if, "netns", self.netns])
        _run(["ip", "addr", "add", f"{self.host_ip}/30", "dev", self.host_if])
        _run(["ip", "link", "set", self.host_if, "up"])
        _run(["ip", "-n", self.netns, "addr", "add", f"{self.worker_ip}/30", "dev", self.worker_if])
        _run(["ip", "-n", self.netns, "link", "set", self.worker_if, "up"])
        _run(["ip", "-n", self.netns, "link", "set", "lo", "up"])

    # -- nodes --------------------------------------------------------------------------------
    def _ray_start_args(self, cpus: int, temp_dir: Path, node_ip: str) -> list[str]:
        return [
            str(VENV_BIN / "ray"), "start", "--block", "--disable-usage-stats",
            f"--node-ip-address={node_ip}", f"--num-cpus={cpus}", "--num-gpus=0",
            f"--object-store-memory={self.object_store_bytes}", f"--temp-dir={temp_dir}",
        ]

    def start_head(self, attempts: int = 3) -> None:
        """`ray start --head` on the root namespace's end of the veth pair, on free ports. Ray gives
        a raylet 30 s to register, which a loaded CI machine can miss: then it is tried again."""
        for attempt in range(attempts):
            try:
                self._start_head_once()
                return
            except RuntimeError:
                if self.head is None or self.head.poll() is None or attempt == attempts - 1:
                    raise
                self._stop_head()
                self.gcs_port, self.dashboard_port = free_port(), free_port()

    def _start_head_once(self) -> None:
        ports = {name: free_port() for name in (
            "node-manager-port", "object-manager-port", "ray-client-server-port", "dashboard-agent-listen-port",
            "dashboard-agent-grpc-port", "metrics-export-port", "runtime-env-agent-port",
        )}
        low = 20_000 + secrets.randbelow(400) * 25
        argv = self._ray_start_args(self.head_cpus, self.head_temp, self.host_ip) + [
            "--head", f"--port={self.gcs_port}", "--include-dashboard=true",
            f"--dashboard-host={self.host_ip}", f"--dashboard-port={self.dashboard_port}",
            f"--min-worker-port={low}", f"--max-worker-port={low + 24}",
            *[f"--{name}={port}" for name, port in ports.items()],
        ]
        self.head = subprocess.Popen(
            argv, env=self.env(), cwd=self.base, start_new_session=True,
            stdout=open(self.base / "head.log", "wb"), stderr=subprocess.STDOUT,
        )
        self.head_node_id = self._wait_for_nodes(1)[0]

    def start_worker(self, masked_dirs: list[Path], attempts: int = 3) -> None:
        """`ray start --address` inside the worker's network namespace, in a private mount
        namespace with a tmpfs over its temp dir, /dev/shm and `masked_dirs` (tried again if
        its raylet misses Ray's registration deadline on a loaded machine)."""
        for attempt in range(attempts):
            try:
                self._start_worker_once(masked_dirs)
                return
            except RuntimeError:
                if self.worker is None or self.worker.poll() is None or attempt == attempts - 1:
                    raise
                self.kill_worker()

    def _start_worker_once(self, masked_dirs: list[Path]) -> None:
        self.masked_dirs = [Path(d) for d in masked_dirs]
        for folder in self.masked_dirs:
            folder.mkdir(parents=True, exist_ok=True)
        mounts = " && ".join(
            f"mount -t tmpfs -o size=512m tmpfs {folder}" for folder in [self.worker_temp, Path("/dev/shm"), *self.masked_dirs]
        )
        argv = self._ray_start_args(self.worker_cpus, self.worker_temp, self.worker_ip) + [f"--address={self.address}"]
        script = f"{mounts} && exec {' '.join(argv)}"
        self.worker = subprocess.Popen(
            ["ip", "netns", "exec", self.netns, "unshare", "--mount", "--propagation", "private", "sh", "-c", script],
            env=self.env(), cwd=self.base, start_new_session=True,
            stdout=open(self.base / "worker.log", "wb"), stderr=subprocess.STDOUT,
        )
        self._wait_for_nodes(2)

    def driver(self, code: str, timeout_s: float = 120) -> object:
        """Run `code` in a Ray driver connected to the cluster (a subprocess, so this test process
        never joins the cluster); it must print one JSON document last."""
        prelude = (
            "import json, ray, logging\n"
            f"ray.init(address={self.address!r}, namespace='tastemaker', logging_level=logging.ERROR, log_to_driver=False)\n"
        )
        done = _run([sys.executable, "-c", prelude + code], env=self.env(RAY_ADDRESS=self.address), cwd=self.base,
                    timeout=timeout_s)
        return json.loads(done.stdout.strip().splitlines()[-1])

    def alive_nodes(self) -> list[dict]:
        """[{node_id, ip}] of the alive nodes."""
        return self.driver(
            "print(json.dumps([{'node_id': n['NodeID'], 'ip': n['NodeManagerAddress']} for n in ray.nodes() if n['Alive']]))"
        )

    def _wait_for_nodes(self, count: int, timeout_s: float = 240) -> list[str]:
        """Node ids once exactly `count` nodes are alive, the head's first. One driver polls (a
        driver per poll would cost seconds of CPU each)."""
        deadline = time.monotonic() + timeout_s
        while True:  # the GCS port answers before a driver can connect
            try:
                socket.create_connection((self.host_ip, self.gcs_port), timeout=2).close()
                break
            except OSError:
                self._check_running()
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the head's GCS never listened: {self.log_tail('head')}")
                time.sleep(0.5)
        nodes = self.driver(
            "import time\n"
            f"deadline = time.monotonic() + {max(deadline - time.monotonic(), 10.0)}\n"
            "while True:\n"
            "    nodes = [{'node_id': n['NodeID'], 'ip': n['NodeManagerAddress']} for n in ray.nodes() if n['Alive']]\n"
            f"    if len(nodes) == {count} or time.monotonic() > deadline:\n"
            "        break\n"
            "    time.sleep(0.5)\n"
            "print(json.dumps(nodes))",
            timeout_s=timeout_s + 60,
        )
        if len(nodes) != count:
            self._check_running()
            raise RuntimeError(f"the cluster did not reach {count} alive nodes: {nodes}")
        return [n["node_id"] for n in sorted(nodes, key=lambda n: n["ip"] != self.host_ip)]

    def _check_running(self) -> None:
        for process, name in ((self.head, "head"), (self.worker, "worker")):
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"the {name} node exited: {self.log_tail(name)}")

    def wait_for_node_count(self, count: int, timeout_s: float = 120) -> None:
        """Until exactly `count` nodes are alive (e.g. after a node was killed)."""
        self._wait_for_nodes(count, timeout_s)

    def actors(self) -> list[dict]:
        """Alive actors: class_name, name, node_id (Ray's state API)."""
        return self.driver(
            "from ray.util.state import list_actors\n"
            "rows = list_actors(filters=[('state', '=', 'ALIVE')], limit=10000)\n"
            "print(json.dumps([{'class_name': a.class_name, 'name': a.name, 'node_id': a.node_id} for a in rows]))"
        )

    def serve(self, *args: str, timeout_s: float = 300) -> subprocess.CompletedProcess:
        """The Serve CLI against this cluster's dashboard (with its auth token)."""
        return _run([str(VENV_BIN / "serve"), *args, "-a", self.dashboard], env=self.env(), cwd=self.base,
                    timeout=timeout_s, check=False)

    def log_tail(self, name: str, chars: int = 3000) -> str:
        path = self.base / f"{name}.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    # -- failure ------------------------------------------------------------------------------
    def worker_pids(self) -> list[int]:
        """Every process in the worker's network namespace: the worker node and nothing else."""
        done = _run(["ip", "netns", "pids", self.netns], check=False)
        return [int(p) for p in done.stdout.split()] if done.returncode == 0 else []

    def kill_worker(self, timeout_s: float = 30) -> int:
        """SIGKILL every process of the worker node (the host dies); returns how many."""
        killed = 0
        deadline = time.monotonic() + timeout_s
        while pids := self.worker_pids():
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                    killed += 1
                except ProcessLookupError:
                    pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"worker processes survive SIGKILL: {pids}")
            time.sleep(0.1)
        if self.worker is not None:
            self.worker.wait(timeout=30)
        return killed

    # -- clean-up -----------------------------------------------------------------------------
    def close(self) -> None:
        """Stop every process started here, remove the namespace, the veth pair and the files."""
        if self.network_up:
            try:
                self.kill_worker()
            except Exception:  # noqa: BLE001 - clean-up goes on
                pass
        self._stop_head()
        if self.network_up:
            _run(["ip", "link", "del", self.host_if], check=False)  # removes both ends
            _run(["ip", "netns", "del", self.netns], check=False)
            self.network_up = False
        shutil.rmtree(self.base, ignore_errors=True)

    def _stop_head(self) -> None:
        if self.head is not None:
            sid = self.head.pid  # start_new_session: the session id is the leader's pid
            if self.head.poll() is None:
                self.head.send_signal(signal.SIGTERM)  # `ray start --block` stops its processes
                try:
                    self.head.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    pass
            deadline = time.monotonic() + 20
            while pids := _pids_of_session(sid):
                for pid in pids:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                if time.monotonic() > deadline:
                    break
                time.sleep(0.1)
            if self.head.poll() is None:
                self.head.kill()
            self.head.wait(timeout=10)

"""Tastemaker on a real two-node Ray cluster whose nodes share neither an address nor a disk
(tests/cluster_harness.py: the worker in its own network and mount namespaces), with PostgreSQL
as the store, deployed with `serve deploy` from the cluster's Serve config.

1. A SQLite store on the two-node cluster is refused at deploy time, naming PostgreSQL.
2. With PostgreSQL: retrieval replicas (2) and profile shards (2) run on both nodes (Ray's state API).
3. Numbered events stream through gRPC; mid-stream every process of the worker node gets SIGKILL.
   The client retries UNAVAILABLE with the same event ids; the service keeps answering, the
   worker's shards come back on the head and rebuild from PostgreSQL.
4. Afterwards every acknowledged event is stored exactly once (queried in PostgreSQL) and applied
   exactly once: each user's `profile_version` (GetUserProfile) equals their stored events.

Runs as root with iproute2 (CI); skips with the reason otherwise. A few minutes on 2 cores.
"""

from __future__ import annotations

import queue
import threading
import time
from pathlib import Path

import grpc
import pytest
import yaml

from tastemaker.v1 import recommender_service_pb2 as pb
from tastemaker.v1 import recommender_service_pb2_grpc as pb_grpc
from tests.cluster_harness import REPO, TwoNodeCluster, free_port, unavailable_reason

pytestmark = pytest.mark.integration

APP = "tastemaker"
USERS = 12
ITEMS = 24
EVENTS_PER_MESSAGE = 8
MESSAGES = 60  # 480 events
KILL_AFTER_MESSAGES = 20


@pytest.fixture(scope="module")
def cluster():
    reason = unavailable_reason()
    if reason:
        pytest.skip(f"multi-node test: {reason}")
    two = TwoNodeCluster()
    try:
        two.start_network()
        yield two
    finally:
        two.close()


@pytest.fixture(scope="module")
def postgres(cluster):
    """PostgreSQL on the head's end of the veth pair, reachable from both nodes."""
    from tests.pgserver import PostgresUnavailable, start_postgres

    try:
        server = start_postgres(listen_host=cluster.host_ip, client_cidr=cluster.cidr)
    except PostgresUnavailable as exc:
        pytest.skip(f"multi-node test: no PostgreSQL server ({exc})")
    yield server
    server.stop()


def _serve_config(path: Path, app_config: Path, grpc_port: int, http_port: int) -> Path:
    """cluster/serve-config.yaml with this test's ports and service config file."""
    tree = yaml.safe_load((REPO / "cluster" / "serve-config.yaml").read_text())
    tree["grpc_options"]["port"] = grpc_port
    tree["http_options"]["port"] = http_port
    (app,) = tree["applications"]
    assert app["import_path"] == "tastemaker.app:app_builder"
    app["args"]["config"] = str(app_config)
    path.write_text(yaml.safe_dump(tree))
    return path


def _app_status(cluster: TwoNodeCluster) -> tuple[str, str]:
    done = cluster.serve("status")
    if done.returncode != 0:
        return "UNKNOWN", done.stderr[-500:]
    app = (yaml.safe_load(done.stdout) or {}).get("applications", {}).get(APP, {})
    return app.get("status", "UNKNOWN"), app.get("message", "")


def _wait_status(cluster: TwoNodeCluster, wanted: str, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while True:
        status, message = _app_status(cluster)
        if status == wanted:
            return message
        assert time.monotonic() < deadline, f"application {status}, not {wanted}: {message[-2000:]}"
        time.sleep(2)


def _wait_serving(target: str, timeout_s: float) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout_s
    last = "no answer"
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=10).status == health_pb2.HealthCheckResponse.SERVING:
                    return
                last = "NOT_SERVING"
            except grpc.RpcError as exc:
                last = exc.code().name
            time.sleep(1)
    raise AssertionError(f"the service at {target} did not become SERVING ({last})")


def _retry_unavailable(call, deadline: float, unavailable: list):
    """`call()` until it does not fail with UNAVAILABLE (counted in `unavailable`)."""
    while True:
        try:
            return call()
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                raise
            unavailable.append(exc.code().name)
            time.sleep(0.5)


class EventStreamer:
    """Sends numbered messages over StreamUserEvents one at a time; on UNAVAILABLE opens a new
    stream and sends the unacknowledged message again with the same event ids (the service
    dedupes). Records every ack."""

    def __init__(self, stub, metadata, messages: list[list[pb.UserEvent]], deadline: float):
        self.stub, self.metadata, self.messages, self.deadline = stub, metadata, messages, deadline
        self.acks: dict[tuple[str, str], int] = {}  # (user_id, event_id) -> status
        self.sent_messages = 0
        self.unavailable: list[str] = []
        self.progress = threading.Event()

    def run(self) -> None:
        while self.sent_messages < len(self.messages):
            outbox: queue.Queue = queue.Queue()

            def requests():
                while (message := outbox.get()) is not None:
                    yield message

            call = self.stub.StreamUserEvents(requests(), metadata=self.metadata, timeout=600)
            try:
                while self.sent_messages < len(self.messages):
                    events = self.messages[self.sent_messages]
                    outbox.put(pb.StreamUserEventsRequest(events=events))
                    reply = next(call)
                    assert [a.event_id for a in reply.acks] == [e.event_id for e in events]
                    for ack in reply.acks:
                        self.acks[(ack.user_id, ack.event_id)] = ack.status
                    self.sent_messages += 1
                    self.progress.set()
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > self.deadline:
                    raise
                self.unavailable.append(exc.details() or "")
                time.sleep(0.5)
            finally:
                outbox.put(None)
                call.cancel()


def _placement(cluster: TwoNodeCluster) -> dict[str, list[str]]:
    """Node ids of the alive retrieval replicas, gateway replicas and profile shards."""
    nodes: dict[str, list[str]] = {"retrieval": [], "gateway": [], "shards": []}
    for actor in cluster.actors():
        if actor["class_name"] == f"ServeReplica:{APP}:Retrieval":
            nodes["retrieval"].append(actor["node_id"])
        elif actor["class_name"] == f"ServeReplica:{APP}:Gateway":
            nodes["gateway"].append(actor["node_id"])
        elif actor["class_name"] == "ProfileShardActor" and (actor["name"] or "").startswith(f"{APP}-profile-shard-"):
            nodes["shards"].append(actor["node_id"])
    return nodes


def test_a_host_killed_under_traffic_loses_and_duplicates_nothing(cluster, postgres):
    import psycopg

    from tastemaker.auth import new_key
    from tastemaker.store import open_store

    data_dir = cluster.base / "data"  # a tmpfs of its own on the worker: nodes share no disk
    cluster.start_head()
    cluster.start_worker([data_dir])
    grpc_port, http_port = free_port(cluster.host_ip), free_port(cluster.host_ip)
    target = f"{cluster.host_ip}:{grpc_port}"

    # 1. SQLite on two nodes: refused when the application is built, with the way out.
    sqlite_config = cluster.base / "sqlite.yaml"
    sqlite_config.write_text(yaml.safe_dump({"data_dir": str(data_dir)}))
    deployed = cluster.serve("deploy", str(_serve_config(cluster.base / "serve-sqlite.yaml", sqlite_config, grpc_port, http_port)))
    assert deployed.returncode == 0, deployed.stderr[-2000:]
    message = _wait_status(cluster, "DEPLOY_FAILED", timeout_s=300)
    assert "PostgreSQL" in message and "TASTEMAKER_STORE_URL" in message and "2 nodes" in message

    # 2. PostgreSQL, two retrieval replicas, two gateways, two shards; an API key in the store.
    store = open_store(postgres.url)
    try:
        secret, record = new_key("admin", "multinode test")
        store.create_api_key(record)
    finally:
        store.close()
    app_config = cluster.base / "config.yaml"
    app_config.write_text(yaml.safe_dump({
        "data_dir": str(data_dir),
        "store": {"url": postgres.url},
        "retrieval": {"num_replicas": 2, "refresh_interval_s": 0.2},
        "gateway": {"num_replicas": 2},
        "profiles": {"num_shards": 2},
    }))
    deployed = cluster.serve("deploy", str(_serve_config(cluster.base / "serve.yaml", app_config, grpc_port, http_port)))
    assert deployed.returncode == 0, deployed.stderr[-2000:]
    _wait_status(cluster, "RUNNING", timeout_s=600)
    _wait_serving(target, timeout_s=300)
    head, worker = cluster.head_node_id, [n["node_id"] for n in cluster.alive_nodes() if n["node_id"] != cluster.head_node_id][0]
    placement = _placement(cluster)
    assert sorted(placement["retrieval"]) == sorted([head, worker]), placement
    assert sorted(placement["shards"]) == sorted([head, worker]), placement

    metadata = (("authorization", f"Bearer {secret}"),)
    channel = grpc.insecure_channel(target)
    stub = pb_grpc.RecommenderServiceStub(channel)
    try:
        items = [pb.Item(item_id=f"i{n}", title=f"Film number {n}", description="A film.") for n in range(ITEMS)]
        assert stub.UpsertItems(pb.UpsertItemsRequest(items=items), metadata=metadata, timeout=300).upserted_count == ITEMS
        # Every replica (both nodes) must know the items before events name them.
        deadline = time.monotonic() + 120
        while True:
            try:
                hits = [stub.SimilarItems(pb.SimilarItemsRequest(item_id="i0", page_size=3), metadata=metadata, timeout=30)
                        for _ in range(6)]
                if all(len(h.items) == 3 for h in hits):
                    break
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.NOT_FOUND, exc
            assert time.monotonic() < deadline, "retrieval replicas did not see the items"
            time.sleep(0.5)

        # 3. Numbered events, streamed; the worker node is killed mid-stream.
        numbered = [
            pb.UserEvent(event_id=f"e{n:05d}", user_id=f"u{n % USERS}", event_type=pb.EVENT_TYPE_CLICK,
                         item_id=f"i{(n * 7) % ITEMS}")
            for n in range(MESSAGES * EVENTS_PER_MESSAGE)
        ]
        messages = [numbered[i : i + EVENTS_PER_MESSAGE] for i in range(0, len(numbered), EVENTS_PER_MESSAGE)]
        streamer = EventStreamer(stub, metadata, messages, deadline=time.monotonic() + 600)
        errors: list[BaseException] = []

        def stream() -> None:
            try:
                streamer.run()
            except BaseException as exc:  # noqa: BLE001 - reported by the test thread
                errors.append(exc)

        thread = threading.Thread(target=stream, daemon=True)
        thread.start()
        deadline = time.monotonic() + 300
        while streamer.sent_messages < KILL_AFTER_MESSAGES and thread.is_alive():
            assert time.monotonic() < deadline, "the stream made no progress"
            time.sleep(0.05)
        assert not errors, errors
        killed = cluster.kill_worker()
        assert killed > 0
        acked_at_kill = streamer.sent_messages
        thread.join(timeout=900)
        assert not thread.is_alive(), "the stream did not finish after the node was killed"
        assert not errors, errors
        assert streamer.sent_messages == len(messages) and acked_at_kill < len(messages)

        # The worker's shards came back on the head, rebuilt from PostgreSQL.
        cluster.wait_for_node_count(1)
        deadline = time.monotonic() + 300
        while True:
            placement = _placement(cluster)
            if len(placement["shards"]) == 2 and set(placement["shards"]) == {head}:
                break
            assert time.monotonic() < deadline, placement
            time.sleep(1)

        # 4. Exactly once: every acknowledged event stored once, and applied once per user.
        assert len(streamer.acks) == len(numbered)
        assert set(streamer.acks.values()) <= {pb.EVENT_STATUS_ACCEPTED, pb.EVENT_STATUS_DUPLICATE}
        with psycopg.connect(postgres.url) as conn:
            rows = conn.execute("SELECT user_id, event_id, COUNT(*) FROM events GROUP BY user_id, event_id").fetchall()
        stored = {(user, event): count for user, event, count in rows}
        assert set(stored) == set(streamer.acks)
        assert set(stored.values()) == {1}
        per_user: dict[str, int] = {}
        for user, _ in stored:
            per_user[user] = per_user.get(user, 0) + 1
        unavailable: list[str] = []
        deadline = time.monotonic() + 300
        for user, count in sorted(per_user.items()):
            profile = _retry_unavailable(
                lambda: stub.GetUserProfile(pb.GetUserProfileRequest(user_id=user), metadata=metadata, timeout=60),
                deadline, unavailable,
            )
            assert profile.profile_version == count, (user, profile.profile_version, count)
        # The service answers Recommend from the survivor.
        reply = _retry_unavailable(
            lambda: stub.Recommend(pb.RecommendRequest(user_id="u1", page_size=5), metadata=metadata, timeout=60),
            deadline, unavailable,
        )
        assert len(reply.items) == 5 and reply.profile_version == per_user["u1"]
        print(f"multinode: {len(numbered)} events, {len(streamer.unavailable)} UNAVAILABLE retries, "
              f"{sum(s == pb.EVENT_STATUS_DUPLICATE for s in streamer.acks.values())} acked as DUPLICATE, "
              f"{killed} worker processes killed after {acked_at_kill} messages")
    finally:
        channel.close()

"""The deploy path needs no CLI, and a split store is never SERVING.

* The application built by `app_builder` (what `serve deploy cluster/serve-config.yaml` and
  KubeRay import) over a store whose vectors another model made re-encodes the catalog by itself,
  exactly once across two gateway replicas, publishes the missing fit, and only then says SERVING.
* A retrieval replica given another SQLite file than the rest turns health NOT_SERVING, with a log
  line naming the split; given the right file again, health comes back.
"""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tastemaker.config import EncoderConfig
from tastemaker.domain import EventType, Item, UserEvent
from tastemaker.encoder.transformers_backend import TransformersBackend
from tastemaker.reencode import encoder_identity
from tastemaker.retrieval.collaborative import GRAPH_ARTIFACT
from tastemaker.store import open_store
from tastemaker.store.base import ENCODER_IDENTITY_KEY, ENCODER_SWAP_PENDING_KEY
from tests.integration.conftest import MOVIE_ITEMS, make_config

pytestmark = pytest.mark.integration

FOREIGN_MODEL = "another-model:mean:256:sha256=0000000000000000"


def _items() -> list[Item]:
    return [Item(item_id=i.item_id, title=i.title, description=i.description, tags=list(i.tags)) for i in MOVIE_ITEMS]


def _health(target: str) -> int:
    with grpc.insecure_channel(target) as channel:
        try:
            return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status
        except grpc.RpcError:
            return -1


def _wait_health(target: str, status: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while _health(target) != status:
        assert time.monotonic() < deadline, f"health did not become {health_pb2.HealthCheckResponse.ServingStatus.Name(status)}"
        time.sleep(0.25)


def _write_config(path: Path, config, **sections) -> Path:
    """The YAML an operator would write for `serve deploy` (args.config)."""
    tree = {
        "data_dir": config.data_dir,
        "server": {"grpc_port": config.server.grpc_port, "http_port": config.server.http_port},
        "retrieval": {"refresh_interval_s": 0.1},
        **sections,
    }
    path.write_text(yaml.safe_dump(tree))
    return path


@pytest.fixture
def serve_running(ray_session, tmp_path):
    """Ray + Serve with the gRPC proxy, as on a cluster before `serve deploy`."""
    from tastemaker.app import start_ray_and_serve, stop_service

    config = make_config(tmp_path)
    start_ray_and_serve(config)
    yield config
    stop_service(config, shutdown_ray=False)


def test_the_deployed_app_reencodes_by_itself_once_and_fits(serve_running, tmp_path):
    from ray import serve

    from tastemaker.app import app_builder, wait_serving

    config = serve_running
    rng = np.random.default_rng(0)
    store = open_store(config.store_url())
    try:
        items = _items()
        for item in items:  # vectors of "another model": random unit vectors
            v = rng.standard_normal(384).astype(np.float32)
            item.vector = v / np.linalg.norm(v)
        store.upsert_items(items)
        store.append_events(0, [
            UserEvent(event_id=f"e{n}", user_id=f"u{n % 3}", event_type=EventType.CLICK,
                      item_id=items[n % len(items)].item_id, event_time=1_000_000_000.0 + n)
            for n in range(12)
        ])
        store.set_meta(ENCODER_IDENTITY_KEY, FOREIGN_MODEL)
        seq_before = store.item_changes(0)[-1].seq
    finally:
        store.close()

    # Exactly what `serve deploy` does with cluster/serve-config.yaml: import the builder, call it
    # with the application's args, run the result. Two gateway replicas race for the start-up.
    path = _write_config(tmp_path / "config.yaml", config, gateway={"num_replicas": 2})
    serve.run(app_builder({"config": str(path)}), name=config.server.app_name, route_prefix="/", blocking=False)
    wait_serving(f"127.0.0.1:{config.server.grpc_port}", timeout_s=300)

    backend = TransformersBackend(EncoderConfig())
    backend.start()
    expected = dict(zip([i.item_id for i in items], backend.encode([i.text() for i in _items()])))
    store = open_store(config.store_url())
    try:
        assert store.get_meta(ENCODER_SWAP_PENDING_KEY) is None
        assert store.get_meta(ENCODER_IDENTITY_KEY) == encoder_identity(EncoderConfig())
        stored = store.get_item_vectors(list(expected))
        for item_id, vector in expected.items():
            assert float(stored[item_id] @ vector) > 1 - 1e-4, item_id
        # Re-encoded once, not once per gateway replica: one new feed entry per item.
        assert store.item_changes(0)[-1].seq == seq_before + len(items)
        assert store.artifact_version(GRAPH_ARTIFACT) is not None  # the missing fit was published
        assert store.get_meta("startup_lease") is None
    finally:
        store.close()


def _log_lines(needle: str) -> list[str]:
    """Lines of this Ray session's worker and replica logs that contain `needle`."""
    import ray

    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    lines = []
    for path in [*logs.glob("worker-*.err"), *logs.glob("serve/replica_*Gateway*.log")]:
        lines += [line for line in path.read_text(errors="replace").splitlines() if needle in line]
    return lines


def test_a_retrieval_replica_on_another_store_makes_health_not_serving(serve_running, tmp_path):
    from ray import serve

    from tastemaker.app import build_app, wait_serving

    config = serve_running
    target = f"127.0.0.1:{config.server.grpc_port}"
    serve.run(build_app(config), name=config.server.app_name, route_prefix="/", blocking=False)
    wait_serving(target, timeout_s=300)

    # The same application, but the retrieval deployment opens its own file, as a replica on
    # another node would open that node's disk.
    gateway = build_app(config)._bound_deployment
    settings, encoder, retrieval = gateway.init_args
    args = list(retrieval._bound_deployment.init_args)
    args[1] = "sqlite:///" + str(tmp_path / "elsewhere" / "tastemaker.db")
    split_app = gateway.bind(settings, encoder, retrieval._bound_deployment.bind(*args))
    before = len(_log_lines("different stores"))
    serve.run(split_app, name=config.server.app_name, route_prefix="/", blocking=False)
    _wait_health(target, health_pb2.HealthCheckResponse.NOT_SERVING, timeout_s=120)
    # The new replicas start (the encoder loads its model) and the start-up runs first: minutes on
    # a busy 2-core machine.
    # The line is written by a health check that sees every kind of component report; NOT_SERVING
    # above may have come earlier (the new retrieval replica not reported yet), so keep asking.
    deadline = time.monotonic() + 180
    while len(lines := _log_lines("different stores")) <= before:
        assert time.monotonic() < deadline, "no log line names the split"
        assert _health(target) != health_pb2.HealthCheckResponse.SERVING
        time.sleep(0.25)
    assert "retrieval/" in lines[-1] and "gateway/" in lines[-1]
    assert "sqlite" not in lines[-1].lower()
    assert _health(target) == health_pb2.HealthCheckResponse.NOT_SERVING  # and it stays so

    serve.run(build_app(config), name=config.server.app_name, route_prefix="/", blocking=False)
    _wait_health(target, health_pb2.HealthCheckResponse.SERVING, timeout_s=120)

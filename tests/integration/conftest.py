"""One Ray instance and one Serve instance (gRPC proxy on a free port) for the whole session;
each test module deploys its own application over its own data directory."""

from __future__ import annotations

from pathlib import Path

import pytest

from tastemaker.config import ServiceConfig, load_config
from tastemaker.v1 import recommender_service_pb2 as pb
from tests.conftest import free_port

_PORTS: dict[str, int] = {}


def make_config(data_dir: Path, retrieval: dict | None = None, **profile_overrides) -> ServiceConfig:
    """A CPU test config on the session's ports: 4 logical CPUs so every replica fits on 2 cores."""
    if not _PORTS:
        _PORTS.update(grpc=free_port(), http=free_port())
    overrides = {
        ("data_dir",): str(data_dir),
        ("server", "grpc_port"): _PORTS["grpc"],
        ("server", "http_port"): _PORTS["http"],
        ("server", "ray_num_cpus"): 4,
        # Followed quickly so catalog changes show up within the tests' bound.
        ("retrieval", "refresh_interval_s"): 0.1,
    }
    for key, value in profile_overrides.items():
        overrides[("profiles", key)] = value
    for key, value in (retrieval or {}).items():
        overrides[("retrieval", key)] = value
    return load_config(overrides=overrides, environ={})


@pytest.fixture(scope="session")
def ray_session():
    """Starts Ray + Serve once; shuts both down at the end of the session."""
    import ray
    from ray import serve

    yield
    if ray.is_initialized():
        serve.shutdown()
        ray.shutdown()


def create_key(config: ServiceConfig, role: str = "admin", name: str = "integration tests") -> str:
    """A new API key of `role` written straight into the service's store (what `tastemaker keys
    create` does); returns the secret."""
    from tastemaker.auth import create_key_in_store

    return create_key_in_store(config.store_url(), role, name)


class RunningService:
    """A deployed application and a client connected to it with an admin key."""

    def __init__(self, config: ServiceConfig):
        from tastemaker.client import TastemakerClient

        self.config = config
        self.target = f"127.0.0.1:{config.server.grpc_port}"
        # Auth is on by default: every test talks through an admin key, as an operator would.
        self.api_key = create_key(config)
        self.client = TastemakerClient(self.target, timeout_s=120, api_key=self.api_key)

    def new_client(self, **kwargs):
        """Another client of this service, with the admin key unless `api_key` is given."""
        from tastemaker.client import TastemakerClient

        kwargs.setdefault("api_key", self.api_key)
        kwargs.setdefault("timeout_s", 120)
        return TastemakerClient(self.target, **kwargs)

    def stop(self) -> None:
        from tastemaker.app import stop_service

        self.client.close()
        stop_service(self.config, shutdown_ray=False)


def start(config: ServiceConfig) -> RunningService:
    from tastemaker.app import start_service

    start_service(config)
    return RunningService(config)


#: A small catalog of real movies (two animated, two horror, an action film, a comedy) for tests
#: that need items whose texts the real encoder tells apart.
MOVIE_ITEMS = [
    pb.Item(item_id="m1", title="Toy Story (1995)", description="Genres: Animation, Children.", tags=["pixar"]),
    pb.Item(item_id="m2", title="Finding Nemo (2003)", description="Genres: Animation, Children.", tags=["pixar"]),
    pb.Item(item_id="m3", title="The Shining (1980)", description="Genres: Horror.", tags=["stephen king"]),
    pb.Item(item_id="m4", title="Halloween (1978)", description="Genres: Horror.", tags=["slasher"]),
    pb.Item(item_id="m5", title="Heat (1995)", description="Genres: Action, Crime, Thriller."),
    pb.Item(item_id="m6", title="Amelie (2001)", description="Genres: Comedy, Romance."),
]

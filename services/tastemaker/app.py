"""Builds the Serve application from a `ServiceConfig`, and starts/stops the whole service.

`build_app` is the only place where deployments are wired together; each one receives only its
slice of the config. `start_service` / `stop_service` are what `tastemaker serve` and the
integration tests use; `app_builder` is what `serve deploy cluster/serve-config.yaml` and KubeRay
use. Both deploy the same application, and everything done at start (schema set-up, re-encoding
after an encoder model change, publishing a missing fit) is done by the application itself
(`tastemaker.startup`, run by the gateway), so the two paths give the same service.
"""

from __future__ import annotations

import logging
import time

import grpc

from tastemaker.config import ServiceConfig, load_config
from tastemaker.errors import Unavailable
from tastemaker.store import open_store

logger = logging.getLogger(__name__)

#: Import paths of the servicer functions the Serve gRPC proxy registers: the generated ones,
#: wrapped so that undecodable request bytes reach the gateway (INVALID_ARGUMENT) instead of
#: failing inside the proxy as UNKNOWN (`tastemaker.gateway.wire`).
GRPC_SERVICER_FUNCTIONS = [
    "tastemaker.gateway.wire.add_RecommenderServiceServicer_to_server",
    "tastemaker.gateway.wire.add_HealthServicer_to_server",
]


def build_app(config: ServiceConfig):
    """The Serve application graph: Gateway(ingress) → Encoder, Retrieval (+ profile shard actors)."""
    from tastemaker.encoder.deployment import EncoderDeployment
    from tastemaker.gateway.deployment import GatewayDeployment, GatewaySettings
    from tastemaker.cluster import refuse_sqlite_on_cluster
    from tastemaker.retrieval.deployment import RetrievalDeployment

    store_url = config.store_url()
    # Here, not in a CLI: `serve deploy` and KubeRay run this builder on the cluster too.
    refuse_sqlite_on_cluster(store_url)
    enc = config.encoder
    from tastemaker.encoder.base import require_backend_package
    from tastemaker.encoder.deployment import deployment_options

    require_backend_package(enc.backend)  # e.g. a vllm config without vLLM fails here, before deploying
    if enc.backend == "onnx" and enc.onnx_cache_dir is None:
        from pathlib import Path

        # Exports live with the service's data, so a restart reuses them instead of exporting again.
        enc = enc.model_copy(update={"onnx_cache_dir": str(Path(config.data_dir).expanduser().resolve() / "encoder-cache")})
    encoder = EncoderDeployment.options(
        **deployment_options(enc, max_queued_requests=config.gateway.internal_max_queued_requests)
    ).bind(enc)
    ret = config.retrieval
    retrieval = RetrievalDeployment.options(
        num_replicas=ret.num_replicas,
        max_ongoing_requests=ret.max_ongoing_requests,
        max_queued_requests=config.gateway.internal_max_queued_requests,
        ray_actor_options={"num_cpus": ret.num_cpus},
        logging_config={"enable_access_log": False},
    ).bind(ret, store_url, config.profiles.weights, config.server.namespace, config.store)
    gw = config.gateway
    settings = GatewaySettings(
        gateway=gw,
        profiles=config.profiles,
        store_url=store_url,
        store=config.store,
        retrieval=config.retrieval,
        app_name=config.server.app_name,
        namespace=config.server.namespace,
        auth=config.auth,
        privacy=config.privacy,
    )
    return GatewayDeployment.options(
        num_replicas=gw.num_replicas,
        max_ongoing_requests=gw.max_ongoing_requests,
        max_queued_requests=gw.max_queued_requests,
        ray_actor_options={"num_cpus": gw.num_cpus},
    ).bind(settings, encoder, retrieval)


def app_builder(args: dict):
    """Entry point for Serve config files (`import_path: tastemaker.app:app_builder`), used by
    `serve deploy` and KubeRay. `args.config` is an optional YAML path; allowlisted environment
    variables apply as usual."""
    unknown = set(args or {}) - {"config"}
    if unknown:
        raise ValueError(f"unknown application args {sorted(unknown)}; allowed: config")
    return build_app(load_config((args or {}).get("config")))


def start_ray_and_serve(config: ServiceConfig) -> None:
    """Connect to (or start) Ray and start Serve with the gRPC proxy on the configured port."""
    import ray
    from ray import serve
    from ray.serve.config import gRPCOptions

    if not ray.is_initialized():
        ray.init(
            address=config.server.ray_address,
            num_cpus=config.server.ray_num_cpus if config.server.ray_address is None else None,
            namespace=config.server.namespace,
            logging_level=logging.WARNING,
            log_to_driver=False,
        )
    serve.start(
        http_options={"host": config.server.host, "port": config.server.http_port},
        grpc_options=gRPCOptions(port=config.server.grpc_port, grpc_servicer_functions=GRPC_SERVICER_FUNCTIONS),
    )


def deploy(config: ServiceConfig) -> None:
    """Deploy (or update) the application; returns once every replica is running."""
    from ray import serve

    serve.run(build_app(config), name=config.server.app_name, route_prefix="/", blocking=False)


def start_service(config: ServiceConfig, show_progress: bool = False) -> None:
    """Ray + Serve + the application, then wait until health says SERVING: the application runs
    its own start-up steps (`tastemaker.startup`: re-encoding after an encoder model change,
    a fit when none is published), exactly as under `serve deploy`. `show_progress` is kept for
    callers; the steps report in the gateway's log."""
    del show_progress
    start_ray_and_serve(config)
    deploy(config)
    wait_serving(f"{config.server.host}:{config.server.grpc_port}")


def mark_encoder_swap(config: ServiceConfig) -> bool:
    """`tastemaker.startup.mark_encoder_swap` on the configured store and encoder model: records
    that the stored vectors must be re-encoded; returns whether a swap is pending."""
    from tastemaker.reencode import encoder_identity
    from tastemaker.startup import mark_encoder_swap as mark

    store = open_store(config.store_url(), config.store)
    try:
        return mark(store, encoder_identity(config.encoder))
    finally:
        store.close()


def swap_encoder_if_changed(config: ServiceConfig, batch_size: int = 256) -> dict:
    """The encoder swap of the start-up steps, run from a driver against the running application
    (its encoder pool and profile shards): re-encode if the stored vectors were made by another
    model than the configured one. The application does this by itself at start; this is for
    operators and tests. Returns what was done."""
    import ray
    from ray import serve

    from tastemaker.profiles.actor import shard_actor_name
    from tastemaker.reencode import encoder_identity
    from tastemaker.startup import mark_encoder_swap as mark
    from tastemaker.startup import swap_encoder

    identity = encoder_identity(config.encoder)

    def submit(texts: list[str]):
        return serve.get_deployment_handle("Encoder", app_name=config.server.app_name).encode.remote(texts).result

    def rebuild() -> int:
        shards = [
            ray.get_actor(shard_actor_name(config.server.app_name, shard), namespace=config.server.namespace)
            for shard in range(config.profiles.num_shards)
        ]
        return sum(ray.get([actor.rebuild.remote() for actor in shards]))

    store = open_store(config.store_url(), config.store)
    try:
        if not mark(store, identity):  # nothing to do: the application need not be running
            return {"swapped": False}
        return swap_encoder(store, identity, submit, rebuild, batch_size=batch_size)
    finally:
        store.close()


def wait_serving(target: str, timeout_s: float = 600.0) -> None:
    """Poll grpc.health.v1 until SERVING."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout_s
    last_error = "no answer"
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
                last_error = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
            except grpc.RpcError as exc:
                last_error = f"{exc.code().name}: {exc.details()}"
            time.sleep(0.25)
    raise Unavailable(f"the service at {target} did not become SERVING within {timeout_s:.0f}s ({last_error})")


def stop_service(config: ServiceConfig, shutdown_ray: bool = True) -> None:
    """Delete the application, snapshot and stop the shard actors, optionally stop Ray."""
    import ray
    from ray import serve

    from tastemaker.cluster import kill_registry
    from tastemaker.profiles.actor import kill_shards

    if not ray.is_initialized():
        return
    try:
        serve.delete(config.server.app_name)
    finally:
        kill_shards(config.server.app_name, config.server.namespace, config.profiles.num_shards)
        kill_registry(config.server.app_name, config.server.namespace)
    if shutdown_ray:
        serve.shutdown()
        ray.shutdown()

"""How the Serve gRPC proxy decodes requests: servicer functions whose deserializers never raise.

The proxy registers the `add_*_to_server` functions named in `GRPC_SERVICER_FUNCTIONS`
(`tastemaker.app`) and replaces each method's handler with its own, but keeps the method's
`request_deserializer`: grpcio runs it in the proxy before any of our code. With the generated
`FromString`, bytes that are not a valid message raise `DecodeError` there, and grpcio answers
UNKNOWN with "Unexpected <class 'google.protobuf.message.DecodeError'>: ...". The functions here
register the same methods with a deserializer that turns undecodable bytes into a
`MalformedRequest` value instead; the proxy forwards it to the gateway like any request (unary
calls and each message of a stream), and the gateway answers INVALID_ARGUMENT through the one
error table. This module is imported by the proxy, so it stays light (grpc and the generated code).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class MalformedRequest:
    """Stands for a request whose bytes are not a valid message of the method's request type."""

    message_type: str
    size: int

    def describe(self) -> str:
        """The client-facing reason (what was wrong, what is expected)."""
        return (
            f"the request is not a valid {self.message_type} message ({self.size} bytes that do not "
            "decode as that protobuf type); send a serialized message of the method's request type"
        )


def safe_deserializer(deserializer: Callable[[bytes], Any], message_type: str) -> Callable[[bytes], Any]:
    """`deserializer`, except that undecodable bytes give a `MalformedRequest` instead of raising."""

    def deserialize(raw: bytes) -> Any:
        try:
            return deserializer(raw)
        except Exception:  # noqa: BLE001 - DecodeError, and whatever else corrupt bytes provoke
            return MalformedRequest(message_type, len(raw))

    return deserialize


def _message_type(deserializer: Callable) -> str:
    owner = getattr(deserializer, "__self__", None)  # `SomeRequest.FromString` is bound to the class
    descriptor = getattr(owner, "DESCRIPTOR", None)
    return getattr(descriptor, "full_name", "request")


def _safe_handler(handler):
    if handler.request_deserializer is None:
        return handler
    return handler._replace(
        request_deserializer=safe_deserializer(handler.request_deserializer, _message_type(handler.request_deserializer))
    )


class _SafeDecodingServer:
    """Passes a generated `add_*_to_server` through to the real server with safe deserializers."""

    def __init__(self, server):
        self._server = server

    def add_generic_rpc_handlers(self, generic_rpc_handlers) -> None:
        for generic in generic_rpc_handlers:
            handlers = getattr(generic, "_method_handlers", None)  # what grpc.method_handlers_generic_handler builds
            if handlers is not None:
                generic._method_handlers = {name: _safe_handler(h) for name, h in handlers.items()}
        self._server.add_generic_rpc_handlers(generic_rpc_handlers)

    def add_registered_method_handlers(self, service_name: str, method_handlers: dict) -> None:
        register = getattr(self._server, "add_registered_method_handlers", None)
        if register is not None:
            register(service_name, {name: _safe_handler(h) for name, h in method_handlers.items()})


def add_RecommenderServiceServicer_to_server(servicer, server) -> None:  # noqa: N802 - grpc's naming
    """`tastemaker.v1.RecommenderService`, with requests that never fail to decode in the proxy."""
    from tastemaker.v1 import recommender_service_pb2_grpc

    recommender_service_pb2_grpc.add_RecommenderServiceServicer_to_server(servicer, _SafeDecodingServer(server))


def add_HealthServicer_to_server(servicer, server) -> None:  # noqa: N802 - grpc's naming
    """`grpc.health.v1.Health`, with requests that never fail to decode in the proxy."""
    from grpc_health.v1 import health_pb2_grpc

    health_pb2_grpc.add_HealthServicer_to_server(servicer, _SafeDecodingServer(server))

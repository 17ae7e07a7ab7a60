"""The one table from domain errors to gRPC status codes."""

from __future__ import annotations

import grpc

from tastemaker import errors

STATUS_OF: dict[type[errors.TastemakerError], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
}


def _is_backpressure(exc: BaseException) -> bool:
    """Serve raises BackPressureError when a deployment's caller-side queue is full."""
    from ray.serve.exceptions import BackPressureError

    return isinstance(exc, BackPressureError) or isinstance(getattr(exc, "cause", None), BackPressureError)


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and message for any exception reaching the edge.

    Domain errors map through the table; a full internal queue is overload, an explicit fast
    RESOURCE_EXHAUSTED. Anything else is a bug or an outage of a component; it is reported as
    UNAVAILABLE with the cause's type so clients retry instead of seeing INTERNAL.
    """
    for cls in type(exc).__mro__:
        if cls in STATUS_OF:
            return STATUS_OF[cls], str(exc)
    if _is_backpressure(exc):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, (
            "the service is overloaded (an internal queue is full); retry with backoff or slow down"
        )
    return grpc.StatusCode.UNAVAILABLE, f"the service could not complete the call ({type(exc).__name__}): {exc}"

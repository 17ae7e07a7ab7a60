"""The one table from errors to gRPC status codes, and what the edge says about anything else.

Every status a client sees from Tastemaker's own code comes from `status_for`. Errors raised inside
another deployment or actor arrive wrapped by Ray (`RayTaskError`, whose text is the remote
traceback with paths, pid and node address); `unwrap` digs the domain error out first, so the
client gets that error's own code and short message. Anything that is not a domain error gets a
fixed message without its text (which may hold a traceback, a path, an address, a class name or a
user's text); it is logged on the server under a short reference the client also sees.
"""

from __future__ import annotations

import logging
import traceback
import uuid

import grpc

from tastemaker import errors

logger = logging.getLogger(__name__)

STATUS_OF: dict[type[errors.TastemakerError], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
}

#: Messages for the platform's own failures (never their text: it names classes and nodes).
OVERLOADED = "the service is overloaded (an internal queue is full); retry with backoff or slow down"
COMPONENT_DOWN = "a component of the service is restarting or unreachable; acknowledged events are safe, retry the call"
#: Longest message sent to a client; a domain message is written for people and stays far below.
MAX_MESSAGE_CHARS = 1_000


class StreamEnded(Exception):
    """Raised by a streaming RPC to end its stream with the status it has just set on the context.

    Serve's streaming path sends the context's code to the client only with a yielded item or an
    exception (the replica wraps an exception raised after `set_code` in `gRPCStatusError`, and the
    proxy answers with that code and details); a generator that just returns ends with OK. The
    message is the client-facing one already set as the details."""


def unwrap(exc: BaseException) -> BaseException:
    """The error that was raised where the work ran, without Ray's wrappers.

    `RayTaskError` (also in its dual form from `as_instanceof_cause`, which is an instance of the
    cause's class but whose `str` is the remote traceback) carries the original in `.cause`;
    Serve's `gRPCStatusError` in `.original_exception`. Wrappers can nest (gateway → retrieval →
    ...), so this follows the chain to its end."""
    from ray.exceptions import RayTaskError
    from ray.serve.exceptions import gRPCStatusError

    for _ in range(16):  # bounded: a cause chain is short; never loop on a cycle
        if isinstance(exc, RayTaskError) and isinstance(getattr(exc, "cause", None), BaseException):
            exc = exc.cause
        elif isinstance(exc, gRPCStatusError) and isinstance(exc.original_exception, BaseException):
            exc = exc.original_exception
        else:
            break
    return exc


def _platform_status(exc: BaseException) -> tuple[grpc.StatusCode, str] | None:
    """Ray / Serve failures that have a meaning for the client: overload and outages."""
    from ray.exceptions import ActorUnavailableError, PendingCallsLimitExceeded, RayActorError
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

    if isinstance(exc, (BackPressureError, PendingCallsLimitExceeded)):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, OVERLOADED
    if isinstance(exc, (RayActorError, ActorUnavailableError, DeploymentUnavailableError)):
        return grpc.StatusCode.UNAVAILABLE, COMPONENT_DOWN
    return None


def _short(message: str) -> str:
    return message if len(message) <= MAX_MESSAGE_CHARS else message[: MAX_MESSAGE_CHARS - 3] + "..."


def status_for(exc: BaseException, rpc: str = "") -> tuple[grpc.StatusCode, str]:
    """The status code and message for any exception reaching the edge.

    Domain errors (after `unwrap`) map through the table with their own message; a full internal
    queue is overload, an explicit fast RESOURCE_EXHAUSTED; a dead or restarting component is
    UNAVAILABLE. Anything else is a bug or an outage; it is reported as UNAVAILABLE (so clients
    retry, never INTERNAL) with a fixed message and a reference, and logged server side by
    `log_unexpected` — class names and stack frames, not the exception's text, which may carry
    a user's text."""
    original = unwrap(exc)
    for cls in type(original).__mro__:
        if cls in STATUS_OF:
            return STATUS_OF[cls], _short(str(original))
    for candidate in (original, exc):
        platform = _platform_status(candidate)
        if platform is not None:
            return platform
    reference = log_unexpected(exc, rpc)
    return grpc.StatusCode.UNAVAILABLE, (
        f"the service could not complete the call (reference {reference}); retry with backoff, "
        "and report the reference if it persists"
    )


def log_unexpected(exc: BaseException, rpc: str = "") -> str:
    """Log an unexpected failure without its message text; returns the reference quoted to the
    client. The log names the exception classes along the wrapper chain and the local frames."""
    reference = uuid.uuid4().hex[:12]
    chain = [type(exc).__name__]
    inner = unwrap(exc)
    if inner is not exc:
        chain.append(type(inner).__name__)
    frames = "".join(traceback.format_tb(exc.__traceback__)) if exc.__traceback__ is not None else ""
    logger.error("unexpected failure in %s [reference %s]: %s\n%s", rpc or "a call", reference, " <- ".join(chain), frames)
    return reference

"""Domain errors. The gateway maps each class to one gRPC status code in exactly one table
(`tastemaker.gateway.errors`); everything below the gateway raises only these."""

from __future__ import annotations


class TastemakerError(Exception):
    """Base class. `message` must tell a person what was wrong and what is allowed."""


class InvalidArgument(TastemakerError):
    """The request itself is malformed or out of range."""


class NotFound(TastemakerError):
    """A named entity (item) does not exist."""


class FailedPrecondition(TastemakerError):
    """The system is not in a state to serve this request yet (e.g. profile version not reached)."""


class ResourceExhausted(TastemakerError):
    """Overload or a quota: an explicit fast error, never a slow timeout."""


class Unavailable(TastemakerError):
    """A component is starting, restarting or unreachable; the call may be retried."""


class Unauthenticated(TastemakerError):
    """No or bad credentials."""


class PermissionDenied(TastemakerError):
    """Credentials valid but not allowed to do this."""

"""The gateway's admission step, run before any RPC's own code: API key, role and rate limit
(`tastemaker.auth`), then user-id pseudonymisation (`tastemaker.privacy`) of the request, with a
function that puts the caller's own ids back into the response.

This is the only module that applies auth and privacy to protobuf messages; the logic itself is
pure and lives in `tastemaker.auth` and `tastemaker.privacy`.
"""

from __future__ import annotations

from collections import deque
from typing import AsyncIterator, Callable, Optional

from google.protobuf.message import Message

from tastemaker.auth import Authenticator
from tastemaker.config import AuthConfig, GatewayConfig, PrivacyConfig
from tastemaker.privacy import Pseudonymizer, check_store_key

#: RPCs whose request has a top-level `user_id`.
_USER_ID_REQUESTS = ("Recommend", "GetUserProfile", "DeleteUser")


def _identity(response):
    return response


class EdgeGuard:
    """Admits calls (auth) and pseudonymises user ids at the gateway edge."""

    def __init__(self, auth: AuthConfig, privacy: PrivacyConfig, store, gateway: GatewayConfig):
        self.authenticator = Authenticator(auth.settings(), store.find_api_key)
        key = privacy.user_id_key.get_secret_value() if privacy.user_id_key is not None else None
        self.pseudonymizer: Optional[Pseudonymizer] = Pseudonymizer(key) if key else None
        check_store_key(store, self.pseudonymizer)  # never mix raw ids and pseudonyms in one store
        self.max_id_chars = gateway.max_id_chars

    @staticmethod
    def _metadata(grpc_context):
        return grpc_context.invocation_metadata() if grpc_context is not None else ()

    async def admit(self, method: str, request, grpc_context) -> tuple[object, Callable]:
        """Check the call's key for `method`; return the request with pseudonymous user ids and a
        function restoring the caller's ids in the response. Raises the domain auth errors."""
        await self.authenticator.check(method, self._metadata(grpc_context))
        if self.pseudonymizer is None or not isinstance(request, Message):
            return request, _identity  # (undecodable bytes arrive as gateway.wire.MalformedRequest)
        if method in _USER_ID_REQUESTS:
            original = request.user_id
            pseudonym = self._mask(original)
            if pseudonym == original:
                return request, _identity
            request.user_id = pseudonym

            def restore(response):
                if method == "GetUserProfile" and response.user_id == pseudonym:
                    response.user_id = original
                return response

            return request, restore
        if method == "WriteUserEvents":
            originals = self._mask_events(request.events)
            return request, lambda response: self._unmask_acks(response, originals)
        return request, _identity

    def admit_stream(self, request_stream, grpc_context) -> tuple[AsyncIterator, Callable]:
        """For StreamUserEvents: a wrapped inbound stream that checks the key when the first
        message arrives (an auth error then ends the stream through the stream's own error path),
        paces messages to the key's rate and pseudonymises user ids; and the response restorer."""
        # One mapping per inbound message: the stream answers each message once, in order, so
        # the oldest mapping is always the one of the next response (memory stays per window).
        pending: deque[dict[str, str]] = deque()
        authenticator = self.authenticator

        async def guarded():
            record = None
            async for message in request_stream:
                if authenticator.settings.enabled:
                    if record is None:
                        record = await authenticator.authenticate(self._metadata(grpc_context))
                        authenticator.authorize(record, "StreamUserEvents")
                    await authenticator.pace(record)
                if self.pseudonymizer is not None and isinstance(message, Message):
                    pending.append(self._mask_events(message.events))
                yield message

        if self.pseudonymizer is None:
            return guarded(), _identity
        return guarded(), lambda response: self._unmask_acks(response, pending.popleft() if pending else {})

    # -- pseudonyms ---------------------------------------------------------------------------
    def _mask(self, user_id: str) -> str:
        # Ids the gateway will reject anyway stay as they are, so the error names what was sent.
        if not user_id or not user_id.strip() or len(user_id) > self.max_id_chars:
            return user_id
        return self.pseudonymizer.pseudonym(user_id)

    def _mask_events(self, events) -> dict[str, str]:
        originals: dict[str, str] = {}
        for event in events:
            pseudonym = self._mask(event.user_id)
            if pseudonym != event.user_id:
                originals[pseudonym] = event.user_id
                event.user_id = pseudonym
        return originals

    @staticmethod
    def _unmask_acks(response, originals: dict[str, str]):
        for ack in response.acks:
            if ack.user_id in originals:
                ack.user_id = originals[ack.user_id]
        return response

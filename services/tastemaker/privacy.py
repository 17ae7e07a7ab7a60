"""Pseudonymous user ids: a keyed HMAC applied at the gateway edge, before anything is routed,
logged or stored.

With `privacy.user_id_key` set (or `TASTEMAKER_USER_ID_KEY`), every user id a caller sends is
replaced by `p_` + HMAC-SHA256(key, user id) in hex. Shards, the store, the event feed and the
retrieval replicas only ever see the pseudonym; responses carry the caller's own id back. The key
lives in the configuration, never in the store: a copy of the data directory or database alone
cannot be joined back to real user ids, and without the key nobody can tell which pseudonym is
whose. Losing or changing the key splits every user from their history, so keep it like any
other secret.
"""

from __future__ import annotations

import hashlib
import hmac

#: Shortest accepted key: 32 bytes, HMAC-SHA256's block-size guidance for a full-strength key.
MIN_KEY_BYTES = 32
#: Marks a pseudonym, so a stored id says what it is.
PSEUDONYM_PREFIX = "p_"


def check_user_id_key(key: str) -> bytes:
    """The key as bytes, or ValueError when it is too short (the message never shows the key)."""
    raw = key.encode("utf-8")
    if len(raw) < MIN_KEY_BYTES:
        raise ValueError(
            f"privacy.user_id_key is {len(raw)} bytes; at least {MIN_KEY_BYTES} are needed "
            "(e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`)"
        )
    return raw


class Pseudonymizer:
    """user id → `p_<hex HMAC-SHA256(key, user id)>`: deterministic (one user, one pseudonym),
    not reversible without the key."""

    def __init__(self, key: str):
        self._key = check_user_id_key(key)

    def __repr__(self) -> str:  # never show the key, e.g. in a Ray actor's repr
        return "Pseudonymizer(key=<hidden>)"

    def pseudonym(self, user_id: str) -> str:
        """The pseudonym of one user id."""
        digest = hmac.new(self._key, user_id.encode("utf-8"), hashlib.sha256).hexdigest()
        return PSEUDONYM_PREFIX + digest

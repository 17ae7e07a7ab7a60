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


#: Store meta key recording which pseudonym key (if any) the stored user ids were written with.
KEY_CHECK_META = "privacy_user_id_key_check"
_KEY_CHECK_MESSAGE = b"tastemaker user_id_key check"


def key_check(pseudonymizer: "Pseudonymizer | None") -> str:
    """What the store records about the pseudonym key: `off`, or a 64-bit keyed check value
    (HMAC of a fixed text) that tells two keys apart without revealing either."""
    if pseudonymizer is None:
        return "off"
    digest = hmac.new(pseudonymizer._key, _KEY_CHECK_MESSAGE, hashlib.sha256).hexdigest()
    return "hmac-sha256:" + digest[:16]


def check_store_key(store, pseudonymizer: "Pseudonymizer | None") -> None:
    """Refuse to serve a store whose user ids were written under another pseudonym setting:
    starting without the key, or with another one, would silently split every user from their
    history. The first start records the setting; it may change while the store holds no event.
    Raises FailedPrecondition."""
    from tastemaker.errors import FailedPrecondition

    current = key_check(pseudonymizer)
    if store.compare_and_set_meta(KEY_CHECK_META, None, current):
        return
    recorded = store.get_meta(KEY_CHECK_META)
    if recorded == current:
        return
    if not store.events_after(0, limit=1):  # no user data yet: the setting may still change
        store.set_meta(KEY_CHECK_META, current)
        return
    if recorded == "off":
        why = "were stored as sent (no privacy.user_id_key), but a key is configured now"
    elif current == "off":
        why = "are pseudonyms made with privacy.user_id_key, but none is configured now"
    else:
        why = "are pseudonyms made with another privacy.user_id_key than the configured one"
    raise FailedPrecondition(
        f"the store's user ids {why}: starting would split every user from their history; start with "
        "the same setting as before (TASTEMAKER_USER_ID_KEY)"
    )

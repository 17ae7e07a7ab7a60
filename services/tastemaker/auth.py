"""API keys, roles and per-key rate limits: the pure logic behind the gateway's auth check.

A key is a random secret the caller sends as gRPC metadata `authorization: Bearer <key>`. The
store keeps only its SHA-256 (`ApiKeyRecord.key_hash`) with a public `key_id`, a role and a name;
the secret is shown once, when the key is created. Roles are ordered, each including the ones
below it: `admin` ⊇ `write` ⊇ `read` (a writer can read what it wrote; an admin can do anything).

Nothing here knows protobuf, gRPC or Ray: the gateway passes the call's metadata in and gets a
record back or a domain error (Unauthenticated, PermissionDenied, ResourceExhausted) that the one
error table maps to a status.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import secrets
import tempfile
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional

from tastemaker.errors import InvalidArgument, PermissionDenied, ResourceExhausted, Unauthenticated
from tastemaker.store.base import ApiKeyRecord

#: Roles from least to most privileged; each includes every role before it.
ROLES: tuple[str, ...] = ("read", "write", "admin")

#: The role each RPC needs. An RPC missing here needs `admin` (fail closed: a new RPC is never open
#: by accident). Health and reflection never reach this check: they are not gateway RPCs.
METHOD_ROLES: dict[str, str] = {
    "Recommend": "read",
    "SimilarItems": "read",
    "GetItem": "read",
    "GetUserProfile": "read",
    "WriteUserEvents": "write",
    "StreamUserEvents": "write",
    "UpsertItems": "write",
    "DeleteUser": "admin",
    "DeleteItems": "admin",
}

#: Prefix of every key: makes a leaked key easy to recognise (secret scanners, logs review).
KEY_PREFIX = "tm_"
#: The metadata key the secret travels in (gRPC metadata keys are lower case).
METADATA_KEY = "authorization"
#: Name of the file `tastemaker serve` writes the demo admin key to, inside the data directory.
ADMIN_KEY_FILE = "admin.key"


def hash_key(secret: str) -> str:
    """The stored form of a key: SHA-256 hex of the secret. Keys are 256-bit random, so a plain
    hash (no salt, no slow KDF) is enough: there is nothing to guess from a dictionary."""
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def role_allows(role: str, required: str) -> bool:
    """Whether a key of `role` may call an RPC that needs `required` (admin ⊇ write ⊇ read)."""
    return ROLES.index(role) >= ROLES.index(required)


def check_role(role: str) -> str:
    """`role` if it is one of ROLES, else InvalidArgument listing them."""
    if role not in ROLES:
        raise InvalidArgument(f"unknown role {role!r}; allowed: {', '.join(ROLES)}")
    return role


def new_key(role: str, name: str, now: Optional[float] = None) -> tuple[str, ApiKeyRecord]:
    """A fresh key: (the secret, shown once; the record to store, which holds only its hash)."""
    check_role(role)
    secret = KEY_PREFIX + secrets.token_urlsafe(32)
    record = ApiKeyRecord(
        key_id=secrets.token_hex(8),
        key_hash=hash_key(secret),
        role=role,
        name=name,
        create_time=time.time() if now is None else now,
    )
    return secret, record


def bearer_key(metadata: Optional[Iterable[tuple[str, object]]]) -> str:
    """The secret of an `authorization: Bearer <key>` metadata entry, or Unauthenticated."""
    values = [v for k, v in (metadata or ()) if str(k).lower() == METADATA_KEY]
    if not values:
        raise Unauthenticated(
            "missing API key: send the metadata 'authorization: Bearer <key>' "
            "(create a key with `tastemaker keys create --role read|write|admin --name NAME`)"
        )
    value = values[0]
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    scheme, _, secret = str(value).strip().partition(" ")
    if scheme.lower() != "bearer" or not secret.strip():
        raise Unauthenticated("malformed authorization metadata: expected 'Bearer <key>'")
    return secret.strip()


class TokenBucket:
    """A token bucket: `rate_per_s` tokens a second, at most `capacity` saved up.

    `take()` spends one token and returns 0.0, or spends nothing and returns how many seconds
    until a token is available. The clock is injected so tests need no sleeping."""

    def __init__(self, rate_per_s: float, capacity: float, clock: Callable[[], float] = time.monotonic):
        self.rate_per_s = rate_per_s
        self.capacity = max(1.0, capacity)
        self.clock = clock
        self.tokens = self.capacity
        self.updated = clock()

    def take(self) -> float:
        """Spend one token (0.0) or say how long to wait for one (seconds, nothing spent)."""
        now = self.clock()
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate_per_s)
        self.updated = now
        if self.tokens >= 1.0 - 1e-9:  # a float sum of refills may land a hair below a whole token
            self.tokens = max(0.0, self.tokens - 1.0)
            return 0.0
        return (1.0 - self.tokens) / self.rate_per_s


@dataclass
class AuthSettings:
    """What the authenticator needs from `AuthConfig` (kept plain so this module has no pydantic)."""

    enabled: bool = True
    cache_ttl_s: float = 5.0
    cache_max_keys: int = 10_000
    rate_per_s: dict[str, float] = field(default_factory=lambda: {"read": 1000.0, "write": 1000.0, "admin": 100.0})
    burst_s: float = 2.0


class Authenticator:
    """Checks a call's key and role, and meters it against the key's token bucket.

    `lookup(key_hash)` reads the store (run in a thread: it may block). Found records are cached
    for `cache_ttl_s`, so revoking a key takes effect within that delay; unknown keys are never
    cached (a key created a moment ago works at once). The cache is bounded (LRU)."""

    def __init__(
        self,
        settings: AuthSettings,
        lookup: Callable[[str], Optional[ApiKeyRecord]],
        clock: Callable[[], float] = time.monotonic,
    ):
        self.settings = settings
        self.lookup = lookup
        self.clock = clock
        self._cache: "OrderedDict[str, tuple[float, ApiKeyRecord]]" = OrderedDict()
        self._buckets: dict[str, TokenBucket] = {}

    async def _record(self, key_hash: str) -> Optional[ApiKeyRecord]:
        now = self.clock()
        hit = self._cache.get(key_hash)
        if hit is not None and hit[0] > now:
            self._cache.move_to_end(key_hash)
            return hit[1]
        record = await asyncio.to_thread(self.lookup, key_hash)
        if record is None:
            self._cache.pop(key_hash, None)
            return None
        self._cache[key_hash] = (now + self.settings.cache_ttl_s, record)
        self._cache.move_to_end(key_hash)
        while len(self._cache) > self.settings.cache_max_keys:
            self._cache.popitem(last=False)
        return record

    async def authenticate(self, metadata) -> ApiKeyRecord:
        """The valid key record of the call's `authorization` metadata, or Unauthenticated."""
        secret = bearer_key(metadata)
        key_hash = hash_key(secret)
        record = await self._record(key_hash)
        # The store found the record by its hash; comparing again in constant time keeps a
        # timing side channel out even if a store's lookup were a prefix or case-folded match.
        if record is None or not hmac.compare_digest(record.key_hash.encode(), key_hash.encode()):
            raise Unauthenticated("unknown API key; check the key, or create one with `tastemaker keys create`")
        if record.revoke_time is not None:
            raise Unauthenticated(f"API key {record.key_id} was revoked; use another key")
        if record.role not in ROLES:
            raise Unauthenticated(f"API key {record.key_id} has no valid role; create a new key")
        return record

    @staticmethod
    def authorize(record: ApiKeyRecord, method: str) -> None:
        """PermissionDenied unless the key's role covers the RPC."""
        required = METHOD_ROLES.get(method, "admin")
        if not role_allows(record.role, required):
            raise PermissionDenied(
                f"{method} needs a key with role {required!r} or above; key {record.key_id} has role {record.role!r}"
            )

    def retry_after(self, record: ApiKeyRecord) -> float:
        """Spend one token of the key's bucket: 0.0, or the seconds until the next call may go."""
        rate = self.settings.rate_per_s.get(record.role, 0.0)
        if rate <= 0:
            return 0.0  # 0 = unlimited for this role
        bucket = self._buckets.get(record.key_id)
        if bucket is None:
            bucket = self._buckets[record.key_id] = TokenBucket(rate, rate * self.settings.burst_s, self.clock)
        return bucket.take()

    def meter(self, record: ApiKeyRecord) -> None:
        """ResourceExhausted, naming the delay, when the key is over its rate."""
        delay = self.retry_after(record)
        if delay > 0:
            rate = self.settings.rate_per_s.get(record.role, 0.0)
            raise ResourceExhausted(
                f"rate limit of API key {record.key_id} ({rate:g} calls/s for role {record.role!r}) "
                f"reached; retry in {delay:.3f} s"
            )

    async def pace(self, record: ApiKeyRecord) -> None:
        """For stream messages: wait for the key's next token instead of failing, so a stream
        over its rate is slowed down (gRPC flow control pushes back on the client)."""
        while (delay := self.retry_after(record)) > 0:
            await asyncio.sleep(delay)

    async def check(self, method: str, metadata) -> Optional[ApiKeyRecord]:
        """Authenticate, authorize and meter one unary call; None when auth is disabled."""
        if not self.settings.enabled:
            return None
        record = await self.authenticate(metadata)
        self.authorize(record, method)
        self.meter(record)
        return record


# -- the key file of the local demo ----------------------------------------------------------
def write_key_file(path: Path, secret: str) -> None:
    """Write a secret readable by its owner only (mode 0600 from creation, atomic replace)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # mkstemp creates it 0600
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(secret + "\n")
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_key_file(path: Path) -> Optional[str]:
    """The secret in a key file, or None if there is none."""
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return None
    return text or None


def ensure_admin_key(store, data_dir: Path, name: str = "local admin (tastemaker serve)") -> Optional[str]:
    """For the local demo: when the store has no key at all, create an admin key, write it to
    `<data_dir>/admin.key` (0600) and return the secret (to be printed once). None otherwise."""
    if store.list_api_keys():
        return None
    secret, record = new_key("admin", name)
    store.create_api_key(record)
    write_key_file(Path(data_dir) / ADMIN_KEY_FILE, secret)
    return secret


def create_key_in_store(store_url: str, role: str, name: str) -> str:
    """Create a key directly in the store at `store_url` (what `tastemaker keys create` does);
    returns the secret. For operators' scripts, benchmarks and tests that own their service."""
    from tastemaker.store import open_store

    secret, record = new_key(role, name)
    store = open_store(store_url)
    try:
        store.create_api_key(record)
    finally:
        store.close()
    return secret

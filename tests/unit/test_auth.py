"""API keys, roles, rate limits and pseudonyms: the pure logic, on a real SQLite store."""

from __future__ import annotations

import asyncio
import os
import stat

import pytest

from tastemaker.auth import (
    ADMIN_KEY_FILE,
    METHOD_ROLES,
    AuthSettings,
    Authenticator,
    TokenBucket,
    bearer_key,
    ensure_admin_key,
    hash_key,
    new_key,
    read_key_file,
    role_allows,
)
from tastemaker.config import load_config
from tastemaker.errors import InvalidArgument, PermissionDenied, ResourceExhausted, Unauthenticated
from tastemaker.privacy import Pseudonymizer
from tastemaker.store.sqlite import SQLiteStore


class Clock:
    """A clock the test moves by hand."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def store(tmp_path):
    s = SQLiteStore(str(tmp_path / "keys.db"))
    yield s
    s.close()


def _meta(secret: str):
    return [("authorization", f"Bearer {secret}")]


def test_roles_are_ordered_admin_write_read():
    assert role_allows("admin", "write") and role_allows("admin", "read") and role_allows("write", "read")
    assert not role_allows("read", "write") and not role_allows("write", "admin")
    assert {METHOD_ROLES[m] for m in ("Recommend", "SimilarItems", "GetItem", "GetUserProfile")} == {"read"}
    assert {METHOD_ROLES[m] for m in ("WriteUserEvents", "StreamUserEvents", "UpsertItems")} == {"write"}
    assert {METHOD_ROLES[m] for m in ("DeleteUser", "DeleteItems")} == {"admin"}
    assert "Check" not in METHOD_ROLES and "Watch" not in METHOD_ROLES  # health stays open


def test_new_key_stores_only_the_hash(store):
    secret, record = new_key("write", "ingest")
    store.create_api_key(record)
    assert secret.startswith("tm_") and len(secret) > 40
    assert record.key_hash == hash_key(secret) and secret not in repr(record)
    listed = store.list_api_keys()
    assert [(r.key_id, r.role, r.name) for r in listed] == [(record.key_id, "write", "ingest")]
    assert all(secret not in str(v) for v in vars(listed[0]).values())
    with pytest.raises(InvalidArgument, match="unknown role"):
        new_key("root", "x")


def test_bearer_metadata_parsing():
    assert bearer_key([("authorization", "Bearer tm_abc")]) == "tm_abc"
    assert bearer_key([("x", "y"), ("Authorization", "bearer  tm_abc ")]) == "tm_abc"
    for metadata in ([], None, [("authorization", "tm_abc")], [("authorization", "Basic dXNlcg==")], [("authorization", "Bearer ")]):
        with pytest.raises(Unauthenticated):
            bearer_key(metadata)


def test_authenticate_authorize_and_revoke(store):
    clock = Clock()
    auth = Authenticator(AuthSettings(cache_ttl_s=5.0), store.find_api_key, clock)
    read_secret, read_record = new_key("read", "dashboard")
    admin_secret, admin_record = new_key("admin", "ops")
    store.create_api_key(read_record)
    store.create_api_key(admin_record)

    assert asyncio.run(auth.check("Recommend", _meta(read_secret))).key_id == read_record.key_id
    assert asyncio.run(auth.check("DeleteUser", _meta(admin_secret))).role == "admin"
    with pytest.raises(PermissionDenied, match="role 'admin'"):  # an RPC missing from the table: admin only
        asyncio.run(auth.check("SomeNewRpc", _meta(read_secret)))
    with pytest.raises(PermissionDenied, match="DeleteUser needs a key with role 'admin'"):
        asyncio.run(auth.check("DeleteUser", _meta(read_secret)))
    with pytest.raises(PermissionDenied, match="role 'write'"):
        asyncio.run(auth.check("WriteUserEvents", _meta(read_secret)))
    with pytest.raises(Unauthenticated, match="missing API key"):
        asyncio.run(auth.check("Recommend", []))
    with pytest.raises(Unauthenticated, match="unknown API key"):
        asyncio.run(auth.check("Recommend", _meta("tm_not-a-key")))

    # Revocation takes effect once the cached lookup expires: within cache_ttl_s.
    assert store.revoke_api_key(read_record.key_id)
    assert asyncio.run(auth.check("Recommend", _meta(read_secret))) is not None  # still cached
    clock.now += 5.01
    with pytest.raises(Unauthenticated, match="revoked"):
        asyncio.run(auth.check("Recommend", _meta(read_secret)))


def test_a_key_created_after_a_failed_lookup_works_at_once(store):
    auth = Authenticator(AuthSettings(), store.find_api_key, Clock())
    secret, record = new_key("read", "late")
    with pytest.raises(Unauthenticated):
        asyncio.run(auth.check("GetItem", _meta(secret)))
    store.create_api_key(record)
    assert asyncio.run(auth.check("GetItem", _meta(secret))) is not None  # unknown keys are not cached


def test_auth_disabled_admits_everything(store):
    auth = Authenticator(AuthSettings(enabled=False), store.find_api_key)
    assert asyncio.run(auth.check("DeleteUser", [])) is None


def test_token_bucket_refills_at_its_rate():
    clock = Clock()
    bucket = TokenBucket(rate_per_s=10.0, capacity=2.0, clock=clock)
    assert bucket.take() == 0.0 and bucket.take() == 0.0
    assert bucket.take() == pytest.approx(0.1)
    clock.now += 0.05
    assert bucket.take() == pytest.approx(0.05)
    clock.now += 0.05
    assert bucket.take() == 0.0


def test_rate_limit_per_key_names_the_retry_delay(store):
    clock = Clock()
    auth = Authenticator(
        AuthSettings(rate_per_s={"read": 2.0, "write": 0.0, "admin": 0.0}, burst_s=1.0), store.find_api_key, clock
    )
    one, one_record = new_key("read", "one")
    two, two_record = new_key("read", "two")
    writer, writer_record = new_key("write", "w")
    for record in (one_record, two_record, writer_record):
        store.create_api_key(record)
    for _ in range(2):
        asyncio.run(auth.check("Recommend", _meta(one)))
    with pytest.raises(ResourceExhausted, match=r"retry in 0\.500 s") as info:
        asyncio.run(auth.check("Recommend", _meta(one)))
    assert one_record.key_id in str(info.value) and one not in str(info.value)
    asyncio.run(auth.check("Recommend", _meta(two)))  # buckets are per key
    for _ in range(50):
        asyncio.run(auth.check("Recommend", _meta(writer)))  # rate 0 = unlimited for the role
    clock.now += 0.5
    asyncio.run(auth.check("Recommend", _meta(one)))


def test_demo_admin_key_file_is_private_and_created_once(store, tmp_path):
    secret = ensure_admin_key(store, tmp_path)
    path = tmp_path / ADMIN_KEY_FILE
    assert secret and read_key_file(path) == secret
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    [record] = store.list_api_keys()
    assert record.role == "admin" and record.key_hash == hash_key(secret)
    assert ensure_admin_key(store, tmp_path) is None  # the store has a key: nothing new
    assert read_key_file(path) == secret


def test_pseudonyms_are_keyed_deterministic_and_refuse_short_keys():
    one = Pseudonymizer("k" * 32)
    other = Pseudonymizer("j" * 32)
    assert one.pseudonym("alice") == one.pseudonym("alice") != one.pseudonym("bob")
    assert one.pseudonym("alice") != other.pseudonym("alice")
    assert one.pseudonym("alice").startswith("p_") and "alice" not in one.pseudonym("alice")
    assert "k" * 32 not in repr(one)
    with pytest.raises(ValueError, match="at least 32"):
        Pseudonymizer("short")


def test_config_sections_and_secrets_never_in_errors():
    config = load_config(environ={"TASTEMAKER_API_KEY": "tm_from_env", "TASTEMAKER_USER_ID_KEY": "u" * 40})
    assert config.auth.enabled and config.auth.api_key.get_secret_value() == "tm_from_env"
    assert "tm_from_env" not in repr(config) and "u" * 40 not in repr(config)
    secret = "too-short-secret-value"
    with pytest.raises(InvalidArgument) as info:
        load_config(environ={"TASTEMAKER_USER_ID_KEY": secret})
    assert "at least 32" in str(info.value) and secret not in str(info.value)
    assert info.value.__cause__ is None  # the pydantic error (which quotes the input) is not chained


class _Context:
    """The part of Serve's gRPC context the guard reads."""

    def __init__(self, metadata):
        self.metadata = metadata

    def invocation_metadata(self):
        return self.metadata


def _guard(store, user_id_key=None, **auth):
    from tastemaker.config import AuthConfig, GatewayConfig, PrivacyConfig
    from tastemaker.gateway.guard import EdgeGuard

    return EdgeGuard(AuthConfig(**auth), PrivacyConfig(user_id_key=user_id_key), store, GatewayConfig())


def test_guard_pseudonymises_requests_and_restores_the_callers_ids(store):
    from tastemaker.v1 import recommender_service_pb2 as pb

    secret, record = new_key("write", "w")
    store.create_api_key(record)
    guard = _guard(store, user_id_key="g" * 32)
    context = _Context(_meta(secret))
    pseudonym = Pseudonymizer("g" * 32).pseudonym("alice")

    request, restore = asyncio.run(guard.admit("GetUserProfile", pb.GetUserProfileRequest(user_id="alice"), context))
    assert request.user_id == pseudonym
    assert restore(pb.GetUserProfileResponse(user_id=pseudonym)).user_id == "alice"

    events = [
        pb.UserEvent(event_id="1", user_id="alice"),
        pb.UserEvent(event_id="2", user_id=""),  # invalid ids stay as sent: validation names them
        pb.UserEvent(event_id="3", user_id="x" * 500),
    ]
    request, restore = asyncio.run(guard.admit("WriteUserEvents", pb.WriteUserEventsRequest(events=events), context))
    assert [e.user_id for e in request.events] == [pseudonym, "", "x" * 500]
    response = pb.WriteUserEventsResponse(acks=[pb.EventAck(event_id=e.event_id, user_id=e.user_id) for e in request.events])
    assert [a.user_id for a in restore(response).acks] == ["alice", "", "x" * 500]

    # Streams: the key is checked on the first message, ids masked per message, acks restored in order.
    async def messages():
        yield pb.StreamUserEventsRequest(events=[pb.UserEvent(event_id="s1", user_id="alice")])
        yield pb.StreamUserEventsRequest(events=[pb.UserEvent(event_id="s2", user_id="bob")])

    async def run_stream(metadata):
        stream, restore = guard.admit_stream(messages(), _Context(metadata))
        out = []
        async for message in stream:
            ack = pb.EventAck(event_id=message.events[0].event_id, user_id=message.events[0].user_id)
            out.append((message.events[0].user_id, restore(pb.StreamUserEventsResponse(acks=[ack])).acks[0].user_id))
        return out

    masked = asyncio.run(run_stream(_meta(secret)))
    assert masked == [(pseudonym, "alice"), (Pseudonymizer("g" * 32).pseudonym("bob"), "bob")]
    with pytest.raises(Unauthenticated):
        asyncio.run(run_stream([]))


def test_guard_without_privacy_leaves_requests_alone_and_checks_roles(store):
    from tastemaker.v1 import recommender_service_pb2 as pb

    secret, record = new_key("read", "r")
    store.create_api_key(record)
    guard = _guard(store)
    request = pb.RecommendRequest(user_id="alice")
    admitted, restore = asyncio.run(guard.admit("Recommend", request, _Context(_meta(secret))))
    assert admitted.user_id == "alice" and restore("unchanged") == "unchanged"
    with pytest.raises(PermissionDenied):
        asyncio.run(guard.admit("DeleteUser", pb.DeleteUserRequest(user_id="alice"), _Context(_meta(secret))))
    with pytest.raises(Unauthenticated):
        asyncio.run(guard.admit("Recommend", request, None))  # no context, no metadata


def test_the_store_remembers_the_pseudonym_setting(store):
    from tastemaker.domain import EventType, UserEvent
    from tastemaker.errors import FailedPrecondition
    from tastemaker.privacy import check_store_key, key_check

    one, other = Pseudonymizer("o" * 32), Pseudonymizer("t" * 32)
    check_store_key(store, None)  # first start: recorded
    check_store_key(store, one)  # no event yet: the setting may still change
    assert "o" * 32 not in key_check(one) and key_check(one) != key_check(other)
    store.append_events(0, [UserEvent(event_id="e", user_id=one.pseudonym("u"), event_type=EventType.VIEW, item_id="i", event_time=1.0)])
    check_store_key(store, one)
    with pytest.raises(FailedPrecondition, match="another privacy.user_id_key"):
        check_store_key(store, other)
    with pytest.raises(FailedPrecondition, match="none is configured now"):
        check_store_key(store, None)

"""API keys and roles through the public gRPC API of the real Serve application: missing, unknown
and revoked keys, each role's reach, per-key rate limits, `tastemaker keys` against the store,
and health/reflection open to everyone."""

from __future__ import annotations

import json
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tastemaker.cli import main as cli_main
from tastemaker.v1 import recommender_service_pb2 as pb
from tastemaker.v1 import recommender_service_pb2_grpc as pb_grpc
from tests.integration.conftest import MOVIE_ITEMS, create_key, make_config, start

pytestmark = pytest.mark.integration

READ_RATE_PER_S = 4.0
CACHE_TTL_S = 0.5


@pytest.fixture(scope="module")
def service(ray_session, tmp_path_factory):
    config = make_config(tmp_path_factory.mktemp("auth-data"))
    # A low read rate so the test can exceed it; a short cache so revocation shows quickly.
    config.auth = config.auth.model_copy(
        update={"read_rate_per_s": READ_RATE_PER_S, "burst_s": 1.0, "cache_ttl_s": CACHE_TTL_S}
    )
    running = start(config)
    running.client.upsert_items(MOVIE_ITEMS)
    yield running
    running.stop()


def _calls(stub):
    """One call of every RPC, by name, with a valid request."""
    event = pb.UserEvent(event_id="a1", user_id="auth-user", event_type=pb.EVENT_TYPE_CLICK, item_id="m1")
    return {
        "Recommend": lambda **kw: stub.Recommend(pb.RecommendRequest(user_id="auth-user", page_size=3), timeout=60, **kw),
        "SimilarItems": lambda **kw: stub.SimilarItems(pb.SimilarItemsRequest(item_id="m1", page_size=3), timeout=60, **kw),
        "GetItem": lambda **kw: stub.GetItem(pb.GetItemRequest(item_id="m1"), timeout=60, **kw),
        "GetUserProfile": lambda **kw: stub.GetUserProfile(pb.GetUserProfileRequest(user_id="auth-user"), timeout=60, **kw),
        "WriteUserEvents": lambda **kw: stub.WriteUserEvents(pb.WriteUserEventsRequest(events=[event]), timeout=60, **kw),
        "StreamUserEvents": lambda **kw: list(
            stub.StreamUserEvents(iter([pb.StreamUserEventsRequest(events=[event])]), timeout=60, **kw)
        ),
        "UpsertItems": lambda **kw: stub.UpsertItems(pb.UpsertItemsRequest(items=[MOVIE_ITEMS[5]]), timeout=60, **kw),
        "DeleteUser": lambda **kw: stub.DeleteUser(pb.DeleteUserRequest(user_id="nobody-to-delete"), timeout=60, **kw),
        "DeleteItems": lambda **kw: stub.DeleteItems(pb.DeleteItemsRequest(item_ids=["no-such-item"]), timeout=60, **kw),
    }


READ = ["Recommend", "SimilarItems", "GetItem", "GetUserProfile"]
WRITE = ["WriteUserEvents", "StreamUserEvents", "UpsertItems"]
ADMIN = ["DeleteUser", "DeleteItems"]


def _status(call, **kw) -> tuple[grpc.StatusCode, str]:
    try:
        call(**kw)
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


def _bearer(key: str):
    return [("authorization", f"Bearer {key}")]


@pytest.fixture(scope="module")
def stub(service):
    channel = grpc.insecure_channel(service.target)
    yield pb_grpc.RecommenderServiceStub(channel)
    channel.close()


def _clean(message: str) -> bool:
    return "Traceback" not in message and "/" not in message and "Error" not in message


def test_every_rpc_needs_a_key(stub):
    for name, call in _calls(stub).items():
        for metadata in ([], _bearer("tm_not-a-real-key"), [("authorization", "Basic Zm9vOmJhcg==")]):
            code, message = _status(call, metadata=metadata)
            assert code == grpc.StatusCode.UNAUTHENTICATED, (name, metadata, code, message)
            assert message and _clean(message), (name, message)


def test_health_and_reflection_stay_open(service):
    with grpc.insecure_channel(service.target) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        replies = list(
            reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=30
            )
        )
        assert "tastemaker.v1.RecommenderService" in {s.name for s in replies[0].list_services_response.service}


@pytest.mark.parametrize(
    "role, allowed",
    [("read", READ), ("write", READ + WRITE), ("admin", READ + WRITE + ADMIN)],
)
def test_each_role_reaches_its_rpcs_and_no_others(service, stub, role, allowed):
    key = create_key(service.config, role, f"{role} test key")
    for name, call in _calls(stub).items():
        code, message = _status(call, metadata=_bearer(key))
        if name in allowed:
            assert code == grpc.StatusCode.OK, (role, name, code, message)
        else:
            assert code == grpc.StatusCode.PERMISSION_DENIED, (role, name, code, message)
            assert f"role {role!r}" in message and _clean(message)
        time.sleep(1.0 / READ_RATE_PER_S)  # stay under the read rate this test is not about


def test_keys_cli_create_list_revoke(service, stub, capsys):
    data_dir = service.config.data_dir
    assert cli_main(["keys", "create", "--role", "read", "--name", "cli key", "--data-dir", data_dir, "--json"]) == 0
    created = json.loads(capsys.readouterr().out)
    key, key_id = created["key"], created["key_id"]
    assert _status(_calls(stub)["GetItem"], metadata=_bearer(key))[0] == grpc.StatusCode.OK

    assert cli_main(["keys", "list", "--data-dir", data_dir, "--json"]) == 0
    listed = capsys.readouterr().out
    rows = {row["key_id"]: row for row in json.loads(listed)}
    assert rows[key_id]["role"] == "read" and rows[key_id]["name"] == "cli key" and rows[key_id]["revoked"] is None
    assert key not in listed and "hash" not in listed  # never the secret or its hash

    assert cli_main(["keys", "revoke", key_id, "--data-dir", data_dir]) == 0
    capsys.readouterr()
    # The gateway caches lookups for auth.cache_ttl_s: the key must stop working within it.
    deadline = time.monotonic() + CACHE_TTL_S + 10.0
    while True:
        code, message = _status(_calls(stub)["GetItem"], metadata=_bearer(key))
        if code == grpc.StatusCode.UNAUTHENTICATED:
            assert "revoked" in message
            break
        assert code == grpc.StatusCode.OK and time.monotonic() < deadline, (code, message)
        time.sleep(0.25)
    assert cli_main(["keys", "list", "--data-dir", data_dir, "--json"]) == 0
    assert {r["key_id"]: r for r in json.loads(capsys.readouterr().out)}[key_id]["revoked"]
    assert cli_main(["keys", "revoke", "no-such-id", "--data-dir", data_dir]) == 2


def test_a_key_over_its_rate_gets_resource_exhausted_with_the_delay(service, stub):
    key = create_key(service.config, "read", "rate test")
    other = create_key(service.config, "read", "rate test, another key")
    codes, messages = [], []
    for _ in range(int(READ_RATE_PER_S) * 3):  # a burst well past the 4-call bucket
        code, message = _status(_calls(stub)["GetItem"], metadata=_bearer(key))
        codes.append(code)
        messages.append(message)
    assert codes[0] == grpc.StatusCode.OK
    limited = [m for c, m in zip(codes, messages) if c == grpc.StatusCode.RESOURCE_EXHAUSTED]
    assert limited, codes
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert "retry in" in limited[0] and " s" in limited[0] and key not in limited[0]
    # Buckets are per key: another read key is not affected.
    assert _status(_calls(stub)["GetItem"], metadata=_bearer(other))[0] == grpc.StatusCode.OK

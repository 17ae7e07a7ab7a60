"""Property-based fuzzing of every RPC against the running application (hypothesis): every field of
every request, and raw bytes that are mostly not a valid message at all. Whatever is sent, the
answer is a status from the error table (never INTERNAL or UNKNOWN) whose message carries no
traceback, path, pid, address or class name; and afterwards the service is SERVING and answers
correctly. Derandomised (the same examples every run) and bounded (a fixed number of examples per
RPC), so the file runs in about two minutes on 2 cores."""

from __future__ import annotations

import re

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tastemaker.v1 import recommender_service_pb2 as pb
from tastemaker.v1 import recommender_service_pb2_grpc as pb_grpc
from tests.integration.conftest import MOVIE_ITEMS, make_config, start

pytestmark = pytest.mark.integration

SERVICE = "/tastemaker.v1.RecommenderService/"
#: Codes a client may see; INTERNAL and UNKNOWN mean an unmapped failure.
ALLOWED = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
#: Internals that must never reach a client.
LEAKS = ("Traceback", "File \"", "pid=", "ray::", "Error(", "Exception", " at 0x", ".py", "site-packages")
#: An absolute path (a '/' that starts a word, followed by a folder): "/work/x/y.py", not
#: "min_value/max_value". The fuzzed ids never contain '/', so such a match can only be a leak.
PATH = re.compile(r"(?<![\w.])/(?:[\w.-]+/)+")
FUZZ = settings(
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)

# -- strategies --------------------------------------------------------------------------------------
_chars = st.characters(blacklist_categories=("Cs",))  # protobuf strings are valid UTF-8
free_text = st.one_of(st.text(_chars, max_size=64), st.sampled_from(["a" * 4_096, "é" * 4_097, " " * 5]))
ids = st.one_of(
    st.sampled_from(["", " ", "m1", "m3", "u1", "x" * 128, "x" * 129]),
    st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="/"), max_size=140),
)
int32 = st.integers(-(2**31), 2**31 - 1)
int64 = st.integers(-(2**63), 2**63 - 1)
floats = st.floats(allow_nan=True, allow_infinity=True, width=32)
doubles = st.floats(allow_nan=True, allow_infinity=True)


@st.composite
def attribute_filters(draw):
    conditions = []
    for _ in range(draw(st.integers(0, 3))):
        condition = pb.AttributeCondition(
            attribute=draw(ids), any_of=draw(st.lists(ids, max_size=3)), exclude=draw(st.booleans())
        )
        if draw(st.booleans()):
            condition.min_value = draw(doubles)
        if draw(st.booleans()):
            condition.max_value = draw(doubles)
        conditions.append(condition)
    return pb.AttributeFilter(conditions=conditions)


@st.composite
def events(draw):
    event = pb.UserEvent(
        event_id=draw(ids),
        user_id=draw(st.sampled_from(["fz-1", "fz-2"])) if draw(st.booleans()) else draw(ids),
        event_type=draw(st.one_of(st.integers(0, 10), int32)),
        item_id=draw(st.one_of(st.sampled_from(["m1", "m2", "nope"]), ids)),
        value=draw(floats),
        text=draw(free_text),
        attribution_token=draw(st.text(_chars, max_size=20)),
    )
    if draw(st.booleans()):
        event.event_time.seconds = draw(st.one_of(int64, st.integers(0, 2_000_000_000)))
        event.event_time.nanos = draw(int32)
    return event


@st.composite
def items(draw):
    item = pb.Item(
        item_id=draw(ids),
        title=draw(free_text),
        description=draw(st.text(_chars, max_size=64)),
        tags=draw(st.lists(st.text(_chars, max_size=16), max_size=4)),
        attributes=draw(st.dictionaries(st.text(_chars, max_size=8), st.text(_chars, max_size=8), max_size=3)),
    )
    if draw(st.booleans()):
        item.vector.extend(draw(st.lists(floats, max_size=400)))
    return item


# -- the service -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def service(ray_session, tmp_path_factory):
    # Recommend's min_profile_version wait is shortened so fuzzed versions do not sleep for seconds.
    running = start(make_config(tmp_path_factory.mktemp("fuzz-data"), min_version_wait_s=0.05))
    running.client.upsert_items(MOVIE_ITEMS)
    running.client.write_events(
        [pb.UserEvent(event_id="a", user_id="kid", event_type=pb.EVENT_TYPE_RATING, item_id="m1", value=5.0)]
    )
    yield running
    running.stop()


@pytest.fixture(scope="module")
def metadata(service):
    key = getattr(service, "api_key", None)
    return (("authorization", f"Bearer {key}"),) if key else ()


@pytest.fixture(scope="module")
def channel(service):
    with grpc.insecure_channel(service.target) as channel:
        yield channel


@pytest.fixture(scope="module")
def stub(channel):
    return pb_grpc.RecommenderServiceStub(channel)


def check(call):
    """Run one call: OK, or an allowed status with a clean message."""
    try:
        return call()
    except grpc.RpcError as exc:
        code, message = exc.code(), exc.details() or ""
        assert code in ALLOWED, (code, message)
        assert len(message) < 1_500, message
        for leak in LEAKS:
            assert leak not in message, (leak, message)
        assert PATH.search(message) is None, message
        return None


# -- every RPC's fields --------------------------------------------------------------------------------
@settings(FUZZ, max_examples=300)
@given(
    user_id=ids, page_size=int32, query=free_text, diversity=floats, min_version=int64,
    include_seen=st.booleans(), filter=attribute_filters(),
)
def test_recommend(stub, metadata, user_id, page_size, query, diversity, min_version, include_seen, filter):
    request = pb.RecommendRequest(
        user_id=user_id, page_size=page_size, query=query, diversity=diversity,
        min_profile_version=min_version, include_seen=include_seen, filter=filter,
    )
    reply = check(lambda: stub.Recommend(request, timeout=60, metadata=metadata))
    if reply is not None:
        assert len(reply.items) <= (page_size or 10)


@settings(FUZZ, max_examples=150)
@given(item_id=st.one_of(st.sampled_from(["m1", "m4"]), ids), page_size=int32, filter=attribute_filters())
def test_similar_items(stub, metadata, item_id, page_size, filter):
    request = pb.SimilarItemsRequest(item_id=item_id, page_size=page_size, filter=filter)
    check(lambda: stub.SimilarItems(request, timeout=60, metadata=metadata))


@settings(FUZZ, max_examples=100)
@given(item_id=ids, user_id=ids)
def test_reads(stub, metadata, item_id, user_id):
    check(lambda: stub.GetItem(pb.GetItemRequest(item_id=item_id), timeout=60, metadata=metadata))
    check(lambda: stub.GetUserProfile(pb.GetUserProfileRequest(user_id=user_id), timeout=60, metadata=metadata))


@settings(FUZZ, max_examples=150)
@given(batch=st.lists(events(), max_size=6))
def test_write_user_events(stub, metadata, batch):
    reply = check(lambda: stub.WriteUserEvents(pb.WriteUserEventsRequest(events=batch), timeout=60, metadata=metadata))
    if reply is not None:
        assert len(reply.acks) == len(batch)
        for ack in reply.acks:
            assert ack.status != pb.EVENT_STATUS_UNSPECIFIED
            assert (ack.status == pb.EVENT_STATUS_REJECTED) == bool(ack.reason)


@settings(FUZZ, max_examples=50)
@given(messages=st.lists(st.lists(events(), max_size=4), min_size=1, max_size=4))
def test_stream_user_events(stub, metadata, messages):
    requests = [pb.StreamUserEventsRequest(events=m) for m in messages]

    def run():
        return list(stub.StreamUserEvents(iter(requests), timeout=60, metadata=metadata))

    replies = check(run)
    if replies is not None:
        assert [len(r.acks) for r in replies] == [len(m) for m in messages]


@settings(FUZZ, max_examples=60)
@given(batch=st.lists(items(), max_size=3), vector_model=st.text(_chars, max_size=20))
def test_upsert_items(stub, metadata, batch, vector_model):
    for item in batch:  # the catalog the other checks rely on stays as it is
        if item.item_id in {i.item_id for i in MOVIE_ITEMS}:
            item.item_id = "fz-" + item.item_id
    request = pb.UpsertItemsRequest(items=batch, vector_model=vector_model)
    check(lambda: stub.UpsertItems(request, timeout=60, metadata=metadata))


@settings(FUZZ, max_examples=60)
@given(item_ids=st.lists(ids, max_size=4), user_id=ids)
def test_deletes(stub, metadata, item_ids, user_id):
    keep = {i.item_id for i in MOVIE_ITEMS} | {"kid"}
    item_ids = [i for i in item_ids if i not in keep]
    if user_id in keep:
        user_id = "fz-" + user_id
    check(lambda: stub.DeleteItems(pb.DeleteItemsRequest(item_ids=item_ids), timeout=60, metadata=metadata))
    check(lambda: stub.DeleteUser(pb.DeleteUserRequest(user_id=user_id), timeout=60, metadata=metadata))


# -- raw bytes -----------------------------------------------------------------------------------------
UNARY = ["UpsertItems", "DeleteItems", "GetItem", "WriteUserEvents", "Recommend", "SimilarItems", "GetUserProfile", "DeleteUser"]


@settings(FUZZ, max_examples=400)
@given(method=st.sampled_from(UNARY + ["health"]), raw=st.binary(max_size=200))
def test_raw_bytes_unary(channel, metadata, method, raw):
    if method in ("DeleteItems", "DeleteUser"):
        # Random bytes that happen to decode may name any id; never let them erase the fixture's data.
        decoded = None
        try:
            decoded = (pb.DeleteItemsRequest if method == "DeleteItems" else pb.DeleteUserRequest).FromString(raw)
        except Exception:  # noqa: BLE001 - undecodable: exactly what this test sends
            pass
        if decoded is not None and ({i.item_id for i in MOVIE_ITEMS} | {"kid"}) & set(
            getattr(decoded, "item_ids", []) or [getattr(decoded, "user_id", "")]
        ):
            return
    path = "/grpc.health.v1.Health/Check" if method == "health" else SERVICE + method
    check(lambda: channel.unary_unary(path)(raw, timeout=60, metadata=metadata))


@settings(FUZZ, max_examples=50)
@given(messages=st.lists(st.binary(max_size=120), min_size=1, max_size=4))
def test_raw_bytes_stream(channel, metadata, messages):
    check(lambda: list(channel.stream_stream(SERVICE + "StreamUserEvents")(iter(messages), timeout=60, metadata=metadata)))


# -- afterwards ----------------------------------------------------------------------------------------
def test_service_serving_and_correct_afterwards(service, channel, stub, metadata):
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=60)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    for item in MOVIE_ITEMS:  # the catalog is intact
        assert stub.GetItem(pb.GetItemRequest(item_id=item.item_id), timeout=60, metadata=metadata).item.title == item.title
    # Fuzzed events taught the service transitions and popularity among m1..m3, so ranks may have
    # moved; what must hold is the behaviour: the one-event user's profile, exclude-seen, a full
    # page; a new event is acknowledged, applied and read back.
    reply = stub.Recommend(pb.RecommendRequest(user_id="kid", page_size=3), timeout=60, metadata=metadata)
    assert reply.profile_version == 1
    assert len(reply.items) == 3 and "m1" not in {i.item_id for i in reply.items}
    event = pb.UserEvent(event_id="after", user_id="after-fuzz", event_type=pb.EVENT_TYPE_PURCHASE, item_id="m5")
    (ack,) = stub.WriteUserEvents(pb.WriteUserEventsRequest(events=[event]), timeout=60, metadata=metadata).acks
    assert (ack.status, ack.profile_version) == (pb.EVENT_STATUS_ACCEPTED, 1)
    reply = stub.Recommend(
        pb.RecommendRequest(user_id="after-fuzz", page_size=3, min_profile_version=1), timeout=60, metadata=metadata
    )
    assert reply.profile_version == 1 and len(reply.items) == 3 and "m5" not in {i.item_id for i in reply.items}
    profile = stub.GetUserProfile(pb.GetUserProfileRequest(user_id="after-fuzz"), timeout=60, metadata=metadata)
    assert [(c.event_type, c.count) for c in profile.event_counts] == [(pb.EVENT_TYPE_PURCHASE, 1)]

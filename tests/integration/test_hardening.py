"""One error model on every path, through the real gRPC API of a running application: errors raised
in another deployment reach the client as their own short status, malformed bytes are
INVALID_ARGUMENT, a failing stream message ends the stream with its status, invalid timestamps are
rejected, past capacity the service refuses at once, and a caller that gives up has its queued
work dropped."""

from __future__ import annotations

import re
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tastemaker.v1 import recommender_service_pb2 as pb
from tests.integration.conftest import MOVIE_ITEMS, make_config, start

pytestmark = pytest.mark.integration

SERVICE = "/tastemaker.v1.RecommenderService/"
UNARY_RPCS = [
    "UpsertItems", "DeleteItems", "GetItem", "WriteUserEvents", "Recommend", "SimilarItems", "GetUserProfile", "DeleteUser",
]
#: Admission bound of this module's service: small, so that a modest burst overloads it.
IN_FLIGHT = 2


def assert_clean(message: str) -> None:
    """A message fit for a client: short, no traceback, path, pid, address or class name."""
    assert message and len(message) < 1_000, message
    for leak in ("Traceback", "File ", "pid=", "/", "Error(", "Exception", "ray::", "0x"):
        assert leak not in message, (leak, message)
    assert not re.search(r"\b\d{1,3}(\.\d{1,3}){3}\b", message), message


@pytest.fixture(scope="module")
def service(ray_session, tmp_path_factory):
    config = make_config(tmp_path_factory.mktemp("hardening-data"))
    config.gateway.max_in_flight_per_rpc = IN_FLIGHT
    running = start(config)
    running.client.upsert_items(MOVIE_ITEMS)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def metadata(service):
    key = getattr(service, "api_key", None)  # auth on: the admin key the conftest created
    return (("authorization", f"Bearer {key}"),) if key else ()


@pytest.fixture(scope="module")
def channel(service):
    with grpc.insecure_channel(service.target) as channel:
        yield channel


def _error(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details()


# -- errors raised inside another deployment ---------------------------------------------------------


def test_not_found_raised_in_retrieval_is_a_short_clean_status(service):
    code, message = _error(lambda: service.client.similar_items("no-such-item-xyz", page_size=5))
    assert code == grpc.StatusCode.NOT_FOUND
    assert_clean(message)
    assert "no-such-item-xyz" in message


def test_deleted_item_is_a_short_clean_status(service):
    service.client.upsert_items([pb.Item(item_id="gone", title="Short-lived item", description="Genres: Drama.")])
    service.client.delete_items(["gone"])
    deadline = time.monotonic() + 30
    while True:  # retrieval replicas follow the change feed: poll until the deletion is seen
        try:
            service.client.similar_items("gone", page_size=5)
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.NOT_FOUND
            assert_clean(exc.details())
            break
        assert time.monotonic() < deadline, "the deletion never reached retrieval"
        time.sleep(0.1)


# -- malformed bytes ---------------------------------------------------------------------------------


@pytest.mark.parametrize("rpc", UNARY_RPCS)
def test_malformed_bytes_are_invalid_argument_on_every_unary_rpc(channel, metadata, rpc):
    raw = channel.unary_unary(SERVICE + rpc)  # no serializers: the bytes go out as they are
    code, message = _error(lambda: raw(b"\xff\xff\xff\xff", timeout=60, metadata=metadata))
    assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, message)
    assert "not a valid tastemaker.v1." in message
    assert_clean(message.replace("tastemaker.v1.", ""))


def test_malformed_health_check_is_invalid_argument(channel):
    raw = channel.unary_unary("/grpc.health.v1.Health/Check")
    code, message = _error(lambda: raw(b"\x0a\xff", timeout=60))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=60).status == (
        health_pb2.HealthCheckResponse.SERVING
    )


# -- streams -----------------------------------------------------------------------------------------


def _view(user: str, n: int) -> pb.UserEvent:
    return pb.UserEvent(event_id=f"e{n}", user_id=user, event_type=pb.EVENT_TYPE_VIEW, item_id="m1")


def _stream(channel, metadata, messages: list[bytes]) -> tuple[list[pb.StreamUserEventsResponse], grpc.RpcError | None]:
    call = channel.stream_stream(SERVICE + "StreamUserEvents")(iter(messages), timeout=60, metadata=metadata)
    responses = []
    try:
        for raw in call:
            responses.append(pb.StreamUserEventsResponse.FromString(raw))
    except grpc.RpcError as exc:
        return responses, exc
    return responses, None


def _events_of(service, user: str) -> int:
    profile = service.client.get_user_profile(user)
    return sum(c.count for c in profile.event_counts)


def test_stream_message_over_the_cap_ends_the_stream_with_its_status(service, channel, metadata):
    user = "stream-over-cap"
    too_many = [_view(user, 100 + i) for i in range(service.config.gateway.max_events_per_request + 1)]
    messages = [
        pb.StreamUserEventsRequest(events=[_view(user, 1)]).SerializeToString(),
        pb.StreamUserEventsRequest(events=too_many).SerializeToString(),
        pb.StreamUserEventsRequest(events=[_view(user, 2)]).SerializeToString(),
    ]
    responses, error = _stream(channel, metadata, messages)
    assert [a.status for r in responses for a in r.acks] == [pb.EVENT_STATUS_ACCEPTED]
    assert error is not None, "the stream ended with OK"
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "5001 events" in error.details()
    assert_clean(error.details())
    # Nothing after the failed message was applied either.
    assert _events_of(service, user) == 1


def test_malformed_stream_message_ends_the_stream_with_invalid_argument(service, channel, metadata):
    user = "stream-malformed"
    messages = [
        pb.StreamUserEventsRequest(events=[_view(user, 1)]).SerializeToString(),
        b"\x0a\x05\xff\xff\xff\xff\xff",
        pb.StreamUserEventsRequest(events=[_view(user, 2)]).SerializeToString(),
    ]
    responses, error = _stream(channel, metadata, messages)
    assert [a.status for r in responses for a in r.acks] == [pb.EVENT_STATUS_ACCEPTED]
    assert error is not None and error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
    assert "stream message 1" in error.details()
    assert _events_of(service, user) == 1


def test_a_good_stream_still_ends_with_ok(channel, metadata):
    user = "stream-good"
    messages = [pb.StreamUserEventsRequest(events=[_view(user, n)]).SerializeToString() for n in range(3)]
    responses, error = _stream(channel, metadata, messages)
    assert error is None
    assert [a.profile_version for r in responses for a in r.acks] == [1, 2, 3]


# -- timestamps --------------------------------------------------------------------------------------


def test_invalid_timestamps_are_rejected_with_a_reason(service):
    cases = [(-(2**63), 0), (-(10**12), 0), (-86_400, 0), (1_700_000_000, -1), (1_700_000_000, 2 * 10**9)]
    events = []
    for n, (seconds, nanos) in enumerate(cases):
        event = _view("bad-times", n)
        event.event_time.seconds = seconds
        event.event_time.nanos = nanos
        events.append(event)
    good = _view("bad-times", 99)
    good.event_time.seconds = 1_700_000_000
    acks = service.client.write_events(events + [good])
    assert [a.status for a in acks] == [pb.EVENT_STATUS_REJECTED] * len(cases) + [pb.EVENT_STATUS_ACCEPTED]
    for ack in acks[:-1]:
        assert ack.reason and ("1970" in ack.reason or "nanos" in ack.reason), ack.reason


# -- overload and deadlines --------------------------------------------------------------------------


def test_past_capacity_the_service_refuses_at_once_and_recovers(service):
    clients = 12
    results: list[tuple[grpc.StatusCode, float]] = []
    lock = threading.Lock()
    start_line = threading.Barrier(clients)

    def one(n: int) -> None:
        with service.new_client() if hasattr(service, "new_client") else _plain_client(service) as client:
            try:  # channel connected before the burst
                client.recommend(f"warm-{n}", page_size=5)
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            start_line.wait()
            for _ in range(5):
                started = time.monotonic()
                try:
                    client.recommend(f"user-{n}", page_size=5, query="animated film for kids")
                    code = grpc.StatusCode.OK
                except grpc.RpcError as exc:
                    code = exc.code()
                    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                        assert_clean(exc.details())
                with lock:
                    results.append((code, time.monotonic() - started))

    threads = [threading.Thread(target=one, args=(n,)) for n in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    codes = [code for code, _ in results]
    assert len(results) == clients * 5
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, set(codes)
    refused = [seconds for code, seconds in results if code == grpc.StatusCode.RESOURCE_EXHAUSTED]
    admitted = [seconds for code, seconds in results if code == grpc.StatusCode.OK]
    assert refused, "12 concurrent clients against 2 slots were never refused"
    assert admitted
    # Refused at once: a refusal costs a round trip to the gateway, not a wait in a queue.
    assert sorted(refused)[len(refused) // 2] < sorted(admitted)[len(admitted) // 2]
    # And once the burst is over, the service answers again.
    assert len(service.client.recommend("after-burst", page_size=5).items) == 5


def _plain_client(service):
    from tastemaker.client import TastemakerClient

    return TastemakerClient(service.target, timeout_s=120)


def test_work_of_a_caller_that_gave_up_is_dropped(service, metadata):
    """A WriteUserEvents whose deadline passes while its review texts are being encoded is
    dropped: its events are never written, even after the encoder would have finished them."""
    from tastemaker.client import TastemakerClient

    def reviews(user: str) -> list[pb.UserEvent]:
        return [
            pb.UserEvent(
                event_id=f"rv{n}", user_id=user, event_type=pb.EVENT_TYPE_REVIEW, item_id="m1",
                text=f"review number {n}: a long and thoughtful text about the film, its score and its actors " * 4,
            )
            for n in range(1_500)
        ]

    # How long the whole batch takes when the caller waits (another user, same work).
    started = time.monotonic()
    acks = service.client.write_events(reviews("patient"), batch_size=5_000)
    full_s = time.monotonic() - started
    assert all(a.status == pb.EVENT_STATUS_ACCEPTED for a in acks)
    with TastemakerClient(service.target, timeout_s=full_s / 10, api_key=getattr(service, "api_key", None)) as hasty:
        code, _ = _error(lambda: hasty.write_events(reviews("hasty"), batch_size=5_000))
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    # Bounded wait: well past the time the whole batch took; the events must never appear.
    deadline = time.monotonic() + 2 * full_s
    while time.monotonic() < deadline:
        assert _events_of(service, "hasty") == 0
        time.sleep(0.2)

"""The public gRPC API end to end, on the real Serve application, the real bundled encoder and a
MovieLens subsample loaded through the API."""

from __future__ import annotations

import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tastemaker.client import genre_filter
from tastemaker.datasets.movielens import load_movielens, subsample
from tastemaker.demo import load_dataset
from tastemaker.v1 import recommender_service_pb2 as pb
from tests.integration.conftest import make_config, start

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def movielens():
    data = subsample(load_movielens(), max_items=900, max_users=120)
    return data


@pytest.fixture(scope="module")
def service(ray_session, tmp_path_factory, movielens):
    # Trending off: MovieLens' "recent" activity is a handful of binge sessions, and the cold-start
    # test checks the popularity order exactly (trending has its own unit tests).
    running = start(make_config(tmp_path_factory.mktemp("api-data"), retrieval={"trending_weight": 0.0}))
    load_dataset(running.client, movielens, show_progress=False)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def genres(movielens):
    return {item.item_id: item.attributes.get("genres", "") for item in movielens.items}


def _ids_with(movielens, genre: str, exclude: str = "") -> list[str]:
    return [
        i.item_id
        for i in movielens.items
        if genre in i.attributes.get("genres", "").split("|")
        and (not exclude or exclude not in i.attributes.get("genres", "").split("|"))
    ]


def _rating(user: str, item_id: str, value: float, n: int) -> pb.UserEvent:
    return pb.UserEvent(event_id=f"r{n}", user_id=user, event_type=pb.EVENT_TYPE_RATING, item_id=item_id, value=value)


def _status(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details()


def test_health_is_serving_and_reflection_lists_the_service(service):
    channel = grpc.insecure_channel(service.target)
    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    replies = list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    names = {s.name for s in replies[0].list_services_response.service}
    assert "tastemaker.v1.RecommenderService" in names
    assert "grpc.health.v1.Health" in names
    channel.close()


def test_catalog_upsert_get_delete(service):
    client = service.client
    item = pb.Item(item_id="test-item-1", title="A quiet film about lighthouses", tags=["sea"], attributes={"genres": "Drama"})
    assert client.upsert_items([item]) == 1
    got = client.get_item("test-item-1")
    assert (got.title, list(got.tags), dict(got.attributes)) == (item.title, ["sea"], {"genres": "Drama"})
    assert got.update_time.seconds > 0
    # Idempotent by id: upserting again replaces, it does not duplicate.
    client.upsert_items([pb.Item(item_id="test-item-1", title="A loud film about lighthouses")])
    assert client.get_item("test-item-1").title == "A loud film about lighthouses"
    reply = client.delete_items(["test-item-1", "never-existed"])
    assert reply.deleted_count == 1 and list(reply.missing_item_ids) == ["never-existed"]
    code, details = _status(lambda: client.get_item("test-item-1"))
    assert code == grpc.StatusCode.NOT_FOUND and "test-item-1" in details


def test_new_items_become_retrievable_within_the_refresh_bound(service):
    client = service.client
    client.upsert_items([pb.Item(item_id="fresh-1", title="Space station survival thriller", tags=["space"])])
    bound_s = 5.0  # refresh_interval_s is 0.1 in tests; this is a generous bound, asserted
    deadline = time.monotonic() + bound_s
    while True:
        try:
            similar = client.similar_items("fresh-1", page_size=3)
            break
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.NOT_FOUND
            assert time.monotonic() < deadline, f"new item not retrievable within {bound_s}s"
            time.sleep(0.05)
    assert len(similar.items) == 3 and all(i.item_id != "fresh-1" for i in similar.items)


def test_stream_acks_versions_dedupe_and_rejections(service, movielens):
    client = service.client
    item_ids = [i.item_id for i in movielens.items[:6]]
    events = [_rating("stream-user", item_ids[n % 6], 4.0, n) for n in range(12)]
    events.insert(5, _rating("stream-user", "no-such-item", 4.0, 999))  # rejected, stream goes on
    events.insert(8, _rating("stream-user", item_ids[0], 9.0, 998))  # out of range
    events.append(_rating("stream-user", item_ids[0], 4.0, 3))  # duplicate of r3
    acks = list(client.stream_events(events, max_batch=4, linger_s=0.001))
    assert [a.event_id for a in acks] == [e.event_id for e in events]
    by_id = {a.event_id: a for a in acks}
    assert by_id["r999"].status == pb.EVENT_STATUS_REJECTED and "no-such-item" in by_id["r999"].reason
    assert by_id["r998"].status == pb.EVENT_STATUS_REJECTED and "[0.5, 5]" in by_id["r998"].reason
    accepted = [a.profile_version for a in acks if a.status == pb.EVENT_STATUS_ACCEPTED]
    assert accepted == list(range(1, 13)), "versions must increase by one per applied event, in order"
    duplicate = acks[-1]
    assert duplicate.status == pb.EVENT_STATUS_DUPLICATE and duplicate.profile_version == 12
    assert client.get_user_profile("stream-user").profile_version == 12


def test_taste_follows_ratings_animation_vs_horror(service, movielens, genres):
    client = service.client
    kids = _ids_with(movielens, "Animation")[:8]
    horror = _ids_with(movielens, "Horror", exclude="Animation")[:8]
    assert len(kids) == 8 and len(horror) == 8
    client.write_events([_rating("likes-kids", i, 5.0, n) for n, i in enumerate(kids)])
    client.write_events([_rating("likes-horror", i, 5.0, n) for n, i in enumerate(horror)])

    def share(user: str, genre_names: set[str]) -> float:
        items = client.recommend(user, page_size=20).items
        assert len(items) == 20
        return sum(bool(genre_names & set(genres[i.item_id].split("|"))) for i in items) / len(items)

    kid_genres = {"Animation", "Children"}
    assert share("likes-kids", kid_genres) >= share("likes-horror", kid_genres) + 0.3
    assert share("likes-horror", {"Horror"}) >= share("likes-kids", {"Horror"}) + 0.3
    reply = client.recommend("likes-kids", page_size=10)
    # Already-rated items are excluded by default, and reasons are grounded in the user's history.
    assert not set(kids) & {i.item_id for i in reply.items}
    titles = {i.title for i in movielens.items if i.item_id in kids}
    profile_reasons = [i.reason for i in reply.items if pb.CANDIDATE_SOURCE_PROFILE in i.sources and "because you rated" in i.reason]
    assert profile_reasons and all(any(t in r for t in titles) for r in profile_reasons)


def test_query_steers_a_cold_user(service, genres):
    client = service.client
    reply = client.recommend("cold-query-user", page_size=10, query="animated movie for kids about toys")
    kid = sum(bool({"Animation", "Children"} & set(genres[i.item_id].split("|"))) for i in reply.items)
    assert kid >= 6, [i.title for i in reply.items]
    assert all(pb.CANDIDATE_SOURCE_QUERY in i.sources or pb.CANDIDATE_SOURCE_POPULAR in i.sources for i in reply.items)
    assert reply.profile_version == 0


def test_filter_is_applied_before_the_cut(service, genres):
    reply = service.client.recommend("cold-filter-user", page_size=25, filter=genre_filter("Horror"))
    assert len(reply.items) == 25
    assert all("Horror" in genres[i.item_id].split("|") for i in reply.items)


def test_cold_user_gets_popular_items_not_an_error(service, movielens):
    reply = service.client.recommend("never-seen-user", page_size=10)
    assert len(reply.items) == 10 and reply.profile_version == 0 and reply.attribution_token
    counts: dict[str, int] = {}
    for r in movielens.ratings:
        counts[r.item_id] = counts.get(r.item_id, 0) + 1
    tenth = sorted(counts.values(), reverse=True)[9]
    # Other tests in this module add a few events of their own, hence a small allowance.
    assert all(counts[i.item_id] >= tenth - 5 for i in reply.items), "cold users get the most popular items"
    assert all(pb.CANDIDATE_SOURCE_POPULAR in i.sources for i in reply.items)


def test_similar_items(service, movielens, genres):
    toy_story = next(i for i in movielens.items if i.title.startswith("Toy Story (1995)"))
    reply = service.client.similar_items(toy_story.item_id, page_size=10)
    assert len(reply.items) == 10 and toy_story.item_id not in {i.item_id for i in reply.items}
    assert sum("Animation" in genres[i.item_id] for i in reply.items) >= 5
    assert all(
        i.reason.startswith("similar to Toy Story (1995)") or i.reason.startswith("people who liked Toy Story (1995)")
        for i in reply.items
    )
    code, details = _status(lambda: service.client.similar_items("missing-item"))
    assert code == grpc.StatusCode.NOT_FOUND and "missing-item" in details


def test_read_your_writes_and_min_profile_version(service, movielens):
    client = service.client
    item = movielens.items[10].item_id
    ack = client.write_events([_rating("ryw-user", item, 5.0, 1)])[0]
    assert ack.status == pb.EVENT_STATUS_ACCEPTED and ack.profile_version == 1
    reply = client.recommend("ryw-user", min_profile_version=ack.profile_version, page_size=50)
    assert reply.profile_version >= 1 and item not in {i.item_id for i in reply.items}
    code, details = _status(lambda: client.recommend("ryw-user", min_profile_version=50))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "version 1" in details


def test_user_profile_and_delete_user(service, movielens):
    client = service.client
    kids = _ids_with(movielens, "Animation")[:4]
    client.write_events([_rating("to-delete", i, 5.0, n) for n, i in enumerate(kids)])
    profile = client.get_user_profile("to-delete")
    assert profile.profile_version == 4
    assert [(c.event_type, c.count) for c in profile.event_counts] == [(pb.EVENT_TYPE_RATING, 4)]
    assert len(profile.top_titles) == 5 and profile.last_event_time.seconds > 0
    assert client.delete_user("to-delete").deleted_event_count == 4
    after = client.get_user_profile("to-delete")
    assert after.profile_version == 0 and not after.event_counts and not after.top_titles
    # The same event ids are new again after erasure: nothing of the user is left to dedupe against.
    again = client.write_events([_rating("to-delete", kids[0], 5.0, 0)])[0]
    assert again.status == pb.EVENT_STATUS_ACCEPTED and again.profile_version == 1


@pytest.mark.parametrize(
    "call, fragment",
    [
        (lambda c: c.recommend(""), "user_id is empty"),
        (lambda c: c.recommend("u", page_size=1000), "page_size 1000 is over the cap of 100"),
        (lambda c: c.recommend("u", diversity=2.0), "diversity"),
        (lambda c: c.stub.UpsertItems(pb.UpsertItemsRequest()), "at least one item"),
        (lambda c: c.upsert_items([pb.Item(item_id="x")]), "has no text"),
        (lambda c: c.stub.WriteUserEvents(pb.WriteUserEventsRequest()), "at least one event"),
        (lambda c: c.recommend("u", filter=pb.AttributeFilter(conditions=[pb.AttributeCondition(attribute="genres")])), "any_of"),
    ],
)
def test_bad_input_is_invalid_argument_with_a_clear_message(service, call, fragment):
    code, details = _status(lambda: call(service.client))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert fragment in details


def test_bad_events_are_rejected_individually(service, movielens):
    item = movielens.items[0].item_id
    events = [
        pb.UserEvent(event_id="b1", user_id="bad-events", event_type=pb.EVENT_TYPE_RATING, item_id=item, value=0.1),
        pb.UserEvent(event_id="b2", user_id="bad-events", event_type=99, item_id=item),
        pb.UserEvent(event_id="b3", user_id="bad-events", event_type=pb.EVENT_TYPE_REVIEW, text="x" * 5000),
        pb.UserEvent(event_id="b4", user_id="bad-events", event_type=pb.EVENT_TYPE_SEARCH, text="funny space movies"),
        pb.UserEvent(event_id="b5", user_id="bad-events", event_type=pb.EVENT_TYPE_REVIEW, item_id=item, value=5, text="Loved every minute."),
    ]
    acks = service.client.write_events(events)
    statuses = [a.status for a in acks]
    assert statuses == [pb.EVENT_STATUS_REJECTED] * 3 + [pb.EVENT_STATUS_ACCEPTED] * 2
    assert "out of range" in acks[0].reason
    assert "EVENT_TYPE_RATING" in acks[1].reason
    assert "at most 4096" in acks[2].reason
    assert acks[4].profile_version == 2


def test_collaborative_and_sequential_sources_from_the_event_log(service, movielens):
    client = service.client
    toy_story = next(i for i in movielens.items if i.title.startswith("Toy Story (1995)"))
    ack = client.write_events([_rating("seq-user", toy_story.item_id, 5.0, 1)])[0]
    reply = client.recommend("seq-user", page_size=20, min_profile_version=ack.profile_version)
    by_source = {
        source: [i for i in reply.items if source in i.sources]
        for source in (pb.CANDIDATE_SOURCE_SEQUENTIAL, pb.CANDIDATE_SOURCE_COLLABORATIVE)
    }
    assert by_source[pb.CANDIDATE_SOURCE_SEQUENTIAL] and by_source[pb.CANDIDATE_SOURCE_COLLABORATIVE]
    # Log-based reasons name the user's own history item, never an invented one.
    log_reasons = [i.reason for i in reply.items if i.reason.startswith("people ")]
    assert log_reasons and all("Toy Story (1995)" in r and "you rated 5★" in r for r in log_reasons)
    # What followed Toy Story in the loaded histories is what the transitions propose.
    followers: dict[str, int] = {}
    last: dict[str, str] = {}
    for r in movielens.ratings:
        if last.get(r.user_id) == toy_story.item_id:
            followers[r.item_id] = followers.get(r.item_id, 0) + 1
        last[r.user_id] = r.item_id
    sequential_ids = {i.item_id for i in by_source[pb.CANDIDATE_SOURCE_SEQUENTIAL]}
    assert sequential_ids & set(followers), "at least one proposed next item really followed Toy Story"


def test_pipelined_stream_keeps_per_user_order_with_slow_text_events(service, movielens):
    # One event per message, reviews (which wait for the encoder) between clicks: with several
    # messages in flight, each user's events must still apply in stream order.
    items = [i.item_id for i in movielens.items[:5]]
    events = []
    for n in range(60):
        user = f"order-{n % 3}"
        if n % 4 == 1:
            events.append(pb.UserEvent(event_id=f"o{n}", user_id=user, event_type=pb.EVENT_TYPE_REVIEW,
                                       item_id=items[n % 5], text=f"Review number {n}: loved the ending."))
        else:
            events.append(pb.UserEvent(event_id=f"o{n}", user_id=user, event_type=pb.EVENT_TYPE_CLICK, item_id=items[n % 5]))
    acks = list(service.client.stream_events(events, max_batch=1, linger_s=0.0))
    assert [a.event_id for a in acks] == [e.event_id for e in events]
    for user in ("order-0", "order-1", "order-2"):
        versions = [a.profile_version for a in acks if a.user_id == user]
        assert versions == list(range(1, len(versions) + 1)), f"{user} applied out of order: {versions}"

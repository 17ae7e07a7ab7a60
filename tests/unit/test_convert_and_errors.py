"""Tests for request validation at the gRPC edge (`tastemaker.gateway.convert`), the error table
(`tastemaker.gateway.errors`) and configuration loading (`tastemaker.config`). Real protobuf
messages, no server."""

from __future__ import annotations

import math
import time

import grpc
import pytest

from tastemaker import errors
from tastemaker.config import ENV_ALLOWLIST, GatewayConfig, ServiceConfig, load_config
from tastemaker.domain import EventStatus, EventType
from tastemaker.errors import InvalidArgument
from tastemaker.gateway import convert
from tastemaker.gateway.errors import status_for
from tastemaker.v1 import recommender_service_pb2 as pb

CFG = GatewayConfig()
NOW = 1_700_000_000.0
ALL_TYPE_NAMES = [
    "EVENT_TYPE_VIEW",
    "EVENT_TYPE_CLICK",
    "EVENT_TYPE_ADD_TO_CART",
    "EVENT_TYPE_PURCHASE",
    "EVENT_TYPE_RATING",
    "EVENT_TYPE_REVIEW",
    "EVENT_TYPE_SEARCH",
    "EVENT_TYPE_SKIP",
    "EVENT_TYPE_DISLIKE",
]


def _event(**kw) -> pb.UserEvent:
    kw.setdefault("event_id", "e1")
    kw.setdefault("user_id", "u1")
    kw.setdefault("event_type", pb.EVENT_TYPE_VIEW)
    if kw["event_type"] not in (pb.EVENT_TYPE_SEARCH, pb.EVENT_TYPE_REVIEW):
        kw.setdefault("item_id", "i1")
    return pb.UserEvent(**kw)


def _convert(**kw):
    return convert.event_from_pb(_event(**kw), CFG, NOW)


# -- events -----------------------------------------------------------------------------------------


class TestEventValidation:
    def test_valid_view(self):
        e = _convert()
        assert (e.event_id, e.user_id, e.event_type, e.item_id) == ("e1", "u1", EventType.VIEW, "i1")
        assert e.event_time == NOW  # unset time -> server receive time

    def test_event_time_is_taken_from_message(self):
        message = _event()
        message.event_time.FromNanoseconds(int((NOW - 3600.5) * 1e9))
        assert convert.event_from_pb(message, CFG, NOW).event_time == pytest.approx(NOW - 3600.5, abs=1e-3)

    def test_event_time_far_in_future_rejected(self):
        message = _event()
        message.event_time.FromSeconds(int(NOW + 3 * 86_400))
        with pytest.raises(InvalidArgument, match="future"):
            convert.event_from_pb(message, CFG, NOW)

    @pytest.mark.parametrize(
        "seconds, nanos, words",
        [
            (-(2**63), 0, "before 1970"),
            (-(10**12), 0, "before 1970"),
            (-1, 999_999_999, "before 1970"),
            (int(NOW), -1, "nanos -1"),
            (int(NOW), 2 * 10**9, "nanos 2000000000"),
            (int(NOW), 10**9, "nanos 1000000000"),
            (2**63 - 1, 0, "future"),
            (int(NOW + 86_400 + 2), 0, "future"),
        ],
    )
    def test_invalid_event_times_rejected(self, seconds, nanos, words):
        message = _event()
        message.event_time.seconds = seconds
        message.event_time.nanos = nanos
        with pytest.raises(InvalidArgument, match=words):
            convert.event_from_pb(message, CFG, NOW)

    @pytest.mark.parametrize("seconds, nanos", [(0, 0), (0, 999_999_999), (int(NOW), 0), (int(NOW + 86_400), 0)])
    def test_event_time_bounds_accepted(self, seconds, nanos):
        message = _event()
        message.event_time.seconds = seconds
        message.event_time.nanos = nanos
        assert convert.event_from_pb(message, CFG, NOW).event_time == pytest.approx(seconds + nanos / 1e9)

    def test_invalid_event_time_is_a_rejected_ack_with_reason(self):
        bad = _event(event_id="bad")
        bad.event_time.seconds = -(10**12)
        events, rejections = convert.events_from_pb([_event(event_id="good"), bad], CFG)
        assert events[0] is not None and rejections[0] is None
        assert events[1] is None and rejections[1].status == EventStatus.REJECTED
        assert "1970" in rejections[1].reason

    @pytest.mark.parametrize("field", ["event_id", "user_id", "item_id"])
    @pytest.mark.parametrize("value", ["", "   "])
    def test_empty_ids_rejected(self, field, value):
        with pytest.raises(InvalidArgument, match=f"{field} is empty"):
            _convert(**{field: value})

    @pytest.mark.parametrize("field", ["event_id", "user_id", "item_id"])
    def test_too_long_ids_rejected(self, field):
        limit = CFG.max_id_chars
        assert _convert(**{field: "x" * limit}) is not None  # exactly at the limit is fine
        with pytest.raises(InvalidArgument, match=rf"{field}.*{limit + 1} characters.*at most {limit}"):
            _convert(**{field: "x" * (limit + 1)})

    def test_id_limit_follows_config(self):
        with pytest.raises(InvalidArgument, match="at most 4"):
            convert.event_from_pb(_event(user_id="abcde"), GatewayConfig(max_id_chars=4), NOW)

    @pytest.mark.parametrize("value", [0.0, 0.4, 5.01, 6.0, -1.0])
    def test_rating_out_of_range_rejected(self, value):
        with pytest.raises(InvalidArgument, match=r"out of range \[0\.5, 5\]"):
            _convert(event_type=pb.EVENT_TYPE_RATING, value=value)

    @pytest.mark.parametrize("value", [0.5, 3.0, 5.0])
    def test_rating_in_range_accepted(self, value):
        e = _convert(event_type=pb.EVENT_TYPE_RATING, value=value)
        assert e.event_type == EventType.RATING and e.value == value

    @pytest.mark.parametrize("value", [math.nan, math.inf])
    def test_non_finite_value_rejected(self, value):
        with pytest.raises(InvalidArgument, match="finite"):
            _convert(value=value)

    def test_review_rating_range(self):
        ok = _convert(event_type=pb.EVENT_TYPE_REVIEW, text="great", value=4.0)
        assert ok.value == 4.0
        no_rating = _convert(event_type=pb.EVENT_TYPE_REVIEW, text="great")
        assert no_rating.value == 0.0
        with pytest.raises(InvalidArgument, match=r"\[0\.5, 5\]"):
            _convert(event_type=pb.EVENT_TYPE_REVIEW, text="great", value=7.0)

    @pytest.mark.parametrize("event_type", [0, 10, 42])
    def test_unknown_event_type_lists_allowed(self, event_type):
        with pytest.raises(InvalidArgument) as info:
            _convert(event_type=event_type, item_id="i1")
        message = str(info.value)
        assert str(event_type) in message
        for name in ALL_TYPE_NAMES:
            assert name in message
        assert "UNSPECIFIED" not in message

    def test_item_event_needs_item(self):
        for t in (pb.EVENT_TYPE_VIEW, pb.EVENT_TYPE_RATING, pb.EVENT_TYPE_DISLIKE, pb.EVENT_TYPE_SKIP):
            with pytest.raises(InvalidArgument, match="item_id is empty"):
                _convert(event_type=t, value=4.0, item_id="")

    def test_search_with_item_rejected(self):
        with pytest.raises(InvalidArgument, match="search event carries no item_id"):
            _convert(event_type=pb.EVENT_TYPE_SEARCH, text="space", item_id="i1")

    @pytest.mark.parametrize("event_type", [pb.EVENT_TYPE_REVIEW, pb.EVENT_TYPE_SEARCH])
    @pytest.mark.parametrize("text", ["", "   \n"])
    def test_text_events_need_text(self, event_type, text):
        with pytest.raises(InvalidArgument, match=rf"{pb.EventType.Name(event_type)} needs non-empty text"):
            _convert(event_type=event_type, text=text)

    def test_text_events_keep_stripped_text(self):
        e = _convert(event_type=pb.EVENT_TYPE_SEARCH, text="  space movies  ")
        assert (e.event_type, e.text, e.item_id) == (EventType.SEARCH, "space movies", "")
        review = _convert(event_type=pb.EVENT_TYPE_REVIEW, text="fun", item_id="i9")
        assert review.item_id == "i9"
        # Text on a non-text event is dropped.
        assert _convert(text="ignored").text == ""

    def test_text_too_long_rejected(self):
        limit = CFG.max_text_chars
        assert _convert(event_type=pb.EVENT_TYPE_SEARCH, text="q" * limit).text == "q" * limit
        with pytest.raises(InvalidArgument, match=rf"{limit + 1} characters; at most {limit}"):
            _convert(event_type=pb.EVENT_TYPE_SEARCH, text="q" * (limit + 1))

    def test_rejections_do_not_stop_the_batch(self):
        messages = [
            _event(event_id="ok1"),
            _event(event_id="bad-rating", event_type=pb.EVENT_TYPE_RATING, value=9.0),
            _event(event_id="ok2", event_type=pb.EVENT_TYPE_SEARCH, text="robots"),
            _event(event_id="bad-type", event_type=0),
            _event(event_id="", user_id="u7"),
            _event(event_id="ok3", event_type=pb.EVENT_TYPE_RATING, value=4.5),
        ]
        events, rejections = convert.events_from_pb(messages, CFG)
        assert len(events) == len(rejections) == 6
        for i in (0, 2, 5):
            assert events[i] is not None and rejections[i] is None
        for i in (1, 3, 4):
            assert events[i] is None and rejections[i] is not None
            assert rejections[i].status == EventStatus.REJECTED
            assert rejections[i].profile_version == 0
        assert [events[i].event_id for i in (0, 2, 5)] == ["ok1", "ok2", "ok3"]
        assert rejections[1].event_id == "bad-rating" and "out of range" in rejections[1].reason
        assert rejections[3].event_id == "bad-type" and "EVENT_TYPE_VIEW" in rejections[3].reason
        assert rejections[4].user_id == "u7" and "event_id is empty" in rejections[4].reason
        # Events without their own time get the batch's receive time (now).
        assert abs(events[0].event_time - time.time()) < 60

    def test_batch_over_the_cap_fails_whole_call(self):
        cfg = GatewayConfig(max_events_per_request=3)
        events, _ = convert.events_from_pb([_event(event_id=str(i)) for i in range(3)], cfg)
        assert len(events) == 3
        with pytest.raises(InvalidArgument, match="4 events.*at most 3"):
            convert.events_from_pb([_event(event_id=str(i)) for i in range(4)], cfg)

    def test_ack_to_pb(self):
        from tastemaker.domain import EventAck

        m = convert.ack_to_pb(EventAck("e", "u", EventStatus.DUPLICATE, 7, ""))
        assert (m.event_id, m.user_id, m.status, m.profile_version) == ("e", "u", pb.EVENT_STATUS_DUPLICATE, 7)


# -- items ------------------------------------------------------------------------------------------


class TestItemValidation:
    def test_valid_items_are_stripped(self):
        request = pb.UpsertItemsRequest(
            items=[pb.Item(item_id="m1", title="  Heat ", tags=[" crime ", " "], attributes={"year": "1995"})]
        )
        (item,) = convert.items_from_request(request, CFG)
        assert (item.item_id, item.title, item.tags, item.attributes) == ("m1", "Heat", ["crime"], {"year": "1995"})
        assert item.vector is None

    def test_empty_request_rejected(self):
        with pytest.raises(InvalidArgument, match="at least one item"):
            convert.items_from_request(pb.UpsertItemsRequest(), CFG)

    def test_over_the_cap_rejected(self):
        cfg = GatewayConfig(max_items_per_request=2)
        request = pb.UpsertItemsRequest(items=[pb.Item(item_id=f"m{i}", title="t") for i in range(3)])
        with pytest.raises(InvalidArgument, match="3 items; at most 2"):
            convert.items_from_request(request, cfg)
        request = pb.UpsertItemsRequest(items=[pb.Item(item_id=f"m{i}", title="t") for i in range(2)])
        assert len(convert.items_from_request(request, cfg)) == 2

    def test_item_without_text_fails_whole_batch(self):
        request = pb.UpsertItemsRequest(
            items=[pb.Item(item_id="m1", title="ok"), pb.Item(item_id="m2", title="  ", tags=[" "], attributes={"a": "b"})]
        )
        with pytest.raises(InvalidArgument, match="'m2' has no text"):
            convert.items_from_request(request, CFG)

    def test_any_text_field_is_enough(self):
        for kw in ({"title": "t"}, {"description": "d"}, {"tags": ["x"]}):
            (item,) = convert.items_from_request(pb.UpsertItemsRequest(items=[pb.Item(item_id="m", **kw)]), CFG)
            assert item.item_id == "m"

    def test_item_bad_id_or_too_much_text(self):
        with pytest.raises(InvalidArgument, match="item_id is empty"):
            convert.items_from_request(pb.UpsertItemsRequest(items=[pb.Item(item_id="", title="t")]), CFG)
        cfg = GatewayConfig(max_text_chars=10)
        with pytest.raises(InvalidArgument, match="at most 40"):
            convert.items_from_request(pb.UpsertItemsRequest(items=[pb.Item(item_id="m", description="x" * 41)]), cfg)

    def test_same_id_twice_last_wins(self):
        request = pb.UpsertItemsRequest(items=[pb.Item(item_id="m", title="first"), pb.Item(item_id="m", title="second")])
        items = convert.items_from_request(request, CFG)
        assert [(i.item_id, i.title) for i in items] == [("m", "second")]


# -- recommend / similar ----------------------------------------------------------------------------


class TestQueryValidation:
    def test_page_size_default_and_cap(self):
        assert convert.recommend_query_from_pb(pb.RecommendRequest(user_id="u"), CFG).page_size == CFG.default_page_size == 10
        assert convert.recommend_query_from_pb(pb.RecommendRequest(user_id="u", page_size=7), CFG).page_size == 7
        assert convert.recommend_query_from_pb(pb.RecommendRequest(user_id="u", page_size=100), CFG).page_size == 100
        with pytest.raises(InvalidArgument, match="page_size 101.*cap of 100"):
            convert.recommend_query_from_pb(pb.RecommendRequest(user_id="u", page_size=101), CFG)
        with pytest.raises(InvalidArgument, match="page_size -1 is negative"):
            convert.recommend_query_from_pb(pb.RecommendRequest(user_id="u", page_size=-1), CFG)

    def test_page_size_for_similar_items(self):
        assert convert.similar_query_from_pb(pb.SimilarItemsRequest(item_id="m"), CFG).page_size == 10
        with pytest.raises(InvalidArgument, match="negative"):
            convert.similar_query_from_pb(pb.SimilarItemsRequest(item_id="m", page_size=-3), CFG)
        with pytest.raises(InvalidArgument, match="cap"):
            convert.similar_query_from_pb(pb.SimilarItemsRequest(item_id="m", page_size=500), CFG)
        with pytest.raises(InvalidArgument, match="item_id is empty"):
            convert.similar_query_from_pb(pb.SimilarItemsRequest(item_id=""), CFG)

    @pytest.mark.parametrize("diversity", [-0.1, 1.5, math.nan])
    def test_diversity_out_of_range(self, diversity):
        with pytest.raises(InvalidArgument, match=r"diversity .* outside \[0, 1\]"):
            convert.recommend_query_from_pb(pb.RecommendRequest(user_id="u", diversity=diversity), CFG)

    @pytest.mark.parametrize("diversity", [0.0, 0.5, 1.0])
    def test_diversity_in_range(self, diversity):
        assert convert.recommend_query_from_pb(pb.RecommendRequest(user_id="u", diversity=diversity), CFG).diversity == diversity

    def test_recommend_other_fields(self):
        with pytest.raises(InvalidArgument, match="user_id is empty"):
            convert.recommend_query_from_pb(pb.RecommendRequest(), CFG)
        with pytest.raises(InvalidArgument, match="min_profile_version"):
            convert.recommend_query_from_pb(pb.RecommendRequest(user_id="u", min_profile_version=-1), CFG)
        with pytest.raises(InvalidArgument, match="query is"):
            convert.recommend_query_from_pb(pb.RecommendRequest(user_id="u", query="q" * (CFG.max_text_chars + 1)), CFG)
        q = convert.recommend_query_from_pb(pb.RecommendRequest(user_id="u", query="  toys  ", include_seen=True), CFG)
        assert (q.user_id, q.query, q.include_seen, q.query_vector) == ("u", "toys", True, None)

    def test_filter_conditions_converted(self):
        request = pb.RecommendRequest(
            user_id="u",
            filter=pb.AttributeFilter(
                conditions=[
                    pb.AttributeCondition(attribute="genres", any_of=["Comedy", "Drama"], exclude=True),
                    pb.AttributeCondition(attribute="year", min_value=0.0),
                    pb.AttributeCondition(attribute="year", max_value=2000),
                ]
            ),
        )
        conds = convert.recommend_query_from_pb(request, CFG).filter
        assert [(c.attribute, c.any_of, c.min_value, c.max_value, c.exclude) for c in conds] == [
            ("genres", ["Comedy", "Drama"], None, None, True),
            ("year", [], 0.0, None, False),  # an explicit 0 bound is a bound, not "unset"
            ("year", [], None, 2000.0, False),
        ]

    @pytest.mark.parametrize(
        "condition, words",
        [
            (pb.AttributeCondition(attribute="", any_of=["x"]), "empty attribute"),
            (pb.AttributeCondition(attribute="genres"), "needs any_of"),
            (pb.AttributeCondition(attribute="year", min_value=2000, max_value=1990), "min_value 2000"),
        ],
    )
    def test_invalid_filter_conditions(self, condition, words):
        recommend = pb.RecommendRequest(user_id="u", filter=pb.AttributeFilter(conditions=[condition]))
        with pytest.raises(InvalidArgument, match=words):
            convert.recommend_query_from_pb(recommend, CFG)
        similar = pb.SimilarItemsRequest(item_id="m", filter=pb.AttributeFilter(conditions=[condition]))
        with pytest.raises(InvalidArgument, match=words):
            convert.similar_query_from_pb(similar, CFG)


# -- error table ------------------------------------------------------------------------------------


#: What no client-facing message may contain: a traceback, a path, a pid, an address, a class name.
LEAKS = ("Traceback", "File ", "pid=", "/", "Error(", "Exception", "0x")


def assert_clean(message: str) -> None:
    """A message fit for a client: short and free of internals."""
    import re

    assert len(message) < 1_000, message
    for leak in LEAKS:
        assert leak not in message, (leak, message)
    assert not re.search(r"\b\d{1,3}(\.\d{1,3}){3}\b", message), message  # an IPv4 address


def _ray_task_error(cause: BaseException, dual: bool):
    """What awaiting a handle or actor call raises when the remote side raised `cause`."""
    import traceback

    from ray.exceptions import RayTaskError

    try:
        raise cause
    except BaseException as exc:  # noqa: BLE001
        wrapped = RayTaskError(
            "Retrieval.similar_items", traceback.format_exc(), exc, proctitle="ray::ServeReplica:Retrieval",
            pid=4242, ip="10.1.2.3",
        )
    return wrapped.as_instanceof_cause() if dual else wrapped


class TestStatusFor:
    @pytest.mark.parametrize(
        "exc_class, code",
        [
            (errors.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
            (errors.NotFound, grpc.StatusCode.NOT_FOUND),
            (errors.FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
            (errors.ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
            (errors.Unavailable, grpc.StatusCode.UNAVAILABLE),
            (errors.Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
            (errors.PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
        ],
    )
    def test_domain_errors(self, exc_class, code):
        assert status_for(exc_class("what went wrong")) == (code, "what went wrong")

    def test_every_domain_error_class_is_mapped(self):
        classes = [
            c
            for c in vars(errors).values()
            if isinstance(c, type) and issubclass(c, errors.TastemakerError) and c is not errors.TastemakerError
        ]
        assert len(classes) >= 7
        for c in classes:
            code, _ = status_for(c("x"))
            assert code not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.OK)

    def test_subclass_uses_parent_code(self):
        class TooManyTags(errors.InvalidArgument):
            pass

        assert status_for(TooManyTags("x"))[0] == grpc.StatusCode.INVALID_ARGUMENT

    @pytest.mark.parametrize(
        "exc", [RuntimeError("boom"), KeyError("k"), ValueError("v"), ZeroDivisionError(), errors.TastemakerError("base")]
    )
    def test_anything_else_is_unavailable_never_internal(self, exc):
        code, message = status_for(exc)
        assert code == grpc.StatusCode.UNAVAILABLE
        assert "reference" in message and "retry" in message

    def test_unknown_exceptions_text_never_reaches_the_client(self, caplog):
        secret = "/home/svc/app.py line 7 pid=4242 ip 10.1.2.3 user wrote: I hate this film"
        with caplog.at_level("ERROR", logger="tastemaker.gateway.errors"):
            code, message = status_for(RuntimeError(secret), "Recommend")
        assert code == grpc.StatusCode.UNAVAILABLE
        assert_clean(message)
        assert "RuntimeError" not in message and "I hate" not in message
        reference = message.split("reference ")[1].split(")")[0]
        # Logged server side under the same reference, with the class but without the text.
        logged = "\n".join(r.getMessage() for r in caplog.records)
        assert reference in logged and "RuntimeError" in logged and "Recommend" in logged
        assert "I hate" not in logged

    @pytest.mark.parametrize("dual", [True, False])
    def test_domain_error_raised_in_another_deployment_is_unwrapped(self, dual):
        wrapped = _ray_task_error(errors.NotFound("item_id 'no-such-item' is not in the catalog"), dual)
        assert "Traceback" in str(wrapped) or "File " in str(wrapped)  # what used to reach the client
        code, message = status_for(wrapped)
        assert (code, message) == (grpc.StatusCode.NOT_FOUND, "item_id 'no-such-item' is not in the catalog")

    def test_nested_wrappers_are_unwrapped(self):
        inner = _ray_task_error(errors.InvalidArgument("page_size 500 is over the cap of 100"), True)
        outer = _ray_task_error(inner, True)
        assert status_for(outer) == (grpc.StatusCode.INVALID_ARGUMENT, "page_size 500 is over the cap of 100")

    def test_wrapped_unknown_error_is_generic(self):
        code, message = status_for(_ray_task_error(ZeroDivisionError("division by zero"), True))
        assert code == grpc.StatusCode.UNAVAILABLE
        assert_clean(message)
        assert "ZeroDivision" not in message

    def test_platform_failures(self):
        from ray.exceptions import ActorDiedError, PendingCallsLimitExceeded

        assert status_for(PendingCallsLimitExceeded("queue full at 10.0.0.1"))[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
        code, message = status_for(ActorDiedError())
        assert code == grpc.StatusCode.UNAVAILABLE and "retry" in message
        assert_clean(message)

    def test_long_domain_messages_are_cut(self):
        _, message = status_for(errors.InvalidArgument("x" * 5_000))
        assert len(message) <= 1_000

    def test_full_serve_queue_is_resource_exhausted(self):
        from ray.serve.exceptions import BackPressureError

        code, message = status_for(BackPressureError(num_queued_requests=10, max_queued_requests=10))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "overloaded" in message


# -- configuration ----------------------------------------------------------------------------------


class TestLoadConfig:
    def test_defaults(self):
        cfg = load_config(environ={})
        assert isinstance(cfg, ServiceConfig)
        assert cfg.server.grpc_port == 9000
        assert cfg.profiles.num_shards == 2
        assert cfg.gateway.max_page_size == 100

    def test_yaml_overrides_defaults(self, tmp_path):
        path = tmp_path / "c.yaml"
        path.write_text(
            "server:\n  grpc_port: 9555\nprofiles:\n  num_shards: 4\n  weights:\n    purchase: 3.5\n"
            "retrieval:\n  candidate_pool: 50\n"
        )
        cfg = load_config(path, environ={})
        assert cfg.server.grpc_port == 9555
        assert cfg.profiles.num_shards == 4
        assert cfg.profiles.weights.purchase == 3.5
        assert cfg.profiles.weights.view == 0.25  # untouched siblings keep defaults
        assert cfg.retrieval.candidate_pool == 50
        assert cfg.server.host == "127.0.0.1"

    def test_unknown_key_is_invalid_argument(self, tmp_path):
        path = tmp_path / "c.yaml"
        path.write_text("server:\n  grcp_port: 9555\n")
        with pytest.raises(InvalidArgument, match="grcp_port"):
            load_config(path, environ={})
        path.write_text("surver: {}\n")
        with pytest.raises(InvalidArgument, match="surver"):
            load_config(path, environ={})

    def test_bad_values_and_files(self, tmp_path):
        path = tmp_path / "c.yaml"
        path.write_text("profiles:\n  num_shards: 0\n")
        with pytest.raises(InvalidArgument, match="num_shards"):
            load_config(path, environ={})
        path.write_text("- a\n- b\n")
        with pytest.raises(InvalidArgument, match="mapping"):
            load_config(path, environ={})
        with pytest.raises(InvalidArgument, match="does not exist"):
            load_config(tmp_path / "missing.yaml", environ={})

    def test_empty_yaml_gives_defaults(self, tmp_path):
        path = tmp_path / "c.yaml"
        path.write_text("")
        assert load_config(path, environ={}).server.grpc_port == 9000

    def test_env_allowlist_sets_fields(self, tmp_path):
        env = {
            "TASTEMAKER_DATA_DIR": str(tmp_path / "data"),
            "TASTEMAKER_GRPC_PORT": "9123",
            "TASTEMAKER_RAY_ADDRESS": "ray://head:10001",
            "TASTEMAKER_ENCODER_MODEL_PATH": "/models/minilm",
            "TASTEMAKER_ENCODER_DEVICE": "cuda:1",
            "TASTEMAKER_API_KEY": "tm_client_key",
            "TASTEMAKER_USER_ID_KEY": "k" * 32,
            "TASTEMAKER_STORE_URL": "postgresql://tm:pw@db.internal:5432/tastemaker",
        }
        assert set(env) == set(ENV_ALLOWLIST)
        cfg = load_config(environ=env)
        assert cfg.data_dir == str(tmp_path / "data")
        assert cfg.server.grpc_port == 9123
        assert cfg.server.ray_address == "ray://head:10001"
        assert cfg.encoder.model_path == "/models/minilm"
        assert cfg.auth.api_key.get_secret_value() == "tm_client_key"
        assert cfg.privacy.user_id_key.get_secret_value() == "k" * 32
        assert cfg.encoder.device == "cuda:1"
        assert cfg.store_url() == "postgresql://tm:pw@db.internal:5432/tastemaker"

    def test_non_allowlisted_env_ignored(self):
        env = {
            "TASTEMAKER_HTTP_PORT": "1234",
            "TASTEMAKER_PROFILES_NUM_SHARDS": "9",
            "GRPC_PORT": "1",
            "server.grpc_port": "2",
            "TASTEMAKER_GRPC_PORT": "",  # empty counts as unset
        }
        cfg = load_config(environ=env)
        assert cfg.server.http_port == 8000
        assert cfg.profiles.num_shards == 2
        assert cfg.server.grpc_port == 9000

    def test_bad_env_value_is_invalid_argument(self):
        with pytest.raises(InvalidArgument, match="grpc_port"):
            load_config(environ={"TASTEMAKER_GRPC_PORT": "not-a-port"})

    def test_precedence_yaml_env_overrides(self, tmp_path):
        path = tmp_path / "c.yaml"
        path.write_text("server:\n  grpc_port: 9555\n  http_port: 8555\nencoder:\n  device: cpu\n")
        env = {"TASTEMAKER_GRPC_PORT": "9666", "TASTEMAKER_ENCODER_DEVICE": "cuda"}
        cfg = load_config(path, environ=env)
        assert cfg.server.grpc_port == 9666  # env beats YAML
        assert cfg.encoder.device == "cuda"
        assert cfg.server.http_port == 8555
        cfg = load_config(
            path,
            overrides={("server", "grpc_port"): 9777, ("server", "http_port"): None, ("profiles", "num_shards"): 5},
            environ=env,
        )
        assert cfg.server.grpc_port == 9777  # overrides beat env and YAML
        assert cfg.server.http_port == 8555  # None = not given
        assert cfg.profiles.num_shards == 5
        assert cfg.encoder.device == "cuda"

    def test_empty_yaml_section_with_env_is_filled_in(self, tmp_path):
        path = tmp_path / "c.yaml"
        path.write_text("server:\n")
        assert load_config(path, environ={"TASTEMAKER_GRPC_PORT": "9100"}).server.grpc_port == 9100

    def test_non_mapping_yaml_section_with_env_is_invalid_argument(self, tmp_path):
        path = tmp_path / "c.yaml"
        path.write_text("server: 5\n")
        with pytest.raises(InvalidArgument, match="must be a mapping"):
            load_config(path, environ={"TASTEMAKER_GRPC_PORT": "9100"})

    def test_override_unknown_field_rejected(self):
        with pytest.raises(InvalidArgument):
            load_config(overrides={("server", "nope"): 1}, environ={})


# -- admission, shard mailboxes, request decoding ----------------------------------------------------


class TestAdmission:
    def test_refuses_past_the_limit_at_once_and_recovers(self):
        from tastemaker.gateway.admission import Admission

        admission = Admission(2, {"UpsertItems": 1})
        with admission.enter("Recommend"), admission.enter("Recommend"):
            with pytest.raises(errors.ResourceExhausted, match="2 calls in progress"):
                with admission.enter("Recommend"):
                    pass
            with admission.enter("GetItem"):  # another RPC has its own slots
                pass
        with admission.enter("UpsertItems"):
            with pytest.raises(errors.ResourceExhausted):
                with admission.enter("UpsertItems"):
                    pass
        assert dict(admission.in_flight) == {"Recommend": 0, "GetItem": 0, "UpsertItems": 0}
        assert admission.refused["Recommend"] == 1
        with admission.enter("Recommend"):  # slots come back, also after a failing call
            pass

    def test_slot_released_when_the_call_fails(self):
        from tastemaker.gateway.admission import Admission

        admission = Admission(1)
        with pytest.raises(ValueError):
            with admission.enter("Recommend"):
                raise ValueError("x")
        assert admission.in_flight["Recommend"] == 0


def test_shard_mailbox_bounds_calls():
    from tastemaker.profiles.actor import Mailbox

    mailbox = Mailbox(2)
    mailbox.admit(0)
    mailbox.admit(0)
    with pytest.raises(errors.ResourceExhausted, match="shard 3 has 2 calls waiting"):
        mailbox.admit(3)
    mailbox.release()
    mailbox.admit(0)
    assert mailbox.in_flight == 2


class TestSafeDecoding:
    def test_bad_bytes_become_a_malformed_request(self):
        from tastemaker.gateway.wire import MalformedRequest, safe_deserializer

        decode = safe_deserializer(pb.RecommendRequest.FromString, "tastemaker.v1.RecommendRequest")
        assert decode(pb.RecommendRequest(user_id="u1").SerializeToString()).user_id == "u1"
        bad = decode(b"\xff\xff\xff")
        assert bad == MalformedRequest("tastemaker.v1.RecommendRequest", 3)
        assert "tastemaker.v1.RecommendRequest" in bad.describe()
        assert_clean(bad.describe().replace("tastemaker.v1.RecommendRequest", ""))

    def test_registered_handlers_decode_safely(self):
        """The servicer functions the proxy registers keep every method, with safe deserializers."""
        from tastemaker.gateway import wire

        class Recorder:
            def __init__(self):
                self.generic, self.registered = [], {}

            def add_generic_rpc_handlers(self, handlers):
                self.generic.extend(handlers)

            def add_registered_method_handlers(self, name, handlers):
                self.registered[name] = handlers

        server = Recorder()
        from unittest.mock import Mock

        wire.add_RecommenderServiceServicer_to_server(Mock(), server)  # the proxy passes a Mock too
        wire.add_HealthServicer_to_server(Mock(), server)
        methods = server.registered["tastemaker.v1.RecommenderService"]
        assert set(methods) == {m.name for m in pb.DESCRIPTOR.services_by_name["RecommenderService"].methods}
        for name, handler in methods.items():
            assert isinstance(handler.request_deserializer(b"\xff\xff"), wire.MalformedRequest), name
        assert methods["StreamUserEvents"].request_streaming and methods["StreamUserEvents"].response_streaming
        generic = {k: h for g in server.generic for k, h in g._method_handlers.items()}
        assert isinstance(generic["/grpc.health.v1.Health/Check"].request_deserializer(b"\xff"), wire.MalformedRequest)
        assert generic["/tastemaker.v1.RecommenderService/Recommend"].request_deserializer(
            pb.RecommendRequest(user_id="u").SerializeToString()
        ).user_id == "u"


def test_shard_batches_are_submitted_all_or_none_and_slots_come_back():
    """A stream message whose events go to two shards is refused whole when one mailbox is full
    (no shard gets part of it), and every slot is released once its call has finished."""
    import asyncio

    from tastemaker.profiles.actor import Mailbox, ShardRouter

    submitted: list[int] = []

    class Method:
        def __init__(self, shard: int):
            self.shard = shard

        def remote(self, *args):
            submitted.append(self.shard)
            future = asyncio.get_running_loop().create_future()
            future.set_result(("applied", self.shard))
            return future  # awaitable like an ObjectRef

    class Actor:
        def __init__(self, shard: int):
            self.apply_events = Method(shard)

    router = ShardRouter.__new__(ShardRouter)  # no Ray: the routing and bounding logic only
    router.actors = [Actor(0), Actor(1)]
    router.mailboxes = [Mailbox(1), Mailbox(1)]

    async def scenario():
        first = router.submit(1, "apply_events", [])
        with pytest.raises(errors.ResourceExhausted, match="shard 1"):
            router.submit_many([(0, "apply_events", ([],)), (1, "apply_events", ([],))])
        assert submitted == [1] and router.mailboxes[0].in_flight == 0
        assert await first == ("applied", 1)
        await asyncio.sleep(0)  # the slot is released by the finished call's callback
        assert [m.in_flight for m in router.mailboxes] == [0, 0]
        results = await asyncio.gather(*router.submit_many([(0, "apply_events", ([],)), (1, "apply_events", ([],))]))
        assert results == [("applied", 0), ("applied", 1)]
        await asyncio.sleep(0)
        assert [m.in_flight for m in router.mailboxes] == [0, 0]

    asyncio.run(scenario())

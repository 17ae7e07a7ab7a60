"""Protobuf ↔ domain conversion with validation. Protobuf types stop here."""

from __future__ import annotations

import math
import time
from typing import Optional

import numpy as np

from tastemaker.config import GatewayConfig
from tastemaker.domain import (
    ITEM_EVENT_TYPES,
    TEXT_EVENT_TYPES,
    AttributeCondition,
    EventAck,
    EventStatus,
    EventType,
    Item,
    RecommendQuery,
    ScoredItem,
    UserEvent,
    UserProfileSummary,
)
from tastemaker.encoder.identity import same_model
from tastemaker.errors import FailedPrecondition, InvalidArgument
from tastemaker.retrieval.catalog import validate_conditions
from tastemaker.v1 import recommender_service_pb2 as pb

#: Ratings outside this range are rejected.
RATING_RANGE = (0.5, 5.0)
#: Event times further than this in the future are rejected (clock skew allowance).
MAX_FUTURE_SKEW_S = 24 * 3600.0


def check_id(kind: str, value: str, config: GatewayConfig) -> str:
    """A non-empty id of bounded length, or InvalidArgument naming the field."""
    if not value or not value.strip():
        raise InvalidArgument(f"{kind} is empty; give a non-empty id of at most {config.max_id_chars} characters")
    if len(value) > config.max_id_chars:
        raise InvalidArgument(f"{kind} {value[:32]!r}... is {len(value)} characters; at most {config.max_id_chars} allowed")
    return value


def _seconds(ts) -> float:
    return ts.seconds + ts.nanos / 1e9


def event_time_from_pb(message: pb.UserEvent, now: float) -> float:
    """The event's time in Unix seconds (the server's `now` when unset), or InvalidArgument.

    A valid Timestamp has `nanos` in [0, 1e9) (negative times carry negative `seconds` and
    positive `nanos`); event times must lie in [1970-01-01, now + MAX_FUTURE_SKEW_S]: profile decay
    is computed between event times, so one absurd time (−2⁶³ s) would outweigh every real one."""
    if not message.HasField("event_time"):
        return now
    ts = message.event_time
    if not 0 <= ts.nanos < 1_000_000_000:
        raise InvalidArgument(f"event_time.nanos {ts.nanos} is outside [0, 999999999]")
    if ts.seconds < 0:
        raise InvalidArgument(
            f"event_time {ts.seconds} s is before 1970-01-01T00:00:00Z; give a time between 1970 and now"
        )
    event_time = _seconds(ts)
    if event_time > now + MAX_FUTURE_SKEW_S:
        raise InvalidArgument(
            f"event_time is more than {MAX_FUTURE_SKEW_S / 3600:g} hours in the future (clock skew allowed: "
            f"{MAX_FUTURE_SKEW_S / 3600:g} h); give a time between 1970 and now"
        )
    return event_time


def domain_item(message: pb.Item) -> Item:
    """The domain item of a message, text fields stripped exactly as the service stores them (no
    validation, no vector). `domain_item(m).text()` is the text the encoder sees, which is what
    `tastemaker encode` encodes and what `tastemaker load --vectors` matches vectors by."""
    return Item(
        item_id=message.item_id,
        title=message.title.strip(),
        description=message.description.strip(),
        tags=[t.strip() for t in message.tags if t.strip()],
        attributes=dict(message.attributes),
    )


def item_vector_from_pb(message: pb.Item) -> Optional[np.ndarray]:
    """The item's precomputed vector, L2-normalised float32, or None when it carries none.

    Values must be finite and not all zero; the dimension and the model are checked against the
    running encoder by `check_supplied_vectors`."""
    if not message.vector:
        return None
    vector = np.asarray(message.vector, dtype=np.float32)
    if not np.all(np.isfinite(vector)):
        raise InvalidArgument(f"item {message.item_id!r}: vector has non-finite values (NaN or infinity)")
    norm = float(np.linalg.norm(vector))
    if norm == 0.0:
        raise InvalidArgument(f"item {message.item_id!r}: vector is all zeros; give a non-zero vector or none")
    return vector / norm


def item_from_pb(message: pb.Item, config: GatewayConfig) -> Item:
    """Validate and convert one item (with its precomputed vector, if it carries one)."""
    item_id = check_id("item_id", message.item_id, config)
    if not (message.title.strip() or message.description.strip() or any(t.strip() for t in message.tags)):
        raise InvalidArgument(f"item {item_id!r} has no text: give at least a title, description or tag")
    total = len(message.title) + len(message.description) + sum(len(t) for t in message.tags)
    if total > config.max_text_chars * 4:
        raise InvalidArgument(
            f"item {item_id!r} has {total} characters of text; at most {config.max_text_chars * 4} allowed"
        )
    item = domain_item(message)
    item.vector = item_vector_from_pb(message)
    return item


def item_to_pb(item: Item) -> pb.Item:
    message = pb.Item(
        item_id=item.item_id,
        title=item.title,
        description=item.description,
        tags=item.tags,
        attributes=item.attributes,
    )
    message.update_time.FromNanoseconds(int(item.update_time * 1e9))
    return message


def items_from_request(request: pb.UpsertItemsRequest, config: GatewayConfig) -> list[Item]:
    """Validate a batch; the first bad item fails the whole call (nothing is written)."""
    if not request.items:
        raise InvalidArgument("UpsertItems needs at least one item")
    if len(request.items) > config.max_items_per_request:
        raise InvalidArgument(
            f"UpsertItems got {len(request.items)} items; at most {config.max_items_per_request} per call"
        )
    items = [item_from_pb(m, config) for m in request.items]
    if not request.vector_model and any(item.vector is not None for item in items):
        raise InvalidArgument(
            "items carry precomputed vectors but vector_model is empty: set it to the model_identity "
            "of the encoder that computed them (the manifest of `tastemaker encode` has it)"
        )
    # The same id twice in one call: the last one wins, as if sent in two calls.
    return list({item.item_id: item for item in items}.values())


def check_supplied_vectors(items: list[Item], vector_model: str, dimension: int, encoder_model: str) -> None:
    """Precomputed vectors must come from the running encoder's model (`same_model`: same files,
    pooling and max length, wherever the folder is) and have its dimension.

    A different model is FAILED_PRECONDITION (the request is well formed, but its vectors belong
    to another vector space than this service's: re-encode with the service's encoder config, or
    send the items without vectors); a wrong length is INVALID_ARGUMENT."""
    supplied = [item for item in items if item.vector is not None]
    if not supplied:
        return
    if not same_model(vector_model, encoder_model):
        raise FailedPrecondition(
            f"the items' vectors were computed by model {vector_model!r}, but this service encodes with "
            f"{encoder_model!r}: re-run `tastemaker encode` with the service's encoder config, or load the "
            "items without --vectors (the service then encodes them)"
        )
    for item in supplied:
        if item.vector.shape != (dimension,):
            raise InvalidArgument(
                f"item {item.item_id!r}: vector has {item.vector.size} values; the encoder's dimension is {dimension}"
            )


def event_from_pb(message: pb.UserEvent, config: GatewayConfig, now: float) -> UserEvent:
    """Validate one event; raises InvalidArgument with the reason that goes into its ack."""
    check_id("event_id", message.event_id, config)
    check_id("user_id", message.user_id, config)
    try:
        event_type = EventType(message.event_type)
    except ValueError:
        allowed = ", ".join(pb.EventType.Name(t) for t in EventType)
        raise InvalidArgument(f"event_type {message.event_type} is not one of: {allowed}") from None
    if event_type in ITEM_EVENT_TYPES:
        check_id("item_id", message.item_id, config)
    elif message.item_id:
        check_id("item_id", message.item_id, config)
    if event_type == EventType.SEARCH and message.item_id:
        raise InvalidArgument("a search event carries no item_id; put the query in text")
    value = float(message.value)
    if not math.isfinite(value):
        raise InvalidArgument("value must be a finite number")
    if event_type == EventType.RATING and not (RATING_RANGE[0] <= value <= RATING_RANGE[1]):
        raise InvalidArgument(f"rating value {value:g} is out of range [{RATING_RANGE[0]:g}, {RATING_RANGE[1]:g}]")
    if event_type == EventType.REVIEW and value and not (RATING_RANGE[0] <= value <= RATING_RANGE[1]):
        raise InvalidArgument(
            f"review rating {value:g} is out of range [{RATING_RANGE[0]:g}, {RATING_RANGE[1]:g}] (0 = no rating)"
        )
    text = message.text
    if event_type in TEXT_EVENT_TYPES and not text.strip():
        raise InvalidArgument(f"{pb.EventType.Name(event_type)} needs non-empty text")
    if len(text) > config.max_text_chars:
        raise InvalidArgument(f"text is {len(text)} characters; at most {config.max_text_chars} allowed")
    event_time = event_time_from_pb(message, now)
    return UserEvent(
        event_id=message.event_id,
        user_id=message.user_id,
        event_type=event_type,
        item_id=message.item_id,
        value=value,
        text=text.strip() if event_type in TEXT_EVENT_TYPES else "",
        event_time=event_time,
        attribution_token=message.attribution_token,
    )


def events_from_pb(
    messages, config: GatewayConfig
) -> tuple[list[Optional[UserEvent]], list[Optional[EventAck]]]:
    """Convert a batch: per position either an event or a rejection ack (never both)."""
    if len(messages) > config.max_events_per_request:
        raise InvalidArgument(
            f"got {len(messages)} events in one message; at most {config.max_events_per_request}"
        )
    now = time.time()
    events: list[Optional[UserEvent]] = []
    rejections: list[Optional[EventAck]] = []
    for message in messages:
        try:
            events.append(event_from_pb(message, config, now))
            rejections.append(None)
        except InvalidArgument as exc:
            events.append(None)
            rejections.append(EventAck(message.event_id, message.user_id, EventStatus.REJECTED, reason=str(exc)))
    return events, rejections


def ack_to_pb(ack: EventAck) -> pb.EventAck:
    return pb.EventAck(
        event_id=ack.event_id,
        user_id=ack.user_id,
        status=int(ack.status),
        profile_version=ack.profile_version,
        reason=ack.reason,
    )


def _conditions(message: pb.AttributeFilter) -> list[AttributeCondition]:
    conditions = [
        AttributeCondition(
            attribute=c.attribute,
            any_of=list(c.any_of),
            min_value=c.min_value if c.HasField("min_value") else None,
            max_value=c.max_value if c.HasField("max_value") else None,
            exclude=c.exclude,
        )
        for c in message.conditions
    ]
    validate_conditions(conditions)
    return conditions


def _page_size(value: int, config: GatewayConfig) -> int:
    if value < 0:
        raise InvalidArgument(f"page_size {value} is negative; give 1..{config.max_page_size} (0 = default {config.default_page_size})")
    if value > config.max_page_size:
        raise InvalidArgument(f"page_size {value} is over the cap of {config.max_page_size}")
    return value or config.default_page_size


def recommend_query_from_pb(request: pb.RecommendRequest, config: GatewayConfig) -> RecommendQuery:
    check_id("user_id", request.user_id, config)
    if len(request.query) > config.max_text_chars:
        raise InvalidArgument(f"query is {len(request.query)} characters; at most {config.max_text_chars} allowed")
    if not (0.0 <= request.diversity <= 1.0):
        raise InvalidArgument(f"diversity {request.diversity:g} is outside [0, 1]")
    if request.min_profile_version < 0:
        raise InvalidArgument("min_profile_version must not be negative")
    return RecommendQuery(
        user_id=request.user_id,
        page_size=_page_size(request.page_size, config),
        query=request.query.strip(),
        filter=_conditions(request.filter),
        include_seen=request.include_seen,
        diversity=request.diversity,
    )


def similar_query_from_pb(request: pb.SimilarItemsRequest, config: GatewayConfig) -> RecommendQuery:
    check_id("item_id", request.item_id, config)
    return RecommendQuery(page_size=_page_size(request.page_size, config), filter=_conditions(request.filter))


def scored_to_pb(item: ScoredItem) -> pb.RecommendedItem:
    return pb.RecommendedItem(
        item_id=item.item_id,
        title=item.title,
        score=item.score,
        sources=[int(s) for s in item.sources],
        reason=item.reason,
    )


def profile_summary_to_pb(summary: UserProfileSummary) -> pb.GetUserProfileResponse:
    response = pb.GetUserProfileResponse(
        user_id=summary.user_id,
        profile_version=summary.profile_version,
        event_counts=[
            pb.EventTypeCount(event_type=int(t), count=c) for t, c in sorted(summary.event_counts.items())
        ],
        top_titles=summary.top_titles,
        top_tags=summary.top_tags,
    )
    if summary.last_event_time:
        response.last_event_time.FromNanoseconds(int(summary.last_event_time * 1e9))
    return response

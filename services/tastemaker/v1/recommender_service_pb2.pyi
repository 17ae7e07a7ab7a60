import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class EventType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EVENT_TYPE_UNSPECIFIED: _ClassVar[EventType]
    EVENT_TYPE_VIEW: _ClassVar[EventType]
    EVENT_TYPE_CLICK: _ClassVar[EventType]
    EVENT_TYPE_ADD_TO_CART: _ClassVar[EventType]
    EVENT_TYPE_PURCHASE: _ClassVar[EventType]
    EVENT_TYPE_RATING: _ClassVar[EventType]
    EVENT_TYPE_REVIEW: _ClassVar[EventType]
    EVENT_TYPE_SEARCH: _ClassVar[EventType]
    EVENT_TYPE_SKIP: _ClassVar[EventType]
    EVENT_TYPE_DISLIKE: _ClassVar[EventType]

class EventStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EVENT_STATUS_UNSPECIFIED: _ClassVar[EventStatus]
    EVENT_STATUS_ACCEPTED: _ClassVar[EventStatus]
    EVENT_STATUS_DUPLICATE: _ClassVar[EventStatus]
    EVENT_STATUS_REJECTED: _ClassVar[EventStatus]

class CandidateSource(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CANDIDATE_SOURCE_UNSPECIFIED: _ClassVar[CandidateSource]
    CANDIDATE_SOURCE_PROFILE: _ClassVar[CandidateSource]
    CANDIDATE_SOURCE_QUERY: _ClassVar[CandidateSource]
    CANDIDATE_SOURCE_POPULAR: _ClassVar[CandidateSource]
    CANDIDATE_SOURCE_SIMILAR_ITEM: _ClassVar[CandidateSource]
    CANDIDATE_SOURCE_SEQUENTIAL: _ClassVar[CandidateSource]
    CANDIDATE_SOURCE_COLLABORATIVE: _ClassVar[CandidateSource]
    CANDIDATE_SOURCE_TRENDING: _ClassVar[CandidateSource]
    CANDIDATE_SOURCE_FACTORS: _ClassVar[CandidateSource]
EVENT_TYPE_UNSPECIFIED: EventType
EVENT_TYPE_VIEW: EventType
EVENT_TYPE_CLICK: EventType
EVENT_TYPE_ADD_TO_CART: EventType
EVENT_TYPE_PURCHASE: EventType
EVENT_TYPE_RATING: EventType
EVENT_TYPE_REVIEW: EventType
EVENT_TYPE_SEARCH: EventType
EVENT_TYPE_SKIP: EventType
EVENT_TYPE_DISLIKE: EventType
EVENT_STATUS_UNSPECIFIED: EventStatus
EVENT_STATUS_ACCEPTED: EventStatus
EVENT_STATUS_DUPLICATE: EventStatus
EVENT_STATUS_REJECTED: EventStatus
CANDIDATE_SOURCE_UNSPECIFIED: CandidateSource
CANDIDATE_SOURCE_PROFILE: CandidateSource
CANDIDATE_SOURCE_QUERY: CandidateSource
CANDIDATE_SOURCE_POPULAR: CandidateSource
CANDIDATE_SOURCE_SIMILAR_ITEM: CandidateSource
CANDIDATE_SOURCE_SEQUENTIAL: CandidateSource
CANDIDATE_SOURCE_COLLABORATIVE: CandidateSource
CANDIDATE_SOURCE_TRENDING: CandidateSource
CANDIDATE_SOURCE_FACTORS: CandidateSource

class Item(_message.Message):
    __slots__ = ("item_id", "title", "description", "tags", "attributes", "update_time", "vector")
    class AttributesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    TITLE_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTES_FIELD_NUMBER: _ClassVar[int]
    UPDATE_TIME_FIELD_NUMBER: _ClassVar[int]
    VECTOR_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    title: str
    description: str
    tags: _containers.RepeatedScalarFieldContainer[str]
    attributes: _containers.ScalarMap[str, str]
    update_time: _timestamp_pb2.Timestamp
    vector: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, item_id: _Optional[str] = ..., title: _Optional[str] = ..., description: _Optional[str] = ..., tags: _Optional[_Iterable[str]] = ..., attributes: _Optional[_Mapping[str, str]] = ..., update_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., vector: _Optional[_Iterable[float]] = ...) -> None: ...

class UpsertItemsRequest(_message.Message):
    __slots__ = ("items", "vector_model")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    VECTOR_MODEL_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[Item]
    vector_model: str
    def __init__(self, items: _Optional[_Iterable[_Union[Item, _Mapping]]] = ..., vector_model: _Optional[str] = ...) -> None: ...

class UpsertItemsResponse(_message.Message):
    __slots__ = ("upserted_count",)
    UPSERTED_COUNT_FIELD_NUMBER: _ClassVar[int]
    upserted_count: int
    def __init__(self, upserted_count: _Optional[int] = ...) -> None: ...

class DeleteItemsRequest(_message.Message):
    __slots__ = ("item_ids",)
    ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    item_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, item_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class DeleteItemsResponse(_message.Message):
    __slots__ = ("deleted_count", "missing_item_ids")
    DELETED_COUNT_FIELD_NUMBER: _ClassVar[int]
    MISSING_ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    deleted_count: int
    missing_item_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, deleted_count: _Optional[int] = ..., missing_item_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class GetItemRequest(_message.Message):
    __slots__ = ("item_id",)
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    def __init__(self, item_id: _Optional[str] = ...) -> None: ...

class GetItemResponse(_message.Message):
    __slots__ = ("item",)
    ITEM_FIELD_NUMBER: _ClassVar[int]
    item: Item
    def __init__(self, item: _Optional[_Union[Item, _Mapping]] = ...) -> None: ...

class UserEvent(_message.Message):
    __slots__ = ("event_id", "user_id", "event_type", "item_id", "value", "text", "event_time", "attribution_token")
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    EVENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    EVENT_TIME_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTION_TOKEN_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    user_id: str
    event_type: EventType
    item_id: str
    value: float
    text: str
    event_time: _timestamp_pb2.Timestamp
    attribution_token: str
    def __init__(self, event_id: _Optional[str] = ..., user_id: _Optional[str] = ..., event_type: _Optional[_Union[EventType, str]] = ..., item_id: _Optional[str] = ..., value: _Optional[float] = ..., text: _Optional[str] = ..., event_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., attribution_token: _Optional[str] = ...) -> None: ...

class EventAck(_message.Message):
    __slots__ = ("event_id", "user_id", "status", "profile_version", "reason")
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    PROFILE_VERSION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    user_id: str
    status: EventStatus
    profile_version: int
    reason: str
    def __init__(self, event_id: _Optional[str] = ..., user_id: _Optional[str] = ..., status: _Optional[_Union[EventStatus, str]] = ..., profile_version: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class WriteUserEventsRequest(_message.Message):
    __slots__ = ("events",)
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[UserEvent]
    def __init__(self, events: _Optional[_Iterable[_Union[UserEvent, _Mapping]]] = ...) -> None: ...

class WriteUserEventsResponse(_message.Message):
    __slots__ = ("acks",)
    ACKS_FIELD_NUMBER: _ClassVar[int]
    acks: _containers.RepeatedCompositeFieldContainer[EventAck]
    def __init__(self, acks: _Optional[_Iterable[_Union[EventAck, _Mapping]]] = ...) -> None: ...

class StreamUserEventsRequest(_message.Message):
    __slots__ = ("events",)
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[UserEvent]
    def __init__(self, events: _Optional[_Iterable[_Union[UserEvent, _Mapping]]] = ...) -> None: ...

class StreamUserEventsResponse(_message.Message):
    __slots__ = ("acks",)
    ACKS_FIELD_NUMBER: _ClassVar[int]
    acks: _containers.RepeatedCompositeFieldContainer[EventAck]
    def __init__(self, acks: _Optional[_Iterable[_Union[EventAck, _Mapping]]] = ...) -> None: ...

class AttributeFilter(_message.Message):
    __slots__ = ("conditions",)
    CONDITIONS_FIELD_NUMBER: _ClassVar[int]
    conditions: _containers.RepeatedCompositeFieldContainer[AttributeCondition]
    def __init__(self, conditions: _Optional[_Iterable[_Union[AttributeCondition, _Mapping]]] = ...) -> None: ...

class AttributeCondition(_message.Message):
    __slots__ = ("attribute", "any_of", "min_value", "max_value", "exclude")
    ATTRIBUTE_FIELD_NUMBER: _ClassVar[int]
    ANY_OF_FIELD_NUMBER: _ClassVar[int]
    MIN_VALUE_FIELD_NUMBER: _ClassVar[int]
    MAX_VALUE_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_FIELD_NUMBER: _ClassVar[int]
    attribute: str
    any_of: _containers.RepeatedScalarFieldContainer[str]
    min_value: float
    max_value: float
    exclude: bool
    def __init__(self, attribute: _Optional[str] = ..., any_of: _Optional[_Iterable[str]] = ..., min_value: _Optional[float] = ..., max_value: _Optional[float] = ..., exclude: _Optional[bool] = ...) -> None: ...

class RecommendRequest(_message.Message):
    __slots__ = ("user_id", "page_size", "query", "filter", "include_seen", "min_profile_version", "diversity")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    QUERY_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_SEEN_FIELD_NUMBER: _ClassVar[int]
    MIN_PROFILE_VERSION_FIELD_NUMBER: _ClassVar[int]
    DIVERSITY_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    page_size: int
    query: str
    filter: AttributeFilter
    include_seen: bool
    min_profile_version: int
    diversity: float
    def __init__(self, user_id: _Optional[str] = ..., page_size: _Optional[int] = ..., query: _Optional[str] = ..., filter: _Optional[_Union[AttributeFilter, _Mapping]] = ..., include_seen: _Optional[bool] = ..., min_profile_version: _Optional[int] = ..., diversity: _Optional[float] = ...) -> None: ...

class RecommendedItem(_message.Message):
    __slots__ = ("item_id", "title", "score", "sources", "reason")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    TITLE_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    SOURCES_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    title: str
    score: float
    sources: _containers.RepeatedScalarFieldContainer[CandidateSource]
    reason: str
    def __init__(self, item_id: _Optional[str] = ..., title: _Optional[str] = ..., score: _Optional[float] = ..., sources: _Optional[_Iterable[_Union[CandidateSource, str]]] = ..., reason: _Optional[str] = ...) -> None: ...

class RecommendResponse(_message.Message):
    __slots__ = ("items", "profile_version", "attribution_token")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    PROFILE_VERSION_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTION_TOKEN_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[RecommendedItem]
    profile_version: int
    attribution_token: str
    def __init__(self, items: _Optional[_Iterable[_Union[RecommendedItem, _Mapping]]] = ..., profile_version: _Optional[int] = ..., attribution_token: _Optional[str] = ...) -> None: ...

class SimilarItemsRequest(_message.Message):
    __slots__ = ("item_id", "page_size", "filter")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    page_size: int
    filter: AttributeFilter
    def __init__(self, item_id: _Optional[str] = ..., page_size: _Optional[int] = ..., filter: _Optional[_Union[AttributeFilter, _Mapping]] = ...) -> None: ...

class SimilarItemsResponse(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[RecommendedItem]
    def __init__(self, items: _Optional[_Iterable[_Union[RecommendedItem, _Mapping]]] = ...) -> None: ...

class GetUserProfileRequest(_message.Message):
    __slots__ = ("user_id",)
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    def __init__(self, user_id: _Optional[str] = ...) -> None: ...

class EventTypeCount(_message.Message):
    __slots__ = ("event_type", "count")
    EVENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    event_type: EventType
    count: int
    def __init__(self, event_type: _Optional[_Union[EventType, str]] = ..., count: _Optional[int] = ...) -> None: ...

class GetUserProfileResponse(_message.Message):
    __slots__ = ("user_id", "profile_version", "event_counts", "top_titles", "top_tags", "last_event_time")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    PROFILE_VERSION_FIELD_NUMBER: _ClassVar[int]
    EVENT_COUNTS_FIELD_NUMBER: _ClassVar[int]
    TOP_TITLES_FIELD_NUMBER: _ClassVar[int]
    TOP_TAGS_FIELD_NUMBER: _ClassVar[int]
    LAST_EVENT_TIME_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    profile_version: int
    event_counts: _containers.RepeatedCompositeFieldContainer[EventTypeCount]
    top_titles: _containers.RepeatedScalarFieldContainer[str]
    top_tags: _containers.RepeatedScalarFieldContainer[str]
    last_event_time: _timestamp_pb2.Timestamp
    def __init__(self, user_id: _Optional[str] = ..., profile_version: _Optional[int] = ..., event_counts: _Optional[_Iterable[_Union[EventTypeCount, _Mapping]]] = ..., top_titles: _Optional[_Iterable[str]] = ..., top_tags: _Optional[_Iterable[str]] = ..., last_event_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class DeleteUserRequest(_message.Message):
    __slots__ = ("user_id",)
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    def __init__(self, user_id: _Optional[str] = ...) -> None: ...

class DeleteUserResponse(_message.Message):
    __slots__ = ("deleted_event_count",)
    DELETED_EVENT_COUNT_FIELD_NUMBER: _ClassVar[int]
    deleted_event_count: int
    def __init__(self, deleted_event_count: _Optional[int] = ...) -> None: ...

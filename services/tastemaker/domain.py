"""Domain types passed between components. Protobuf never travels past the gateway."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Optional

import numpy as np


class EventType(enum.IntEnum):
    """What a user did. Values match `tastemaker.v1.EventType`."""

    VIEW = 1
    CLICK = 2
    ADD_TO_CART = 3
    PURCHASE = 4
    RATING = 5
    REVIEW = 6
    SEARCH = 7
    SKIP = 8
    DISLIKE = 9


#: Event types that must name an item.
ITEM_EVENT_TYPES = frozenset(
    {
        EventType.VIEW,
        EventType.CLICK,
        EventType.ADD_TO_CART,
        EventType.PURCHASE,
        EventType.RATING,
        EventType.SKIP,
        EventType.DISLIKE,
    }
)
#: Event types that must carry text (encoded by the encoder pool).
TEXT_EVENT_TYPES = frozenset({EventType.REVIEW, EventType.SEARCH})


class EventStatus(enum.IntEnum):
    """Outcome of one event. Values match `tastemaker.v1.EventStatus`."""

    ACCEPTED = 1
    DUPLICATE = 2
    REJECTED = 3


class CandidateSource(enum.IntEnum):
    """Who proposed a candidate. Values match `tastemaker.v1.CandidateSource`."""

    PROFILE = 1
    QUERY = 2
    POPULAR = 3
    SIMILAR_ITEM = 4
    SEQUENTIAL = 5
    COLLABORATIVE = 6
    TRENDING = 7
    FACTORS = 8


@dataclass
class Item:
    """A catalog item. `vector` is set once the encoder has seen the item's text."""

    item_id: str
    title: str = ""
    description: str = ""
    tags: list[str] = field(default_factory=list)
    attributes: dict[str, str] = field(default_factory=dict)
    update_time: float = 0.0
    vector: Optional[np.ndarray] = None

    def text(self) -> str:
        """The text the encoder sees: title, description and tags."""
        parts = [self.title.strip()]
        if self.description.strip():
            parts.append(self.description.strip())
        if self.tags:
            parts.append("Tags: " + ", ".join(self.tags))
        return ". ".join(p for p in parts if p)


@dataclass
class UserEvent:
    """One user event after validation. For text events the gateway fills `text_vector` and, for
    reviews, `sentiment` in [-1, 1] (how much closer the text is to praise than to complaint)."""

    event_id: str
    user_id: str
    event_type: EventType
    item_id: str = ""
    value: float = 0.0
    text: str = ""
    event_time: float = 0.0
    attribution_token: str = ""
    text_vector: Optional[np.ndarray] = None
    sentiment: float = 0.0


@dataclass
class EventAck:
    """Acknowledgement of one event."""

    event_id: str
    user_id: str
    status: EventStatus
    profile_version: int = 0
    reason: str = ""


@dataclass
class AttributeCondition:
    """One filter condition on one item attribute; see `RecommendRequest.filter` in the proto."""

    attribute: str
    any_of: list[str] = field(default_factory=list)
    min_value: Optional[float] = None
    max_value: Optional[float] = None
    exclude: bool = False


@dataclass
class HistoryEntry:
    """One recent interaction kept in the profile, used for reasons and item-to-item recall."""

    item_id: str
    event_type: EventType
    value: float
    weight: float
    event_time: float


@dataclass
class ProfileView:
    """What retrieval needs to know about a user, copied out of the owning profile shard."""

    user_id: str
    profile_version: int = 0
    vector: Optional[np.ndarray] = None
    negative_vector: Optional[np.ndarray] = None
    seen_item_ids: list[str] = field(default_factory=list)
    recent: list[HistoryEntry] = field(default_factory=list)


@dataclass
class RecommendQuery:
    """A validated Recommend (or SimilarItems) request, in domain terms."""

    user_id: str = ""
    page_size: int = 10
    query: str = ""
    query_vector: Optional[np.ndarray] = None
    filter: list[AttributeCondition] = field(default_factory=list)
    include_seen: bool = False
    diversity: float = 0.0


@dataclass
class ScoredItem:
    """One recommended item with its score, sources and a grounded reason."""

    item_id: str
    title: str
    score: float
    sources: list[CandidateSource]
    reason: str


@dataclass
class UserProfileSummary:
    """A readable view of a profile (GetUserProfile)."""

    user_id: str
    profile_version: int
    event_counts: dict[EventType, int]
    top_titles: list[str]
    top_tags: list[str]
    last_event_time: float

"""Item metadata held by retrieval replicas: titles, tags, attributes, popularity, and the
attribute filters evaluated over them."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

from tastemaker.domain import AttributeCondition, Item
from tastemaker.errors import InvalidArgument


@dataclass
class ItemMeta:
    """What ranking and explanations need of an item besides its vector."""

    title: str
    tags: list[str] = field(default_factory=list)
    attributes: dict[str, str] = field(default_factory=dict)


def _attribute_values(raw: str) -> list[str]:
    """Attributes may hold several values separated by '|' (e.g. MovieLens genres)."""
    return [v.strip() for v in raw.split("|")] if "|" in raw else [raw.strip()]


def condition_matches(condition: AttributeCondition, attributes: dict[str, str]) -> bool:
    """Does one item satisfy one condition? Missing attributes never match (before `exclude`)."""
    raw = attributes.get(condition.attribute)
    ok = raw is not None
    if ok and condition.any_of:
        wanted = {v.casefold() for v in condition.any_of}
        ok = any(v.casefold() in wanted for v in _attribute_values(raw))
    if ok and (condition.min_value is not None or condition.max_value is not None):
        try:
            number = float(raw)
        except ValueError:
            ok = False
        else:
            ok = (condition.min_value is None or number >= condition.min_value) and (
                condition.max_value is None or number <= condition.max_value
            )
    return ok != condition.exclude


def validate_conditions(conditions: Sequence[AttributeCondition]) -> None:
    """Reject conditions that could never mean anything."""
    for c in conditions:
        if not c.attribute:
            raise InvalidArgument("filter condition has an empty attribute name")
        if not c.any_of and c.min_value is None and c.max_value is None:
            raise InvalidArgument(
                f"filter condition on {c.attribute!r} needs any_of values or a min_value/max_value range"
            )
        if c.min_value is not None and c.max_value is not None and c.min_value > c.max_value:
            raise InvalidArgument(
                f"filter condition on {c.attribute!r} has min_value {c.min_value} > max_value {c.max_value}"
            )


class Catalog:
    """Item metadata plus popularity; the vectors live in the index."""

    def __init__(self) -> None:
        self.items: dict[str, ItemMeta] = {}
        self.popularity: dict[str, int] = {}
        self._popular_order: list[str] = []
        self._max_log_pop = 1.0

    def upsert(self, item: Item) -> None:
        self.items[item.item_id] = ItemMeta(item.title, list(item.tags), dict(item.attributes))
        self._popular_order = []

    def remove(self, item_id: str) -> None:
        self.items.pop(item_id, None)
        self._popular_order = []

    def set_popularity(self, counts: dict[str, int]) -> None:
        self.popularity = dict(counts)
        self._popular_order = []

    def popular_order(self) -> list[str]:
        """All live items, most popular first; ties by id for determinism."""
        if not self._popular_order:
            self._popular_order = sorted(self.items, key=lambda i: (-self.popularity.get(i, 0), i))
            top = self.popularity.get(self._popular_order[0], 0) if self._popular_order else 0
            self._max_log_pop = max(1.0, math.log1p(top))
        return self._popular_order

    def popularity_score(self, item_id: str) -> float:
        """log-popularity scaled to [0, 1]."""
        self.popular_order()
        return math.log1p(self.popularity.get(item_id, 0)) / self._max_log_pop

    def matching_ids(self, conditions: Sequence[AttributeCondition]) -> Optional[set[str]]:
        """Ids passing every condition; None when there are no conditions (everything passes)."""
        if not conditions:
            return None
        return {
            item_id
            for item_id, meta in self.items.items()
            if all(condition_matches(c, meta.attributes) for c in conditions)
        }

"""Loading the MovieLens demo (and user files) into a running service through the public API."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Iterator, Optional

from tqdm import tqdm

from tastemaker.client import TastemakerClient
from tastemaker.datasets.movielens import MovieLens, Rating
from tastemaker.domain import EventType, Item
from tastemaker.errors import InvalidArgument
from tastemaker.v1 import recommender_service_pb2 as pb

DEMO_DONE_MARKER = "demo.done"
DEMO_PENDING_MARKER = "demo.pending"


def item_to_message(item: Item) -> pb.Item:
    return pb.Item(
        item_id=item.item_id, title=item.title, description=item.description, tags=item.tags, attributes=item.attributes
    )


def rating_to_message(rating: Rating) -> pb.UserEvent:
    """A MovieLens rating as a rating event; the id makes re-loading idempotent."""
    event = pb.UserEvent(
        event_id=f"ml-{rating.item_id}-{int(rating.timestamp)}",
        user_id=rating.user_id,
        event_type=pb.EVENT_TYPE_RATING,
        item_id=rating.item_id,
        value=rating.rating,
    )
    event.event_time.FromSeconds(int(rating.timestamp))
    return event


def load_dataset(client: TastemakerClient, data: MovieLens, show_progress: bool = True) -> tuple[int, int]:
    """Upsert the catalog (encoded in batches, with a progress bar), then the rating history."""
    messages = [item_to_message(i) for i in data.items]
    with tqdm(total=len(messages), desc="encoding catalog", unit="item", disable=not show_progress) as bar:
        items = client.upsert_items(messages, batch_size=128, progress=bar)
    events = [rating_to_message(r) for r in data.ratings]
    with tqdm(total=len(events), desc="loading ratings", unit="event", disable=not show_progress) as bar:
        acks = client.write_events(events, batch_size=2_000, progress=bar)
    rejected = [a for a in acks if a.status == pb.EVENT_STATUS_REJECTED]
    if rejected:
        raise InvalidArgument(f"{len(rejected)} demo events were rejected, e.g. {rejected[0].reason}")
    return items, len(acks)


# -- user files ---------------------------------------------------------------------------
def parse_json_object(line: str, where: str) -> dict:
    """One line of a JSON Lines file as a JSON object; `where` (file:line) starts the error."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise InvalidArgument(f"{where}: not valid JSON ({exc.msg}): {line[:80]!r}") from None
    if not isinstance(record, dict):
        raise InvalidArgument(f"{where}: each line must be a JSON object: {line[:80]!r}")
    return record


def _read_jsonl(path: Path) -> Iterator[dict]:
    if not path.is_file():
        raise InvalidArgument(f"{path} does not exist")
    with path.open() as f:
        for line_number, line in enumerate(f, 1):
            if line.strip():
                yield parse_json_object(line, f"{path}:{line_number}")


#: The fields of a line of an items file.
ITEM_FIELDS = ("item_id", "title", "description", "tags", "attributes")


def item_from_record(record: dict, where: str) -> pb.Item:
    """One line of an items file as a message; `where` (file, line) goes into the error. Shared
    by `load items` and the bulk encoder (`tastemaker encode`), so both read a file the same way."""
    unknown = set(record) - set(ITEM_FIELDS)
    if unknown:
        raise InvalidArgument(f"{where}: unknown item fields {sorted(unknown)}")
    return pb.Item(
        item_id=str(record.get("item_id", "")),
        title=record.get("title", ""),
        description=record.get("description", ""),
        tags=list(record.get("tags", [])),
        attributes={str(k): str(v) for k, v in record.get("attributes", {}).items()},
    )


def items_from_jsonl(path: Path) -> list[pb.Item]:
    """Items file: one JSON object per line with item_id, title, description, tags, attributes."""
    return [item_from_record(record, str(path)) for record in _read_jsonl(path)]


def _event_time(value) -> Optional[float]:
    if value in (None, ""):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()


def events_from_jsonl(path: Path) -> list[pb.UserEvent]:
    """Events file: JSON objects with event_id, user_id, event_type (e.g. "rating"), item_id,
    value, text, event_time (epoch seconds or ISO 8601)."""
    names = {t.name.lower(): t for t in EventType}
    out = []
    for record in _read_jsonl(path):
        type_name = str(record.get("event_type", "")).lower()
        if type_name not in names:
            raise InvalidArgument(f"{path}: event_type {type_name!r} is not one of {sorted(names)}")
        event = pb.UserEvent(
            event_id=str(record.get("event_id", "")),
            user_id=str(record.get("user_id", "")),
            event_type=int(names[type_name]),
            item_id=str(record.get("item_id", "")),
            value=float(record.get("value", 0) or 0),
            text=record.get("text", ""),
        )
        when = _event_time(record.get("event_time"))
        if when is not None:
            event.event_time.FromNanoseconds(int(when * 1e9))
        out.append(event)
    return out


"""Evaluation data: a catalog with text and an interaction log, as integer arrays in log order.

Two sources:

- ``movielens`` (or a folder holding MovieLens' movies.csv/ratings.csv/tags.csv): the vendored
  MovieLens latest-small copy, through `tastemaker.datasets.movielens`.
- An interactions file (``.csv``, ``.parquet``) plus an items file (``--items``: ``.csv``,
  ``.parquet`` or ``.jsonl``). Interaction columns: ``user_id``, ``item_id``, ``timestamp``
  (Unix seconds or ISO 8601), optional ``rating`` (0.5-5 stars; rows become rating events) and
  optional ``event_type`` (view, click, add_to_cart, purchase, rating, skip, dislike; default
  ``rating`` when a rating is given, else ``click``). Item columns: ``item_id``, ``title``,
  optional ``description`` and ``tags`` (``|``-separated in CSV/Parquet, a list in JSONL).

Order is never file order: events are sorted by timestamp, and equal timestamps by a permutation
drawn from the seed. Items get their internal index from another seeded permutation, so every
"lowest index first" tie-break downstream is a seeded item order, never an id order. Repeated
interactions of one user with one item keep the first (the task is finding items that are new to
the user), and events on items missing from the items file are dropped and counted.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from tastemaker.domain import EventType, Item
from tastemaker.errors import InvalidArgument

#: Event types a file may name, and the ones evaluation accepts (items only, no text events).
EVENT_TYPE_NAMES: dict[str, EventType] = {
    "view": EventType.VIEW,
    "click": EventType.CLICK,
    "add_to_cart": EventType.ADD_TO_CART,
    "purchase": EventType.PURCHASE,
    "rating": EventType.RATING,
    "skip": EventType.SKIP,
    "dislike": EventType.DISLIKE,
}
INTERACTION_COLUMNS = ("user_id", "item_id", "timestamp")
ITEM_COLUMNS = ("item_id", "title")


@dataclass
class Interactions:
    """A catalog and an interaction log. Event arrays are parallel and in log order (time, then
    a seeded random rank); `items[i]` is the item with internal index i."""

    name: str
    items: list[Item]
    user_ids: list[str]
    user: np.ndarray  # int32 internal user index per event
    item: np.ndarray  # int32 internal item index per event
    time: np.ndarray  # float64 Unix seconds
    rating: np.ndarray  # float32 stars, NaN when the event is not a rating
    event_type: np.ndarray  # int8 EventType value
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def n_items(self) -> int:
        return len(self.items)

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    @property
    def n_events(self) -> int:
        return int(self.user.shape[0])


@dataclass
class InteractionRow:
    """One interaction as read from a file, before indexing."""

    user_id: str
    item_id: str
    time: float
    rating: float
    event_type: EventType


def load_interactions(
    dataset: str,
    *,
    items_path: Optional[str] = None,
    seed: int = 0,
    max_items: Optional[int] = None,
    max_users: Optional[int] = None,
) -> Interactions:
    """Load ``movielens``, a MovieLens folder, or an interactions file plus `items_path`.

    `max_items`/`max_users` keep a deterministic slice: the most-interacted items, then the most
    active users on them (MovieLens uses `datasets.movielens.subsample`, with its genre quota).
    """
    path = Path(dataset).expanduser()
    if dataset == "movielens" or (path.is_dir() and (path / "ratings.csv").is_file()):
        return _from_movielens(None if dataset == "movielens" else path, seed, max_items, max_users)
    if path.is_dir():
        raise InvalidArgument(
            f"--dataset {dataset}: a folder must hold MovieLens' movies.csv and ratings.csv; for your own "
            "data pass the interactions file (.csv or .parquet) and --items"
        )
    if not path.is_file():
        raise InvalidArgument(
            f"--dataset {dataset!r} is neither 'movielens' nor an existing file; pass 'movielens', a "
            "MovieLens folder, or a .csv/.parquet interactions file with columns user_id,item_id,timestamp[,rating]"
        )
    if not items_path:
        raise InvalidArgument(
            f"--dataset {dataset}: an interactions file needs --items FILE with columns "
            "item_id,title[,description,tags] (the item text the encoder reads)"
        )
    items = read_items(Path(items_path).expanduser())
    rows = read_interaction_rows(path)
    known = {item.item_id for item in items}
    kept = [r for r in rows if r.item_id in known]
    dropped = len(rows) - len(kept)
    if not kept:
        raise InvalidArgument(f"{path}: none of its {len(rows)} interactions names an item of {items_path}")
    data = build_interactions(path.stem, items, kept, seed)
    data.stats["dropped_unknown_item_events"] = dropped
    if max_items or max_users:
        data = subsample_interactions(data, max_items=max_items, max_users=max_users, seed=seed)
    return data


def _from_movielens(folder: Optional[Path], seed: int, max_items: Optional[int], max_users: Optional[int]) -> Interactions:
    from tastemaker.datasets.movielens import load_movielens, subsample

    ml = load_movielens(folder, seed=seed)
    if max_items or max_users:
        ml = subsample(ml, max_items=max_items or len(ml.items), max_users=max_users or 10**9, seed=seed)
    rows = [InteractionRow(r.user_id, r.item_id, r.timestamp, r.rating, EventType.RATING) for r in ml.ratings]
    data = build_interactions("movielens" if folder is None else folder.name, ml.items, rows, seed)
    data.stats["dropped_unknown_item_events"] = 0
    return data


def build_interactions(name: str, items: Sequence[Item], rows: Sequence[InteractionRow], seed: int = 0) -> Interactions:
    """Index users and items, sort events into log order, keep the first of repeated pairs."""
    rng = np.random.default_rng([seed, 17])
    # Items: a seeded permutation of the catalog becomes the internal order.
    catalog = list(items)
    item_perm = rng.permutation(len(catalog))
    ordered_items = [catalog[i] for i in item_perm]
    item_index = {item.item_id: i for i, item in enumerate(ordered_items)}
    user_ids = sorted({r.user_id for r in rows})
    user_index = {u: i for i, u in enumerate(user_ids)}
    n = len(rows)
    user = np.fromiter((user_index[r.user_id] for r in rows), dtype=np.int32, count=n)
    item = np.fromiter((item_index[r.item_id] for r in rows), dtype=np.int32, count=n)
    time = np.fromiter((r.time for r in rows), dtype=np.float64, count=n)
    rating = np.fromiter((r.rating for r in rows), dtype=np.float32, count=n)
    etype = np.fromiter((int(r.event_type) for r in rows), dtype=np.int8, count=n)
    # Log order: time, equal times by a seeded random rank (file order would leak information).
    order = np.lexsort((rng.permutation(n), time))
    user, item, time, rating, etype = user[order], item[order], time[order], rating[order], etype[order]
    # First interaction per (user, item) pair.
    pair = user.astype(np.int64) * len(ordered_items) + item
    _, first = np.unique(pair, return_index=True)
    keep = np.sort(first)
    repeats = n - keep.shape[0]
    data = Interactions(
        name=name,
        items=ordered_items,
        user_ids=user_ids,
        user=user[keep],
        item=item[keep],
        time=time[keep],
        rating=rating[keep],
        event_type=etype[keep],
    )
    data.stats.update(
        {
            "items": data.n_items,
            "users": data.n_users,
            "events": data.n_events,
            "repeated_pairs_dropped": int(repeats),
            "items_with_events": int(np.unique(data.item).shape[0]),
        }
    )
    if data.n_events:
        data.stats["first_event"] = _iso(float(data.time.min()))
        data.stats["last_event"] = _iso(float(data.time.max()))
    return data


def subsample_interactions(
    data: Interactions, *, max_items: Optional[int], max_users: Optional[int], seed: int = 0
) -> Interactions:
    """Keep the `max_items` most-interacted items, then the `max_users` most active users on
    them; equal counts ordered by a seeded draw (for files; MovieLens has its own `subsample`)."""
    rng = np.random.default_rng([seed, 29])
    counts = np.bincount(data.item, minlength=data.n_items)
    ranked = np.lexsort((rng.permutation(data.n_items), -counts))
    kept_items = np.zeros(data.n_items, dtype=bool)
    kept_items[ranked[: max_items or data.n_items]] = True
    on_items = kept_items[data.item]
    user_counts = np.bincount(data.user[on_items], minlength=data.n_users)
    ranked_users = np.lexsort((rng.permutation(data.n_users), -user_counts))
    ranked_users = ranked_users[user_counts[ranked_users] > 0]
    kept_users = np.zeros(data.n_users, dtype=bool)
    kept_users[ranked_users[: max_users or data.n_users]] = True
    mask = on_items & kept_users[data.user]
    item_map = -np.ones(data.n_items, dtype=np.int64)
    item_map[kept_items] = np.arange(int(kept_items.sum()))
    user_map = -np.ones(data.n_users, dtype=np.int64)
    user_map[kept_users] = np.arange(int(kept_users.sum()))
    out = Interactions(
        name=data.name,
        items=[it for it, k in zip(data.items, kept_items) if k],
        user_ids=[u for u, k in zip(data.user_ids, kept_users) if k],
        user=user_map[data.user[mask]].astype(np.int32),
        item=item_map[data.item[mask]].astype(np.int32),
        time=data.time[mask],
        rating=data.rating[mask],
        event_type=data.event_type[mask],
        stats=dict(data.stats),
    )
    out.stats.update({"items": out.n_items, "users": out.n_users, "events": out.n_events})
    return out


# -- file readers -----------------------------------------------------------------------
def _read_table(path: Path, required: Sequence[str]) -> list[dict[str, Any]]:
    """Rows of a CSV, Parquet or JSON Lines file as dicts, after checking the columns."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as exc:  # pragma: no cover - pyarrow is a dependency
            raise InvalidArgument("reading Parquet needs pyarrow (pip install pyarrow)") from exc
        table = pq.read_table(path)
        columns = table.column_names
        _check_columns(path, columns, required)
        rows = table.to_pylist()
    elif suffix in (".csv", ".tsv"):
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
            columns = list(reader.fieldnames or [])
            _check_columns(path, columns, required)
            rows = list(reader)
    elif suffix in (".jsonl", ".ndjson"):
        rows = []
        with path.open(encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as exc:
                        raise InvalidArgument(f"{path}:{line_no}: not valid JSON: {exc}") from exc
        columns = sorted({k for r in rows for k in r}) if rows else list(required)
        _check_columns(path, columns, required)
    else:
        raise InvalidArgument(f"{path}: unsupported file type {suffix!r}; use .csv, .tsv, .parquet or .jsonl")
    return rows


def _check_columns(path: Path, columns: Sequence[str], required: Sequence[str]) -> None:
    missing = [c for c in required if c not in columns]
    if missing:
        raise InvalidArgument(f"{path}: missing columns {missing}; it has {list(columns)}")


def read_items(path: Path) -> list[Item]:
    """Catalog items from a file with item_id, title[, description, tags]."""
    if not path.is_file():
        raise InvalidArgument(f"--items {path}: no such file")
    items: dict[str, Item] = {}
    for n, row in enumerate(_read_table(path, ITEM_COLUMNS), 1):
        item_id = str(row.get("item_id") or "").strip()
        if not item_id:
            raise InvalidArgument(f"{path}: row {n} has an empty item_id")
        tags = row.get("tags") or []
        if isinstance(tags, str):
            tags = [t.strip() for t in tags.split("|") if t.strip()]
        items[item_id] = Item(
            item_id=item_id,
            title=str(row.get("title") or ""),
            description=str(row.get("description") or ""),
            tags=[str(t) for t in tags],
        )
    if not items:
        raise InvalidArgument(f"{path}: no items")
    return list(items.values())


def read_interaction_rows(path: Path) -> list[InteractionRow]:
    """Interactions from a file with user_id, item_id, timestamp[, rating, event_type]."""
    rows = []
    for n, raw in enumerate(_read_table(path, INTERACTION_COLUMNS), 1):
        user_id = str(raw.get("user_id") or "").strip()
        item_id = str(raw.get("item_id") or "").strip()
        if not user_id or not item_id:
            raise InvalidArgument(f"{path}: row {n} has an empty user_id or item_id")
        rating = _number(raw.get("rating"))
        type_name = str(raw.get("event_type") or "").strip().lower()
        if type_name:
            if type_name not in EVENT_TYPE_NAMES:
                raise InvalidArgument(
                    f"{path}: row {n}: unknown event_type {type_name!r}; allowed: {sorted(EVENT_TYPE_NAMES)}"
                )
            etype = EVENT_TYPE_NAMES[type_name]
        else:
            etype = EventType.RATING if rating is not None else EventType.CLICK
        if etype == EventType.RATING and (rating is None or not 0.5 <= rating <= 5.0):
            raise InvalidArgument(f"{path}: row {n}: a rating event needs a rating in [0.5, 5], got {raw.get('rating')!r}")
        rows.append(
            InteractionRow(user_id, item_id, _timestamp(raw.get("timestamp"), path, n), math.nan if rating is None else rating, etype)
        )
    if not rows:
        raise InvalidArgument(f"{path}: no interactions")
    return rows


def _number(value: Any) -> Optional[float]:
    if value is None or value == "":
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(number) else number


def _timestamp(value: Any, path: Path, n: int) -> float:
    """Unix seconds from a number, a numeric string, an ISO 8601 string or a datetime."""
    if isinstance(value, datetime):
        return _utc(value).timestamp()
    number = _number(value)
    if number is not None:
        return number
    if isinstance(value, str) and value.strip():
        try:
            return _utc(datetime.fromisoformat(value.strip().replace("Z", "+00:00"))).timestamp()
        except ValueError:
            pass
    raise InvalidArgument(f"{path}: row {n}: timestamp {value!r} is neither Unix seconds nor ISO 8601")


def _utc(moment: datetime) -> datetime:
    """Times without a zone are UTC (never the machine's local zone)."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=timezone.utc)


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")

"""Load the vendored MovieLens latest-small data set as catalog items and a rating history.

The files live in `data/movielens-latest-small/` at the repository root; its `README.txt` is
the data set's license (see `data/README.md`). Nothing here downloads anything.
"""

from __future__ import annotations

import csv
import math
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from tastemaker.domain import Item

#: The vendored copy, found relative to this file (repo/services/tastemaker/datasets/). It
#: exists in a source checkout only; an installed package must pass `path` explicitly.
DEFAULT_MOVIELENS_DIR = Path(__file__).resolve().parents[3] / "data" / "movielens-latest-small"

#: MovieLens' placeholder for a movie without genres; it is not a genre.
NO_GENRES = "(no genres listed)"

# A release year is a trailing "(YYYY)". Ranges such as "(2006–2007)" are not a single year and
# are deliberately not matched.
_YEAR_RE = re.compile(r"\((\d{4})\)$")


@dataclass
class Rating:
    """One star rating (0.5–5.0) a user gave a movie; `timestamp` is in Unix seconds."""

    user_id: str
    item_id: str
    rating: float
    timestamp: float


@dataclass
class MovieLens:
    """A loaded data set: the catalog in file order and the ratings in time order."""

    items: list[Item]
    ratings: list[Rating]


def load_movielens(
    path: str | os.PathLike[str] | None = None,
    *,
    max_tags_per_item: int = 8,
    seed: int = 0,
) -> MovieLens:
    """Read movies.csv, tags.csv and ratings.csv from `path` (default: the vendored copy).

    Each movie becomes an `Item` with `item_id` = movieId, the title as given (surrounding
    whitespace removed), a "Genres: ..." description, up to `max_tags_per_item` user tags
    (lowercased, deduplicated, most-applied first, ties alphabetical) and the attributes
    `genres` (raw pipe-separated form) and `year`, each only when known.

    Ratings are sorted by timestamp. Ratings with equal timestamps are ordered by a random
    permutation drawn from `numpy.random.default_rng(seed)`, so that the same seed always
    gives the same order but nothing downstream can come to depend on file order.
    """
    if max_tags_per_item < 0:
        raise ValueError(f"max_tags_per_item must be >= 0, got {max_tags_per_item}")
    folder = Path(path) if path is not None else DEFAULT_MOVIELENS_DIR

    tags_by_item = _read_tags(folder / "tags.csv", max_tags_per_item)
    items = [
        _make_item(row["movieId"], row["title"], row["genres"], tags_by_item.get(row["movieId"], []))
        for row in _read_rows(folder / "movies.csv", ("movieId", "title", "genres"))
    ]
    ratings = _read_ratings(folder / "ratings.csv", seed)
    return MovieLens(items=items, ratings=ratings)


def subsample(
    data: MovieLens,
    *,
    max_items: int,
    max_users: int,
    seed: int = 0,
    must_include_genres: tuple[str, ...] = ("Animation", "Children", "Horror"),
) -> MovieLens:
    """Return a smaller, deterministic slice of `data` for tests.

    Keeps the `max_items` most-rated items, except that at least a third of them (rounded up)
    carry one of `must_include_genres` when the data has that many: the most-rated such items
    are taken first, the rest of the slots go to the most-rated remaining items. Then keeps the
    `max_users` users with the most ratings on the kept items, and only the ratings of kept
    users on kept items. Items and ratings keep their order in `data`. Equal counts are ordered
    by a permutation drawn from `numpy.random.default_rng(seed)`, not by id or file order.
    """
    if max_items < 1 or max_users < 1:
        raise ValueError(f"max_items and max_users must be >= 1, got {max_items} and {max_users}")
    rng = np.random.default_rng(seed)

    item_counts = Counter(r.item_id for r in data.ratings)
    ranked_items = _rank_by_count([item.item_id for item in data.items], item_counts, rng)
    wanted = set(must_include_genres)
    genre_ids = {item.item_id for item in data.items if wanted & set(_genres_of(item))}

    # The genre quota is filled first so that the most-rated titles, which skew towards a few
    # genres, cannot crowd out the kinds of items the tests need to see.
    quota = math.ceil(max_items / 3)
    kept_ids = [item_id for item_id in ranked_items if item_id in genre_ids][:quota]
    chosen = set(kept_ids)
    for item_id in ranked_items:
        if len(kept_ids) >= max_items:
            break
        if item_id not in chosen:
            kept_ids.append(item_id)
            chosen.add(item_id)

    on_kept = [r for r in data.ratings if r.item_id in chosen]
    user_counts = Counter(r.user_id for r in on_kept)
    # Sorted ids make the permutation's input independent of rating order.
    kept_users = set(_rank_by_count(sorted(user_counts), user_counts, rng)[:max_users])

    return MovieLens(
        items=[item for item in data.items if item.item_id in chosen],
        ratings=[r for r in on_kept if r.user_id in kept_users],
    )


def _rank_by_count(ids: Sequence[str], counts: Counter[str], rng: np.random.Generator) -> list[str]:
    """`ids` ordered by count (descending), equal counts in the order of a draw from `rng`."""
    tie_break = rng.permutation(len(ids))
    order = sorted(range(len(ids)), key=lambda i: (-counts[ids[i]], tie_break[i]))
    return [ids[i] for i in order]


def _genres_of(item: Item) -> list[str]:
    """The item's genres, read back from its raw `genres` attribute."""
    raw = item.attributes.get("genres", "")
    return raw.split("|") if raw else []


def _read_rows(path: Path, columns: tuple[str, ...]) -> Iterator[dict[str, str]]:
    """Yield the rows of a MovieLens CSV file as dicts, checking its header first."""
    if not path.is_file():
        raise FileNotFoundError(
            f"MovieLens file {path} not found; pass the folder holding movies.csv, tags.csv "
            f"and ratings.csv as `path` (the vendored copy is {DEFAULT_MOVIELENS_DIR})"
        )
    # newline="" lets the csv module handle quoted fields itself, as its docs require.
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in columns if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: missing columns {missing}; header is {reader.fieldnames}")
        yield from reader


def _read_tags(path: Path, max_tags_per_item: int) -> dict[str, list[str]]:
    """Map movieId to its tags: normalised, most-applied first, ties alphabetical, capped."""
    counts: dict[str, Counter[str]] = {}
    for row in _read_rows(path, ("movieId", "tag")):
        tag = row["tag"].strip().lower()
        if tag:
            counts.setdefault(row["movieId"], Counter())[tag] += 1
    return {
        item_id: sorted(c, key=lambda t: (-c[t], t))[:max_tags_per_item]
        for item_id, c in counts.items()
    }


def _make_item(item_id: str, title: str, genres_raw: str, tags: list[str]) -> Item:
    """Build the catalog item for one movies.csv row."""
    # Some titles carry a trailing space after the year, e.g. "Runaway Brain (1995) ".
    title = title.strip()
    genres = [g for g in genres_raw.split("|") if g and g != NO_GENRES]
    attributes: dict[str, str] = {}
    description = ""
    if genres:
        attributes["genres"] = "|".join(genres)
        description = f"Genres: {', '.join(genres)}."
    year = _YEAR_RE.search(title)
    if year:
        attributes["year"] = year.group(1)
    return Item(item_id=item_id, title=title, description=description, tags=tags, attributes=attributes)


def _read_ratings(path: Path, seed: int) -> list[Rating]:
    """Read ratings.csv, sorted by timestamp with seeded random order among equal timestamps."""
    ratings = [
        Rating(
            user_id=row["userId"],
            item_id=row["movieId"],
            rating=float(row["rating"]),
            timestamp=float(row["timestamp"]),
        )
        for row in _read_rows(path, ("userId", "movieId", "rating", "timestamp"))
    ]
    timestamps = np.fromiter((r.timestamp for r in ratings), dtype=np.float64, count=len(ratings))
    tie_break = np.random.default_rng(seed).permutation(len(ratings))
    # lexsort sorts by its last key first: timestamp, then the random rank within a tie.
    order = np.lexsort((tie_break, timestamps))
    return [ratings[i] for i in order]

"""Tests for the MovieLens loader and the test subsample (`tastemaker.datasets.movielens`)."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Sequence

import pytest

from tastemaker.datasets.movielens import (
    DEFAULT_MOVIELENS_DIR,
    MovieLens,
    load_movielens,
    subsample,
)
from tastemaker.domain import Item

KIDS_AND_HORROR = ("Animation", "Children", "Horror")


@pytest.fixture(scope="module")
def full() -> MovieLens:
    """The whole vendored data set, loaded once for this module (about half a second)."""
    return load_movielens()


@pytest.fixture(scope="module")
def by_id(full: MovieLens) -> dict[str, Item]:
    """The full catalog keyed by item id."""
    return {item.item_id: item for item in full.items}


def _genres(item: Item) -> set[str]:
    """The item's genres as a set (empty when it has none)."""
    raw = item.attributes.get("genres", "")
    return set(raw.split("|")) if raw else set()


def _write_dataset(
    folder: Path, *, ratings: Sequence[str], tags: Sequence[str] = (), movies: Sequence[str] = ()
) -> Path:
    """Write a minimal MovieLens folder; each sequence holds CSV lines without the header."""
    folder.mkdir(parents=True, exist_ok=True)
    movies = list(movies) or ["1,Toy Story (1995),Animation", "2,Jumanji (1995),Children", "3,Heat (1995),Crime"]
    (folder / "movies.csv").write_text("movieId,title,genres\n" + "".join(m + "\n" for m in movies))
    (folder / "tags.csv").write_text("userId,movieId,tag,timestamp\n" + "".join(t + "\n" for t in tags))
    (folder / "ratings.csv").write_text("userId,movieId,rating,timestamp\n" + "".join(r + "\n" for r in ratings))
    return folder


# --- the full vendored data -------------------------------------------------------------------


def test_vendored_copy_is_where_the_default_points():
    for name in ("README.txt", "movies.csv", "ratings.csv", "tags.csv", "links.csv"):
        assert (DEFAULT_MOVIELENS_DIR / name).is_file(), name


def test_full_counts(full: MovieLens):
    assert len(full.items) == 9_742
    assert len({item.item_id for item in full.items}) == 9_742
    assert len(full.ratings) == 100_836
    assert len({r.user_id for r in full.ratings}) == 610


def test_toy_story(by_id: dict[str, Item]):
    toy_story = by_id["1"]
    assert toy_story.title == "Toy Story (1995)"
    assert toy_story.description == "Genres: Adventure, Animation, Children, Comedy, Fantasy."
    assert toy_story.attributes == {"genres": "Adventure|Animation|Children|Comedy|Fantasy", "year": "1995"}
    # Applied twice ("pixar") beats applied once ("fun").
    assert toy_story.tags == ["pixar", "fun"]
    assert "Tags: pixar, fun" in toy_story.text()


def test_titles_with_commas_are_parsed_whole(by_id: dict[str, Item]):
    assert by_id["11"].title == "American President, The (1995)"
    assert by_id["11"].attributes == {"genres": "Comedy|Drama|Romance", "year": "1995"}
    city = by_id["29"]
    assert city.title == "City of Lost Children, The (Cité des enfants perdus, La) (1995)"
    assert city.attributes["genres"] == "Adventure|Drama|Fantasy|Mystery|Sci-Fi"
    assert city.attributes["year"] == "1995"


def test_year_despite_trailing_space_and_no_year_for_ranges(by_id: dict[str, Item]):
    # movies.csv has "From Dusk Till Dawn 2: Texas Blood Money (1999) " with a trailing space.
    dusk = by_id["27008"]
    assert dusk.title == "From Dusk Till Dawn 2: Texas Blood Money (1999)"
    assert dusk.attributes["year"] == "1999"
    # "(2006–2007)" is a range, not a release year.
    assert "year" not in by_id["171749"].attributes


def test_no_genres_listed_gives_no_genres_attribute(by_id: dict[str, Item]):
    cravate = by_id["114335"]  # "La cravate (1957)", (no genres listed)
    assert "genres" not in cravate.attributes
    assert cravate.description == ""
    assert cravate.attributes == {"year": "1957"}
    assert not any("no genres" in item.attributes.get("genres", "") for item in by_id.values())


def test_tags_are_capped_and_normalised(full: MovieLens):
    assert max(len(item.tags) for item in full.items) == 8  # the cap is reached, never passed
    for item in full.items:
        assert len(set(item.tags)) == len(item.tags)
        assert all(tag == tag.strip().lower() and tag for tag in item.tags)


def test_ratings_are_in_time_order(full: MovieLens):
    times = [r.timestamp for r in full.ratings]
    assert all(a <= b for a, b in zip(times, times[1:]))
    assert all(0.5 <= r.rating <= 5.0 for r in full.ratings)


# --- small hand-written data sets -------------------------------------------------------------


def test_tag_order_is_count_then_alphabetical(tmp_path: Path):
    tags = [
        "1,1,Funny,10", "2,1, funny ,11", "3,1,FUNNY,12",  # 3 applications after normalising
        "1,1,zany,13", "2,1,Zany,14",  # 2
        "1,1,cute,15", "2,1,cute,16",  # 2, alphabetically before "zany"
        "1,1,odd,17",  # 1
        "1,2,only,18",
    ]
    folder = _write_dataset(tmp_path, ratings=["1,1,4.0,100"], tags=tags)
    items = {item.item_id: item for item in load_movielens(folder).items}
    assert items["1"].tags == ["funny", "cute", "zany", "odd"]
    assert items["2"].tags == ["only"]
    assert items["3"].tags == []
    assert load_movielens(folder, max_tags_per_item=2).items[0].tags == ["funny", "cute"]


def test_equal_timestamps_are_shuffled_by_seed_not_file_order(tmp_path: Path):
    tied = [f"{user},1,3.0,500" for user in range(1, 11)]  # ten ratings at the same second
    # Out-of-order timestamps around the tie check that time still comes first.
    folder = _write_dataset(tmp_path, ratings=["99,2,5.0,900", *tied, "98,3,1.0,100"])
    file_order = [str(user) for user in range(1, 11)]

    def order(seed: int) -> list[str]:
        ratings = load_movielens(folder, seed=seed).ratings
        assert ratings[0].user_id == "98" and ratings[-1].user_id == "99"
        assert sorted(r.user_id for r in ratings[1:-1]) == sorted(file_order)
        return [r.user_id for r in ratings[1:-1]]

    orders = {seed: order(seed) for seed in range(5)}
    for seed, seen in orders.items():
        assert order(seed) == seen, f"seed {seed} is not deterministic"
    assert any(seen != file_order for seen in orders.values())
    assert len({tuple(seen) for seen in orders.values()}) > 1, "the seed has no effect on tie order"


def test_missing_folder_names_the_path(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="tags.csv"):
        load_movielens(tmp_path / "nowhere")


# --- subsample --------------------------------------------------------------------------------


def test_subsample_sizes_and_genre_guarantee(full: MovieLens):
    small = subsample(full, max_items=60, max_users=40)
    kept_items = {item.item_id for item in small.items}
    assert len(small.items) == 60
    assert len({r.user_id for r in small.ratings}) == 40
    assert all(r.item_id in kept_items for r in small.ratings)
    # Among the 60 most-rated movies fewer than a third are Animation/Children/Horror, so this
    # only holds because of the quota.
    with_genre = [item for item in small.items if _genres(item) & set(KIDS_AND_HORROR)]
    assert len(with_genre) >= 20


def test_subsample_keeps_the_most_rated(full: MovieLens):
    wanted = {"Documentary"}  # rare among popular movies: the quota is all that brings them in
    small = subsample(full, max_items=30, max_users=25, must_include_genres=tuple(wanted))
    counts = Counter(r.item_id for r in full.ratings)
    kept = {item.item_id for item in small.items}
    assert sum(1 for item in small.items if _genres(item) & wanted) >= math.ceil(30 / 3)
    # Within each group (wanted genre or not), nothing dropped was rated more than anything kept.
    for in_group in (True, False):
        group = [item.item_id for item in full.items if bool(_genres(item) & wanted) == in_group]
        kept_counts = [counts[i] for i in group if i in kept]
        dropped_counts = [counts[i] for i in group if i not in kept]
        assert min(kept_counts) >= max(dropped_counts)
    # Likewise for users, counted on the kept items only.
    user_counts = Counter(r.user_id for r in full.ratings if r.item_id in kept)
    kept_users = {r.user_id for r in small.ratings}
    assert len(kept_users) == 25
    assert min(user_counts[u] for u in kept_users) >= max(
        n for u, n in user_counts.items() if u not in kept_users
    )


def test_subsample_keeps_order_and_is_deterministic(full: MovieLens):
    small = subsample(full, max_items=50, max_users=30, seed=3)
    again = subsample(full, max_items=50, max_users=30, seed=3)
    assert [i.item_id for i in small.items] == [i.item_id for i in again.items]
    assert small.ratings == again.ratings
    # Items keep catalog order; ratings are exactly the full history filtered, in its order.
    position = {item.item_id: n for n, item in enumerate(full.items)}
    assert [position[i.item_id] for i in small.items] == sorted(position[i.item_id] for i in small.items)
    kept_items = {i.item_id for i in small.items}
    kept_users = {r.user_id for r in small.ratings}
    expected = [r for r in full.ratings if r.item_id in kept_items and r.user_id in kept_users]
    assert small.ratings == expected


def test_subsample_rejects_empty_sizes(full: MovieLens):
    with pytest.raises(ValueError):
        subsample(full, max_items=0, max_users=5)

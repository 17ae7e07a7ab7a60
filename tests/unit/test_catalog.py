"""Catalog filter columns: `Catalog.matching_ids` (vectorised) must agree with the one-item
reference `condition_matches` through upserts, replacements and removals; its `ItemSubset` acts
as a set of ids, and indexes given one as `allowed` search exactly as with the same plain set,
while both the catalog and the index change."""

from __future__ import annotations

import numpy as np
import pytest

from tastemaker.domain import AttributeCondition, Item
from tastemaker.retrieval.ann import PQIndex
from tastemaker.retrieval.catalog import Catalog, ItemSubset, condition_matches
from tastemaker.retrieval.index import FlatIndex

GENRES = ["Drama", "Comedy", "Horror", "Animation", "Children", "Sci-Fi"]


def random_attributes(rng: np.random.Generator) -> dict[str, str]:
    attributes = {}
    if rng.random() < 0.9:
        picks = rng.choice(GENRES, size=int(rng.integers(1, 4)), replace=False)
        # Mixed case and spaces around the pipes, as real feeds send them.
        attributes["genres"] = (" | " if rng.random() < 0.3 else "|").join(
            g.upper() if rng.random() < 0.2 else g for g in picks
        )
    if rng.random() < 0.8:
        attributes["year"] = str(int(rng.integers(1950, 2025))) if rng.random() < 0.9 else "unknown"
    if rng.random() < 0.5:
        attributes["lang"] = str(rng.choice(["en", "fr", "EN", "de"]))
    return attributes


CONDITIONS = [
    [AttributeCondition("genres", any_of=["drama"])],
    [AttributeCondition("genres", any_of=["Horror", "sci-fi"])],
    [AttributeCondition("genres", any_of=["comedy"], exclude=True)],
    [AttributeCondition("genres", any_of=["Anim"])],  # whole values only
    [AttributeCondition("year", min_value=1990, max_value=2000)],
    [AttributeCondition("year", min_value=2010)],
    [AttributeCondition("year", max_value=1960, exclude=True)],
    [AttributeCondition("lang", any_of=["en"]), AttributeCondition("year", min_value=1980)],
    [AttributeCondition("genres", any_of=["drama"]), AttributeCondition("genres", any_of=["children"], exclude=True)],
    [AttributeCondition("mood", any_of=["dark"])],  # an attribute no item has
    [AttributeCondition("mood", any_of=["dark"], exclude=True)],
    [AttributeCondition("year", any_of=["1999", "2001"], min_value=2000)],  # both parts must hold
]


def reference(items: dict[str, dict[str, str]], conditions) -> set[str]:
    return {i for i, attrs in items.items() if all(condition_matches(c, attrs) for c in conditions)}


def test_columns_agree_with_the_reference_through_changes():
    rng = np.random.default_rng(1)
    catalog, model = Catalog(), {}
    for step in range(6):
        batch = []
        for _ in range(300):
            item_id = f"i{int(rng.integers(0, 600))}"  # replacements of live items too
            attributes = random_attributes(rng)
            batch.append(Item(item_id=item_id, title=item_id, attributes=attributes))
            model[item_id] = attributes
        catalog.upsert_many(batch)
        for item_id in rng.choice(sorted(model), size=80, replace=False).tolist():
            catalog.remove(item_id)
            model.pop(item_id)
        catalog.remove("never-there")
        for conditions in CONDITIONS:
            got = catalog.matching_ids(conditions)
            assert isinstance(got, ItemSubset)
            want = reference(model, conditions)
            assert got == want and set(got) == want and len(got) == len(want), (step, conditions)
            assert all(i in got for i in want) and "never-there" not in got
    assert catalog.matching_ids([]) is None
    assert sum(c.dead for c in catalog._columns.values()) < sum(c.pairs for c in catalog._columns.values())


def test_pairs_are_compacted_and_still_right():
    catalog = Catalog()
    items = [Item(item_id=f"i{j}", title="", attributes={"genres": "Drama|Comedy"}) for j in range(2_000)]
    catalog.upsert_many(items)
    for j in range(0, 2_000, 2):  # replacing every other item kills 2,000 pairs: past half -> compacted
        catalog.upsert(Item(item_id=f"i{j}", title="", attributes={"genres": "Horror"}))
    column = catalog._columns["genres"]
    assert column.dead < column.pairs
    assert catalog.matching_ids([AttributeCondition("genres", any_of=["horror"])]) == {f"i{j}" for j in range(0, 2_000, 2)}
    assert catalog.matching_ids([AttributeCondition("genres", any_of=["comedy"])]) == {f"i{j}" for j in range(1, 2_000, 2)}


@pytest.mark.parametrize("make", [lambda d: FlatIndex(d), lambda d: PQIndex(d, rerank=50, filtered_exact_max=0)], ids=["flat", "pq"])
def test_index_search_with_a_subset_equals_search_with_the_same_set(make):
    """The index maps its slots to catalog rows through both change logs; removals, re-adds (slot
    and row reuse) and a burst that overflows the logs must all leave the map right."""
    rng = np.random.default_rng(2)
    d = 16
    index, catalog = make(d), Catalog()
    vectors: dict[str, np.ndarray] = {}

    def upsert(ids):
        x = rng.standard_normal((len(ids), d)).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        index.upsert(ids, x)
        catalog.upsert_many([Item(item_id=i, title=i, attributes={"bucket": str(int(i[1:]) % 5)}) for i in ids])
        vectors.update(zip(ids, x))

    def remove(ids):
        index.remove(ids)
        for i in ids:
            catalog.remove(i)
            vectors.pop(i, None)

    conditions = [AttributeCondition("bucket", any_of=["1", "3"])]
    upsert([f"i{j}" for j in range(1_500)])
    for step in range(5):
        subset = catalog.matching_ids(conditions)
        plain = set(subset)
        q = rng.standard_normal(d).astype(np.float32)
        excluded = {f"i{j}" for j in rng.integers(0, 3_000, 40)}
        assert index.search(q, 30, subset, excluded) == index.search(q, 30, plain, excluded)
        brute = sorted((i for i in plain if i not in excluded), key=lambda i: -float(vectors[i] @ q))[:30]
        if isinstance(index, FlatIndex):
            assert [i for i, _ in index.search(q, 30, subset, excluded)] == brute
        remove([f"i{j}" for j in rng.choice(3_000, 200, replace=False)])
        upsert([f"i{j}" for j in rng.choice(3_000, 300, replace=False)])  # re-adds reuse rows and slots
        if step == 0:  # small changes are followed through the logs, not by a rebuild
            assert index.changes.since(index._row_map[2]) is not None
        if step == 2:  # a burst larger than the logs keep: the map is rebuilt from scratch
            upsert([f"i{j}" for j in range(3_000, 3_100)])
            catalog.changes.record(["filler"] * 70_000, len(catalog.row_index))
            assert catalog.changes.since(index._row_map[3]) is None


def test_popular_order_matches_the_sorted_reference_and_sorts_the_tail_only_when_reached():
    rng = np.random.default_rng(3)
    catalog = Catalog()
    catalog.upsert_many([Item(item_id=f"i{j:04d}"[::-1], title="") for j in range(3_000)])  # ids not in row order
    counts = {f"i{j:04d}"[::-1]: int(rng.integers(1, 6)) for j in rng.choice(3_000, 400, replace=False)}
    counts["gone"] = 99  # not in the catalog: ignored
    catalog.set_popularity(counts)
    reference = sorted(catalog.items, key=lambda i: (-counts.get(i, 0), i))
    order = catalog.popular_order()
    head = [i for _, i in zip(range(50), order)]
    assert head == reference[:50] and order._rest is None  # stopping early never sorted the rest
    assert list(order) == reference and order == reference and len(order) == 3_000
    assert catalog.popularity_score(reference[0]) == pytest.approx(1.0)
    catalog.remove(reference[0])
    assert catalog.popular_order() == reference[1:]

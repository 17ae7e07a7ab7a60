"""Item metadata held by retrieval replicas: titles, tags, attributes, popularity, and the
attribute filters evaluated over them.

Filters are evaluated on columns, not item by item: every item has a *row*; each attribute keeps
(row, value code) pairs of its values (several for 'a|b|c') and a float column of its numeric
value, all numpy arrays maintained on upsert and remove. A condition is then a few vector
operations over the catalog (`any_of`: the pairs whose code is wanted; a range: two comparisons),
and `matching_ids` returns the result as an `ItemSubset`, a boolean row mask that behaves like a
set of ids and that indexes turn into their own slots without touching one id per item
(`VectorIndex.search` with `allowed=` an `ItemSubset`). `condition_matches` is the reference
semantics, one item at a time; the columns must agree with it (tests check both).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Set
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence

import numpy as np

from tastemaker.domain import AttributeCondition, Item
from tastemaker.errors import InvalidArgument
from tastemaker.retrieval.index import ChangeJournal


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


def _grown(array: np.ndarray, size: int, fill) -> np.ndarray:
    """`array` with room for at least `size` entries (1.5x steps), new entries set to `fill`."""
    if size <= len(array):
        return array
    out = np.full(max(size, len(array) * 3 // 2 + 16), fill, dtype=array.dtype)
    out[: len(array)] = array
    return out


class _AttributeColumn:
    """One attribute over all rows: its values as (row, code) pairs and its numeric value.

    A row's pairs are contiguous (`first[row]`, `count[row]`); removing or replacing a row marks
    its pairs dead (row -1), and the pairs are compacted once half of them are dead."""

    def __init__(self) -> None:
        self.codes: dict[str, int] = {}  # casefolded, trimmed value -> code
        # int32: half the bytes a filter scans (rows and codes stay far below 2**31)
        self.pair_row = np.zeros(0, dtype=np.int32)
        self.pair_code = np.zeros(0, dtype=np.int32)
        self.pairs = 0  # pairs in use (live or dead)
        self.dead = 0
        self.first = np.zeros(0, dtype=np.int64)
        self.count = np.zeros(0, dtype=np.int32)
        self.number = np.zeros(0, dtype=np.float64)  # NaN: missing or not a number
        self.present = np.zeros(0, dtype=bool)
        self._parsed: dict[str, tuple[list[int], float]] = {}

    def reserve(self, rows: int) -> None:
        self.first = _grown(self.first, rows, 0)
        self.count = _grown(self.count, rows, 0)
        self.number = _grown(self.number, rows, np.nan)
        self.present = _grown(self.present, rows, False)

    def clear(self, row: int) -> None:
        if row >= len(self.present) or not self.present[row]:
            return
        n = int(self.count[row])
        if n:
            start = int(self.first[row])
            self.pair_row[start : start + n] = -1
            self.dead += n
        self.count[row] = 0
        self.number[row] = np.nan
        self.present[row] = False
        if self.dead > 1024 and self.dead * 2 > self.pairs:
            self._compact()

    def _parse(self, raw: str) -> tuple[list[int], float]:
        """Codes of a raw value and its number (NaN if none); cached, since feeds repeat values."""
        parsed = self._parsed.get(raw)
        if parsed is None:
            codes = [self.codes.setdefault(v.casefold(), len(self.codes)) for v in _attribute_values(raw)]
            try:
                number = float(raw)
            except ValueError:
                number = math.nan
            if len(self._parsed) > 100_000:  # many distinct values (free text): keep the cache bounded
                self._parsed.clear()
            parsed = self._parsed[raw] = (codes, number)
        return parsed

    def set_many(self, rows: list[int], raws: list[str]) -> None:
        """Give `rows` (distinct) the values `raws`; replaces what those rows held."""
        if not rows:
            return
        row_array = np.asarray(rows, dtype=np.int64)
        self.reserve(int(row_array.max()) + 1)
        for row in row_array[self.present[row_array]].tolist():  # replacements: kill the old pairs
            self.clear(row)
        parse = self._parse
        parsed = [parse(raw) for raw in raws]
        counts = np.fromiter((len(codes) for codes, _ in parsed), dtype=np.int64, count=len(parsed))
        numbers = np.fromiter((number for _, number in parsed), dtype=np.float64, count=len(parsed))
        if len(counts) and counts.max() == 1 and counts.min() == 1:  # single values: the usual case
            flat = [codes[0] for codes, _ in parsed]
        else:
            flat = list(itertools.chain.from_iterable(codes for codes, _ in parsed))
        start = self.pairs
        end = start + len(flat)
        self.pair_row = _grown(self.pair_row, end, -1)
        self.pair_code = _grown(self.pair_code, end, -1)
        self.pair_row[start:end] = np.repeat(row_array, counts)
        self.pair_code[start:end] = flat
        self.pairs = end
        self.first[row_array] = start + np.concatenate([[0], np.cumsum(counts)[:-1]])
        self.count[row_array] = counts
        self.number[row_array] = numbers
        self.present[row_array] = True

    def _compact(self) -> None:
        live = np.flatnonzero(self.pair_row[: self.pairs] >= 0)  # stays in row-contiguous runs
        rows = self.pair_row[live]
        self.pair_row, self.pair_code = rows.copy(), self.pair_code[live]
        self.pairs, self.dead = len(live), 0
        if len(live):
            starts = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]])
            self.first[rows[starts]] = starts

    def evaluate(self, condition: AttributeCondition, rows: int) -> np.ndarray:
        """`condition_matches` for every row below `rows`, as a boolean array."""
        self.reserve(rows)
        ok = self.present[:rows].copy()
        if condition.any_of:
            wanted = sorted({self.codes[c] for c in (v.casefold() for v in condition.any_of) if c in self.codes})
            hit = np.zeros(rows, dtype=bool)
            if wanted:
                codes = self.pair_code[: self.pairs]
                chosen = codes == np.int32(wanted[0]) if len(wanted) == 1 else np.isin(codes, np.asarray(wanted, dtype=np.int32))
                matched = self.pair_row[: self.pairs][chosen]
                hit[matched[matched >= 0]] = True
            ok &= hit
        if condition.min_value is not None or condition.max_value is not None:
            number = self.number[:rows]
            with np.errstate(invalid="ignore"):
                in_range = ~np.isnan(number)
                if condition.min_value is not None:
                    in_range &= number >= condition.min_value
                if condition.max_value is not None:
                    in_range &= number <= condition.max_value
            ok &= in_range
        return ~ok if condition.exclude else ok


class ItemSubset(Set):
    """Ids of a catalog as a boolean mask over its rows: a read-only set (`in`, iteration, `len`,
    comparisons with sets) that indexes can apply as a mask. It describes the catalog at the time
    it was made; use it within the request that made it."""

    def __init__(self, catalog: "Catalog", mask: np.ndarray):
        self.space = catalog
        self.mask = mask
        self._len: Optional[int] = None
        self._padded: Optional[np.ndarray] = None

    def padded_mask(self) -> np.ndarray:
        """The mask with a False before row 0 and after the last row (see `_SlotIndex`); cached,
        since one request searches with the same subset more than once."""
        if self._padded is None:
            self._padded = np.concatenate([[False], self.mask, [False]])
        return self._padded

    def __contains__(self, item_id: object) -> bool:
        row = self.space.row_index.get(item_id)  # type: ignore[arg-type]
        return row is not None and row < len(self.mask) and bool(self.mask[row])

    def __iter__(self) -> Iterator[str]:
        row_ids = self.space.row_ids
        for row in np.flatnonzero(self.mask).tolist():
            item_id = row_ids[row]
            if item_id is not None:
                yield item_id

    def __len__(self) -> int:
        if self._len is None:
            self._len = int(np.count_nonzero(self.mask))
        return self._len

    def __repr__(self) -> str:
        return f"ItemSubset({len(self)} of {len(self.space.items)} items)"


class PopularOrder(Sequence):
    """Live ids, most popular first, ties by id. Built lazily for large catalogs: the ids with
    interactions are ordered when it is made (numpy sort, no per-item key function); the rest, in
    id order, only when an iteration gets that far (a cold catalog, or a strict filter), since
    sorting a million ids costs seconds and callers mostly stop after a few dozen."""

    def __init__(self, items: dict[str, "ItemMeta"], popularity: dict[str, int]):
        self._items = items
        popular = [i for i, count in popularity.items() if count > 0 and i in items]
        self._head: list[str] = []
        self.top_count = 0
        if popular:
            counts = np.fromiter((popularity[i] for i in popular), dtype=np.int64, count=len(popular))
            order = np.lexsort((np.array(popular), -counts))
            self._head = [popular[j] for j in order.tolist()]
            self.top_count = int(counts.max())
        self._rest: Optional[list[str]] = None
        self._all: Optional[list[str]] = None

    def _tail(self) -> list[str]:
        """Live ids without interactions, by id (sorted on first use)."""
        if self._rest is None:
            head = set(self._head)
            self._rest = sorted(i for i in self._items if i not in head)
        return self._rest

    def _everything(self) -> list[str]:
        if self._all is None:
            self._all = self._head + self._tail()
        return self._all

    def __iter__(self) -> Iterator[str]:
        yield from self._head
        yield from self._tail()

    def __len__(self) -> int:
        return len(self._head) + len(self._tail())

    def __getitem__(self, index):  # type: ignore[override]
        return self._everything()[index]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, (list, tuple, PopularOrder)) and self._everything() == list(other)

    def __repr__(self) -> str:
        return f"PopularOrder({len(self._head)} with interactions, then the rest by id)"


class Catalog:
    """Item metadata plus popularity; the vectors live in the index. Rows number the items for
    the filter columns (a removed item's row is reused); `changes` logs the ids whose row changed,
    which an index follows to map its slots to rows."""

    def __init__(self) -> None:
        self.items: dict[str, ItemMeta] = {}
        self.popularity: dict[str, int] = {}
        self._popular_order: Optional[PopularOrder] = None
        self._max_log_pop = 1.0
        self.row_index: dict[str, int] = {}  # id -> row
        self.row_ids: list[Optional[str]] = []  # row -> id; None = free
        self._free_rows: list[int] = []
        self._live = np.zeros(0, dtype=bool)
        self._columns: dict[str, _AttributeColumn] = {}
        self._pending: dict[int, dict[str, str]] = {}  # row -> attributes not yet in the columns
        self._new_rows: list[int] = []  # rows given out since the last flush
        self._changes = ChangeJournal()
        self._unlogged: list[str] = []  # ids given a row, not yet in `changes`

    @property
    def changes(self) -> ChangeJournal:
        """Ids whose row changed (given or freed), for indexes mapping their slots to rows."""
        if self._unlogged:
            self._changes.record(self._unlogged, len(self.row_index))
            self._unlogged = []
        return self._changes

    def upsert(self, item: Item) -> None:
        """Insert or replace one item. The filter columns are written in batches: the change waits
        in `_pending` until the next filter evaluation or removal (callers add items one by one)."""
        item_id = item.item_id
        self.items[item_id] = ItemMeta(item.title, list(item.tags), dict(item.attributes))
        row = self.row_index.get(item_id)
        if row is None:
            if self._free_rows:
                row = self._free_rows.pop()
                self.row_ids[row] = item_id
            else:
                row = len(self.row_ids)
                self.row_ids.append(item_id)
            self.row_index[item_id] = row
            self._new_rows.append(row)
            self._unlogged.append(item_id)
        self._pending[row] = item.attributes
        self._popular_order = None

    def upsert_many(self, items: Sequence[Item]) -> None:
        """Insert or replace items (a repeated id: the last wins)."""
        for item in items:
            self.upsert(item)
        self.flush()

    def flush(self) -> None:
        """Write pending upserts into the columns, one vector operation per column. Filters flush
        first; a replica calls it after applying the feed, so requests find nothing pending."""
        if self._new_rows:
            self._live = _grown(self._live, len(self.row_ids), False)
            self._live[self._new_rows] = True
            self._new_rows = []
        if not self._pending:
            return
        pending, self._pending = self._pending, {}
        per_column: dict[str, tuple[list[int], list[str]]] = {}
        for row, attributes in pending.items():
            for name, raw in attributes.items():
                entry = per_column.get(name)
                if entry is None:
                    entry = per_column[name] = ([], [])
                entry[0].append(row)
                entry[1].append(raw)
        rows = np.fromiter(pending.keys(), dtype=np.int64, count=len(pending))
        for name, column in self._columns.items():  # a replacement may drop an attribute
            column.reserve(len(self.row_ids))
            had = rows[column.present[rows]]
            if len(had):
                keep = set(per_column.get(name, ((), ()))[0])
                for row in had.tolist():
                    if row not in keep:
                        column.clear(row)
        for name, (column_rows, raws) in per_column.items():
            column = self._columns.get(name)
            if column is None:
                column = self._columns[name] = _AttributeColumn()
            column.set_many(column_rows, raws)

    def remove(self, item_id: str) -> None:
        self.flush()
        self.items.pop(item_id, None)
        row = self.row_index.pop(item_id, None)
        if row is not None:
            for column in self._columns.values():
                column.clear(row)
            self._live[row] = False
            self.row_ids[row] = None
            self._free_rows.append(row)
            self.changes.record([item_id], len(self.row_index))
        self._popular_order = None

    def set_popularity(self, counts: dict[str, int]) -> None:
        self.popularity = dict(counts)
        self._popular_order = None

    def popular_order(self) -> PopularOrder:
        """All live items, most popular first; ties by id for determinism (a lazy sequence)."""
        if self._popular_order is None:
            self._popular_order = PopularOrder(self.items, self.popularity)
            self._max_log_pop = max(1.0, math.log1p(self._popular_order.top_count))
        return self._popular_order

    def popularity_score(self, item_id: str) -> float:
        """log-popularity scaled to [0, 1]."""
        self.popular_order()
        return math.log1p(self.popularity.get(item_id, 0)) / self._max_log_pop

    def matching_ids(self, conditions: Sequence[AttributeCondition]) -> Optional[ItemSubset]:
        """Ids passing every condition (an `ItemSubset`); None when there are no conditions
        (everything passes). Vectorised over the columns: no per-item Python work."""
        if not conditions:
            return None
        self.flush()
        rows = len(self.row_ids)
        mask = self._live[:rows].copy()
        for condition in conditions:
            column = self._columns.get(condition.attribute)
            if column is None:  # no item has it: nothing matches, unless excluded
                if not condition.exclude:
                    mask[:] = False
                continue
            mask &= column.evaluate(condition, rows)
        return ItemSubset(self, mask)

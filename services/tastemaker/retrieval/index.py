"""Vector indexes: one protocol (`VectorIndex`), an exact index (`FlatIndex`) and, in `ann.py`, the
approximate ones for large catalogs (`PQIndex`, `IVFIndex`). `create_index` builds the one the
config names.

Both keep every vector once in a contiguous float32 matrix addressed by a *slot* (a row number that
stays fixed while the id lives; slots of removed ids are reused). The matrix serves `vector(s)`
without a round trip through FAISS, exact search, and exact re-checks of small filtered subsets;
the approximate index adds a FAISS structure whose labels are the slots.

Indexes are saved as a folder without pickle: `manifest.json` (kind, dimension, parameters),
`ids.json` (the id of each slot, null for a free one), `vectors.npy` (the matrix, loaded with
`allow_pickle=False`) and the trained FAISS structure of an approximate index (`pq.faiss` with
`pq_nodes.npy`, or `ivf.faiss` with `ivf.json`; `faiss.write_index`).

Filters from the catalog arrive as a boolean mask over catalog rows (`RowSubset`); each index
keeps a slot -> catalog row map, built once (one dict lookup per item) and then kept in step by
following two `ChangeJournal`s (its own slots, the catalog's rows), so a filtered search costs a
few vector operations over the catalog instead of one Python lookup per allowed id.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import threading
from pathlib import Path
from typing import Any, Optional, Protocol, Sequence, Union

import numpy as np

#: Written into every saved index; `load_index` refuses folders without it.
SAVE_FORMAT = "tastemaker-vector-index"
SAVE_VERSION = 1
#: Index kinds `create_index` accepts (`RetrievalConfig.index`).
INDEX_KINDS = ("auto", "flat", "pq", "ivf")


class VectorIndex(Protocol):
    """Maps string ids to unit vectors and answers top-k inner-product queries."""

    dimension: int

    def upsert(self, ids: Sequence[str], vectors: np.ndarray) -> None:
        """Add or replace vectors (`vectors` is (len(ids), dimension); a repeated id: last wins)."""

    def remove(self, ids: Sequence[str]) -> None:
        """Remove ids; unknown ids are ignored."""

    def search(
        self, query: np.ndarray, k: int, allowed: Optional[set[str]] = None, excluded: Optional[set[str]] = None
    ) -> list[tuple[str, float]]:
        """Top-k (id, score) by inner product, best first, restricted to `allowed` if given (a set
        of ids, or a `RowSubset` such as `Catalog.matching_ids` returns, applied as a mask) and
        never returning ids in `excluded`. Returns fewer than k only when fewer ids qualify."""

    def vector(self, item_id: str) -> Optional[np.ndarray]:
        """The stored vector of an id, or None."""

    def vectors(self, ids: Sequence[str]) -> np.ndarray:
        """Stored vectors of known ids as a (len(ids), dimension) matrix; KeyError for an unknown id."""

    def save(self, path: Union[str, Path], hold_lock: bool = True) -> None:
        """Write the index into the folder `path` (created if needed); see `load_index`."""

    def rebuild_due(self) -> bool:
        """Training or re-encoding deferred for `rebuild` (`train_inline` off)?"""

    def rebuild(self, before_swap: Any = None) -> Optional[str]:
        """Do the deferred work while searches go on, then swap; what was done, or None."""

    def memory_bytes(self) -> int:
        """Bytes held by vectors and search structures (not the id maps)."""

    def __len__(self) -> int: ...

    def __contains__(self, item_id: object) -> bool: ...


def _as_matrix(vectors: np.ndarray, rows: int, dimension: int) -> np.ndarray:
    """Vectors as a C-contiguous float32 (rows, dimension) matrix; no copy when they already are."""
    matrix = np.asarray(vectors)
    if matrix.ndim == 1 and rows == 1:
        matrix = matrix.reshape(1, -1)
    if matrix.ndim != 2 or matrix.shape != (rows, dimension):
        raise ValueError(
            f"expected {rows} vectors of dimension {dimension}, got an array of shape {tuple(matrix.shape)}"
        )
    return np.ascontiguousarray(matrix, dtype=np.float32)


def dot_rows(rows: np.ndarray, q: np.ndarray) -> np.ndarray:
    """`rows @ q` on one thread (numpy's SIMD loop). OpenBLAS splits a matrix-vector product over
    threads, and on a small busy machine waiting for the second thread costs more than the product:
    measured on 2 shared cores, 2050 x 384 took 12 ms through BLAS and 0.15 ms here; 1M x 384 took
    265 ms and 118 ms."""
    return np.einsum("ij,j->i", rows, q)


class ChangeJournal:
    """Keys changed since a reader last looked: an append-only log of batches that readers follow
    with a cursor (epoch, batches read). The log is bounded: once it holds more keys than
    `limit(live count)` it starts over in a new epoch, and a reader with an older cursor is told to
    rebuild whatever it derived (`since` returns None)."""

    def __init__(self) -> None:
        self._batches: list[Any] = []
        self._keys = 0
        self._epoch = 0

    def record(self, keys: Any, live: int) -> None:
        """Log a batch of changed keys (a list or an array); `live` = the owner's current size."""
        self._batches.append(keys)
        self._keys += len(keys)
        if self._keys > max(65_536, live // 4):
            self._batches, self._keys, self._epoch = [], 0, self._epoch + 1

    def cursor(self) -> tuple[int, int]:
        """Where a reader stands after reading everything logged so far."""
        return self._epoch, len(self._batches)

    def since(self, cursor: tuple[int, int]) -> Optional[list[Any]]:
        """Batches logged after `cursor`, or None when they are gone (start over)."""
        epoch, read = cursor
        return None if epoch != self._epoch else self._batches[read:]


class RowSubset(Protocol):
    """A subset of a catalog's items as a boolean mask over the catalog's rows (what
    `Catalog.matching_ids` returns). Indexes use `space` to turn it into slots without touching
    one id string per item."""

    space: "RowSpace"
    mask: np.ndarray

    def __contains__(self, item_id: object) -> bool: ...

    def __iter__(self) -> Any: ...

    def __len__(self) -> int: ...


class RowSpace(Protocol):
    """Numbers item ids with rows and logs which ids changed row (the catalog)."""

    changes: ChangeJournal
    #: id -> row of every live id.
    row_index: dict[str, int]


def _as_query(query: np.ndarray, dimension: int) -> np.ndarray:
    q = np.asarray(query, dtype=np.float32).reshape(-1)
    if q.shape[0] != dimension:
        raise ValueError(f"query has dimension {q.shape[0]}, the index holds vectors of dimension {dimension}")
    return q


class _SlotIndex:
    """What every index shares: the slot matrix, the id maps, filters, exact search, save/load.

    Subclasses hook `_after_upsert` / `_after_remove` to keep their own structures in step and
    override `_search_slots`. All public methods hold one lock, so a replica may read from request
    threads while it applies the change feed."""

    kind = "flat"

    def __init__(self, dimension: int):
        if dimension <= 0:
            raise ValueError(f"dimension must be positive, got {dimension}")
        self.dimension = int(dimension)
        self._matrix = np.zeros((0, self.dimension), dtype=np.float32)
        self._ids: list[Optional[str]] = []  # slot -> id; None marks a free slot
        self._slot_of: dict[str, int] = {}
        self._free: list[int] = []  # free slots below len(self._ids), reused first
        self._lock = threading.RLock()
        #: True: training and re-encoding happen inside the `upsert`/`remove` that makes them due.
        #: False (retrieval replicas): they wait for `rebuild()`, which a worker thread runs while
        #: the index keeps answering (`PQIndex`; the other kinds always build inline).
        self.train_inline = True
        #: Slots whose id changed (upserted into or freed), for the slot -> catalog row map.
        self.changes = ChangeJournal()
        self._row_map: Optional[tuple[Any, np.ndarray, tuple[int, int], tuple[int, int]]] = None

    # -- size and lookups ---------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._slot_of)

    def __contains__(self, item_id: object) -> bool:
        return item_id in self._slot_of

    def vector(self, item_id: str) -> Optional[np.ndarray]:
        with self._lock:
            slot = self._slot_of.get(item_id)
            return None if slot is None else self._matrix[slot].copy()

    def vectors(self, ids: Sequence[str]) -> np.ndarray:
        with self._lock:
            slots = np.fromiter((self._slot_of[i] for i in ids), dtype=np.int64, count=len(ids))
            return self._matrix[slots]  # fancy indexing copies: callers may keep the result

    def memory_bytes(self) -> int:
        # Rows in use: the spare capacity is zero pages the OS has not backed yet.
        return len(self._ids) * self.dimension * 4

    # -- changes ------------------------------------------------------------------------------
    def upsert(self, ids: Sequence[str], vectors: np.ndarray) -> None:
        ids = list(ids)
        matrix = _as_matrix(vectors, len(ids), self.dimension)
        if not ids:
            return
        if len(set(ids)) != len(ids):  # last occurrence wins, like applying the changes in order
            last = {item_id: row for row, item_id in enumerate(ids)}
            rows = sorted(last.values())
            ids, matrix = [ids[r] for r in rows], matrix[rows]
        with self._lock:
            slots = np.empty(len(ids), dtype=np.int64)
            replaced = np.zeros(len(ids), dtype=bool)
            new_rows = []
            for row, item_id in enumerate(ids):
                slot = self._slot_of.get(item_id)
                if slot is None:
                    new_rows.append(row)
                else:
                    slots[row] = slot
                    replaced[row] = True
            if new_rows:
                reuse = min(len(new_rows), len(self._free))
                fresh = len(new_rows) - reuse
                start = len(self._ids)
                taken = [self._free.pop() for _ in range(reuse)] + list(range(start, start + fresh))
                self._ids.extend([None] * fresh)
                self._reserve(len(self._ids))
                for row, slot in zip(new_rows, taken):
                    slots[row] = slot
                    self._ids[slot] = ids[row]
                    self._slot_of[ids[row]] = slot
            self._matrix[slots] = matrix
            if new_rows:
                self.changes.record(slots[~replaced], len(self._slot_of))
            self._after_upsert(slots, replaced, matrix)

    def remove(self, ids: Sequence[str]) -> None:
        with self._lock:
            slots = [self._slot_of.pop(i) for i in set(ids) if i in self._slot_of]
            if not slots:
                return
            for slot in slots:
                self._ids[slot] = None
                self._matrix[slot] = 0.0
            self._free.extend(slots)
            freed = np.asarray(slots, dtype=np.int64)
            self.changes.record(freed, len(self._slot_of))
            self._after_remove(freed)

    def _reserve(self, rows: int) -> None:
        """Grow the matrix to at least `rows` rows; 1.5x steps amortise copies without doubling a
        million-row matrix for one more item."""
        capacity = self._matrix.shape[0]
        if rows <= capacity:
            return
        grown = np.zeros((max(rows, int(capacity * 1.5) + 16), self.dimension), dtype=np.float32)
        grown[:capacity] = self._matrix
        self._matrix = grown

    def rebuild_due(self) -> bool:
        """Is there deferred training or re-encoding for `rebuild` (see `train_inline`)?"""
        return False

    def rebuild(self, before_swap: Any = None) -> Optional[str]:
        """Do the deferred work off the caller's thread; None: nothing was due."""
        return None

    def _after_upsert(self, slots: np.ndarray, replaced: np.ndarray, vectors: np.ndarray) -> None:
        """Hook: `vectors` were written into `slots` (`replaced` marks slots that held a vector)."""

    def _after_remove(self, slots: np.ndarray) -> None:
        """Hook: `slots` were freed."""

    def _live_slots(self) -> np.ndarray:
        """Slots holding a vector, ascending."""
        if not self._free:
            return np.arange(len(self._ids), dtype=np.int64)
        live = np.ones(len(self._ids), dtype=bool)
        live[self._free] = False
        return np.flatnonzero(live).astype(np.int64)

    # -- search -------------------------------------------------------------------------------
    def search(
        self, query: np.ndarray, k: int, allowed: Optional[set[str]] = None, excluded: Optional[set[str]] = None
    ) -> list[tuple[str, float]]:
        q = _as_query(query, self.dimension)
        with self._lock:
            if k <= 0 or not self._slot_of:
                return []
            slot_of = self._slot_of
            excluded_slots = (
                np.fromiter((slot_of[i] for i in excluded if i in slot_of), dtype=np.int64)
                if excluded
                else np.zeros(0, dtype=np.int64)
            )
            allowed_slots = None
            if allowed is not None and hasattr(allowed, "space"):  # a catalog row mask
                qualifies = self._subset_slots(allowed)
                if len(excluded_slots):
                    qualifies[excluded_slots] = False
                allowed_slots = np.flatnonzero(qualifies)
                if not len(allowed_slots):
                    return []
                qualifying = len(allowed_slots)
            elif allowed is not None:
                if excluded:
                    allowed_slots = [slot_of[i] for i in allowed if i in slot_of and i not in excluded]
                else:
                    allowed_slots = [slot_of[i] for i in allowed if i in slot_of]
                if not allowed_slots:
                    return []
                # Sorted, so that ties fall to the lower slot whatever the set's iteration order.
                allowed_slots = np.sort(np.asarray(allowed_slots, dtype=np.int64))
                qualifying = len(allowed_slots)
            else:
                qualifying = len(slot_of) - len(excluded_slots)
            k = min(k, qualifying)
            if k <= 0:
                return []
            slots, scores = self._search_slots(q, k, allowed_slots, excluded_slots)
            ids = self._ids
            return [(ids[s], float(v)) for s, v in zip(slots.tolist(), scores.tolist())]

    def slot_rows(self, space: RowSpace) -> np.ndarray:
        """Catalog row of every slot (-1: free, or not in the catalog), kept in step through both
        change journals: after the first call (one dict lookup per item) a call costs one lookup
        per id changed since. Safe to call from a build thread to have it ready before a swap."""
        return self._slot_rows_plus_one(space) - 1

    def _slot_rows_plus_one(self, space: RowSpace) -> np.ndarray:
        """`slot_rows` + 1 (0 = no row), the form a padded row mask is indexed with."""
        with self._lock:
            high = len(self._ids)
            cached = self._row_map
            slot_batches = id_batches = None
            if cached is not None and cached[0] is space:
                slot_batches = self.changes.since(cached[2])
                id_batches = space.changes.since(cached[3])
            if slot_batches is None or id_batches is None:
                get = space.row_index.get
                rows = np.fromiter((0 if i is None else get(i, -1) + 1 for i in self._ids), dtype=np.int64, count=high)
            else:
                rows = cached[1]
                if len(rows) < high:
                    rows = np.concatenate([rows, np.zeros(max(high, len(rows) * 3 // 2) - len(rows), dtype=np.int64)])
                ids, slot_of, get = self._ids, self._slot_of, space.row_index.get
                for batch in slot_batches:
                    for slot in np.unique(np.asarray(batch)).tolist():
                        item_id = ids[slot] if slot < high else None
                        rows[slot] = 0 if item_id is None else get(item_id, -1) + 1
                for batch in id_batches:
                    for item_id in batch:
                        slot = slot_of.get(item_id)
                        if slot is not None:
                            rows[slot] = get(item_id, -1) + 1
            self._row_map = (space, rows, self.changes.cursor(), space.changes.cursor())
            return rows[:high]

    def _subset_slots(self, subset: RowSubset) -> np.ndarray:
        """Boolean per slot: does the slot's item belong to `subset`?"""
        rows = self._slot_rows_plus_one(subset.space)
        # One gather: 0 (no row) reads the False in front, rows past the mask (items added after
        # the subset was made) clip to the False behind.
        padded = subset.padded_mask() if hasattr(subset, "padded_mask") else np.concatenate([[False], subset.mask, [False]])
        return np.take(padded, rows, mode="clip")

    def _search_slots(
        self, q: np.ndarray, k: int, allowed_slots: Optional[np.ndarray], excluded_slots: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Best k slots and scores; k ≤ the number of qualifying slots (the caller made sure)."""
        return self._exact_slots(q, k, allowed_slots, excluded_slots)

    #: Rows per block when scoring a gathered subset: keeps the temporary copy in cache.
    _GATHER_BLOCK = 8192

    def _exact_slots(
        self, q: np.ndarray, k: int, allowed_slots: Optional[np.ndarray], excluded_slots: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Brute force over the matrix: every qualifying vector is scored."""
        high = len(self._ids)
        if allowed_slots is not None and len(allowed_slots) * 4 < high:
            # A small subset: gather its rows (block by block) rather than scoring the whole matrix.
            candidates = allowed_slots
            scores = np.empty(len(candidates), dtype=np.float32)
            for start in range(0, len(candidates), self._GATHER_BLOCK):
                block = candidates[start : start + self._GATHER_BLOCK]
                scores[start : start + len(block)] = dot_rows(self._matrix[block], q)
        else:
            candidates = None
            scores = dot_rows(self._matrix[:high], q)
            if allowed_slots is not None:
                keep = np.zeros(high, dtype=bool)
                keep[allowed_slots] = True
                scores[~keep] = -np.inf
            else:
                if self._free:
                    scores[self._free] = -np.inf
                if len(excluded_slots):
                    scores[excluded_slots] = -np.inf
        if k < len(scores):
            top = np.argpartition(-scores, k - 1)[:k]
        else:
            top = np.arange(len(scores))
        # Best first; equal scores in slot order, so results do not depend on partition order.
        top = top[np.lexsort((top, -scores[top]))]
        slots = top if candidates is None else candidates[top]
        return slots.astype(np.int64), scores[top]

    # -- persistence --------------------------------------------------------------------------
    def _params(self) -> dict[str, Any]:
        return {}

    def save(self, path: Union[str, Path], hold_lock: bool = True) -> None:
        """Write the index into `path`. `hold_lock=False` lets searches go on during a long write;
        the caller must then make sure that nothing changes the index meanwhile."""
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        with self._lock if hold_lock else contextlib.nullcontext():
            manifest = folder / "manifest.json"
            if manifest.exists():  # a half-written save must never look complete
                manifest.unlink()
            high = len(self._ids)
            with open(folder / "vectors.npy", "wb") as f:
                np.save(f, self._matrix[:high], allow_pickle=False)
            (folder / "ids.json").write_text(json.dumps(self._ids))
            self._save_extra(folder)
            body = {
                "format": SAVE_FORMAT,
                "version": SAVE_VERSION,
                "kind": self.kind,
                "dimension": self.dimension,
                "count": len(self),
                "params": self._params(),
            }
            tmp = folder / "manifest.json.tmp"
            tmp.write_text(json.dumps(body, indent=2))
            os.replace(tmp, manifest)

    def _save_extra(self, folder: Path) -> None:
        """Hook: write subclass structures next to the matrix."""

    def _restore(self, folder: Path, manifest: dict[str, Any]) -> None:
        matrix = np.load(folder / "vectors.npy", allow_pickle=False)
        ids = json.loads((folder / "ids.json").read_text())
        if matrix.dtype != np.float32 or matrix.ndim != 2 or matrix.shape != (len(ids), self.dimension):
            raise ValueError(f"{folder}: vectors.npy {matrix.shape} {matrix.dtype} does not match ids.json / dimension")
        self._matrix = np.ascontiguousarray(matrix)
        self._ids = ids
        self._slot_of = {item_id: slot for slot, item_id in enumerate(ids) if item_id is not None}
        self._free = [slot for slot, item_id in enumerate(ids) if item_id is None]
        if len(self._slot_of) != manifest["count"] or len(self._slot_of) + len(self._free) != len(ids):
            raise ValueError(f"{folder}: ids.json holds duplicate ids or disagrees with the manifest count")

    @classmethod
    def load(cls, path: Union[str, Path]) -> "_SlotIndex":
        """Read an index saved by `save`; the folder must hold an index of this class's kind."""
        index = load_index(path)
        if not isinstance(index, cls):
            raise ValueError(f"{path} holds a {index.kind!r} index, not {cls.kind!r}")
        return index


class FlatIndex(_SlotIndex):
    """Exact inner-product search over the slot matrix (BLAS matrix-vector product + partial sort).

    Filters are pushed into the scoring: a small `allowed` set is scored alone, otherwise
    non-qualifying rows are masked, so `k` results come back whenever `k` ids qualify."""

    kind = "flat"

    def __init__(self, dimension: int):
        super().__init__(dimension)


def _read_manifest(folder: Path) -> dict[str, Any]:
    path = folder / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder} holds no saved index (no manifest.json)")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != SAVE_FORMAT or manifest.get("version") != SAVE_VERSION:
        raise ValueError(f"{path} is not a {SAVE_FORMAT} v{SAVE_VERSION} manifest")
    return manifest


def load_index(path: Union[str, Path]) -> VectorIndex:
    """Open an index saved by `save` (any kind), with the parameters it was saved with."""
    folder = Path(path)
    manifest = _read_manifest(folder)
    kind, dimension, params = manifest["kind"], int(manifest["dimension"]), manifest.get("params", {})
    if kind == "flat":
        index: _SlotIndex = FlatIndex(dimension)
    elif kind == "ivf":
        from tastemaker.retrieval.ann import IVFIndex

        index = IVFIndex(dimension, **params)
    elif kind == "pq":
        from tastemaker.retrieval.ann import PQIndex

        index = PQIndex(dimension, **params)
    else:
        raise ValueError(f"{folder}: unknown index kind {kind!r}")
    index._restore(folder, manifest)
    return index


def create_index(config_or_kind: Any, dimension: int) -> VectorIndex:
    """Build the index a `RetrievalConfig` (or just its `index` kind, with default parameters) names.

    `flat`: exact. `pq`: a scan of 4-bit PQ codes with exact re-ranking (approximate). `ivf`:
    IVF-Flat (approximate). Both approximate kinds search exactly until they have enough vectors
    to train. `auto`: exact up to `exact_max_items`, `pq` above, switching as the catalog grows
    or shrinks."""
    if isinstance(config_or_kind, str):
        from tastemaker.config import RetrievalConfig  # the defaults live in one place: the config

        kind, config = config_or_kind, RetrievalConfig()
    else:
        kind, config = config_or_kind.index, config_or_kind
    if kind == "flat":
        return FlatIndex(dimension)
    if kind == "ivf":
        from tastemaker.retrieval.ann import IVFIndex

        return IVFIndex(dimension, nlist=config.ivf_nlist, nprobe=config.ivf_nprobe)
    if kind in ("pq", "auto"):
        from tastemaker.retrieval.ann import PQIndex

        return PQIndex(
            dimension,
            subquantizers=config.pq_subquantizers,
            rerank=config.pq_rerank,
            exact_max_items=config.exact_max_items if kind == "auto" else 0,
        )
    raise ValueError(f"unknown index type {kind!r}; allowed: {', '.join(repr(k) for k in INDEX_KINDS)}")


def create_index_from_config(config: Any, dimension: int) -> VectorIndex:
    """`create_index` with a whole `RetrievalConfig` (all index parameters honoured)."""
    return create_index(config, dimension)

"""Approximate nearest-neighbour search for large catalogs: `IVFIndex` (FAISS IVF-Flat).

Why IVF-Flat (measured with `tastemaker bench retrieval`, see bench/README.md): on a 2-core CPU it
builds a million 384-d vectors in about a minute with ~2048 lists, deletes natively
(`remove_ids`), filters inside the scan (FAISS ID selectors), and reaches recall@100 ≥ 0.99 in a
few milliseconds per query. HNSW searches faster at equal recall but builds several times slower
at this size on two cores and cannot delete (it would need tombstones and periodic rebuilds).

Behaviour by size: below `exact_max_items` (and below the vectors needed to train the lists) the
index searches exactly over its matrix; past it, it trains on a sample and moves to IVF. With
`nlist=None` the number of lists follows the catalog: it is re-chosen (a rebuild) when the
catalog has grown or shrunk 4x since the last training. Rebuilds run inside the `upsert`/`remove`
call that crosses the line.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional

import numpy as np

from tastemaker.retrieval.index import _SlotIndex

#: FAISS warns below 39 training points per list; fewer make poor centroids.
MIN_POINTS_PER_LIST = 39
#: Training sample per list: enough for stable centroids, small enough that training a million-item
#: catalog takes tens of seconds on two cores (k-means cost is sample x lists x dimension x iterations).
TRAIN_POINTS_PER_LIST = 40
#: k-means iterations (FAISS defaults to 25; 10 loses no measurable recall on our data, see bench).
TRAIN_ITERATIONS = 10
#: Vectors added to FAISS per call during a rebuild, to bound the temporary gathered copy.
ADD_BLOCK = 65_536
#: Each list-count step is a rebuild: only when the catalog moved this factor since training.
REBUILD_FACTOR = 4


def auto_nlist(n: int) -> int:
    """Lists for `n` vectors: the power of two nearest 2·√n, at least 16, with ≥ 39 points per list.

    2·√n sits at the cheap end of FAISS' 4–16·√n advice: the build cost grows with the list count,
    and at a million items 2048 lists already keep a query's scan to ~1 % of the catalog."""
    target = 2.0 * math.sqrt(max(n, 1))
    nlist = 2 ** max(4, round(math.log2(target)))
    while nlist > 16 and nlist * MIN_POINTS_PER_LIST > n:
        nlist //= 2
    return nlist


class IVFIndex(_SlotIndex):
    """IVF-Flat over the slot matrix (FAISS labels are slots), with exact fallbacks.

    Filters keep the `VectorIndex` guarantee (fewer than k only when fewer ids qualify):
    `excluded` and `allowed` are FAISS ID selectors applied inside the scan; the probe count grows
    in proportion to the share of the catalog that qualifies; an `allowed` set of at most
    `filtered_exact_max` ids is scored exactly; and a search that still finds fewer than k widens
    the probes 4x at a time up to all lists, which is exhaustive."""

    kind = "ivf"

    def __init__(
        self,
        dimension: int,
        nlist: Optional[int] = None,
        nprobe: int = 16,
        exact_max_items: int = 0,
        filtered_exact_max: int = 20_000,
        seed: int = 0,
    ):
        super().__init__(dimension)
        if nlist is not None and nlist < 1:
            raise ValueError(f"nlist must be positive or None, got {nlist}")
        if nprobe < 1:
            raise ValueError(f"nprobe must be positive, got {nprobe}")
        self.nlist = nlist
        self.nprobe = int(nprobe)
        self.exact_max_items = int(exact_max_items)
        self.filtered_exact_max = int(filtered_exact_max)
        self.seed = int(seed)
        self._ivf: Any = None  # faiss.IndexIVFFlat once trained
        self._trained_at = 0  # live vectors when the lists were trained

    # -- state --------------------------------------------------------------------------------
    @property
    def approximate(self) -> bool:
        """True once the IVF lists are trained and searches go through them."""
        return self._ivf is not None

    @property
    def lists(self) -> int:
        """Lists of the trained IVF structure (0 while searching exactly)."""
        return 0 if self._ivf is None else int(self._ivf.nlist)

    def memory_bytes(self) -> int:
        total = super().memory_bytes()
        if self._ivf is not None:
            # Inverted lists: a float32 code plus an int64 label per vector; centroids.
            total += int(self._ivf.ntotal) * (self.dimension * 4 + 8) + self.lists * self.dimension * 4
        return total

    def _target_nlist(self, n: int) -> int:
        return self.nlist if self.nlist is not None else auto_nlist(n)

    def _trainable(self, n: int) -> bool:
        return n > self.exact_max_items and n >= MIN_POINTS_PER_LIST * self._target_nlist(n)

    # -- keeping FAISS in step ----------------------------------------------------------------
    def _after_upsert(self, slots: np.ndarray, replaced: np.ndarray, vectors: np.ndarray) -> None:
        if self._ivf is not None and not self._rebuild_due():
            if replaced.any():  # the new vector may fall into another list
                self._ivf.remove_ids(np.ascontiguousarray(slots[replaced]))
            self._ivf.add_with_ids(vectors, slots)
        else:
            self._rebuild()

    def _after_remove(self, slots: np.ndarray) -> None:
        if self._ivf is not None and not self._rebuild_due():
            self._ivf.remove_ids(slots)
        else:
            self._rebuild()

    def _rebuild_due(self) -> bool:
        """With lists trained: has the catalog left the size range they were trained for?"""
        n = len(self)
        if not self._trainable(n):
            return True
        if self.nlist is None and (n >= REBUILD_FACTOR * self._trained_at or n * REBUILD_FACTOR <= self._trained_at):
            return auto_nlist(n) != self.lists
        return False

    def _rebuild(self) -> None:
        """Train fresh lists on a sample and add every live vector, or drop back to exact search."""
        import faiss

        n = len(self)
        if not self._trainable(n):
            self._ivf, self._trained_at = None, 0
            return
        nlist = self._target_nlist(n)
        live = self._live_slots()
        rng = np.random.default_rng(self.seed)
        sample_size = min(n, TRAIN_POINTS_PER_LIST * nlist)
        sample = live if sample_size == n else np.sort(rng.choice(live, size=sample_size, replace=False))
        quantizer = faiss.IndexFlatIP(self.dimension)
        ivf = faiss.IndexIVFFlat(quantizer, self.dimension, nlist, faiss.METRIC_INNER_PRODUCT)
        ivf.cp.niter = TRAIN_ITERATIONS
        ivf.cp.spherical = True  # unit-norm centroids: the right k-means for inner product on unit vectors
        ivf.cp.seed = self.seed
        ivf.cp.max_points_per_centroid = TRAIN_POINTS_PER_LIST
        ivf.train(self._matrix[sample])
        del sample
        contiguous = not self._free
        for start in range(0, n, ADD_BLOCK):
            if contiguous:  # no holes: slots are 0..n-1 and the matrix rows are a view, not a copy
                stop = min(n, start + ADD_BLOCK)
                ivf.add_with_ids(self._matrix[start:stop], np.arange(start, stop, dtype=np.int64))
            else:
                block = live[start : start + ADD_BLOCK]
                ivf.add_with_ids(self._matrix[block], block)
        self._ivf, self._trained_at = ivf, n  # the Python wrapper keeps `quantizer` alive with `ivf`

    # -- search -------------------------------------------------------------------------------
    def _search_slots(
        self, q: np.ndarray, k: int, allowed_slots: Optional[np.ndarray], excluded_slots: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        import faiss

        if self._ivf is None:
            return self._exact_slots(q, k, allowed_slots, excluded_slots)
        n = len(self)
        if allowed_slots is not None:
            if len(allowed_slots) <= self.filtered_exact_max:
                return self._exact_slots(q, k, allowed_slots, excluded_slots)
            bits = np.zeros(len(self._ids), dtype=bool)
            bits[allowed_slots] = True
            selector = faiss.IDSelectorBitmap(np.packbits(bits, bitorder="little"))
            share = len(allowed_slots) / n
        elif len(excluded_slots):
            inner = faiss.IDSelectorBatch(excluded_slots)
            selector = faiss.IDSelectorNot(inner)
            share = (n - len(excluded_slots)) / n
        else:
            selector, share = None, 1.0
        nlist = self.lists
        # A filter that passes a share s of the catalog passes about s of each list: probe 1/s as many.
        nprobe = min(nlist, math.ceil(self.nprobe / share))
        query = q.reshape(1, -1)
        while True:
            if selector is None:
                params = faiss.SearchParametersIVF(nprobe=nprobe)
            else:
                params = faiss.SearchParametersIVF(nprobe=nprobe, sel=selector)
            scores, labels = self._ivf.search(query, k, params=params)
            found = labels[0] >= 0
            if int(found.sum()) >= k or nprobe >= nlist:
                break
            nprobe = min(nlist, nprobe * 4)  # all lists = every qualifying vector is scored
        return labels[0][found], scores[0][found]

    # -- persistence --------------------------------------------------------------------------
    def _params(self) -> dict[str, Any]:
        return {
            "nlist": self.nlist,
            "nprobe": self.nprobe,
            "exact_max_items": self.exact_max_items,
            "filtered_exact_max": self.filtered_exact_max,
            "seed": self.seed,
        }

    def _save_extra(self, folder: Path) -> None:
        import faiss

        state = folder / "ivf.json"
        lists = folder / "ivf.faiss"
        if self._ivf is None:
            lists.unlink(missing_ok=True)
            state.unlink(missing_ok=True)
            return
        faiss.write_index(self._ivf, str(lists))
        state.write_text(json.dumps({"trained_at": self._trained_at, "nlist": self.lists}))

    def _restore(self, folder: Path, manifest: dict[str, Any]) -> None:
        import faiss

        super()._restore(folder, manifest)
        lists = folder / "ivf.faiss"
        if not lists.is_file():
            return
        ivf = faiss.read_index(str(lists))
        state = json.loads((folder / "ivf.json").read_text())
        if not isinstance(ivf, faiss.IndexIVFFlat) or ivf.d != self.dimension or ivf.ntotal != len(self):
            raise ValueError(f"{lists} does not match the saved vectors ({len(self)} of dimension {self.dimension})")
        self._ivf, self._trained_at = ivf, int(state["trained_at"])

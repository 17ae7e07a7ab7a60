"""Approximate nearest-neighbour search for large catalogs: `PQIndex` (the default above
`exact_max_items`) and `IVFIndex` (optional, `index: ivf`).

Why a PQ code scan with exact re-ranking, measured (numbers in bench/README.md): Tastemaker's
queries are mostly *profile* vectors, normalised means of many items. On MiniLM embeddings of the
MovieLens catalog (9,742 items) such queries reach recall@100 0.50 / 0.69 / 0.85 / 0.955 with
IVF-Flat probing 4 / 8 / 16 / 32 of 128 lists (a quarter of the catalog for 0.95), against 0.977
for HNSW (M=32, efSearch 64). On synthetic topic-mixture data that resembles those embeddings,
at 200k items IVF (1024 lists, 128 probes) reached 0.78 and HNSW (efSearch 512) 0.91, and HNSW
took 160 s to build on 2 cores (~15 min extrapolated to 1M; FAISS HNSW also cannot delete). A scan
of 4-bit PQ codes (96 bytes per 384-d item) with the best 2,000 re-ranked exactly reached 0.99 at
200k items and 0.95 at 1M (0.96 re-ranking 2,500, the default; 0.985 re-ranking 4,000), loaded 1M items in about 40 s, deletes
(tombstones + compaction), and its recall does not depend on where the query lies. Its cost is
linear in the catalog (~9 ms per query per million items on one core), so for catalogs well past
a few million an IVF-PQ hybrid would be the next step.

`IVFIndex` stays available for strongly clustered data, where it is faster at equal recall
(recall@100 ≥ 0.99 in ~2 ms at 1M items on separated Gaussian clusters).

Both build by size: below `exact_max_items` (and below what training needs) they search exactly
over the matrix; past it they train on a sample. By default training happens inside the
`upsert`/`remove` call that crosses the line (tens of seconds at a million items), as do
retraining when the catalog has grown 4x and the switch back to exact search below half the
threshold. Retrieval replicas turn `train_inline` off: `PQIndex` then keeps answering with what it
has (exact search before the first codebooks, the old codebooks after) and a worker thread runs
`PQIndex.rebuild`, which builds the new codes beside the old ones and swaps them in after applying
the changes made meanwhile (`IVFIndex` always trains inline).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from tastemaker.retrieval.index import _SlotIndex, dot_rows

#: FAISS warns below 39 training points per list; fewer make poor centroids.
MIN_POINTS_PER_LIST = 39
#: Training sample per list: enough for stable centroids, small enough that training a million-item
#: catalog takes tens of seconds on two cores (k-means cost is sample x lists x dimension x iterations).
TRAIN_POINTS_PER_LIST = 40
#: k-means iterations (FAISS defaults to 25): 10 keeps training at a million items to tens of
#: seconds on two cores; the recall that results is what the tests and the benchmark check.
TRAIN_ITERATIONS = 10
#: Vectors added to FAISS per call during a rebuild, to bound the temporary gathered copy.
ADD_BLOCK = 65_536
#: Each list-count step is a rebuild: only when the catalog moved this factor since training.
REBUILD_FACTOR = 4


def auto_nlist(n: int) -> int:
    """Lists for `n` vectors: the power of two nearest 2·√n, at least 16, with ≥ 39 points per list.

    2·√n sits at the cheap end of FAISS' 4–16·√n advice: the build cost grows with the list count,
    and at a million items 2048 lists with 32 probes keep a query's scan to ~1.6 % of the catalog."""
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
        nprobe: int = 32,
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
        # Back to exact search only well below the threshold, so a catalog hovering around it does
        # not retrain on every change.
        if n <= self.exact_max_items // 2 or n < MIN_POINTS_PER_LIST * self.lists:
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


#: PQ codebooks need about 39 training vectors per centroid; 4-bit codes have 16 centroids.
PQ_MIN_TRAIN = 39 * 16
#: Training sample for the PQ codebooks (k-means with 16 centroids per sub-quantizer).
PQ_TRAIN_ITEMS = 65_536


def default_subquantizers(dimension: int) -> int:
    """Sub-quantizers for `dimension`: one 4-bit code per 2 dimensions (192 for 384-d), i.e.
    dimension/4 bytes per vector; falls back to the largest divisor of `dimension` below that."""
    for m in range(max(1, dimension // 2), 0, -1):
        if dimension % m == 0:
            return m
    return 1


class PQIndex(_SlotIndex):
    """A scan of 4-bit product-quantised codes (FAISS `IndexPQFastScan`, SIMD "fast scan") that
    proposes `rerank` candidates, re-scored exactly from the float matrix.

    Every query scans every code, so recall does not depend on how the catalog clusters or where
    the query lies (profile vectors, means of many items, sit between clusters, where IVF lists and
    HNSW graphs lose neighbours; see bench/README.md). With 384-d vectors the codes take 96 bytes
    per item (1/16 of the floats): a million items scan in a few ms on one core. Returned scores
    are exact inner products.

    Filters: an `allowed` set of at most `filtered_exact_max` ids is scored exactly; otherwise the
    scan fetches about `rerank / share` candidates (share = the qualifying part of the codes),
    drops those that do not qualify, and fetches 4x more until k qualify or every code came back.
    Excluded ids (seen items) cluster near the query, so the re-ranked pool grows by `rerank / k`
    for each excluded id the scan ranks inside it (at most k of them), which keeps recall with
    exclusions level with recall without.

    Deletes and replacements leave a dead code behind (FAISS 1.x `IndexPQFastScan.remove_ids`
    followed by `add` loses the added codes, so it is not used); dead codes are skipped, counted
    in the over-fetch, and dropped by re-encoding the live vectors (no retraining) once they are
    more than `COMPACT_SHARE` of the codes. The codebooks are retrained when the catalog has grown
    `REBUILD_FACTOR` times since they were trained."""

    kind = "pq"
    #: Re-encode without dead codes once they are this share of all codes.
    COMPACT_SHARE = 0.1

    def __init__(
        self,
        dimension: int,
        subquantizers: Optional[int] = None,
        rerank: int = 2_000,
        exact_max_items: int = 0,
        filtered_exact_max: int = 20_000,
        seed: int = 0,
    ):
        super().__init__(dimension)
        m = subquantizers or default_subquantizers(self.dimension)
        if self.dimension % m:
            raise ValueError(f"subquantizers ({m}) must divide the dimension ({self.dimension})")
        if rerank < 1:
            raise ValueError(f"rerank must be positive, got {rerank}")
        self.subquantizers = m
        self.rerank = int(rerank)
        self.exact_max_items = int(exact_max_items)
        self.filtered_exact_max = int(filtered_exact_max)
        self.seed = int(seed)
        self._codes: Any = None  # faiss.IndexPQFastScan once trained
        self._node_slot = np.zeros(0, dtype=np.int64)  # FAISS position -> slot; -1 = dead code
        self._slot_node = np.zeros(0, dtype=np.int64)  # slot -> FAISS position; -1 = none
        self._dead = 0
        self._trained_at = 0
        #: Codebook trainings so far (inline or by `rebuild`); a restart that loads a saved index
        #: starts at 0, which is how tests see that nothing was retrained.
        self.trainings = 0
        self._building = False
        self._dirty: Optional[list[np.ndarray]] = None  # slots changed during a `rebuild`
        self._drops = 0
        #: Candidates re-scored exactly by the last approximate search (for tests and the benchmark).
        self.last_reranked = 0

    @property
    def approximate(self) -> bool:
        """True once the codebooks are trained and searches scan codes."""
        return self._codes is not None

    @property
    def dead_codes(self) -> int:
        """Codes of removed or replaced vectors still in the scan (skipped; compacted later)."""
        return self._dead

    def memory_bytes(self) -> int:
        total = super().memory_bytes() + self._node_slot.nbytes + self._slot_node.nbytes
        if self._codes is not None:
            total += int(self._codes.codes.size())
        return total

    def _trainable(self, n: int) -> bool:
        return n > self.exact_max_items and n >= PQ_MIN_TRAIN

    # -- keeping FAISS in step ----------------------------------------------------------------
    def _after_upsert(self, slots: np.ndarray, replaced: np.ndarray, vectors: np.ndarray) -> None:
        if self._dirty is not None:
            self._dirty.append(slots.copy())
        n = len(self)
        if self._codes is None or n >= REBUILD_FACTOR * self._trained_at:
            if not self._trainable(n):
                return
            if self.train_inline:
                self._rebuild()
                return
            if self._codes is None:  # searched exactly until `rebuild` has trained codebooks
                return
            # Otherwise the current codebooks keep encoding new vectors until the retrained ones
            # are swapped in.
        if replaced.any():
            self._kill(self._slot_node[slots[replaced]])
        first = int(self._codes.ntotal)
        self._codes.add(vectors)
        self._node_slot = np.concatenate([self._node_slot, slots])
        self._grow_slot_map(len(self._ids))
        self._slot_node[slots] = np.arange(first, first + len(slots), dtype=np.int64)
        self._maybe_compact()

    def _after_remove(self, slots: np.ndarray) -> None:
        if self._dirty is not None:
            self._dirty.append(slots.copy())
        if self._codes is None:
            return
        n = len(self)
        if n < PQ_MIN_TRAIN or n <= self.exact_max_items // 2:  # hysteresis, as for IVFIndex
            self._drop()
            return
        self._kill(self._slot_node[slots])
        self._slot_node[slots] = -1
        self._maybe_compact()

    def _kill(self, nodes: np.ndarray) -> None:
        nodes = nodes[nodes >= 0]
        self._node_slot[nodes] = -1
        self._dead += len(nodes)

    def _grow_slot_map(self, size: int) -> None:
        if len(self._slot_node) < size:
            grown = np.full(max(size, int(len(self._slot_node) * 1.5) + 16), -1, dtype=np.int64)
            grown[: len(self._slot_node)] = self._slot_node
            self._slot_node = grown

    def _drop(self) -> None:
        self._drops += 1  # a build in progress must not bring the codes back
        self._codes, self._trained_at, self._dead = None, 0, 0
        self._node_slot = np.zeros(0, dtype=np.int64)
        self._slot_node = np.zeros(0, dtype=np.int64)

    def _maybe_compact(self) -> None:
        if self.train_inline and self._dead > self.COMPACT_SHARE * int(self._codes.ntotal):
            self._encode_live()

    def _encode_live(self) -> None:
        """(Re-)encode every live vector, in slot order, with the current codebooks."""
        live = self._live_slots()
        self._codes.reset()
        for start in range(0, len(live), ADD_BLOCK):
            self._codes.add(self._matrix[live[start : start + ADD_BLOCK]])
        self._node_slot, self._dead = live, 0
        self._slot_node = np.full(len(self._ids), -1, dtype=np.int64)
        self._slot_node[live] = np.arange(len(live), dtype=np.int64)

    def _rebuild(self) -> None:
        """Train codebooks on a sample of the live vectors, then encode them all."""
        live = self._live_slots()
        codes = self._train(self._matrix[self._training_sample(live)])
        self._codes, self._trained_at = codes, len(live)
        self._encode_live()

    def _training_sample(self, live: np.ndarray) -> np.ndarray:
        rng = np.random.default_rng(self.seed)
        return live if len(live) <= PQ_TRAIN_ITEMS else np.sort(rng.choice(live, PQ_TRAIN_ITEMS, replace=False))

    def _train(self, sample: np.ndarray) -> Any:
        """Fresh `IndexPQFastScan` with codebooks trained on `sample` (no codes yet)."""
        import faiss

        self.trainings += 1
        codes = faiss.IndexPQFastScan(self.dimension, self.subquantizers, 4, faiss.METRIC_INNER_PRODUCT)
        codes.pq.cp.seed = self.seed
        codes.pq.cp.niter = TRAIN_ITERATIONS
        # Each sub-quantizer is a tiny k-means (16 centroids): OpenMP costs more than it brings,
        # above all on a busy machine (measured 5x faster on one thread on 2 shared cores).
        threads = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(1)
        try:
            codes.train(sample)
        finally:
            faiss.omp_set_num_threads(threads)
        return codes

    # -- building off the caller's thread -----------------------------------------------------
    def rebuild_due(self) -> bool:
        """With `train_inline` off: is there training or compaction for `rebuild` to do?"""
        with self._lock:
            return not self._building and self._work_due() is not None

    def _work_due(self) -> Optional[str]:
        n = len(self)
        if self._trainable(n) and (self._codes is None or n >= REBUILD_FACTOR * self._trained_at):
            return "train"
        if self._codes is not None and self._dead > self.COMPACT_SHARE * int(self._codes.ntotal):
            return "compact"
        return None

    def rebuild(self, before_swap: Optional[Callable[[], None]] = None) -> Optional[str]:
        """Train new codebooks (or re-encode without dead codes) while the index keeps answering
        and changing, then swap the new codes in. Meant for a worker thread: the lock is held only
        to take a sample at the start and for the swap at the end. Vectors upserted or removed
        during the build are logged and applied to the new codes before the swap, so nothing is
        lost. Returns what was done ("train", "compact") or None if nothing was due.
        `before_swap` runs between the build and the swap (tests use it to act mid-build)."""
        with self._lock:
            if self._building:
                return None
            work = self._work_due()
            if work is None:
                return None
            self._building, self._dirty = True, []
            live = self._live_slots()
            matrix = self._matrix  # rows rewritten meanwhile are logged in _dirty and redone
            sample = matrix[self._training_sample(live)] if work == "train" else None  # a copy
            drops = self._drops
            old = self._codes
        try:
            if work == "train":
                codes = self._train(sample)
                del sample
            else:
                import faiss

                codes = faiss.IndexPQFastScan(self.dimension, self.subquantizers, 4, faiss.METRIC_INNER_PRODUCT)
                codes.pq = old.pq  # the same codebooks (copied): compaction does not retrain
                codes.is_trained = True
            for start in range(0, len(live), ADD_BLOCK):
                codes.add(matrix[live[start : start + ADD_BLOCK]])
            if before_swap is not None:
                before_swap()
            with self._lock:
                if self._drops != drops:  # the catalog shrank back to exact search meanwhile
                    return None
                node_slot = live.copy()
                slot_node = np.full(len(self._ids), -1, dtype=np.int64)
                slot_node[live] = np.arange(len(live), dtype=np.int64)
                changed = np.unique(np.concatenate(self._dirty)) if self._dirty else np.zeros(0, dtype=np.int64)
                dead = 0
                if len(changed):
                    stale = slot_node[changed]
                    stale = stale[stale >= 0]
                    node_slot[stale] = -1
                    dead = len(stale)
                    slot_node[changed] = -1
                    ids = self._ids
                    current = np.asarray([s for s in changed.tolist() if ids[s] is not None], dtype=np.int64)
                    if len(current):
                        first = int(codes.ntotal)
                        codes.add(self._matrix[current])
                        node_slot = np.concatenate([node_slot, current])
                        slot_node[current] = np.arange(first, first + len(current), dtype=np.int64)
                self._codes, self._node_slot, self._slot_node, self._dead = codes, node_slot, slot_node, dead
                if work == "train":
                    self._trained_at = len(live)
                return work
        finally:
            with self._lock:
                self._building, self._dirty = False, None

    # -- search -------------------------------------------------------------------------------
    def _search_slots(
        self, q: np.ndarray, k: int, allowed_slots: Optional[np.ndarray], excluded_slots: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        if self._codes is None:
            return self._exact_slots(q, k, allowed_slots, excluded_slots)
        n, codes = len(self), int(self._codes.ntotal)
        keep: Optional[np.ndarray] = None  # by slot: may this slot be returned?
        if allowed_slots is not None:
            if len(allowed_slots) <= self.filtered_exact_max:
                return self._exact_slots(q, k, allowed_slots, excluded_slots)
            keep = np.zeros(len(self._ids), dtype=bool)
            keep[allowed_slots] = True
            qualifying = len(allowed_slots)
        else:
            qualifying = n - len(excluded_slots)
        base = max(self.rerank, k)
        # Dead codes and ids outside `allowed` are spread through the code ranking: fetch enough
        # that about `base` of the re-ranked candidates qualify.
        pool = math.ceil(base * codes / max(1, qualifying))
        # Excluded ids are not spread: a user's seen items are what the profile is made of, so they
        # rank near the top, and every one of them inside the pool pushes the ids we want one place
        # deeper. Reaching the same depth of the exact ranking needs a pool of base * (k + x) / k
        # for x excluded ids inside it (measured at 1M items: recall@100 with 50 seen items excluded
        # fell from 0.95 to 0.935 when the pool only grew by x). x is counted on the scan's own
        # order below; at most k of them count, so the pool at most doubles.
        grow = base / k
        fetch = min(codes, pool + math.ceil(grow * min(len(excluded_slots), k)))
        query = q.reshape(1, -1)
        while True:
            _, nodes = self._codes.search(query, fetch)
            ranked = self._node_slot[nodes[0][nodes[0] >= 0]]  # best code first; -1 = dead code
            if len(excluded_slots):
                excluded_here = np.isin(ranked, excluded_slots)
                # Shortest prefix that holds the pool plus `grow` per excluded id inside it.
                inside = np.minimum(np.cumsum(excluded_here), k)
                need = pool + np.ceil(grow * inside)
                long_enough = np.flatnonzero(np.arange(1, len(ranked) + 1) >= need)
                prefix = int(long_enough[0]) + 1 if len(long_enough) else len(ranked)
                usable = (ranked[:prefix] >= 0) & ~excluded_here[:prefix]
                candidates = ranked[:prefix][usable]
            else:
                candidates = ranked[ranked >= 0]
            if keep is not None:
                candidates = candidates[keep[candidates]]
            if len(candidates) >= k or fetch >= codes:
                break
            # All codes fetched = every qualifying vector is a candidate.
            fetch = min(codes, fetch * 4)
            pool = fetch
        self.last_reranked = len(candidates)
        scores = dot_rows(self._matrix[candidates], q)
        if k < len(scores):
            top = np.argpartition(-scores, k - 1)[:k]
        else:
            top = np.arange(len(scores))
        top = top[np.lexsort((candidates[top], -scores[top]))]
        return candidates[top], scores[top]

    # -- persistence --------------------------------------------------------------------------
    def _params(self) -> dict[str, Any]:
        return {
            "subquantizers": self.subquantizers,
            "rerank": self.rerank,
            "exact_max_items": self.exact_max_items,
            "filtered_exact_max": self.filtered_exact_max,
            "seed": self.seed,
        }

    def _save_extra(self, folder: Path) -> None:
        import faiss

        codes, nodes, state = folder / "pq.faiss", folder / "pq_nodes.npy", folder / "pq.json"
        if self._codes is None:
            for path in (codes, nodes, state):
                path.unlink(missing_ok=True)
            return
        faiss.write_index(self._codes, str(codes))
        with open(nodes, "wb") as f:
            np.save(f, self._node_slot, allow_pickle=False)
        state.write_text(json.dumps({"trained_at": self._trained_at}))

    def _restore(self, folder: Path, manifest: dict[str, Any]) -> None:
        import faiss

        super()._restore(folder, manifest)
        path = folder / "pq.faiss"
        if not path.is_file():
            return
        codes = faiss.read_index(str(path))
        node_slot = np.load(folder / "pq_nodes.npy", allow_pickle=False).astype(np.int64)
        live = node_slot[node_slot >= 0]
        ok = (
            isinstance(codes, faiss.IndexPQFastScan)
            and codes.d == self.dimension
            and codes.ntotal == len(node_slot)
            and len(live) == len(self) == len(np.unique(live))
            and all(self._ids[s] is not None for s in live.tolist())
        )
        if not ok:
            raise ValueError(f"{path} does not match the saved vectors ({len(self)} of dimension {self.dimension})")
        self._codes, self._node_slot, self._dead = codes, node_slot, len(node_slot) - len(live)
        self._trained_at = int(json.loads((folder / "pq.json").read_text())["trained_at"])
        self._slot_node = np.full(len(self._ids), -1, dtype=np.int64)
        self._slot_node[live] = np.nonzero(node_slot >= 0)[0]

"""Vector indexes. One protocol; `FlatIndex` is exact inner-product search with FAISS."""

from __future__ import annotations

from typing import Optional, Protocol, Sequence

import numpy as np


class VectorIndex(Protocol):
    """Maps string ids to unit vectors and answers top-k inner-product queries."""

    dimension: int

    def upsert(self, ids: Sequence[str], vectors: np.ndarray) -> None:
        """Add or replace vectors."""

    def remove(self, ids: Sequence[str]) -> None:
        """Remove ids; unknown ids are ignored."""

    def search(
        self, query: np.ndarray, k: int, allowed: Optional[set[str]] = None, excluded: Optional[set[str]] = None
    ) -> list[tuple[str, float]]:
        """Top-k (id, score) by inner product, best first, restricted to `allowed` if given and
        never returning ids in `excluded`. Returns fewer than k only when fewer ids qualify."""

    def vector(self, item_id: str) -> Optional[np.ndarray]:
        """The stored vector of an id, or None."""

    def __len__(self) -> int: ...


class FlatIndex:
    """Exact search: FAISS `IndexFlatIP` behind an id map, with filter pushdown via selectors."""

    def __init__(self, dimension: int):
        import faiss

        self._faiss = faiss
        self.dimension = dimension
        self._index = faiss.IndexIDMap2(faiss.IndexFlatIP(dimension))
        self._label_of: dict[str, int] = {}
        self._id_of: dict[int, str] = {}
        self._next_label = 0

    def __len__(self) -> int:
        return len(self._label_of)

    def __contains__(self, item_id: str) -> bool:
        return item_id in self._label_of

    def upsert(self, ids: Sequence[str], vectors: np.ndarray) -> None:
        if not len(ids):
            return
        vectors = np.ascontiguousarray(vectors, dtype=np.float32).reshape(len(ids), self.dimension)
        self.remove([i for i in ids if i in self._label_of])
        labels = np.arange(self._next_label, self._next_label + len(ids), dtype=np.int64)
        self._next_label += len(ids)
        for item_id, label in zip(ids, labels.tolist()):
            self._label_of[item_id] = label
            self._id_of[label] = item_id
        self._index.add_with_ids(vectors, labels)

    def remove(self, ids: Sequence[str]) -> None:
        labels = [self._label_of.pop(i) for i in ids if i in self._label_of]
        if labels:
            for label in labels:
                del self._id_of[label]
            self._index.remove_ids(np.asarray(labels, dtype=np.int64))

    def vector(self, item_id: str) -> Optional[np.ndarray]:
        label = self._label_of.get(item_id)
        return None if label is None else self._index.reconstruct(label)

    def vectors(self, ids: Sequence[str]) -> np.ndarray:
        """Stored vectors of known ids, as a (len(ids), d) matrix."""
        if not ids:
            return np.zeros((0, self.dimension), dtype=np.float32)
        return np.stack([self._index.reconstruct(self._label_of[i]) for i in ids])

    def search(self, query, k, allowed=None, excluded=None):
        if k <= 0 or not self._label_of:
            return []
        query = np.ascontiguousarray(query, dtype=np.float32).reshape(1, self.dimension)
        selector = None
        if allowed is not None:
            labels = [self._label_of[i] for i in allowed if i in self._label_of and not (excluded and i in excluded)]
            if not labels:
                return []
            selector = self._faiss.IDSelectorBatch(np.asarray(labels, dtype=np.int64))
            k = min(k, len(labels))
        elif excluded:
            labels = [self._label_of[i] for i in excluded if i in self._label_of]
            if labels:
                selector = self._faiss.IDSelectorNot(self._faiss.IDSelectorBatch(np.asarray(labels, dtype=np.int64)))
            k = min(k, len(self._label_of) - len(labels))
        k = min(k, len(self._label_of))
        if k <= 0:
            return []
        params = self._faiss.SearchParameters(sel=selector) if selector is not None else None
        scores, labels = self._index.search(query, k, params=params)
        return [(self._id_of[int(l)], float(s)) for s, l in zip(scores[0], labels[0]) if l >= 0]


def create_index(kind: str, dimension: int) -> VectorIndex:
    """Build the index named in `RetrievalConfig.index`."""
    if kind == "flat":
        return FlatIndex(dimension)
    raise ValueError(f"unknown index type {kind!r}; allowed: 'flat'")

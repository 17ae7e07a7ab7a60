"""State store: items (with vectors and a change feed), events, profile snapshots.

One narrow interface (`Store`), opened by URL with `open_store`. The SQLite implementation is the
embedded default; the same conformance tests run against every implementation.
"""

from tastemaker.store.base import ItemChange, SnapshotRow, Store, StoredEvent, open_store

__all__ = ["ItemChange", "SnapshotRow", "Store", "StoredEvent", "open_store"]

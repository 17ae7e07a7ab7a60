"""State store: items (with vectors and a change feed), events, profile snapshots.

One narrow interface (`Store`), opened by URL with `open_store`: SQLite (`sqlite:///...`, the
embedded default, one node) or PostgreSQL (`postgresql://...`, shared by every node of a cluster).
The same conformance tests run against both. `redact_url` is how a store URL may be shown.
"""

from tastemaker.store.base import ItemChange, SnapshotRow, Store, StoredEvent, open_store, redact_url

__all__ = ["ItemChange", "SnapshotRow", "Store", "StoredEvent", "open_store", "redact_url"]

"""The retrieval deployment: a `Retriever` kept in step with the store's item change feed and
event feed (collaborative/sequential signals), reloading fitted artefacts without a restart.

`RetrievalReplica` is the whole replica as plain Python (tested without Ray); the Serve
deployment only drives its `sync` from the event loop and forwards requests.

Index upkeep off the request path:

* **Training in a worker thread.** The replica's index defers training and compaction
  (`train_inline = False`). After a sync finds them due, a worker thread runs `index.rebuild()`:
  the old structure keeps answering searches and the feed keeps being applied while the new
  one is built; changes made meanwhile are applied to the new one before the atomic swap. Only
  the very first training of a replica that starts from nothing happens in the constructor,
  before the replica serves anything.
* **Saved and reloaded.** After each build (and after that first training) the replica saves the
  index under `index_dir/<key>/snapshot-<seq>-<id>/` (the index folder without pickle, plus
  `replica.json` with the item feed seq it covers). `key` names the index parameters and the
  identity of the encoder model that made the store's vectors (as the store records it), so a
  snapshot is never loaded into a different configuration or next to another model's vectors. A replica
  that starts finds the newest snapshot, loads it, and catches up from the feed: changes up to
  the saved seq only refill the catalog metadata (their vectors are checked against the loaded
  ones), later ones are applied as usual, and at the end of the feed the index must hold exactly
  the catalog's items. Any disagreement drops the snapshot and rebuilds from the feed.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import shutil
import threading
import time
import uuid
from pathlib import Path
from typing import Optional

import numpy as np
from ray import serve
from threadpoolctl import threadpool_limits

from tastemaker.config import EventWeights, RetrievalConfig, StoreConfig
from tastemaker.domain import Item, ProfileView, RecommendQuery, ScoredItem
from tastemaker.retrieval.collaborative import GraphFollower, graph_params
from tastemaker.retrieval.index import create_index, load_index
from tastemaker.retrieval.ranking import Retriever
from tastemaker.store import Store, open_store
from tastemaker.store.base import ENCODER_IDENTITY_KEY

logger = logging.getLogger(__name__)

SNAPSHOT_FORMAT = "tastemaker-retrieval-snapshot"
#: Items read from the change feed per store call.
FEED_BATCH = 5_000


def default_index_dir(config: RetrievalConfig, store_url: str) -> Optional[Path]:
    """Where a replica keeps snapshots: `config.index_dir`, else `retrieval-index/` next to a
    SQLite store file; None = not saved."""
    if config.index_dir is not None:
        return Path(config.index_dir).expanduser() if config.index_dir else None
    if store_url.startswith("sqlite:///"):
        return Path(store_url[len("sqlite:///") :]).expanduser().resolve().parent / "retrieval-index"
    return None


def snapshot_key(config: RetrievalConfig, model_identity: str) -> str:
    """Names what a saved index must match to be reused: the index parameters and the model."""
    params = {
        "index": config.index,
        "exact_max_items": config.exact_max_items,
        "pq_subquantizers": config.pq_subquantizers,
        "ivf_nlist": config.ivf_nlist,
        "model": model_identity,
    }
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]


class RetrievalReplica:
    """One retrieval replica: the `Retriever`, its feeds, background index builds, snapshots."""

    def __init__(
        self,
        config: RetrievalConfig,
        store: Store,
        weights: EventWeights,
        index_dir: Optional[Path] = None,
        model_identity: Optional[str] = None,
    ):
        self.config = config
        self.store = store
        self.follower = GraphFollower(store, graph_params(config), weights)
        self.retriever = Retriever(config, self.follower.start())
        self.seq = 0
        self.index_dir = None if index_dir is None else Path(index_dir)
        self._model_identity = model_identity
        #: Feed seq of the snapshot this replica started from (None: built from the feed).
        self.started_from_seq: Optional[int] = None
        self._covered_seq: Optional[int] = None  # set while catching up over a loaded snapshot
        #: Background builds finished (training or compaction) and snapshots written.
        self.builds = 0
        self.saves = 0
        self._builder: Optional[threading.Thread] = None
        # Held while the feed is applied and while a snapshot is written, so a snapshot never
        # sees a half-applied batch; searches do not take it.
        self._write_lock = threading.Lock()
        self._popularity_time = 0.0
        self._artifact_time = time.monotonic()
        self._load_snapshot()
        self.sync(background=False)
        index = self.retriever.index
        if index is not None and index.rebuild() is not None:  # not serving yet: build right here
            self.builds += 1
            self.save_snapshot()

    # -- the feeds -------------------------------------------------------------------------
    def sync(self, background: bool = True) -> int:
        """Apply item changes after the last seen seq (returns how many), refresh popularity,
        follow the event feed and artefacts, and (`background`) start a build when one is due."""
        if not self._write_lock.acquire(blocking=False):
            return 0  # a snapshot is being written: the next tick catches up
        try:
            applied = self._apply_item_changes()
            if applied:
                # Column writes and the index's slot -> row map catch up here, not in a request.
                self.retriever.catalog.flush()
                if self.retriever.index is not None and hasattr(self.retriever.index, "slot_rows"):
                    self.retriever.index.slot_rows(self.retriever.catalog)
        finally:
            self._write_lock.release()
        if applied or time.monotonic() - self._popularity_time > self.config.popularity_refresh_s:
            self.retriever.catalog.set_popularity(self.store.item_interaction_counts())
            self._popularity_time = time.monotonic()
        if time.monotonic() - self._artifact_time > self.config.artifact_check_s:
            self._artifact_time = time.monotonic()
            if self.follower.maybe_reload():
                logger.info("retrieval: loaded fitted interaction graph v%s", self.follower.artifact_version)
        # Bounded per tick: a backlog (e.g. a bulk load) is absorbed over several ticks while
        # requests keep being served between them.
        self.follower.catch_up(max_events=5_000)
        self.retriever.graph = self.follower.graph
        if background:
            self._start_build_if_due()
        return applied

    def _apply_item_changes(self) -> int:
        applied = 0
        while True:
            changes = self.store.item_changes(self.seq, limit=FEED_BATCH)
            if not changes:
                break
            if self._covered_seq is not None and changes[0].seq <= self._covered_seq:
                covered = [c for c in changes if c.seq <= self._covered_seq]
                if not self._refill_catalog(covered):
                    return applied + self._apply_item_changes()  # the snapshot was dropped: start over
                changes = changes[len(covered) :]
                self.seq = covered[-1].seq
                applied += len(covered)
                if not changes:
                    continue
            upserts = [c.item for c in changes if c.item is not None]
            deletes = [c.item_id for c in changes if c.item is None]
            self.retriever.remove(deletes)
            self._ensure_index(upserts)
            self.retriever.upsert(upserts)
            self.seq = changes[-1].seq
            applied += len(changes)
        if self._covered_seq is not None and not self._snapshot_complete():
            return applied + self._apply_item_changes()
        return applied

    def _ensure_index(self, upserts: list[Item]) -> None:
        """Create the index before the first vectors arrive, with training deferred to `rebuild`."""
        if self.retriever.index is None:
            first = next((i for i in upserts if i.vector is not None), None)
            if first is not None:
                self.retriever.index = create_index(self.config, int(first.vector.shape[0]))
                self.retriever.index.train_inline = False

    # -- snapshots ----------------------------------------------------------------------------
    @property
    def snapshot_dir(self) -> Optional[Path]:
        """This configuration's snapshot folder; the model is the one the store records as having
        made its vectors (`tastemaker.store.base.ENCODER_IDENTITY_KEY`) unless one was given."""
        if self.index_dir is None:
            return None
        identity = self._model_identity
        if identity is None:
            identity = self.store.get_meta(ENCODER_IDENTITY_KEY) or ""
        return self.index_dir / snapshot_key(self.config, identity)

    def _load_snapshot(self) -> None:
        snapshot_dir = self.snapshot_dir
        if snapshot_dir is None or not snapshot_dir.is_dir():
            return
        candidates = []
        for folder in snapshot_dir.glob("snapshot-*"):
            try:
                meta = json.loads((folder / "replica.json").read_text())
                if meta.get("format") == SNAPSHOT_FORMAT:
                    candidates.append((int(meta["seq"]), folder))
            except (OSError, ValueError, KeyError, TypeError):
                continue  # being written, or damaged: never loaded
        for seq, folder in sorted(candidates, reverse=True):
            try:
                index = load_index(folder / "index")
            except (OSError, ValueError, KeyError) as e:
                logger.warning("retrieval: cannot load the index snapshot %s (%s)", folder, e)
                continue
            index.train_inline = False
            if hasattr(index, "rerank"):
                index.rerank = self.config.pq_rerank  # a search-time knob: the current config wins
            self.retriever.index = index
            self._covered_seq = self.started_from_seq = seq
            logger.info("retrieval: loaded the index snapshot %s (%d items, feed seq %d)", folder.name, len(index), seq)
            return

    def _refill_catalog(self, covered: list) -> bool:
        """Changes the snapshot already holds: metadata only, vectors checked against the index."""
        index = self.retriever.index
        upserts = [c.item for c in covered if c.item is not None and c.item.vector is not None]
        if upserts:
            ids = [i.item_id for i in upserts]
            if not all(i in index for i in ids) or not np.allclose(
                index.vectors(ids), np.stack([i.vector for i in upserts]), atol=1e-6
            ):
                return self._drop_snapshot("its vectors differ from the store's")
        deletes = [c.item_id for c in covered if c.item is None]
        self.retriever.remove(deletes)  # not in the index; forgets them elsewhere, as a replay would
        for item in upserts:
            self.retriever.catalog.upsert(item)
        return True

    def _snapshot_complete(self) -> bool:
        """At the end of the feed: the index must hold exactly the catalog's items (an id the
        store never had, or had deleted before the snapshot's seq, would be one too many)."""
        index = self.retriever.index
        if len(index) != len(self.retriever.catalog.items):
            return self._drop_snapshot(f"it holds {len(index)} items, the feed {len(self.retriever.catalog.items)}")
        self._covered_seq = None
        return True

    def _drop_snapshot(self, why: str) -> bool:
        logger.warning("retrieval: not using the index snapshot (%s); rebuilding from the feed", why)
        self.retriever = Retriever(self.config, self.follower.graph)
        self.seq, self._covered_seq, self.started_from_seq = 0, None, None
        return False

    def save_snapshot(self) -> Optional[Path]:
        """Write the index and the feed seq it covers; older snapshots of the key are removed.
        Holds the write lock (the feed waits), not the index lock (searches go on)."""
        index = self.retriever.index
        snapshot_dir = self.snapshot_dir
        if snapshot_dir is None or index is None:
            return None
        snapshot_dir.mkdir(parents=True, exist_ok=True)
        with self._write_lock:
            seq = self.seq
            tmp = snapshot_dir / f"tmp-{uuid.uuid4().hex[:8]}"
            index.save(tmp / "index", hold_lock=False)
            (tmp / "replica.json").write_text(
                json.dumps({"format": SNAPSHOT_FORMAT, "seq": seq, "items": len(index), "kind": index.kind})
            )
        final = snapshot_dir / f"snapshot-{seq:012d}-{tmp.name[4:]}"
        os.replace(tmp, final)
        for old in snapshot_dir.iterdir():  # other replicas' older snapshots too
            if old != final and old.name.startswith("snapshot-") and old.name < final.name:
                shutil.rmtree(old, ignore_errors=True)
        self.saves += 1
        return final

    # -- background builds -------------------------------------------------------------------
    def _start_build_if_due(self) -> None:
        index = self.retriever.index
        if index is None or (self._builder is not None and self._builder.is_alive()) or not index.rebuild_due():
            return
        self._builder = threading.Thread(target=self._build, args=(index,), name="retrieval-index-build", daemon=True)
        self._builder.start()

    def _build(self, index) -> None:
        try:
            if index.rebuild() is not None:
                self.builds += 1
                if index is self.retriever.index:
                    self.save_snapshot()
        except Exception:  # the old structure keeps answering; the next sync tries again
            logger.exception("retrieval: building the index failed")

    def wait_for_build(self, timeout: Optional[float] = None) -> bool:
        """Wait for a running background build; True when none is running any more."""
        builder = self._builder
        if builder is not None:
            builder.join(timeout)
            return not builder.is_alive()
        return True


@serve.deployment(name="Retrieval")
class RetrievalDeployment:
    """Every replica follows the change feed on its own, so all replicas converge. Each reports
    the instance id of the store it opened (`tastemaker.cluster`), so health sees a replica that
    opened another store than the rest (e.g. its node's own SQLite file)."""

    def __init__(
        self,
        config: RetrievalConfig,
        store_url: str,
        weights: EventWeights,
        namespace: Optional[str] = None,
        store_config: Optional[StoreConfig] = None,
    ):
        # A request's products are small (a 64x64 solve, a catalog x 64 factor product, a few
        # hundred candidate vectors) on a fraction of a CPU: BLAS threads only contend. Timed ad hoc
        # in-process on MovieLens with the factors on, under load: recommend p50 64 ms with 2 BLAS
        # threads, 30 ms with 1. FAISS uses OpenMP, not this pool.
        threadpool_limits(1, "blas")
        self.config = config
        store = open_store(store_url, store_config)
        self.replica = RetrievalReplica(config, store, weights, default_index_dir(config, store_url))
        self._task = asyncio.get_event_loop().create_task(self._follow())
        self._reporter_task = None
        if namespace is not None:
            from tastemaker.cluster import StoreReporter

            context = serve.get_replica_context()
            reporter = StoreReporter(
                context.app_name, namespace, f"retrieval/{context.replica_id.unique_id}", store.instance_id()
            )
            self._reporter_task = asyncio.get_event_loop().create_task(reporter.run_forever())

    async def _follow(self) -> None:
        while True:
            await asyncio.sleep(self.config.refresh_interval_s)
            try:
                self.replica.sync()
            except Exception:  # keep following; the next tick retries
                logger.exception("retrieval: following the item change feed failed")

    def ready(self) -> int:
        """Number of items in the index."""
        return len(self.replica.retriever)

    def recommend(self, request: RecommendQuery, profile: ProfileView) -> list[ScoredItem]:
        return self.replica.retriever.recommend(request, profile)

    def similar_items(self, item_id: str, request: RecommendQuery) -> list[ScoredItem]:
        return self.replica.retriever.similar_items(item_id, request)

    def describe(self, profile: ProfileView) -> tuple[list[str], list[str]]:
        return self.replica.retriever.describe(profile)

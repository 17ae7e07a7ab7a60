"""The retrieval deployment: a `Retriever` kept in step with the store's item change feed and
event feed (collaborative/sequential signals), reloading fitted artefacts without a restart."""

from __future__ import annotations

import asyncio
import logging
import time

from ray import serve

from tastemaker.config import EventWeights, RetrievalConfig
from tastemaker.domain import ProfileView, RecommendQuery, ScoredItem
from tastemaker.retrieval.collaborative import GraphFollower, graph_params
from tastemaker.retrieval.ranking import Retriever
from tastemaker.store import open_store

logger = logging.getLogger(__name__)


@serve.deployment(name="Retrieval")
class RetrievalDeployment:
    """Every replica follows the change feed on its own, so all replicas converge."""

    def __init__(self, config: RetrievalConfig, store_url: str, weights: EventWeights):
        self.config = config
        self.store = open_store(store_url)
        self.follower = GraphFollower(self.store, graph_params(config), weights)
        self.retriever = Retriever(config, self.follower.start())
        self.seq = 0
        self._popularity_time = 0.0
        self._artifact_time = time.monotonic()
        self.sync()
        self._task = asyncio.get_event_loop().create_task(self._follow())

    def sync(self) -> int:
        """Apply all item changes after the last seen seq; returns how many were applied."""
        applied = 0
        while True:
            changes = self.store.item_changes(self.seq, limit=5_000)
            if not changes:
                break
            upserts = [c.item for c in changes if c.item is not None]
            deletes = [c.item_id for c in changes if c.item is None]
            self.retriever.remove(deletes)
            self.retriever.upsert(upserts)
            self.seq = changes[-1].seq
            applied += len(changes)
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
        return applied

    async def _follow(self) -> None:
        while True:
            await asyncio.sleep(self.config.refresh_interval_s)
            try:
                self.sync()
            except Exception:  # keep following; the next tick retries
                logger.exception("retrieval: following the item change feed failed")

    def ready(self) -> int:
        """Number of items in the index."""
        return len(self.retriever)

    def recommend(self, request: RecommendQuery, profile: ProfileView) -> list[ScoredItem]:
        return self.retriever.recommend(request, profile)

    def similar_items(self, item_id: str, request: RecommendQuery) -> list[ScoredItem]:
        return self.retriever.similar_items(item_id, request)

    def describe(self, profile: ProfileView) -> tuple[list[str], list[str]]:
        return self.retriever.describe(profile)

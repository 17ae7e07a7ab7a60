"""Ray actor shell around `ProfileShard`, and the router the gateway uses to reach shards."""

from __future__ import annotations

import asyncio
import logging
from typing import Sequence

import ray

from tastemaker.config import ProfileConfig
from tastemaker.domain import EventAck, ProfileView, UserEvent
from tastemaker.errors import Unavailable
from tastemaker.profiles.shard import ProfileShard
from tastemaker.profiles.state import shard_of
from tastemaker.store import open_store
from tastemaker.store.base import ENCODER_SWAP_PENDING_KEY

logger = logging.getLogger(__name__)


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=0)
class ProfileShardActor:
    """One shard. Sync methods run one at a time, so one user's events apply in arrival order.
    After a restart `__init__` runs again and rebuilds the shard from the store."""

    def __init__(self, shard_id: int, store_url: str, config: ProfileConfig):
        self.shard = ProfileShard(shard_id, open_store(store_url), config)
        replayed = self.shard.recover()
        logger.info("profile shard %d recovered: %d users, %d events replayed",
                    shard_id, len(self.shard.profiles), replayed)

    def recovered(self) -> dict:
        """Answers once `__init__` (recovery) has finished."""
        return self.shard.stats()

    def ready(self) -> dict:
        """Health: like `recovered`, but Unavailable while the store is being re-encoded for a new
        encoder model (its profiles are about to be rebuilt), so the service is not SERVING yet."""
        if self.shard.store.get_meta(ENCODER_SWAP_PENDING_KEY) is not None:
            raise Unavailable("the encoder model changed: items are being re-encoded and profiles rebuilt")
        return self.shard.stats()

    def rebuild(self) -> int:
        """Rebuild all profiles of the shard from the event log (see `ProfileShard.rebuild`)."""
        replayed = self.shard.rebuild()
        logger.info("profile shard %d rebuilt: %d users, %d events replayed",
                    self.shard.shard_id, len(self.shard.profiles), replayed)
        return replayed

    def apply_events(self, events: Sequence[UserEvent]) -> list[EventAck]:
        return self.shard.apply_events(events)

    def get_profile(self, user_id: str) -> ProfileView:
        return self.shard.profile_view(user_id)

    def get_profile_details(self, user_id: str) -> tuple[ProfileView, dict[int, int], float]:
        state = self.shard.profile_state(user_id)
        if state is None:
            return ProfileView(user_id=user_id), {}, 0.0
        return state.view(), dict(state.counts), state.last_event_time

    def delete_user(self, user_id: str) -> int:
        return self.shard.delete_user(user_id)

    def snapshot(self) -> int:
        return self.shard.snapshot()

    def forget_items(self, item_ids: Sequence[str]) -> None:
        self.shard.forget_items(item_ids)


def shard_actor_name(app_name: str, shard_id: int) -> str:
    """Named actors let every gateway replica (and a restarted one) find the same shards."""
    return f"{app_name}-profile-shard-{shard_id}"


class ShardRouter:
    """Finds or creates the shard actors and routes calls by user id."""

    def __init__(self, app_name: str, namespace: str, store_url: str, config: ProfileConfig):
        self.config = config
        store = open_store(store_url)
        try:
            store.ensure_num_shards(config.num_shards, shard_of)
        finally:
            store.close()
        self.actors = [
            ProfileShardActor.options(
                name=shard_actor_name(app_name, shard_id),
                namespace=namespace,
                get_if_exists=True,
                lifetime="detached",
            ).remote(shard_id, store_url, config)
            for shard_id in range(config.num_shards)
        ]

    def wait_ready(self, timeout_s: float = 600.0) -> None:
        """Block until every shard has recovered."""
        ray.get([a.recovered.remote() for a in self.actors], timeout=timeout_s)

    def actor_for(self, user_id: str):
        return self.actors[shard_of(user_id, self.config.num_shards)]

    async def call(self, user_id: str, method: str, *args):
        """Call a shard method for a user; a dead or restarting shard becomes Unavailable."""
        return await self.await_ref(getattr(self.actor_for(user_id), method).remote(*args))

    async def call_all(self, method: str, *args) -> list:
        return await asyncio.gather(*(self.await_ref(getattr(a, method).remote(*args)) for a in self.actors))

    @staticmethod
    async def await_ref(ref):
        """Await a shard call; a dead or restarting shard becomes Unavailable."""
        try:
            return await ref
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as exc:
            raise Unavailable(
                "a profile shard is restarting; acknowledged events are safe, retry the call"
            ) from exc


def kill_shards(app_name: str, namespace: str, num_shards: int, snapshot_first: bool = True) -> None:
    """Stop the detached shard actors (snapshotting them first for a fast next start)."""
    for shard_id in range(num_shards):
        try:
            actor = ray.get_actor(shard_actor_name(app_name, shard_id), namespace=namespace)
        except ValueError:
            continue
        if snapshot_first:
            try:
                ray.get(actor.snapshot.remote(), timeout=60)
            except Exception:  # a dead shard is rebuilt from the event log anyway
                logger.warning("shard %d could not snapshot before stopping", shard_id)
        ray.kill(actor, no_restart=True)

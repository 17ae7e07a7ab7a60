"""Ray actor shell around `ProfileShard`, and the router the gateway uses to reach shards."""

from __future__ import annotations

import asyncio
import logging
from typing import Optional, Sequence

import ray

from tastemaker.config import ProfileConfig, StoreConfig
from tastemaker.domain import EventAck, ProfileView, UserEvent
from tastemaker.errors import ResourceExhausted, Unavailable
from tastemaker.profiles.shard import ProfileShard
from tastemaker.profiles.state import shard_of
from tastemaker.store import open_store
from tastemaker.store.base import ENCODER_SWAP_PENDING_KEY

logger = logging.getLogger(__name__)


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=0)
class ProfileShardActor:
    """One shard. Sync methods run one at a time, so one user's events apply in arrival order.
    After a restart `__init__` runs again and rebuilds the shard from the store."""

    def __init__(self, shard_id: int, store_url: str, config: ProfileConfig, store_config: Optional[StoreConfig] = None):
        self.shard = ProfileShard(shard_id, open_store(store_url, store_config), config)
        replayed = self.shard.recover()
        logger.info("profile shard %d recovered: %d users, %d events replayed",
                    shard_id, len(self.shard.profiles), replayed)

    def recovered(self) -> dict:
        """Answers once `__init__` (recovery) has finished."""
        return self.shard.stats()

    def ready(self) -> dict:
        """Health: like `recovered`, but Unavailable while the store is being re-encoded for a new
        encoder model (its profiles are about to be rebuilt), so the service is not SERVING yet.
        Also names the store this shard opened (`store_instance_id`, `node_id`): health compares
        them across components (`tastemaker.cluster`)."""
        if self.shard.store.get_meta(ENCODER_SWAP_PENDING_KEY) is not None:
            raise Unavailable("the encoder model changed: items are being re-encoded and profiles rebuilt")
        return {
            **self.shard.stats(),
            "store_instance_id": self.shard.store.instance_id(),
            "node_id": ray.get_runtime_context().get_node_id(),
        }

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
    """Finds or creates the shard actors and routes calls by user id.

    Each shard's mailbox is bounded per router (`profiles.max_in_flight_calls`): a call submitted
    while that many are unanswered is refused at once with ResourceExhausted, instead of queueing
    behind them for seconds. A caller that gives up (its client's deadline passed, or it
    disconnected: Serve cancels the request) cancels its shard call, so queued work whose caller is
    gone is dropped, not done; a call already running on the shard completes."""

    def __init__(
        self, app_name: str, namespace: str, store_url: str, config: ProfileConfig, store_config: Optional[StoreConfig] = None
    ):
        self.config = config
        store = open_store(store_url, store_config)
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
                # Across the nodes, so losing one node restarts only its share of the shards.
                scheduling_strategy="SPREAD",
            ).remote(shard_id, store_url, config, store_config)
            for shard_id in range(config.num_shards)
        ]
        self.mailboxes = [Mailbox(config.max_in_flight_calls) for _ in range(config.num_shards)]

    def wait_ready(self, timeout_s: float = 600.0) -> None:
        """Block until every shard has recovered."""
        ray.get([a.recovered.remote() for a in self.actors], timeout=timeout_s)

    def shard_for(self, user_id: str) -> int:
        """The shard that owns a user."""
        return shard_of(user_id, self.config.num_shards)

    def actor_for(self, user_id: str):
        return self.actors[self.shard_for(user_id)]

    def submit(self, shard_id: int, method: str, *args) -> "asyncio.Future":
        """Submit a call to one shard now (Ray runs one caller's calls to a shard in submission
        order) and return a future of its result; ResourceExhausted at once when the shard's
        mailbox is full. The slot is held until the shard has answered or dropped the call."""
        self.mailboxes[shard_id].admit(shard_id)
        return self._submit_admitted(shard_id, method, args)

    def submit_many(self, calls: Sequence[tuple[int, str, tuple]]) -> list:
        """Submit several `(shard_id, method, args)` calls, all or none: every mailbox is checked
        before any call goes out, so a refusal never leaves part of a batch applied."""
        taken: list[int] = []
        try:
            for shard_id, _, _ in calls:
                self.mailboxes[shard_id].admit(shard_id)
                taken.append(shard_id)
        except ResourceExhausted:
            for shard_id in taken:
                self.mailboxes[shard_id].release()
            raise
        return [self._submit_admitted(shard_id, method, args) for shard_id, method, args in calls]

    def _submit_admitted(self, shard_id: int, method: str, args: tuple):
        mailbox = self.mailboxes[shard_id]
        try:
            ref = getattr(self.actors[shard_id], method).remote(*args)
        except BaseException:
            mailbox.release()
            raise
        done = asyncio.ensure_future(self.await_ref(ref))
        done.add_done_callback(lambda finished: (mailbox.release(), _retrieved(finished)))
        return _cancelling(done, ref)

    async def call(self, user_id: str, method: str, *args):
        """Call a shard method for a user; a dead or restarting shard becomes Unavailable."""
        return await self.submit(self.shard_for(user_id), method, *args)

    async def call_all(self, method: str, *args) -> list:
        """Call every shard (not counted in the mailboxes: health and catalog bookkeeping)."""
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


class Mailbox:
    """The count of one shard's calls submitted by this router and not yet finished."""

    def __init__(self, limit: int):
        self.limit = limit
        self.in_flight = 0

    def admit(self, shard_id: int) -> None:
        """Take a slot, or raise ResourceExhausted when all `limit` are taken."""
        if self.in_flight >= self.limit:
            raise ResourceExhausted(
                f"profile shard {shard_id} has {self.in_flight} calls waiting (the limit); "
                "the service is overloaded: retry with exponential backoff"
            )
        self.in_flight += 1

    def release(self) -> None:
        self.in_flight -= 1


def _retrieved(task: "asyncio.Future") -> None:
    """Mark a finished call's exception as seen (its awaiter may have gone away)."""
    if not task.cancelled():
        task.exception()


async def _cancelling(done: "asyncio.Future", ref):
    """Await a submitted shard call; if the awaiter is cancelled, cancel the call too (a queued
    call is dropped; a running one finishes, and its slot is freed when it does)."""
    try:
        return await asyncio.shield(done)
    except asyncio.CancelledError:
        try:
            ray.cancel(ref)
        except Exception:  # noqa: BLE001 - best effort: the call may have finished meanwhile
            logger.debug("could not cancel a shard call", exc_info=True)
        raise


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

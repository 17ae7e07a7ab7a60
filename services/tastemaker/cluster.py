"""Running on a Ray cluster: one store for every component, or the service says so.

On a multi-node cluster every replica and actor may land on another node, and a SQLite path
names a different file on each node's disk: each would silently serve its own part of the data.
Two guards:

* `refuse_sqlite_on_cluster` — `build_app` (used by `tastemaker serve` and by `serve deploy` /
  KubeRay through `app_builder`) refuses a SQLite store when the Ray cluster has more than one
  alive node, with a message that says to use PostgreSQL.
* **Store instance ids.** Every store has a random id created with its schema
  (`Store.instance_id`). The gateway and each retrieval replica report theirs to a small named
  actor (`StoreIdentityRegistry`) every `REPORT_INTERVAL_S`; the profile shards return theirs from
  `ready()`. Health is SERVING only when all of them are equal (`describe_split` is None);
  otherwise it is NOT_SERVING and the gateway logs which component opened which store (ids and
  node ids only, never a URL).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Mapping, Optional

import ray

from tastemaker.errors import FailedPrecondition

logger = logging.getLogger(__name__)

#: How often the gateway and retrieval replicas report the store they opened.
REPORT_INTERVAL_S = 2.0
#: Reports older than this are forgotten (the replica stopped or its node died).
REPORT_MAX_AGE_S = 10.0


def sqlite_refusal(store_url: str, alive_nodes: int) -> Optional[str]:
    """Why a store cannot serve a cluster of `alive_nodes` nodes (a SQLite file on more than
    one), or None. The message names no path and no password."""
    if not store_url.startswith("sqlite:") or alive_nodes <= 1:
        return None
    return (
        f"the store is a SQLite file, but this Ray cluster has {alive_nodes} nodes: every node would "
        "open its own file and serve a part of the data. Use PostgreSQL on a cluster: set store.url "
        "in the config file (or TASTEMAKER_STORE_URL) to postgresql://USER:PASSWORD@HOST:5432/DATABASE, "
        "a server every node reaches (see cluster/README.md)"
    )


def refuse_sqlite_on_cluster(store_url: str) -> None:
    """Raise if the store is a SQLite file and the connected Ray cluster has more than one alive
    node (each node would open its own file). Does nothing outside a Ray cluster."""
    if not store_url.startswith("sqlite:") or not ray.is_initialized():
        return
    refusal = sqlite_refusal(store_url, sum(1 for node in ray.nodes() if node.get("Alive")))
    if refusal is not None:
        raise FailedPrecondition(refusal)


def describe_split(reports: Mapping[str, tuple[str, str]]) -> Optional[str]:
    """None when every component reports the same store instance id; else a message naming
    which component (and node) opened which store. `reports` maps a component name to
    (instance id, node id)."""
    by_store: dict[str, list[str]] = {}
    for component, (instance_id, node_id) in sorted(reports.items()):
        by_store.setdefault(instance_id, []).append(f"{component} (node {node_id[:8] or '?'})")
    if len(by_store) <= 1:
        return None
    parts = "; ".join(f"store {instance_id[:12]}: {', '.join(names)}" for instance_id, names in sorted(by_store.items()))
    return (
        f"the components opened {len(by_store)} different stores ({parts}); every node must reach the "
        "same store: use PostgreSQL (store.url) on a multi-node cluster"
    )


def registry_name(app_name: str) -> str:
    """The registry is a named actor, so every replica (and a restarted one) finds the same one."""
    return f"{app_name}-store-registry"


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
class StoreIdentityRegistry:
    """Which store instance each component opened, and when it last said so. Its state is only
    reports, refilled within `REPORT_INTERVAL_S` after a restart."""

    def __init__(self):
        self.reports: dict[str, tuple[str, str, float]] = {}

    def report(self, component: str, instance_id: str, node_id: str) -> None:
        self.reports[component] = (instance_id, node_id, time.monotonic())

    def fresh(self, max_age_s: float = REPORT_MAX_AGE_S) -> dict[str, tuple[str, str]]:
        """Reports younger than `max_age_s` (older ones are dropped)."""
        now = time.monotonic()
        self.reports = {c: r for c, r in self.reports.items() if now - r[2] <= max_age_s}
        return {c: (r[0], r[1]) for c, r in self.reports.items()}


def registry_actor(app_name: str, namespace: str):
    """The app's registry actor, created on first use (detached, so it outlives any replica)."""
    return StoreIdentityRegistry.options(
        name=registry_name(app_name), namespace=namespace, get_if_exists=True, lifetime="detached"
    ).remote()


def kill_registry(app_name: str, namespace: str) -> None:
    """Stop the registry actor (with the application)."""
    try:
        ray.kill(ray.get_actor(registry_name(app_name), namespace=namespace), no_restart=True)
    except ValueError:
        pass


class StoreReporter:
    """Reports one component's store instance id to the registry, from an asyncio loop; never
    raises (a registry that is restarting is found again at the next report)."""

    def __init__(self, app_name: str, namespace: str, component: str, instance_id: str):
        self.app_name = app_name
        self.namespace = namespace
        self.component = component
        self.instance_id = instance_id
        self.node_id = ray.get_runtime_context().get_node_id()
        self._registry = None

    def _actor(self):
        if self._registry is None:
            self._registry = registry_actor(self.app_name, self.namespace)
        return self._registry

    async def report(self, timeout_s: float = 5.0) -> bool:
        """One report; False (and the actor looked up again next time) if it failed."""
        try:
            await asyncio.wait_for(self._actor().report.remote(self.component, self.instance_id, self.node_id), timeout_s)
            return True
        except Exception:  # noqa: BLE001 - health shows a missing report; the next one retries
            self._registry = None
            return False

    async def fresh(self, timeout_s: float = 5.0) -> dict[str, tuple[str, str]]:
        """Every fresh report in the registry (raises if the registry does not answer)."""
        try:
            return await asyncio.wait_for(self._actor().fresh.remote(), timeout_s)
        except Exception:
            self._registry = None
            raise

    async def run_forever(self, interval_s: float = REPORT_INTERVAL_S) -> None:
        """Report every `interval_s` until cancelled."""
        while True:
            await self.report()
            await asyncio.sleep(interval_s)


def shard_reports(shard_states: list[dict]) -> dict[str, tuple[str, str]]:
    """What the profile shards' `ready()` answers say about their stores, keyed `shard/<n>`."""
    return {f"shard/{n}": (state["store_instance_id"], state["node_id"]) for n, state in enumerate(shard_states)}


class SplitMonitor:
    """Compares the reports health gathers and logs a split once each time it changes."""

    def __init__(self, required: tuple[str, ...] = ("gateway/", "retrieval/", "shard/")):
        self.required = required
        self.last: Optional[str] = None

    def check(self, reports: Mapping[str, tuple[str, str]]) -> bool:
        """True when every component opened the same store and every kind in `required` has
        reported (a retrieval replica that has not reported yet could be on another store)."""
        if any(not any(name.startswith(kind) for name in reports) for kind in self.required):
            return False
        split = describe_split(reports)
        if split != self.last:
            if split is not None:
                logger.error("health NOT_SERVING: %s", split)
            elif self.last is not None:
                logger.warning("the components agree on one store again")
            self.last = split
        return split is None

"""What the application does by itself when it starts, whoever deployed it.

`tastemaker serve`, `serve deploy cluster/serve-config.yaml` and a KubeRay RayService all deploy
the same Serve application (`tastemaker.app.build_app`), and its gateway runs `ServiceStartup` on
start. Nothing needs a CLI around it:

* **schema set-up and migration** happen when a component opens the store (`open_store`), and
  the shard count is reconciled (`Store.ensure_num_shards`) before the shards recover;
* **encoder model change**: if the store's vectors were made by another model than the running
  encoder's (`ENCODER_IDENTITY_KEY`), every item and review/search text is re-encoded through the
  encoder pool, every profile shard is rebuilt from the event log, and the new identity recorded;
* **fitted artefacts**: a store with events but no fitted interaction graph gets one (what
  `tastemaker fit` publishes), so collaborative signals and matrix factors are there from the start.

The steps run exactly once across gateway replicas: each replica takes a lease in the store (a
meta key holding owner + expiry, set with `Store.compare_and_set_meta`, so it works on SQLite and
PostgreSQL alike) before running them, and every step is idempotent, so the replica that gets the
lease next finds nothing left to do, and one that dies half-way is finished by the next (the swap
marker stays in the store). Health is NOT_SERVING until the replica's `ServiceStartup` is done.

The step functions take a store and plain callables, so they are tested without Ray.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from tastemaker.config import EventWeights, RetrievalConfig
from tastemaker.store import Store
from tastemaker.store.base import ENCODER_IDENTITY_KEY, ENCODER_SWAP_PENDING_KEY

logger = logging.getLogger(__name__)

#: Store meta key of the start-up lease: {"owner": ..., "expires": unix time}.
STARTUP_LEASE_KEY = "startup_lease"
#: A lease not renewed for this long is taken over (its holder died).
LEASE_TTL_S = 60.0
#: How often the holder renews it while working.
LEASE_RENEW_S = 10.0
#: How often a replica waiting for the lease asks again.
LEASE_POLL_S = 0.5

EncodeAsync = Callable[[list[str]], Callable[[], np.ndarray]]


class StoreLease:
    """A lease held in the store's meta table, so it is shared by every process (on every node)
    that opens the same store. Taken and renewed with compare-and-set: two replicas can never both
    hold it. A holder that dies stops renewing, and the lease is free again after `ttl_s`.

    Expiry uses each node's wall clock; the TTL (a minute) is far above the skew of synchronised
    clocks."""

    def __init__(self, store: Store, owner: str, key: str = STARTUP_LEASE_KEY, ttl_s: float = LEASE_TTL_S,
                 clock: Callable[[], float] = time.time):
        self.store = store
        self.owner = owner
        self.key = key
        self.ttl_s = ttl_s
        self.clock = clock

    def _holder(self, raw: Optional[str]) -> tuple[Optional[str], float]:
        if raw is None:
            return None, 0.0
        try:
            value = json.loads(raw)
            return str(value["owner"]), float(value["expires"])
        except (ValueError, KeyError, TypeError):
            return None, 0.0  # unreadable: treated as free (it is replaced atomically)

    def try_acquire(self) -> bool:
        """Take the lease if it is free, expired or already ours (then it is renewed)."""
        raw = self.store.get_meta(self.key)
        owner, expires = self._holder(raw)
        if owner is not None and owner != self.owner and expires > self.clock():
            return False
        fresh = json.dumps({"owner": self.owner, "expires": self.clock() + self.ttl_s})
        return self.store.compare_and_set_meta(self.key, raw, fresh)

    def renew(self) -> bool:
        """Extend our lease; False if it is no longer ours (it expired and was taken over)."""
        raw = self.store.get_meta(self.key)
        if self._holder(raw)[0] != self.owner:
            return False
        fresh = json.dumps({"owner": self.owner, "expires": self.clock() + self.ttl_s})
        return self.store.compare_and_set_meta(self.key, raw, fresh)

    def release(self) -> None:
        """Give the lease up (only if it is still ours)."""
        raw = self.store.get_meta(self.key)
        if self._holder(raw)[0] == self.owner:
            self.store.compare_and_set_meta(self.key, raw, None)


# -- the steps ---------------------------------------------------------------------------------
def mark_encoder_swap(store: Store, identity: str) -> bool:
    """Record in the store that its vectors must be re-encoded (`identity`, the running encoder's
    model, is not the one that made them); the profile shards then report unavailable to health
    until `swap_encoder` has finished. An empty store just records the model. Returns whether a
    swap is pending."""
    from tastemaker.reencode import count_text_events, same_vectors

    if store.get_meta(ENCODER_SWAP_PENDING_KEY) is not None:
        return True
    if same_vectors(store.get_meta(ENCODER_IDENTITY_KEY), identity):
        return False
    if store.count_items() == 0 and count_text_events(store) == 0:
        store.set_meta(ENCODER_IDENTITY_KEY, identity)  # nothing encoded yet: just remember the model
        return False
    store.set_meta(ENCODER_SWAP_PENDING_KEY, identity)
    return True


def swap_encoder(
    store: Store,
    identity: str,
    encode_async: EncodeAsync,
    rebuild_profiles: Callable[[], int],
    batch_size: int = 256,
) -> dict:
    """If a swap is pending (`mark_encoder_swap`): re-encode every item and review/search text
    with `encode_async` (new item vectors reach the retrieval replicas through the change feed),
    rebuild the profiles (`rebuild_profiles` returns the events replayed), then record the new
    identity and clear the marker. Returns what was done."""
    from tastemaker.reencode import reencode_event_texts, reencode_items

    if not mark_encoder_swap(store, identity):
        return {"swapped": False}
    recorded = store.get_meta(ENCODER_IDENTITY_KEY)
    logger.warning("the encoder model changed (%s -> %s): re-encoding the catalog and rebuilding profiles", recorded, identity)
    started = time.monotonic()
    items = reencode_items(store, encode_async, batch_size=batch_size)
    texts = reencode_event_texts(store, encode_async, batch_size=batch_size)
    replayed = rebuild_profiles()
    store.set_meta(ENCODER_IDENTITY_KEY, identity)
    store.set_meta(ENCODER_SWAP_PENDING_KEY, None)
    done = {
        "swapped": True,
        "previous": recorded,
        "identity": identity,
        **items,
        "texts": texts,
        "events_replayed": replayed,
        "seconds": round(time.monotonic() - started, 1),
    }
    logger.warning("encoder swap done: %s", done)
    return done


def publish_fit(store: Store, retrieval: RetrievalConfig, weights: EventWeights, progress=None) -> str:
    """Fit the collaborative/sequential models and the matrix factors on the whole event log and
    publish them to the store (what `tastemaker fit` does); running retrieval replicas swap them
    in within `retrieval.artifact_check_s`. Returns a one-line summary."""
    from tastemaker.retrieval.collaborative import GRAPH_ARTIFACT, fit_graph, graph_params

    graph, seq = fit_graph(store, graph_params(retrieval), weights, progress=progress)
    blob = graph.to_bytes()
    store.save_artifact(GRAPH_ARTIFACT, seq, blob)
    factors = f"{len(graph.factors.item_ids)} items x {graph.factors.dim} factors" if graph.factors else "no matrix factors"
    return (
        f"fitted {GRAPH_ARTIFACT} on {graph.events_seen} events (log seq {seq}): "
        f"{sum(len(r) for r in graph.next_counts.values())} transitions, "
        f"{sum(len(r) for r in graph.co_counts.values())} co-occurrence pairs, {factors}, {len(blob) / 1e6:.1f} MB"
    )


def fit_if_missing(store: Store, retrieval: RetrievalConfig, weights: EventWeights) -> Optional[str]:
    """Publish a fit when the log has events and no fitted graph exists yet; the summary, or None."""
    from tastemaker.retrieval.collaborative import GRAPH_ARTIFACT

    if store.artifact_version(GRAPH_ARTIFACT) is not None or not store.events_after(0, limit=1):
        return None
    summary = publish_fit(store, retrieval, weights)
    logger.warning("start-up: %s", summary)
    return summary


@dataclass
class StartupSteps:
    """What the start-up needs from the running application (plain callables, so the steps run
    the same from a gateway replica, a driver or a unit test)."""

    encoder_identity: Callable[[], str]
    encode_async: EncodeAsync
    rebuild_profiles: Callable[[], int]
    retrieval: RetrievalConfig
    weights: EventWeights


def run_startup(store: Store, steps: StartupSteps) -> dict:
    """Every start-up step, in order; each one does nothing when already done."""
    identity = steps.encoder_identity()
    swap = swap_encoder(store, identity, steps.encode_async, steps.rebuild_profiles)
    fitted = fit_if_missing(store, steps.retrieval, steps.weights)
    return {"encoder": swap, "fitted": fitted}


class ServiceStartup:
    """Runs `run_startup` once per process, under the store lease, on a background thread.

    `done` turns True when this process has run the steps while holding the lease (the first
    holder does the work; later ones find it done). Errors (e.g. the store briefly unreachable)
    are logged and retried after `retry_s`, so a transient failure delays health, never breaks it."""

    def __init__(self, store: Store, steps: StartupSteps, owner: Optional[str] = None, retry_s: float = 5.0,
                 lease_ttl_s: float = LEASE_TTL_S, renew_s: float = LEASE_RENEW_S):
        self.store = store
        self.steps = steps
        self.lease = StoreLease(store, owner or uuid.uuid4().hex, ttl_s=lease_ttl_s)
        self.retry_s = retry_s
        self.renew_s = renew_s
        self.result: Optional[dict] = None
        self.last_error: Optional[str] = None
        self._done = threading.Event()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    @property
    def done(self) -> bool:
        """Whether the start-up steps are complete (health may say SERVING)."""
        return self._done.is_set()

    def start(self) -> "ServiceStartup":
        """Run in a daemon thread; returns at once."""
        self._thread = threading.Thread(target=self._run, name="tastemaker-startup", daemon=True)
        self._thread.start()
        return self

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Block until done (True) or `timeout`."""
        return self._done.wait(timeout)

    def stop(self) -> None:
        """Ask the thread to give up waiting (at shutdown)."""
        self._stop.set()

    def run_once(self) -> bool:
        """One attempt: take the lease (False if another holder has it), run the steps, release."""
        if not self.lease.try_acquire():
            return False
        renewing = threading.Event()

        def renew() -> None:
            while not renewing.wait(self.renew_s):
                try:
                    if not self.lease.renew():
                        logger.warning("start-up: the store lease was taken over while the steps ran")
                        return
                except Exception:  # noqa: BLE001 - the store may be briefly unreachable; try again
                    logger.warning("start-up: renewing the store lease failed", exc_info=True)

        renewer = threading.Thread(target=renew, name="tastemaker-startup-lease", daemon=True)
        renewer.start()
        try:
            self.result = run_startup(self.store, self.steps)
        finally:
            renewing.set()
            renewer.join()
            self.lease.release()
        self._done.set()
        return True

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                if self.run_once():
                    return
                self._stop.wait(LEASE_POLL_S)  # another replica holds the lease: wait for it
            except Exception as exc:  # noqa: BLE001 - retried; health stays NOT_SERVING meanwhile
                self.last_error = type(exc).__name__
                logger.warning("start-up steps failed; retrying in %.0f s", self.retry_s, exc_info=True)
                self._stop.wait(self.retry_s)

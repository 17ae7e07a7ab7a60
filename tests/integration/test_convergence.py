"""Every retrieval replica converges on catalog changes within a bounded delay: two replicas,
each following the store's change feed on its own, both see upserts and deletes."""

from __future__ import annotations

import time

import grpc
import pytest

from tastemaker.v1 import recommender_service_pb2 as pb
from tests.integration.conftest import make_config, start

pytestmark = pytest.mark.integration

REFRESH_S = 0.1
#: The asserted bound: a few refresh intervals plus request routing and encoding slack.
BOUND_S = 3.0
#: Consecutive answers that must agree; with two replicas and random routing, 12 in a row
#: reach both with probability 1 - 2 * 0.5**12.
STREAK = 12


@pytest.fixture(scope="module")
def service(ray_session, tmp_path_factory):
    config = make_config(
        tmp_path_factory.mktemp("convergence"), retrieval={"num_replicas": 2, "refresh_interval_s": REFRESH_S}
    )
    running = start(config)
    running.client.upsert_items(
        [pb.Item(item_id=f"base-{n}", title=f"Base item {n}", tags=["base"]) for n in range(10)]
    )
    yield running
    running.stop()


def _converge(check) -> float:
    """Seconds until `check()` held STREAK times in a row; fails past BOUND_S."""
    start = time.monotonic()
    streak = 0
    while streak < STREAK:
        streak = streak + 1 if check() else 0
        assert time.monotonic() - start < BOUND_S, f"replicas did not converge within {BOUND_S}s"
    return time.monotonic() - start


def _similar_ids(client, item_id: str) -> set[str] | None:
    try:
        return {i.item_id for i in client.similar_items(item_id, page_size=20).items}
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.NOT_FOUND
        return None


def test_upserts_reach_every_replica_within_the_bound(service):
    client = service.client
    client.upsert_items([pb.Item(item_id="new-1", title="A brand new item about volcanoes", tags=["volcano"])])
    _converge(lambda: _similar_ids(client, "new-1") is not None)
    _converge(lambda: "new-1" in (_similar_ids(client, "base-0") or set()))


def test_deletes_reach_every_replica_within_the_bound(service):
    client = service.client
    client.upsert_items([pb.Item(item_id="doomed", title="An item that will be deleted", tags=["base"])])
    _converge(lambda: "doomed" in (_similar_ids(client, "base-1") or set()))
    assert client.delete_items(["doomed"]).deleted_count == 1
    _converge(lambda: "doomed" not in (_similar_ids(client, "base-1") or {"doomed"}))
    _converge(lambda: _similar_ids(client, "doomed") is None)

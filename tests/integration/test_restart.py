"""Nothing acknowledged is lost: the application restarted over the same data directory, and a
profile shard actor killed mid-stream, both come back with every acknowledged event applied once."""

from __future__ import annotations

import time

import pytest
import ray

from tastemaker.profiles.actor import shard_actor_name
from tastemaker.profiles.state import shard_of
from tastemaker.v1 import recommender_service_pb2 as pb
from tests.integration.conftest import MOVIE_ITEMS, make_config, start

pytestmark = pytest.mark.integration

ITEMS = MOVIE_ITEMS[:4]


def _click(user: str, n: int) -> pb.UserEvent:
    return pb.UserEvent(event_id=f"e{n}", user_id=user, event_type=pb.EVENT_TYPE_CLICK, item_id=ITEMS[n % 4].item_id)


def test_restart_keeps_items_events_and_profiles(ray_session, tmp_path):
    # Snapshot every 3 events so the restart exercises snapshot + replay of the tail, not only replay.
    config = make_config(tmp_path, snapshot_every_events=3)
    running = start(config)
    try:
        running.client.upsert_items(ITEMS)
        acks = running.client.write_events([_click("restart-user", n) for n in range(7)])
        assert [a.profile_version for a in acks] == list(range(1, 8))
        # top_titles come from the retrieval index, which follows the catalog within a bounded
        # delay: wait (bounded) until it has caught up before taking the reference.
        deadline = time.monotonic() + 10
        while not (before := running.client.get_user_profile("restart-user")).top_titles:
            assert time.monotonic() < deadline, "retrieval did not pick up the catalog within 10 s"
            time.sleep(0.05)
    finally:
        running.stop()

    running = start(config)
    try:
        assert running.client.get_item("m3").title == "The Shining (1980)"
        after = running.client.get_user_profile("restart-user")
        assert after.profile_version == 7
        assert list(after.event_counts) == list(before.event_counts)
        assert list(after.top_titles) == list(before.top_titles)
        # Event ids written before the restart still dedupe after it.
        again = running.client.write_events([_click("restart-user", 0)])[0]
        assert again.status == pb.EVENT_STATUS_DUPLICATE and again.profile_version == 7
        reply = running.client.recommend("restart-user", page_size=4, include_seen=True)
        assert reply.profile_version == 7 and len(reply.items) == 4
    finally:
        running.stop()


def test_killed_shard_recovers_every_acknowledged_event_once(ray_session, tmp_path):
    config = make_config(tmp_path, snapshot_every_events=10)
    running = start(config)
    try:
        running.client.upsert_items(ITEMS)
        user = "crash-user"
        shard = shard_of(user, config.profiles.num_shards)
        actor = ray.get_actor(shard_actor_name(config.server.app_name, shard), namespace=config.server.namespace)
        acked = 0
        for n in range(25):
            if n == 13:
                # Kill the shard in the middle of the numbered events; Ray restarts it and it
                # rebuilds from its snapshot plus the event log.
                ray.kill(actor, no_restart=False)
            while True:
                try:
                    ack = running.client.write_events([_click(user, n)])[0]
                    break
                except Exception as exc:  # UNAVAILABLE while the shard restarts: retry, as a client would
                    assert "UNAVAILABLE" in str(getattr(exc, "code", lambda: "")()), exc
            assert ack.status in (pb.EVENT_STATUS_ACCEPTED, pb.EVENT_STATUS_DUPLICATE)
            acked += 1
            assert ack.profile_version == acked, "every acknowledged event is applied exactly once"
        profile = running.client.get_user_profile(user)
        assert profile.profile_version == 25
        assert sum(c.count for c in profile.event_counts) == 25
    finally:
        running.stop()

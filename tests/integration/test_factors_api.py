"""Matrix factors through the public API: after `tastemaker fit` publishes the graph artefact
(transitions, co-occurrence and ALS item factors), the running replicas swap it in and a user
the fit never saw is recommended the items of their taste, proposed and explained by the factors."""

from __future__ import annotations

import time

import numpy as np
import pytest

from tastemaker.cli import fit_artifact
from tastemaker.v1 import recommender_service_pb2 as pb
from tests.integration.conftest import make_config, start

pytestmark = pytest.mark.integration

#: Only the factors score: what is asserted is theirs alone.
RETRIEVAL = {
    "factors": 2,  # two tastes
    "factor_regularization": 1.0,
    "factor_iterations": 10,
    "factor_weight": 1.0,
    "profile_weight": 0.0,
    "negative_weight": 0.0,
    "sequential_weight": 0.0,
    "collaborative_weight": 0.0,
    "popularity_weight": 0.0,
    "trending_weight": 0.0,
    "exploration_slots": 0,
    "artifact_check_s": 0.2,
}
#: Bound on how long replicas take to swap in a published artefact (artifact_check_s 0.2 s).
SWAP_BOUND_S = 30.0


@pytest.fixture(scope="module")
def service(ray_session, tmp_path_factory):
    running = start(make_config(tmp_path_factory.mktemp("factors"), retrieval=RETRIEVAL))
    running.client.upsert_items(
        [pb.Item(item_id=f"{g}{i}", title=f"{'Alpha' if g == 'a' else 'Beta'} film {i}") for g in "ab" for i in range(10)]
    )
    # Half the users watch only Alpha films, the other half only Beta films.
    rng = np.random.default_rng(0)
    events = []
    for u in range(60):
        group = "a" if u % 2 == 0 else "b"
        for t, i in enumerate(rng.choice(10, size=8, replace=False)):
            events.append(pb.UserEvent(event_id=f"e{t}", user_id=f"u{u}", event_type=pb.EVENT_TYPE_CLICK, item_id=f"{group}{i}"))
    acks = running.client.write_events(events)
    assert all(a.status == pb.EVENT_STATUS_ACCEPTED for a in acks)
    yield running
    running.stop()


def test_a_fit_publishes_factors_that_replicas_swap_in_and_explain(service):
    client = service.client
    client.write_events(
        [pb.UserEvent(event_id=f"n{k}", user_id="newcomer", event_type=pb.EVENT_TYPE_CLICK, item_id=i) for k, i in enumerate(("a1", "a2"))]
    )
    before = client.recommend("newcomer", page_size=5, min_profile_version=2)
    assert not any(pb.CANDIDATE_SOURCE_FACTORS in r.sources for r in before.items)  # nothing fitted yet

    summary = fit_artifact(service.config, show_progress=False)
    assert "20 items x 2 factors" in summary

    deadline = time.monotonic() + SWAP_BOUND_S
    while True:
        after = client.recommend("newcomer", page_size=5)
        if any(pb.CANDIDATE_SOURCE_FACTORS in r.sources for r in after.items) or time.monotonic() > deadline:
            break
        time.sleep(0.1)  # poll the replicas' artefact check, bounded by SWAP_BOUND_S
    shown = [(r.item_id, list(r.sources), round(r.score, 3), r.reason) for r in after.items]
    assert [r.item_id[0] for r in after.items] == ["a"] * 5, shown  # the newcomer's taste, not the other one
    assert not {"a1", "a2"} & {r.item_id for r in after.items}  # seen items stay out
    for item in after.items:
        assert pb.CANDIDATE_SOURCE_FACTORS in item.sources
        assert item.reason.startswith("people who share your taste for Alpha film")

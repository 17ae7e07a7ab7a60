"""Tests for profile math (`tastemaker.profiles.state`) and one profile shard over a real SQLite
store (`tastemaker.profiles.shard`). Expected vectors are computed here with plain numpy."""

from __future__ import annotations

import random

import numpy as np
import pytest

from tastemaker.config import EventWeights, ProfileConfig
from tastemaker.domain import EventStatus, EventType, Item, ProfileView, UserEvent
from tastemaker.profiles.shard import ProfileShard
from tastemaker.profiles.state import ProfileState, event_weight, half_life_factor, review_sentiment, shard_of
from tastemaker.store import open_store

DAY = 86_400.0
DIM = 6


def _unit(seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(DIM)
    return v / np.linalg.norm(v)


def _ev(etype: EventType, item: str = "", value: float = 0.0, t: float = 0.0, eid: str = "e", user: str = "u", **kw):
    return UserEvent(event_id=eid, user_id=user, event_type=etype, item_id=item, value=value, event_time=t, **kw)


def _normalised(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


# -- event weights ---------------------------------------------------------------------------


class TestEventWeight:
    W = EventWeights()

    @pytest.mark.parametrize(
        "etype, expected",
        [
            (EventType.VIEW, 0.25),
            (EventType.CLICK, 0.5),
            (EventType.ADD_TO_CART, 1.0),
            (EventType.PURCHASE, 2.0),
            (EventType.SEARCH, 0.5),
            (EventType.SKIP, -0.5),
            (EventType.DISLIKE, -2.0),
        ],
    )
    def test_fixed_weights(self, etype, expected):
        assert event_weight(_ev(etype, "i"), self.W) == pytest.approx(expected, abs=1e-9)

    def test_skip_and_dislike_are_negative(self):
        assert event_weight(_ev(EventType.SKIP, "i"), self.W) < 0
        assert event_weight(_ev(EventType.DISLIKE, "i"), self.W) < 0

    @pytest.mark.parametrize("value, expected", [(5.0, 2.0), (4.0, 1.0), (3.0, 0.0), (1.0, -2.0), (0.5, -2.5)])
    def test_rating_is_centred_and_scaled(self, value, expected):
        # (value - centre 3) * scale 1
        assert event_weight(_ev(EventType.RATING, "i", value), self.W) == pytest.approx(expected, abs=1e-9)

    def test_rating_uses_configured_centre_and_scale(self):
        w = EventWeights(rating_centre=2.5, rating_scale=0.5)
        assert event_weight(_ev(EventType.RATING, "i", 4.5), w) == pytest.approx(1.0, abs=1e-9)
        assert event_weight(_ev(EventType.RATING, "i", 0.5), w) == pytest.approx(-1.0, abs=1e-9)

    @pytest.mark.parametrize("value, expected", [(0.0, 1.0), (5.0, 1.0), (3.0, 1.0), (4.0, 1.0), (2.0, -1.0), (1.0, -1.0)])
    def test_review_sign_follows_rating(self, value, expected):
        # No rating (0) counts as interest; with a rating the sign follows (value >= centre).
        assert event_weight(_ev(EventType.REVIEW, "", value, text="x"), self.W) == pytest.approx(expected, abs=1e-9)

    @pytest.mark.parametrize("value, sentiment, expected", [(0.0, -0.2, -1.0), (0.0, 0.3, 1.0), (5.0, -0.9, 1.0), (1.0, 0.9, -1.0)])
    def test_review_without_rating_follows_text_sentiment(self, value, sentiment, expected):
        # The rating, when given, wins over the text; without one the text's sentiment decides.
        event = _ev(EventType.REVIEW, "", value, text="x", sentiment=sentiment)
        assert event_weight(event, self.W) == pytest.approx(expected, abs=1e-9)

    def test_review_sentiment_is_praise_minus_complaint_cosine(self):
        praise, complaint = np.array([1.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0])
        text = _normalised(np.array([3.0, 1.0, 0.0]))
        # cos to praise 3/sqrt(10), to complaint 1/sqrt(10): (3 - 1) / sqrt(10) / 2
        assert review_sentiment(text, praise, complaint) == pytest.approx(1 / np.sqrt(10), abs=1e-9)
        assert review_sentiment(praise, praise, -praise) == pytest.approx(1.0)


# -- profile state ---------------------------------------------------------------------------


class TestProfileState:
    def test_profile_vector_is_decayed_weighted_mean(self):
        cfg = ProfileConfig(half_life_days=10.0)
        a, b = _unit(1), _unit(2)
        t0, t1 = 1_000_000.0, 1_000_000.0 + 15 * DAY
        p = ProfileState("u")
        p.apply(_ev(EventType.PURCHASE, "a", t=t0, eid="1"), a, 1, cfg)
        p.apply(_ev(EventType.CLICK, "b", t=t1, eid="2"), b, 2, cfg)
        # Weighted by 2 and 0.5, the older one decayed by 2^(-15/10).
        decay = 2.0 ** (-15.0 / 10.0)
        expected = _normalised(2.0 * decay * a + 0.5 * b)
        view = p.view()
        assert view.vector is not None
        np.testing.assert_allclose(view.vector, expected, atol=1e-5)
        assert view.negative_vector is None
        # Sanity: without decay the answer would be noticeably different.
        assert not np.allclose(view.vector, _normalised(2.0 * a + 0.5 * b), atol=1e-3)
        assert half_life_factor(15 * DAY, 10.0) == pytest.approx(decay, rel=1e-12)

    def test_single_event_vector_is_item_direction(self):
        p = ProfileState("u")
        v = 3.0 * _unit(5)  # not unit length: the profile is still a unit direction
        p.apply(_ev(EventType.VIEW, "a", t=10.0), v, 1, ProfileConfig())
        np.testing.assert_allclose(p.view().vector, _unit(5), atol=1e-5)
        assert np.linalg.norm(p.view().vector) == pytest.approx(1.0, abs=1e-5)

    def test_text_vector_of_review_counts_with_item_vector(self):
        cfg = ProfileConfig()
        item_v, text_v = _unit(1), _unit(2)
        p = ProfileState("u")
        p.apply(_ev(EventType.REVIEW, "a", 5.0, t=5.0, text="great", text_vector=text_v), item_v, 1, cfg)
        np.testing.assert_allclose(p.view().vector, _normalised(item_v + text_v), atol=1e-5)

    def test_late_events_give_same_vectors_as_in_order(self):
        cfg = ProfileConfig(half_life_days=3.0)
        rng = random.Random(0)
        types = [EventType.VIEW, EventType.PURCHASE, EventType.DISLIKE, EventType.CLICK, EventType.SKIP]
        events = []
        for i in range(12):
            etype = types[i % len(types)]
            events.append((_ev(etype, f"i{i}", t=1e6 + i * 0.7 * DAY, eid=str(i)), _unit(100 + i), i + 1))
        in_order = ProfileState("u")
        for event, vector, seq in events:
            in_order.apply(event, vector, seq, cfg)
        shuffled = events[:]
        rng.shuffle(shuffled)
        assert shuffled != events
        late = ProfileState("u")
        for event, vector, seq in shuffled:
            late.apply(event, vector, seq, cfg)
        a, b = in_order.view(), late.view()
        np.testing.assert_allclose(a.vector, b.vector, atol=1e-5)
        np.testing.assert_allclose(a.negative_vector, b.negative_vector, atol=1e-5)
        assert a.profile_version == b.profile_version == 12
        assert late.last_event_seq == 12
        assert late.last_event_time == pytest.approx(1e6 + 11 * 0.7 * DAY)

        # And both equal the hand-computed decayed sums.
        t_ref = 1e6 + 11 * 0.7 * DAY
        pos = np.zeros(DIM)
        neg = np.zeros(DIM)
        weights = {EventType.VIEW: 0.25, EventType.PURCHASE: 2.0, EventType.CLICK: 0.5, EventType.DISLIKE: -2.0, EventType.SKIP: -0.5}
        for event, vector, _ in events:
            w = weights[event.event_type] * 2.0 ** (-(t_ref - event.event_time) / (3.0 * DAY))
            if w > 0:
                pos += w * vector
            else:
                neg += -w * vector
        np.testing.assert_allclose(b.vector, _normalised(pos), atol=1e-5)
        np.testing.assert_allclose(b.negative_vector, _normalised(neg), atol=1e-5)

    def test_negative_events_only_touch_negative_vector(self):
        cfg = ProfileConfig()
        liked, disliked, skipped = _unit(1), _unit(2), _unit(3)
        p = ProfileState("u")
        p.apply(_ev(EventType.PURCHASE, "a", t=100.0, eid="1"), liked, 1, cfg)
        before = p.view().vector.copy()
        p.apply(_ev(EventType.DISLIKE, "b", t=100.0, eid="2"), disliked, 2, cfg)
        np.testing.assert_allclose(p.view().vector, before, atol=1e-6)
        np.testing.assert_allclose(p.view().negative_vector, disliked, atol=1e-5)
        p.apply(_ev(EventType.SKIP, "c", t=100.0, eid="3"), skipped, 3, cfg)
        np.testing.assert_allclose(p.view().vector, before, atol=1e-6)
        # Dislike weight 2, skip weight 0.5 (magnitudes), same time.
        np.testing.assert_allclose(p.view().negative_vector, _normalised(2.0 * disliked + 0.5 * skipped), atol=1e-5)
        # A 1-star rating is negative too; a 3-star rating moves nothing.
        p.apply(_ev(EventType.RATING, "d", 1.0, t=100.0, eid="4"), _unit(4), 4, cfg)
        np.testing.assert_allclose(p.view().vector, before, atol=1e-6)
        expected_neg = _normalised(2.0 * disliked + 0.5 * skipped + 2.0 * _unit(4))
        np.testing.assert_allclose(p.view().negative_vector, expected_neg, atol=1e-5)
        p.apply(_ev(EventType.RATING, "e", 3.0, t=100.0, eid="5"), _unit(5), 5, cfg)
        np.testing.assert_allclose(p.view().vector, before, atol=1e-6)
        np.testing.assert_allclose(p.view().negative_vector, expected_neg, atol=1e-5)

    def test_only_negative_events_leave_no_taste_vector(self):
        p = ProfileState("u")
        p.apply(_ev(EventType.DISLIKE, "a", t=1.0), _unit(1), 1, ProfileConfig())
        assert p.view().vector is None
        assert p.view().negative_vector is not None

    def test_version_increments_by_one_per_event(self):
        cfg = ProfileConfig()
        p = ProfileState("u")
        assert p.view().profile_version == 0
        kinds = [
            (EventType.VIEW, "a", _unit(1)),
            (EventType.RATING, "b", _unit(2)),  # value 3 -> weight 0, still a new version
            (EventType.SEARCH, "", None),
            (EventType.DISLIKE, "c", _unit(3)),
        ]
        for n, (etype, item, vec) in enumerate(kinds, start=1):
            p.apply(_ev(etype, item, 3.0, t=float(n), eid=str(n)), vec, n, cfg)
            assert p.version == n
            assert p.view().profile_version == n
        assert p.counts == {int(EventType.VIEW): 1, int(EventType.RATING): 1, int(EventType.SEARCH): 1, int(EventType.DISLIKE): 1}

    def test_recent_capped_at_config(self):
        cfg = ProfileConfig(recent_items=3)
        p = ProfileState("u")
        for i in range(5):
            p.apply(_ev(EventType.CLICK, f"i{i}", t=float(i), eid=str(i)), _unit(i), i + 1, cfg)
        recent = p.view().recent
        assert [h.item_id for h in recent] == ["i2", "i3", "i4"]
        assert all(h.event_type == EventType.CLICK and h.weight == pytest.approx(0.5) for h in recent)
        # Events without an item (search) are not history entries.
        p.apply(_ev(EventType.SEARCH, "", t=9.0, eid="s", text="q"), None, 9, cfg)
        assert [h.item_id for h in p.view().recent] == ["i2", "i3", "i4"]

    def test_seen_capped_and_ordered_by_last_touch(self):
        cfg = ProfileConfig(max_seen_items=3)
        p = ProfileState("u")
        seq = 0

        def touch(item: str) -> None:
            nonlocal seq
            seq += 1
            p.apply(_ev(EventType.VIEW, item, t=float(seq), eid=str(seq)), _unit(seq), seq, cfg)

        for item in ["a", "b", "c"]:
            touch(item)
        assert p.view().seen_item_ids == ["a", "b", "c"]
        touch("a")  # re-touching moves a to the most recent end
        assert p.view().seen_item_ids == ["b", "c", "a"]
        touch("d")  # over the cap: the least recently touched (b) goes
        assert p.view().seen_item_ids == ["c", "a", "d"]
        touch("e")
        assert p.view().seen_item_ids == ["a", "d", "e"]

    def test_negative_events_also_mark_seen(self):
        p = ProfileState("u")
        p.apply(_ev(EventType.DISLIKE, "x", t=1.0), _unit(1), 1, ProfileConfig())
        assert p.view().seen_item_ids == ["x"]

    def test_snapshot_roundtrip_gives_identical_views(self):
        cfg = ProfileConfig(half_life_days=2.0, recent_items=4)
        p = ProfileState("u")
        seq = 0
        for i, etype in enumerate([EventType.VIEW, EventType.RATING, EventType.DISLIKE, EventType.PURCHASE, EventType.SKIP]):
            seq += 1
            p.apply(_ev(etype, f"i{i}", 4.5, t=1e6 + i * DAY, eid=str(i)), _unit(i), seq * 10, cfg)
        state, blobs = p.to_snapshot()
        assert isinstance(state, str) and isinstance(blobs, bytes)
        q = ProfileState.from_snapshot("u", state, blobs)
        a, b = p.view(), q.view()
        assert b.user_id == "u"
        assert b.profile_version == a.profile_version == 5
        np.testing.assert_allclose(b.vector, a.vector, atol=1e-6)
        np.testing.assert_allclose(b.negative_vector, a.negative_vector, atol=1e-6)
        assert b.seen_item_ids == a.seen_item_ids
        assert b.recent == a.recent
        assert q.counts == p.counts
        assert (q.last_event_seq, q.last_event_time) == (50, pytest.approx(1e6 + 4 * DAY))

        # The restored state keeps evolving exactly like the original (decay reference included).
        later = _ev(EventType.CLICK, "z", t=1e6 + 9 * DAY, eid="z")
        p.apply(later, _unit(99), 60, cfg)
        q.apply(later, _unit(99), 60, cfg)
        np.testing.assert_allclose(q.view().vector, p.view().vector, atol=1e-6)
        early = _ev(EventType.DISLIKE, "y", t=1e6 - 3 * DAY, eid="y")
        p.apply(early, _unit(98), 70, cfg)
        q.apply(early, _unit(98), 70, cfg)
        np.testing.assert_allclose(q.view().negative_vector, p.view().negative_vector, atol=1e-6)

    def test_snapshot_roundtrip_of_profile_without_vectors(self):
        p = ProfileState("u")
        p.apply(_ev(EventType.SEARCH, "", t=1.0, text="q"), None, 3, ProfileConfig())
        q = ProfileState.from_snapshot("u", *p.to_snapshot())
        assert q.view().vector is None and q.view().negative_vector is None
        assert q.version == 1 and q.last_event_seq == 3

    def test_snapshot_roundtrip_with_only_negative_vector(self):
        p = ProfileState("u")
        p.apply(_ev(EventType.DISLIKE, "a", t=1.0), _unit(7), 1, ProfileConfig())
        q = ProfileState.from_snapshot("u", *p.to_snapshot())
        assert q.view().vector is None
        np.testing.assert_allclose(q.view().negative_vector, _unit(7), atol=1e-6)


# -- sharding ----------------------------------------------------------------------------------


def _fnv1a_64(data: bytes) -> int:
    """Reference FNV-1a 64 (http://www.isthe.com/chongo/tech/comp/fnv/)."""
    h = 14695981039346656037
    for b in data:
        h ^= b
        h = (h * 1099511628211) % 2**64
    return h


class TestShardOf:
    def test_reference_fnv_matches_published_vectors(self):
        # Published FNV-1a 64 test vectors; they check the reference implementation above.
        assert _fnv1a_64(b"") == 0xCBF29CE484222325
        assert _fnv1a_64(b"a") == 0xAF63DC4C8601EC8C
        assert _fnv1a_64(b"foobar") == 0x85944171F73967E8

    @pytest.mark.parametrize("user_id", ["a", "foobar", "user-42", "ünïcödé", "u" * 100])
    @pytest.mark.parametrize("num_shards", [1, 2, 3, 7, 16, 1024])
    def test_matches_fnv1a_64(self, user_id, num_shards):
        assert shard_of(user_id, num_shards) == _fnv1a_64(user_id.encode("utf-8")) % num_shards

    def test_fixed_known_values(self):
        # 0xAF63DC4C8601EC8C % 7 and 0x85944171F73967E8 % 16, worked out from the vectors above.
        assert shard_of("a", 7) == 0xAF63DC4C8601EC8C % 7
        assert shard_of("foobar", 16) == 0x8  # low hex digit of ...67E8
        assert shard_of("a", 2) == 0  # ...EC8C is even
        assert shard_of("anything", 1) == 0

    def test_spreads_users_over_shards(self):
        num_shards = 8
        counts = [0] * num_shards
        for i in range(4000):
            s = shard_of(f"user-{i}", num_shards)
            assert 0 <= s < num_shards
            counts[s] += 1
        # 500 expected per shard; allow generous slack but no empty or hot shard.
        assert min(counts) > 350 and max(counts) < 650

    def test_is_stable_across_calls(self):
        assert [shard_of(f"u{i}", 5) for i in range(50)] == [shard_of(f"u{i}", 5) for i in range(50)]


# -- profile shard over a real store --------------------------------------------------------------


ITEMS = {f"i{k}": _unit(200 + k).astype(np.float32) for k in range(6)}


@pytest.fixture
def db_url(tmp_path) -> str:
    url = "sqlite:///" + str(tmp_path / "profiles.db")
    store = open_store(url)
    store.upsert_items([Item(item_id=k, title=f"Title {k}", vector=v) for k, v in ITEMS.items()])
    store.close()
    return url


@pytest.fixture
def stores(db_url):
    opened = []

    def open_one():
        s = open_store(db_url)
        opened.append(s)
        return s

    yield open_one
    for s in opened:
        s.close()


def _cfg(**kw) -> ProfileConfig:
    kw.setdefault("num_shards", 1)
    kw.setdefault("snapshot_every_events", 10_000)
    return ProfileConfig(**kw)


class TestProfileShard:
    def test_acks_accepted_duplicate_rejected(self, stores):
        shard = ProfileShard(0, stores(), _cfg())
        acks = shard.apply_events(
            [
                _ev(EventType.VIEW, "i0", t=1.0, eid="e1"),
                _ev(EventType.CLICK, "unknown", t=2.0, eid="e2"),
                _ev(EventType.VIEW, "i0", t=3.0, eid="e1"),  # duplicate inside the batch
                _ev(EventType.REVIEW, "unknown", 4.0, t=4.0, eid="e3", text="nice", text_vector=_unit(9)),
                _ev(EventType.SEARCH, "", t=5.0, eid="e4", text="space", text_vector=_unit(8)),
            ]
        )
        assert [a.event_id for a in acks] == ["e1", "e2", "e1", "e3", "e4"]
        assert [a.status for a in acks] == [
            EventStatus.ACCEPTED,
            EventStatus.REJECTED,
            EventStatus.DUPLICATE,
            EventStatus.ACCEPTED,  # a review's item is optional: unknown item keeps the text
            EventStatus.ACCEPTED,
        ]
        assert "unknown" in acks[1].reason and acks[1].profile_version == 0
        assert acks[0].profile_version == 1
        # Acks report the profile as of their place in the batch: the duplicate of e1 sees e1 only.
        assert acks[2].profile_version == 1
        assert [acks[3].profile_version, acks[4].profile_version] == [2, 3]
        # The rejected event was not written; the duplicate was written once.
        assert shard.store.event_seq("u", "e2") is None
        assert shard.store.event_seq("u", "e1") is not None
        assert shard.profile_view("u").profile_version == 3

        # A retry in a later call is a duplicate and does not change the profile.
        before = shard.profile_view("u")
        again = shard.apply_events([_ev(EventType.VIEW, "i0", t=1.0, eid="e1")])
        assert again[0].status == EventStatus.DUPLICATE
        assert again[0].profile_version == 3
        after = shard.profile_view("u")
        assert after.profile_version == 3
        np.testing.assert_allclose(after.vector, before.vector, atol=1e-7)

    def test_versions_monotonic_per_user(self, stores):
        shard = ProfileShard(0, stores(), _cfg())
        rng = random.Random(1)
        last = {"alice": 0, "bob": 0}
        n = 0
        for _ in range(6):
            batch = []
            for _ in range(5):
                n += 1
                user = rng.choice(["alice", "bob"])
                batch.append(_ev(EventType.VIEW, f"i{n % 6}", t=float(n), eid=f"e{n}", user=user))
            for ack in shard.apply_events(batch):
                assert ack.status == EventStatus.ACCEPTED
                assert ack.profile_version == last[ack.user_id] + 1
                last[ack.user_id] = ack.profile_version
        assert last["alice"] + last["bob"] == 30
        assert shard.profile_view("alice").profile_version == last["alice"]

    def test_profile_vector_uses_store_item_vectors(self, stores):
        shard = ProfileShard(0, stores(), _cfg(half_life_days=1.0))
        shard.apply_events(
            [
                _ev(EventType.PURCHASE, "i1", t=0.0, eid="1"),
                _ev(EventType.VIEW, "i2", t=DAY, eid="2"),
                _ev(EventType.DISLIKE, "i3", t=DAY, eid="3"),
            ]
        )
        view = shard.profile_view("u")
        np.testing.assert_allclose(view.vector, _normalised(2.0 * 0.5 * ITEMS["i1"] + 0.25 * ITEMS["i2"]), atol=1e-5)
        np.testing.assert_allclose(view.negative_vector, ITEMS["i3"], atol=1e-5)
        assert view.seen_item_ids == ["i1", "i2", "i3"]

    def test_unknown_user_gets_empty_view(self, stores):
        shard = ProfileShard(0, stores(), _cfg())
        view = shard.profile_view("ghost")
        assert isinstance(view, ProfileView)
        assert view.profile_version == 0 and view.vector is None and view.seen_item_ids == []

    @staticmethod
    def _workload(rng: random.Random, users: list[str], start: int, count: int) -> list[UserEvent]:
        types = [EventType.VIEW, EventType.CLICK, EventType.PURCHASE, EventType.RATING, EventType.DISLIKE, EventType.SKIP]
        out = []
        for n in range(start, start + count):
            etype = rng.choice(types)
            out.append(
                _ev(
                    etype,
                    f"i{rng.randrange(6)}",
                    value=float(rng.choice([1, 2, 4, 5])) if etype == EventType.RATING else 0.0,
                    # Times jump back and forth: some events arrive late.
                    t=1e6 + rng.uniform(-5, 5) * DAY + n * 3600.0,
                    eid=f"e{n}",
                    user=rng.choice(users),
                )
            )
        return out

    def test_recovery_rebuilds_identical_profiles(self, stores):
        users = ["u1", "u2", "u3", "u4"]
        rng = random.Random(7)
        cfg = _cfg(half_life_days=2.0)
        shard = ProfileShard(0, stores(), cfg)
        accepted: dict[str, int] = {u: 0 for u in users}

        def feed(events):
            for ack in shard.apply_events(events):
                if ack.status == EventStatus.ACCEPTED:
                    accepted[ack.user_id] += 1

        feed(self._workload(rng, users[:3], 0, 40))
        assert shard.snapshot() == 3  # u1..u3 were dirty
        assert shard.snapshot() == 0  # nothing changed since
        feed(self._workload(rng, users, 40, 30))
        # Retries of already-applied events, before and after the snapshot, must count once.
        feed(self._workload(random.Random(7), users[:3], 0, 5))
        feed(
            [
                _ev(EventType.SEARCH, "", t=1e6, eid="s1", user="u4", text="q", text_vector=_unit(50)),
                _ev(EventType.REVIEW, "", 2.0, t=1e6, eid="r1", user="u2", text="meh", text_vector=_unit(51)),
            ]
        )
        total_accepted = sum(accepted.values())
        assert total_accepted == 72

        fresh = ProfileShard(0, stores(), cfg)
        replayed = fresh.recover()
        # Only events after each user's snapshot are replayed: 30 new events + 2 text events.
        assert replayed == 32
        for user in users:
            old, new = shard.profile_view(user), fresh.profile_view(user)
            assert new.profile_version == old.profile_version == accepted[user]
            assert new.seen_item_ids == old.seen_item_ids
            assert [h.item_id for h in new.recent] == [h.item_id for h in old.recent]
            for a, b in ((old.vector, new.vector), (old.negative_vector, new.negative_vector)):
                assert (a is None) == (b is None)
                if a is not None:
                    np.testing.assert_allclose(b, a, atol=1e-5)
            # Every event counted exactly once.
            assert sum(fresh.profile_state(user).counts.values()) == accepted[user]
            assert fresh.profile_state(user).counts == shard.profile_state(user).counts

        # Recovering twice is idempotent (memory is rebuilt, not added to), for users with and
        # without a snapshot alike.
        assert fresh.recover() == 32
        for user in users:
            assert fresh.profile_view(user).profile_version == accepted[user]
            assert sum(fresh.profile_state(user).counts.values()) == accepted[user]

    def test_recovery_without_snapshots_replays_everything(self, stores):
        shard = ProfileShard(0, stores(), _cfg())
        shard.apply_events(self._workload(random.Random(3), ["a", "b"], 0, 12))
        fresh = ProfileShard(0, stores(), _cfg())
        assert fresh.recover() == 12
        for user in ["a", "b"]:
            assert fresh.profile_view(user).profile_version == shard.profile_view(user).profile_version

    def test_automatic_snapshot_after_configured_events(self, stores):
        shard = ProfileShard(0, stores(), _cfg(snapshot_every_events=3))
        shard.apply_events([_ev(EventType.VIEW, "i0", t=1.0, eid="1"), _ev(EventType.VIEW, "i1", t=2.0, eid="2")])
        assert list(shard.store.load_snapshots(0)) == []
        shard.apply_events([_ev(EventType.VIEW, "i2", t=3.0, eid="3")])
        rows = list(shard.store.load_snapshots(0))
        assert [r.user_id for r in rows] == ["u"]
        assert rows[0].event_seq == shard.store.event_seq("u", "3")
        fresh = ProfileShard(0, stores(), _cfg())
        assert fresh.recover() == 0
        assert fresh.profile_view("u").profile_version == 3

    def test_delete_user_erases_memory_and_store(self, stores):
        shard = ProfileShard(0, stores(), _cfg())
        shard.apply_events([_ev(EventType.VIEW, f"i{k}", t=float(k), eid=str(k), user="gone") for k in range(3)])
        shard.apply_events([_ev(EventType.VIEW, "i0", t=1.0, eid="x", user="kept")])
        shard.snapshot()
        shard.apply_events([_ev(EventType.VIEW, "i4", t=9.0, eid="9", user="gone")])

        assert shard.delete_user("gone") == 4
        assert shard.profile_view("gone").profile_version == 0
        assert shard.profile_view("gone").seen_item_ids == []
        assert shard.profile_state("gone") is None
        assert shard.store.event_seq("gone", "0") is None
        assert [r.user_id for r in shard.store.load_snapshots(0)] == ["kept"]
        assert shard.snapshot() == 0  # the deleted user is not written back

        fresh = ProfileShard(0, stores(), _cfg())
        fresh.recover()
        assert fresh.profile_state("gone") is None
        assert fresh.profile_view("kept").profile_version == 1
        # The user can start over: the old event ids are new again.
        ack = shard.apply_events([_ev(EventType.VIEW, "i0", t=1.0, eid="0", user="gone")])[0]
        assert (ack.status, ack.profile_version) == (EventStatus.ACCEPTED, 1)

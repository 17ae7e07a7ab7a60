"""Tests for the vector index, catalog filters and the ranking logic (`tastemaker.retrieval`).

Everything runs on small hand-built or seeded random vectors; expected rankings and scores are
worked out here with plain numpy, never taken from the code under test."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tastemaker.config import RetrievalConfig
from tastemaker.domain import (
    AttributeCondition,
    CandidateSource,
    EventType,
    HistoryEntry,
    Item,
    ProfileView,
    RecommendQuery,
)
from tastemaker.errors import InvalidArgument, NotFound
from tastemaker.retrieval.catalog import Catalog, condition_matches, validate_conditions
from tastemaker.retrieval.index import FlatIndex, create_index
from tastemaker.retrieval.ranking import Retriever


def _unit(v) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    return (v / np.linalg.norm(v)).astype(np.float32)


# -- FlatIndex -------------------------------------------------------------------------------------


def _random_unit(n: int, d: int, seed: int) -> np.ndarray:
    m = np.random.default_rng(seed).standard_normal((n, d))
    return (m / np.linalg.norm(m, axis=1, keepdims=True)).astype(np.float32)


def _brute_force(ids, matrix, query, k, allowed=None, excluded=None):
    keep = [i for i, item_id in enumerate(ids) if (allowed is None or item_id in allowed) and not (excluded and item_id in excluded)]
    scores = matrix[keep].astype(np.float64) @ query.astype(np.float64)
    order = np.argsort(-scores)[:k]
    return [ids[keep[j]] for j in order], [float(scores[j]) for j in order]


class TestFlatIndex:
    N, D = 300, 16

    @pytest.fixture
    def data(self):
        ids = [f"it{i}" for i in range(self.N)]
        matrix = _random_unit(self.N, self.D, seed=11)
        index = FlatIndex(self.D)
        index.upsert(ids, matrix)
        return index, ids, matrix

    def test_search_equals_brute_force(self, data):
        index, ids, matrix = data
        assert len(index) == self.N
        for q, query in enumerate(_random_unit(5, self.D, seed=12)):
            for k in (1, 7, 25):
                got = index.search(query, k)
                want_ids, want_scores = _brute_force(ids, matrix, query, k)
                assert [g[0] for g in got] == want_ids, (q, k)
                np.testing.assert_allclose([g[1] for g in got], want_scores, atol=1e-5)

    def test_allowed_restricts_results(self, data):
        index, ids, matrix = data
        query = _random_unit(1, self.D, seed=13)[0]
        allowed = {f"it{i}" for i in range(0, self.N, 7)}
        got = index.search(query, 10, allowed=allowed)
        want_ids, _ = _brute_force(ids, matrix, query, 10, allowed=allowed)
        assert [g[0] for g in got] == want_ids
        assert all(g[0] in allowed for g in got)

    def test_excluded_never_returned(self, data):
        index, ids, matrix = data
        query = _random_unit(1, self.D, seed=14)[0]
        top = [g[0] for g in index.search(query, 5)]
        excluded = set(top[:3]) | {"not-in-index"}
        got = index.search(query, 5, excluded=excluded)
        want_ids, _ = _brute_force(ids, matrix, query, 5, excluded=excluded)
        assert [g[0] for g in got] == want_ids
        assert not excluded & {g[0] for g in got}
        assert [g[0] for g in got][:2] == top[3:5]

    def test_allowed_and_excluded_together(self, data):
        index, ids, matrix = data
        query = _random_unit(1, self.D, seed=15)[0]
        allowed = {f"it{i}" for i in range(40)}
        excluded = {f"it{i}" for i in range(0, 40, 2)}
        got = index.search(query, 50, allowed=allowed, excluded=excluded)
        want_ids, _ = _brute_force(ids, matrix, query, 50, allowed=allowed, excluded=excluded)
        assert [g[0] for g in got] == want_ids
        assert len(got) == 20  # only 20 ids qualify

    def test_fewer_than_k_only_when_fewer_qualify(self, data):
        index, ids, matrix = data
        query = _random_unit(1, self.D, seed=16)[0]
        assert len(index.search(query, self.N + 50)) == self.N
        assert len(index.search(query, 10, allowed={"it1", "it2", "it3", "ghost"})) == 3
        assert len(index.search(query, 10, allowed={"ghost"})) == 0
        assert len(index.search(query, self.N, excluded={"it1", "it2"})) == self.N - 2
        assert len(index.search(query, 10, excluded={"it1", "it2"})) == 10
        assert index.search(query, 0) == []

    def test_upsert_replaces_vector(self, data):
        index, ids, matrix = data
        query = _random_unit(1, self.D, seed=17)[0]
        index.upsert(["it5"], query.reshape(1, -1))
        assert len(index) == self.N
        got = index.search(query, 3)
        assert got[0][0] == "it5"
        assert got[0][1] == pytest.approx(1.0, abs=1e-5)
        np.testing.assert_allclose(index.vector("it5"), query, atol=1e-6)
        # The old vector is gone: searching for it no longer finds it5 with score 1.
        old = matrix[5]
        hits = dict(index.search(old, self.N))
        assert hits["it5"] == pytest.approx(float(query @ old), abs=1e-5)
        assert [i for i, _ in index.search(old, self.N)].count("it5") == 1

    def test_remove(self, data):
        index, ids, matrix = data
        query = matrix[10]
        assert index.search(query, 1)[0][0] == "it10"
        index.remove(["it10", "unknown"])
        assert len(index) == self.N - 1
        assert "it10" not in index
        assert index.vector("it10") is None
        got = [g[0] for g in index.search(query, self.N)]
        assert "it10" not in got and len(got) == self.N - 1
        want_ids, _ = _brute_force(ids[:10] + ids[11:], np.delete(matrix, 10, axis=0), query, 5)
        assert got[:5] == want_ids
        # Re-adding after removal works and is found again.
        index.upsert(["it10"], matrix[10:11])
        assert index.search(query, 1)[0][0] == "it10"

    def test_vectors_matrix_and_empty_index(self):
        index = create_index("flat", 3)
        assert index.search(np.ones(3, dtype=np.float32), 5) == []
        index.upsert(["a", "b"], np.array([[1, 0, 0], [0, 1, 0]], dtype=np.float32))
        np.testing.assert_allclose(index.vectors(["b", "a"]), [[0, 1, 0], [1, 0, 0]], atol=1e-7)
        assert index.vectors([]).shape == (0, 3)
        with pytest.raises(ValueError):
            create_index("hnsw", 3)


# -- Catalog filters -------------------------------------------------------------------------------


class TestConditions:
    ATTRS = {"genres": "Animation|Children|Comedy", "year": "1995", "lang": "en", "rating": "n/a"}

    def test_any_of_on_pipe_separated_values(self):
        assert condition_matches(AttributeCondition("genres", any_of=["Comedy"]), self.ATTRS)
        assert condition_matches(AttributeCondition("genres", any_of=["Horror", "Children"]), self.ATTRS)
        assert not condition_matches(AttributeCondition("genres", any_of=["Horror"]), self.ATTRS)
        # Whole values only: neither a substring nor the joined string matches.
        assert not condition_matches(AttributeCondition("genres", any_of=["Anim"]), self.ATTRS)
        assert not condition_matches(AttributeCondition("genres", any_of=["Children|Comedy"]), self.ATTRS)

    def test_any_of_is_case_insensitive(self):
        assert condition_matches(AttributeCondition("genres", any_of=["comedy"]), self.ATTRS)
        assert condition_matches(AttributeCondition("genres", any_of=["ANIMATION"]), self.ATTRS)
        assert condition_matches(AttributeCondition("lang", any_of=["EN"]), self.ATTRS)
        assert not condition_matches(AttributeCondition("lang", any_of=["e"]), self.ATTRS)

    def test_values_around_pipes_are_trimmed(self):
        assert condition_matches(AttributeCondition("g", any_of=["children"]), {"g": "Animation | Children"})

    def test_numeric_range(self):
        c = lambda lo, hi: AttributeCondition("year", min_value=lo, max_value=hi)
        assert condition_matches(c(1990, 2000), self.ATTRS)
        assert condition_matches(c(1995, 1995), self.ATTRS)  # bounds are inclusive
        assert not condition_matches(c(1996, None), self.ATTRS)
        assert not condition_matches(c(None, 1994.5), self.ATTRS)
        assert condition_matches(c(None, 1995), self.ATTRS)
        assert condition_matches(c(1900, None), self.ATTRS)
        # A value that is not a number never satisfies a range.
        assert not condition_matches(AttributeCondition("rating", min_value=0), self.ATTRS)

    def test_exclude_inverts(self):
        assert not condition_matches(AttributeCondition("genres", any_of=["comedy"], exclude=True), self.ATTRS)
        assert condition_matches(AttributeCondition("genres", any_of=["horror"], exclude=True), self.ATTRS)
        assert not condition_matches(AttributeCondition("year", min_value=1990, exclude=True), self.ATTRS)

    def test_missing_attribute(self):
        # Missing never matches a condition; "exclude X" therefore keeps items without the attribute.
        assert not condition_matches(AttributeCondition("mood", any_of=["dark"]), self.ATTRS)
        assert not condition_matches(AttributeCondition("mood", min_value=0), self.ATTRS)
        assert condition_matches(AttributeCondition("mood", any_of=["dark"], exclude=True), self.ATTRS)

    @pytest.mark.parametrize(
        "condition, words",
        [
            (AttributeCondition("", any_of=["x"]), "empty attribute"),
            (AttributeCondition("genres"), "any_of"),
            (AttributeCondition("year", min_value=2000, max_value=1990), "min_value"),
        ],
    )
    def test_validate_conditions_errors(self, condition, words):
        with pytest.raises(InvalidArgument, match=words):
            validate_conditions([AttributeCondition("ok", any_of=["a"]), condition])

    def test_validate_accepts_good_conditions(self):
        validate_conditions(
            [
                AttributeCondition("genres", any_of=["a"]),
                AttributeCondition("year", min_value=1),
                AttributeCondition("year", max_value=1),
                AttributeCondition("year", min_value=3, max_value=3),
            ]
        )

    def test_catalog_matching_ids_and_popularity(self):
        catalog = Catalog()
        for item_id, genres in [("a", "Drama"), ("b", "Comedy|Drama"), ("c", "Horror"), ("d", "")]:
            catalog.upsert(Item(item_id=item_id, title=item_id.upper(), attributes={"genres": genres} if genres else {}))
        assert catalog.matching_ids([]) is None
        assert catalog.matching_ids([AttributeCondition("genres", any_of=["drama"])]) == {"a", "b"}
        assert catalog.matching_ids([AttributeCondition("genres", any_of=["drama"], exclude=True)]) == {"c", "d"}
        both = [AttributeCondition("genres", any_of=["drama"]), AttributeCondition("genres", any_of=["comedy"])]
        assert catalog.matching_ids(both) == {"b"}

        catalog.set_popularity({"c": 9, "a": 3, "b": 3, "gone": 100})
        assert catalog.popular_order() == ["c", "a", "b", "d"]  # ties by id; unknown ids ignored
        assert catalog.popularity_score("c") == pytest.approx(1.0, abs=1e-9)
        assert catalog.popularity_score("a") == pytest.approx(math.log1p(3) / math.log1p(9), abs=1e-9)
        assert catalog.popularity_score("d") == pytest.approx(0.0, abs=1e-9)
        catalog.remove("c")
        assert catalog.popular_order() == ["a", "b", "d"]
        assert catalog.popularity_score("a") == pytest.approx(1.0, abs=1e-9)


# -- Retriever --------------------------------------------------------------------------------------

E = np.eye(6, dtype=np.float64)


def _items() -> list[Item]:
    spec = [
        ("toy", "Toy Story", E[0], ["animation", "kids"], {"genres": "Animation|Children", "year": "1995"}),
        ("toy2", "Toy Story 2", E[0] + 0.1 * E[1], ["animation", "kids", "sequel"], {"genres": "Animation|Children", "year": "1999"}),
        ("bugs", "A Bug's Life", E[0] + 0.6 * E[2], ["animation", "insects"], {"genres": "Animation|Children", "year": "1998"}),
        ("alien", "Alien", E[1], ["scifi", "horror"], {"genres": "Horror|Sci-Fi", "year": "1979"}),
        ("aliens", "Aliens", E[1] + 0.2 * E[0], ["scifi", "action"], {"genres": "Action|Horror|Sci-Fi", "year": "1986"}),
        ("heat", "Heat", E[2], ["crime"], {"genres": "Crime|Thriller", "year": "1995"}),
        ("notebook", "The Notebook", E[3], ["romance"], {"genres": "Drama|Romance", "year": "2004"}),
    ]
    return [
        Item(item_id=i, title=t, tags=tags, attributes=attrs, vector=_unit(v)) for i, t, v, tags, attrs in spec
    ]


ITEM_VECTORS = {item.item_id: item.vector for item in _items()}


@pytest.fixture
def retriever() -> Retriever:
    r = Retriever(RetrievalConfig())
    r.upsert(_items())
    r.catalog.set_popularity({})
    return r


def _profile(vector=None, negative=None, seen=(), recent=(), user="u") -> ProfileView:
    return ProfileView(
        user_id=user,
        profile_version=len(recent),
        vector=None if vector is None else _unit(vector),
        negative_vector=None if negative is None else _unit(negative),
        seen_item_ids=list(seen),
        recent=list(recent),
    )


def _ids(results) -> list[str]:
    return [r.item_id for r in results]


def _expected_order(profile: ProfileView, ids, query=None, popularity=None) -> list[str]:
    """Independent hybrid score with the default weights (1, 1, 0.15, 0.5)."""
    popularity = popularity or {}
    top = max([popularity.get(i, 0) for i in ITEM_VECTORS] + [0])
    scores = {}
    for i in ids:
        v = ITEM_VECTORS[i].astype(np.float64)
        s = 0.15 * math.log1p(popularity.get(i, 0)) / max(1.0, math.log1p(top))
        if profile.vector is not None:
            s += float(v @ profile.vector)
        if query is not None:
            s += float(v @ query)
        if profile.negative_vector is not None:
            s -= 0.5 * max(0.0, float(v @ profile.negative_vector))
        scores[i] = s
    return sorted(scores, key=lambda i: -scores[i]), scores


class TestRetriever:
    def test_empty_retriever_returns_nothing(self):
        r = Retriever(RetrievalConfig())
        assert len(r) == 0
        assert r.recommend(RecommendQuery(user_id="u"), _profile(E[0])) == []

    def test_items_without_vectors_are_not_indexed(self, retriever):
        retriever.upsert([Item(item_id="novec", title="No vector yet")])
        assert len(retriever) == 7
        out = retriever.recommend(RecommendQuery(user_id="u", page_size=20, include_seen=True), _profile())
        assert "novec" not in _ids(out)

    def test_excludes_seen_by_default(self, retriever):
        profile = _profile(E[0], seen=["toy", "bugs"])
        out = retriever.recommend(RecommendQuery(user_id="u", page_size=2), profile)
        assert "toy" not in _ids(out) and "bugs" not in _ids(out)
        want, scores = _expected_order(profile, [i for i in ITEM_VECTORS if i not in {"toy", "bugs"}])
        assert _ids(out) == want[:2] == ["toy2", "aliens"]
        np.testing.assert_allclose([r.score for r in out], [scores[i] for i in want[:2]], atol=1e-5)
        everything = retriever.recommend(RecommendQuery(user_id="u", page_size=50), profile)
        assert sorted(_ids(everything)) == sorted(set(ITEM_VECTORS) - {"toy", "bugs"})
        assert CandidateSource.PROFILE in out[0].sources

    def test_include_seen(self, retriever):
        profile = _profile(E[0], seen=["toy", "bugs"])
        out = retriever.recommend(RecommendQuery(user_id="u", page_size=3, include_seen=True), profile)
        want, _ = _expected_order(profile, list(ITEM_VECTORS))
        assert _ids(out) == want[:3] == ["toy", "toy2", "bugs"]
        assert out[0].score == pytest.approx(1.0, abs=1e-5)

    def test_page_size_caps_results(self, retriever):
        out = retriever.recommend(RecommendQuery(user_id="u", page_size=2), _profile(E[0]))
        assert len(out) == 2
        out = retriever.recommend(RecommendQuery(user_id="u", page_size=50), _profile(E[0]))
        assert sorted(_ids(out)) == sorted(ITEM_VECTORS)

    def test_filter_applied_before_the_cut(self):
        # 300 fillers sit right on the user's taste, more than the candidate pool (200) holds.
        # Only 4 items are horror and all are far from the taste; the filter must still find 3.
        rng = np.random.default_rng(3)
        fillers = [
            Item(item_id=f"f{i:03d}", title=f"Filler {i}", attributes={"genres": "Comedy"}, vector=_unit(E[0] + 0.05 * rng.standard_normal(6)))
            for i in range(300)
        ]
        horror = [
            Item(item_id=f"h{i}", title=f"Horror {i}", attributes={"genres": "Horror|Thriller"}, vector=_unit(E[4] + w * E[0]))
            for i, w in enumerate([0.3, 0.1, 0.2, 0.0])
        ]
        r = Retriever(RetrievalConfig())
        assert r.config.candidate_pool < len(fillers)
        r.upsert(fillers + horror)
        r.catalog.set_popularity({f"f{i:03d}": 10 for i in range(300)})
        query = RecommendQuery(user_id="u", page_size=3, filter=[AttributeCondition("genres", any_of=["horror"])])
        out = r.recommend(query, _profile(E[0]))
        # Ordered by cosine to the taste: weights 0.3 > 0.2 > 0.1 on the taste axis.
        assert _ids(out) == ["h0", "h2", "h1"]

        # Exclude-filter plus seen: the remaining horror item comes back, nothing else.
        query = RecommendQuery(user_id="u", page_size=3, filter=[AttributeCondition("genres", any_of=["comedy"], exclude=True)])
        out = r.recommend(query, _profile(E[0], seen=["h0", "h1", "h2"]))
        assert _ids(out) == ["h3"]

    def test_filter_with_profile_ranks_within_passing_items(self, retriever):
        query = RecommendQuery(user_id="u", page_size=5, filter=[AttributeCondition("year", min_value=1990, max_value=1999)])
        profile = _profile(E[1] + E[2])
        out = retriever.recommend(query, profile)
        passing = ["toy", "toy2", "bugs", "heat"]
        want, _ = _expected_order(profile, passing)
        assert _ids(out) == want == ["heat", "bugs", "toy2", "toy"]

    def test_cold_user_gets_popular_items_in_order(self, retriever):
        popularity = {"heat": 50, "alien": 20, "toy": 5, "notebook": 5, "bugs": 1}
        retriever.catalog.set_popularity(popularity)
        out = retriever.recommend(RecommendQuery(user_id="new", page_size=4), ProfileView(user_id="new"))
        # toy and notebook tie on popularity: ties go by id (documented determinism).
        assert _ids(out) == ["heat", "alien", "notebook", "toy"]
        assert [r.sources for r in out] == [[CandidateSource.POPULAR]] * 4
        expected = [0.15 * math.log1p(popularity[i]) / math.log1p(50) for i in _ids(out)]
        np.testing.assert_allclose([r.score for r in out], expected, atol=1e-5)
        assert out[0].reason == "popular: 50 interactions"
        assert out[0].title == "Heat"

    def test_cold_user_with_no_popularity_gets_new_items(self, retriever):
        out = retriever.recommend(RecommendQuery(user_id="new", page_size=7), ProfileView(user_id="new"))
        assert len(out) == 7
        assert all(r.reason == "new in the catalog" for r in out)

    def test_query_steers_ranking(self, retriever):
        profile = _profile(E[0] + E[1])
        base = retriever.recommend(RecommendQuery(user_id="u", page_size=3), profile)
        assert "notebook" not in _ids(base)
        q = _unit(E[3])
        out = retriever.recommend(
            RecommendQuery(user_id="u", page_size=3, query="a romance like the notebook", query_vector=q), profile
        )
        want, scores = _expected_order(profile, list(ITEM_VECTORS), query=q)
        assert _ids(out)[0] == "notebook" == want[0]
        assert out[0].score == pytest.approx(scores["notebook"], abs=1e-5)
        assert CandidateSource.QUERY in out[0].sources
        assert "“romance”" in out[0].reason and "“notebook”" in out[0].reason
        assert "“the”" not in out[0].reason  # stopwords are not "matches"

    def test_query_reason_without_matching_words(self, retriever):
        out = retriever.recommend(
            RecommendQuery(user_id="u", page_size=1, query="love letters", query_vector=_unit(E[3])), ProfileView("u")
        )
        assert out[0].item_id == "notebook"
        assert out[0].reason == "close in meaning to your request “love letters”"

    def test_negative_vector_pushes_disliked_like_items_down(self):
        items = [
            Item(item_id="a", title="A", vector=_unit(E[0] + 0.25 * E[1])),
            Item(item_id="b", title="B", vector=_unit(E[0] + 0.3 * E[2])),
            Item(item_id="c", title="C", vector=_unit(E[3] - E[1])),
        ]
        r = Retriever(RetrievalConfig())
        r.upsert(items)
        liked = _profile(E[0])
        assert _ids(r.recommend(RecommendQuery(user_id="u", page_size=2), liked)) == ["a", "b"]
        disliking = _profile(E[0], negative=E[1])
        out = r.recommend(RecommendQuery(user_id="u", page_size=3), disliking)
        assert _ids(out) == ["b", "a", "c"]
        va = items[0].vector.astype(np.float64)
        expected_a = float(va @ E[0]) - 0.5 * float(va @ E[1])
        assert out[1].score == pytest.approx(expected_a, abs=1e-5)
        # The penalty is one-sided: an item opposite to the negative vector is not boosted.
        assert out[2].score == pytest.approx(0.0, abs=1e-5)

    def test_reason_names_closest_liked_history_item(self, retriever):
        recent = [
            HistoryEntry("alien", EventType.VIEW, 0.0, 0.25, 1.0),
            HistoryEntry("toy", EventType.RATING, 5.0, 2.0, 2.0),
        ]
        profile = _profile(E[0], seen=["alien", "toy"], recent=recent)
        out = retriever.recommend(RecommendQuery(user_id="u", page_size=1), profile)
        assert out[0].item_id == "toy2"
        assert out[0].reason == "because you rated Toy Story 5★ (both tagged animation, kids)"

    def test_reason_never_names_a_disliked_item(self, retriever):
        recent = [
            HistoryEntry("toy", EventType.RATING, 4.5, 1.5, 1.0),
            # Much closer to the recommended item (heat) than toy is, but disliked.
            HistoryEntry("bugs", EventType.RATING, 1.0, -2.0, 2.0),
        ]
        profile = _profile(E[2], seen=["toy", "bugs"], recent=recent)
        out = retriever.recommend(RecommendQuery(user_id="u", page_size=1), profile)
        assert out[0].item_id == "heat"
        assert out[0].reason == "because you rated Toy Story 4.5★"

    def test_reason_action_wording_and_no_shared_tags(self, retriever):
        recent = [HistoryEntry("alien", EventType.PURCHASE, 0.0, 2.0, 1.0)]
        profile = _profile(E[1], seen=["alien"], recent=recent)
        out = retriever.recommend(RecommendQuery(user_id="u", page_size=2), profile)
        assert out[0].item_id == "aliens"
        assert out[0].reason == "because you bought Alien (both tagged scifi)"
        # toy2 shares no tag with Alien: no "(both tagged ...)" part.
        toy2 = [r for r in out if r.item_id == "toy2"][0]
        assert toy2.reason == "because you bought Alien"

    def test_reason_without_liked_history(self, retriever):
        out = retriever.recommend(RecommendQuery(user_id="u", page_size=1), _profile(E[0]))
        assert out[0].reason == "close to the taste of your recent activity"

    def test_mmr_diversity_prefers_less_similar_item(self):
        items = [
            Item(item_id="d1", title="D1", vector=_unit(E[0])),
            Item(item_id="d2", title="D2 (near duplicate)", vector=_unit(E[0] + 0.03 * E[1])),
            Item(item_id="x", title="X", vector=_unit(E[2])),
            Item(item_id="far", title="Far", vector=_unit(E[3])),
        ]
        r = Retriever(RetrievalConfig())
        r.upsert(items)
        profile = _profile(E[0] + 0.4 * E[2])
        plain = r.recommend(RecommendQuery(user_id="u", page_size=2), profile)
        assert _ids(plain) == ["d1", "d2"]
        diverse = r.recommend(RecommendQuery(user_id="u", page_size=2, diversity=0.7), profile)
        assert _ids(diverse) == ["d1", "x"]
        # Scores stay the relevance scores, not the MMR values.
        assert diverse[1].score == pytest.approx(float(_unit(E[2]) @ profile.vector), abs=1e-5)
        # High diversity still starts from the most relevant item; results stay distinct.
        high = r.recommend(RecommendQuery(user_id="u", page_size=4, diversity=0.99), profile)
        assert _ids(high)[0] == "d1"
        assert sorted(_ids(high)) == ["d1", "d2", "far", "x"]
        full = r.recommend(RecommendQuery(user_id="u", page_size=4, diversity=1.0), profile)
        assert sorted(_ids(full)) == ["d1", "d2", "far", "x"]

    def test_remove_takes_items_out(self, retriever):
        retriever.remove(["toy2", "ghost"])
        out = retriever.recommend(RecommendQuery(user_id="u", page_size=3), _profile(E[0], seen=["toy"]))
        assert "toy2" not in _ids(out)
        assert _ids(out)[0] == "bugs"
        with pytest.raises(NotFound):
            retriever.similar_items("toy2", RecommendQuery(page_size=3))

    def test_similar_items(self, retriever):
        out = retriever.similar_items("toy", RecommendQuery(page_size=3))
        assert "toy" not in _ids(out)
        cos = {i: float(ITEM_VECTORS["toy"].astype(np.float64) @ v) for i, v in ITEM_VECTORS.items() if i != "toy"}
        want = sorted(cos, key=lambda i: -cos[i])[:3]
        assert _ids(out) == want == ["toy2", "bugs", "aliens"]
        np.testing.assert_allclose([r.score for r in out], [cos[i] for i in want], atol=1e-5)
        assert all(r.sources == [CandidateSource.SIMILAR_ITEM] for r in out)
        assert out[0].reason == "similar to Toy Story (both tagged animation, kids)"
        assert out[0].title == "Toy Story 2"

    def test_similar_items_with_filter(self, retriever):
        query = RecommendQuery(page_size=5, filter=[AttributeCondition("genres", any_of=["horror"])])
        out = retriever.similar_items("toy", query)
        assert _ids(out) == ["aliens", "alien"]
        assert out[1].reason == "similar to Toy Story"

    def test_similar_items_unknown_id(self, retriever):
        with pytest.raises(NotFound, match="nope"):
            retriever.similar_items("nope", RecommendQuery(page_size=3))
        with pytest.raises(NotFound):
            Retriever(RetrievalConfig()).similar_items("toy", RecommendQuery(page_size=3))

    def test_describe(self, retriever):
        recent = [
            HistoryEntry("toy", EventType.RATING, 5.0, 2.0, 1.0),
            HistoryEntry("bugs", EventType.VIEW, 0.0, 0.25, 2.0),
            HistoryEntry("alien", EventType.CLICK, 0.0, 0.5, 3.0),
            HistoryEntry("heat", EventType.DISLIKE, 0.0, -2.0, 4.0),  # disliked: its tags do not count
        ]
        titles, tags = retriever.describe(_profile(E[0], recent=recent), limit=3)
        assert titles == ["Toy Story", "Toy Story 2", "A Bug's Life"]
        # animation 2.25, kids 2.0, horror 0.5, scifi 0.5, insects 0.25 -> top 3, ties by name.
        assert tags == ["animation", "kids", "horror"]
        assert retriever.describe(ProfileView("cold")) == ([], [])


def test_exploration_slots_give_low_evidence_items_the_last_places_with_a_grounded_reason():
    config = RetrievalConfig(
        exploration_slots=1, exploration_depth=3, exploration_max_interactions=2, popularity_weight=0.5
    )
    r = Retriever(config)
    r.upsert(_items())
    r.catalog.set_popularity({i: 50 for i in ITEM_VECTORS if i not in {"heat", "notebook"}} | {"heat": 2})
    liked = HistoryEntry("bugs", EventType.RATING, 5.0, 2.0, 1.0)
    profile = _profile(E[0] + 0.3 * E[2], seen=["bugs"], recent=[liked])
    query = RecommendQuery(user_id="u", page_size=3)

    plain = Retriever(config.model_copy(update={"exploration_slots": 0}))
    plain.index, plain.catalog = r.index, r.catalog
    without = _ids(plain.recommend(query, profile))
    assert "heat" not in without and "notebook" not in without  # popularity keeps them out

    out = r.recommend(query, profile)
    # The head is the plain ranking; the last place goes to the best text match among items
    # with <= 2 interactions (heat is closer to the taste than notebook).
    assert _ids(out) == without[:2] + ["heat"]
    assert out[-1].reason.startswith("because you rated A Bug's Life 5★")

    # A longer page: the slot is still the last of the first exploration_depth (3) positions,
    # and the ranked item it displaced moves down. A page shorter than that has no slot.
    assert _ids(r.recommend(RecommendQuery(user_id="u", page_size=2), profile)) == without[:2]
    plain_long = _ids(plain.recommend(RecommendQuery(user_id="u", page_size=5), profile))
    long = _ids(r.recommend(RecommendQuery(user_id="u", page_size=5), profile))
    assert long == plain_long[:2] + ["heat"] + plain_long[2:4]

    # Nothing low-evidence among the candidates: the page is the plain ranking.
    r.catalog.set_popularity({i: 50 for i in ITEM_VECTORS})
    plain.catalog = r.catalog
    assert _ids(r.recommend(query, profile)) == _ids(plain.recommend(query, profile))

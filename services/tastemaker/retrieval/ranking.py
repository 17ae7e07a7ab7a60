"""Candidate generation, hybrid scoring, diversity and grounded explanations. Pure logic: the
retrieval deployment feeds it item changes and calls `recommend` / `similar_items`."""

from __future__ import annotations

import heapq
import re
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from tastemaker.config import RetrievalConfig
from tastemaker.domain import (
    CandidateSource,
    EventType,
    HistoryEntry,
    Item,
    ProfileView,
    RecommendQuery,
    ScoredItem,
)
from tastemaker.errors import NotFound
from tastemaker.retrieval.catalog import Catalog
from tastemaker.retrieval.collaborative import InteractionGraph
from tastemaker.retrieval.index import VectorIndex, create_index

_WORD = re.compile(r"[a-z0-9]+")
_STOPWORDS = frozenset(
    "a an and about are as at be by for from i in is it me movie movies of on or show something "
    "that the this to with want like some film films".split()
)


def _action(entry: HistoryEntry) -> str:
    """How a history entry reads in a reason."""
    if entry.event_type == EventType.RATING:
        stars = f"{entry.value:g}"
        return f"rated {{title}} {stars}★"
    return {
        EventType.VIEW: "viewed {title}",
        EventType.CLICK: "clicked {title}",
        EventType.ADD_TO_CART: "added {title} to your cart",
        EventType.PURCHASE: "bought {title}",
        EventType.REVIEW: "reviewed {title}",
    }.get(entry.event_type, "liked {title}")


@dataclass
class Candidates:
    """One request's candidates and their unweighted signals, aligned by position."""

    ids: list[str]
    vectors: np.ndarray
    sources: dict[str, set[CandidateSource]]
    #: Signal name -> value per candidate: profile / query cosine, negative (cosine to the
    #: negative profile, floored at 0), popularity (log, in [0, 1]), sequential / collaborative
    #: (scaled per request to [0, 1]; `.abs` unscaled), trending (in [0, 1]).
    features: dict[str, np.ndarray]
    #: Signal -> candidate -> the history item that proposed it.
    anchors: dict[str, dict[str, str]]


class Retriever:
    """Owns the item index and metadata of one retrieval replica."""

    def __init__(self, config: RetrievalConfig, graph: Optional[InteractionGraph] = None):
        self.config = config
        self.catalog = Catalog()
        self.index: Optional[VectorIndex] = None
        #: Collaborative and sequential signals; None = text and popularity only.
        self.graph = graph

    # -- catalog maintenance --------------------------------------------------------------
    def upsert(self, items: Sequence[Item]) -> None:
        with_vectors = [i for i in items if i.vector is not None]
        if with_vectors and self.index is None:
            self.index = create_index(self.config, int(with_vectors[0].vector.shape[0]))
        if with_vectors:
            self.index.upsert([i.item_id for i in with_vectors], np.stack([i.vector for i in with_vectors]))
        for item in with_vectors:
            self.catalog.upsert(item)

    def remove(self, item_ids: Sequence[str]) -> None:
        if self.index is not None:
            self.index.remove(item_ids)
        for item_id in item_ids:
            self.catalog.remove(item_id)
        if self.graph is not None:
            self.graph.forget_items(item_ids)

    def __len__(self) -> int:
        return 0 if self.index is None else len(self.index)

    # -- recommend ------------------------------------------------------------------------
    def recommend(self, request: RecommendQuery, profile: ProfileView) -> list[ScoredItem]:
        """Candidates from profile ANN, query ANN, next-item transitions, co-occurrence neighbours,
        trending and popularity; filtered, scored, diversified and explained."""
        found = self.candidates(request, profile)
        if found is None:
            return []
        ids, vectors, sources, anchors = found.ids, found.vectors, found.sources, found.anchors
        parts = self.score_parts(found)
        scores = sum(parts.values())
        order = self._select(scores, vectors, request.page_size, request.diversity)
        order, explored = self._explore(order, ids, parts, request.page_size)
        if "factors" in parts:  # the history item behind each factor score, for the page's reasons
            anchors = dict(anchors, factors=self.graph.factor_anchors([ids[i] for i in order], profile.recent))
        explain_explored = "profile" if "profile" in parts else "query"
        return [
            ScoredItem(
                item_id=ids[i],
                title=self.catalog.items[ids[i]].title,
                score=float(scores[i]),
                sources=sorted(sources[ids[i]]),
                reason=self._reason(
                    ids[i],
                    vectors[i],
                    {k: float(v[i]) for k, v in parts.items()},
                    profile,
                    request,
                    anchors,
                    main=explain_explored if i in explored else None,
                ),
            )
            for i in order
        ]

    def score_parts(self, found: "Candidates") -> dict[str, np.ndarray]:
        """The score of each candidate as named parts that sum to it (the reason names the part
        that mattered most): the configured linear blend of the signals."""
        cfg = self.config
        weights = {
            "popularity": cfg.popularity_weight,
            "profile": cfg.profile_weight,
            "query": cfg.query_weight,
            "negative": -cfg.negative_weight,
            "sequential": cfg.sequential_weight,
            "collaborative": cfg.collaborative_weight,
            "trending": cfg.trending_weight,
            "factors": cfg.factor_weight,
        }
        return {
            name: weights[name] * values
            for name, values in found.features.items()
            if name in weights and (name != "trending" or weights[name])
        }

    def candidates(self, request: RecommendQuery, profile: ProfileView) -> Optional["Candidates"]:
        """The filtered candidate set with its unweighted signals (None when there is none)."""
        if self.index is None or len(self.index) == 0:
            return None
        cfg = self.config
        excluded = set() if request.include_seen else set(profile.seen_item_ids)
        allowed = self.catalog.matching_ids(request.filter)
        sources: dict[str, set[CandidateSource]] = {}

        def propose(vector: Optional[np.ndarray], source: CandidateSource) -> None:
            if vector is None:
                return
            for item_id, _ in self.index.search(vector, cfg.candidate_pool, allowed, excluded):
                sources.setdefault(item_id, set()).add(source)

        propose(profile.vector, CandidateSource.PROFILE)
        propose(request.query_vector, CandidateSource.QUERY)

        def eligible(item_id: str) -> bool:
            return (
                item_id not in excluded
                and (allowed is None or item_id in allowed)
                and item_id in self.catalog.items
            )

        graph_scores: dict[str, dict[str, tuple[float, str]]] = {}
        if self.graph is not None:
            graph_scores["sequential"] = {
                i: v
                for i, v in self.graph.sequential_scores(
                    profile.recent, cfg.sequential_history, cfg.sequential_decay, cfg.sequential_normalise
                ).items()
                if eligible(i)
            }
            graph_scores["collaborative"] = {
                i: v for i, v in self.graph.cooccurrence_scores(profile.recent).items() if eligible(i)
            }
            for name, source in (("sequential", CandidateSource.SEQUENTIAL), ("collaborative", CandidateSource.COLLABORATIVE)):
                top = heapq.nlargest(cfg.candidate_pool, graph_scores[name].items(), key=lambda kv: (kv[1][0], kv[0]))
                for item_id, _ in top:
                    sources.setdefault(item_id, set()).add(source)
        factor_user = self.graph.factor_user(profile.recent) if self.graph is not None and cfg.factor_weight else None
        if factor_user is not None and len(self.graph.factors.item_ids) <= cfg.factor_scan_max_items:
            for item_id, _ in self.graph.factors.top(factor_user, cfg.candidate_pool, eligible):
                sources.setdefault(item_id, set()).add(CandidateSource.FACTORS)
        if self.graph is not None:
            if profile.vector is None:  # cold users: what is popular lately, not only ever
                for item_id, _ in self.graph.trending(cfg.candidate_pool // 4, eligible):
                    sources.setdefault(item_id, set()).add(CandidateSource.TRENDING)
        # Popularity always contributes: it answers cold users and refills after strict filters,
        # so page_size results come back whenever enough items pass the filters.
        wanted_popular = max(cfg.candidate_pool // 4, request.page_size * 2)
        taken = 0
        for item_id in self.catalog.popular_order():
            if taken >= wanted_popular:
                break
            if item_id in excluded or (allowed is not None and item_id not in allowed):
                continue
            sources.setdefault(item_id, set()).add(CandidateSource.POPULAR)
            taken += 1
        if not sources:
            return None
        ids = list(sources)
        vectors = self.index.vectors(ids)
        features = {"popularity": np.array([self.catalog.popularity_score(i) for i in ids])}
        if profile.vector is not None:
            features["profile"] = vectors @ profile.vector
        if request.query_vector is not None:
            features["query"] = vectors @ request.query_vector
        if profile.negative_vector is not None:
            features["negative"] = np.maximum(0.0, vectors @ profile.negative_vector)
        anchors: dict[str, dict[str, str]] = {}
        for name, found in graph_scores.items():
            if found:
                # Scaled per request to [0, 1]: raw counts are not comparable across users.
                top = max(v[0] for v in found.values()) or 1.0
                raw = np.array([found[i][0] if i in found else 0.0 for i in ids])
                features[name] = raw / top
                features[name + ".abs"] = raw
                anchors[name] = {i: found[i][1] for i in ids if i in found}
        if self.graph is not None:
            features["trending"] = np.array([self.graph.trend_score(i) for i in ids])
        if factor_user is not None:
            raw = self.graph.factors.scores(factor_user, ids)
            # Scaled per request like the transitions: the best match scores 1.
            top = float(raw.max()) if raw.size and raw.max() > 0 else 1.0
            features["factors"] = raw / top  # its anchors are found for the page only (recommend)
        return Candidates(ids, vectors, sources, features, anchors)

    def _explore(
        self, order: list[int], ids: list[str], parts: dict[str, np.ndarray], page_size: int
    ) -> tuple[list[int], set[int]]:
        """Exploration slots: the candidates with little interaction evidence (at most
        `exploration_max_interactions` events) that match the user's taste (or query) best by
        text take the last `exploration_slots` of the first `exploration_depth` positions; the
        ranked items they displace move down. Transitions, co-occurrence and popularity know
        nothing of such items, so without this a new item is never shown to anyone, never gains
        evidence, and the blend keeps it out for good. Pages shorter than `exploration_depth`
        have no exploration slots. Returns the page's candidate positions and the explored ones
        (none when off, on short pages, without a text signal, or when nothing qualifies)."""
        cfg = self.config
        depth = cfg.exploration_depth
        slots = min(cfg.exploration_slots, depth)
        text_parts = [parts[k] for k in ("profile", "query") if k in parts]
        if slots <= 0 or page_size < depth or not text_parts:
            return order, set()
        head = order[: depth - slots]
        taken = set(head)
        popularity = self.catalog.popularity
        limit = cfg.exploration_max_interactions
        low = [j for j, item_id in enumerate(ids) if j not in taken and popularity.get(item_id, 0) <= limit]
        if not low:
            return order, set()
        text = sum(text_parts) + parts.get("negative", 0.0)
        best = np.argsort(-np.asarray(text)[low], kind="stable")[:slots]
        picked = [low[int(b)] for b in best]
        rest = [i for i in order[len(head) :] if i not in set(picked)]
        return (head + picked + rest)[:page_size], set(picked)

    @staticmethod
    def _select(scores: np.ndarray, vectors: np.ndarray, k: int, diversity: float) -> list[int]:
        """Top-k by score, or greedy MMR when diversity > 0."""
        if diversity <= 0:
            return list(np.argsort(-scores, kind="stable")[:k])
        span = float(scores.max() - scores.min()) or 1.0
        relevance = (scores - scores.min()) / span
        chosen: list[int] = []
        max_sim = np.full(len(scores), -np.inf)
        remaining = np.ones(len(scores), dtype=bool)
        for _ in range(min(k, len(scores))):
            penalty = np.where(np.isfinite(max_sim), max_sim, 0.0)
            mmr = (1 - diversity) * relevance - diversity * penalty
            mmr[~remaining] = -np.inf
            best = int(np.argmax(mmr))
            chosen.append(best)
            remaining[best] = False
            max_sim = np.maximum(max_sim, vectors @ vectors[best])
        return chosen

    def _reason(
        self,
        item_id: str,
        vector: np.ndarray,
        parts: dict[str, float],
        profile: ProfileView,
        request: RecommendQuery,
        anchors: Optional[dict[str, dict[str, str]]] = None,
        main: Optional[str] = None,
    ) -> str:
        """A grounded explanation from the score part that contributed most (or from `main`:
        exploration slots are explained by the text match that chose them)."""
        if main is None:
            # Only a part that actually added to the score can explain it (a zero trending part
            # must not read "trending lately").
            ranked = sorted(((v, k) for k, v in parts.items() if k != "negative" and v > 0), reverse=True)
            main = ranked[0][1] if ranked else "popularity"
        anchor_id = (anchors or {}).get(main, {}).get(item_id)
        if main in ("sequential", "collaborative", "factors") and anchor_id:
            entry = next((h for h in reversed(profile.recent) if h.item_id == anchor_id), None)
            meta = self.catalog.items.get(anchor_id)
            title = meta.title if meta else anchor_id
            yours = f", which you {_action(entry).format(title='').replace('  ', ' ').strip()}" if entry else ""
            if main == "sequential":
                return f"people often pick this right after {title}{yours}"
            if main == "factors":
                return f"people who share your taste for {title} liked this{yours}"
            return f"people who liked {title} also liked this{yours}"
        if main == "trending":
            return "trending lately"
        if main == "profile":
            anchor = self._closest_liked(vector, profile.recent)
            if anchor is not None:
                meta = self.catalog.items.get(anchor.item_id)
                title = meta.title if meta else anchor.item_id
                reason = "because you " + _action(anchor).format(title=title)
                shared = self._shared_tags(item_id, anchor.item_id)
                return reason + (f" (both tagged {', '.join(shared)})" if shared else "")
            return "close to the taste of your recent activity"
        if main == "query":
            words = self._matching_words(item_id, request.query)
            if words:
                return f"matches {', '.join(words)} in your request"
            return f"close in meaning to your request “{request.query}”"
        count = self.catalog.popularity.get(item_id, 0)
        return f"popular: {count} interactions" if count else "new in the catalog"

    def _closest_liked(self, vector: np.ndarray, recent: Sequence[HistoryEntry]) -> Optional[HistoryEntry]:
        liked = [h for h in recent if h.weight > 0 and h.item_id in self.index]
        if not liked:
            return None
        sims = self.index.vectors([h.item_id for h in liked]) @ vector
        return liked[int(np.argmax(sims))]

    def _shared_tags(self, a: str, b: str, limit: int = 2) -> list[str]:
        ma, mb = self.catalog.items.get(a), self.catalog.items.get(b)
        if not ma or not mb:
            return []
        other = set(mb.tags)
        return [t for t in ma.tags if t in other][:limit]

    def _matching_words(self, item_id: str, query: str, limit: int = 3) -> list[str]:
        meta = self.catalog.items.get(item_id)
        if not meta or not query:
            return []
        text = " ".join([meta.title, " ".join(meta.tags), " ".join(meta.attributes.values())]).lower()
        item_words = set(_WORD.findall(text))
        words = [w for w in dict.fromkeys(_WORD.findall(query.lower())) if w not in _STOPWORDS]
        return [f"“{w}”" for w in words if w in item_words][:limit]

    # -- item to item ---------------------------------------------------------------------
    def similar_items(self, item_id: str, request: RecommendQuery) -> list[ScoredItem]:
        """Items like one item: text neighbours blended with items liked together with it
        (co-occurrence in the event log), with the request's filter."""
        vector = None if self.index is None else self.index.vector(item_id)
        if vector is None:
            raise NotFound(f"item_id {item_id!r} is not in the catalog")
        allowed = self.catalog.matching_ids(request.filter)
        pool = max(request.page_size, self.config.candidate_pool // 2)
        text_hits = dict(self.index.search(vector, pool, allowed, {item_id}))
        co_row = {}
        if self.graph is not None and self.config.collaborative_weight:
            anchor = [HistoryEntry(item_id, EventType.RATING, 0.0, 1.0, 0.0)]
            co_row = {
                i: v[0]
                for i, v in self.graph.cooccurrence_scores(anchor).items()
                if i != item_id and i in self.catalog.items and (allowed is None or i in allowed)
            }
            co_row = dict(heapq.nlargest(pool, co_row.items(), key=lambda kv: (kv[1], kv[0])))
        ids = list(dict.fromkeys([*text_hits, *co_row]))
        if not ids:
            return []
        text = self.index.vectors(ids) @ vector
        top_co = max(co_row.values(), default=0.0) or 1.0
        co = self.config.collaborative_weight * np.array([co_row.get(i, 0.0) / top_co for i in ids])
        scores = text + co
        title = self.catalog.items[item_id].title
        out = []
        for i in np.argsort(-scores, kind="stable")[: request.page_size]:
            other_id = ids[i]
            sources = [CandidateSource.SIMILAR_ITEM] + ([CandidateSource.COLLABORATIVE] if other_id in co_row else [])
            if co[i] > text[i]:
                reason = f"people who liked {title} also liked this"
            else:
                shared = self._shared_tags(other_id, item_id)
                reason = f"similar to {title}" + (f" (both tagged {', '.join(shared)})" if shared else "")
            out.append(ScoredItem(other_id, self.catalog.items[other_id].title, float(scores[i]), sources, reason))
        return out

    # -- profile summary ------------------------------------------------------------------
    def describe(self, profile: ProfileView, limit: int = 5) -> tuple[list[str], list[str]]:
        """Titles closest to the taste vector and tags most common among liked items."""
        titles: list[str] = []
        if profile.vector is not None and self.index is not None:
            titles = [self.catalog.items[i].title for i, _ in self.index.search(profile.vector, limit)]
        tag_weight: dict[str, float] = {}
        for h in profile.recent:
            meta = self.catalog.items.get(h.item_id)
            if h.weight > 0 and meta:
                for tag in meta.tags:
                    tag_weight[tag] = tag_weight.get(tag, 0.0) + h.weight
        tags = [t for t, _ in sorted(tag_weight.items(), key=lambda kv: (-kv[1], kv[0]))[:limit]]
        return titles, tags

"""Tastemaker's own code path under evaluation: the profile math the shards run and the ranking
the retrieval replicas run, fed a training segment instead of a live event stream.

For one segment:
1. every training event becomes the `UserEvent` the gateway would have produced (a MovieLens
   rating is a rating event with its stars and time) and is folded into that user's
   `ProfileState` with `ProfileState.apply`, in log order, with the item's vector from the bundled
   encoder over `Item.text()` — exactly what a profile shard does;
2. `InteractionGraph` is fitted on the same events in log order — what `tastemaker fit` does;
3. a `Retriever` holds the catalog (items with their vectors, popularity = training events per
   item, as the retrieval replica counts it) and the graph, and each user's recommendations come
   from `Retriever.recommend(RecommendQuery(page_size=k), profile_view)`, which excludes the
   user's seen items by default.

Item and user ids handed to the service code are aliases derived from the internal (seeded)
indices, so any id-ordered tie-break inside the service is a seeded order too.

The text-only zero-shot baseline is the same path with no graph and every weight but the
profile's at zero: the decayed mean of the user's item vectors, ranked by cosine.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Optional, Sequence

import numpy as np

from tastemaker.config import ProfileConfig, RetrievalConfig
from tastemaker.domain import EventType, Item, ProfileView, RecommendQuery, UserEvent
from tastemaker.evaluation.baselines import Fitted, Method, TrainData
from tastemaker.evaluation.data import Interactions
from tastemaker.profiles.state import ProfileState
from tastemaker.retrieval.collaborative import CONSUMED, InteractionGraph, graph_params
from tastemaker.retrieval.ranking import Retriever

#: The RetrievalConfig fields tuned on validation (the hybrid score's blend weights and the
#: scoring-time shape of the transition signal) ...
TUNED_FIELDS = (
    "profile_weight",
    "sequential_weight",
    "collaborative_weight",
    "popularity_weight",
    "negative_weight",
    "trending_weight",
    "factor_weight",
    "sequential_history",
    "sequential_decay",
    "sequential_normalise",
    # ... and fields that change what is fitted (a refit per value): the transition window and
    # the rating that counts as neutral (below it a rating pushes the profile away and does not
    # count as "liked" for co-occurrence). `profiles.` keys live in the service's profiles section.
    "sequential_window",
    "trending_half_life_days",
    "profiles.weights.rating_centre",
    "profiles.half_life_days",
)
FIT_FIELDS = (
    "sequential_window",
    "trending_half_life_days",
    "profiles.weights.rating_centre",
    "profiles.half_life_days",
)


def configs_for(
    retrieval: RetrievalConfig, profiles: ProfileConfig, params: dict[str, Any]
) -> tuple[RetrievalConfig, ProfileConfig]:
    """The service configs with `params` applied (plain keys: retrieval; `profiles.a.b`: profiles),
    validated like a config file would be."""
    retrieval_tree = retrieval.model_dump()
    profile_tree = profiles.model_dump()
    for key, value in params.items():
        if key.startswith("profiles."):
            node = profile_tree
            *path, leaf = key.split(".")[1:]
            for part in path:
                node = node[part]
            node[leaf] = value
        else:
            retrieval_tree[key] = value
    return RetrievalConfig.model_validate(retrieval_tree), ProfileConfig.model_validate(profile_tree)


def fit_key(params: dict[str, Any]) -> tuple:
    """The part of `params` that needs a refit (profiles or graph)."""
    return tuple(sorted((k, v) for k, v in params.items() if k in FIT_FIELDS))


def config_tree(params: dict[str, Any]) -> dict[str, Any]:
    """`params` as the nested sections of the service YAML (`retrieval:`, `profiles:`)."""
    tree: dict[str, Any] = {}
    for key, value in params.items():
        parts = key.split(".") if key.startswith("profiles.") else ["retrieval", key]
        node = tree
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return tree


#: Zero-shot text model: the profile part of the hybrid score and nothing else.
TEXT_ONLY_WEIGHTS = dict(
    profile_weight=1.0,
    sequential_weight=0.0,
    collaborative_weight=0.0,
    popularity_weight=0.0,
    negative_weight=0.0,
    trending_weight=0.0,
    factor_weight=0.0,
)

#: Values tried per field by the coordinate search (plus the starting value).
SEARCH_SPACE: dict[str, list[float]] = {
    "profiles.weights.rating_centre": [0.0, 3.0],
    "profiles.half_life_days": [0.01, 0.1, 1.0, 30.0, 180.0],
    "sequential_window": [1, 3, 5],
    "sequential_normalise": [True, False],
    "profile_weight": [0.5, 1.0, 2.0],
    "sequential_weight": [0.3, 0.6, 1.0, 2.0],
    "collaborative_weight": [0.0, 0.4, 1.0],
    "popularity_weight": [0.0, 0.05, 0.15],
    "negative_weight": [0.0, 0.5],
    "trending_weight": [0.0, 0.05, 0.1, 0.2],
    "trending_half_life_days": [7.0, 30.0, 180.0],
    "factor_weight": [0.0, 0.1, 0.2, 0.4, 0.8],
    "sequential_history": [3, 5, 10],
    "sequential_decay": [0.5, 0.7, 0.9],
}
QUICK_SEARCH_SPACE: dict[str, list[float]] = {
    "sequential_weight": [0.0, 2.0],
    "popularity_weight": [0.0, 0.15],
}

#: Starting points tried before the coordinate search (it starts from the best of them), so a
#: plateau around the service defaults (e.g. cold targets that no single weight change reaches)
#: cannot trap it. Each is applied on top of the service config's weights.
SEARCH_SEEDS: list[dict[str, float]] = [
    {},  # the service config as given
    dict(TEXT_ONLY_WEIGHTS),
    dict(TEXT_ONLY_WEIGHTS, sequential_weight=1.0),
    dict(TEXT_ONLY_WEIGHTS, sequential_weight=1.0, collaborative_weight=0.4, popularity_weight=0.15),
    # Raw-count transitions over a longer window and history (what the sequential baseline's
    # validation prefers), weighted up against the profile.
    dict(
        sequential_normalise=False, sequential_window=5, sequential_history=5, sequential_decay=0.8,
        sequential_weight=2.0, profile_weight=2.0,
    ),
    # The same, with the matrix factors and what is trending at the time of the request.
    dict(
        sequential_normalise=False, sequential_window=5, sequential_history=5, sequential_decay=0.8,
        sequential_weight=2.0, profile_weight=1.6, factor_weight=0.4, trending_weight=0.2,
        trending_half_life_days=30.0, collaborative_weight=0.0, popularity_weight=0.0,
    ),
    # ... and a profile of the current sitting (15-minute half-life) rather than of the season.
    {
        "sequential_normalise": False, "sequential_window": 5, "sequential_history": 5, "sequential_decay": 0.8,
        "sequential_weight": 2.0, "profile_weight": 1.6, "factor_weight": 0.4, "trending_weight": 0.2,
        "trending_half_life_days": 30.0, "collaborative_weight": 0.0, "popularity_weight": 0.0,
        "profiles.half_life_days": 0.01, "profiles.weights.rating_centre": 0.0,
    },
]
QUICK_SEARCH_SEEDS: list[dict[str, float]] = [{}, dict(TEXT_ONLY_WEIGHTS)]

def item_alias(index: int) -> str:
    """Opaque item id given to the service code: sorts like the seeded internal order."""
    return f"i{index:07d}"


def user_alias(index: int) -> str:
    return f"u{index:07d}"


class ServiceEvents:
    """The data set as service domain objects, built once per run and shared by all segments."""

    def __init__(self, data: Interactions, vectors: np.ndarray):
        self.data = data
        self.vectors = vectors
        self.items = [
            Item(
                item_id=item_alias(i),
                title=item.title,
                description=item.description,
                tags=list(item.tags),
                attributes=dict(item.attributes),
                vector=vectors[i],
            )
            for i, item in enumerate(data.items)
        ]
        self.events = [
            UserEvent(
                event_id=f"e{e}",
                user_id=user_alias(int(u)),
                event_type=EventType(int(t)),
                item_id=item_alias(int(i)),
                value=0.0 if np.isnan(r) else float(r),
                event_time=float(tm),
            )
            for e, (u, i, tm, r, t) in enumerate(zip(data.user, data.item, data.time, data.rating, data.event_type))
        ]
        self.alias_to_index = {item.item_id: i for i, item in enumerate(self.items)}
        self._templates: dict[str, Retriever] = {}

    def retriever(self, config: RetrievalConfig, graph: Optional[InteractionGraph], popularity: np.ndarray) -> Retriever:
        """A `Retriever` over the whole catalog with this segment's popularity and graph.

        The catalog is upserted once per index setting (`Retriever.upsert`) into a template whose
        vector index and item metadata every segment's retriever then shares read-only: nothing
        mutates them during evaluation, and rebuilding a FAISS index per segment and tuning trial
        would only cost time."""
        key = config.model_dump_json(include={"index", "exact_max_items", "ivf_nlist", "ivf_nprobe"})
        template = self._templates.get(key)
        if template is None:
            template = self._templates[key] = Retriever(config)
            template.upsert(self.items)
        retriever = Retriever(config, graph)
        retriever.index = template.index
        retriever.catalog = copy.copy(template.catalog)
        retriever.catalog.set_popularity(
            {self.items[i].item_id: int(c) for i, c in enumerate(popularity) if c > 0}
        )
        return retriever


class _FrozenGraph(InteractionGraph):
    """EVALUATION-ONLY SPEED-UP, identical results. A graph fitted for one segment never changes
    afterwards, so `cooccurrence_scores`, `sequential_scores` and `factor_user` are memoised per
    (history, arguments): the validation search ranks the same users under many blend weights and these
    scores do not depend on the weights. The memo returns the very dict the parent method
    computed (or the factor vector); ranking only reads it.
    """

    def freeze(self) -> "_FrozenGraph":
        self._memo: dict[tuple, dict] = {}
        return self

    @staticmethod
    def _history_key(recent) -> tuple:
        return tuple((h.item_id, int(h.event_type), h.weight) for h in recent)

    def _cached(self, key: tuple, compute: Callable[[], Any]) -> Any:
        memo = getattr(self, "_memo", None)
        if memo is None:  # not frozen yet
            return compute()
        if key not in memo:
            memo[key] = compute()
        return memo[key]

    def cooccurrence_scores(self, recent):
        return self._cached(("co", self._history_key(recent)), lambda: super(_FrozenGraph, self).cooccurrence_scores(recent))

    def sequential_scores(self, recent, history, decay, normalise=True):
        return self._cached(
            ("seq", self._history_key(recent), history, decay, normalise),
            lambda: super(_FrozenGraph, self).sequential_scores(recent, history, decay, normalise),
        )

    def factor_user(self, recent):
        return self._cached(("mf", self._history_key(recent)), lambda: super(_FrozenGraph, self).factor_user(recent))

    # -- the request moment -------------------------------------------------------------
    # A replica's trending counts are as of the newest event it has seen: the moment of the
    # request. A segment's graph is fitted on every training event, which under leave-last-out
    # includes other users' events from years after this user's last one; scoring "trending" from
    # those would hand the model the future. So the trending counts are replayed in log order by
    # the service's own `count_trend` and read as of each user's request moment.
    def set_timeline(self, timeline: Optional["TrendTimeline"]) -> None:
        self._timeline = timeline
        self._now: Optional[np.ndarray] = None

    def at_moment(self, user: int) -> None:
        timeline = getattr(self, "_timeline", None)
        self._now = None if timeline is None else timeline.at(user)

    def trend_score(self, item_id):
        now = getattr(self, "_now", None)
        if now is None:
            return super().trend_score(item_id)
        return float(now[self._timeline.index[item_id]])

    def trending(self, k, eligible=None):
        now = getattr(self, "_now", None)
        if now is None:
            return super().trending(k, eligible)
        ids = self._timeline.ids
        order = np.argsort(-now, kind="stable")
        out = []
        for i in order:
            if now[i] <= 0 or len(out) >= k:
                break
            if eligible is None or eligible(ids[i]):
                out.append((ids[i], float(now[i])))
        return out

    def release(self) -> None:
        """Drop the memo (its dicts are large) once a segment is done."""
        self._memo = {}
        self._timeline = None
        self._now = None


class TrendTimeline:
    """Per user, the trending scores (`trend_score`, in [0, 1]) a replica would hold at that user's
    request moment: each training event replayed in log order through `InteractionGraph.count_trend`
    (the service's code), read off right after the user's last training event, or at the segment's
    shared moment (time_cutoff) — which is after every training event."""

    def __init__(self, ids: list[str], index: dict[str, int], rows: dict[int, int], values: np.ndarray):
        self.ids, self.index, self.rows, self.values = ids, index, rows, values

    @classmethod
    def build(cls, graph: InteractionGraph, train: TrainData, service: "ServiceEvents") -> "TrendTimeline":
        data = service.data
        events = train.events
        users = data.user[events]
        if train.moment is None:
            last = np.full(data.n_users, -1, dtype=np.int64)
            last[users] = np.arange(events.shape[0])  # later positions overwrite: the last one
        else:
            last = np.where(np.bincount(users, minlength=data.n_users) > 0, events.shape[0] - 1, -1)
        wanted: dict[int, list[int]] = {}
        for user in np.nonzero(last >= 0)[0]:
            wanted.setdefault(int(last[user]), []).append(int(user))
        replay = InteractionGraph(graph.params, graph.weights)
        ids = [item.item_id for item in service.items]
        rows: dict[int, int] = {}
        values = np.zeros((len(wanted), len(ids)), dtype=np.float32)
        taken = 0  # snapshots written
        for position, e in enumerate(events):
            event = service.events[e]
            if event.item_id and event.event_type in CONSUMED:
                replay.count_trend(event.item_id, event.event_time)
            if position in wanted:
                top = replay.trend_top or 1.0
                for item_id, value in replay.trend.items():
                    values[taken, service.alias_to_index[item_id]] = value / top
                for user in wanted[position]:
                    rows[user] = taken
                taken += 1
        return cls(ids, service.alias_to_index, rows, values)

    def at(self, user: int) -> Optional[np.ndarray]:
        row = self.rows.get(user)
        return None if row is None else self.values[row]


class FittedPipeline(Fitted):
    """Profiles, graph and retriever of one training segment."""

    def __init__(self, service: ServiceEvents, retriever: Retriever, profiles: dict[int, ProfileView]):
        self.service = service
        self.retriever = retriever
        self.profiles = profiles

    def set_retrieval(self, config: RetrievalConfig) -> None:
        """Swap the scoring config (blend weights); the fitted graph and profiles stay."""
        self.retriever.config = config

    def recommend(self, users, k, progress=None):
        out = np.full((len(users), k), -1, dtype=np.int64)
        lookup = self.service.alias_to_index
        for row, user in enumerate(users):
            user = int(user)
            view = self.profiles.get(user) or ProfileView(user_id=user_alias(user))
            if isinstance(self.retriever.graph, _FrozenGraph):
                self.retriever.graph.at_moment(user)
            ranked = self.retriever.recommend(RecommendQuery(user_id=view.user_id, page_size=k), view)
            indices = [lookup[s.item_id] for s in ranked]
            out[row, : len(indices)] = indices
            if progress and (row + 1) % 32 == 0:
                progress(32)
        if progress and len(users) % 32:
            progress(len(users) % 32)
        return out


class TastemakerPipeline(Method):
    """The service's profile + graph + ranking code with a given (or tuned) `RetrievalConfig`."""

    kind = "tastemaker"

    def __init__(
        self,
        service: ServiceEvents,
        retrieval: RetrievalConfig,
        profiles: ProfileConfig,
        name: str = "tastemaker",
        use_graph: bool = True,
        description: str = "Tastemaker's full pipeline (service code path), blend weights tuned on validation",
    ):
        self.service = service
        self.retrieval = retrieval
        self.profile_config = profiles
        self.name = name
        self.use_graph = use_graph
        self.description = description

    def fit(self, train: TrainData, params: dict[str, Any]) -> FittedPipeline:
        config, profile_config = configs_for(self.retrieval, self.profile_config, params)
        events = self.service.events
        vectors = self.service.vectors
        states: dict[int, ProfileState] = {}
        data = self.service.data
        for e in train.events:
            user = int(data.user[e])
            state = states.get(user)
            if state is None:
                state = states[user] = ProfileState(user_id=user_alias(user))
            state.apply(events[e], vectors[int(data.item[e])], int(e), profile_config)
        graph: Optional[InteractionGraph] = None
        if self.use_graph:
            graph = _FrozenGraph(graph_params(config), profile_config.weights)
            graph.fit(events[e] for e in train.events)
            graph.freeze()
            graph.set_timeline(TrendTimeline.build(graph, train, self.service))
        retriever = self.service.retriever(config, graph, train.popularity)
        return FittedPipeline(self.service, retriever, {u: s.view() for u, s in states.items()})


def text_only(service: ServiceEvents, base: RetrievalConfig, profiles: ProfileConfig) -> TastemakerPipeline:
    """The zero-shot text model: profile = decayed mean of item vectors; cosine ranking."""
    return TastemakerPipeline(
        service,
        # No exploration slots: the baseline is the text model's own order.
        base.model_copy(update={**TEXT_ONLY_WEIGHTS, "exploration_slots": 0}),
        profiles,
        name="text_zero_shot",
        use_graph=False,
        description="text only, zero-shot: profile = decayed mean of item vectors (ProfileState), cosine ranking",
    )


def coordinate_search(
    evaluate: Callable[[dict[str, Any]], float],
    start: dict[str, Any],
    space: dict[str, list[Any]],
    rounds: int = 2,
    on_trial: Optional[Callable[[dict[str, Any], float], None]] = None,
    seeds: Sequence[dict[str, Any]] = (),
) -> tuple[dict[str, Any], float, list[dict[str, Any]]]:
    """Maximise `evaluate` one field at a time over `space`, for up to `rounds` passes (stopping
    early when a pass changes nothing), starting from the best of `start` and `start` updated
    with each of `seeds`. Ties keep the current value, so the search never wanders on noise.
    Returns (best params, best value, trials)."""
    seen: dict[tuple, float] = {}
    trials: list[dict[str, Any]] = []

    def score(params: dict[str, Any]) -> float:
        key = tuple(sorted(params.items()))
        if key not in seen:
            seen[key] = evaluate(params)
            trials.append({"params": dict(params), "value": seen[key]})
            if on_trial:
                on_trial(params, seen[key])
        return seen[key]

    best = dict(start)
    best_value = score(best)
    for seed in seeds:
        candidate = dict(start, **seed)
        value = score(candidate)
        if value > best_value + 1e-12:
            best, best_value = candidate, value
    for _ in range(rounds):
        changed = False
        for name, values in space.items():
            for value in values:
                if value == best.get(name):
                    continue
                candidate = dict(best, **{name: value})
                value_score = score(candidate)
                if value_score > best_value + 1e-12:
                    best, best_value, changed = candidate, value_score, True
        if not changed:
            break
    return best, best_value, trials

"""`tastemaker bench retrieval`: the candidate + rank step at catalog scale, approximate index vs
exact index, measured in the same process and run.

Data (`--data`): `--items` synthetic 384-d unit vectors, seeded. `mixture` (default): each item
mixes 4 topic directions (items/32 topics, skewed popularity) plus a direction every item shares
and noise; it resembles MiniLM embeddings of MovieLens items (pairwise cosine ~0.4, and how IVF and
HNSW recall behaves for profile queries; see bench/README.md), a little harder. `clusters`:
separated Gaussian clusters (easy for IVF). Users look like profiles: 50 seen items from one to
three topics/clusters, the profile vector their normalised mean, the last 20 as recent history.

Two `tastemaker.retrieval.ranking.Retriever`s are loaded with the same `Item`s through
`Retriever.upsert` in batches of `--batch` (as the retrieval deployment applies the change feed):
one with `RetrievalConfig(index="auto")` (exact up to `exact_max_items`, the PQ index above; or
`--index pq|ivf`) and the baseline with `index="flat"` (exact). Reported, medians of `--runs` runs, the two interleaved:

* build time and memory (index bytes and the process RSS growth) of each;
* recall@100 of the approximate index against the exact one, without and with exclude-seen, and
  the agreement of the final top 10 of `recommend`;
* single-call p50/p99 latency of the whole `Retriever.recommend` (candidates from the index and
  popularity, scoring, selection, reasons) and of the index search alone, for both;
* the same with an attribute filter passing 10 % of the catalog (`bucket` = 3): recall@100 of the
  filtered, exclude-seen search, and p50/p99 of the filtered `recommend`, for both; the filter
  evaluation alone (`Catalog.matching_ids`) and the one-off cost of the index's slot -> row map;
* a cProfile of `recommend`, to show where time goes outside the index.

Everything runs in this process on the machine's CPUs; no Ray, no gRPC, no encoder.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import json
import os
import pstats
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Optional

import numpy as np

DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "retrieval.json"
PAGE_SIZE = 10
RECALL_K = 100

_T0 = time.monotonic()


def progress(message: str) -> None:
    """One progress line on stderr, with the seconds since the benchmark started."""
    print(f"[retrieval {time.monotonic() - _T0:7.1f}s] {message}", file=sys.stderr, flush=True)


def rss_bytes() -> int:
    """Resident set size of this process now (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


# -- data ----------------------------------------------------------------------------------------
def clustered_unit_vectors(
    n: int, dim: int, clusters: int, noise: float, bridge: float, seed: int, common: float = 0.0, block: int = 100_000
) -> tuple[np.ndarray, np.ndarray]:
    """`n` unit float32 vectors around `clusters` random centres, and each vector's cluster.

    Cluster sizes follow 1/sqrt(rank); a `bridge` share of vectors also leans towards a second
    cluster (weight 0.2-0.8); the noise has norm about `noise`. Generated block by block into one
    preallocated matrix (no full-size temporaries)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    weights = 1.0 / np.sqrt(np.arange(1, clusters + 1))
    weights /= weights.sum()
    labels = rng.choice(clusters, size=n, p=weights)
    second = rng.choice(clusters, size=n, p=weights)
    mix = np.where(rng.random(n) < bridge, rng.uniform(0.2, 0.8, n), 0.0).astype(np.float32)
    shared = rng.standard_normal(dim).astype(np.float32)
    shared *= np.float32(common) / np.linalg.norm(shared)
    out = np.empty((n, dim), dtype=np.float32)
    scale = np.float32(noise / np.sqrt(dim))
    for start in range(0, n, block):
        stop = min(n, start + block)
        x = rng.standard_normal((stop - start, dim), dtype=np.float32)
        x *= scale
        x += centres[labels[start:stop]]
        x += mix[start:stop, None] * centres[second[start:stop]]
        x += shared
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        out[start:stop] = x
    return out, labels


def topic_mixture_unit_vectors(
    n: int, dim: int, topics: int, per_item: int, noise: float, common: float, seed: int, block: int = 100_000
) -> tuple[np.ndarray, np.ndarray]:
    """`n` unit float32 vectors, each a mixture of `per_item` of `topics` random topic directions
    (topics drawn with 1/sqrt(rank) popularity, Dirichlet(0.5) weights) plus a direction shared by
    all items (norm `common`) and isotropic noise (norm about `noise`); and each vector's main topic.

    This is the default data: with 32 items per topic, 4 topics per item, noise 1.2 and common 1.2
    it resembles MiniLM embeddings of MovieLens items (pairwise cosine ~0.4, and the recall of
    IVF and HNSW for profile queries at 10k items; see bench/README.md), somewhat harder."""
    rng = np.random.default_rng(seed)
    directions = rng.standard_normal((topics, dim), dtype=np.float32)
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    weights = 1.0 / np.sqrt(np.arange(1, topics + 1))
    weights /= weights.sum()
    shared = rng.standard_normal(dim).astype(np.float32)
    shared *= np.float32(common) / np.linalg.norm(shared)
    out = np.empty((n, dim), dtype=np.float32)
    labels = np.empty(n, dtype=np.int64)
    scale = np.float32(noise / np.sqrt(dim))
    for start in range(0, n, block):
        stop = min(n, start + block)
        m = stop - start
        picks = rng.choice(topics, size=(m, per_item), p=weights)
        mix = rng.dirichlet(np.full(per_item, 0.5), size=m).astype(np.float32)
        x = rng.standard_normal((m, dim), dtype=np.float32)
        x *= scale
        for j in range(per_item):
            x += mix[:, j : j + 1] * directions[picks[:, j]]
        x += shared
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        out[start:stop] = x
        labels[start:stop] = picks[np.arange(m), mix.argmax(axis=1)]
    return out, labels


class Users:
    """Synthetic users: each has seen `seen` items of one to three clusters; profile = their mean."""

    def __init__(self, vectors: np.ndarray, labels: np.ndarray, count: int, seen: int, seed: int):
        from tastemaker.domain import EventType, HistoryEntry, ProfileView

        rng = np.random.default_rng(seed)
        order = np.argsort(labels, kind="stable")
        starts = np.searchsorted(labels[order], np.arange(labels.max() + 2))
        self.profiles: list[ProfileView] = []
        for u in range(count):
            clusters = rng.choice(labels, size=int(rng.integers(1, 4)))
            members = np.concatenate([order[starts[c] : starts[c + 1]] for c in clusters])
            rows = rng.choice(members, size=min(seen, len(members)), replace=False)
            vector = vectors[rows].astype(np.float64).mean(axis=0)
            vector = (vector / np.linalg.norm(vector)).astype(np.float32)
            ids = [item_id(int(r)) for r in rows]
            recent = [
                HistoryEntry(i, EventType.RATING, 4.5, 1.5, float(t)) for t, i in enumerate(ids[-20:])
            ]
            self.profiles.append(ProfileView(user_id=f"u{u}", vector=vector, seen_item_ids=ids, recent=recent))


def item_id(row: int) -> str:
    return f"item{row:07d}"


def make_items(vectors: np.ndarray, labels: np.ndarray) -> list:
    """`Item`s whose vectors are views into `vectors` (no copy); attribute `bucket` = row % 10."""
    from tastemaker.domain import Item

    return [
        Item(item_id=item_id(j), title=f"Item {j}", attributes={"bucket": str(j % 10), "cluster": str(int(c))}, vector=vectors[j])
        for j, c in enumerate(labels.tolist())
    ]


# -- measurement ---------------------------------------------------------------------------------
def build(config, items: list, batch: int):
    """A Retriever loaded through `upsert` in batches; returns it, seconds, RSS growth in bytes."""
    from tastemaker.retrieval.index import create_index
    from tastemaker.retrieval.ranking import Retriever

    gc.collect()
    before = rss_bytes()
    start = time.perf_counter()
    retriever = Retriever(config)
    # Built from the whole config so that every index field (exact_max_items, pq_rerank, ...) counts,
    # whichever form of create_index the Retriever itself calls.
    retriever.index = create_index(config, int(items[0].vector.shape[0]))
    step = batch if batch > 0 else len(items)
    for a in range(0, len(items), step):
        retriever.upsert(items[a : a + step])
    elapsed = time.perf_counter() - start
    gc.collect()
    return retriever, elapsed, rss_bytes() - before


def timed(call: Callable[[object], object], args: list) -> list[float]:
    out = []
    for a in args:
        start = time.perf_counter()
        call(a)
        out.append(time.perf_counter() - start)
    return out


def pct(latencies: list[float], q: float) -> float:
    return float(np.percentile(latencies, q)) * 1000.0


def where_time_goes(retriever, request, profiles, top: int = 12) -> list[dict]:
    """cProfile of `recommend` over `profiles`: the functions with the most cumulative time."""
    profiler = cProfile.Profile()
    profiler.enable()
    for p in profiles:
        retriever.recommend(request, p)
    profiler.disable()
    stats = pstats.Stats(profiler, stream=io.StringIO())
    rows = []
    for (filename, line, name), (_, ncalls, tottime, cumtime, _) in stats.stats.items():  # type: ignore[attr-defined]
        rows.append((cumtime, tottime, ncalls, f"{Path(filename).name}:{line}({name})"))
    rows.sort(reverse=True)
    calls = max(1, len(profiles))
    return [
        {"function": f, "cum_ms_per_recommend": round(c * 1000 / calls, 3), "self_ms_per_recommend": round(t * 1000 / calls, 3), "calls": n}
        for c, t, n, f in rows[:top]
    ]


# -- command -------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tastemaker bench retrieval",
        description=(
            "Recall@100 of the approximate index vs exact, and p50/p99 of the whole candidate+rank step "
            "(Retriever.recommend) with the approximate index vs the exact one, on synthetic clustered "
            "vectors. Writes JSON (see bench/README.md) and prints a table; progress goes to stderr."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    data = parser.add_argument_group("data")
    data.add_argument("--items", type=int, default=1_000_000, help="catalog size")
    data.add_argument("--dim", type=int, default=384, help="vector dimension")
    data.add_argument(
        "--data", choices=["mixture", "clusters"], default="mixture",
        help="mixture: topic mixtures resembling MiniLM item embeddings; clusters: separated Gaussian clusters (easy for IVF)",
    )
    data.add_argument("--topics", type=int, default=None, help="mixture: topic directions; default items/32")
    data.add_argument("--topics-per-item", type=int, default=4, help="mixture: topics mixed into each item")
    data.add_argument("--common", type=float, default=1.2, help="mixture: norm of the direction all items share")
    data.add_argument("--clusters", type=int, default=None, help="clusters: cluster centres; default items/1000")
    data.add_argument("--noise", type=float, default=None, help="norm of the noise (default 1.2 mixture, 1.0 clusters)")
    data.add_argument("--bridge", type=float, default=0.3, help="clusters: share of items mixed with a second cluster")
    data.add_argument("--seen", type=int, default=50, help="seen (excluded) items per user")
    data.add_argument("--batch", type=int, default=50_000, help="items per Retriever.upsert call (0 = all at once)")
    index = parser.add_argument_group("approximate index (RetrievalConfig fields; default = the config's)")
    index.add_argument("--index", default="auto", choices=["auto", "pq", "ivf"], help="RetrievalConfig.index of the measured retriever")
    index.add_argument("--rerank", type=int, default=None, help="pq_rerank")
    index.add_argument("--nlist", type=int, default=None, help="ivf_nlist")
    index.add_argument("--nprobe", type=int, default=None, help="ivf_nprobe")
    index.add_argument("--exact-max-items", type=int, default=None, help="exact_max_items")
    load = parser.add_argument_group("measurement")
    load.add_argument("--queries", type=int, default=100, help="profile queries for recall")
    load.add_argument("--requests", type=int, default=200, help="timed recommend calls per retriever per run")
    load.add_argument("--warmup", type=int, default=10, help="untimed calls before the runs")
    load.add_argument("--runs", type=int, default=3, help="repetitions; medians are reported")
    load.add_argument("--filtered-requests", type=int, default=200, help="timed calls with a 10 %% attribute filter per retriever per run (0 = skip)")
    load.add_argument("--profile-requests", type=int, default=30, help="recommend calls under cProfile (0 = skip)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help=f"output file (default {DEFAULT_JSON})")
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.items < 1_000 or args.requests < 1 or args.runs < 1 or args.queries < 1:
        parser.error("need --items >= 1000 and positive --requests, --runs, --queries")

    import faiss

    from tastemaker.config import RetrievalConfig
    from tastemaker.domain import AttributeCondition, RecommendQuery
    from tastemaker.retrieval.ann import IVFIndex
    from tastemaker_bench.e2e import host_block

    started = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    load_before = round(os.getloadavg()[0], 2)
    json_path = Path(args.json) if args.json else DEFAULT_JSON
    overrides = {"index": args.index}
    for field, value in (
        ("pq_rerank", args.rerank),
        ("ivf_nlist", args.nlist),
        ("ivf_nprobe", args.nprobe),
        ("exact_max_items", args.exact_max_items),
    ):
        if value is not None:
            overrides[field] = value
    approx_config = RetrievalConfig(**overrides)
    exact_config = RetrievalConfig(index="flat")

    if args.data == "mixture":
        noise = 1.2 if args.noise is None else args.noise
        groups = args.topics or max(8, args.items // 32)
        data_params = {"data": "mixture", "topics": groups, "topics_per_item": args.topics_per_item, "noise": noise, "common": args.common}
        progress(f"generating {args.items} x {args.dim} unit vectors mixing {args.topics_per_item} of {groups} topics")
        vectors, labels = topic_mixture_unit_vectors(
            args.items, args.dim, groups, args.topics_per_item, noise, args.common, args.seed
        )
    else:
        noise = 1.0 if args.noise is None else args.noise
        groups = args.clusters or max(8, args.items // 1000)
        data_params = {"data": "clusters", "clusters": groups, "noise": noise, "bridge": args.bridge}
        progress(f"generating {args.items} x {args.dim} clustered unit vectors ({groups} clusters)")
        vectors, labels = clustered_unit_vectors(args.items, args.dim, groups, noise, args.bridge, args.seed)
    items = make_items(vectors, labels)
    users = Users(vectors, labels, args.requests, args.seen, seed=args.seed + 1).profiles
    recall_users = Users(vectors, labels, args.queries, args.seen, seed=args.seed + 2).profiles
    # Popularity: a Zipf-like count for a tenth of the catalog, the same for both retrievers.
    rng = np.random.default_rng(args.seed + 3)
    popular_rows = rng.choice(args.items, size=max(1, args.items // 10), replace=False)
    popularity = {item_id(int(r)): int(1000 / (rank + 1)) + 1 for rank, r in enumerate(popular_rows)}

    progress(f"building the approximate retriever ({approx_config.index}) in batches of {args.batch}")
    approx, approx_build_s, approx_rss = build(approx_config, items, args.batch)
    index = approx.index
    lists = index.lists if isinstance(index, IVFIndex) else 0
    structure = type(index).__name__ + ("" if getattr(index, "approximate", False) else " (searching exactly)")
    progress(f"built in {approx_build_s:.1f} s; {structure}; RSS +{approx_rss / 2**20:.0f} MiB")
    progress(f"building the exact retriever (flat) in batches of {args.batch}")
    exact, exact_build_s, exact_rss = build(exact_config, items, args.batch)
    progress(f"built in {exact_build_s:.1f} s; RSS +{exact_rss / 2**20:.0f} MiB")
    for r in (approx, exact):
        r.catalog.set_popularity(popularity)

    request = RecommendQuery(user_id="u", page_size=PAGE_SIZE)
    filtered_request = RecommendQuery(
        user_id="u", page_size=PAGE_SIZE, filter=[AttributeCondition("bucket", any_of=["3"])]
    )
    row_map_s = {}
    for name, retriever in (("approx", approx), ("exact", exact)):
        # The first filtered search maps every index slot to a catalog row (one dict lookup per
        # item); later ones follow only the changes. Timed once here, outside the runs.
        start = time.perf_counter()
        retriever.index.slot_rows(retriever.catalog)
        row_map_s[name] = time.perf_counter() - start
    progress(f"slot -> row maps built in {row_map_s['approx'] * 1000:.0f} / {row_map_s['exact'] * 1000:.0f} ms")
    progress(f"warming up ({args.warmup} calls each)")
    for p in users[: args.warmup]:
        approx.recommend(request, p)
        exact.recommend(request, p)
        approx.recommend(filtered_request, p)
        exact.recommend(filtered_request, p)

    progress(f"recall@{RECALL_K} over {args.queries} profile queries")
    recalls, recalls_seen, recalls_filtered, agreement = [], [], [], []
    for p in recall_users:
        seen = set(p.seen_item_ids)
        for out, excluded, conditions in (
            (recalls, None, None),
            (recalls_seen, seen, None),
            (recalls_filtered, seen, filtered_request.filter),
        ):
            allowed_exact = exact.catalog.matching_ids(conditions) if conditions else None
            allowed_approx = approx.catalog.matching_ids(conditions) if conditions else None
            want = {i for i, _ in exact.index.search(p.vector, RECALL_K, allowed_exact, excluded)}
            got = {i for i, _ in approx.index.search(p.vector, RECALL_K, allowed_approx, excluded)}
            out.append(len(want & got) / len(want))
        top_exact = {s.item_id for s in exact.recommend(request, p)}
        top_approx = {s.item_id for s in approx.recommend(request, p)}
        agreement.append(len(top_exact & top_approx) / max(1, len(top_exact)))
    progress(
        f"recall@{RECALL_K} {np.mean(recalls):.4f} (min {np.min(recalls):.2f}); excluding seen "
        f"{np.mean(recalls_seen):.4f}; filtered and excluding seen {np.mean(recalls_filtered):.4f}"
    )

    pool = approx_config.candidate_pool
    runs = []
    for run in range(1, args.runs + 1):
        result = {}
        order = [("approx", approx), ("exact", exact)]
        if run % 2 == 0:  # alternate which goes first, so drift in the machine's load hits both
            order.reverse()
        for name, retriever in order:
            result[f"{name}_recommend"] = timed(lambda p, r=retriever: r.recommend(request, p), users)
            result[f"{name}_search"] = timed(
                lambda p, r=retriever: r.index.search(p.vector, pool, None, set(p.seen_item_ids)), users
            )
            progress(
                f"run {run}/{args.runs} {name}: recommend p50 {pct(result[f'{name}_recommend'], 50):.2f} ms "
                f"p99 {pct(result[f'{name}_recommend'], 99):.2f} ms; index search p50 "
                f"{pct(result[f'{name}_search'], 50):.2f} ms p99 {pct(result[f'{name}_search'], 99):.2f} ms"
            )
            if args.filtered_requests > 0:
                some = users[: args.filtered_requests]
                result[f"{name}_filtered"] = timed(lambda p, r=retriever: r.recommend(filtered_request, p), some)
                progress(
                    f"run {run}/{args.runs} {name}: filtered (10 % of items) recommend p50 "
                    f"{pct(result[f'{name}_filtered'], 50):.2f} ms p99 {pct(result[f'{name}_filtered'], 99):.2f} ms"
                )
        if args.filtered_requests > 0:
            result["matching_ids"] = timed(lambda p: approx.catalog.matching_ids(filtered_request.filter), users[:50])
        runs.append(result)

    profile_rows: list[dict] = []
    if args.profile_requests > 0:
        profile_rows = where_time_goes(approx, request, users[: args.profile_requests])
        progress("cProfile of recommend with the approximate index (cumulative ms per call):")
        for row in profile_rows:
            progress(f"  {row['cum_ms_per_recommend']:9.3f}  {row['function']}")

    load_after = round(os.getloadavg()[0], 2)

    def med(key: str, q: float) -> float:
        return float(statistics.median(pct(r[key], q) for r in runs))

    def fig(name, value, unit, baseline=None, baseline_value=None, ratio=None) -> dict:
        out = {"name": name, "value": round(float(value), 4), "unit": unit}
        if baseline is not None:
            out.update(baseline=baseline, baseline_value=round(float(baseline_value), 4), ratio=round(float(ratio), 3))
        return out

    a50, a99 = med("approx_recommend", 50), med("approx_recommend", 99)
    e50, e99 = med("exact_recommend", 50), med("exact_recommend", 99)
    s50, s99 = med("approx_search", 50), med("approx_search", 99)
    es50, es99 = med("exact_search", 50), med("exact_search", 99)
    mib = 2**20
    figures = [
        fig("recall_at_100", np.mean(recalls), "fraction", "exact_recall_at_100", 1.0, np.mean(recalls)),
        fig("recall_at_100_min", np.min(recalls), "fraction"),
        fig("recall_at_100_excluding_seen", np.mean(recalls_seen), "fraction", "exact_recall_at_100", 1.0, np.mean(recalls_seen)),
        fig("recommend_top10_agreement_vs_exact", np.mean(agreement), "fraction"),
        fig("recommend_p50_ms", a50, "ms"),
        fig("recommend_p99_ms", a99, "ms"),
        fig("exact_recommend_p50_ms", e50, "ms"),
        fig("exact_recommend_p99_ms", e99, "ms"),
        fig("recommend_p50_speedup_vs_exact", e50 / a50, "x", "exact_recommend_p50_ms", e50, e50 / a50),
        fig("recommend_p99_speedup_vs_exact", e99 / a99, "x", "exact_recommend_p99_ms", e99, e99 / a99),
        fig("index_search_p50_ms", s50, "ms"),
        fig("index_search_p99_ms", s99, "ms"),
        fig("exact_index_search_p50_ms", es50, "ms"),
        fig("exact_index_search_p99_ms", es99, "ms"),
        fig("index_search_p50_speedup_vs_exact", es50 / s50, "x", "exact_index_search_p50_ms", es50, es50 / s50),
        fig("recommend_p50_outside_index_ms", a50 - s50, "ms"),
        fig("build_s", approx_build_s, "s", "exact_build_s", exact_build_s, exact_build_s / approx_build_s),
        fig("exact_build_s", exact_build_s, "s"),
        fig("index_mib", index.memory_bytes() / mib, "MiB", "exact_index_mib", exact.index.memory_bytes() / mib,
            exact.index.memory_bytes() / index.memory_bytes()),
        fig("exact_index_mib", exact.index.memory_bytes() / mib, "MiB"),
        fig("build_rss_delta_mib", approx_rss / mib, "MiB"),
        fig("exact_build_rss_delta_mib", exact_rss / mib, "MiB"),
    ]
    if lists:
        figures.append(fig("ivf_lists", lists, "lists"))
    if args.filtered_requests > 0:
        f50, f99 = med("approx_filtered", 50), med("approx_filtered", 99)
        ef50, ef99 = med("exact_filtered", 50), med("exact_filtered", 99)
        figures += [
            fig("recall_at_100_filtered_excluding_seen", np.mean(recalls_filtered), "fraction", "exact_recall_at_100", 1.0,
                np.mean(recalls_filtered)),
            fig("filtered_recommend_p50_ms", f50, "ms"),
            fig("filtered_recommend_p99_ms", f99, "ms"),
            fig("exact_filtered_recommend_p50_ms", ef50, "ms"),
            fig("exact_filtered_recommend_p99_ms", ef99, "ms"),
            fig("filtered_recommend_p50_speedup_vs_exact", ef50 / f50, "x", "exact_filtered_recommend_p50_ms", ef50, ef50 / f50),
            fig("filtered_recommend_p99_speedup_vs_exact", ef99 / f99, "x", "exact_filtered_recommend_p99_ms", ef99, ef99 / f99),
            fig("catalog_matching_ids_p50_ms", med("matching_ids", 50), "ms"),
            fig("filter_row_map_build_ms", row_map_s["approx"] * 1000, "ms"),
        ]
    params = {
        "items": args.items,
        "dim": args.dim,
        **data_params,
        "seen": args.seen,
        "batch": args.batch,
        "approx_config": {
            k: getattr(approx_config, k)
            for k in ("index", "exact_max_items", "pq_rerank", "pq_subquantizers", "ivf_nlist", "ivf_nprobe", "candidate_pool")
        },
        "approx_structure": structure,
        "baseline_config": {"index": "flat"},
        "page_size": PAGE_SIZE,
        "queries": args.queries,
        "requests": args.requests,
        "warmup": args.warmup,
        "runs": args.runs,
        "aggregate": "median of runs (latencies); recall over all queries",
        "filtered_requests": args.filtered_requests,
        "seed": args.seed,
        "faiss": faiss.__version__,
        "numpy": np.__version__,
        "load_avg_1m_before": load_before,
        "load_avg_1m_after": load_after,
    }
    report = {
        "benchmark": "retrieval",
        "started": started,
        "host": host_block(),
        "params": params,
        "figures": figures,
        "where_time_goes": profile_rows,
    }
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    progress(f"wrote {json_path}")
    print(f"retrieval: {args.items} items x {args.dim} ({args.data}), approximate = {structure}, {args.runs} runs (medians)")
    print(f"{'':28s}{'approximate':>14s}{'exact':>12s}")
    print(f"{'recommend p50 / p99 ms':28s}{a50:7.2f} /{a99:6.2f}{e50:7.1f} /{e99:6.1f}")
    print(f"{'index search p50 / p99 ms':28s}{s50:7.2f} /{s99:6.2f}{es50:7.1f} /{es99:6.1f}")
    print(f"{'build s':28s}{approx_build_s:14.1f}{exact_build_s:12.1f}")
    print(f"{'index MiB':28s}{index.memory_bytes() / mib:14.0f}{exact.index.memory_bytes() / mib:12.0f}")
    if args.filtered_requests > 0:
        print(f"{'filtered recommend p50/p99':28s}{f50:7.2f} /{f99:6.2f}{ef50:7.1f} /{ef99:6.1f}")
    print(f"recall@100 {np.mean(recalls):.4f} (min {np.min(recalls):.2f}), excluding seen {np.mean(recalls_seen):.4f}, "
          f"filtered {np.mean(recalls_filtered):.4f}; "
          f"top-10 agreement {np.mean(agreement):.3f}; p50 speedup {e50 / a50:.1f}x, p99 speedup {e99 / a99:.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""`tastemaker bench freshness`: how fast events are acknowledged, how many per second the service
takes, and how soon an acknowledged event is visible to `Recommend` — against a bare Serve
bidirectional stream measured in the same run.

The benchmark is self-contained, like `tastemaker bench e2e`: it starts its own service in-process
(temporary data directory, free ports, local Ray with all of the machine's CPUs), loads a small
MovieLens subsample through the public API (so the items that events refer to exist), and deploys
the echo application (`bench/echo.py`, whose `StreamUserEvents` acknowledges every event at once
without storing it) into the same Serve instance. Then, `--runs` times:

* **A — ack latency at a fixed rate.** One `StreamUserEvents` bidi stream (the generated stub,
  fed by a request generator that gRPC runs on its own thread, so this benchmark controls when
  every message leaves) carries CLICK events of `--users-streamed` synthetic users on loaded items
  at `--rate` events/s for `--warmup` + `--duration` seconds (open loop: events are due on a fixed
  schedule whether or not earlier ones were acknowledged). Events are batched into messages by a
  linger of `--linger-ms` after the first due event (at most `--max-batch` events per message).
  Per event: due time, send time (the message handed to gRPC) and ack time (its response read by
  the client). Reported: ack latency p50/p99 from send, the same from the due time (includes the
  linger), and the achieved events/s. The same stream shape against the echo is the baseline.
  Messages leave on that schedule whatever the acks; nothing pushes back on small messages, so a
  server slower than the message rate builds a queue. A second variant (`--fixed-inflight`,
  figures `capped_*`) adds backpressure: a message also waits until fewer than N messages are
  unacknowledged and takes every event that fell due meanwhile, so batches grow with the load.
* **B — sustained throughput.** Messages of `--batch` events sent as fast as the stream takes
  them, with at most `--inflight` messages unacknowledged, for `--duration` seconds: CLICK events
  (no text) and REVIEW events (a ~30-word synthetic review text and rating 4 each; every text is
  encoded by the encoder pool), for the service and for the echo. events/s = acknowledged events /
  (last ack - first send): the stream is drained after the deadline so every sent event counts.
* **C — ack → visible.** On a separate channel, `--visible-samples` times: one CLICK of a fresh
  user by unary `WriteUserEvents`, take the ack's `profile_version` v, then at once
  `Recommend(user, min_profile_version=v)`; the time from the ack to that Recommend's answer, and
  whether its `profile_version` >= v (`stale_reads` counts the answers below v; must be 0). An
  echo `Recommend` per sample gives the bare unary round trip for comparison.

It reports the median of the runs as JSON (conventions in /work/shared/design/bench.md and
bench/README.md) plus a short table on stdout. Progress goes to stderr. The service is always
stopped at the end. The load generator runs in this process, on the same machine as the service.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np

#: Default output: bench/results/freshness.json in the source tree.
DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "freshness.json"

#: The issue's targets, quoted in params for reference (the figures are compared in the table).
TARGETS = {
    "events_per_s_no_text_min": 2000.0,
    "ack_p99_ms_max_at_500_events_per_s": 50.0,
    "visible_p99_ms_max": 100.0,
}

#: Events per throughput stream built before its clock starts: the echo cycles through its pool;
#: the service (unique event ids) gets new messages built while sending once its pool is used up.
PREBUILT_EVENTS = {"echo": 100_000, "service_click": 150_000, "service_review": 10_000}

PAGE_SIZE = 10
REVIEW_RATING = 4.0

_T0 = time.monotonic()


#: The admin key of the benchmark's own service (auth is on by default), set in main().
_API_KEY: Optional[str] = None

def progress(message: str) -> None:
    """One progress line on stderr, with the seconds since the benchmark started."""
    print(f"[freshness {time.monotonic() - _T0:7.1f}s] {message}", file=sys.stderr, flush=True)


# -- synthetic reviews ---------------------------------------------------------------------------
_OPENINGS = (
    "I watched this with my family last weekend and",
    "Honestly I did not expect much from this film but",
    "After hearing so much about it from friends",
    "We rented this on a rainy evening and",
    "As a long time fan of the director",
    "My partner picked this one and",
)
_MIDDLES = (
    "the story kept us hooked until the end",
    "the acting felt convincing, real and warm",
    "the soundtrack and photography were simply beautiful",
    "the middle dragged but the finale made up",
    "the jokes landed and the kids laughed",
    "the plot had twists I never saw coming",
)
_CLOSINGS = (
    "I would happily watch it again soon.",
    "Recommended for anyone who likes a good adventure.",
    "Not perfect, yet well worth an evening.",
    "Four stars from me and a big smile.",
    "A solid pick for a quiet night in.",
    "Definitely one of the better ones this year.",
)


def review_texts(rng: np.random.Generator, n: int) -> list[str]:
    """`n` texts of about 30 words of plausible review, assembled from the phrase lists above
    (the encoder has no cache, so repeats cost as much as new texts)."""
    o = rng.integers(len(_OPENINGS), size=n)
    m = rng.integers(len(_MIDDLES), size=(n, 2))
    c = rng.integers(len(_CLOSINGS), size=n)
    return [
        f"{_OPENINGS[o[k]]} {_MIDDLES[m[k, 0]]}, and {_MIDDLES[m[k, 1]]}. {_CLOSINGS[c[k]]}" for k in range(n)
    ]


# -- measurement ---------------------------------------------------------------------------------
def _pct(values, q: float) -> float:
    """Percentile in ms of seconds; NaN without values."""
    return float(np.percentile(values, q)) * 1000.0 if len(values) else float("nan")


@dataclass
class AckCounts:
    accepted: int = 0
    duplicate: int = 0
    rejected: int = 0
    other: int = 0
    first_reject_reason: Optional[str] = None

    def add(self, ack) -> None:
        from tastemaker.v1 import recommender_service_pb2 as pb

        if ack.status == pb.EVENT_STATUS_ACCEPTED:
            self.accepted += 1
        elif ack.status == pb.EVENT_STATUS_DUPLICATE:
            self.duplicate += 1
        elif ack.status == pb.EVENT_STATUS_REJECTED:
            self.rejected += 1
            if self.first_reject_reason is None:
                self.first_reject_reason = ack.reason
        else:
            self.other += 1


@dataclass
class FixedRate:
    """Phase A on one target: latencies of the events due after the warm-up."""

    ack_from_send_s: np.ndarray
    ack_from_due_s: np.ndarray
    events_per_s: float
    sent: int
    acked: int
    messages: int
    counts: AckCounts
    error: Optional[str] = None

    @property
    def mean_events_per_message(self) -> float:
        """Over the whole stream, warm-up included."""
        return self.sent / self.messages if self.messages else float("nan")


@dataclass
class Throughput:
    """Phase B on one target and event kind."""

    events_per_s: float
    sent: int
    acked: int
    messages: int
    elapsed_s: float
    message_latency_s: list[float]
    counts: AckCounts
    error: Optional[str] = None


@dataclass
class Visible:
    """Phase C."""

    visible_s: list[float]
    write_s: list[float]
    echo_s: list[float]
    stale_reads: int = 0
    errors: int = 0
    rejected: int = 0
    first_error: Optional[str] = None


def _sleep_until(t: float) -> None:
    while True:
        remaining = t - time.perf_counter()
        if remaining <= 0:
            return
        time.sleep(remaining if remaining < 0.002 else remaining - 0.0005)


def _rpc_error_text(exc) -> str:
    try:
        return f"{exc.code().name}: {exc.details()}"
    except Exception:  # noqa: BLE001 - a non-call RpcError
        return repr(exc)


def fixed_rate_stream(
    stub,
    make_event: Callable[[int], object],
    rate: float,
    duration_s: float,
    warmup_s: float,
    linger_s: float,
    max_batch: int,
    inflight: Optional[int] = None,
) -> FixedRate:
    """Open-loop schedule: event j is due at t0 + j/rate; a message leaves `linger_s` after its first
    event was due (or when `max_batch` events are due), carrying every event due by then (at most
    `max_batch`). If the stream falls behind, later messages catch up with all overdue events.

    `inflight` None: messages leave on that schedule whatever the acks (what the brief's producer
    does; nothing in gRPC or the Serve proxy pushes back on small messages, so they queue up at the
    server if it is slower). `inflight` k: a message also waits until fewer than k are unacknowledged,
    and the events that fall due meanwhile go into it (a producer with backpressure)."""
    import grpc

    from tastemaker.v1 import recommender_service_pb2 as pb

    n_total = int(round(rate * (warmup_s + duration_s)))
    due = np.full(n_total, np.nan)
    sent = np.full(n_total, np.nan)
    acked = np.full(n_total, np.nan)
    index: dict[str, int] = {}
    messages_sent = [0]
    t0_box = [0.0]
    window = threading.Semaphore(inflight) if inflight else None
    stop = threading.Event()

    def messages() -> Iterator[object]:
        t0 = t0_box[0] = time.perf_counter() + 0.05
        i = 0
        while i < n_total:
            first_due = t0 + i / rate
            send_at = min(first_due + linger_s, t0 + (i + max_batch - 1) / rate)
            _sleep_until(send_at)
            if window is not None:
                while not window.acquire(timeout=0.1):
                    if stop.is_set():
                        return
            now = time.perf_counter()
            batch = []
            j = i
            while j < n_total and len(batch) < max_batch and t0 + j / rate <= now:
                event = make_event(j)
                index[event.event_id] = j
                due[j] = t0 + j / rate
                batch.append(event)
                j += 1
            request = pb.StreamUserEventsRequest(events=batch)
            sent[i:j] = time.perf_counter()
            messages_sent[0] += 1
            i = j
            yield request

    counts = AckCounts()
    error = None
    call = stub.StreamUserEvents(messages(), timeout=warmup_s + duration_s + 600.0)
    try:
        for response in call:
            t = time.perf_counter()
            for ack in response.acks:
                j = index.get(ack.event_id)
                if j is not None:
                    acked[j] = t
                counts.add(ack)
            if window is not None:
                window.release()
    except grpc.RpcError as exc:
        error = _rpc_error_text(exc)
    finally:
        stop.set()

    measured = due >= t0_box[0] + warmup_s
    done = measured & ~np.isnan(acked)
    ack_from_send = (acked - sent)[done]
    ack_from_due = (acked - due)[done]
    if done.any():
        window = float(np.nanmax(acked[done])) - (t0_box[0] + warmup_s)
        events_per_s = int(done.sum()) / window if window > 0 else float("nan")
    else:
        events_per_s = float("nan")
    return FixedRate(
        ack_from_send_s=ack_from_send,
        ack_from_due_s=ack_from_due,
        events_per_s=events_per_s,
        sent=int((~np.isnan(sent)).sum()),
        acked=int(done.sum()),
        messages=messages_sent[0],
        counts=counts,
        error=error,
    )


def max_rate_stream(
    stub,
    make_message: Callable[[int], tuple[object, int]],
    duration_s: float,
    inflight: int,
    prebuilt: int,
    cycle: bool = False,
) -> Throughput:
    """Closed loop: at most `inflight` messages unacknowledged; new messages until `duration_s`
    after the first one left, then drain. `prebuilt` messages are built before the clock starts, so
    building them costs the measured window nothing; past them, messages are built while sending,
    or (`cycle`, for the echo, which stores nothing) the prebuilt ones are sent again."""
    import grpc

    pool = [make_message(k) for k in range(prebuilt)]

    window = threading.Semaphore(inflight)
    stop = threading.Event()
    send_times: list[float] = []
    sent_events = [0]
    clock = {"start": 0.0, "deadline": math.inf}

    def messages() -> Iterator[object]:
        k = 0
        while True:
            while not window.acquire(timeout=0.1):
                if stop.is_set():
                    return
            now = time.perf_counter()
            if k == 0:
                clock["start"] = now
                clock["deadline"] = now + duration_s
            elif now >= clock["deadline"] or stop.is_set():
                return
            if k < len(pool):
                message, n = pool[k]
            elif cycle and pool:
                message, n = pool[k % len(pool)]
            else:
                message, n = make_message(k)
            k += 1
            send_times.append(time.perf_counter())
            sent_events[0] += n
            yield message

    counts = AckCounts()
    error = None
    acked = 0
    received = 0
    last_ack = 0.0
    latencies: list[float] = []
    call = stub.StreamUserEvents(messages(), timeout=duration_s + 300.0)
    try:
        for response in call:
            last_ack = time.perf_counter()
            latencies.append(last_ack - send_times[received])
            received += 1
            acked += len(response.acks)
            for ack in response.acks:
                counts.add(ack)
            window.release()
    except grpc.RpcError as exc:
        error = _rpc_error_text(exc)
    finally:
        stop.set()
    elapsed = last_ack - clock["start"] if received else float("nan")
    return Throughput(
        events_per_s=acked / elapsed if received and elapsed > 0 else float("nan"),
        sent=sent_events[0],
        acked=acked,
        messages=received,
        elapsed_s=elapsed,
        message_latency_s=latencies,
        counts=counts,
        error=error,
    )


def measure_visible(service, echo, item_ids: list[str], samples: int, prefix: str, rng) -> Visible:
    """One fresh user per sample: unary write of one CLICK, then Recommend(min_profile_version=v)."""
    import grpc

    from tastemaker.v1 import recommender_service_pb2 as pb

    result = Visible([], [], [])
    for k in range(samples):
        user = f"{prefix}-u{k}"
        item = item_ids[int(rng.integers(len(item_ids)))]
        event = pb.UserEvent(event_id=f"{prefix}-e{k}", user_id=user, event_type=pb.EVENT_TYPE_CLICK, item_id=item)
        try:
            start = time.perf_counter()
            reply = service.stub.WriteUserEvents(pb.WriteUserEventsRequest(events=[event]), timeout=service.timeout_s)
            acked = time.perf_counter()
            ack = reply.acks[0]
            if ack.status != pb.EVENT_STATUS_ACCEPTED:
                result.rejected += 1
                if result.first_error is None:
                    result.first_error = f"ack status {pb.EventStatus.Name(ack.status)}: {ack.reason}"
                continue
            version = ack.profile_version
            answer = service.recommend(user, page_size=PAGE_SIZE, min_profile_version=version)
            done = time.perf_counter()
        except grpc.RpcError as exc:
            result.errors += 1
            if result.first_error is None:
                result.first_error = _rpc_error_text(exc)
            continue
        result.write_s.append(acked - start)
        result.visible_s.append(done - acked)
        if answer.profile_version < version:
            result.stale_reads += 1
        # The bare unary round trip, interleaved so drift in the machine's load hits both.
        start = time.perf_counter()
        echo.recommend(user, page_size=PAGE_SIZE)
        result.echo_s.append(time.perf_counter() - start)
    return result


# -- arguments -----------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tastemaker bench freshness",
        description=(
            "Event ack latency at a fixed rate, sustained events/s (with and without review text) and "
            "ack->visible latency (WriteUserEvents then Recommend(min_profile_version)), against a bare "
            "Serve bidirectional stream (an echo deployment on the same proto, in the same Serve "
            "instance). Starts and stops its own service; writes JSON (see bench/README.md) and prints "
            "a table; progress goes to stderr."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    data = parser.add_argument_group("data (MovieLens latest-small, loaded through the public API)")
    data.add_argument("--items", type=int, default=500, help="catalog size: the most-rated items kept by subsample()")
    data.add_argument("--users", type=int, default=50, help="users kept by subsample() (with their ratings)")
    data.add_argument("--movielens-path", help="MovieLens folder; None = the vendored copy in data/")
    a = parser.add_argument_group("phase A: ack latency at a fixed rate (one bidi stream)")
    a.add_argument("--rate", type=float, default=500.0, help="events per second, on a fixed (open-loop) schedule")
    a.add_argument("--users-streamed", type=int, default=200, help="synthetic user ids the events cycle through")
    a.add_argument("--linger-ms", type=float, default=5.0, help="a message leaves this long after its first event is due")
    a.add_argument("--max-batch", type=int, default=200, help="at most this many events per message")
    a.add_argument("--warmup", type=float, default=1.0, help="seconds at the start of each fixed-rate stream not recorded")
    a.add_argument(
        "--fixed-inflight",
        type=int,
        default=1,
        help="also run phase A with backpressure: a message waits until fewer than this many are "
        "unacknowledged, and takes every event due meanwhile (figures capped_*); 0 = skip this variant",
    )
    b = parser.add_argument_group("phase B: sustained throughput (one bidi stream, as fast as it takes messages)")
    b.add_argument("--batch", type=int, default=500, help="events per message")
    b.add_argument("--inflight", type=int, default=4, help="messages sent but not yet acknowledged, at most")
    c = parser.add_argument_group("phase C: ack -> visible (unary WriteUserEvents, then Recommend)")
    c.add_argument("--visible-samples", type=int, default=100, help="fresh users, one event and one Recommend each")
    run = parser.add_argument_group("runs")
    run.add_argument("--duration", type=float, default=10.0, help="seconds of each phase-A and phase-B stream")
    run.add_argument("--runs", type=int, default=1, help="repetitions of every phase; medians are reported")
    run.add_argument("--seed", type=int, default=0, help="seed of the item choices and review texts")
    out = parser.add_argument_group("service and output")
    out.add_argument(
        "--store-url",
        default=None,
        help="the service's store: postgresql://user:password@host:port/db (an empty database or schema: the "
        "benchmark loads its data into it) or sqlite:////abs/path.db; None = SQLite in the temporary data dir",
    )
    out.add_argument(
        "--config",
        help="service YAML config to benchmark (data dir, ports and Ray address are set by the benchmark; "
        "environment variables are ignored so runs are reproducible)",
    )
    out.add_argument(
        "--json",
        default=None,
        help="where to write the JSON result (folders are created); None = bench/results/freshness.json",
    )
    return parser


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for name in ("items", "users", "users_streamed", "max_batch", "batch", "inflight", "visible_samples", "runs"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    for name in ("rate", "duration"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name} must be > 0")
    for name in ("linger_ms", "warmup", "fixed_inflight"):
        if getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must be >= 0")
    if args.batch > 5000 or args.max_batch > 5000:
        parser.error("--batch and --max-batch must be <= 5000 (the API's limit per message)")


# -- one run -------------------------------------------------------------------------------------
@dataclass
class RunResult:
    fixed: dict[str, FixedRate] = field(default_factory=dict)  # "service", "echo"
    throughput: dict[str, Throughput] = field(default_factory=dict)  # "service_click", "echo_review", ...
    visible: Optional[Visible] = None


def _one_run(run: int, args, target: str, app_name: str, echo_name: str, item_ids: list[str]) -> RunResult:
    from tastemaker.client import TastemakerClient
    from tastemaker.v1 import recommender_service_pb2 as pb

    result = RunResult()
    tag = f"bench-fresh-r{run}-{int(time.time())}"  # unique across runs and across invocations
    rng = np.random.default_rng([args.seed, run])
    application = {"service": app_name, "echo": echo_name}

    # A: fixed rate. Echo and service take turns; the items of event j are drawn up front.
    n_a = int(round(args.rate * (args.warmup + args.duration)))
    items_a = rng.integers(len(item_ids), size=n_a)
    variants = [("echo", None), ("service", None)]
    if args.fixed_inflight:
        variants += [("echo_capped", args.fixed_inflight), ("service_capped", args.fixed_inflight)]
    for key, inflight in variants:
        who = key.split("_")[0]
        prefix = f"{tag}-a-{key}"

        def make_event(j: int, prefix=prefix):
            return pb.UserEvent(
                event_id=f"{prefix}-e{j}",
                user_id=f"{prefix}-u{j % args.users_streamed}",
                event_type=pb.EVENT_TYPE_CLICK,
                item_id=item_ids[int(items_a[j])],
            )

        cap = f", <= {inflight} unacknowledged" if inflight else ""
        progress(
            f"run {run}/{args.runs}: A {key}: {args.rate:g} events/s for {args.warmup:g}+{args.duration:g} s, "
            f"linger {args.linger_ms:g} ms, <= {args.max_batch} per message{cap}"
        )
        with TastemakerClient(target, api_key=_API_KEY, timeout_s=30, application=application[who]) as client:
            m = fixed_rate_stream(
                client.stub,
                make_event,
                args.rate,
                args.duration,
                args.warmup,
                args.linger_ms / 1000.0,
                args.max_batch,
                inflight,
            )
        result.fixed[key] = m
        note = f"; stream error {m.error}" if m.error else ""
        note += f"; {m.counts.rejected} rejected (first: {m.counts.first_reject_reason})" if m.counts.rejected else ""
        progress(
            f"run {run}/{args.runs}: A {key}: ack p50 {_pct(m.ack_from_send_s, 50):.2f} ms, p99 "
            f"{_pct(m.ack_from_send_s, 99):.2f} ms (from due: p99 {_pct(m.ack_from_due_s, 99):.2f} ms), "
            f"{m.events_per_s:.1f} events/s, {m.mean_events_per_message:.1f} events/message{note}"
        )

    # B: throughput. Per kind, echo then service, with messages of the same shape.
    for kind in ("click", "review"):
        for who in ("echo", "service"):
            prefix = f"{tag}-b-{kind}-{who}"
            msg_rng = np.random.default_rng([args.seed, run, 1 if kind == "click" else 2])

            def make_message(k: int, prefix=prefix, kind=kind, msg_rng=msg_rng):
                events = []
                texts = review_texts(msg_rng, args.batch) if kind == "review" else None
                for e in range(args.batch):
                    j = k * args.batch + e
                    item = item_ids[int(msg_rng.integers(len(item_ids)))]
                    user = f"{prefix}-u{j % args.users_streamed}"
                    if kind == "click":
                        events.append(
                            pb.UserEvent(event_id=f"{prefix}-e{j}", user_id=user, event_type=pb.EVENT_TYPE_CLICK, item_id=item)
                        )
                    else:
                        events.append(
                            pb.UserEvent(
                                event_id=f"{prefix}-e{j}",
                                user_id=user,
                                event_type=pb.EVENT_TYPE_REVIEW,
                                item_id=item,
                                value=REVIEW_RATING,
                                text=texts[e],
                            )
                        )
                return pb.StreamUserEventsRequest(events=events), len(events)

            progress(
                f"run {run}/{args.runs}: B {who} {kind}: {args.batch} events/message, {args.inflight} in flight, "
                f"{args.duration:g} s"
            )
            with TastemakerClient(target, api_key=_API_KEY, timeout_s=30, application=application[who]) as client:
                pool_key = "echo" if who == "echo" else f"service_{kind}"
                prebuilt = max(1, PREBUILT_EVENTS[pool_key] // args.batch)
                m = max_rate_stream(client.stub, make_message, args.duration, args.inflight, prebuilt, cycle=who == "echo")
            result.throughput[f"{who}_{kind}"] = m
            note = f"; stream error {m.error}" if m.error else ""
            note += f"; {m.counts.rejected} rejected (first: {m.counts.first_reject_reason})" if m.counts.rejected else ""
            progress(
                f"run {run}/{args.runs}: B {who} {kind}: {m.events_per_s:.1f} events/s ({m.acked} events in "
                f"{m.elapsed_s:.2f} s, {m.messages} messages, message p50 {_pct(m.message_latency_s, 50):.1f} ms){note}"
            )

    # C: ack -> visible, on channels of their own.
    progress(f"run {run}/{args.runs}: C: {args.visible_samples} samples of write -> Recommend(min_profile_version)")
    with TastemakerClient(target, api_key=_API_KEY, timeout_s=30, application=app_name) as service, TastemakerClient(
        target, api_key=_API_KEY, timeout_s=30, application=echo_name
    ) as echo:
        v = measure_visible(service, echo, item_ids, args.visible_samples, f"{tag}-c", rng)
    result.visible = v
    note = f"; {v.errors} errors, {v.rejected} rejected (first: {v.first_error})" if v.errors or v.rejected else ""
    progress(
        f"run {run}/{args.runs}: C: visible p50 {_pct(v.visible_s, 50):.2f} ms, p99 {_pct(v.visible_s, 99):.2f} ms, "
        f"stale reads {v.stale_reads}; echo Recommend p50 {_pct(v.echo_s, 50):.2f} ms{note}"
    )
    return result


def _sanity_check(target: str, app_name: str, echo_name: str, item_id: str) -> None:
    """Both applications acknowledge a streamed event (the echo replica may need a moment)."""
    import grpc

    from tastemaker.client import TastemakerClient
    from tastemaker.v1 import recommender_service_pb2 as pb

    for name in (echo_name, app_name):
        deadline = time.monotonic() + 120
        while True:
            event = pb.UserEvent(
                event_id=f"bench-fresh-sanity-{time.time_ns()}",
                user_id="bench-fresh-sanity",
                event_type=pb.EVENT_TYPE_CLICK,
                item_id=item_id,
            )
            try:
                with TastemakerClient(target, api_key=_API_KEY, timeout_s=30, application=name) as client:
                    replies = list(client.stub.StreamUserEvents(iter([pb.StreamUserEventsRequest(events=[event])]), timeout=30))
                break
            except grpc.RpcError as exc:
                if time.monotonic() > deadline:
                    raise
                progress(f"{name} stream not answering yet ({exc.code().name}); retrying")
                time.sleep(1.0)
        acks = [a for r in replies for a in r.acks]
        if len(acks) != 1 or acks[0].status != pb.EVENT_STATUS_ACCEPTED:
            raise RuntimeError(f"{name}: a streamed CLICK on loaded item {item_id!r} was not accepted: {acks}")
    progress("sanity check: service and echo each accepted a streamed event")


# -- main ----------------------------------------------------------------------------------------
def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)

    from tastemaker.app import start_service, stop_service
    from tastemaker.auth import create_key_in_store
    from tastemaker.client import TastemakerClient
    from tastemaker.config import load_config
    from tastemaker.store.base import redact_url
    from tastemaker.datasets.movielens import load_movielens, subsample
    from tastemaker.demo import load_dataset
    from tastemaker_bench.e2e import free_port, host_block
    from tastemaker_bench.echo import ECHO_APP_NAME, deploy_echo

    started = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    load_before = round(os.getloadavg()[0], 2)
    json_path = Path(args.json) if args.json else DEFAULT_JSON
    tmp = tempfile.TemporaryDirectory(prefix="tastemaker-bench-freshness-")
    grpc_port, http_port = free_port(), free_port()
    while http_port == grpc_port:
        http_port = free_port()
    config = load_config(
        args.config,
        overrides={
            ("data_dir",): tmp.name,
            ("server", "grpc_port"): grpc_port,
            ("server", "http_port"): http_port,
            ("store", "url"): args.store_url,
        },
        environ={},
    )
    config.server.ray_address = None
    config.server.ray_num_cpus = None
    target = f"{config.server.host}:{grpc_port}"
    app_name = config.server.app_name
    results: list[RunResult] = []
    loaded_items = loaded_events = 0
    ray_cpus = None
    try:
        progress(f"starting the service on {target} (data in {tmp.name}); this takes a while")
        start_service(config)
        progress("service SERVING")
        global _API_KEY
        if config.auth.enabled:  # both applications get the same metadata; the echo ignores it
            _API_KEY = create_key_in_store(config.store_url(), "admin", "bench freshness")
        import ray

        ray_cpus = ray.cluster_resources().get("CPU")

        progress("reading MovieLens")
        data = subsample(load_movielens(args.movielens_path), max_items=args.items, max_users=args.users)
        item_ids = [i.item_id for i in data.items]
        progress(f"loading {len(data.items)} items and {len(data.ratings)} ratings")
        with TastemakerClient(target, api_key=_API_KEY, timeout_s=600, application=app_name) as client:
            loaded_items, loaded_events = load_dataset(client, data, show_progress=sys.stderr.isatty())
        progress(f"loaded {loaded_items} items, {loaded_events} rating events")

        progress(f"deploying the echo application {ECHO_APP_NAME!r}")
        deploy_echo(num_cpus=config.gateway.num_cpus, max_ongoing_requests=config.gateway.max_ongoing_requests)
        _sanity_check(target, app_name, ECHO_APP_NAME, item_ids[0])
        for run in range(1, args.runs + 1):
            results.append(_one_run(run, args, target, app_name, ECHO_APP_NAME, item_ids))
    finally:
        load_after = round(os.getloadavg()[0], 2)
        progress("stopping the service")
        try:
            stop_service(config)
        finally:
            tmp.cleanup()
        progress("stopped")

    num_shards = config.profiles.num_shards
    params = {
        "items": args.items,
        "users": args.users,
        "loaded_items": loaded_items,
        "loaded_events": loaded_events,
        "num_shards": num_shards,
        "fixed_rate": {
            "rate_events_per_s": args.rate,
            "users_streamed": args.users_streamed,
            "event_type": "CLICK",
            "linger_ms": args.linger_ms,
            "max_events_per_message": args.max_batch,
            "warmup_s": args.warmup,
            "duration_s": args.duration,
            "inflight_capped_variant": args.fixed_inflight or None,
            "ack_latency": "ack_*: from the message's hand-off to gRPC to its response read by the client; "
            "ack_incl_linger_*: from the event's due time on the fixed schedule (includes the linger); "
            "messages leave on the schedule whatever the acks. capped_*: the same schedule, but a message also "
            "waits until fewer than inflight_capped_variant messages are unacknowledged and takes every event "
            "due meanwhile (at most max_events_per_message)",
        },
        "throughput": {
            "events_per_message": args.batch,
            "inflight_messages": args.inflight,
            "duration_s": args.duration,
            "users_streamed": args.users_streamed,
            "review_text": f"~30 words of synthetic review text, value {REVIEW_RATING:g}, item_id of a loaded item",
            "events_per_s": "acknowledged events / (last ack - first send); sending stops at duration_s, then drains",
            "per_shard": f"events_per_s_per_shard_* = events_per_s_* / profiles.num_shards ({num_shards}); "
            "the service-wide rate spread over the shards, not a per-shard measurement",
        },
        "visible": {
            "samples": args.visible_samples,
            "write": "unary WriteUserEvents of one CLICK for a fresh user",
            "visible": "from the write's ack to Recommend(user, min_profile_version=ack.profile_version) returning",
            "stale_read": "a Recommend answer with profile_version below the acked version",
            "baseline": "an echo Recommend (bare unary Serve gRPC round trip) after every sample",
        },
        "targets": TARGETS,
        "store": redact_url(config.store_url()),
        "runs": args.runs,
        "aggregate": "median of runs",
        "seed": args.seed,
        "ray_cpus": ray_cpus,
        "client": "in-process; one gRPC channel per stream; phase C on channels of its own",
        "load_avg_1m_before": load_before,
        "load_avg_1m_after": load_after,
    }
    figures = _figures(results, num_shards)
    report = {"benchmark": "freshness", "started": started, "host": host_block(), "params": params, "figures": figures}
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    progress(f"wrote {json_path}")
    _print_table(report)
    return 0


# -- report --------------------------------------------------------------------------------------
def _median(values) -> float:
    values = [v for v in values if not math.isnan(v)]
    return float(statistics.median(values)) if values else float("nan")


def _r(x, digits: int = 3):
    """Rounded; NaN (nothing measured) becomes null so the JSON stays valid; counts stay integers."""
    if isinstance(x, (int, np.integer)):
        return int(x)
    x = float(x)
    return None if math.isnan(x) or math.isinf(x) else round(x, digits)


def _figures(results: list[RunResult], num_shards: int) -> list[dict]:
    """Median over runs of every figure; ratios are computed from the medians."""

    def fig(name, value, unit, baseline=None, baseline_value=None, ratio=None) -> dict:
        out = {"name": name, "value": _r(value), "unit": unit}
        if baseline is not None:
            out.update(baseline=baseline, baseline_value=_r(baseline_value))
        if ratio is not None:  # 4 significant digits: some ratios are far below 0.001
            out["ratio"] = None if math.isnan(ratio) else float(f"{ratio:.4g}")
        return out

    def ratio(a: float, b: float) -> float:
        return a / b if b and not math.isnan(a) and not math.isnan(b) else float("nan")

    def fixed(who: str, attr: str, q: float) -> float:
        return _median(_pct(getattr(r.fixed[who], attr), q) for r in results)

    def rate(key: str) -> float:
        return _median(r.throughput[key].events_per_s for r in results)

    def vis(attr: str, q: float) -> float:
        return _median(_pct(getattr(r.visible, attr), q) for r in results)

    ack50, ack99 = fixed("service", "ack_from_send_s", 50), fixed("service", "ack_from_send_s", 99)
    echo50, echo99 = fixed("echo", "ack_from_send_s", 50), fixed("echo", "ack_from_send_s", 99)
    lin50, lin99 = fixed("service", "ack_from_due_s", 50), fixed("service", "ack_from_due_s", 99)
    elin50, elin99 = fixed("echo", "ack_from_due_s", 50), fixed("echo", "ack_from_due_s", 99)
    fr_rate = _median(r.fixed["service"].events_per_s for r in results)
    fr_echo = _median(r.fixed["echo"].events_per_s for r in results)
    click, echo_click = rate("service_click"), rate("echo_click")
    review, echo_review = rate("service_review"), rate("echo_review")
    vis50, vis99 = vis("visible_s", 50), vis("visible_s", 99)
    w50, w99 = vis("write_s", 50), vis("write_s", 99)
    e50, e99 = vis("echo_s", 50), vis("echo_s", 99)
    service_counts = [m.counts for r in results for k, m in r.fixed.items() if k.startswith("service")] + [
        r.throughput[k].counts for r in results for k in ("service_click", "service_review")
    ]
    rejected = sum(c.rejected for c in service_counts) + sum(r.visible.rejected for r in results)
    duplicates = sum(c.duplicate for c in service_counts)
    stream_errors = sum(1 for r in results for m in (*r.fixed.values(), *r.throughput.values()) if m.error)
    return [
        # A: ack latency at the fixed rate, from the message's send.
        fig("ack_p50_ms", ack50, "ms"),
        fig("ack_p99_ms", ack99, "ms"),
        fig("echo_ack_p50_ms", echo50, "ms"),
        fig("echo_ack_p99_ms", echo99, "ms"),
        # Latency ratios: baseline/value (echo/service), so > 1 would mean faster than the bare stream.
        fig("ack_p50_speedup_vs_echo", ack50, "ms", "echo_ack_p50_ms", echo50, ratio(echo50, ack50)),
        fig("ack_p99_speedup_vs_echo", ack99, "ms", "echo_ack_p99_ms", echo99, ratio(echo99, ack99)),
        # The same from each event's due time (includes the client's linger).
        fig("ack_incl_linger_p50_ms", lin50, "ms"),
        fig("ack_incl_linger_p99_ms", lin99, "ms"),
        fig("echo_ack_incl_linger_p50_ms", elin50, "ms"),
        fig("echo_ack_incl_linger_p99_ms", elin99, "ms"),
        fig("fixed_rate_events_per_s", fr_rate, "events/s", "echo_fixed_rate_events_per_s", fr_echo, ratio(fr_rate, fr_echo)),
        fig("echo_fixed_rate_events_per_s", fr_echo, "events/s"),
        fig(
            "fixed_rate_events_per_message",
            _median(r.fixed["service"].mean_events_per_message for r in results),
            "events/message",
        ),
        *(_capped_figures(results, fig, ratio) if "service_capped" in results[0].fixed else []),
        # B: sustained throughput, value/baseline (> 1 better).
        fig("events_per_s_no_text", click, "events/s", "echo_events_per_s", echo_click, ratio(click, echo_click)),
        fig("echo_events_per_s", echo_click, "events/s"),
        fig(
            "events_per_s_review_text",
            review,
            "events/s",
            "echo_events_per_s_review_text",
            echo_review,
            ratio(review, echo_review),
        ),
        fig("echo_events_per_s_review_text", echo_review, "events/s"),
        fig("events_per_s_per_shard_no_text", click / num_shards, "events/s/shard"),
        fig("events_per_s_per_shard_review_text", review / num_shards, "events/s/shard"),
        # C: ack -> visible.
        fig("visible_p50_ms", vis50, "ms"),
        fig("visible_p99_ms", vis99, "ms"),
        fig("echo_unary_p50_ms", e50, "ms"),
        fig("echo_unary_p99_ms", e99, "ms"),
        fig("visible_p50_speedup_vs_echo", vis50, "ms", "echo_unary_p50_ms", e50, ratio(e50, vis50)),
        fig("visible_p99_speedup_vs_echo", vis99, "ms", "echo_unary_p99_ms", e99, ratio(e99, vis99)),
        fig("write_ack_p50_ms", w50, "ms"),
        fig("write_ack_p99_ms", w99, "ms"),
        # Correctness counts over all runs (must be 0).
        fig("stale_reads", sum(r.visible.stale_reads for r in results), "reads"),
        fig("visible_errors", sum(r.visible.errors for r in results), "samples"),
        fig("rejected_events", rejected, "events"),
        fig("duplicate_events", duplicates, "events"),
        fig("stream_errors", stream_errors, "streams"),
    ]


def _capped_figures(results: list[RunResult], fig, ratio) -> list[dict]:
    """Phase A with backpressure (`--fixed-inflight`): latencies from the due time, since a message
    may wait for an ack before it leaves, and that wait is part of what the event experiences."""

    def fixed(who: str, attr: str, q: float) -> float:
        return _median(_pct(getattr(r.fixed[who], attr), q) for r in results)

    c50, c99 = fixed("service_capped", "ack_from_due_s", 50), fixed("service_capped", "ack_from_due_s", 99)
    e50, e99 = fixed("echo_capped", "ack_from_due_s", 50), fixed("echo_capped", "ack_from_due_s", 99)
    rate = _median(r.fixed["service_capped"].events_per_s for r in results)
    erate = _median(r.fixed["echo_capped"].events_per_s for r in results)
    return [
        fig("capped_ack_incl_linger_p50_ms", c50, "ms"),
        fig("capped_ack_incl_linger_p99_ms", c99, "ms"),
        fig("echo_capped_ack_incl_linger_p50_ms", e50, "ms"),
        fig("echo_capped_ack_incl_linger_p99_ms", e99, "ms"),
        fig(
            "capped_ack_incl_linger_p99_speedup_vs_echo",
            c99,
            "ms",
            "echo_capped_ack_incl_linger_p99_ms",
            e99,
            ratio(e99, c99),
        ),
        fig("capped_ack_p99_ms", fixed("service_capped", "ack_from_send_s", 99), "ms"),
        fig("echo_capped_ack_p99_ms", fixed("echo_capped", "ack_from_send_s", 99), "ms"),
        fig(
            "capped_fixed_rate_events_per_s",
            rate,
            "events/s",
            "echo_capped_fixed_rate_events_per_s",
            erate,
            ratio(rate, erate),
        ),
        fig("echo_capped_fixed_rate_events_per_s", erate, "events/s"),
        fig(
            "capped_events_per_message",
            _median(r.fixed["service_capped"].mean_events_per_message for r in results),
            "events/message",
        ),
    ]


def _print_table(report: dict) -> None:
    f = {x["name"]: x for x in report["figures"]}
    p = report["params"]
    h = report["host"]
    t = p["targets"]

    def v(name: str, fmt: str = ".2f") -> str:
        value = f[name]["value"]
        return "n/a" if value is None else format(value, fmt)

    def r(name: str) -> str:
        value = f[name].get("ratio")
        return "n/a" if value is None else f"{value:.4g}"

    def meets(name: str, limit: float, at_least: bool) -> str:
        value = f[name]["value"]
        if value is None:
            return "n/a"
        return "met" if (value >= limit if at_least else value <= limit) else "NOT met"

    fr = p["fixed_rate"]
    print(
        f"freshness: {p['loaded_items']} items, {p['num_shards']} shards, {p['runs']} run(s) (medians); "
        f"{h['cpus']} CPUs, gpu {h['gpu']}; load avg {p['load_avg_1m_before']} -> {p['load_avg_1m_after']}"
    )
    rows = [
        ("", "service", "echo (bare stream)", "ratio"),
        (
            f"ack p50 ms @ {fr['rate_events_per_s']:g}/s",
            v("ack_p50_ms"),
            v("echo_ack_p50_ms"),
            r("ack_p50_speedup_vs_echo"),
        ),
        (
            f"ack p99 ms @ {fr['rate_events_per_s']:g}/s",
            v("ack_p99_ms"),
            v("echo_ack_p99_ms"),
            r("ack_p99_speedup_vs_echo"),
        ),
        ("ack p99 ms incl. linger", v("ack_incl_linger_p99_ms"), v("echo_ack_incl_linger_p99_ms"), ""),
        ("achieved events/s (fixed rate)", v("fixed_rate_events_per_s", ".1f"), v("echo_fixed_rate_events_per_s", ".1f"), ""),
    ]
    if "capped_ack_incl_linger_p99_ms" in f:
        n = fr["inflight_capped_variant"]
        rows += [
            (
                f"capped ({n} in flight) ack p50 ms incl. linger",
                v("capped_ack_incl_linger_p50_ms"),
                v("echo_capped_ack_incl_linger_p50_ms"),
                "",
            ),
            (
                f"capped ({n} in flight) ack p99 ms incl. linger",
                v("capped_ack_incl_linger_p99_ms"),
                v("echo_capped_ack_incl_linger_p99_ms"),
                r("capped_ack_incl_linger_p99_speedup_vs_echo"),
            ),
            (
                f"capped ({n} in flight) achieved events/s",
                v("capped_fixed_rate_events_per_s", ".1f"),
                v("echo_capped_fixed_rate_events_per_s", ".1f"),
                "",
            ),
        ]
    rows += [
        ("events/s, no text", v("events_per_s_no_text", ".1f"), v("echo_events_per_s", ".1f"), r("events_per_s_no_text")),
        (
            "events/s, review text",
            v("events_per_s_review_text", ".1f"),
            v("echo_events_per_s_review_text", ".1f"),
            r("events_per_s_review_text"),
        ),
        ("visible p50 ms (vs echo Recommend)", v("visible_p50_ms"), v("echo_unary_p50_ms"), r("visible_p50_speedup_vs_echo")),
        ("visible p99 ms (vs echo Recommend)", v("visible_p99_ms"), v("echo_unary_p99_ms"), r("visible_p99_speedup_vs_echo")),
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(c.ljust(widths[0]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(row)))
    print(
        f"per shard (events/s / {p['num_shards']}): no text {v('events_per_s_per_shard_no_text', '.1f')}, "
        f"review text {v('events_per_s_per_shard_review_text', '.1f')}; "
        f"stale reads {int(f['stale_reads']['value'])}, visible errors {int(f['visible_errors']['value'])}, "
        f"rejected events {int(f['rejected_events']['value'])}, stream errors {int(f['stream_errors']['value'])}"
    )
    print(
        f"targets: >= {t['events_per_s_no_text_min']:g} events/s without text: "
        f"{meets('events_per_s_no_text', t['events_per_s_no_text_min'], True)}; "
        f"p99 ack <= {t['ack_p99_ms_max_at_500_events_per_s']:g} ms at 500/s: "
        f"{meets('ack_p99_ms', t['ack_p99_ms_max_at_500_events_per_s'], False)}; "
        f"p99 visible <= {t['visible_p99_ms_max']:g} ms: {meets('visible_p99_ms', t['visible_p99_ms_max'], False)}"
    )


if __name__ == "__main__":
    sys.exit(main())

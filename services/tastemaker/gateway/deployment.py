"""The ingress deployment: one method per RPC, named exactly like the RPC (Serve's gRPC proxy
routes by method name). Each method converts protobuf to domain types, composes the encoder,
retrieval and profile shards, and maps errors through the one table."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Optional

import grpc
from grpc_health.v1 import health_pb2
from ray import serve

from tastemaker.config import AuthConfig, GatewayConfig, PrivacyConfig, ProfileConfig, RetrievalConfig, StoreConfig
from tastemaker.domain import TEXT_EVENT_TYPES, EventAck, EventType, ProfileView, UserProfileSummary
from tastemaker.errors import FailedPrecondition, InvalidArgument, NotFound
from tastemaker.gateway import convert
from tastemaker.gateway.admission import Admission
from tastemaker.gateway.errors import StreamEnded, status_for
from tastemaker.gateway.guard import EdgeGuard
from tastemaker.gateway.wire import MalformedRequest
from tastemaker.profiles.actor import ShardRouter
from tastemaker.profiles.state import SENTIMENT_ANCHORS, review_sentiment, shard_of
from tastemaker.store import open_store
from tastemaker.v1 import recommender_service_pb2 as pb

logger = logging.getLogger(__name__)

#: How often a Recommend waiting for min_profile_version looks again.
_VERSION_POLL_S = 0.005


@dataclass
class GatewaySettings:
    """The gateway's slice of the service config."""

    gateway: GatewayConfig
    profiles: ProfileConfig
    store_url: str
    app_name: str
    namespace: str
    #: The store section (PostgreSQL pool sizes, SQLite busy timeout) for every store this opens.
    store: StoreConfig = field(default_factory=StoreConfig)
    #: Graph parameters for the fit the start-up publishes when none exists (`tastemaker.startup`).
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)


def _mapped(response_type):
    """Catch every exception and turn it into a status through the error table (never INTERNAL)."""

    def decorate(method):
        @functools.wraps(method)
        async def wrapper(self, request, grpc_context=None):
            try:
                # API key, role, rate limit, pseudonymous user ids (gateway/guard.py) first: a caller
                # without a valid key learns nothing, not even whether its bytes decode.
                request, restore = await self.guard.admit(method.__name__, request, grpc_context)
                if isinstance(request, MalformedRequest):  # bytes the proxy could not decode (gateway/wire.py)
                    raise InvalidArgument(request.describe())
                with self.admission.enter(method.__name__):
                    return restore(await method(self, request))
            except Exception as exc:  # noqa: BLE001 - this is the edge: everything gets a status
                # Unexpected failures are logged inside status_for, without their text.
                code, message = status_for(exc, method.__name__)
                if grpc_context is not None:
                    grpc_context.set_code(code)
                    grpc_context.set_details(message)
                return response_type()

        # Serve passes `grpc_context` only to methods whose signature names it; functools.wraps
        # would make inspect.signature report the wrapped method's signature instead.
        del wrapper.__wrapped__
        return wrapper

    return decorate


async def _decoded(request_stream):
    """The inbound messages of a stream; a message the proxy could not decode ends it with
    INVALID_ARGUMENT (after the answers to the messages before it)."""
    position = 0
    async for request in request_stream:
        if isinstance(request, MalformedRequest):
            raise InvalidArgument(f"stream message {position}: {request.describe()}")
        position += 1
        yield request


@serve.deployment(name="Gateway", logging_config={"enable_access_log": False})
class GatewayDeployment:
    """Serves `tastemaker.v1.RecommenderService` and `grpc.health.v1.Health`."""

    def __init__(self, settings: GatewaySettings, encoder, retrieval):
        self.settings = settings
        self.config = settings.gateway
        self.encoder = encoder
        self.retrieval = retrieval
        self.store = open_store(settings.store_url, settings.store)
        self.guard = EdgeGuard(settings.auth, settings.privacy, self.store, self.config)
        self.shards = ShardRouter(settings.app_name, settings.namespace, settings.store_url, settings.profiles, settings.store)
        self.shards.wait_ready()
        self._start_up()
        self._anchors = None  # praise/complaint vectors, encoded on first use
        self._encoder_model: Optional[tuple[int, str]] = None  # (dimension, model identity), asked on first use

    async def _encoder_identity(self) -> tuple[int, str]:
        """(dimension, model identity) of the encoder, asked once: both are fixed for a deployment."""
        if self._encoder_model is None:
            dimension, identity = await asyncio.gather(
                self.encoder.dimension.remote(), self.encoder.model_identity.remote()
            )
            self._encoder_model = (int(dimension), str(identity))
        return self._encoder_model

    async def _sentiment_anchors(self):
        if self._anchors is None:
            self._anchors = await self.encoder.encode.remote(list(SENTIMENT_ANCHORS))
        return self._anchors

    @property
    def admission(self) -> Admission:
        """Bounded calls in progress per unary RPC: past capacity, RESOURCE_EXHAUSTED at once.
        Made on first use (a plain property: Serve pickles the class, and cached_property holds a lock)."""
        if "_admission" not in self.__dict__:
            self._admission = Admission(self.config.max_in_flight_per_rpc)
        return self._admission

    # -- catalog --------------------------------------------------------------------------
    @_mapped(pb.UpsertItemsResponse)
    async def UpsertItems(self, request: pb.UpsertItemsRequest) -> pb.UpsertItemsResponse:
        items = convert.items_from_request(request, self.config)
        if any(item.vector is not None for item in items):  # vectors computed off-line (`tastemaker encode`)
            dimension, encoder_model = await self._encoder_identity()
            convert.check_supplied_vectors(items, request.vector_model, dimension, encoder_model)
        to_encode = [item for item in items if item.vector is None]
        if to_encode:
            vectors = await self.encoder.encode.remote([item.text() for item in to_encode])
            for item, vector in zip(to_encode, vectors):
                item.vector = vector
        written = await asyncio.to_thread(self.store.upsert_items, items)
        await self.shards.call_all("forget_items", [i.item_id for i in items])
        return pb.UpsertItemsResponse(upserted_count=written)

    @_mapped(pb.DeleteItemsResponse)
    async def DeleteItems(self, request: pb.DeleteItemsRequest) -> pb.DeleteItemsResponse:
        if not request.item_ids:
            raise InvalidArgument("DeleteItems needs at least one item_id")
        ids = [convert.check_id("item_id", i, self.config) for i in request.item_ids]
        deleted, missing = await asyncio.to_thread(self.store.delete_items, ids)
        await self.shards.call_all("forget_items", ids)
        return pb.DeleteItemsResponse(deleted_count=deleted, missing_item_ids=missing)

    @_mapped(pb.GetItemResponse)
    async def GetItem(self, request: pb.GetItemRequest) -> pb.GetItemResponse:
        item_id = convert.check_id("item_id", request.item_id, self.config)
        item = await asyncio.to_thread(self.store.get_item, item_id)
        if item is None:
            raise NotFound(f"item_id {item_id!r} is not in the catalog")
        return pb.GetItemResponse(item=convert.item_to_pb(item))

    # -- events ---------------------------------------------------------------------------
    async def _write_events(
        self,
        messages,
        after: Optional[asyncio.Event] = None,
        submitted: Optional[asyncio.Event] = None,
    ) -> list[EventAck]:
        """Validate, encode texts, route to shards in parallel; acks in request order.

        For pipelined streams: shard calls are submitted only once `after` is set, and
        `submitted` is set right after this message's shard calls are submitted. Ray runs the
        calls one caller submits to a (sync) actor in submission order, so events of one user keep
        their stream order even while several messages are in flight.
        """
        try:
            return await self._write_events_ordered(messages, after, submitted)
        except BaseException:
            if submitted is not None:
                submitted.failed = True  # the stream ends here: later messages must not be applied
            raise
        finally:
            if submitted is not None:
                submitted.set()  # never leave later messages waiting, even on failure

    async def _write_events_ordered(self, messages, after, submitted) -> list[EventAck]:
        events, acks = convert.events_from_pb(messages, self.config)
        texts = [(i, e) for i, e in enumerate(events) if e is not None and e.event_type in TEXT_EVENT_TYPES]
        if texts:
            vectors = await self.encoder.encode.remote([e.text for _, e in texts])
            for (_, event), vector in zip(texts, vectors):
                event.text_vector = vector
            if any(e.event_type == EventType.REVIEW for _, e in texts):
                praise, complaint = await self._sentiment_anchors()
                for _, event in texts:
                    if event.event_type == EventType.REVIEW:
                        event.sentiment = review_sentiment(event.text_vector, praise, complaint)
        by_shard: dict[int, list[int]] = defaultdict(list)
        for i, event in enumerate(events):
            if event is not None:
                by_shard[shard_of(event.user_id, self.settings.profiles.num_shards)].append(i)
        if after is not None:
            await after.wait()
            if getattr(after, "failed", False):
                raise InvalidArgument("an earlier message of this stream failed; the stream has ended")
        # Submitted now, in stream order; a full shard mailbox refuses the message at once.
        calls = self.shards.submit_many(
            [(shard, "apply_events", ([events[i] for i in positions],)) for shard, positions in by_shard.items()]
        )
        if submitted is not None:
            submitted.set()
        results = await asyncio.gather(*calls)
        for positions, shard_acks in zip(by_shard.values(), results):
            for i, ack in zip(positions, shard_acks):
                acks[i] = ack
        return acks

    @_mapped(pb.WriteUserEventsResponse)
    async def WriteUserEvents(self, request: pb.WriteUserEventsRequest) -> pb.WriteUserEventsResponse:
        if not request.events:
            raise InvalidArgument("WriteUserEvents needs at least one event")
        acks = await self._write_events(request.events)
        return pb.WriteUserEventsResponse(acks=[convert.ack_to_pb(a) for a in acks])

    async def StreamUserEvents(self, request_stream, grpc_context=None):
        """One response per inbound message, in message order, with one ack per event.

        Pipelined: up to `gateway.stream_window` messages are in flight at once (validated,
        encoded and submitted to the shards in order), so a stream of small messages is not
        limited to one shard round trip per message. When the window is full the gateway stops
        pulling messages, and the Serve proxy stops reading from the client: flow control, not
        unbounded buffering.
        """
        # Key checked on the first message; an auth error ends the stream like any inbound error.
        request_stream, restore = self.guard.admit_stream(request_stream, grpc_context)
        request_stream = _decoded(request_stream)
        in_flight: asyncio.Queue = asyncio.Queue(maxsize=self.config.stream_window)

        async def read() -> None:
            previous: Optional[asyncio.Event] = None
            try:
                async for request in request_stream:
                    submitted = asyncio.Event()
                    task = asyncio.ensure_future(self._write_events(request.events, previous, submitted))
                    previous = submitted
                    await in_flight.put(task)
            except Exception as exc:  # noqa: BLE001 - a broken inbound stream ends the call
                await in_flight.put(exc)
            finally:
                await in_flight.put(None)

        reader = asyncio.ensure_future(read())
        try:
            while True:
                task = await in_flight.get()
                if task is None:
                    return
                try:
                    if isinstance(task, BaseException):
                        raise task
                    acks = await task
                except Exception as exc:  # noqa: BLE001 - a whole-message failure ends the stream with a status
                    code, message = status_for(exc, "StreamUserEvents")
                    if grpc_context is None:
                        raise
                    grpc_context.set_code(code)
                    grpc_context.set_details(message)
                    # Serve carries the context to the client only with a yielded item or an
                    # exception: returning here would end the stream with OK. The replica wraps an
                    # exception raised after set_code in gRPCStatusError and the proxy answers
                    # with the code and details set above.
                    raise StreamEnded(message) from None
                yield restore(pb.StreamUserEventsResponse(acks=[convert.ack_to_pb(a) for a in acks]))
        finally:
            reader.cancel()

    # -- recommendations ------------------------------------------------------------------
    async def _profile(self, user_id: str, min_version: int) -> ProfileView:
        deadline = time.monotonic() + self.settings.profiles.min_version_wait_s
        while True:
            view: ProfileView = await self.shards.call(user_id, "get_profile", user_id)
            if view.profile_version >= min_version:
                return view
            if time.monotonic() >= deadline:
                raise FailedPrecondition(
                    # No id in the text: with pseudonyms it would be the stored one, not the caller's.
                    f"the user's profile is at version {view.profile_version}, below "
                    f"min_profile_version {min_version}; retry shortly, or check the version came "
                    f"from an ack for this user"
                )
            await asyncio.sleep(_VERSION_POLL_S)

    async def _encode_query(self, text: str):
        if not text:
            return None
        return (await self.encoder.encode.remote([text]))[0]

    @_mapped(pb.RecommendResponse)
    async def Recommend(self, request: pb.RecommendRequest) -> pb.RecommendResponse:
        query = convert.recommend_query_from_pb(request, self.config)
        # Independent calls run concurrently; retrieval is the only dependent hop.
        profile, query.query_vector = await asyncio.gather(
            self._profile(query.user_id, request.min_profile_version), self._encode_query(query.query)
        )
        items = await self.retrieval.recommend.remote(query, profile)
        return pb.RecommendResponse(
            items=[convert.scored_to_pb(i) for i in items],
            profile_version=profile.profile_version,
            attribution_token=uuid.uuid4().hex,
        )

    @_mapped(pb.SimilarItemsResponse)
    async def SimilarItems(self, request: pb.SimilarItemsRequest) -> pb.SimilarItemsResponse:
        query = convert.similar_query_from_pb(request, self.config)
        items = await self.retrieval.similar_items.remote(request.item_id, query)
        return pb.SimilarItemsResponse(items=[convert.scored_to_pb(i) for i in items])

    # -- users ----------------------------------------------------------------------------
    @_mapped(pb.GetUserProfileResponse)
    async def GetUserProfile(self, request: pb.GetUserProfileRequest) -> pb.GetUserProfileResponse:
        user_id = convert.check_id("user_id", request.user_id, self.config)
        view, counts, last_time = await self.shards.call(user_id, "get_profile_details", user_id)
        titles, tags = await self.retrieval.describe.remote(view)
        summary = UserProfileSummary(user_id, view.profile_version, counts, titles, tags, last_time)
        return convert.profile_summary_to_pb(summary)

    @_mapped(pb.DeleteUserResponse)
    async def DeleteUser(self, request: pb.DeleteUserRequest) -> pb.DeleteUserResponse:
        user_id = convert.check_id("user_id", request.user_id, self.config)
        deleted = await self.shards.call(user_id, "delete_user", user_id)
        return pb.DeleteUserResponse(deleted_event_count=deleted)

    # -- start-up and health ------------------------------------------------------------------
    def _start_up(self) -> None:
        """Run the start-up steps (`tastemaker.startup`: re-encoding after an encoder model change,
        a missing fit) in the background, once across replicas; report the store this replica
        opened (`tastemaker.cluster`). Health is NOT_SERVING until the steps are done."""
        import ray

        from tastemaker.cluster import SplitMonitor, StoreReporter
        from tastemaker.startup import ServiceStartup, StartupSteps

        def submit(texts: list[str]):
            return self.encoder.encode.remote(texts).result

        def rebuild_profiles() -> int:
            return sum(ray.get([actor.rebuild.remote() for actor in self.shards.actors]))

        steps = StartupSteps(
            encoder_identity=lambda: str(self.encoder.model_identity.remote().result()),
            encode_async=submit,
            rebuild_profiles=rebuild_profiles,
            retrieval=self.settings.retrieval,
            weights=self.settings.profiles.weights,
        )
        self.startup = ServiceStartup(self.store, steps).start()
        replica = serve.get_replica_context().replica_id.unique_id
        self.store_reporter = StoreReporter(
            self.settings.app_name, self.settings.namespace, f"gateway/{replica}", self.store.instance_id()
        )
        self.split_monitor = SplitMonitor()
        self._reporting = asyncio.get_event_loop().create_task(self.store_reporter.run_forever())

    async def _serving(self) -> bool:
        """SERVING: start-up done, every part answers, and every part opened the same store."""
        from tastemaker.cluster import shard_reports

        if not self.startup.done:
            return False
        try:
            _, _, shard_states, reports = await asyncio.wait_for(
                asyncio.gather(
                    self.encoder.dimension.remote(),
                    self.retrieval.ready.remote(),
                    self.shards.call_all("ready"),
                    self.store_reporter.fresh(),
                ),
                timeout=5.0,
            )
        except Exception:  # noqa: BLE001 - any failing part means NOT_SERVING
            return False
        reports[self.store_reporter.component] = (self.store_reporter.instance_id, self.store_reporter.node_id)
        return self.split_monitor.check({**reports, **shard_reports(shard_states)})

    async def Check(self, request, grpc_context=None):
        """grpc.health.v1.Health/Check: SERVING once encoder, retrieval and shards answer."""
        if isinstance(request, MalformedRequest):  # bytes the proxy could not decode (gateway/wire.py)
            if grpc_context is not None:
                grpc_context.set_code(grpc.StatusCode.INVALID_ARGUMENT)
                grpc_context.set_details(request.describe())
            return health_pb2.HealthCheckResponse()
        if request.service not in ("", "tastemaker.v1.RecommenderService"):
            if grpc_context is not None:
                grpc_context.set_code(grpc.StatusCode.NOT_FOUND)
                grpc_context.set_details(f"unknown service {request.service!r}")
            return health_pb2.HealthCheckResponse()
        status = health_pb2.HealthCheckResponse.SERVING if await self._serving() else health_pb2.HealthCheckResponse.NOT_SERVING
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(self, request, grpc_context=None):
        """grpc.health.v1.Health/Watch: the current status, then again whenever it changes."""
        last: Optional[int] = None
        while True:
            status = health_pb2.HealthCheckResponse.SERVING if await self._serving() else health_pb2.HealthCheckResponse.NOT_SERVING
            if status != last:
                yield health_pb2.HealthCheckResponse(status=status)
                last = status
            await asyncio.sleep(1.0)

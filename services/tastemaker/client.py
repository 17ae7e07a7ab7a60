"""A small Python client for the gRPC API, used by the CLI, the tests and the benchmarks.

Other languages use `protos/tastemaker/v1/*.proto` directly; this module adds only batching
helpers on top of the generated stub.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Iterable, Iterator, Optional, Sequence

import grpc

from tastemaker.v1 import recommender_service_pb2 as pb
from tastemaker.v1 import recommender_service_pb2_grpc as pb_grpc

# Messages can carry thousands of events or items; the default 4 MiB is too tight for that.
_CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
]


class _MetadataInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds fixed metadata to every call."""

    def __init__(self, metadata: tuple[tuple[str, str], ...]):
        self.metadata = metadata

    def _details(self, details):
        return details._replace(metadata=tuple(details.metadata or ()) + self.metadata)

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation, details, requests):
        return continuation(self._details(details), requests)

    def intercept_stream_stream(self, continuation, details, requests):
        return continuation(self._details(details), requests)


class TastemakerClient:
    """Wraps a channel and the generated stub. Use as a context manager to close the channel."""

    def __init__(
        self,
        target: str = "127.0.0.1:9000",
        timeout_s: float = 60.0,
        application: Optional[str] = None,
        api_key: Optional[str] = None,
        credentials: Optional[grpc.ChannelCredentials] = None,
        options: Sequence[tuple[str, object]] = (),
    ):
        """`api_key` is sent on every call as `authorization: Bearer <key>` (see SECURITY.md).
        `application` names the Serve application; needed only when one Serve instance runs
        several applications (the proxy then routes by the `application` metadata key).
        `credentials` (e.g. `grpc.ssl_channel_credentials(ca_pem)`) make a TLS channel, for a
        service behind a TLS-terminating proxy; `options` are extra channel options."""
        self.target = target
        self.timeout_s = timeout_s
        channel_options = [*_CHANNEL_OPTIONS, *options]
        if credentials is not None:
            self.channel = grpc.secure_channel(target, credentials, options=channel_options)
        else:
            self.channel = grpc.insecure_channel(target, options=channel_options)
        metadata: tuple[tuple[str, str], ...] = ()
        if application:
            metadata += (("application", application),)
        if api_key:
            metadata += (("authorization", f"Bearer {api_key}"),)
        if metadata:
            self.channel = grpc.intercept_channel(self.channel, _MetadataInterceptor(metadata))
        self.stub = pb_grpc.RecommenderServiceStub(self.channel)

    def __enter__(self) -> "TastemakerClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    # -- catalog --------------------------------------------------------------------------
    def upsert_items(
        self, items: Sequence[pb.Item], batch_size: int = 256, progress=None, vector_model: str = ""
    ) -> int:
        """Upsert in batches; `progress` (e.g. a tqdm bar) is advanced per item. Items that carry a
        precomputed `vector` need `vector_model`, the identity of the model that computed it
        (`tastemaker.encoder.bulk.read_vectors(...).model_identity`)."""
        written = 0
        for start in range(0, len(items), batch_size):
            batch = items[start : start + batch_size]
            request = pb.UpsertItemsRequest(items=batch, vector_model=vector_model)
            written += self.stub.UpsertItems(request, timeout=self.timeout_s).upserted_count
            if progress is not None:
                progress.update(len(batch))
        return written

    def get_item(self, item_id: str) -> pb.Item:
        return self.stub.GetItem(pb.GetItemRequest(item_id=item_id), timeout=self.timeout_s).item

    def delete_items(self, item_ids: Sequence[str]) -> pb.DeleteItemsResponse:
        return self.stub.DeleteItems(pb.DeleteItemsRequest(item_ids=item_ids), timeout=self.timeout_s)

    # -- events ---------------------------------------------------------------------------
    def write_events(self, events: Sequence[pb.UserEvent], batch_size: int = 2_000, progress=None) -> list[pb.EventAck]:
        """Unary batches; returns one ack per event in order."""
        acks: list[pb.EventAck] = []
        for start in range(0, len(events), batch_size):
            batch = events[start : start + batch_size]
            reply = self.stub.WriteUserEvents(pb.WriteUserEventsRequest(events=batch), timeout=self.timeout_s)
            acks.extend(reply.acks)
            if progress is not None:
                progress.update(len(batch))
        return acks

    def stream_events(
        self, events: Iterable[pb.UserEvent], max_batch: int = 500, linger_s: float = 0.005
    ) -> Iterator[pb.EventAck]:
        """Stream events, batching them into messages by count and a short linger; yields acks.

        The server keeps a bounded window of messages in flight (`gateway.stream_window`) and
        then stops reading; gRPC flow control then bounds what queues in between, and this
        client's own queue is bounded too, so a fast producer ends up blocked in `put` rather
        than buffering without limit. Larger batches per message raise throughput most.
        """
        source: "queue.Queue[Optional[pb.UserEvent]]" = queue.Queue(maxsize=max_batch * 4)

        def produce() -> None:
            for event in events:
                source.put(event)
            source.put(None)

        threading.Thread(target=produce, daemon=True).start()

        def messages() -> Iterator[pb.StreamUserEventsRequest]:
            done = False
            while not done:
                batch = []
                first = source.get()
                if first is None:
                    return
                batch.append(first)
                deadline = time.monotonic() + linger_s
                while len(batch) < max_batch:
                    remaining = deadline - time.monotonic()
                    try:
                        event = source.get(timeout=max(0.0, remaining)) if remaining > 0 else source.get_nowait()
                    except queue.Empty:
                        break
                    if event is None:
                        done = True
                        break
                    batch.append(event)
                yield pb.StreamUserEventsRequest(events=batch)

        for reply in self.stub.StreamUserEvents(messages()):
            yield from reply.acks

    # -- recommendations ------------------------------------------------------------------
    def recommend(
        self,
        user_id: str,
        page_size: int = 10,
        query: str = "",
        filter: Optional[pb.AttributeFilter] = None,
        include_seen: bool = False,
        min_profile_version: int = 0,
        diversity: float = 0.0,
    ) -> pb.RecommendResponse:
        return self.stub.Recommend(
            pb.RecommendRequest(
                user_id=user_id,
                page_size=page_size,
                query=query,
                filter=filter,
                include_seen=include_seen,
                min_profile_version=min_profile_version,
                diversity=diversity,
            ),
            timeout=self.timeout_s,
        )

    def similar_items(self, item_id: str, page_size: int = 10, filter: Optional[pb.AttributeFilter] = None):
        return self.stub.SimilarItems(
            pb.SimilarItemsRequest(item_id=item_id, page_size=page_size, filter=filter), timeout=self.timeout_s
        )

    def get_user_profile(self, user_id: str) -> pb.GetUserProfileResponse:
        return self.stub.GetUserProfile(pb.GetUserProfileRequest(user_id=user_id), timeout=self.timeout_s)

    def delete_user(self, user_id: str) -> pb.DeleteUserResponse:
        return self.stub.DeleteUser(pb.DeleteUserRequest(user_id=user_id), timeout=self.timeout_s)


def genre_filter(*genres: str, exclude: bool = False) -> pb.AttributeFilter:
    """A filter on the MovieLens `genres` attribute."""
    return pb.AttributeFilter(conditions=[pb.AttributeCondition(attribute="genres", any_of=list(genres), exclude=exclude)])

"""The baseline of `tastemaker bench e2e` and `tastemaker bench freshness`: bare Serve gRPC round
trips on the same proto.

`EchoDeployment.Recommend` answers every `RecommendRequest` with an empty `RecommendResponse` at
once, so a call to it costs exactly what the Serve gRPC proxy and one replica call cost: the
floor under any `Recommend` the real service can answer.

`EchoDeployment.StreamUserEvents` answers every inbound `StreamUserEventsRequest` of a
bidirectional stream with one `StreamUserEventsResponse` carrying one ACCEPTED `EventAck` per
event (`profile_version` 1), without storing anything: the floor of a bare Serve bidi stream.

It is deployed as a second application ("bench-echo") in the same Serve instance as the service,
so both share proxy, machine and load.
"""

from __future__ import annotations

from ray import serve

from tastemaker.v1 import recommender_service_pb2 as pb

#: Application name and route prefix of the echo in the shared Serve instance.
ECHO_APP_NAME = "bench-echo"
ECHO_ROUTE_PREFIX = "/bench-echo"


@serve.deployment(name="BenchEcho", logging_config={"enable_access_log": False})
class EchoDeployment:
    """Serves `tastemaker.v1.RecommenderService/Recommend` (an empty answer) and
    `/StreamUserEvents` (one ACCEPTED ack per event, nothing stored).

    The methods are async like the gateway's, so both run on the replica's event loop and the
    difference between them is the service's own work, not a thread hop.
    """

    async def Recommend(self, request: pb.RecommendRequest) -> pb.RecommendResponse:
        return pb.RecommendResponse()

    async def StreamUserEvents(self, request_stream):
        """One response per inbound message, in order, like the gateway's stream."""
        async for request in request_stream:
            yield pb.StreamUserEventsResponse(
                acks=[
                    pb.EventAck(
                        event_id=event.event_id,
                        user_id=event.user_id,
                        status=pb.EVENT_STATUS_ACCEPTED,
                        profile_version=1,
                    )
                    for event in request.events
                ]
            )


def deploy_echo(num_cpus: float = 0.25, max_ongoing_requests: int = 256) -> None:
    """Deploy the echo application next to whatever already runs in Serve; returns when running.

    The defaults match the gateway's replica (0.25 CPU, 256 ongoing requests) so the baseline
    differs from the service only in what the method does.
    """
    app = EchoDeployment.options(
        num_replicas=1,
        max_ongoing_requests=max_ongoing_requests,
        ray_actor_options={"num_cpus": num_cpus},
    ).bind()
    serve.run(app, name=ECHO_APP_NAME, route_prefix=ECHO_ROUTE_PREFIX, blocking=False)

"""TLS in front of the plaintext Serve gRPC proxy: nginx (Debian's package, installed by
scripts/install-system-deps.sh) terminates TLS on a loopback port with a certificate this test
generates, and passes gRPC on with `grpc_pass`; a real `grpc.secure_channel` client calls
Recommend, a stream and Health through it. The nginx server block is the one SECURITY.md shows."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tastemaker.client import TastemakerClient
from tastemaker.v1 import recommender_service_pb2 as pb
from tests.conftest import free_port
from tests.integration.conftest import MOVIE_ITEMS, make_config, start

pytestmark = pytest.mark.integration

NGINX_CONF = """
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {dir}/tmp/body;
    proxy_temp_path {dir}/tmp/proxy;
    fastcgi_temp_path {dir}/tmp/fastcgi;
    uwsgi_temp_path {dir}/tmp/uwsgi;
    scgi_temp_path {dir}/tmp/scgi;

    server {{
        listen 127.0.0.1:{tls_port} ssl http2;
        ssl_certificate     {dir}/cert.pem;
        ssl_certificate_key {dir}/key.pem;
        ssl_protocols       TLSv1.2 TLSv1.3;

        client_max_body_size 64m;       # the client's batches of items/events
        grpc_read_timeout    3600s;     # long-lived StreamUserEvents streams
        grpc_send_timeout    3600s;

        location / {{
            grpc_pass grpc://127.0.0.1:{grpc_port};
        }}
    }}
}}
"""


def _wait_port(port: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise AssertionError(f"nothing listens on 127.0.0.1:{port} after {timeout_s}s")


@pytest.fixture(scope="module")
def service(ray_session, tmp_path_factory):
    running = start(make_config(tmp_path_factory.mktemp("tls-data")))
    running.client.upsert_items(MOVIE_ITEMS)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def tls_proxy(service, tmp_path_factory):
    """nginx with its own prefix, config and pid file in a temp dir; stops only that process."""
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if nginx is None:
        pytest.fail("nginx is missing: run scripts/install-system-deps.sh (Debian package nginx-light or nginx)")
    workdir = tmp_path_factory.mktemp("nginx")
    workdir.chmod(0o755)  # worker processes (not root) reach the temp folders
    for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (workdir / "tmp" / sub).mkdir(parents=True)
        (workdir / "tmp" / sub).chmod(0o777)
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-keyout", str(workdir / "key.pem"), "-out", str(workdir / "cert.pem"),
            "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
        ],
        check=True, capture_output=True,
    )
    tls_port = free_port()
    conf = workdir / "nginx.conf"
    conf.write_text(NGINX_CONF.format(dir=workdir, tls_port=tls_port, grpc_port=service.config.server.grpc_port))
    # -p: our own prefix; -e: the early error log too, so nothing is written under /var/log.
    argv = [nginx, "-p", str(workdir), "-c", str(conf), "-e", str(workdir / "error.log"), "-g", "daemon off;"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_port(tls_port, 20)
        yield tls_port, (workdir / "cert.pem").read_bytes(), workdir / "cert.pem"
    finally:
        proc.send_signal(signal.SIGQUIT)  # graceful stop of this master (and its worker) only
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_recommend_stream_and_health_through_a_tls_proxy(service, tls_proxy):
    tls_port, cert, _ = tls_proxy
    credentials = grpc.ssl_channel_credentials(root_certificates=cert)
    with grpc.secure_channel(f"127.0.0.1:{tls_port}", credentials) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
    with TastemakerClient(f"127.0.0.1:{tls_port}", api_key=service.api_key, credentials=credentials) as client:
        acks = list(
            client.stream_events(
                [pb.UserEvent(event_id=f"t{n}", user_id="tls-user", event_type=pb.EVENT_TYPE_CLICK, item_id=f"m{n}") for n in (1, 2)]
            )
        )
        assert [a.status for a in acks] == [pb.EVENT_STATUS_ACCEPTED] * 2
        reply = client.recommend("tls-user", page_size=3, min_profile_version=2)
        assert reply.profile_version == 2 and len(reply.items) == 3
        assert {i.item_id for i in reply.items}.isdisjoint({"m1", "m2"})  # seen items are excluded
        # Auth still applies behind the proxy: no key, no answer.
        with TastemakerClient(f"127.0.0.1:{tls_port}", credentials=credentials) as anonymous:
            with pytest.raises(grpc.RpcError) as info:
                anonymous.recommend("tls-user")
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_the_tls_port_refuses_plaintext_and_untrusted_certificates(service, tls_proxy):
    tls_port, _, _ = tls_proxy
    with grpc.insecure_channel(f"127.0.0.1:{tls_port}") as channel:
        with pytest.raises(grpc.RpcError) as info:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert info.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)
    # The system trust store does not know the test's self-signed certificate.
    with grpc.secure_channel(f"127.0.0.1:{tls_port}", grpc.ssl_channel_credentials()) as channel:
        with pytest.raises(grpc.RpcError) as info:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_the_cli_through_the_tls_proxy(service, tls_proxy, capsys, monkeypatch):
    import json

    from tastemaker.cli import main as cli_main

    tls_port, _, cert_path = tls_proxy
    monkeypatch.setenv("TASTEMAKER_API_KEY", service.api_key)
    argv = ["similar", "--item", "m1", "--k", "2", "--target", f"127.0.0.1:{tls_port}", "--tls-ca", str(cert_path), "--json"]
    assert cli_main(argv) == 0
    assert len(json.loads(capsys.readouterr().out)["items"]) == 2

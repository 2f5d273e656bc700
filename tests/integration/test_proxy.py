"""The nginx proxy in front of TorchServe (``serving.proxy``), with real requests through a real nginx.

``served_proxy`` (conftest) puts Debian's nginx in front of the session's TorchServe: TLS with a certificate made
at start, 2 s client timeouts, 5 requests per second and client in bursts of 10. Here: replies through it are
TorchServe's own; only the inference API is forwarded; a query TorchServe would drop is refused; a client over its
rate gets JSON 429s while another client is unaffected; the key and the proxy's folder are private. ``robustserve
serve start --proxy`` starts TorchServe and nginx together and ``serve stop`` stops both. The slow and oversized
clients are in the bad-input corpus (``test_hardening.py``).
"""

from __future__ import annotations

import dataclasses
import http.client
import json
import socket
import stat
import threading
import time
from pathlib import Path

import psutil
import pytest
from helpers import free_ports, free_server_ports, listening_sockets

from serving import proxy, server
from serving.cli import main
from serving.client import Client

pytestmark = pytest.mark.slow

OVER_LIMIT_CLIENT, OTHER_CLIENT = "127.0.0.3", "127.0.0.2"  # loopback source addresses: two clients to the proxy


def request(settings: proxy.ProxySettings, method: str, path: str, token: str, body: bytes | None = None,
            content_type: str = "image/png", source: str | None = None) -> tuple[int, str | None, bytes]:
    """One HTTPS request through the proxy (its certificate checked, for localhost); (status, content type, body)."""
    connection = http.client.HTTPSConnection("localhost", settings.port, timeout=30,
                                             context=proxy.client_context(settings),
                                             source_address=(source, 0) if source else None)
    try:
        connection.request(method, path, body, {"Authorization": f"Bearer {token}", "Content-Type": content_type})
        reply = connection.getresponse()
        return reply.status, reply.getheader("Content-Type"), reply.read()
    finally:
        connection.close()


@pytest.fixture(scope="module")
def keys(served) -> dict[str, str]:
    return server.read_keys(served)


@pytest.fixture(scope="module")
def image(served_runs) -> bytes:
    from serving.bench.common import eval_images

    return eval_images(served_runs["pgd_at"], 1)[1][0]


def test_replies_through_the_proxy_are_torchserves(served, served_proxy, keys, image):
    direct = Client(served.inference_address, token=keys["inference"])
    for path in ("/predictions/pgd_at", "/dhat/predict?head=both", "/invocations?model_name=that_knn&k=5"):
        status, content_type, body = request(served_proxy, "POST", path, keys["inference"], image)
        assert status == 200 and content_type.startswith("application/json")
        assert (status, body) == direct.request("POST", path, image, "image/png")
    # TorchServe's own refusals pass unchanged: the runtime's JSON 4xx, the frontend's token check.
    status, _, body = request(served_proxy, "POST", "/predictions/pgd_at", keys["inference"], b"not an image")
    assert status == 415 and json.loads(body)["model"] == "pgd_at"
    status, _, body = request(served_proxy, "POST", "/predictions/pgd_at", "not-the-key", image)
    assert status == 400 and "InvalidKeyException" in body.decode()


def test_a_query_torchserve_would_drop_is_refused_not_ignored(served, served_proxy, keys, image):
    """Direct, TorchServe serves `/predictions/dhat?head=both` with the default head: it drops the query before the
    handler sees it, as on /explanations and KServe's /v1 and /v2. Through the proxy such a request is a JSON 400 that
    says where the parameter goes."""
    direct = Client(served.inference_address, token=keys["inference"])
    status, body = direct.request("POST", "/predictions/dhat?head=both", image, "image/png")
    assert status == 200 and json.loads(body)["mode"] == "main"  # the silent default the proxy refuses
    for path in ("/predictions/dhat?head=both", "/predictions/dhat/1.0?head=both", "/explanations/pgd_at?x=1",
                 "/v1/models/dhat:predict?head=both", "/v2/models/dhat/infer?head=both", "/predictions/dhat?0"):
        status, content_type, body = request(served_proxy, "POST", path, keys["inference"], image)
        assert (status, content_type) == (400, "application/json"), path
        assert "X-Head" in json.loads(body)["error"] and json.loads(body)["status"] == 400
    status, _, body = request(served_proxy, "POST", "/predictions/dhat", keys["inference"], image)
    assert status == 200 and json.loads(body)["mode"] == "main"  # no query: forwarded as before
    status, _, body = request(served_proxy, "POST", "/dhat/predict?head=both", keys["inference"], image)
    assert status == 200 and json.loads(body)["mode"] == "both"


@pytest.mark.parametrize(("method", "path"), [("GET", "/models"), ("GET", "/api-description"), ("OPTIONS", "/"),
                                              ("GET", "/metrics"), ("POST", "/models?url=pgd_at.mar"),
                                              ("GET", "/predictions")])
def test_only_the_inference_api_is_forwarded(method, path, served_proxy, keys):
    status, content_type, body = request(served_proxy, method, path, keys["inference"])
    assert status == 404 and content_type == "application/json"
    assert "inference API only" in json.loads(body)["error"]


def test_a_client_over_its_rate_gets_429_while_another_client_is_unaffected(served_proxy, keys):
    """One client sends 40 pings at once (over its burst of 10 at 5/s); another sends one every 0.3 s meanwhile."""
    over: list[tuple[int, bytes]] = []
    other: list[int] = []

    def flood() -> None:
        for _ in range(40):
            status, _, body = request(served_proxy, "GET", "/ping", keys["inference"], source=OVER_LIMIT_CLIENT)
            over.append((status, body))

    def steady() -> None:
        for _ in range(6):
            other.append(request(served_proxy, "GET", "/ping", keys["inference"], source=OTHER_CLIENT)[0])
            time.sleep(0.3)

    threads = [threading.Thread(target=flood), threading.Thread(target=steady)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    refused = [json.loads(body) for status, body in over if status == 429]
    assert len(over) == 40 and 10 <= len(over) - len(refused) < 40, [s for s, _ in over]
    assert all(reply["status"] == 429 and "too many requests from this client" in reply["error"] for reply in refused)
    assert {status for status, _ in over} == {200, 429}
    assert other == [200] * 6


def test_the_key_and_the_proxy_folder_are_private(served_proxy):
    assert stat.S_IMODE(served_proxy.prefix.stat().st_mode) == 0o700
    assert stat.S_IMODE(served_proxy.key_file.stat().st_mode) == 0o600
    config = served_proxy.config_file.read_text()
    for line in ("client_body_timeout 2s;", "client_header_timeout 2s;", "client_max_body_size 12582912;",
                 "limit_req zone=requests burst=10 nodelay;", "proxy_request_buffering on;"):
        assert line in config


def test_serve_start_with_proxy_starts_both_and_stop_stops_both(served_store, tmp_path, capsys, monkeypatch):
    ports = free_server_ports()
    [proxy_port] = free_ports(1)
    # The CLI has no flags for TorchServe's gRPC ports; free ones, so that a server on the defaults is no obstacle.
    from serving import cli

    grpc = {name: ports[name] for name in ("grpc_inference_port", "grpc_management_port")}
    with_ports = cli.server_settings
    monkeypatch.setattr(cli, "server_settings", lambda args: dataclasses.replace(with_ports(args), **grpc))
    state = tmp_path / "ts"
    common = ["--model-store", str(served_store), "--state-dir", str(state), "--models", "pgd_at",
              "--inference-port", str(ports["inference_port"]), "--management-port", str(ports["management_port"]),
              "--metrics-port", str(ports["metrics_port"]), "--proxy-port", str(proxy_port)]
    # TorchServe must stay on loopback behind the proxy: refused before anything starts.
    assert main(["serve", "start", "--proxy", "--host", "0.0.0.0", *common]) == 2
    assert "loopback only" in capsys.readouterr().err and not (state / "torchserve.pid").exists()
    settings = server.ServerSettings(model_store=served_store, state_dir=state, models=("pgd_at.mar",), **ports)
    front = proxy.ProxySettings(state_dir=state, upstream=settings.inference_address, port=proxy_port)
    try:
        assert main(["serve", "start", "--proxy", *common]) == 0
        shown = json.loads(capsys.readouterr().out)
        assert shown["proxy"]["running"] and shown["proxy"]["address"] == f"https://127.0.0.1:{proxy_port}"
        token = server.read_keys(settings)["inference"]
        status, _, body = request(front, "GET", "/ping", token)
        assert status == 200 and json.loads(body)["status"] == "Healthy"
        nginx_pid, torchserve_pid = shown["proxy"]["pid"], shown["pid"]
        # Every socket TorchServe listens on is on loopback; the proxy listens on its own port only.
        assert {ip for ip, _ in listening_sockets(torchserve_pid)} == {"127.0.0.1"}
        assert listening_sockets(nginx_pid) == {("127.0.0.1", proxy_port)}
        assert main(["serve", "stop", "--state-dir", str(state), "--proxy-port", str(proxy_port)]) == 0
        assert capsys.readouterr().out.strip() == "stopped proxy and TorchServe"
        assert not psutil.pid_exists(nginx_pid) and not psutil.pid_exists(torchserve_pid)
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", proxy_port), timeout=2).close()
    finally:
        proxy.stop(front)
        server.stop(settings)


def test_the_proxy_refuses_a_public_torchserve_and_half_a_tls_pair(tmp_path: Path):
    with pytest.raises(proxy.ProxyError, match="loopback only"):
        proxy.ProxySettings(state_dir=tmp_path, upstream="http://10.0.0.5:8080").check()
    with pytest.raises(proxy.ProxyError, match="both the TLS certificate and its key"):
        proxy.ProxySettings(state_dir=tmp_path, upstream="http://127.0.0.1:8080", tls_cert=tmp_path / "c.pem").check()

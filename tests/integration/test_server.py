"""serving.server against a real TorchServe on loopback, with a model-free echo handler archived here."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path

import psutil
import pytest
from helpers import free_server_ports, listening_sockets

from serving.server import ServerError, ServerSettings, read_keys, start, status, stop

pytestmark = pytest.mark.slow

# Replies JSON for each request of a batch: 400 for bodies that contain "bad", counts each outcome in a
# custom Prometheus counter, and says which Python runs it.
ECHO_HANDLER = '''
import json
import sys

from ts.metrics.metric_type_enum import MetricTypes


class Echo:
    def initialize(self, context):
        self.requests = context.metrics.add_metric_to_cache(
            "EchoRequests", unit="count", dimension_names=["ModelName", "Outcome"], metric_type=MetricTypes.COUNTER)

    def handle(self, data, context):
        replies = []
        for i, row in enumerate(data):
            body = row["body"].decode()  # every body arrives undecoded (decode_input_request=false), JSON too
            outcome = "bad" if "bad" in body else "ok"
            if outcome == "bad":
                context.set_response_status(400, "Bad Request", idx=i)
            self.requests.add_or_update(1, [context.model_name, outcome])
            replies.append(json.dumps({"echo": body, "python": sys.executable}))
        return replies
'''

BROKEN_HANDLER = '''
class Broken:
    def initialize(self, context):
        raise RuntimeError("archive check failed: digest mismatch")

    def handle(self, data, context):
        return data
'''


def _call(url: str, token: str | None = None, data: bytes | None = None, method: str | None = None) -> tuple[int, str]:
    headers = {"Content-Type": "text/plain"} | ({"Authorization": f"Bearer {token}"} if token else {})
    request = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def _settings(root: Path, handler_source: str, names: list[str], **fields) -> ServerSettings:
    """A model store under root with one archive per name of the given handler, and free ports."""
    store = root / "store"
    store.mkdir()
    handler = root / "handler.py"
    handler.write_text(handler_source)
    for name in names:  # no --serialized-file: the handlers need no model
        subprocess.run([Path(sys.executable).with_name("torch-model-archiver"), "--model-name", name,
                        "--version", "1.0", "--handler", str(handler), "--export-path", str(store)], check=True)
    return ServerSettings(model_store=store, state_dir=root / "state", **free_server_ports(), **fields)


@pytest.fixture(scope="module")
def settings(tmp_path_factory) -> ServerSettings:
    # spare.mar is in the store but not loaded at start: registering it must work.
    return _settings(tmp_path_factory.mktemp("torchserve"), ECHO_HANDLER, ["echo", "spare"],
                     batch_size=4, max_batch_delay_ms=50, models=("echo.mar",))


@pytest.fixture(scope="module")
def server(settings):
    try:
        yield start(settings, wait_s=60)
    finally:
        stop(settings)


@pytest.fixture(scope="module")
def keys(server, settings) -> dict[str, str]:
    return read_keys(settings)


def test_start_brings_the_echo_model_up(server, settings, keys):
    assert server.running and server.healthy and server.models == {"echo": ["READY"]}
    assert status(settings) == server
    assert server.key_file == settings.state_dir.absolute() / "key_file.json" and server.key_file.is_file()
    code, text = _call(f"{settings.management_address}/models/echo", keys["management"])
    assert code == 200 and json.loads(text)[0]["batchSize"] == 4  # from settings, via config.properties


def test_inference_needs_the_inference_token(server, settings, keys):
    url = f"{settings.inference_address}/predictions/echo"
    for wrong in (None, keys["management"]):  # TorchServe 0.12 answers 400 InvalidKeyException, not 401
        code, text = _call(url, wrong, b"hello")
        assert code == 400 and "InvalidKeyException" in text
    code, text = _call(url, keys["inference"], b"hello")
    assert code == 200 and json.loads(text) == {"echo": "hello", "python": sys.executable}


def test_json_bodies_reach_the_handler_as_the_bytes_sent(server, settings, keys):
    """TorchServe's worker would json.loads an application/json body before the handler could check its size
    (and log a traceback when it does not parse): the runtime parses JSON itself, after its limits."""
    assert "decode_input_request=false" in settings.config_file.read_text().splitlines()
    request = urllib.request.Request(f"{settings.inference_address}/predictions/echo", data=b'{"a": [1, 2]}',
                                     headers={"Content-Type": "application/json",
                                              "Authorization": f"Bearer {keys['inference']}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        assert json.loads(response.read())["echo"] == '{"a": [1, 2]}'  # a decoded body would have failed .decode()


def test_each_request_of_a_batch_gets_its_own_status(server, settings, keys):
    bodies = [f"{kind} {i}".encode() for i, kind in enumerate(["ok", "bad", "ok", "bad"])]
    url = f"{settings.inference_address}/predictions/echo"
    with ThreadPoolExecutor(len(bodies)) as pool:
        replies = list(pool.map(lambda body: _call(url, keys["inference"], body), bodies))
    assert [code for code, _ in replies] == [200, 400, 200, 400]
    assert [json.loads(text)["echo"].encode() for _, text in replies] == bodies


def test_management_needs_the_management_token(server, settings, keys):
    url = f"{settings.management_address}/models"
    for wrong in (None, keys["inference"]):
        code, text = _call(url, wrong)
        assert code == 400 and "InvalidKeyException" in text
    assert _call(url, keys["management"])[0] == 200


def test_models_register_only_from_the_model_store(server, settings, keys, tmp_path):
    outside = tmp_path / "elsewhere.mar"
    shutil.copy(settings.model_store / "spare.mar", outside)

    def register(url: str) -> tuple[int, str]:
        query = urllib.parse.urlencode({"url": url, "initial_workers": 0, "synchronous": "true"})
        return _call(f"{settings.management_address}/models?{query}", keys["management"], method="POST")

    for url in ("https://example.com/x.mar", outside.as_uri()):
        code, text = register(url)
        assert code == 404 and "does not match any allowed URL" in text
    code, text = register(str(outside))  # read as a file name in the store, which has no elsewhere.mar
    assert code == 404 and "Model not found" in text
    assert register("spare.mar")[0] == 200
    assert _call(f"{settings.management_address}/models/spare", keys["management"], method="DELETE")[0] == 200


def test_every_listening_socket_is_on_loopback(server, settings):
    listening = listening_sockets(server.pid)
    assert {port for _, port in listening} == set(settings.ports.values())
    assert {ip for ip, _ in listening} == {"127.0.0.1"}


def test_metrics_are_prometheus_text_with_the_handlers_counter(server, settings, keys):
    _call(f"{settings.inference_address}/predictions/echo", keys["inference"], b"counted")
    code, text = _call(f"{settings.metrics_address}/metrics")
    assert code == 200
    assert "# TYPE ts_inference_requests_total counter" in text
    assert 'EchoRequests{ModelName="echo",Outcome="ok",' in text


def test_start_refuses_a_second_server(server, settings):
    with pytest.raises(ServerError, match="already running"):
        start(settings)
    with pytest.raises(ServerError, match=f"inference port {settings.inference_port},.*already in use"):
        start(replace(settings, state_dir=settings.state_dir.parent / "other"))


def test_stop_stops_everything_once(server, settings):  # last: the module's server is gone afterwards
    frontend = psutil.Process(server.pid)
    family = [frontend, *frontend.children(recursive=True)]
    assert stop(settings)
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in family)
    with ExitStack() as stack:  # every port can be listened on again (SO_REUSEADDR: TIME_WAIT does not count)
        for port in settings.ports.values():
            probe = stack.enter_context(socket.socket())
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(("127.0.0.1", port))
    assert not status(settings).running
    assert not stop(settings)


def test_start_fails_fast_on_a_model_whose_initialize_raises(tmp_path):
    settings = _settings(tmp_path, BROKEN_HANDLER, ["broken"])
    with pytest.raises(ServerError, match="Failed to load model broken, exception archive check failed") as err:
        start(settings, wait_s=60)
    assert str(settings.log_file) in str(err.value)
    assert not status(settings).running and not settings.pid_file.exists()


def test_with_a_verify_key_only_signed_archives_start_and_the_model_api_is_off(tmp_path):
    from serving.signing import SignatureError, generate_keys, load_signing_key, sign_archive

    settings = _settings(tmp_path, ECHO_HANDLER, ["echo", "spare"], models=("echo.mar",))
    signing, verify = generate_keys(tmp_path / "keys")
    settings = replace(settings, verify_key=verify)
    with pytest.raises(SignatureError, match="echo.mar has no signature"):
        start(settings, wait_s=60)
    assert not status(settings).running and not settings.pid_file.exists()  # refused before anything started

    echo = settings.model_store / "echo.mar"
    sign_archive(echo, load_signing_key(signing))
    shutil.copy(echo, tmp_path / "echo.mar")
    shutil.copy(settings.model_store / "spare.mar", echo)  # swapped after signing
    with pytest.raises(SignatureError, match="echo.mar does not match its signature: the archive changed"):
        start(settings, wait_s=60)
    assert not status(settings).running

    shutil.copy(tmp_path / "echo.mar", echo)  # the signed archive back
    try:
        assert start(settings, wait_s=60).models == {"echo": ["READY"]}
        keys = read_keys(settings)
        assert _call(f"{settings.inference_address}/predictions/echo", keys["inference"], b"hi")[0] == 200
        # spare.mar is unsigned and not loaded at start; with the model API off it cannot be registered later.
        query = urllib.parse.urlencode({"url": "spare.mar", "initial_workers": 1, "synchronous": "true"})
        code, text = _call(f"{settings.management_address}/models?{query}", keys["management"], method="POST")
        assert code == 405 and "MethodNotAllowedException" in text  # TorchServe 0.12's answer with the API off
        assert "spare" not in _call(f"{settings.management_address}/models", keys["management"])[1]
    finally:
        stop(settings)

"""TorchServe 0.12 configuration and process control: one server per ``state_dir``, loopback only, token auth on.

``start`` writes ``state_dir/config.properties`` and launches TorchServe's own launcher
(``python -m ts.model_server``, i.e. the ``torchserve`` script) with the current interpreter, so the
frontend hands ``sys.executable`` to its workers (``--python``) and they run in this virtualenv.
Everything the server writes lands in ``state_dir``:

* ``config.properties``: what ``write_config`` wrote;
* ``key_file.json``: the API tokens. TorchServe 0.12 writes it into the JVM's working directory, so
  the launch runs with ``cwd=state_dir``; ``read_keys`` reads it;
* ``torchserve.pid``: the Java frontend's pid, written atomically once it runs;
* ``logs/``: TorchServe's ``ts_log.log``, ``model_log.log``, ``*_metrics.log``, ``access_log.log``,
  plus ``console.log`` (the launcher's and the JVM's stdout and stderr, worker output included);
* ``tmp/``: the launcher's ``TMPDIR`` and the JVM's ``java.io.tmpdir``, emptied at each start. The
  launcher keeps its pid file there (``torchserve --stop`` finds the server through it), the frontend
  extracts archives there (``tmp/models/<id>/`` is a handler's ``model_dir``) and puts its workers'
  Unix sockets there. By default all three go to the shared ``/tmp``, where two servers on one
  machine would stop each other or refuse to start.

Clients authenticate with ``Authorization: Bearer <key>``: the inference key for the inference API
(``/ping`` included), the management key for the management API. A missing or wrong key is answered
``400`` with ``"type": "InvalidKeyException"``. The metrics API takes no token.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import zipfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil  # TorchServe's own launcher depends on it

from training.errors import RobustServeError

# The Java frontend's main class: it is in the command line of every TorchServe JVM.
FRONTEND_CLASS = "org.pytorch.serve.ModelServer"
# TorchServe downloads (or copies) an archive only when its url fully matches one of these patterns.
# Any other http(s):// or file:// url is refused with "does not match any allowed URL(s)", and anything
# else is read as a file in model_store (TorchServe keeps only the base name, and refuses "..").
# "^$" matches no url (an empty one is refused before the check), so archives load from model_store only.
ALLOWED_URLS = "^$"
# The frontend heap: TorchServe's default (a quarter of RAM) is too much on a shared machine.
JVM_ARGS = "-Xmx1g"
# Worker sockets are tmp/.ts.sock.<port> and a Unix socket path holds at most 107 bytes.
MAX_SOCKET_PATH = 107
POLL_S = 0.25


class ServerError(RobustServeError, RuntimeError):
    """TorchServe cannot start, is in the way, or did not come up; the message says which and where the log is."""


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports free on loopback right now (for servers that must not collide: tests, benchmarks)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]


def free_server_ports() -> dict[str, int]:
    """``ServerSettings`` port fields, all free."""
    return dict(zip(["inference_port", "management_port", "metrics_port", "grpc_inference_port",
                     "grpc_management_port"], free_ports(5), strict=True))


@dataclass(frozen=True)
class ServerSettings:
    """Where and how one TorchServe instance runs. Relative paths are relative to the caller's working directory.

    Batching (``batch_size``, ``max_batch_delay_ms``) and ``response_timeout_s`` reach the models loaded
    at start through config.properties' per-model ``models`` JSON. An archive's own ``model-config.yaml``
    takes precedence over it, and a model registered later over the management API takes its batching
    from that request (``batch_size``, ``max_batch_delay``; TorchServe's default is 1 and 100 ms).
    """

    model_store: Path = Path("model_store")
    state_dir: Path = Path("runs/torchserve")  # config.properties, logs, key_file.json, pid live here
    host: str = "127.0.0.1"  # bind address for all APIs, gRPC included; only change on request
    inference_port: int = 8080
    management_port: int = 8081
    metrics_port: int = 8082
    # TorchServe always starts its two gRPC servers too; they need ports of their own.
    grpc_inference_port: int = 7070
    grpc_management_port: int = 7071
    workers: int = 1  # default_workers_per_model
    batch_size: int = 8  # TorchServe dynamic batching: batchSize per model
    # How long TorchServe holds a lone request for others to join its batch: every request pays it when the
    # load is light (a ResNet-18 request at 1 client: p50 +4.7 ms at 5 ms against 2 ms, measured here).
    # 0 is not "no wait": TorchServe then fell back to a ~100 ms wait (p50 123 ms).
    max_batch_delay_ms: int = 2
    response_timeout_s: int = 120
    # TorchServe's default is 60 minutes, after which every client would need a fresh key.
    token_expiration_min: int = 7 * 24 * 60
    models: tuple[str, ...] = ()  # .mar file names in model_store to load at start; empty: every .mar there
    # TorchServe's max_request_size: the frontend answers a larger body itself, with a bare 413 (no body, no
    # content type) and a closed connection, often before the client has finished sending (which then sees a
    # reset). Its default, 6553500 bytes, is below what the runtime accepts (serving.decode.InputSpec.max_bytes,
    # 8 MiB, which is ~11.2 MB as base64 JSON); at 64 MiB every body up to that size reaches the handler and an
    # oversized image gets the runtime's JSON 413 saying what the limit is. It bounds the memory one request can
    # take in the frontend and the worker; a reverse proxy in front should enforce a lower limit (SECURITY.md).
    max_request_bytes: int = 64 * 1024 * 1024
    # An Ed25519 public key (serving.signing): every archive loaded at start must carry its valid signature,
    # and the model API is off, so no archive can be registered later without that check.
    verify_key: Path | None = None

    @property
    def inference_address(self) -> str:
        return f"http://{self.host}:{self.inference_port}"

    @property
    def management_address(self) -> str:
        return f"http://{self.host}:{self.management_port}"

    @property
    def metrics_address(self) -> str:
        return f"http://{self.host}:{self.metrics_port}"

    @property
    def ports(self) -> dict[str, int]:
        return {"inference": self.inference_port, "management": self.management_port,
                "metrics": self.metrics_port, "gRPC inference": self.grpc_inference_port,
                "gRPC management": self.grpc_management_port}

    # Absolute, because TorchServe runs with its working directory in state_dir.
    @property
    def config_file(self) -> Path:
        return self.state_dir.absolute() / "config.properties"

    @property
    def key_file(self) -> Path:
        return self.state_dir.absolute() / "key_file.json"

    @property
    def pid_file(self) -> Path:
        return self.state_dir.absolute() / "torchserve.pid"

    @property
    def log_dir(self) -> Path:
        return self.state_dir.absolute() / "logs"

    @property
    def log_file(self) -> Path:
        return self.log_dir / "console.log"

    @property
    def tmp_dir(self) -> Path:
        return self.state_dir.absolute() / "tmp"


@dataclass(frozen=True)
class ServerStatus:
    """What ``status`` found. ``models`` maps each registered model to its workers' states (``READY`` when serving)."""

    running: bool
    healthy: bool  # /ping answered "Healthy"
    pid: int | None
    inference_address: str
    management_address: str
    metrics_address: str
    key_file: Path
    log_file: Path
    models: dict[str, list[str]]

    def as_dict(self) -> dict[str, Any]:
        return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}


# ---------------------------------------------------------------------------------------------- config


def _archives(settings: ServerSettings) -> dict[str, tuple[str, str]]:
    """Archive file name -> (model name, version) from its manifest, for the archives loaded at start, in order."""
    store = settings.model_store
    if not store.is_dir():
        raise ServerError(f"no model store at {store.absolute()}")
    names = settings.models or tuple(sorted(p.name for p in store.glob("*.mar")))
    archives: dict[str, tuple[str, str]] = {}
    for name in names:
        path = store / name
        if Path(name).name != name or not path.is_file():
            raise ServerError(f"{name!r} is not an archive file in the model store {store.absolute()}")
        try:
            with zipfile.ZipFile(path) as mar:
                model = json.loads(mar.read("MAR-INF/MANIFEST.json"))["model"]
        except (zipfile.BadZipFile, KeyError, ValueError) as err:
            raise ServerError(f"{path} is not a TorchServe archive: {err}") from err
        archives[name] = (model["modelName"], model["modelVersion"])
    return archives


def _properties(settings: ServerSettings) -> dict[str, str]:
    archives = _archives(settings)
    # Loading as NAME=FILE pins the model name to the manifest's, which is what the `models` JSON is keyed by.
    per_model: dict[str, dict[str, dict[str, int]]] = {}
    for name, version in archives.values():
        per_model.setdefault(name, {})[version] = {
            "batchSize": settings.batch_size, "maxBatchDelay": settings.max_batch_delay_ms,
            "responseTimeout": settings.response_timeout_s}
    return {
        "inference_address": settings.inference_address,
        "management_address": settings.management_address,
        "metrics_address": settings.metrics_address,
        "grpc_inference_address": settings.host,
        "grpc_management_address": settings.host,
        "grpc_inference_port": str(settings.grpc_inference_port),
        "grpc_management_port": str(settings.grpc_management_port),
        "model_store": str(settings.model_store.absolute()),
        "load_models": ",".join(f"{name}={file}" for file, (name, _) in archives.items()),
        "models": json.dumps(per_model),
        "allowed_urls": ALLOWED_URLS,
        # The model API (register, unregister) is off by default; it stays behind the management key, and off
        # when archives must be signed (a registered archive would skip the check in start).
        "enable_model_api": "false" if settings.verify_key else "true",
        "token_expiration_min": str(settings.token_expiration_min),
        "default_workers_per_model": str(settings.workers),
        "default_response_timeout": str(settings.response_timeout_s),
        "metrics_mode": "prometheus",
        # Handlers' own metrics (context.metrics) reach /metrics without being declared in a metrics yaml.
        "model_metrics_auto_detect": "true",
        "disable_system_metrics": "true",  # no Python collector process spawned every minute
        "install_py_dep_per_model": "false",  # archives never pip-install anything
        "max_request_size": str(settings.max_request_bytes),
        # Request bodies reach the handler as the bytes that came: the worker would otherwise json.loads every
        # application/json body before the handler could check its size (a 60 MB body cost ~2 s and ~400 MB),
        # and log a traceback for each one that does not parse. The runtime parses JSON after its limits.
        "decode_input_request": "false",
        "vmargs": JVM_ARGS,
    }


def _write_atomic(path: Path, text: str) -> None:
    """Readers see the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False) as f:
        f.write(text)
    os.replace(f.name, path)


def write_config(settings: ServerSettings) -> Path:
    """Write ``state_dir/config.properties`` for ``settings`` (atomically) and return its path.

    Raises ServerError when the model store or a named archive is missing or not an archive.
    """
    lines = [f"{key}={value}" for key, value in _properties(settings).items()]
    _write_atomic(settings.config_file, "# written by serving.server.write_config\n" + "\n".join(lines) + "\n")
    return settings.config_file


def read_config(settings: ServerSettings) -> dict[str, str]:
    """The properties ``write_config`` wrote into ``state_dir`` (empty when it wrote none): e.g. the addresses
    of a server started with other ports than ``settings`` has."""
    if not settings.config_file.is_file():
        return {}
    pairs = (line.partition("=") for line in settings.config_file.read_text().splitlines() if not line.startswith("#"))
    return {key.strip(): value.strip() for key, _, value in pairs}


# ---------------------------------------------------------------------------------------------- processes


def _server_process(settings: ServerSettings) -> psutil.Process | None:
    """The running frontend started from this state_dir, or None (no pid file, or its pid is now something else)."""
    try:
        process = psutil.Process(int(settings.pid_file.read_text()))
        command = process.cmdline()
        alive = process.status() != psutil.STATUS_ZOMBIE
    except (OSError, ValueError, psutil.Error):
        return None
    return process if alive and FRONTEND_CLASS in command and str(settings.config_file) in command else None


def _launcher(settings: ServerSettings, *args: str) -> None:
    """Run TorchServe's launcher (``torchserve ARGS``) the way every call must: cwd, TMPDIR, logs in state_dir."""
    env = dict(os.environ, TMPDIR=str(settings.tmp_dir), TEMP=str(settings.tmp_dir),
               LOG_LOCATION=str(settings.log_dir), METRICS_LOCATION=str(settings.log_dir))
    env.pop("TS_CONFIG_FILE", None)  # it would override --ts-config
    # The JVM inherits the log file as its stdout and keeps writing to it after the launcher exits.
    with open(settings.log_file, "ab") as log:
        subprocess.run([sys.executable, "-m", "ts.model_server", *args], cwd=settings.state_dir.absolute(),
                       env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, timeout=60,
                       check=False)


def _port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        # As the JVM binds: with SO_REUSEADDR, so that connections in TIME_WAIT do not count.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return True
    return False


def _log_tail(settings: ServerSettings, lines: int = 30) -> str:
    try:
        tail = settings.log_file.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return f"(no log at {settings.log_file})"
    return f"log {settings.log_file}, last lines:\n" + "\n".join(tail)


def _gone(process: psutil.Process) -> bool:
    try:
        return not process.is_running() or process.status() == psutil.STATUS_ZOMBIE
    except psutil.Error:
        return True


# ---------------------------------------------------------------------------------------------- HTTP


def read_keys(settings: ServerSettings) -> dict[str, str]:
    """The API tokens, ``{"management": ..., "inference": ...}``, from TorchServe's ``state_dir/key_file.json``.

    The file (mode 0600) holds ``{"management": {"key", "expiration time"}, "inference": {...}, "API": {"key"}}``;
    TorchServe writes it at start and deletes it at stop. Send a key as ``Authorization: Bearer <key>``.
    """
    try:
        keys = json.loads(settings.key_file.read_text())
        return {"management": keys["management"]["key"], "inference": keys["inference"]["key"]}
    except (OSError, ValueError, KeyError) as err:
        raise ServerError(f"no TorchServe key file at {settings.key_file} (is the server running?): {err}") from err


def _get_json(url: str, token: str) -> Any:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=5) as response:
        return json.loads(response.read())


def _healthy(settings: ServerSettings, keys: dict[str, str]) -> bool:
    try:
        return _get_json(f"{settings.inference_address}/ping", keys["inference"]).get("status") == "Healthy"
    except (OSError, ValueError):  # not listening yet (URLError is an OSError)
        return False


def _worker_states(settings: ServerSettings, keys: dict[str, str], names: list[str] | None = None) -> dict[str, list[str]]:
    """Model name -> its workers' states (default version), for ``names`` or every registered model."""
    api, token = settings.management_address, keys["management"]
    if names is None:
        names = [m["modelName"] for m in _get_json(f"{api}/models?limit=1000", token)["models"]]
    return {name: [w["status"] for w in _get_json(f"{api}/models/{name}", token)[0]["workers"]] for name in names}


def _failed_load(settings: ServerSettings) -> str | None:
    """TorchServe's message when a handler's initialize raised (it would retry forever), or None."""
    marker = "MODEL_LOG - Failed to load model"
    try:
        lines = settings.log_file.read_text(errors="replace").splitlines()
    except OSError:
        return None
    return next((line.split("MODEL_LOG - ", 1)[1] for line in lines if marker in line), None)


# ---------------------------------------------------------------------------------------------- public


def status(settings: ServerSettings) -> ServerStatus:
    """Whether the server of ``settings.state_dir`` runs, its pid, addresses, key file and models' worker states.

    ``models`` comes from the management API (with the management key); it is empty while the server is
    down or its APIs do not answer yet.
    """
    process = _server_process(settings)
    healthy, models = False, {}
    if process is not None and settings.key_file.is_file():
        keys = read_keys(settings)
        healthy = _healthy(settings, keys)
        if healthy:
            models = _worker_states(settings, keys)
    return ServerStatus(running=process is not None, healthy=healthy, pid=process.pid if process else None,
                        inference_address=settings.inference_address,
                        management_address=settings.management_address,
                        metrics_address=settings.metrics_address, key_file=settings.key_file,
                        log_file=settings.log_file, models=models)


def start(settings: ServerSettings, *, wait_s: float = 120) -> ServerStatus:
    """Start TorchServe and wait until ``/ping`` answers Healthy and every model loaded at start has a READY worker.

    Raises ServerError, saying which, when this state_dir's server already runs, a port is taken, an
    archive is missing (SignatureError when ``verify_key`` is set and an archive's signature does not
    verify: then nothing is started), or the server does not come up within ``wait_s`` (a handler's ``initialize``
    raised, the JVM exited, ...); then the message has the tail of ``state_dir/logs/console.log`` and the
    half-started server is stopped. The API keys are in ``state_dir/key_file.json`` (see ``read_keys``).
    """
    running = _server_process(settings)
    if running is not None:
        raise ServerError(f"TorchServe from {settings.state_dir} is already running (pid {running.pid}); "
                          f"stop it first. Its log: {settings.log_file}")
    taken = [f"{api} port {port}" for api, port in settings.ports.items() if _port_in_use(settings.host, port)]
    if taken:
        raise ServerError(f"cannot start TorchServe: {', '.join(taken)} already in use on {settings.host}")
    if len(str(settings.tmp_dir / ".ts.sock.65535")) > MAX_SOCKET_PATH:
        raise ServerError(f"state_dir {settings.state_dir.absolute()} is too deep for TorchServe's worker "
                          f"sockets (at most {MAX_SOCKET_PATH} bytes for tmp/.ts.sock.PORT); pick a shorter path")
    archives = _archives(settings)
    if settings.verify_key is not None:
        from .signing import load_verify_key, verify_archive

        key = load_verify_key(settings.verify_key)
        for file in archives:
            verify_archive(settings.model_store / file, key)
    expected = [name for name, _ in archives.values()]
    write_config(settings)
    shutil.rmtree(settings.tmp_dir, ignore_errors=True)  # archives extracted and sockets of earlier runs
    # The frontend extracts the archives here, DUCAT's secret pairing.json included: for this user only.
    settings.tmp_dir.mkdir(parents=True, mode=0o700)
    settings.log_dir.mkdir(parents=True, exist_ok=True)
    settings.log_file.write_text("")  # this run's console only; TorchServe's own logs keep the history
    _launcher(settings, "--start", "--ncs", "--ts-config", str(settings.config_file))
    try:
        pid = int((settings.tmp_dir / ".model_server.pid").read_text())
    except (OSError, ValueError):
        raise ServerError(f"TorchServe's launcher did not start the server; {_log_tail(settings)}") from None
    _write_atomic(settings.pid_file, f"{pid}\n")
    try:
        _wait_ready(settings, expected, wait_s)
    except ServerError as err:
        stop(settings)
        raise ServerError(f"{err}; {_log_tail(settings)}") from None
    return status(settings)


def _ready(settings: ServerSettings, expected: list[str]) -> bool:
    """Healthy, and every expected model has a READY worker; False while any of it does not answer yet."""
    try:
        keys = read_keys(settings)
        states = _worker_states(settings, keys, expected)
    except (ServerError, OSError, ValueError):  # no key file yet, APIs not up (URLError, HTTPError are OSErrors)
        return False
    return _healthy(settings, keys) and all("READY" in workers for workers in states.values())


def _wait_ready(settings: ServerSettings, expected: list[str], wait_s: float) -> None:
    deadline = time.monotonic() + wait_s
    while not _ready(settings, expected):
        if _server_process(settings) is None:
            raise ServerError("TorchServe exited while starting")
        failed = _failed_load(settings)
        if failed:
            raise ServerError(failed)
        if time.monotonic() > deadline:
            raise ServerError(f"TorchServe did not get healthy with every model READY within {wait_s:g} s")
        time.sleep(POLL_S)


def stop(settings: ServerSettings, *, wait_s: float = 60) -> bool:
    """Stop the server of ``settings.state_dir``: ``torchserve --stop``, then make sure the JVM and its workers are gone.

    Returns False (and changes nothing but a stale pid file) when no server from this state_dir was running.
    """
    process = _server_process(settings)
    if process is None:
        settings.pid_file.unlink(missing_ok=True)
        return False
    family = [process, *process.children(recursive=True)]  # the Python workers
    _launcher(settings, "--stop")  # SIGTERM to the JVM, which shuts its workers down
    deadline = time.monotonic() + wait_s
    while not all(_gone(p) for p in family) and time.monotonic() < deadline:
        time.sleep(POLL_S)
    for leftover in (p for p in family if not _gone(p)):
        leftover.kill()
    psutil.wait_procs(family, timeout=10)
    settings.pid_file.unlink(missing_ok=True)
    settings.key_file.unlink(missing_ok=True)  # the launcher removes it too, when its pid file was there
    return True


@contextlib.contextmanager
def running(settings: ServerSettings, *, wait_s: float = 120) -> Iterator[ServerSettings]:
    """TorchServe started with ``settings`` for the ``with`` block and stopped on the way out, whatever happens
    (a failed start included: ``stop`` then ends what did come up)."""
    try:
        start(settings, wait_s=wait_s)
        yield settings
    finally:
        stop(settings)

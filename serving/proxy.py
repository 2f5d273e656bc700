"""nginx in front of TorchServe: TLS, client read timeouts, body-size and per-client rate limits.

TorchServe 0.12 has no read timeout (a client that promises a body and never sends it holds its connection
for good) and no per-client limits, so public traffic reaches it only through Debian's nginx, which
``make`` installs like the other system parts. ``start`` writes everything into ``state_dir/proxy/``
(mode 0700):

* ``nginx.conf``: what ``nginx_config`` wrote, from ``ProxySettings``;
* ``tls/cert.pem`` and ``tls/key.pem`` (0600): a self-signed certificate for ``localhost``, 127.0.0.1 and
  the proxy's host, made at every start with ``cryptography`` (the operator's own pair when given);
* ``logs/``: nginx's ``access.log`` and ``error.log``, and ``console.log`` (its stdout and stderr);
* ``tmp/``: nginx's temporary files (request bodies are buffered whole before TorchServe sees them);
* ``nginx.pid``: the master's pid, written by nginx.

nginx runs in the foreground (``daemon off``) as a child in its own session, with this prefix and config
only, as the user that runs robustserve. It forwards the inference API only (``/ping``, ``/predictions``,
``/explanations``, ``/invocations``, ``/{model}/predict``, KServe's ``/v1`` and ``/v2``): the management
and metrics APIs, and every other path, are a JSON 404. It answers what it refuses itself with JSON like
the runtime's (``{"error": ..., "status": ...}``): 408 for a client too slow to send its headers or body,
413 for a body over ``max_body_bytes`` (from ``Content-Length``, before anything is forwarded), 429 for a
client over its request rate (``limit_req``, per client address) or connection count, 497 for plain HTTP
on the TLS port, 502/504 when TorchServe does not answer, 400 for a query string on ``/predictions``,
``/explanations``, ``/v1/models`` or ``/v2/models`` (TorchServe would drop it unseen: a ``?head=both`` there would
serve the default head). TorchServe's own replies pass unchanged.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil

from training.checkpoint import write_text
from training.errors import RobustServeError

from .server import POLL_S

NGINX = "nginx"  # Debian's, on PATH (/usr/sbin)
PROXY_DIR = "proxy"  # in the server's state_dir
# The inference API's routes (TorchServe 0.12) as nginx locations: exact paths, and one regex for the rest
# (a prefix location ending in "/" would redirect the bare path to it, a 301 to nowhere useful).
INFERENCE_EXACT = ("/ping", "/invocations")
INFERENCE_ROUTES = r"^/[^/]+/predict$"
# TorchServe 0.12 drops the query string on these routes before the handler sees the request (only /{model}/predict
# and /invocations pass it on): `?head=both` would silently serve the default head, so the proxy refuses a query
# there instead of forwarding it.
QUERY_DROPPED_ROUTES = r"^/(predictions|explanations|v1/models|v2/models)/"
QUERY_DROPPED = ("TorchServe drops query parameters on /predictions, /explanations and the KServe /v1 and /v2 "
                 "routes, so this one would be ignored: send it in the JSON body, a form field or a header (X-Head, "
                 "X-Mode, X-K, X-Top-K), or as a query on /{model}/predict or /invocations?model_name={model}")
CERT_DAYS = 30  # the self-signed certificate is made again at every start


class ProxyError(RobustServeError, RuntimeError):
    """nginx is missing, cannot start or is in the way; the message says which and where its log is."""


@dataclass(frozen=True)
class ProxySettings:
    """Where the proxy listens, what it forwards to and the limits it enforces on each client.

    ``upstream``: TorchServe's inference address (loopback). ``host``: the proxy's bind address, the only
    one that should ever be public. The limits: ``max_body_bytes`` covers every valid request (an 8 MiB image
    as base64 JSON is 11.2 MB); ``client_timeout_s`` is nginx's client_header_timeout, client_body_timeout
    (between two reads of the body) and send_timeout; ``rate_per_s`` with ``burst`` is the per-client request
    rate (nginx's leaky bucket: requests beyond the burst get a 429 at once), ``connections_per_client`` the
    open connections one address may hold.
    """

    state_dir: Path  # the TorchServe state_dir; the proxy's files go in state_dir/proxy
    upstream: str  # e.g. http://127.0.0.1:8080
    host: str = "127.0.0.1"
    port: int = 8443
    tls_cert: Path | None = None  # the operator's certificate chain (PEM); None: a self-signed one made at start
    tls_key: Path | None = None
    max_body_bytes: int = 12 * 1024 * 1024
    client_timeout_s: int = 10
    rate_per_s: int = 20
    burst: int = 40
    connections_per_client: int = 16
    worker_connections: int = 1024

    @property
    def prefix(self) -> Path:
        return self.state_dir.absolute() / PROXY_DIR

    @property
    def config_file(self) -> Path:
        return self.prefix / "nginx.conf"

    @property
    def pid_file(self) -> Path:
        return self.prefix / "nginx.pid"

    @property
    def log_dir(self) -> Path:
        return self.prefix / "logs"

    @property
    def cert_file(self) -> Path:
        return self.tls_cert.absolute() if self.tls_cert else self.prefix / "tls" / "cert.pem"

    @property
    def key_file(self) -> Path:
        return self.tls_key.absolute() if self.tls_key else self.prefix / "tls" / "key.pem"

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"https://{host}:{self.port}"

    def check(self) -> None:
        """Refuse settings that cannot work, before anything starts."""
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ProxyError("give both the TLS certificate and its key, or neither (a self-signed pair is made)")
        for number, name in ((self.max_body_bytes, "max_body_bytes"), (self.client_timeout_s, "client_timeout_s"),
                             (self.rate_per_s, "rate_per_s"), (self.connections_per_client,
                                                                "connections_per_client")):
            if number < 1:
                raise ProxyError(f"the proxy's {name} must be at least 1, got {number}")
        if self.burst < 0:
            raise ProxyError(f"the proxy's burst must be at least 0, got {self.burst}")
        upstream_host = self.upstream.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")
        if not _is_loopback(upstream_host):
            raise ProxyError(f"the proxy forwards to TorchServe on loopback only, got {self.upstream}: keep "
                             "TorchServe on 127.0.0.1 and expose the proxy's host instead")


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


# ---------------------------------------------------------------------------------------------- config


def _json_error(status: int, message: str) -> str:
    """An nginx ``return`` of a JSON error body like the runtime's, quoted for nginx's config syntax."""
    body = json.dumps({"error": message, "status": status})
    return "'" + body.replace("\\", "\\\\").replace("'", "\\'") + "'"


# Status -> the message of the JSON body nginx answers with (its own refusals only).
def _errors(settings: ProxySettings) -> dict[int, str]:
    return {
        400: "the request is malformed",
        404: "no such path on this server: it serves the inference API only (/predictions/{model}, "
             "/{model}/predict, /invocations, /v1 and /v2 models, /explanations, /ping)",
        405: "method not allowed",
        408: f"the client sent nothing for {settings.client_timeout_s} s while sending its request",
        413: f"the request body is larger than the limit of {settings.max_body_bytes} bytes",
        414: "the request line is too long",
        429: f"too many requests from this client: at most {settings.rate_per_s} per second (bursts of "
             f"{settings.burst}) and {settings.connections_per_client} connections",
        494: "the request headers are too large",
        497: "this port speaks HTTPS only",
        500: "internal error in the proxy",
        502: "TorchServe does not answer behind the proxy",
        503: "the service is unavailable",
        504: "TorchServe did not answer in time behind the proxy",
    }


def nginx_config(settings: ProxySettings) -> str:
    """The whole nginx.conf for ``settings``: one server, TLS, the limits, the inference routes, JSON errors."""
    prefix, logs, tmp = settings.prefix, settings.log_dir, settings.prefix / "tmp"
    errors = _errors(settings)
    listen = f"[{settings.host}]" if ":" in settings.host else settings.host
    forward = "proxy_pass http://torchserve;"
    locations = [*(f"        location = {path} {{ {forward} }}" for path in INFERENCE_EXACT),
                 f'        location ~ "{QUERY_DROPPED_ROUTES}" {{ '
                 f'if ($args != "") {{ return 400 {_json_error(400, QUERY_DROPPED)}; }} {forward} }}',
                 f'        location ~ "{INFERENCE_ROUTES}" {{ {forward} }}',
                 f"        location / {{ return 404 {_json_error(404, errors[404])}; }}"]
    error_pages = [f"        error_page {status} = @error{status};" for status in errors if status != 404]
    # 494 (headers too large) and 497 (plain HTTP on the TLS port) are nginx's own codes: answered as 400.
    answered = {status: 400 if status in (494, 497) else status for status in errors}
    named = [f"        location @error{status} {{ return {code} {_json_error(code, errors[status])}; }}"
             for status, code in answered.items() if status != 404]
    return "\n".join([
        "# written by serving.proxy.nginx_config at every `robustserve serve start --proxy`; edits are lost",
        "daemon off;  # a child of robustserve, stopped by `robustserve serve stop`",
        "worker_processes 1;",
        # As root, nginx would run its workers as nobody, who cannot reach the private state_dir: run them as
        # the user that runs robustserve, as TorchServe's workers do (SECURITY.md: run it unprivileged).
        *(["user root;"] if os.geteuid() == 0 else []),
        f"pid {prefix / 'nginx.pid'};",
        f"error_log {logs / 'error.log'} warn;",
        f"events {{ worker_connections {settings.worker_connections}; }}",
        "http {",
        "    default_type application/json;",
        "    server_tokens off;",
        f"    access_log {logs / 'access.log'};",
        *(f"    {kind}_temp_path {tmp / kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")),
        f"    client_header_timeout {settings.client_timeout_s}s;",
        f"    client_body_timeout {settings.client_timeout_s}s;",
        f"    send_timeout {settings.client_timeout_s}s;",
        f"    keepalive_timeout {settings.client_timeout_s}s;",
        f"    client_max_body_size {settings.max_body_bytes};",
        "    large_client_header_buffers 4 8k;",
        # Whole bodies are read before TorchServe sees a byte: a slow client costs nginx a connection, not TorchServe.
        "    proxy_request_buffering on;",
        "    proxy_http_version 1.1;",
        '    proxy_set_header Connection "";',
        "    proxy_set_header Host $host;",
        "    proxy_read_timeout 180s;  # TorchServe's own response timeout is 120 s",
        f"    limit_req_zone $binary_remote_addr zone=requests:1m rate={settings.rate_per_s}r/s;",
        "    limit_conn_zone $binary_remote_addr zone=connections:1m;",
        "    limit_req_status 429;",
        "    limit_conn_status 429;",
        f"    upstream torchserve {{ server {settings.upstream.rstrip('/').split('://', 1)[-1]}; keepalive 16; }}",
        "    server {",
        f"        listen {listen}:{settings.port} ssl;",
        f"        ssl_certificate {settings.cert_file};",
        f"        ssl_certificate_key {settings.key_file};",
        "        ssl_protocols TLSv1.2 TLSv1.3;",
        f"        limit_req zone=requests burst={settings.burst} nodelay;",
        f"        limit_conn connections {settings.connections_per_client};",
        *error_pages,
        *locations,
        *named,
        "    }",
        "}",
        "",
    ])


def self_signed_certificate(settings: ProxySettings) -> None:
    """A new EC P-256 key and a certificate for localhost, 127.0.0.1 and the proxy's host, valid CERT_DAYS days,
    written atomically into ``prefix/tls`` (the key 0600)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    try:
        if settings.host not in ("127.0.0.1", "localhost"):
            names.append(x509.IPAddress(ipaddress.ip_address(settings.host)))
    except ValueError:
        names.append(x509.DNSName(settings.host))
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "robustserve proxy (self-signed)")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
                   .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=CERT_DAYS))
                   .add_extension(x509.SubjectAlternativeName(names), critical=False)
                   .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                   .sign(key, hashes.SHA256()))
    settings.key_file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_text(settings.key_file, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                    serialization.NoEncryption()).decode(), mode=0o600)
    write_text(settings.cert_file, certificate.public_bytes(serialization.Encoding.PEM).decode())


def client_context(settings: ProxySettings) -> ssl.SSLContext:
    """A TLS context that trusts the proxy's certificate (self-signed or the operator's) and checks the name."""
    return ssl.create_default_context(cafile=str(settings.cert_file))


# ---------------------------------------------------------------------------------------------- processes


def nginx_binary() -> str:
    """The path of Debian's nginx, or ProxyError naming the package to install."""
    found = shutil.which(NGINX) or shutil.which(NGINX, path="/usr/sbin:/sbin")
    if found is None:
        raise ProxyError("nginx is not installed: `make install` installs it as root, or run "
                         "sudo apt-get install -y nginx")
    return found


def _proxy_process(settings: ProxySettings) -> psutil.Process | None:
    """The running nginx master started with this config, or None."""
    try:
        process = psutil.Process(int(settings.pid_file.read_text()))
        alive = process.status() != psutil.STATUS_ZOMBIE
        command = process.cmdline()
    except (OSError, ValueError, psutil.Error):
        return None
    return process if alive and str(settings.config_file) in command else None


def status(settings: ProxySettings) -> dict[str, object]:
    """Whether this state_dir's proxy runs, its pid, address and logs."""
    process = _proxy_process(settings)
    return {"running": process is not None, "pid": process.pid if process else None, "address": settings.address,
            "upstream": settings.upstream, "certificate": str(settings.cert_file), "log_dir": str(settings.log_dir)}


def _log_tail(settings: ProxySettings, lines: int = 20) -> str:
    found = []
    for name in ("console.log", "error.log"):
        try:
            found += (settings.log_dir / name).read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            continue
    return f"nginx's log in {settings.log_dir}, last lines:\n" + "\n".join(found[-lines:])


def _listening(settings: ProxySettings) -> bool:
    try:
        with socket.create_connection((settings.host, settings.port), timeout=1):
            return True
    except OSError:
        return False


def start(settings: ProxySettings, *, wait_s: float = 30) -> dict[str, object]:
    """Write the config (and a self-signed certificate), check it with ``nginx -t``, start nginx and wait until
    it listens. Raises ProxyError when nginx is missing, this state_dir's proxy already runs, the port is
    taken, the config does not pass, or nginx exits or does not listen within ``wait_s``."""
    settings.check()
    binary = nginx_binary()
    running = _proxy_process(settings)
    if running is not None:
        raise ProxyError(f"the proxy of {settings.state_dir} is already running (pid {running.pid}); stop it first")
    if _listening(settings):
        raise ProxyError(f"cannot start the proxy: port {settings.port} is already in use on {settings.host}")
    settings.prefix.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(settings.prefix, 0o700)  # keys, logs and buffered request bodies: this user's only
    shutil.rmtree(settings.prefix / "tmp", ignore_errors=True)
    for folder in (settings.log_dir, settings.prefix / "tmp"):
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    if settings.tls_cert is None:
        self_signed_certificate(settings)
    write_text(settings.config_file, nginx_config(settings))
    command = [binary, "-p", str(settings.prefix), "-c", str(settings.config_file),
               "-e", str(settings.log_dir / "error.log")]
    checked = subprocess.run([*command, "-t", "-q"], capture_output=True, text=True, timeout=30, check=False)
    if checked.returncode != 0:
        raise ProxyError(f"nginx refused the config {settings.config_file}: "
                         f"{(checked.stderr or checked.stdout).strip()}")
    settings.pid_file.unlink(missing_ok=True)
    with open(settings.log_dir / "console.log", "ab") as console:
        child = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=console, stderr=subprocess.STDOUT,
                                 start_new_session=True)  # a Ctrl-C at the terminal is not meant for it
    deadline = time.monotonic() + wait_s
    while not (_listening(settings) and _proxy_process(settings) is not None):
        if child.poll() is not None:
            raise ProxyError(f"nginx exited with {child.returncode} while starting; {_log_tail(settings)}")
        if time.monotonic() > deadline:
            stop(settings)
            raise ProxyError(f"nginx did not listen on {settings.address} within {wait_s:g} s; {_log_tail(settings)}")
        time.sleep(POLL_S)
    return status(settings)


def stop(settings: ProxySettings, *, wait_s: float = 10) -> bool:
    """Stop this state_dir's nginx (SIGQUIT: finish the requests in flight, then SIGKILL after ``wait_s``).
    Returns False when none was running."""
    process = _proxy_process(settings)
    if process is None:
        settings.pid_file.unlink(missing_ok=True)
        return False
    family = [process, *process.children(recursive=True)]
    process.send_signal(signal.SIGQUIT)
    _, alive = psutil.wait_procs(family, timeout=wait_s)
    for leftover in alive:
        leftover.kill()
    psutil.wait_procs(alive, timeout=5)
    settings.pid_file.unlink(missing_ok=True)
    return True


@contextlib.contextmanager
def running(settings: ProxySettings, *, wait_s: float = 30) -> Iterator[ProxySettings]:
    """The proxy started with ``settings`` for the ``with`` block and stopped on the way out, whatever happens."""
    try:
        start(settings, wait_s=wait_s)
        yield settings
    finally:
        stop(settings)

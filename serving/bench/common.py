"""What the benchmarks share: the error, the timing helpers, the table, and serving the runs.

Timing: one clock (``now``, ``time.perf_counter``) and one set of helpers on it, all in seconds:

* ``timed(fn)``: one call, ``(seconds, its result)``;
* ``timed_calls(calls, repeats)``: several callables interleaved round-robin after untimed warm-up
  rounds, so that machine noise hits them alike; ``seconds`` per call of each;
* ``percentiles_ms(seconds)`` and ``p50_ms(calls, repeats)``: the p50/p99 figures, in milliseconds;
* ``Clock``: the wall time of each step of a benchmark itself (training, packaging, server start...).

``sync`` (``timed``, ``timed_calls``) is called before the clock starts and before it stops, e.g.
``torch.cuda.synchronize``, so that asynchronous device work falls inside the interval it belongs to.

Serving (``robustserve bench serve`` and ``load``): the finished runs they serve (``find_runs``), their
archives (``package_and_extract``), test images as PNG bodies (``eval_images``), the server's settings,
the endpoints (``Endpoint``, ``endpoints``) and one request to one of them (``send``, ``Reply``).
"""

from __future__ import annotations

import argparse
import functools
import json
import time
import urllib.parse
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from serving import server
from serving.client import Client, ClientError
from serving.decode import png_bytes
from training.errors import ConfigError, RobustServeError

if TYPE_CHECKING:
    import torch

T = TypeVar("T")


class BenchmarkError(RobustServeError):
    """A benchmark cannot run here (a missing peer package) or its measurement failed; the message says why."""


# ---------------------------------------------------------------------------------------------- timing

WARMUP = 2  # untimed rounds before the timed ones (``timed_calls``)


def now() -> float:
    """The clock of every figure here: ``time.perf_counter`` (monotonic, the finest resolution), in seconds."""
    return time.perf_counter()


def timed(fn: Callable[[], T], sync: Callable[[], None] | None = None) -> tuple[float, T]:
    """Seconds one call of ``fn`` takes, and its result."""
    if sync is not None:
        sync()
    start = now()
    out = fn()
    if sync is not None:
        sync()
    return now() - start, out


def timed_calls(calls: Mapping[str, Callable[[], Any]], repeats: int, warmup: int = WARMUP,
                sync: Callable[[], None] | None = None) -> dict[str, list[float]]:
    """Seconds of each call of each callable: all of them in turn (round-robin), ``warmup`` untimed rounds, then
    ``repeats`` timed ones."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    for round_ in range(warmup + repeats):
        for name, call in calls.items():
            seconds, _ = timed(call, sync)
            if round_ >= warmup:
                times[name].append(seconds)
    return times


def percentiles_ms(seconds: Sequence[float]) -> dict[str, float]:
    """``p50_ms`` and ``p99_ms`` of times given in seconds."""
    ms = np.asarray(seconds, dtype=np.float64) * 1e3
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99))}


def p50_ms(calls: Mapping[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Median milliseconds per call of each callable (``timed_calls``, default warm-up)."""
    return {name: percentiles_ms(times)["p50_ms"] for name, times in timed_calls(calls, repeats).items()}


class Clock:
    """``clock(step)`` records the seconds since the previous call (or since the clock was made) under ``step``."""

    def __init__(self, seconds: dict[str, float]) -> None:
        self.seconds, self.last = seconds, now()

    def __call__(self, step: str) -> None:
        end = now()
        self.seconds[step], self.last = end - self.last, end


# ---------------------------------------------------------------------------------------------- presentation


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    if value == {}:
        return "none"  # e.g. failed_by_status when nothing failed
    return str(value)


def format_table(result: dict[str, Any], title: str | None = None) -> str:
    """Two aligned columns (key, value); nested dicts become their own titled sections, empty ones a row."""
    rows = [(k, _fmt(v)) for k, v in result.items() if not isinstance(v, dict) or not v]
    width = max((len(k) for k, _ in rows), default=0)
    lines = [f"== {title} =="] if title else []
    lines += [f"{k.ljust(width)}  {v}" for k, v in rows]
    for k, v in result.items():
        if isinstance(v, dict) and v:
            lines += ["", format_table(v, title=k)]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- options


def given(args: argparse.Namespace, *names: str, **renamed: str) -> dict[str, Any]:
    """The options set on the command line (not None) as keyword arguments: each of ``names`` under its own name,
    ``renamed`` as keyword=option. What is not set keeps the benchmark function's default, its one source."""
    pairs = [(name, name) for name in names] + list(renamed.items())
    return {keyword: getattr(args, option) for keyword, option in pairs if getattr(args, option) is not None}


def add_run_options(p: argparse.ArgumentParser) -> None:
    """``--runs`` and ``--preset``: where the serving benchmarks find the runs they serve (``find_runs``)."""
    p.add_argument("--runs", type=Path,
                   help="folder of the run folders to serve, <recipe>-<preset>-<dataset>-<arch> (default: runs)")
    p.add_argument("--preset", help="the preset the runs were trained at, which names their folders (default: quick)")


# ---------------------------------------------------------------------------------------------- the served runs

PLAIN, DHAT, DUCAT, THAT = "pgd_at", "dhat", "ducat", "that"
RECIPES = (PLAIN, DHAT, DUCAT, THAT)  # the runs served; PGD-AT is also DUCAT's base
RESNET_MODEL = "natural"  # bench serve's ResNet-18 run is served under its recipe's model name
KNN_K = 50  # neighbours THAT's kNN endpoint is asked for
# TorchServe dynamic batching as `robustserve serve start` sets it, so the figures are the served system's.
BATCH_SIZE, MAX_BATCH_DELAY_MS = server.ServerSettings.batch_size, server.ServerSettings.max_batch_delay_ms
# How the benchmarks serve and send, for their results' settings.
SERVED_AS = {"batch_size": BATCH_SIZE, "max_batch_delay_ms": MAX_BATCH_DELAY_MS, "workers": server.ServerSettings.workers,
             "request": "raw PNG body, options in the query string, one urllib connection per request"}


def find_runs(runs_root: str | Path = "runs", runs: Mapping[str, str | Path] | None = None, *,
              preset: str = "quick", benchmark: str = "serve") -> dict[str, Path]:
    """The finished run of each served recipe: ``runs[recipe]``, else the recipe's default folder at ``preset``,
    ``<runs_root>/<recipe>-<preset>-<dataset>-<arch>`` (``training.runs.preset_run_dir``: where `robustserve run
    --preset PRESET` trains it).

    ``benchmark`` names the caller in the error that says a run is missing."""
    from training.runs import preset_run_dir, run_finished

    found: dict[str, Path] = {}
    for recipe in RECIPES:
        folder = Path(runs[recipe]) if runs and recipe in runs else preset_run_dir(recipe, preset, Path(runs_root))
        if not run_finished(folder):
            raise ConfigError(f"bench {benchmark} needs a finished {recipe} run and found none at {folder}; train one "
                              f"(`robustserve run --preset {preset} --no-serve`) or name it in "
                              f"runs={{{recipe!r}: FOLDER}}")
        found[recipe] = folder
    return found


def eval_images(run_dir: Path, n: int) -> tuple[torch.Tensor, list[bytes]]:
    """The first ``n`` evaluation test images of the run's dataset, as pixels (a tensor) and as PNG bytes."""
    from training.runs import load_test_subset, read_defense_json

    info = read_defense_json(run_dir)
    x, _, _ = load_test_subset(info, n, info["config"].get("data_root"))
    return x, [png_bytes(image) for image in x]


def package_and_extract(run_dirs: Mapping[str, Path], store: Path, unpacked: Path) -> dict[str, Path]:
    """Archives of every served model of the runs in ``store``; returns model name -> its extracted folder."""
    from serving.package import PackageSettings, package_run

    # Every mode is measured, DUCAT's raw scores too: on this loopback server, the secret pairing they would
    # reveal to a client is nobody's to protect.
    settings = PackageSettings(raw_with_secret_pairing=True)
    folders = {}
    for run_dir in run_dirs.values():
        for archive in package_run(run_dir, model_store=store, settings=settings):
            if archive.stem in folders:
                raise ConfigError(f"two runs are served as model {archive.stem}")
            with zipfile.ZipFile(archive) as mar:
                mar.extractall(unpacked / archive.stem)
            folders[archive.stem] = unpacked / archive.stem
    return folders


def server_settings(store: Path, models: Sequence[str], state_dir: Path) -> server.ServerSettings:
    """Settings for ``models`` of ``store`` on free loopback ports, batching as served."""
    return server.ServerSettings(model_store=store, state_dir=state_dir, batch_size=BATCH_SIZE,
                                 max_batch_delay_ms=MAX_BATCH_DELAY_MS, models=tuple(f"{m}.mar" for m in models),
                                 **server.free_server_ports())


# ---------------------------------------------------------------------------------------------- endpoints and requests


@dataclass(frozen=True)
class Endpoint:
    label: str
    model: str  # TorchServe model name
    options: Mapping[str, Any] = field(default_factory=dict)  # request parameters (query string)
    images: str = "fashion"  # which test images it takes

    @functools.cached_property
    def path(self) -> str:
        """What a client POSTs the raw image to: ``/<model>/predict?<options>`` (built once, not per request). Not
        ``/predictions/<model>``: TorchServe drops the query string there unseen, so until 2026-12-05 every
        "head=both", "mode=raw" and "k=" row measured the model's default behaviour."""
        query = "?" + urllib.parse.urlencode(self.options) if self.options else ""
        return f"/{self.model}/predict{query}"


def check_behaviour(client: Client, endpoint: Endpoint, body: bytes) -> None:
    """One request to ``endpoint``; raises unless it is answered with the behaviour its label names: a 200, in the
    mode its ``head`` or ``mode`` option asks for, with ``k`` neighbours when it asks for k."""
    status, raw = client.request("POST", endpoint.path, body, "image/png")
    reply = json.loads(raw) if status == 200 else {}
    asked_mode = endpoint.options.get("head", endpoint.options.get("mode"))
    asked_k = endpoint.options.get("k")
    if (status != 200 or (asked_mode is not None and reply.get("mode") != asked_mode)
            or (asked_k is not None and len(reply.get("neighbours", ())) != int(asked_k))):
        raise BenchmarkError(f"{endpoint.label}: POST {endpoint.path} was not answered with what it asks for "
                             f"(HTTP {status}, mode {reply.get('mode')!r}, {len(reply.get('neighbours', ()))} "
                             "neighbours): its figures would be another behaviour's")


def endpoints(knn_k: int, resnet: bool) -> list[Endpoint]:
    """bench serve's endpoints: every served behaviour of the four runs, and the ResNet-18 when ``resnet``."""
    found = [Endpoint(PLAIN, PLAIN), Endpoint("dhat head=main", DHAT, {"head": "main"}),
             Endpoint("dhat head=both", DHAT, {"head": "both"}), Endpoint("ducat recovered", DUCAT),
             Endpoint("ducat mode=raw", DUCAT, {"mode": "raw"}), Endpoint(THAT, THAT),
             Endpoint(f"that_knn k={knn_k}", "that_knn", {"k": knn_k})]
    return found + ([Endpoint("resnet18 (natural)", RESNET_MODEL, images="resnet18")] if resnet else [])


NO_REPLY = 0  # the status recorded when no HTTP reply came (connection refused or reset, timeout)


@dataclass(frozen=True)
class Reply:
    """One request: which endpoint, when it was sent and answered (``now()``), and how."""

    endpoint: str
    start: float  # now()
    end: float
    status: int  # HTTP status, or NO_REPLY
    detail: str = ""  # the start of the reply body (or the connection error) when status != 200

    @property
    def seconds(self) -> float:
        return self.end - self.start

    @property
    def failure(self) -> str:
        return f"{'HTTP ' + str(self.status) if self.status != NO_REPLY else 'no reply'}: {self.detail}"


def send(client: Client, endpoint: Endpoint, body: bytes) -> Reply:
    """One POST of a raw PNG to ``endpoint``; a connection error or timeout is a ``NO_REPLY``, never raised."""
    start = now()
    try:
        status, raw = client.request("POST", endpoint.path, body, "image/png")
        detail = "" if status == 200 else " ".join(raw[:200].decode("utf-8", "replace").split())
    except ClientError as err:
        status, detail = NO_REPLY, str(err)[:200]
    return Reply(endpoint.label, start, now(), status, detail)

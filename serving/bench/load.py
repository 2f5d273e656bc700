"""``robustserve bench load``: a bounded load on a real TorchServe, and a worker killed with SIGKILL under it.

``bench_load`` packages the finished runs of pgd_at, dhat, ducat and that (``common.find_runs``)
into a temporary model store, serves them with a real TorchServe on loopback (``server.running``:
token auth, free ports, dynamic batching) and runs two phases on it:

1. **load**: ``clients`` threads, each sending one request after another for ``seconds``: raw PNG test
   images, the endpoints taken in turn (every served behaviour: pgd_at, dhat head=main/second/both,
   ducat recovered/raw, that, that_knn at two k). It counts every request that did not get a 200, by
   status and endpoint, with examples, and reports p50/p99 latency and throughput overall and per endpoint.
2. **kill_worker** (``kill_worker=MODEL``): the same load again; ``seconds / 3`` into it, the Python
   worker of MODEL (its pid from the management API, checked to be a child of the Java frontend) is
   killed with SIGKILL. A probe then asks MODEL until it answers 200 again; the load goes on until then
   (at most ``RECOVERY_TIMEOUT_S``), so what failed in the meantime is counted. It reports the time to
   the first 200, the requests that failed between the kill and it (with their statuses), and the new
   worker's pid.

Both phases are bounded in clients (``MAX_CLIENTS``), time (``MAX_SECONDS``, plus the recovery timeout)
and requests per client (``MAX_REQUESTS_PER_CLIENT``). It returns a plain, JSON-serialisable dict;
``definitions`` says what every figure means.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psutil

from serving.client import Client
from serving.server import ServerSettings, read_keys, running
from training.environment import describe_environment
from training.errors import ConfigError

from .common import (
    DHAT,
    KNN_K,
    NO_REPLY,
    PLAIN,
    SERVED_AS,
    Clock,
    Endpoint,
    Reply,
    add_run_options,
    check_behaviour,
    endpoints,
    eval_images,
    find_runs,
    given,
    now,
    package_and_extract,
    percentiles_ms,
    send,
    server_settings,
)

TEMP_PREFIX = "robustserve-bench-load-"  # the temporary folder (model store, server state); tests look for it
MAX_CLIENTS, MAX_SECONDS = 64, 600.0
MAX_REQUESTS_PER_CLIENT = 100_000  # a bound on each client's loop besides its clock
REQUEST_TIMEOUT_S = 30.0  # one request; a reply slower than this counts as a failure (status 0)
RECOVERY_TIMEOUT_S = 60.0  # how long the killed model may take to answer 200 again
SMALL_K = 5  # the second kNN endpoint: few neighbours, against KNN_K's many
IMAGES = 32  # distinct test images the clients send in turn
EXAMPLES = 5  # failures kept verbatim per phase

DEFINITIONS = {
    "requests": "requests sent by the load clients in the phase (warm-up and kill probe excluded)",
    "ok, failed": "requests answered 200 / all others; failed_by_status counts them by HTTP status "
                  f"({NO_REPLY}: no HTTP reply: connection error or a timeout of {REQUEST_TIMEOUT_S:g} s), "
                  "failure_examples quotes a few",
    "wall_s": "from the first request sent to the last reply read",
    "throughput_req_s": "requests / wall_s (every request, failed ones too); ok_req_s: the 200s only",
    "p50_ms, p99_ms": "percentiles of every request's wall time (time.perf_counter around one POST, body read), "
                      "failed requests included",
    "endpoints.<e>": "the same per endpoint; req_s = its requests / the phase's wall_s",
    "kill_worker.recovery_s": "from the SIGKILL to the end of the first 200 reply to a probe request sent to "
                              "the killed model after the kill (the probe sends one request after another)",
    "kill_worker.failed_until_recovered": "load requests that ended between the kill and the recovery "
                                          "without a 200, by status and by endpoint",
    "kill_worker.new_worker_pid": "the model's READY worker after the recovery, from the management API "
                                  "(it must differ from killed_pid and be a child of the Java frontend)",
    "kill_worker.load": "the load figures of the phase the kill happened in (it lasts until the recovery)",
}


def load_endpoints(knn_k: int) -> list[Endpoint]:
    """Every served behaviour: bench serve's endpoints, DH-AT's second head and a kNN endpoint with few neighbours."""
    found = endpoints(knn_k, resnet=False)
    found.insert(2, Endpoint("dhat head=second", DHAT, {"head": "second"}))
    if SMALL_K < knn_k:
        found.append(Endpoint(f"that_knn k={SMALL_K}", "that_knn", {"k": SMALL_K}))
    return found


def check_bounds(clients: int, seconds: float) -> None:
    if not 1 <= clients <= MAX_CLIENTS:
        raise ConfigError(f"--clients must be between 1 and {MAX_CLIENTS}, got {clients}")
    if not 0 < seconds <= MAX_SECONDS:
        raise ConfigError(f"--seconds must be above 0 and at most {MAX_SECONDS:g}, got {seconds:g}")


# ---------------------------------------------------------------------------------------------- requests


def run_load(url: str, token: str, points: Sequence[Endpoint], bodies: Sequence[bytes], clients: int,
             seconds: float, keep_going: Callable[[], bool] = lambda: False) -> list[Reply]:
    """``clients`` threads, each sending one request after another until ``seconds`` have passed and
    ``keep_going()`` is false (never beyond ``seconds + RECOVERY_TIMEOUT_S``): client i's j-th request goes
    to endpoint (i + j) mod E with image (7 i + j) mod N, so every endpoint gets its share from every client."""
    replies: list[list[Reply]] = [[] for _ in range(clients)]
    begin = now()
    soft_stop, hard_stop = begin + seconds, begin + seconds + RECOVERY_TIMEOUT_S

    def client_loop(i: int) -> None:
        client = Client(url, token=token, timeout=REQUEST_TIMEOUT_S)
        for j in range(MAX_REQUESTS_PER_CLIENT):
            at = now()
            if at >= hard_stop or (at >= soft_stop and not keep_going()):
                break
            replies[i].append(send(client, points[(i + j) % len(points)], bodies[(7 * i + j) % len(bodies)]))

    threads = [threading.Thread(target=client_loop, args=(i,), name=f"load-client-{i}") for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sorted((reply for thread in replies for reply in thread), key=lambda r: r.start)


def failures(replies: Sequence[Reply]) -> dict[str, Any]:
    """The replies that are not 200: how many, by status and by endpoint, and the first few verbatim."""
    failed = [r for r in replies if r.status != 200]
    return {"failed": len(failed),
            "failed_by_status": {str(s): n for s, n in sorted(Counter(r.status for r in failed).items())},
            "failed_by_endpoint": dict(Counter(r.endpoint for r in failed)),
            "failure_examples": [f"{r.endpoint}: {r.failure}" for r in failed[:EXAMPLES]]}


def summarize(replies: Sequence[Reply], points: Sequence[Endpoint]) -> dict[str, Any]:
    """Counts, failures, latency percentiles and throughput of one phase, overall and per endpoint."""
    if not replies:
        raise ConfigError("the load sent no request; give it more --seconds")
    wall = max(r.end for r in replies) - min(r.start for r in replies)
    ok = sum(r.status == 200 for r in replies)
    result: dict[str, Any] = {"requests": len(replies), "ok": ok, **failures(replies), "wall_s": wall,
                              "throughput_req_s": len(replies) / wall, "ok_req_s": ok / wall,
                              **percentiles_ms([r.seconds for r in replies])}
    result["endpoints"] = {}
    for endpoint in points:
        mine = [r for r in replies if r.endpoint == endpoint.label]
        result["endpoints"][endpoint.label] = {
            "model": endpoint.model, "requests": len(mine), "failed": sum(r.status != 200 for r in mine),
            "req_s": len(mine) / wall, **(percentiles_ms([r.seconds for r in mine]) if mine else {})}
    return result


# ---------------------------------------------------------------------------------------------- worker kill


def worker_pids(settings: ServerSettings, model: str) -> list[int]:
    """The pids of ``model``'s READY workers, from the management API (TorchServe's describe-model reply)."""
    management = Client(settings.management_address, token=read_keys(settings)["management"], timeout=5)
    status, raw = management.request("GET", f"/models/{model}")
    if status != 200:
        return []
    return [w["pid"] for w in json.loads(raw)[0]["workers"] if w.get("status") == "READY" and w.get("pid")]


def frontend_children(settings: ServerSettings) -> set[int]:
    """The pids of every process under the Java frontend of ``settings`` (its pid file, from ``server.start``)."""
    return {p.pid for p in psutil.Process(int(settings.pid_file.read_text())).children(recursive=True)}


def kill_worker_under_load(settings: ServerSettings, model: str, probe: Endpoint, body: bytes,
                           at: float) -> dict[str, Any]:
    """At ``common.now() >= at``, SIGKILL ``model``'s worker; then probe the model until it answers 200.

    Returns the killed pid, when it was killed (``killed_at``, ``common.now()``), the probe's figures and
    the new worker's pid. Raises ConfigError when the model has no single READY worker to kill.
    """
    while now() < at:
        time.sleep(0.01)
    pids = worker_pids(settings, model)
    if len(pids) != 1:
        raise ConfigError(f"cannot kill the worker of {model}: it has READY workers {pids}, not one")
    old_pid = pids[0]
    if old_pid not in frontend_children(settings):  # never kill a process that is not this server's worker
        raise ConfigError(f"pid {old_pid} of {model}'s worker is not a child of the TorchServe frontend")
    worker = psutil.Process(old_pid)
    killed_at = now()
    worker.kill()  # SIGKILL: no handler runs, the socket to the frontend just closes
    worker.wait(timeout=10)

    client = Client(settings.inference_address, token=read_keys(settings)["inference"], timeout=REQUEST_TIMEOUT_S)
    probes: list[Reply] = []
    while now() - killed_at < RECOVERY_TIMEOUT_S:
        probes.append(send(client, probe, body))
        if probes[-1].status == 200:
            break
        time.sleep(0.05)  # a refused request comes back at once: do not spin
    recovered = bool(probes) and probes[-1].status == 200
    new_pids = worker_pids(settings, model) if recovered else []
    return {"model": model, "killed_pid": old_pid, "killed_at": killed_at, "recovered": recovered,
            "recovered_at": probes[-1].end if recovered else None,
            "recovery_s": probes[-1].end - killed_at if recovered else None,
            "probe_requests": len(probes), "probe_failed_by_status": dict(Counter(str(p.status) for p in probes
                                                                                   if p.status != 200)),
            "new_worker_pid": new_pids[0] if len(new_pids) == 1 else None,
            "new_worker_is_frontend_child": bool(new_pids) and new_pids[0] in frontend_children(settings),
            "killed_pid_gone": not psutil.pid_exists(old_pid)}


def kill_phase(settings: ServerSettings, token: str, points: Sequence[Endpoint], bodies: Sequence[bytes], clients: int,
               seconds: float, model: str) -> dict[str, Any]:
    """Phase 2: the load, with ``model``'s worker killed a third of the way in and the load kept up to recovery."""
    probe = next(p for p in points if p.model == model)
    with ThreadPoolExecutor(1, thread_name_prefix="kill-worker") as pool:
        kill = pool.submit(kill_worker_under_load, settings, model, probe, bodies[0], now() + seconds / 3)
        replies = run_load(settings.inference_address, token, points, bodies, clients, seconds,
                           keep_going=lambda: not kill.done())
        figures = kill.result()
    end = figures["recovered_at"] or float("inf")
    meantime = [r for r in replies if figures["killed_at"] <= r.end <= end]
    figures["failed_until_recovered"] = failures(meantime)
    figures["requests_until_recovered"] = len(meantime)
    figures["load"] = summarize(replies, points)
    for key in ("killed_at", "recovered_at"):  # clock instants mean nothing outside this process
        figures.pop(key)
    return figures


# ---------------------------------------------------------------------------------------------- all of it


def bench_load(*, runs_root: str | Path = "runs", runs: Mapping[str, str | Path] | None = None,
               preset: str = "quick", clients: int = 8, seconds: float = 30.0, kill_worker: str | None = None,
               knn_k: int = KNN_K) -> dict[str, Any]:
    """Serve the runs of pgd_at, dhat, ducat and that and load them (module docstring): ``clients`` concurrent
    clients for ``seconds``, then, with ``kill_worker=MODEL``, the same load with MODEL's worker killed.

    ``runs``: recipe -> run folder, instead of the ``preset`` run folders in ``runs_root`` (``find_runs``).
    """
    from serving.served_models import served_models_of
    from training.knn import MEMORY_BANK, MemoryBank

    check_bounds(clients, seconds)
    run_dirs = find_runs(runs_root, runs, preset=preset, benchmark="load")
    served = [model.name for recipe in run_dirs for model in served_models_of(recipe)]
    if kill_worker is not None and kill_worker not in served:  # before the minutes of packaging and starting
        raise ConfigError(f"--kill-worker must be a served model ({', '.join(served)}), got {kill_worker!r}")
    result: dict[str, Any] = {"benchmark": "load", "runs": {r: str(d) for r, d in run_dirs.items()}}
    steps: dict[str, float] = {}  # wall time of each step of the benchmark itself
    clock = Clock(steps)
    with tempfile.TemporaryDirectory(prefix=TEMP_PREFIX) as tmp_name:
        tmp = Path(tmp_name)
        folders = package_and_extract(run_dirs, tmp / "store", tmp / "unpacked")
        knn_k = min(knn_k, len(MemoryBank.load(folders["that_knn"] / MEMORY_BANK)))
        points = load_endpoints(knn_k)
        _, bodies = eval_images(run_dirs[PLAIN], IMAGES)
        clock("package")
        with running(server_settings(tmp / "store", list(folders), tmp / "ts")) as settings:
            clock("start server")
            token = read_keys(settings)["inference"]
            # One request per endpoint first: a model's first call (ONNX Runtime's first run) is not the load's,
            # and an endpoint answered in another mode than its label names would stop the benchmark here.
            client = Client(settings.inference_address, token=token, timeout=REQUEST_TIMEOUT_S)
            for point in points:
                check_behaviour(client, point, bodies[0])
            warmup = failures([send(client, point, bodies[0]) for point in points])
            result["warmup"] = {"requests": len(points), "failed": warmup["failed"],
                                "failure_examples": warmup["failure_examples"]}
            result.update(summarize(run_load(settings.inference_address, token, points, bodies, clients, seconds),
                                    points))
            clock("load")
            if kill_worker is not None:
                result["kill_worker"] = kill_phase(settings, token, points, bodies, clients, seconds, kill_worker)
                clock("kill worker")
    result["settings"] = {"clients": clients, "seconds": seconds, "endpoints": [p.label for p in points],
                          "images": len(bodies), **SERVED_AS, "request_timeout_s": REQUEST_TIMEOUT_S,
                          "recovery_timeout_s": RECOVERY_TIMEOUT_S}
    result["seconds"] = steps
    result["definitions"] = DEFINITIONS
    result["environment"] = describe_environment("cpu")
    return result


# ---------------------------------------------------------------------------------------------- command line


def add_options(p: argparse.ArgumentParser) -> None:
    add_run_options(p)
    p.add_argument("--clients", type=int, help=f"concurrent clients (default 8, at most {MAX_CLIENTS})")
    p.add_argument("--seconds", type=float, help=f"seconds of load per phase (default 30, at most {MAX_SECONDS:g})")
    p.add_argument("--kill-worker", metavar="MODEL",
                   help="then load again and SIGKILL MODEL's worker a third of the way in; measure the recovery")


def run(args: argparse.Namespace) -> dict[str, Any]:
    return bench_load(**given(args, "preset", "clients", "seconds", "kill_worker", runs_root="runs"))

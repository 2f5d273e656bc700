"""``robustserve bench serve``: what serving the defenses costs, end to end and part by part.

``bench_serve`` packages finished runs into a temporary model store, serves them with a real
TorchServe (``serving.server``: loopback, token auth, its own free ports and state folder,
dynamic batching), loads it from client threads, and sets beside it what the same models cost in
this process without the server. It returns a plain, JSON-serialisable dict; ``definitions`` in it
says what every figure means, ``targets`` sets each goal beside its measured value.

Parts (one function each):

1. ``endpoints``: per endpoint, REST latency p50/p99 and throughput at 1 and 8 concurrent clients,
   each client a thread sending raw PNG test images (``POST /<model>/predict?<options>``), once
   ``check_behaviour`` has seen the endpoint answer in the mode its label names.
2. per endpoint too: the fixed per-request overhead, end-to-end p50 at 1 client minus the bare
   forward (the mode's ONNX graph in ONNX Runtime on the same image, batch 1), and their ratio.
3. ``resnet18``: the same ratio for a ResNet-18 on 32x32 RGB (a ``natural`` run trained for one
   epoch on random images: its weights do not matter for its cost), served as model ``natural``.
4. ``dhat_heads``: DH-AT ``head=main`` against ``head=both``, measured beside their FLOP ratio.
5. ``ducat_recovery``: DUCAT's run-time recovery against its base PGD-AT model (same backbone).
6. ``onnx_vs_eager``: bare forward throughput of each served mode in ONNX Runtime and in eager PyTorch.
7. ``knn``: FAISS flat against IVF search over THAT's real memory bank and synthetic banks.
8. ``proxy``: what the nginx proxy in front (``serving.proxy``: TLS, limits) adds to one endpoint's REST
   latency, p50/p99 at 1 and 8 clients, the requests straight to TorchServe and through the proxy taken
   in turns.

The runs served are ``common.find_runs``' (``--runs``, ``--preset``). Every time comes from
``common.timed_calls`` (wall time of each call, ``time.perf_counter``, callables interleaved round-robin
so that machine noise hits them alike) and ``common.percentiles_ms``, or from ``common.send``'s ``Reply``.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import ssl
import tempfile
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from serving import proxy, server
from serving.client import Client
from training.environment import describe_environment
from training.errors import ConfigError

from .common import (
    DHAT,
    KNN_K,
    PLAIN,
    RESNET_MODEL,
    SERVED_AS,
    WARMUP,
    BenchmarkError,
    Clock,
    Endpoint,
    Reply,
    add_run_options,
    check_behaviour,
    endpoints,
    eval_images,
    find_runs,
    given,
    p50_ms,
    package_and_extract,
    percentiles_ms,
    send,
    server_settings,
    timed,
)
from .compute import forward_flops_per_image

RESNET_IMAGE_SIZE = ("ROBUSTSERVE_IMAGE_SIZE", "32")  # the ImageFolder loader's image size, for its data
TEMP_PREFIX = "robustserve-bench-serve-"  # the temporary folder (model store, server state); tests look for it
TARGETS = {"resnet18_e2e_over_forward": 1.3, "dhat_main_over_flop_prediction": 1.10, "ducat_over_base_infer": 1.05,
           "onnx_over_eager": 1.0, "knn_recall": 0.95, "knn_speedup": 10.0}
PROXY_ENDPOINT = PLAIN  # the cheapest endpoint: the proxy's share of its latency is the largest
PROXY_TURNS = 2  # direct, proxy, direct, proxy: machine noise hits both alike
# The proxy as `serve start --proxy` runs it, but for its per-client rate limit: the benchmark's clients all come
# from 127.0.0.1, and the figure wanted is the proxy's cost, not its throttling (limit_req still runs).
BENCH_PROXY_LIMITS = {"rate_per_s": 100_000, "burst": 100_000, "connections_per_client": 64}
QUICK = {"requests": 16, "repeats": 10, "knn_sizes": (20_000,), "knn_queries": 50, "nprobes": (1, 4, 4096),
         "resnet_images": (4, 2)}


DEFINITIONS = {
    "p50_ms, p99_ms": "median and 99th percentile of per-call wall time (time.perf_counter), milliseconds",
    "endpoints.<e>.c<N>_p50_ms/_p99_ms": "REST latency with N concurrent clients: one POST /<model>/predict?"
                                         "<options> of a PNG test image, sent until the reply body is read",
    "endpoints.<e>.c<N>_req_s": "REST throughput: the requests of all N clients / wall time from the first "
                                "send to the last reply",
    "endpoints.<e>.forward_ms": "bare forward p50: the mode's ONNX graph in ONNX Runtime on the same image "
                                "(batch 1), in this process (Runtime.backend.run)",
    "endpoints.<e>.infer_ms": "Runtime.infer p50 on the decoded request: forward + the mode's post-processing",
    "endpoints.<e>.handle_ms": "Runtime.handle p50 on the PNG bytes: decode + validation + infer",
    "endpoints.<e>.overhead_ms": "fixed per-request overhead: c1_p50_ms - forward_ms (HTTP, TorchServe's "
                                 "frontend and worker, PNG decode, post-processing; kNN: the FAISS search too)",
    "endpoints.<e>.e2e_over_forward": "c1_p50_ms / forward_ms",
    "endpoints.<e>.outside_runtime_ms": "c1_p50_ms - handle_ms: what the server adds beyond the runtime's own work",
    "resnet18.e2e_over_forward": "ResNet-18 (32x32 RGB) end-to-end p50 at 1 client / bare forward p50 at batch 1",
    "dhat_heads.flop_ratio": "forward FLOPs of head=main / head=both per image (torch's FLOP counter)",
    "dhat_heads.bN_time_ratio": "bare forward p50 of main / of both at batch N; e2e_time_ratio: REST c1 p50 ratio",
    "dhat_heads.bN_over_flop_prediction": "bN_time_ratio / flop_ratio: main's measured time over the time its "
                                          "FLOPs predict from both's (1.0: main pays nothing for the second head)",
    "ducat_recovery.*_infer_ms": "Runtime.infer p50 at batch 1 (forward + post-processing), DUCAT recovered "
                                 "and its base PGD-AT model (same backbone, C logits, softmax top-k)",
    "ducat_recovery.infer_ratio": "ducat_infer_ms / base_infer_ms",
    "ducat_recovery.*_postprocess_ms": "p50 of the post-processing alone on the graph output (Eq. 6 recovery "
                                       "and the dummy-class signal for DUCAT; softmax top-k for the base)",
    "ducat_recovery.recovery_ms": "ducat_postprocess_ms - base_postprocess_ms: what recovery adds after the forward",
    "ducat_recovery.recovery_over_base_infer": "recovery_ms / base_infer_ms (the 2C head's own forward cost "
                                               "is not in it; infer_ratio has both)",
    "seconds.<step>": "wall time of each step of this benchmark (training, packaging, server start, ...)",
    "proxy.c<N>_direct_p50_ms/_p99_ms": "REST latency of proxy.endpoint with N clients straight to TorchServe "
                                        "(http://, a new connection per request)",
    "proxy.c<N>_proxy_p50_ms/_p99_ms": "the same requests through the nginx proxy (https://, a new TLS "
                                       "connection per request; nginx keeps its connections to TorchServe)",
    "proxy.c<N>_added_p50_ms/_p99_ms": "proxy minus direct: the latency the proxy adds at that percentile",
    "onnx_vs_eager.<model/mode>.bN_*_img_s": "bare forward throughput at batch N: N / p50 of one call, ONNX "
                                             "Runtime (onnx) or the eager PyTorch module (eager); ratio: onnx / eager",
    "knn.<bank>.<index>.bN_ms_per_query": "FAISS search p50 for a batch of N queries / N, k neighbours",
    "knn.<bank>.<index>.speedup_bN": "flat bN_ms_per_query / this index's",
    "knn.<bank>.<index>.recall": "recall@k against the exact flat search, mean over the queries",
    "knn.<bank>.<index>.build_s": "index construction time (IVF: k-means on train_sample random bank vectors, "
                                  "max(100k, 39 nlist) at most the bank, then adding all)",
    "knn.<bank>.<index>.meets_target": "recall >= 0.95 and speedup_b1 >= 10; knn.<bank>.meets_target lists "
                                       "the (nlist, nprobe) that do",
}


# ---------------------------------------------------------------------------------------------- 3. the ResNet-18 run


@contextlib.contextmanager
def _env(name: str, value: str) -> Iterator[None]:
    saved = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = saved


def train_resnet18(folder: Path, *, classes: int = 10, train_per_class: int = 20, val_per_class: int = 5,
                   seed: int = 0) -> tuple[Path, float]:
    """A finished, exported ``natural`` ResNet-18 run for 32x32 RGB, trained one epoch on random PNGs.

    The data is an ImageFolder tree (``train/`` and ``val/``, one folder per class) of uniform
    noise; only the model's shape matters for its serving cost. Returns ``(run_dir, seconds)``.
    """
    from PIL import Image

    from training.engine import train
    from training.export import export_run
    from training.recipes import get_recipe

    rng = np.random.default_rng(seed)
    data = folder / "data"
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        for c in range(classes):
            (data / split / f"class{c}").mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), mode="RGB").save(
                    data / split / f"class{c}" / f"{i}.png")
    config = get_recipe("natural").config("quick", dataset="imagefolder", arch="resnet18", data_root=str(data),
                                          epochs=1, batch_size=min(50, classes * (train_per_class - 1)),
                                          train_subset=None, val_size=classes, val_attack_steps=1, device="cpu",
                                          seed=seed)

    def train_and_export() -> Path:
        with _env(*RESNET_IMAGE_SIZE):
            run_dir = train(config, folder / "run", progress=False)
            export_run(run_dir)
        return run_dir

    seconds, run_dir = timed(train_and_export)
    return run_dir, seconds


# ---------------------------------------------------------------------------------------------- 1. REST


@contextlib.contextmanager
def running_server(store: Path, models: Sequence[str], state_dir: Path) -> Iterator[tuple[str, str]]:
    """A TorchServe over ``store`` on free loopback ports, stopped on the way out; yields (url, inference key)."""
    with server.running(server_settings(store, models, state_dir)) as settings:
        yield settings.inference_address, server.read_keys(settings)["inference"]


def load_replies(url: str, token: str, endpoint: Endpoint, bodies: Sequence[bytes], clients: int, requests: int,
                 context: ssl.SSLContext | None = None) -> list[Reply]:
    """``requests`` POSTs spread over ``clients`` threads (each its own ``Client``); every request must get a 200."""
    counts = [requests // clients + (i < requests % clients) for i in range(clients)]
    replies: list[list[Reply]] = [[] for _ in range(clients)]
    barrier = threading.Barrier(clients)

    def worker(i: int) -> None:
        client = Client(url, token=token, context=context)
        barrier.wait()
        for j in range(counts[i]):
            replies[i].append(send(client, endpoint, bodies[(i + j * clients) % len(bodies)]))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    every = [reply for thread in replies for reply in thread]
    failed = [reply for reply in every if reply.status != 200]
    if failed:
        raise BenchmarkError(f"{endpoint.label}: {len(failed)} of {requests} requests failed, e.g. {failed[0].failure}")
    return every


def rest_load(url: str, token: str, endpoint: Endpoint, bodies: Sequence[bytes], clients: int,
              requests: int) -> dict[str, float]:
    """``load_replies``' latency percentiles and req/s."""
    every = load_replies(url, token, endpoint, bodies, clients, requests)
    wall = max(r.end for r in every) - min(r.start for r in every)
    return {**percentiles_ms([r.seconds for r in every]), "req_s": requests / wall}


def bench_rest(url: str, token: str, points: Sequence[Endpoint], images: Mapping[str, Sequence[bytes]],
               clients: Sequence[int], requests: int) -> dict[str, dict[str, float]]:
    """Part 1: per endpoint and client count, after a warm-up of max(20, 2 x clients) requests."""
    results: dict[str, dict[str, float]] = {}
    for endpoint in points:
        check_behaviour(Client(url, token=token), endpoint, images[endpoint.images][0])
        figures: dict[str, float] = {}
        for n in clients:
            # Warm-up: the first endpoint measured also pays for the JVM warming up (measured: its c1 p50 ~1.7x
            # the others' after 2 requests per client), so each endpoint gets at least 20 first.
            rest_load(url, token, endpoint, images[endpoint.images], n, max(20, 2 * n))
            load = rest_load(url, token, endpoint, images[endpoint.images], n, requests)
            figures.update({f"c{n}_{key}": value for key, value in load.items()})
        results[endpoint.label] = figures
    return results


# ---------------------------------------------------------------------------------------------- 8. the proxy


def bench_proxy(url: str, front: proxy.ProxySettings, token: str, endpoint: Endpoint, bodies: Sequence[bytes],
                clients: Sequence[int], requests: int) -> dict[str, Any]:
    """Part 8: ``endpoint`` straight to TorchServe (``url``) and through the proxy ``front`` in front of it, per
    client count: a warm-up for each, then ``PROXY_TURNS`` turns of ``requests / PROXY_TURNS`` each way."""
    routes = {"direct": (url, None), "proxy": (front.address, proxy.client_context(front))}
    figures: dict[str, Any] = {"endpoint": endpoint.label, "turns": PROXY_TURNS}
    for n in clients:
        times: dict[str, list[float]] = {route: [] for route in routes}
        for address, context in routes.values():  # warm-up
            load_replies(address, token, endpoint, bodies, n, max(20, 2 * n), context)
        for _ in range(PROXY_TURNS):
            for route, (address, context) in routes.items():
                times[route] += [reply.seconds for reply in load_replies(address, token, endpoint, bodies, n,
                                                                         max(n, requests // PROXY_TURNS), context)]
        for route, measured in times.items():
            figures.update({f"c{n}_{route}_{key}": value for key, value in percentiles_ms(measured).items()})
        for key in ("p50_ms", "p99_ms"):
            figures[f"c{n}_added_{key}"] = figures[f"c{n}_proxy_{key}"] - figures[f"c{n}_direct_{key}"]
    return figures


# ---------------------------------------------------------------------------------------------- 2. in-process


def bench_local(runtime, png: bytes, options: Mapping[str, Any], repeats: int) -> dict[str, Any]:
    """One request in this process: bare forward, post-processing, ``Runtime.infer`` and ``Runtime.handle`` p50."""
    from serving.postprocess import POSTPROCESSORS

    fields = {"body": png, **options}
    request = runtime.parse(fields)
    mode = request.options.mode
    pixels = np.asarray(request.pixels, dtype=np.float32)[None]
    outputs = runtime.backend.run(mode, pixels)
    postprocess = POSTPROCESSORS[runtime.postprocess[mode]]
    p50 = p50_ms({"forward": lambda: runtime.backend.run(mode, pixels),
                  "postprocess": lambda: postprocess.reply(outputs, [request.options], runtime.context),
                  "infer": lambda: runtime.infer([request]),
                  "handle": lambda: runtime.handle([fields])}, repeats)
    return {"mode": mode, **{f"{name}_ms": value for name, value in p50.items()}}


def overhead(local: Mapping[str, Any], rest: Mapping[str, float]) -> dict[str, float]:
    """Part 2: end-to-end p50 at one client against the bare forward and the in-process handle."""
    e2e = rest["c1_p50_ms"]
    return {"overhead_ms": e2e - local["forward_ms"], "e2e_over_forward": e2e / local["forward_ms"],
            "outside_runtime_ms": e2e - local["handle_ms"]}


# ---------------------------------------------------------------------------------------------- 4. DH-AT heads


def bench_heads(runtime, dhat_run: Path, pixels: torch.Tensor, repeats: int,
                rest: Mapping[str, Mapping[str, float]] | None = None) -> dict[str, Any]:
    """Part 4: head=main against head=both, bare forward at batch 1 and 8 (and REST c1), beside their FLOPs."""
    from training.runs import load_run

    modes = load_run(dhat_run).modes()
    flops = {head: forward_flops_per_image(modes[head].exported, pixels[:1]) for head in ("main", "both")}
    result: dict[str, Any] = {"main_flops": flops["main"], "both_flops": flops["both"],
                              "flop_ratio": flops["main"] / flops["both"]}
    for batch in (1, 8):
        x = pixels[:batch].numpy()
        p50 = p50_ms({head: (lambda head=head, x=x: runtime.backend.run(head, x)) for head in ("main", "both")},
                     repeats)
        ratio = p50["main"] / p50["both"]
        result.update({f"b{batch}_main_ms": p50["main"], f"b{batch}_both_ms": p50["both"],
                       f"b{batch}_time_ratio": ratio, f"b{batch}_over_flop_prediction": ratio / result["flop_ratio"]})
    if rest is not None:
        main, both = rest["dhat head=main"]["c1_p50_ms"], rest["dhat head=both"]["c1_p50_ms"]
        result.update({"e2e_main_ms": main, "e2e_both_ms": both, "e2e_time_ratio": main / both,
                       "e2e_over_flop_prediction": main / both / result["flop_ratio"]})
    return result


# ---------------------------------------------------------------------------------------------- 5. DUCAT recovery


def bench_ducat(ducat_local: Mapping[str, Any], base_local: Mapping[str, Any]) -> dict[str, float]:
    """Part 5: DUCAT recovered against its base, from the in-process figures of their endpoints."""
    recovery = ducat_local["postprocess_ms"] - base_local["postprocess_ms"]
    return {"ducat_forward_ms": ducat_local["forward_ms"], "base_forward_ms": base_local["forward_ms"],
            "ducat_postprocess_ms": ducat_local["postprocess_ms"], "base_postprocess_ms": base_local["postprocess_ms"],
            "ducat_infer_ms": ducat_local["infer_ms"], "base_infer_ms": base_local["infer_ms"],
            "infer_ratio": ducat_local["infer_ms"] / base_local["infer_ms"],
            "recovery_ms": recovery, "recovery_over_base_infer": recovery / base_local["infer_ms"]}


# ---------------------------------------------------------------------------------------------- 6. ONNX vs eager


def bench_backends(runtime, pixels: torch.Tensor, repeats: int, batches: Sequence[int] = (1, 8)
                   ) -> dict[str, dict[str, float]]:
    """Part 6: per mode of one extracted archive, bare forward img/s in ONNX Runtime (``runtime``'s backend)
    and eager PyTorch."""
    from serving.runtime import Runtime

    backends = {"onnx": runtime.backend, "torch": Runtime(runtime.folder, backend="torch", device="cpu").backend}
    results = {}
    for mode in runtime.served.modes:
        figures: dict[str, float] = {}
        for batch in batches:
            x = np.ascontiguousarray(pixels[:batch].numpy())
            p50 = p50_ms({name: (lambda b=backend, mode=mode, x=x: b.run(mode, x))
                          for name, backend in backends.items()}, repeats)
            onnx, eager = batch / p50["onnx"] * 1e3, batch / p50["torch"] * 1e3
            figures.update({f"b{batch}_onnx_img_s": onnx, f"b{batch}_eager_img_s": eager, f"b{batch}_ratio": onnx / eager})
        results[f"{runtime.folder.name}/{mode}"] = figures
    return results


# ---------------------------------------------------------------------------------------------- 7. kNN


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32, copy=False)


def synthetic_bank(n: int, dim: int, rng: np.random.Generator, per_cluster: int = 1000) -> np.ndarray:
    """``n`` unit-norm vectors around ``n / per_cluster`` random centres (cosine to the centre about 0.7).

    A trained embedding is clustered by class; uniform random vectors in 128-D would all be about
    orthogonal, with no neighbourhoods for an index to find.
    """
    centres = unit(rng.standard_normal((max(1, n // per_cluster), dim), dtype=np.float32))
    bank = rng.standard_normal((n, dim), dtype=np.float32) / np.float32(np.sqrt(dim))
    bank += centres[rng.integers(0, len(centres), n)]
    return unit(bank)


def near_queries(bank: np.ndarray, n: int, rng: np.random.Generator, noise: float = 0.5) -> np.ndarray:
    """``n`` bank vectors plus Gaussian noise of norm about ``noise``, renormalised: queries with real neighbours."""
    rows = rng.choice(len(bank), size=n, replace=len(bank) < n)
    return unit(bank[rows] + noise * rng.standard_normal((n, bank.shape[1]), dtype=np.float32)
                / np.float32(np.sqrt(bank.shape[1])))


def default_nlist(n: int) -> int:
    """IVF cells: about 4 sqrt(N), at least 39 vectors each (FAISS's k-means minimum), at most 4096."""
    return max(1, min(n // 39, int(4 * np.sqrt(n)), 4096))


def _search_figures(index, queries: np.ndarray, k: int, repeats: int) -> dict[str, float]:
    """Search p50 per query at batch 1 and batch 64, the queries taken in turn.

    The batches are cut before the timing: cutting one (~3 us) was ~30% of an IVF search at batch 1."""
    figures = {}
    for batch, rounds in ((1, repeats), (64, max(3, repeats // 16))):
        batches = itertools.cycle([np.ascontiguousarray(queries[np.arange(i * batch, (i + 1) * batch) % len(queries)])
                                   for i in range(WARMUP + rounds)])
        p50 = p50_ms({"search": lambda batches=batches: index.search(next(batches), k)}, rounds)
        figures[f"b{batch}_ms_per_query"] = p50["search"] / batch
    return figures


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean over queries of |found ∩ truth| / k (rows of neighbour ids; -1 = not found)."""
    k = truth.shape[1]
    return float(np.mean([len(set(f[f >= 0]) & set(t)) / k for f, t in zip(found, truth, strict=True)]))


def bench_bank(features: np.ndarray, queries: np.ndarray, *, k: int, nprobes: Sequence[int], repeats: int,
               train_sample: int, rng: np.random.Generator) -> dict[str, Any]:
    """Part 7 for one bank: flat (exact) and IVF at each nprobe; build time, search time, recall@k, speed-up."""
    from serving.knn_index import build_index

    k = min(k, len(features))
    flat_build, flat = timed(lambda: build_index(features, "flat"))
    _, truth = flat.search(queries, k)
    flat_figures = {"build_s": flat_build, **_search_figures(flat, queries, k, repeats),
                    "recall": recall(truth, truth)}  # the exact search is its own truth
    nlist = default_nlist(len(features))
    size = min(len(features), max(train_sample, 39 * nlist))  # FAISS's k-means wants >= 39 vectors per cell
    sample = features[rng.choice(len(features), size=size, replace=False)]
    ivf_build, ivf = timed(lambda: build_index(features, "ivf", nlist=nlist, train_sample=sample))
    result: dict[str, Any] = {"vectors": len(features), "dim": features.shape[1], "k": k, "queries": len(queries),
                              "nlist": nlist, "train_sample": len(sample), "flat": flat_figures}
    meeting = []
    for nprobe in sorted({min(p, nlist) for p in nprobes}):
        ivf.nprobe = nprobe
        figures = {"build_s": ivf_build, **_search_figures(ivf, queries, k, repeats),
                   "recall": recall(ivf.search(queries, k)[1], truth)}
        for batch in (1, 64):
            figures[f"speedup_b{batch}"] = flat_figures[f"b{batch}_ms_per_query"] / figures[f"b{batch}_ms_per_query"]
        figures["meets_target"] = bool(figures["recall"] >= TARGETS["knn_recall"]
                                       and figures["speedup_b1"] >= TARGETS["knn_speedup"])
        if figures["meets_target"]:
            meeting.append(f"nlist={nlist}, nprobe={nprobe}")
        result[f"ivf nprobe={nprobe}"] = figures
    result["meets_target"] = meeting
    return result


def bench_knn(real_bank: np.ndarray, real_queries: np.ndarray, sizes: Sequence[int], *, k: int, nprobes: Sequence[int],
              n_queries: int, repeats: int, threads: int | None, train_sample: int = 100_000,
              seed: int = 0) -> dict[str, Any]:
    """Part 7: THAT's real bank (queried with real test-image features) and synthetic banks of ``sizes``."""
    import faiss

    rng = np.random.default_rng(seed)
    saved = faiss.omp_get_max_threads()
    threads = threads or saved
    faiss.omp_set_num_threads(threads)
    try:
        result: dict[str, Any] = {"faiss_threads": threads, "k": k,
                                  "synthetic": "unit-norm, 1000 vectors per random centre; queries: bank vectors "
                                               "+ noise of norm 0.5, renormalised",
                                  f"real bank ({len(real_bank)})": bench_bank(
                                      unit(real_bank), unit(real_queries[:n_queries]), k=k, nprobes=nprobes,
                                      repeats=repeats, train_sample=train_sample, rng=rng)}
        for size in sizes:
            bank = synthetic_bank(size, real_bank.shape[1], rng)
            result[f"synthetic ({size})"] = bench_bank(bank, near_queries(bank, n_queries, rng), k=k, nprobes=nprobes,
                                                       repeats=repeats, train_sample=train_sample, rng=rng)
            del bank
    finally:
        faiss.omp_set_num_threads(saved)
    return result


# ---------------------------------------------------------------------------------------------- all of it


def _target(value: float, goal: float, at_most: bool) -> dict[str, Any]:
    return {"value": value, "goal": f"{'<=' if at_most else '>='} {goal:g}",
            "met": bool(value <= goal if at_most else value >= goal)}


def targets(result: Mapping[str, Any]) -> dict[str, Any]:
    """Each goal beside the figure it is judged on."""
    found: dict[str, Any] = {}
    if "e2e_over_forward" in result.get("resnet18", {}):
        found["resnet18 e2e / forward"] = _target(result["resnet18"]["e2e_over_forward"],
                                                  TARGETS["resnet18_e2e_over_forward"], True)
    found["dhat main / FLOP-predicted (b1)"] = _target(result["dhat_heads"]["b1_over_flop_prediction"],
                                                       TARGETS["dhat_main_over_flop_prediction"], True)
    found["ducat infer / base infer"] = _target(result["ducat_recovery"]["infer_ratio"],
                                                TARGETS["ducat_over_base_infer"], True)
    found["onnx / eager (worst mode, b1)"] = _target(min(v["b1_ratio"] for v in result["onnx_vs_eager"].values()),
                                                     TARGETS["onnx_over_eager"], False)
    found["knn recall >= 0.95 at >= 10x (b1)"] = {
        bank: ", ".join(figures["meets_target"]) or "none"
        for bank, figures in result["knn"].items() if isinstance(figures, dict)}
    return found


def _nginx_version() -> str:
    import subprocess

    done = subprocess.run([proxy.nginx_binary(), "-v"], capture_output=True, text=True, check=False)
    return (done.stderr or done.stdout).strip().removeprefix("nginx version: ")


def bench_serve(*, runs_root: str | Path = "runs", runs: Mapping[str, str | Path] | None = None,
                preset: str = "quick", model_store: str | Path | None = None, requests: int = 200,
                clients: Sequence[int] = (1, 8), knn_sizes: Sequence[int] = (100_000, 1_280_000), repeats: int = 200,
                quick: bool = False, resnet18: bool = True, nprobes: Sequence[int] = (8, 32, 128),
                knn_queries: int = 200, knn_threads: int | None = None, seed: int = 0) -> dict[str, Any]:
    """Serve the runs of pgd_at, dhat, ducat and that (``find_runs``) and measure parts 1-8 (module docstring).

    ``runs``: recipe -> run folder, instead of the ``preset`` run folders in ``runs_root``. ``model_store``: an empty
    folder to package the archives into and keep (default: a temporary one). ``requests``: REST
    requests per endpoint and client count; ``repeats``: timed calls per in-process figure.
    ``quick``: a few requests and repeats, one 20k synthetic bank and a ResNet-18 trained on 40 images.
    """
    if quick:
        requests, repeats = min(requests, QUICK["requests"]), min(repeats, QUICK["repeats"])
        knn_sizes, knn_queries, nprobes = QUICK["knn_sizes"], min(knn_queries, QUICK["knn_queries"]), QUICK["nprobes"]
    if requests < max(clients) or repeats < 1 or not clients:
        raise ConfigError(f"need requests >= the most clients and repeats >= 1 (got {requests}, {repeats})")
    run_dirs = find_runs(runs_root, runs, preset=preset)
    with tempfile.TemporaryDirectory(prefix=TEMP_PREFIX) as tmp_name:
        tmp = Path(tmp_name)
        store = Path(model_store) if model_store is not None else tmp / "store"
        if store.is_dir() and any(store.glob("*.mar")):
            raise ConfigError(f"the model store for bench serve must hold no archives yet: {store}")
        result: dict[str, Any] = {"benchmark": "serve", "runs": {r: str(d) for r, d in run_dirs.items()}}
        seconds: dict[str, float] = {}  # wall time of each step of the benchmark itself
        clock = Clock(seconds)
        served_runs = dict(run_dirs)
        if resnet18:
            per_class = QUICK["resnet_images"] if quick else (20, 5)
            served_runs["resnet18"], train_s = train_resnet18(tmp / "resnet18", train_per_class=per_class[0],
                                                              val_per_class=per_class[1], seed=seed)
            result["resnet18"] = {"train_s": train_s, "train_images": 10 * per_class[0]}
            clock("train resnet18")
        folders = package_and_extract(served_runs, store, tmp / "unpacked")
        clock("package")
        pixels, pngs = eval_images(run_dirs[PLAIN], max(knn_queries, 16))
        images = {"fashion": pngs[:16]}
        if resnet18:
            with _env(*RESNET_IMAGE_SIZE):
                resnet_pixels, images["resnet18"] = eval_images(served_runs["resnet18"], 16)
        from serving.runtime import Runtime

        runtimes = {name: Runtime(folder, backend="onnx", device="cpu") for name, folder in folders.items()}
        knn_k = min(KNN_K, len(runtimes["that_knn"].context.bank))
        points = endpoints(knn_k, resnet18)
        clock("load")

        with running_server(store, list(folders), tmp / "ts") as (url, token):  # part 1
            clock("start server")
            rest = bench_rest(url, token, points, images, clients, requests)
            clock("rest")
            [proxy_port] = server.free_ports(1)
            front = proxy.ProxySettings(state_dir=tmp / "ts", upstream=url, port=proxy_port, **BENCH_PROXY_LIMITS)
            with proxy.running(front):  # part 8
                result["proxy"] = bench_proxy(url, front, token, next(p for p in points if p.label == PROXY_ENDPOINT),
                                              images["fashion"], clients, requests)
            clock("proxy")

        result["endpoints"] = {}
        for endpoint in points:  # part 2
            local = bench_local(runtimes[endpoint.model], images[endpoint.images][0], endpoint.options, repeats)
            result["endpoints"][endpoint.label] = {"model": endpoint.model, **local, **rest[endpoint.label],
                                                   **overhead(local, rest[endpoint.label])}
        if resnet18:  # part 3
            resnet = result["endpoints"]["resnet18 (natural)"]
            result["resnet18"].update({"forward_ms": resnet["forward_ms"], "e2e_p50_ms": resnet["c1_p50_ms"],
                                       "e2e_over_forward": resnet["c1_p50_ms"] / resnet["forward_ms"]})
        result["dhat_heads"] = bench_heads(runtimes[DHAT], run_dirs[DHAT], pixels, repeats, rest)  # part 4
        result["ducat_recovery"] = bench_ducat(result["endpoints"]["ducat recovered"],  # part 5
                                               result["endpoints"][PLAIN])
        clock("stop server + in-process figures")
        result["onnx_vs_eager"] = {}  # part 6
        for name, runtime in runtimes.items():
            result["onnx_vs_eager"].update(bench_backends(runtime, resnet_pixels if name == RESNET_MODEL and resnet18
                                                          else pixels, repeats))
        clock("onnx vs eager")
        from training.knn import MEMORY_BANK, MemoryBank

        real_bank = MemoryBank.load(folders["that_knn"] / MEMORY_BANK).features.numpy()
        real_queries = runtimes["that_knn"].backend.run("knn", pixels[:knn_queries].numpy())
        result["knn"] = bench_knn(real_bank, real_queries, knn_sizes, k=KNN_K, nprobes=nprobes,  # part 7
                                  n_queries=knn_queries, repeats=repeats, threads=knn_threads, seed=seed)
        clock("knn")
    import onnxruntime
    import psutil

    result["settings"] = {"requests": requests, "clients": list(clients), "repeats": repeats, "quick": quick,
                          **SERVED_AS, "proxy": {"nginx": _nginx_version(), **BENCH_PROXY_LIMITS},
                          "onnxruntime": onnxruntime.__version__,
                          "onnxruntime_threads": f"ORT default (one per physical core: {psutil.cpu_count(False)})",
                          "knn_sizes": list(knn_sizes), "nprobes": list(nprobes), "knn_queries": knn_queries}
    result["seconds"] = seconds
    result["targets"] = targets(result)
    result["definitions"] = DEFINITIONS
    result["environment"] = describe_environment("cpu")
    return result


# ---------------------------------------------------------------------------------------------- command line


def add_options(p: argparse.ArgumentParser) -> None:
    add_run_options(p)
    p.add_argument("--requests", type=int, help="REST requests per endpoint and client count (default 200)")
    p.add_argument("--repeats", type=int, help="timed calls per in-process figure (default 200)")
    p.add_argument("--quick", action="store_true", help="a few requests, small kNN banks, a tiny ResNet-18")


def run(args: argparse.Namespace) -> dict[str, Any]:
    return bench_serve(**given(args, "preset", "requests", "repeats", runs_root="runs"), quick=args.quick)

"""The benchmarks of ``robustserve bench WHAT``: one registry, ``BENCHMARKS``, of what WHAT can be.

Each ``Benchmark`` brings its name, a one-line description, the function that adds its own command-line
options to its sub-parser, and the function that runs it on the parsed options and returns its figures
(a plain, JSON-serialisable dict). ``serving.cli`` builds ``robustserve bench``'s sub-commands from it.

Modules, each importing only those above it (``__init__`` imports them all; none imports it back):

* ``common``: the error, the timing helpers, ``format_table``, and what the serving benchmarks share
  (their runs, archives, server settings, endpoints and requests);
* ``compute``: ``attacks``, ``at-step``, ``train-step`` and ``all`` (PGD throughput, the adversarial-training step,
  FLOPs, the training step's speed-ups);
* ``serve``: ``serve`` (REST latency and overhead, ONNX vs eager, kNN indexes, the proxy's cost);
* ``load``: ``load`` (a bounded load on a real TorchServe, a worker killed under it);
* ``worker``: ``worker`` (a serving worker's start-up time and peak memory, per model and backend).

The machine and versions every result names come from ``training.environment``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import compute, load, serve, worker


@dataclass(frozen=True)
class Benchmark:
    name: str  # `robustserve bench NAME`
    description: str  # one line: the sub-command's help
    add_options: Callable[[argparse.ArgumentParser], None]  # its own options; left unset, its defaults hold
    run: Callable[[argparse.Namespace], dict[str, Any]]  # the parsed options -> its figures


BENCHMARKS: dict[str, Benchmark] = {benchmark.name: benchmark for benchmark in (
    Benchmark("attacks", "our PGD-10 beside torchattacks' on one model and batch",
              compute.add_attacks_options, compute.run_attacks),
    Benchmark("at-step", "one PGD-10 adversarial-training step (bf16 on GPU) in img/s and model TFLOP/s",
              compute.add_at_step_options, compute.run_at_step),
    Benchmark("train-step", "the training's PGD-AT step in float32, with a bf16 attack and under torch.compile, "
                            "interleaved, and its split into attack and update", compute.add_train_step_options,
              compute.run_train_step),
    Benchmark("all", "attacks and at-step (at-step on GPU only)", compute.add_all_options, compute.run_all),
    Benchmark("serve", "the served defenses over REST against their bare forwards, ONNX vs eager, kNN indexes",
              serve.add_options, serve.run),
    Benchmark("load", "concurrent clients on every served endpoint (failures, p50/p99, req/s), optionally with a "
                      "worker killed under it", load.add_options, load.run),
    Benchmark("worker", "a serving worker's start-up time and peak memory per served model and backend",
              worker.add_options, worker.run),
)}

"""``robustserve bench worker``: what one serving worker costs to start, per served model and backend.

Each figure is a fresh interpreter that imports the handler module and the runtime and loads one extracted
archive (what a TorchServe worker does in its ``initialize``, without TorchServe's own imports): its wall
time and its peak resident memory, the median of ``repeats`` starts, and whether it imported torch.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from .common import add_run_options, find_runs, given, package_and_extract

REPEATS = 3
BACKENDS = ("onnx", "torch")
# Run in the fresh interpreter: handler + runtime imports, one archive loaded, the figures as one JSON line.
# Peak RSS is the process's own VmHWM: getrusage's ru_maxrss would carry the benchmark's own peak across exec.
PROBE = """
import json, re, sys, time
started = time.perf_counter()
import handlers.base
from serving.runtime import Runtime
Runtime(sys.argv[1], backend=sys.argv[2])
seconds = time.perf_counter() - started
peak_kib = int(re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1))
print(json.dumps({"start_s": seconds, "torch": "torch" in sys.modules, "peak_rss_mib": peak_kib / 1024}))
"""


def start_figures(folder: Path, backend: str, repeats: int = REPEATS) -> dict[str, Any]:
    """Median start-up seconds and peak RSS of ``repeats`` fresh workers loading ``folder`` on ``backend``."""
    root = Path(__file__).resolve().parents[2]  # the checkout, so the probe imports this code
    runs = [json.loads(subprocess.run([sys.executable, "-c", PROBE, str(folder), backend], check=True, cwd=root,
                                      capture_output=True, text=True).stdout.strip().splitlines()[-1])
            for _ in range(repeats)]
    return {"start_s": statistics.median(r["start_s"] for r in runs),
            "peak_rss_mib": statistics.median(r["peak_rss_mib"] for r in runs), "imports_torch": runs[0]["torch"]}


def bench_worker(*, runs_root: str | Path = "runs", preset: str = "quick", repeats: int = REPEATS) -> dict[str, Any]:
    run_dirs = find_runs(runs_root, preset=preset, benchmark="worker")
    with tempfile.TemporaryDirectory(prefix="robustserve-bench-worker-") as tmp_name:
        tmp = Path(tmp_name)
        folders = package_and_extract(run_dirs, tmp / "store", tmp / "unpacked")
        figures = {f"{model} {backend}": start_figures(folder, backend, repeats)
                   for model, folder in folders.items() for backend in BACKENDS}
    return {"workers": figures, "settings": {"repeats": repeats, "preset": preset}}


def add_options(p: argparse.ArgumentParser) -> None:
    add_run_options(p)
    p.add_argument("--repeats", type=int, help=f"fresh starts per figure, the median is reported (default {REPEATS})")


def run(args: argparse.Namespace) -> dict[str, Any]:
    return bench_worker(**given(args, "preset", "repeats", runs_root="runs"))

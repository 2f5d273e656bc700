"""What machine and versions produced a figure: the header of RESULTS.md and of every benchmark result.

Its own module, below both the main job (``robustserve run``) and the benchmarks (``serving.bench``),
so that neither has to import the other to describe where it ran.
"""

from __future__ import annotations

import contextlib
import os
import platform
from typing import Any

import torch

from .devices import default_device


def device_name(device: torch.device) -> str:
    """The GPU's name, or ``cpu (<model name from /proc/cpuinfo>)``."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    return f"cpu ({name})"


def describe_environment(device: str | torch.device | None = None) -> dict[str, Any]:
    """torch version, device name and thread counts: what a reader needs to compare two runs.

    ``device``: the one the figures come from (default: the GPU when there is one, else the CPU).
    Plain, JSON-serialisable values only.
    """
    dev = default_device(device)
    env: dict[str, Any] = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(dev),
        "device_name": device_name(dev),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "cpu_count": os.cpu_count(),
    }
    if hasattr(os, "getloadavg"):  # a busy machine explains noisy CPU timings
        env["load_avg_1_5_15m"] = [round(v, 2) for v in os.getloadavg()]
    if dev.type == "cuda":
        env["cuda"] = torch.version.cuda
        env["cudnn"] = torch.backends.cudnn.version()
    with contextlib.suppress(ImportError):  # the peer `robustserve bench attacks` compares against, when installed
        import torchattacks

        env["torchattacks"] = torchattacks.__version__
    return env

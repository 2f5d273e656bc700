"""Checkpoint files: safetensors only (never a pickle), every write atomic. What a run folder holds,
and what each file is called, is ``training.runs``."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import subprocess
import tempfile
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from .errors import CheckpointError, cannot_write
from .run_files import read_tensors

_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write(path: Path, write: Callable[[Path], None], *, mode: int | None = None) -> None:
    """Run ``write(tmp)`` on a temporary file beside ``path``, fsync it, then rename it over ``path``.

    ``mode``: the file's permissions (default: the usual ones, 0666 less the umask); set before the rename,
    so a private file is never readable by others at ``path``. A crash, a full disk or a permission error
    leaves ``path`` as it was and no temporary file; the last two raise CheckpointError with one line that
    says which and how to fix it.
    """
    path = Path(path)
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise CheckpointError(cannot_write(path.parent, err)) from err
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK if mode is None else mode)  # mkstemp makes 0600
        os.replace(tmp, path)
    except OSError as err:
        raise CheckpointError(cannot_write(path, err)) from err
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: Path, text: str, *, mode: int | None = None) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text), mode=mode)


def write_json(path: Path, payload: dict[str, Any], *, mode: int | None = None) -> None:
    write_text(path, json.dumps(payload, indent=2, sort_keys=True) + "\n", mode=mode)


def _save_file(tensors: dict[str, torch.Tensor], path: Path, metadata_: dict[str, str] | None) -> None:
    """safetensors' ``save_file``, with its I/O errors (a full disk) raised as the OSError they are.

    safetensors reports them as ``SafetensorError("... (os error 28)")``, which ``atomic_write``
    would not recognise as a failed write."""
    try:
        save_file(tensors, str(path), metadata=metadata_)
    except SafetensorError as err:
        code = re.search(r"\(os error (\d+)\)", str(err))
        if code is None:
            raise
        raise OSError(int(code.group(1)), os.strerror(int(code.group(1)))) from err


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any] | None = None) -> None:
    contiguous = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    metadata_ = {"state": json.dumps(meta)} if meta is not None else None
    atomic_write(path, lambda tmp: _save_file(contiguous, tmp, metadata_))


def load_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """A checkpoint's tensors and the state stored with them (``save_tensors``)."""
    return read_tensors(path, "pt")


def load_state(path: Path) -> dict[str, Any] | None:
    """Only the state stored with a checkpoint's tensors (the tensors stay on disk)."""
    return read_tensors(path, "pt", with_tensors=False)[1]


def model_tensors(state_dict: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """SGD's per-parameter buffers as ``optim/<param index>/<name>`` tensors."""
    return {f"optim/{index}/{name}": value
            for index, buffers in optimizer.state_dict()["state"].items()
            for name, value in buffers.items() if isinstance(value, torch.Tensor)}


def load_optimizer_tensors(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim/"):
            _, index, name = key.split("/", 2)
            state.setdefault(int(index), {})[name] = value
    current = optimizer.state_dict()
    optimizer.load_state_dict({"state": state, "param_groups": current["param_groups"]})


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 over every parameter and buffer, in name order: equal digests mean equal weights."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


@functools.cache
def code_version() -> str:
    """The package version, plus the git commit when running from a checkout: read once per process, so that a
    commit made while a long run trains is not recorded as the code it ran (the trainer reads it when it starts)."""
    try:
        version = metadata.version("robustserve")
    except metadata.PackageNotFoundError:
        version = "unknown"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, timeout=5, check=True).stdout.strip()
        return f"{version}+g{commit}"
    except (OSError, subprocess.SubprocessError):
        return version

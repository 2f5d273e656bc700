"""Reading a run's files without torch: ``defense.json``, THAT's memory bank, a safetensors file, a SHA-256.

A served archive holds the same files as the run folder it was packaged from, and the serving worker
reads them here: this module imports neither torch nor the recipe registry, so a worker on the ONNX
backend starts without the training stack (``training.runs`` is the home of everything else about a run
folder, and imports both). The safetensors reader hands back numpy arrays or torch tensors, as asked.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open

from .errors import CheckpointError

DEFENSE_JSON = "defense.json"
MEMORY_BANK = "memory_bank.safetensors"  # THAT's bank (``training.knn.MemoryBank``) in a run folder and in a .mar


def read_defense_json(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / DEFENSE_JSON
    if not path.is_file():
        raise CheckpointError(f"{run_dir} is not a training run (no {DEFENSE_JSON}); train one with `robustserve train`")
    return json.loads(path.read_text())


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_tensors(path: Path, framework: str, *, with_tensors: bool = True) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The tensors of a safetensors file (``framework``: "np" numpy arrays, "pt" torch tensors) and the JSON
    state ``training.checkpoint.save_tensors`` stored in its metadata (None when there is none). Without
    ``with_tensors`` only the state is read (the tensors come back empty)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        with safe_open(str(path), framework=framework) as handle:
            raw = (handle.metadata() or {}).get("state")
            tensors = handle.get_tensors() if with_tensors else {}
        return tensors, (json.loads(raw) if raw else None)
    except (OSError, ValueError, RuntimeError, SafetensorError) as err:  # what safetensors raises for corrupt files
        raise CheckpointError(f"{path} is not a readable safetensors checkpoint: {err}") from err


def read_memory_bank(path: Path, framework: str) -> tuple[Any, Any, Any, int]:
    """THAT's memory bank file as ``(features [N, D], labels [N], ids [N], num_classes)``, arrays of
    ``framework`` as in ``read_tensors``, shapes checked."""
    tensors, meta = read_tensors(path, framework)
    if set(tensors) != {"features", "labels", "ids"} or not meta or "num_classes" not in meta:
        raise CheckpointError(f"{path} is not a memory bank (it holds {', '.join(sorted(tensors))})")
    features, labels, ids = tensors["features"], tensors["labels"], tensors["ids"]
    if features.ndim != 2 or labels.shape != (features.shape[0],) or ids.shape != labels.shape:
        raise CheckpointError(f"{path}: inconsistent memory bank shapes {tuple(features.shape)}, "
                              f"{tuple(labels.shape)}, {tuple(ids.shape)}")
    return features, labels, ids, int(meta["num_classes"])

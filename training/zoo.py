"""The model zoo: finished ``standard`` runs committed with the repository (``model_store/zoo/``).

A zoo entry is a run folder (``training.runs``) without what only training needs: the served
weights, ``defense.json``, the evaluation report and curves, and small artifacts (DUCAT's class
pairing), but no optimiser state (``last.safetensors``), no earlier stage's weights and no stored
attack rows. Artifacts that are large and deterministic (THAT's memory bank: 60,000 features) are
left out and rebuilt from the training set when the entry is first used (``runs.restore_artifacts``).
Entries keep their run folder names, so the zoo is a runs root like ``runs/``: base runs resolve as
siblings, and ``serving.package`` packages an entry like any run.

Each entry's ``zoo.json`` records the command and code version that made it, whether its validation
curve was flat (``runs.validation_rise``), the SHA-256 of its files, and each serving mode's clean
accuracy on the whole test set, measured when it was added; ``check_entry`` measures it again (the zoo
test does, for every entry).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .attacks.attacks import correct_flags
from .checkpoint import write_json
from .errors import CheckpointError
from .run_files import sha256_file
from .runs import (
    LAST,
    REPORT_JSON,
    load_test_subset,
    read_defense_json,
    restore_artifacts,
    run_finished,
    validation_rise,
)
from .stats import proportion

ZOO_ROOT = Path("model_store/zoo")
ZOO_JSON = "zoo.json"
REBUILT = ("memory_bank.safetensors",)  # large artifacts rebuilt from the training set, never committed
# Seeded inference on another CPU type can flip the odd borderline image (float sums in another order).
CHECK_TOLERANCE = 3  # images of the 10,000


def zoo_files(run_dir: Path) -> list[Path]:
    """The files of a finished run that go into the zoo."""
    return sorted(p for p in Path(run_dir).iterdir()
                  if p.is_file() and p.name not in (LAST, *REBUILT) and not p.name.startswith("best-"))


def entries(zoo_root: Path = ZOO_ROOT) -> dict[str, Path]:
    """Recipe id -> its zoo entry."""
    found = {}
    for folder in sorted(Path(zoo_root).glob("*/")):
        if (folder / ZOO_JSON).is_file():
            found[read_defense_json(folder)["defense"]] = folder
    return found


def clean_accuracy(run_dir: Path, data_root: str | None = None) -> dict[str, dict[str, Any]]:
    """Each serving mode's accuracy on the whole test set (artifacts restored first)."""
    run = restore_artifacts(run_dir, data_root)
    x, y, _ = load_test_subset(run.info, None, data_root)
    return {name: proportion(correct_flags(mode.module, x, y)).to_json() for name, mode in run.modes().items()}


def add_run(run_dir: Path, zoo_root: Path = ZOO_ROOT, *, command: str, data_root: str | None = None) -> Path:
    """Copy the finished, evaluated run into the zoo (replacing an older entry of the same name) and
    record what made it. The entry is assembled in a temporary folder and renamed into place."""
    run_dir = Path(run_dir)
    if not run_finished(run_dir):
        raise CheckpointError(f"{run_dir} holds no finished run; only finished runs go into the zoo")
    if not (run_dir / REPORT_JSON).is_file():
        raise CheckpointError(f"{run_dir} has no {REPORT_JSON}; evaluate it first (`robustserve eval {run_dir}`)")
    zoo_root.mkdir(parents=True, exist_ok=True)
    target = zoo_root / run_dir.name
    staging = Path(tempfile.mkdtemp(prefix=f".{run_dir.name}.", dir=zoo_root))
    staging.chmod(0o755)  # mkdtemp's folder is private; an entry is as readable as the repository
    try:
        for path in zoo_files(run_dir):
            shutil.copy2(path, staging / path.name)
        info = read_defense_json(staging)
        record = {"command": command, "code_version": info["code_version"],
                  "added": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
                  "validation_rise": validation_rise(info),  # converged: flat over the last third of the epochs
                  "sha256": {p.name: sha256_file(p) for p in zoo_files(staging)},
                  "clean_accuracy": clean_accuracy(staging, data_root)}
        for name in REBUILT:  # rebuilt by clean_accuracy; never part of the entry
            (staging / name).unlink(missing_ok=True)
        write_json(staging / ZOO_JSON, record)
        # The older entry is moved aside, not deleted, before the new one takes its name: a failure in between
        # leaves the older entry under its hidden name instead of no entry at all.
        aside = Path(tempfile.mkdtemp(prefix=f".{run_dir.name}.old.", dir=zoo_root)) if target.exists() else None
        if aside:
            target.rename(aside / "entry")
        staging.rename(target)
        if aside:
            shutil.rmtree(aside, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def check_entry(entry: Path, data_root: str | None = None) -> dict[str, tuple[int, int]]:
    """Measure the entry's clean accuracy again: mode -> (recorded k, measured k); raise when a file
    does not match its recorded SHA-256 or a mode is off by more than ``CHECK_TOLERANCE`` images."""
    record = json.loads((Path(entry) / ZOO_JSON).read_text())
    for name, digest in record["sha256"].items():
        if sha256_file(Path(entry) / name) != digest:
            raise CheckpointError(f"{entry / name} does not match the SHA-256 in its {ZOO_JSON}")
    measured = clean_accuracy(entry, data_root)
    pairs = {mode: (record["clean_accuracy"][mode]["k"], measured[mode]["k"]) for mode in record["clean_accuracy"]}
    off = {mode: pair for mode, pair in pairs.items() if abs(pair[0] - pair[1]) > CHECK_TOLERANCE}
    if off or set(measured) != set(record["clean_accuracy"]):
        raise CheckpointError(f"{entry}: clean accuracy (recorded k, measured k) {off or pairs} of "
                              f"{record['clean_accuracy']}")
    return pairs


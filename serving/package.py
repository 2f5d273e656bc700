"""Package a finished run into TorchServe archives (``model_store/<name>.mar``), one per served model.

Which models a run is served as, and how, is the table in ``serving.served_models``.

An archive holds, flat: ``defense.json``, ``best.safetensors`` (the eager module's weights), the
evaluation ``report.json``, ``export.json`` and the ONNX graph of each served mode, DUCAT's
``pairing.json``, THAT's ``memory_bank.safetensors`` and ``memory_bank.faiss``, ``served.json`` and
``MANIFEST.json`` with the SHA-256 of all of them,
which the runtime checks before it loads anything. A run with a secret DUCAT class pairing is served
without its raw 2C scores (they reveal the pairing; ``PackageSettings.raw_with_secret_pairing``), and
its archive, like its ``pairing.json``, is readable by its owner only. Batching and workers are
deployment settings: ``robustserve serve`` writes them into the TorchServe config (``serving.server``).
The archive is built in a temporary folder and renamed into place, so ``model_store/`` never holds a
half-written ``.mar``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from training.checkpoint import CheckpointError
from training.errors import ConfigError, RobustServeError, cannot_write
from training.export import EXPORT_DIR, EXPORT_JSON, current_export, export_run
from training.pairing import PAIRING_FILE, read_pairing
from training.runs import BEST, DEFENSE_JSON, REPORT_JSON, read_defense_json, restore_artifacts

from .knn_index import INDEX_KINDS
from .postprocess import POSTPROCESSORS, PRIVATE
from .runtime import BACKENDS, SERVED_JSON, ServedInfo, withheld_modes, write_manifest
from .served_models import ServedModel, served_models_of
from .signing import Ed25519PrivateKey, sign_archive, signature_path

HANDLERS_DIR = Path(__file__).resolve().parent.parent / "handlers"
STORE_FIX = "choose another --model-store"  # the way out of a full or read-only model store


@dataclass(frozen=True)
class PackageSettings:
    version: str = "1.0"
    backend: str = "onnx"  # what the handler runs: onnx (ONNX Runtime) or torch (eager)
    knn_index: str = "flat"  # flat (exact) or ivf
    nlist: int | None = None  # IVF cells (default ~4 sqrt(N))
    nprobe: int = 16
    # Serve DUCAT's raw 2C scores (mode=raw) even when the run's class pairing is secret. The risk: a client that
    # sends a few hundred queries can read the pairing off the raw scores (SECURITY.md), which undoes the secret.
    # Off, the archive serves only the recovered mode and the runtime refuses mode=raw with a 403.
    raw_with_secret_pairing: bool = False

    def check(self) -> None:
        if self.backend not in BACKENDS:
            raise ConfigError(f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.knn_index not in INDEX_KINDS:
            raise ConfigError(f"the kNN index must be one of {', '.join(INDEX_KINDS)}, got {self.knn_index!r}")
        if self.nprobe < 1 or (self.nlist is not None and self.nlist < 1):
            raise ConfigError("nlist and nprobe must be >= 1")


class PackageError(RobustServeError):
    """torch-model-archiver failed, or the run lacks what an archive needs."""


def _stage(run_dir: Path, served: ServedModel, export: dict[str, Any], settings: PackageSettings,
           staging: Path) -> None:
    """Copy into ``staging`` everything the archive of ``served`` holds, then its manifest."""
    info = read_defense_json(run_dir)
    modes = served.modes or tuple(export["serving_modes"])  # the recipe's order: the first is the default
    missing = [m for m in modes if m not in export["modes"]]
    if missing:
        raise PackageError(f"{run_dir} has no serving mode(s) {', '.join(missing)} for model {served.name}; "
                           f"it has {', '.join(export['serving_modes'])}")
    pairing = read_pairing(run_dir / PAIRING_FILE) if (run_dir / PAIRING_FILE).is_file() else None
    withheld = withheld_modes({m: export["modes"][m]["postprocess"] for m in modes}, pairing,
                              settings.raw_with_secret_pairing)
    modes = tuple(m for m in modes if m not in withheld)
    for name in (DEFENSE_JSON, BEST, REPORT_JSON):
        if (run_dir / name).is_file():
            shutil.copy2(run_dir / name, staging / name)
    export_record = {**export, "modes": {m: export["modes"][m] for m in modes}}
    (staging / EXPORT_JSON).write_text(json.dumps(export_record, indent=2) + "\n")
    for mode in modes:
        shutil.copy2(run_dir / EXPORT_DIR / export["modes"][mode]["onnx"], staging / export["modes"][mode]["onnx"])
    params = info["config"].get("params", {})
    extra: dict[str, Any] = {"withheld_modes": withheld} if withheld else {}
    if pairing is not None and settings.raw_with_secret_pairing:
        extra["raw_with_secret_pairing"] = True
    kinds = dict.fromkeys(export["modes"][m]["postprocess"] for m in modes)
    postprocess = {kind: POSTPROCESSORS[kind].package(run_dir, staging, params, settings) for kind in kinds}
    served_info = ServedInfo(name=served.name, version=settings.version, defense=info["defense"], modes=modes,
                             mode_parameter=served.mode_parameter, backend=settings.backend,
                             postprocess={kind: found for kind, found in postprocess.items() if found}, extra=extra)
    (staging / SERVED_JSON).write_text(json.dumps(asdict(served_info), indent=2) + "\n")
    write_manifest(staging)


def _archive(served: ServedModel, staging: Path, settings: PackageSettings, model_store: Path) -> Path:
    """torch-model-archiver into a temporary folder, then an atomic rename into ``model_store``. A failed
    write raises OSError, which ``package_run`` reports as for every other write into the store."""
    handler = HANDLERS_DIR / f"{served.handler}.py"
    extra = sorted(str(p) for p in staging.iterdir())
    out = Path(tempfile.mkdtemp(prefix=f".{served.name}.", dir=model_store))
    try:
        archiver = Path(sys.executable).with_name("torch-model-archiver")
        command = [str(archiver), "--model-name", served.name, "--version", settings.version, "--handler",
                   str(handler), "--extra-files", ",".join(extra),
                   "--export-path", str(out), "--archive-format", "default", "--force"]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            last = ((done.stderr or done.stdout).strip().splitlines() or ["(no output)"])[-1]
            code = re.search(r"\[Errno (\d+)\]", last)
            if code:  # the archiver's own write failed (a full disk): said as every other failed write
                raise OSError(int(code.group(1)), os.strerror(int(code.group(1))))
            raise PackageError(f"torch-model-archiver failed for {served.name}: {last}")
        target = model_store / f"{served.name}.mar"
        if (staging / PAIRING_FILE).is_file():  # private before it is in the store, never after
            os.chmod(out / f"{served.name}.mar", PRIVATE)
        os.replace(out / f"{served.name}.mar", target)
        return target
    finally:
        shutil.rmtree(out, ignore_errors=True)


def package_run(run_dir: str | Path, *, model_store: str | Path = "model_store",
                settings: PackageSettings | None = None, names: list[str] | None = None,
                sign_key: Ed25519PrivateKey | None = None) -> list[Path]:
    """Export the run if its export is stale, then build one archive per served model; returns the .mar paths.

    With ``sign_key`` each archive gets its signature beside it (``serving.signing``); without, none (a
    signature left from an earlier archive of that name is removed)."""
    settings = settings or PackageSettings()
    settings.check()
    run_dir, model_store = Path(run_dir), Path(model_store)
    info = read_defense_json(run_dir)
    if not info.get("finished", False):
        raise CheckpointError(f"{run_dir} is not a finished run; train it to the end first")
    try:
        model_store.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise PackageError(cannot_write(model_store, err, STORE_FIX)) from err
    restore_artifacts(run_dir, info["config"].get("data_root"))  # a zoo entry comes without THAT's memory bank
    export = current_export(run_dir) or export_run(run_dir)
    served = served_models_of(info["defense"])
    if names:
        unknown = sorted(set(names) - {m.name for m in served})
        if unknown:
            raise ConfigError(f"a {info['defense']} run is served as {', '.join(m.name for m in served)}, "
                              f"not {', '.join(unknown)}")
        served = [m for m in served if m.name in names]
    archives = []
    for model in served:
        try:
            with tempfile.TemporaryDirectory(prefix=f".{model.name}.staging.", dir=model_store) as staging:
                _stage(run_dir, model, export, settings, Path(staging))
                # A signature of the archive about to be replaced would vouch for nothing; gone first, it
                # cannot be left beside the new archive whatever fails next.
                signature_path(model_store / f"{model.name}.mar").unlink(missing_ok=True)
                archive = _archive(model, Path(staging), settings, model_store)
            if sign_key is not None:
                sign_archive(archive, sign_key)
            archives.append(archive)
        except OSError as err:  # a full or read-only model store (staging and temporary folders are removed)
            raise PackageError(cannot_write(model_store / f"{model.name}.mar", err, STORE_FIX)) from err
    return archives

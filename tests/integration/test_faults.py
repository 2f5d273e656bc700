"""Faults: load and a worker killed with SIGKILL on a real TorchServe; full and read-only disks; bad data and settings.

* ``robustserve bench load`` (``serving.bench.load``) runs briefly against the tiny served runs: every
  request of the load answered 200, figures self-consistent; then the same load with pgd_at's worker
  killed: a new worker (new pid, a child of the frontend), the model answering 200 again within the
  recovery timeout, and every failed request counted by status and endpoint.
* A training run and ``robustserve package`` whose output folder is read-only or whose disk fills up:
  exit 2 with one line naming the fix, and no partial checkpoint or archive (or temporary file) left.
  The disk is a real tmpfs mounted here when ``mount`` works (root with CAP_SYS_ADMIN); a full disk is
  also simulated in-process by failing the low-level write, which runs everywhere.
* Missing or corrupt data and a checkpoint that cannot be resumed: exit 2, one line naming the fix,
  nothing written. (Unknown recipe, preset, architecture or setting: tests/integration/test_engine.py::
  test_cli_errors_are_one_line; a training run killed with SIGKILL: test_killed_run_resumes_to_identical_weights.)

RELIABILITY.md lists these checks with the figures measured.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import gzip
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import processes_started_from, tiny_config

from serving.bench import BENCHMARKS
from serving.bench import load as bl
from serving.bench.common import format_table
from training.checkpoint import load_tensors
from training.engine import train
from training.errors import ConfigError
from training.runs import BEST, DEFENSE_JSON, LAST

pytestmark = pytest.mark.usefixtures("one_thread")

ROBUSTSERVE = str(Path(sys.executable).parent / "robustserve")
# One tiny epoch on the synthetic data (learnable_fashion_mnist): a checkpoint within seconds.
TRAIN_FLAGS = ["--epochs", "1", "--batch-size", "50", "--attack-steps", "2", "--set", "train_subset=null",
               "--set", "val_size=100", "--set", "val_attack_steps=2", "--no-progress"]
CLIENTS, SECONDS, KILLED = 4, 3.0, "pgd_at"
LOAD_ENDPOINTS = {"pgd_at", "dhat head=main", "dhat head=second", "dhat head=both", "ducat recovered",
                  "ducat mode=raw", "that", "that_knn k=50", "that_knn k=5"}


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([ROBUSTSERVE, *args], capture_output=True, text=True, timeout=timeout, env=os.environ.copy())


def one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    """Exit code 2 and stderr exactly one line holding every fragment (no traceback)."""
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


# ---------------------------------------------------------------------------------------------- load


def temp_folders() -> set[Path]:
    return set(Path(tempfile.gettempdir()).glob(f"{bl.TEMP_PREFIX}*"))


@pytest.fixture(scope="module")
def load(served_runs):
    """``bench load`` with 4 clients for 3 s, then again with pgd_at's worker killed; no server may outlive it."""
    before = temp_folders()
    result = bl.bench_load(runs=served_runs, clients=CLIENTS, seconds=SECONDS, kill_worker=KILLED)
    assert not processes_started_from(bl.TEMP_PREFIX), "a TorchServe process outlived the benchmark"
    assert temp_folders() <= before, "the temporary model store and server state were not removed"
    return result


def check_phase(figures: dict) -> None:
    """What must hold of any phase's figures: counts add up, percentiles are ordered, rates are counts / wall."""
    assert figures["requests"] == figures["ok"] + figures["failed"]
    assert figures["failed"] == sum(figures["failed_by_status"].values()) == sum(figures["failed_by_endpoint"].values())
    assert len(figures["failure_examples"]) == min(figures["failed"], bl.EXAMPLES)
    assert 0 < figures["p50_ms"] <= figures["p99_ms"]
    assert figures["throughput_req_s"] == pytest.approx(figures["requests"] / figures["wall_s"])
    assert figures["ok_req_s"] == pytest.approx(figures["ok"] / figures["wall_s"])
    endpoints = figures["endpoints"]
    assert set(endpoints) == LOAD_ENDPOINTS
    assert sum(e["requests"] for e in endpoints.values()) == figures["requests"]
    assert sum(e["failed"] for e in endpoints.values()) == figures["failed"]
    assert sum(e["req_s"] for e in endpoints.values()) == pytest.approx(figures["throughput_req_s"])
    for label, e in endpoints.items():
        assert e["requests"] > 0 and 0 < e["p50_ms"] <= e["p99_ms"], label
        assert e["failed"] == figures["failed_by_endpoint"].get(label, 0), label


@pytest.mark.slow
def test_load_answers_every_request_with_consistent_figures(load):
    assert BENCHMARKS["load"].run is bl.run
    assert load["settings"]["clients"] == CLIENTS and load["settings"]["seconds"] == SECONDS
    assert load["warmup"]["requests"] == len(LOAD_ENDPOINTS) and load["warmup"]["failed"] == 0
    assert load["failed"] == 0, load["failure_examples"]
    check_phase(load)
    # Each client sends until its last reply ends after SECONDS: the phase lasts at least that long.
    assert SECONDS - 0.5 < load["wall_s"] < SECONDS + bl.REQUEST_TIMEOUT_S
    assert "throughput_req_s" in format_table(load, title="bench load")


@pytest.mark.slow
def test_a_killed_worker_is_replaced_and_failures_are_counted(load):
    kill = load["kill_worker"]
    assert kill["model"] == KILLED and kill["recovered"], kill
    assert kill["killed_pid_gone"] and kill["new_worker_pid"] not in (None, kill["killed_pid"])
    assert kill["new_worker_is_frontend_child"]
    assert 0 < kill["recovery_s"] < bl.RECOVERY_TIMEOUT_S and kill["probe_requests"] >= 1
    check_phase(kill["load"])
    meantime = kill["failed_until_recovered"]
    assert meantime["failed"] == sum(meantime["failed_by_status"].values()) <= kill["load"]["failed"]
    assert meantime["failed"] <= kill["requests_until_recovered"] <= kill["load"]["requests"]
    # Only the killed model's requests may fail: the other workers are untouched.
    killed_endpoints = {label for label, e in kill["load"]["endpoints"].items() if e["model"] == KILLED}
    assert set(kill["load"]["failed_by_endpoint"]) <= killed_endpoints, kill["load"]["failure_examples"]
    # The load went on until the model answered again: the phase outlasts the recovery.
    assert kill["load"]["wall_s"] >= max(SECONDS, SECONDS / 3 + kill["recovery_s"]) - 0.5


def test_only_a_served_model_can_have_its_worker_killed(served_runs):
    with pytest.raises(ConfigError, match="--kill-worker must be a served model .*that_knn.*got 'trades'"):
        bl.bench_load(runs=served_runs, kill_worker="trades")  # refused before anything is packaged or started


@pytest.mark.parametrize("flag, value, message", [("--clients", "65", "--clients must be between 1 and 64"),
                                                  ("--clients", "0", "--clients must be between 1 and 64"),
                                                  ("--seconds", "601", "--seconds must be above 0 and at most 600")])
def test_load_is_bounded(flag, value, message, tmp_path):
    one_line_error(cli("bench", "load", flag, value, "--runs", str(tmp_path)), message)


# ---------------------------------------------------------------------------------------------- disks


@functools.cache
def can_mount() -> bool:
    """Whether this process may mount a tmpfs (root with CAP_SYS_ADMIN, as on the project's machines)."""
    with tempfile.TemporaryDirectory() as folder:
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4k", "tmpfs", folder], capture_output=True).returncode:
            return False
        subprocess.run(["umount", folder], check=True)
    return True


@contextlib.contextmanager
def tmpfs(folder: Path, size: str, *, read_only: bool = False, subfolders: tuple[str, ...] = ()) -> Iterator[Path]:
    """A real filesystem of ``size`` at ``folder`` (holding ``subfolders``, made before it turns read-only)."""
    folder.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], check=True)
    try:
        for name in subfolders:
            (folder / name).mkdir()
        if read_only:
            subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=True)


def needs_mount() -> None:
    if not can_mount():
        pytest.skip("no real read-only or full filesystem without mount (CAP_SYS_ADMIN); the injected "
                    "full-disk variants still run")


def partial_then_full(path: Path) -> None:
    """A write to ``path`` that gets some bytes out and then finds the disk full, as a real one does."""
    Path(path).write_bytes(b"\0" * 1000)
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): sha256(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def leftovers(folder: Path) -> list[str]:
    """Temporary files and folders (hidden, or *.tmp) anywhere under ``folder``."""
    return [str(p) for p in folder.rglob("*") if p.name.startswith(".") or p.name.endswith(".tmp")]


def run_in_process(capsys, *args: str) -> subprocess.CompletedProcess:
    """The CLI's ``main`` here, so that a monkeypatched write fails inside it; shaped like a subprocess result."""
    from serving.cli import main

    code = main(list(args))
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, captured.out, captured.err)


@pytest.mark.slow
@pytest.mark.parametrize("disk", ["tmpfs", "injected"])
def test_training_onto_a_full_disk_fails_cleanly(disk, learnable_fashion_mnist, tmp_path, monkeypatch, capsys):
    if disk == "tmpfs":
        needs_mount()
        # 2 MiB: room for best.safetensors (1.25 MB), not for last.safetensors (weights + SGD momentum, 2.5 MB).
        with tmpfs(tmp_path / "disk", "2m") as disk_dir:
            result = cli("train", "pgd_at", "--out", str(disk_dir / "run"), *TRAIN_FLAGS)
            run_dir = disk_dir / "run"
            line = one_line_error(result, "No space left on device", "free some space")
            assert not (run_dir / LAST).exists() and not (run_dir / DEFENSE_JSON).exists()
            assert not leftovers(disk_dir), leftovers(disk_dir)
            if (run_dir / BEST).exists():  # whatever was written before the disk filled is whole
                load_tensors(run_dir / BEST)
    else:
        import training.checkpoint

        monkeypatch.setattr(training.checkpoint, "_save_file", lambda tensors, path, meta: partial_then_full(path))
        run_dir = tmp_path / "run"
        line = one_line_error(run_in_process(capsys, "train", "pgd_at", "--out", str(run_dir), *TRAIN_FLAGS),
                              "No space left on device", "free some space")
        assert not list(run_dir.iterdir()), list(run_dir.iterdir())  # the first checkpoint failed: nothing
    assert str(run_dir) in line


@pytest.mark.slow
def test_training_into_a_read_only_folder_fails_cleanly(learnable_fashion_mnist, tmp_path):
    needs_mount()
    with tmpfs(tmp_path / "ro", "1m", read_only=True, subfolders=("existing",)) as folder:
        one_line_error(cli("train", "pgd_at", "--out", str(folder / "new"), *TRAIN_FLAGS),
                       "Read-only file system", "choose another --out")
        one_line_error(cli("train", "pgd_at", "--out", str(folder / "existing"), *TRAIN_FLAGS),
                       "Read-only file system", "choose another --out")
        assert [p.name for p in folder.rglob("*")] == ["existing"]


@pytest.mark.slow
@pytest.mark.parametrize("disk", ["tmpfs", "injected"])
def test_packaging_onto_a_full_disk_fails_cleanly(disk, served_runs, tmp_path, monkeypatch, capsys):
    run = str(served_runs["pgd_at"])
    before = digests(served_runs["pgd_at"])
    if disk == "tmpfs":
        needs_mount()
        # 3 MiB: the staged files (weights and ONNX graph, 2.5 MB) fit; torch-model-archiver's archive does not.
        with tmpfs(tmp_path / "store", "3m") as store:
            one_line_error(cli("package", run, "--model-store", str(store)), "pgd_at.mar: No space left on device",
                           "free some space", "choose another --model-store")
            assert not list(store.iterdir()), list(store.iterdir())  # no .mar, no staging or temporary folder
    else:
        # Staging the run's files into the store: the copy (dst, never the run's own src) fills the disk.
        monkeypatch.setattr(shutil, "copy2", lambda src, dst, **_: partial_then_full(Path(dst)))
        store = tmp_path / "store"
        one_line_error(run_in_process(capsys, "package", run, "--model-store", str(store)),
                       "pgd_at.mar: No space left on device", "choose another --model-store")
        assert not list(store.iterdir()), list(store.iterdir())
    assert digests(served_runs["pgd_at"]) == before, "packaging changed the run"


@pytest.mark.slow
def test_packaging_into_a_read_only_model_store_fails_cleanly(served_runs, tmp_path):
    needs_mount()
    run = str(served_runs["pgd_at"])
    with tmpfs(tmp_path / "ro", "1m", read_only=True, subfolders=("store",)) as folder:
        for store in (folder / "store", folder / "new-store"):
            one_line_error(cli("package", run, "--model-store", str(store)), "Read-only file system",
                           "choose another --model-store")
        assert [p.name for p in folder.rglob("*")] == ["store"]


# ---------------------------------------------------------------------------------------------- data and settings


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_missing_or_corrupt_data_is_one_line_naming_the_fix(learnable_fashion_mnist, tmp_path, monkeypatch):
    raw = tmp_path / "data" / "FashionMNIST" / "raw"  # learnable_fashion_mnist's data root
    out = tmp_path / "run"

    monkeypatch.setenv("ROBUSTSERVE_FASHION_MNIST_SOURCE", str(tmp_path / "nowhere"))
    one_line_error(cli("train", "pgd_at", "--out", str(out), *TRAIN_FLAGS),
                   "Fashion-MNIST not found", "Fix: sudo apt-get install dataset-fashion-mnist")
    assert not out.exists() and not (raw.exists() and list(raw.iterdir()))

    corrupt = tmp_path / "corrupt-source"
    shutil.copytree(learnable_fashion_mnist, corrupt)
    images = corrupt / "train-images-idx3-ubyte.gz"
    images.write_bytes(gzip.compress(gzip.decompress(images.read_bytes())[:-100]))  # a truncated IDX file
    monkeypatch.setenv("ROBUSTSERVE_FASHION_MNIST_SOURCE", str(corrupt))
    one_line_error(cli("train", "pgd_at", "--out", str(out), *TRAIN_FLAGS),
                   f"corrupt IDX file {images}", "Fix: sudo apt-get install --reinstall dataset-fashion-mnist")
    assert not out.exists() and not (raw / "train-images-idx3-ubyte").exists() and not leftovers(raw)

    # A decompressed copy that went bad: deleting it is the fix (it is decompressed again from the source).
    monkeypatch.setenv("ROBUSTSERVE_FASHION_MNIST_SOURCE", str(learnable_fashion_mnist))
    labels = raw / "train-labels-idx1-ubyte"
    labels.write_bytes(gzip.decompress((learnable_fashion_mnist / "train-labels-idx1-ubyte.gz").read_bytes())[:-5])
    one_line_error(cli("train", "pgd_at", "--out", str(out), *TRAIN_FLAGS), f"corrupt IDX file {labels}",
                   "Fix: delete it")
    assert not out.exists()


@pytest.mark.slow
def test_resuming_a_folder_without_a_checkpoint_says_it_trains_from_the_first_epoch(learnable_fashion_mnist, tmp_path):
    """`--resume` into a mistyped --out once started hours of training from nothing without a word."""
    out = tmp_path / "no-such-run"
    result = cli("train", "pgd_at", "--out", str(out), "--resume", *TRAIN_FLAGS)
    assert result.returncode == 0, result.stderr
    assert f"nothing to resume in {out}" in result.stderr and (out / LAST).exists()


@pytest.mark.slow
def test_a_checkpoint_that_cannot_be_resumed_is_one_line_and_left_alone(learnable_fashion_mnist, tmp_path):
    run_dir = train(tiny_config("pgd_at"), tmp_path / "run", progress=False)
    before = {name: sha256(run_dir / name) for name in (LAST, BEST, DEFENSE_JSON)}
    for args, fragments in [
        (["pgd_at", "--lr", "0.2"], ["cannot resume", "different", "lr", "--force"]),
        (["trades"], ["cannot resume", "different", "recipe", "--force"]),
        (["pgd_at", "--arch", "preactresnet18"], ["cannot resume", "arch", "--force"]),
    ]:
        one_line_error(cli("train", *args, "--out", str(run_dir), "--resume", *TRAIN_FLAGS), *fragments)
        assert {name: sha256(run_dir / name) for name in before} == before, args
    # A last.safetensors that is not one (a truncated copy): say so, and that --force starts over.
    (run_dir / LAST).write_bytes((run_dir / LAST).read_bytes()[:100])
    truncated = sha256(run_dir / LAST)
    one_line_error(cli("train", "pgd_at", "--out", str(run_dir), "--resume", *TRAIN_FLAGS),
                   "cannot resume", "not a readable safetensors checkpoint", "start over with --force")
    assert sha256(run_dir / LAST) == truncated and not leftovers(run_dir)

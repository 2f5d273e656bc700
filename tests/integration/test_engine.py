"""The training engine: exact resume after SIGKILL, DDP under torchrun, checkpoints, CLI errors. Schedules and
autocast: tests/unit/test_engine_settings.py."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import constant_logits_model
from torch import nn

from training.checkpoint import CheckpointError, load_tensors
from training.config import TrainConfig
from training.devices import default_device
from training.engine import Trainer, train
from training.environment import device_name
from training.errors import TrainingDivergedError
from training.recipes import get_recipe
from training.runs import BEST, DEFENSE_JSON, LAST, load_run

ROBUSTSERVE = str(Path(sys.executable).parent / "robustserve")
# Small and fast, but several batches per epoch so a kill can land mid-epoch.
TINY = {"epochs": 3, "batch_size": 25, "train_subset": None, "val_size": 100, "attack_steps": 2,
        "val_attack_steps": 2, "lr": 0.05}
TINY_FLAGS = ["--epochs", "3", "--batch-size", "25", "--attack-steps", "2", "--lr", "0.05",
              "--set", "train_subset=null", "--set", "val_size=100", "--set", "val_attack_steps=2", "--no-progress"]


def tiny_config(recipe: str = "pgd_at", **overrides) -> TrainConfig:
    return get_recipe(recipe).config("quick", **{**TINY, **overrides})


def weights(run_dir: Path, name: str = LAST) -> dict[str, torch.Tensor]:
    tensors, _ = load_tensors(run_dir / name)
    return {k: v for k, v in tensors.items() if k.startswith("model/")}


def epochs_done(run_dir: Path) -> int:
    path = run_dir / DEFENSE_JSON
    return json.loads(path.read_text())["stages"][0]["epochs_done"] if path.exists() else 0


BASELINES = ("natural", "pgd_at", "trades", "mart", "consistency_at")


@pytest.mark.parametrize("recipe", BASELINES)
def test_every_baseline_trains_and_learns(recipe, learnable_fashion_mnist, tmp_path) -> None:
    run_dir = train(tiny_config(recipe, epochs=2), tmp_path / recipe, progress=False)
    info = json.loads((run_dir / DEFENSE_JSON).read_text())
    assert info["defense"] == recipe and info["serving_modes"] == ["default"]
    assert info["classes"][0] == "T-shirt/top" and info["input_shape"] == [1, 28, 28]
    history = info["stages"][0]["history"]
    assert len(history) == 2 and history[-1]["val_clean_acc"] > 0.5, history
    # Each epoch names where it ran (a run may be resumed or continued on another machine).
    assert {epoch["trained_on"] for epoch in history} == {device_name(default_device(None))}
    loaded = load_run(run_dir)
    assert loaded.model.num_outputs == 10 and not loaded.model.training
    assert not list(run_dir.glob(".*.tmp")), "no temporary files may be left behind"


def test_training_runs_channels_last_on_the_cpu_and_saves_the_usual_layout(learnable_fashion_mnist, tmp_path) -> None:
    trainer = Trainer(tiny_config(epochs=1, select_by="last", device="cpu"), tmp_path / "run", progress=False)
    # The first convolution has one input channel, where both layouts have the same strides.
    convs = [m for m in trainer.module.modules() if isinstance(m, nn.Conv2d) and m.in_channels > 1]
    assert convs and all(conv.weight.is_contiguous(memory_format=torch.channels_last)
                         and not conv.weight.is_contiguous() for conv in convs)
    run_dir = trainer.fit()
    loaded = load_run(run_dir).model  # built in the usual layout
    trainer.module.eval()
    with torch.no_grad():
        assert torch.allclose(loaded(trainer.val_x), trainer.module(trainer.val_x), atol=1e-5)
    plain = Trainer(tiny_config(channels_last=False, device="cpu"), tmp_path / "plain", progress=False)
    assert all(m.weight.is_contiguous() for m in plain.module.modules() if isinstance(m, nn.Conv2d))


def test_killed_run_resumes_to_identical_weights(learnable_fashion_mnist, tmp_path) -> None:
    reference = train(tiny_config(), tmp_path / "reference", progress=False)

    killed = tmp_path / "killed"
    cmd = [ROBUSTSERVE, "train", "pgd_at", "--out", str(killed), *TINY_FLAGS]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=os.environ.copy())
    deadline = time.monotonic() + 300
    while epochs_done(killed) < 1 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # into the second epoch
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()
    assert 1 <= epochs_done(killed) < 3, "the kill must land before training finished"

    train(tiny_config(), killed, resume=True, progress=False)
    assert epochs_done(killed) == 3
    expected, got = weights(reference), weights(killed)
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), f"{key} differs after resume"
    best_expected, best_got = load_tensors(reference / BEST)[0], load_tensors(killed / BEST)[0]
    assert all(torch.equal(best_expected[k], best_got[k]) for k in best_expected)


def test_a_nan_loss_stops_training_and_keeps_the_last_finished_epoch(learnable_fashion_mnist, tmp_path) -> None:
    """A TRADES run on the H200 (bf16 autocast) went NaN at epoch 13 of 30 and trained 17 more epochs of a dead
    network with exit status 0; the engine now stops at the first non-finite loss, before the update."""
    run_dir = train(tiny_config(epochs=1), tmp_path / "run", progress=False)
    finished_epoch = weights(run_dir)
    trainer = Trainer(tiny_config(epochs=2, tail_epochs=1), run_dir, resume=True, progress=False)
    stage = trainer.stages[0]
    steps = []

    def nan_on_the_third_step(ctx, x, y):
        loss, logits = stage.loss(ctx, x, y)
        steps.append(len(steps))
        return (loss * float("nan") if len(steps) == 3 else loss), logits

    trainer.stages[0] = dataclasses.replace(stage, loss=nan_on_the_third_step)
    with pytest.raises(TrainingDivergedError, match=r"pgd_at: the training loss became nan at epoch 2, step 3 of \d+;"):
        trainer.fit()
    assert epochs_done(run_dir) == 1 and len(steps) == 3
    after = weights(run_dir)
    assert all(torch.equal(finished_epoch[k], after[k]) for k in finished_epoch), "the finished epoch is kept"
    assert all(torch.isfinite(p).all() for p in trainer.module.parameters()), "no update was taken from the NaN"


def test_a_collapse_to_chance_stops_training_and_keeps_the_epoch_before(learnable_fashion_mnist, tmp_path) -> None:
    """TRADES at lr 0.05 collapsed to one output at epoch 8 on the CPU (loss ln 10, validation at chance) and trained
    22 more dead epochs; a stage that comes to predict one class for every image after it had learnt now stops."""
    run_dir = train(tiny_config(epochs=2), tmp_path / "run", progress=False)
    history = json.loads((run_dir / DEFENSE_JSON).read_text())["stages"][0]["history"]
    assert max(epoch["val_clean_acc"] for epoch in history) >= 0.3, "the run must have learnt for the check to apply"
    finished_epoch = weights(run_dir)
    trainer = Trainer(tiny_config(epochs=3, tail_epochs=1), run_dir, resume=True, progress=False)
    trainer.validation_mode = lambda index: constant_logits_model()  # what a collapsed network predicts: one class
    with pytest.raises(TrainingDivergedError, match="at epoch 3 every validation image got class 0, .*collapsed"):
        trainer.fit()
    assert epochs_done(run_dir) == 2
    assert all(torch.equal(finished_epoch[k], v) for k, v in weights(run_dir).items()), "the collapsed epoch is not saved"


def test_ddp_gloo_two_ranks_end_with_identical_weights(learnable_fashion_mnist, tmp_path) -> None:
    run_dir = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           ROBUSTSERVE, "train", "pgd_at", "--out", str(run_dir), *TINY_FLAGS, "--epochs", "1", "--batch-size", "26",
           "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    digests = {line.split()[1]: line.split()[-1] for line in result.stdout.splitlines()
               if line.startswith("rank ") and "final weights sha256" in line}
    assert set(digests) == {"0", "1"}, result.stdout
    assert digests["0"] == digests["1"]
    assert epochs_done(run_dir) == 1


def test_ddp_ranks_train_one_secret_pairing(learnable_fashion_mnist, tmp_path) -> None:
    """Each rank runs the command on its own; rank 0 draws the run's secret pairing and the others take it (the
    engine's settings check fails the run otherwise)."""
    base = train(tiny_config(epochs=1, train_subset=100), tmp_path / "base", progress=False)
    run_dir = tmp_path / "ducat"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           ROBUSTSERVE, "train", "ducat", "--out", str(run_dir), *TINY_FLAGS, "--epochs", "1", "--batch-size", "26",
           "--set", "train_subset=104", "--set", f"base_run={base}", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    seed = json.loads((run_dir / DEFENSE_JSON).read_text())["config"]["params"]["pairing_seed"]
    assert str(seed) not in result.stdout + result.stderr, "the secret is not logged"
    assert epochs_done(run_dir) == 1


def test_existing_run_needs_resume_or_force(learnable_fashion_mnist, tmp_path) -> None:
    run_dir = train(tiny_config(epochs=1), tmp_path / "run", progress=False)
    with pytest.raises(CheckpointError, match="--resume"):
        Trainer(tiny_config(epochs=1), run_dir)
    with pytest.raises(CheckpointError, match="different lr"):
        Trainer(tiny_config(epochs=2, lr=0.2), run_dir, resume=True)


def test_cli_errors_are_one_line(learnable_fashion_mnist, tmp_path) -> None:
    for args, fragment in [
        (["train", "nope"], "unknown recipe 'nope'"),
        (["train", "pgd_at", "--preset", "huge"], "has no preset 'huge'"),
        (["train", "pgd_at", "--arch", "vgg"], "unknown architecture 'vgg'"),
        (["train", "pgd_at", "--set", "colour=red"], "unknown training setting(s): colour"),
        (["eval", str(tmp_path / "missing")], "is not a training run"),
    ]:
        result = subprocess.run([ROBUSTSERVE, *args, "--out", str(tmp_path / "x")] if args[0] == "train"
                                else [ROBUSTSERVE, *args], capture_output=True, text=True, timeout=120)
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and fragment in lines[0], result.stderr
    assert not (tmp_path / "x" / LAST).exists()

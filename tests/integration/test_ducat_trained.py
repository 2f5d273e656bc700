"""DUCAT on a trained model: widening keeps every prediction, at any dummy bias offset, initialisation from a base
run, and the recipe end to end through the engine. Layout, losses and recovery by hand: tests/unit/test_ducat.py."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from training.checkpoint import CheckpointError
from training.data import DatasetSpec
from training.dummy_classes import PAIRING_FILE, ClassPairing, read_pairing, recover_dummy_classes
from training.engine import train
from training.recipes import get_recipe
from training.recipes.ducat import trained_pairing, widen_with_pairing
from training.runs import LoadedRun, load_run

# Matches the conftest's trained_smallcnn (10 classes, 1x28x28, mean 0.5, std 0.5).
SPEC = DatasetSpec(name="fashion_mnist", class_names=tuple(f"c{k}" for k in range(10)), input_shape=(1, 28, 28),
                   mean=(0.5,), std=(0.5,), default_architecture="smallcnn")
DUCAT = get_recipe("ducat")
# One epoch of 100 images on a one-step adversary: seconds per run.
TINY = {"epochs": 1, "batch_size": 50, "train_subset": 100, "val_size": 50, "attack_steps": 1,
        "val_attack_steps": 1, "lr": 0.05}


# ----------------------------------------------------------------------------------------------
# Widening and starting from a base run


@pytest.mark.parametrize("pairing", [ClassPairing.identity(10), ClassPairing.random(10, seed=3)])
def test_widening_keeps_every_prediction_of_a_trained_model(trained_smallcnn, synthetic_batch, pairing) -> None:
    x, _ = synthetic_batch
    model = copy.deepcopy(trained_smallcnn)
    before = model(x)
    widen_with_pairing(model, pairing)
    after = model(x)
    assert after.shape == (len(x), 20) and trained_pairing(model) == pairing
    assert torch.allclose(after[:, :10], before, atol=1e-5)
    assert torch.equal(after.argmax(1), before.argmax(1))
    weight, bias = model.classifier.weight, model.classifier.bias
    for k, dummy in enumerate(pairing.dummy_of):
        assert torch.equal(weight[dummy], weight[k]) and bias[dummy].item() == pytest.approx(bias[k].item() - 20)


@pytest.mark.parametrize("offset", [0.0, -5.0])
def test_any_dummy_bias_offset_keeps_every_recovered_prediction(trained_smallcnn, synthetic_batch, offset) -> None:
    """At offset 0 each dummy ties with its real class, and a tie recovers to the real class."""
    x, _ = synthetic_batch
    model = copy.deepcopy(trained_smallcnn)
    before = model(x).argmax(1)
    pairing = ClassPairing.random(10, seed=3)
    widen_with_pairing(model, pairing, offset)
    assert torch.equal(recover_dummy_classes(model(x), pairing)[0], before)
    bias = model.classifier.bias
    assert all(bias[d].item() == pytest.approx(bias[k].item() + offset) for k, d in enumerate(pairing.dummy_of))


@pytest.mark.parametrize("secret", [False, True])
def test_initialize_from_a_base_run_keeps_its_predictions(trained_smallcnn, synthetic_batch, tmp_path, secret) -> None:
    x, _ = synthetic_batch
    base = LoadedRun(run_dir=tmp_path, info={"defense": "pgd_at"}, model=copy.deepcopy(trained_smallcnn))
    config = DUCAT.config("quick", params={"secret_pairing": secret, "pairing_seed": 5})
    model = DUCAT.build_model(SPEC, config)
    DUCAT.initialize(model, base, config)
    model.eval()
    with torch.no_grad():
        expected = trained_smallcnn(x)
        assert torch.allclose(model(x)[:, :10], expected, atol=1e-5)
        recovered = DUCAT.modes(model)["recovered"].module(x)
    assert torch.equal(recovered.argmax(1), expected.argmax(1))
    assert trained_pairing(model).is_identity != secret
    wrong = LoadedRun(run_dir=tmp_path, info={}, model=DUCAT.build_model(SPEC, config))  # a 20-class "base"
    with pytest.raises(CheckpointError):
        DUCAT.initialize(DUCAT.build_model(SPEC, config), wrong, config)


def test_ducat_trains_end_to_end_from_a_base_run(learnable_fashion_mnist, tmp_path) -> None:
    config = DUCAT.config("quick", **TINY)
    run_dir = train(config, tmp_path / "ducat", progress=False, runs_root=tmp_path / "runs")
    assert (tmp_path / "runs" / "pgd_at-quick-fashion_mnist-smallcnn" / "best.safetensors").is_file()
    info = json.loads((run_dir / "defense.json").read_text())
    assert info["finished"] and info["serving_modes"] == ["recovered", "raw"] and info["base"]["recipe"] == "pgd_at"
    loaded = load_run(run_dir)
    stored = read_pairing(run_dir / PAIRING_FILE)
    assert loaded.model.num_outputs == 20 and stored == trained_pairing(loaded.model) and not stored.is_identity
    assert not list(Path(run_dir).glob(".*.tmp"))


def test_each_run_draws_its_own_secret_pairing_and_a_resumed_run_keeps_it(learnable_fashion_mnist, tmp_path) -> None:
    runs = tmp_path / "runs"

    def pairing_seed(run_dir: Path) -> int:
        return json.loads((run_dir / "defense.json").read_text())["config"]["params"]["pairing_seed"]

    first = train(DUCAT.config("quick", **TINY), tmp_path / "first", progress=False, runs_root=runs)
    second = train(DUCAT.config("quick", **TINY), tmp_path / "second", progress=False, runs_root=runs)
    assert pairing_seed(first) != pairing_seed(second), "the same command and --seed must not give the same secret"
    assert read_pairing(first / PAIRING_FILE) == ClassPairing.random(10, pairing_seed(first))
    pairing = read_pairing(first / PAIRING_FILE)
    # Continued for a second epoch, the run keeps the pairing it trained with.
    train(DUCAT.config("quick", **{**TINY, "epochs": 2}), first, resume=True, progress=False, runs_root=runs)
    info = json.loads((first / "defense.json").read_text())
    assert info["stages"][0]["epochs_done"] == 2
    assert read_pairing(first / PAIRING_FILE) == pairing == trained_pairing(load_run(first).model)

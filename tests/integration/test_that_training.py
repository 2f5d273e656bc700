"""THAT trained by the engine: the quick pipeline trains both stages and writes the memory bank, and the
instance objective trains the clean encoder without labels. Losses, the vote, the queue and the modes:
tests/unit/test_that.py."""

from __future__ import annotations

import torch

from training.engine import train
from training.knn import MEMORY_BANK, MemoryBank
from training.recipes import get_recipe
from training.runs import load_run

RECIPE = get_recipe("that")


def test_quick_pipeline_trains_both_stages_and_writes_the_bank(learnable_fashion_mnist, tmp_path) -> None:
    config = RECIPE.config("quick", epochs=1, batch_size=25, train_subset=100, val_size=50, attack_steps=1,
                           val_attack_steps=2, params={"queue_size": 64})
    run_dir = train(config, tmp_path / "that", progress=False)
    bank = MemoryBank.load(run_dir / MEMORY_BANK)
    assert bank.features.shape == (600, 128) and bank.ids.tolist() == list(range(600))  # every training image
    run = load_run(run_dir)
    modes = RECIPE.modes(run.model, run_dir)
    assert list(modes) == ["classifier", "knn"]
    assert modes["knn"].module(torch.rand(3, 1, 28, 28)).shape == (3, 10)


def test_instance_objective_trains_the_clean_encoder_without_labels(learnable_fashion_mnist, tmp_path) -> None:
    config = RECIPE.config("quick", epochs=1, batch_size=25, train_subset=100, val_size=50, attack_steps=1,
                           val_attack_steps=2, params={"queue_size": 64, "clean_objective": "instance"},
                           stages={"clean_encoder": {"batch_size": 25}})
    run_dir = train(config, tmp_path / "that", progress=False)
    run = load_run(run_dir)
    assert run.model.clean_encoder.prototypes is None  # no class weights: g never sees a label
    clean_stage = run.info["stages"][0]
    assert clean_stage["name"] == "clean_encoder" and clean_stage["history"][0]["train_acc"] is None
    assert MemoryBank.load(run_dir / MEMORY_BANK).features.shape == (600, 128)

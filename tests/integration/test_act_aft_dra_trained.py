"""ACT and AFT-DRA with trained models: AFT-DRA's half clean, half DRA batch on the trained SmallCNN, and an
AFT-DRA run fine-tuned from a natural run by the engine. The losses by hand: tests/unit/test_act_aft_dra.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from training.checkpoint import load_tensors, model_tensors
from training.config import TrainConfig
from training.engine import train
from training.recipes import StepContext, get_recipe
from training.runs import LAST, load_run

TINY = {"batch_size": 25, "train_subset": None, "val_size": 100, "attack_steps": 2, "val_attack_steps": 2}


pytestmark = pytest.mark.usefixtures("one_thread")


def _context(model, config: TrainConfig) -> StepContext:
    return StepContext(model=model, module=model, config=config, augment=lambda x: x, epoch=0)


def test_aft_dra_batch_is_half_clean_half_dra(trained_smallcnn, synthetic_batch):
    recipe = get_recipe("aft_dra")
    config = recipe.config("quick")
    x, y = synthetic_batch[0][:8], synthetic_batch[1][:8]
    batches: list[torch.Tensor] = []
    hook = trained_smallcnn.register_forward_pre_hook(lambda m, args: batches.append(args[0].detach().clone()))
    try:
        loss, logits = recipe.loss(_context(trained_smallcnn, config), x, y)
    finally:
        hook.remove()
    trained = batches[-1]  # the training forward (the DRA attack's forwards come before it)
    assert trained.shape[0] == 16 and torch.equal(trained[:8], x)
    changed = (trained[8:] != x).flatten(1).float().mean(1)
    assert (changed > 0).all() and (changed <= round(config.params["p"] * 784) / 784).all()  # only the top-p move
    expected = 0.5 * (F.cross_entropy(trained_smallcnn(x), y) + F.cross_entropy(trained_smallcnn(trained[8:]), y))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4) and logits.shape == (8, 10)
    clean_epoch = recipe.loss(StepContext(trained_smallcnn, trained_smallcnn, config, lambda t: t, epoch=2), x, y)
    assert clean_epoch[0].item() == pytest.approx(F.cross_entropy(trained_smallcnn(x), y).item(), rel=1e-5)


def test_aft_dra_starts_from_the_natural_run_and_serves_its_last_epoch(learnable_fashion_mnist, tmp_path):
    base = train(get_recipe("natural").config("quick", epochs=1, **TINY), tmp_path / "natural", progress=False)
    config = get_recipe("aft_dra").config("quick", epochs=2, base_run=str(base), **TINY,
                                          params={"decay_epochs": 1, "clean_from": 1})
    run_dir = train(config, tmp_path / "aft", progress=False)
    run = load_run(run_dir)
    assert run.info["base"]["recipe"] == "natural" and run.info["finished"]
    assert [stage.get("run") for stage in run.info["stages"]] == [str(base), None]
    last, _ = load_tensors(run_dir / LAST)
    served = run.model.state_dict()
    assert all(torch.equal(v, served[k]) for k, v in model_tensors(last, "model/").items())  # select_by last

"""Every defense end to end through the real engine and evaluation: base run, stages, artifacts,
serving modes and the adaptive attacks on each mode's attack surfaces."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from helpers import train_tiny

from training.config import TrainConfig
from training.evaluate import evaluate_run
from training.recipes import RECIPES, StepContext, get_recipe
from training.runs import DEFENSE_JSON, load_run

DEFENSES = ("dhat", "that", "aft_dra", "ducat", "act")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("defense", DEFENSES)
def test_defense_trains_evaluates_every_mode(defense, learnable_fashion_mnist, tmp_path):
    recipe = get_recipe(defense)
    base = recipe.config("quick").base
    run_dir = train_tiny(defense, tmp_path)

    info = json.loads((run_dir / DEFENSE_JSON).read_text())
    assert info["finished"] and info["serving_modes"] == list(recipe.serving_modes)
    own = [stage for stage in info["stages"] if "run" not in stage]
    assert [stage["name"] for stage in own] == [stage.name for stage in recipe.stages(recipe.config("quick"))]
    assert all(stage["epochs_done"] == 1 for stage in own)
    assert (info["base"] is None) == (base is None)

    run = load_run(run_dir)
    modes = run.modes()
    assert list(modes) == list(recipe.serving_modes)
    report = evaluate_run(run_dir, n=20, autoattack_n=4, pgd_steps=2, pgd_restarts=1, sweep_steps=1, sweep=[0.1],
                          autoattack_version="fast", device="cpu")
    assert list(report["modes"]) == list(recipe.serving_modes)
    for mode, serving_mode in modes.items():
        rows = {row["attack"]: row for row in report["results"] if row["mode"] == mode}
        # Every objective on the mode and on each attack surface, APGD-CE + APGD-T on each surface, a
        # transfer attack from each source, and Square where the served output has no useful gradient.
        surfaces = ["", *(f"@{surface}" for surface in serving_mode.attack_surfaces)]
        expected = {"clean", "autoattack"} | {f"pgd-{o}{s}" for o in ("ce", "margin", "dlr") for s in surfaces}
        expected |= {f"apgd-ce+apgd-t{s}" for s in surfaces[1:]}
        expected |= {f"transfer-pgd-ce@{source}" for source in serving_mode.transfer_sources}
        if base is not None and serving_mode.transfer_from_base:
            expected.add(f"transfer-pgd-ce@{base}_base_run")
        if not serving_mode.differentiable or report["checks"][mode]["zero_gradient_images"] or any(
                row["settings"].get("check_warnings") for row in rows.values()):
            expected.add("square")
        assert set(rows) == expected, mode
        assert ("square" in rows) >= (not serving_mode.differentiable)
        worst = report["worst_case"][mode]
        assert worst["lowest"]["accuracy"] == min(row["accuracy"] for row in rows.values() if row["kind"] != "clean")
        assert 0.0 <= worst["accuracy"] <= worst["lowest"]["accuracy"] and worst["n"] == 4
    # Each defense is compared with the run it starts from, or the baseline its paper measures against.
    assert report["run"]["compared_with"] == (base or recipe.compared_with)


def test_every_recipe_has_a_standard_preset_on_the_zoo_setting():
    for recipe in RECIPES.values():
        config = recipe.config("standard")
        assert (config.dataset, config.arch, config.eps) == ("fashion_mnist", "smallcnn", 0.1), recipe.id
        assert config.train_subset is None and config.val_size == 1000, recipe.id


def _pair_context(model: nn.Module) -> StepContext:
    return StepContext(model=model, module=model, config=TrainConfig(recipe="trades"), augment=lambda x: x, epoch=0)


def test_clean_and_adversarial_logits_keep_batchnorm_statistics_apart():
    """TRADES, MART and AFT-DRA pass clean and adversarial images separately through a BatchNorm network
    (as their reference code does): each half is normalised by its own batch statistics."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.BatchNorm1d(3)).train()
    x, x_adv = torch.randn(8, 4), torch.randn(8, 4) + 3.0
    clean, adversarial = _pair_context(net).clean_and_adversarial_logits(x, x_adv)
    reference = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.BatchNorm1d(3)).train()
    reference.load_state_dict(net.state_dict())
    assert torch.allclose(clean, reference(x)) and torch.allclose(adversarial, reference(x_adv))
    mixed = reference(torch.cat([x, x_adv]))[:8]
    assert not torch.allclose(clean, mixed, atol=1e-3)  # one mixed pass would have given these


def test_clean_and_adversarial_logits_without_batchnorm_are_one_pass():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 3)).train()
    calls = []
    net.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    x, x_adv = torch.randn(8, 4), torch.randn(8, 4)
    clean, adversarial = _pair_context(net).clean_and_adversarial_logits(x, x_adv)
    assert calls == [16]
    assert torch.allclose(clean, net(x)) and torch.allclose(adversarial, net(x_adv))

"""What every defense shares: a standard preset on the zoo setting, and clean and adversarial logits with and
without BatchNorm. Each defense trained and evaluated end to end: tests/integration/test_defenses_train.py."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from training.config import TrainConfig
from training.recipes import RECIPES, StepContext

pytestmark = pytest.mark.usefixtures("one_thread")


def test_every_recipe_has_a_standard_preset_on_the_zoo_setting():
    for recipe in RECIPES.values():
        config = recipe.config("standard")
        assert (config.dataset, config.arch, config.eps) == ("fashion_mnist", "smallcnn", 0.1), recipe.id
        assert config.train_subset is None and config.val_size == 1000, recipe.id


def test_the_standard_adversarial_networks_train_the_same_epochs_and_end_in_the_tail_the_rule_reads():
    """Matched budgets and a readable convergence rule: every network trained adversarially from nothing (the
    baselines, ACT) and DH-AT's second head get the same 90 epochs, THAT's robust stage 120 (at 90 it still
    rose), each ending in a constant-lr tail at least as long as the last third that runs.validation_rise reads."""
    budgets = {}
    for recipe in RECIPES.values():
        config = recipe.config("standard")
        if recipe.id == "natural" or (config.base is not None and recipe.id != "dhat"):
            continue  # fine-tunes (DUCAT, pgd_at_ft, trades_ft, AFT-DRA) and the clean model
        # the adversarial stage: THAT's beside its 5-epoch clean encoder, DH-AT's second head beside its aggregator
        robust = max((config.for_stage(stage.name) for stage in recipe.stages(config)), key=lambda c: c.epochs)
        budgets[recipe.id] = robust.epochs
        assert robust.schedule == "cosine" and 3 * robust.tail_epochs >= robust.epochs, recipe.id
    assert {recipe: epochs for recipe, epochs in budgets.items() if epochs != 90} == {"that": 120}


def test_every_recipe_with_a_paper_preset_cites_the_papers_figures():
    """RESULTS.md's last column: each published method's own numbers, with the table they come from."""
    for recipe in RECIPES.values():
        if "paper" in recipe.presets:
            assert "clean" in recipe.reference and "Table" in recipe.reference, recipe.id


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

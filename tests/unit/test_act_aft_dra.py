"""ACT (concurrent robust + natural models) and AFT-DRA (clean model fine-tuned on clean + DRA samples)."""

from __future__ import annotations

import math

import pytest
import torch

from training.config import TrainConfig
from training.data import DatasetSpec
from training.recipes import StepContext, get_recipe
from training.recipes.act import act_losses
from training.recipes.aft_dra import dra_budget

SPEC = DatasetSpec(name="fashion_mnist", class_names=tuple(f"class {i}" for i in range(10)), input_shape=(1, 28, 28),
                   mean=(0.5,), std=(0.5,), default_architecture="smallcnn")


pytestmark = pytest.mark.usefixtures("one_thread")


def _context(model, config: TrainConfig) -> StepContext:
    return StepContext(model=model, module=model, config=config, augment=lambda x: x, epoch=0)


def test_act_losses_match_eq_1_and_2_by_hand():
    g = torch.tensor([[2.0, 0.0]])
    f = torch.tensor([[0.0, 1.0]])
    y = torch.tensor([0])
    alpha = 0.9

    def softmax(z):
        e = [math.exp(v) for v in z]
        return [v / sum(e) for v in e]

    pg, pf = softmax([2.0, 0.0]), softmax([0.0, 1.0])
    kl = lambda p, q: sum(a * math.log(a / b) for a, b in zip(p, q))  # noqa: E731
    l_g, l_f = act_losses(g, f, y, alpha)
    assert l_g.item() == pytest.approx((1 - alpha) * -math.log(pg[0]) + alpha * kl(pf, pg), rel=1e-5)
    assert l_f.item() == pytest.approx((1 - alpha) * -math.log(pf[0]) + alpha * kl(pg, pf), rel=1e-5)


def test_act_updates_both_models_and_f_sees_only_clean_inputs(synthetic_batch):
    recipe = get_recipe("act")
    config = recipe.config("quick", attack_steps=3)
    pair = recipe.build_model(SPEC, config)
    torch.nn.init.normal_(pair.robust.classifier.weight, std=0.01)  # TRADES' zero init has no input gradient
    x, y = synthetic_batch[0][:16], synthetic_batch[1][:16]
    seen_by_natural: list[torch.Tensor] = []
    seen_by_robust: list[torch.Tensor] = []
    pair.natural.register_forward_pre_hook(lambda m, args: seen_by_natural.append(args[0].detach().clone()))
    pair.robust.register_forward_pre_hook(lambda m, args: seen_by_robust.append(args[0].detach().clone()))
    before = {k: v.clone() for k, v in pair.state_dict().items()}
    optimizer = torch.optim.SGD(pair.parameters(), lr=0.1)
    pair.train()
    loss, logits = recipe.loss(_context(pair, config), x, y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    assert logits.shape == (16, 10) and torch.isfinite(loss)
    assert seen_by_natural and all(torch.equal(seen, x) for seen in seen_by_natural)
    assert any(not torch.equal(seen, x) for seen in seen_by_robust)  # G trains on adversarial inputs
    after = pair.state_dict()
    for prefix in ("robust.", "natural."):
        assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith(prefix)), prefix
    assert recipe.modes(pair)["default"].module is pair.robust  # G is served, F is not


def test_act_paper_preset_is_the_papers():
    config = get_recipe("act").config("paper")
    assert (config.arch, config.dataset, config.epochs, config.batch_size, config.lr) == ("resnet18", "cifar10", 200, 128, 0.1)
    assert (config.milestones, config.gamma, config.momentum) == ([60, 120, 150], 0.2, 0.9)
    assert (config.eps, config.step_size, config.attack_steps, config.params["alpha"]) == (0.031, 0.007, 10, 0.9)


def test_dra_budget_decays_linearly_then_goes_clean():
    config = get_recipe("aft_dra").config("paper")
    budgets = [dra_budget(config, epoch) for epoch in range(config.epochs)]
    assert budgets[0] == pytest.approx(2 / 255) and budgets[49] == pytest.approx(0.5 / 255)
    assert all(a > b for a, b in zip(budgets[:49], budgets[1:50]))  # strictly decreasing
    assert budgets[50:] == [0.0] * 10  # the last 10 of 60 epochs are clean-only
    assert (config.batch_size, config.weight_decay, config.momentum, config.params["steps"]) == (128, 2e-4, 0.9, 5)
    assert config.base == "natural" and config.select_by == "last"

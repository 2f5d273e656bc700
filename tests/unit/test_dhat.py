"""DH-AT (training/models/dual_head.py, training/recipes/dhat.py): the aggregator's shapes and
arithmetic, what each serving mode runs, what each stage may change, initialisation from a base
run, the asymmetric variant and the paper preset."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from helpers import tiny_bn_net
from torch import nn

from training.config import TrainConfig
from training.data import DatasetSpec
from training.errors import ConfigError
from training.models.dual_head import Aggregator, DualHeadNet
from training.recipes import Stage, StepContext, get_recipe

RECIPE = get_recipe("dhat")
FMNIST_SPEC = DatasetSpec(name="fashion_mnist", class_names=tuple(f"c{k}" for k in range(10)),
                          input_shape=(1, 28, 28), mean=(0.5,), std=(0.5,), default_architecture="smallcnn")
CIFAR_SPEC = DatasetSpec(name="cifar10", class_names=tuple(f"c{k}" for k in range(10)), input_shape=(3, 32, 32),
                         mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), default_architecture="resnet18")


def tiny_batch(n: int = 8, num_classes: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.rand(n, 1, 8, 8, generator=generator), torch.arange(n) % num_classes


def state_copy(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_state_equal(module: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = module.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(after[key], value), f"{key} changed"


def run_stage_like_engine(net: DualHeadNet, stage: Stage, config: TrainConfig, steps: int = 3) -> None:
    """What the engine does in a stage: only ``stage.trainable`` learns, frozen modules stay in eval."""
    torch.manual_seed(0)
    trainable = list(stage.trainable(net))
    net.requires_grad_(False)
    net.eval()
    for part in trainable:
        part.requires_grad_(True)
        part.train()
    optimizer = torch.optim.SGD([p for part in trainable for p in part.parameters()], lr=0.1, momentum=0.9)
    ctx = StepContext(model=net, module=net, config=config, augment=lambda x: x, epoch=0)
    x, y = tiny_batch()
    for _ in range(steps):
        loss, logits = stage.loss(ctx, x, y)
        assert logits.shape == (x.shape[0], 4) and torch.isfinite(loss)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def parameter_count(*modules: nn.Module) -> int:
    return sum(p.numel() for module in modules for p in module.parameters())


def stages_by_name(**overrides) -> dict[str, tuple[Stage, TrainConfig]]:
    config = RECIPE.config("quick", attack_steps=2, **overrides)
    return {stage.name: (stage, config.for_stage(stage.name)) for stage in RECIPE.stages(config)}


# -- the aggregator --------------------------------------------------------------------------------


def test_aggregator_flattens_2880_values_for_ten_classes() -> None:
    aggregator = Aggregator(10)
    seen: list[torch.Size] = []
    aggregator.fc.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0].shape))
    out = aggregator(torch.randn(5, 10), torch.randn(5, 10))
    assert out.shape == (5, 10)
    assert seen == [torch.Size([5, 2880])]  # 8 pooled kernels x 8 head-wise maps x 45 pairs (Section III-B)
    assert aggregator.fc.in_features == 2880


@pytest.mark.parametrize("num_classes", [2, 3, 100])
def test_aggregator_shapes_for_other_class_counts(num_classes: int) -> None:
    aggregator = Aggregator(num_classes)
    pairs = math.comb(num_classes, 2)
    assert aggregator.feature_dim == 8 * 8 * pairs  # 64, 192, 316800
    logits = torch.randn(3, num_classes)
    assert aggregator.features(logits, -logits).shape == (3, 64 * pairs)
    assert aggregator(logits, -logits).shape == (3, num_classes)


def test_aggregator_rejects_one_class() -> None:
    with pytest.raises(ValueError):
        Aggregator(1)


@torch.no_grad()
def test_aggregator_features_match_a_loop_over_kernels_and_class_pairs() -> None:
    torch.manual_seed(0)
    c = 4
    aggregator = Aggregator(c).eval()
    aggregator.head_bn.running_mean.uniform_(-1, 1)
    aggregator.head_bn.running_var.uniform_(0.5, 2)
    main, second = torch.randn(2, c), torch.randn(2, c)
    wh, bh = aggregator.head_conv.weight.view(8, 2), aggregator.head_conv.bias
    wp, bp = aggregator.pair_conv.weight.view(16, 2), aggregator.pair_conv.bias
    bn = aggregator.head_bn
    pairs = [(i, j) for i in range(c) for j in range(i + 1, c)]
    expected = torch.zeros(2, 8, 8, len(pairs))  # pooled kernel a, head-wise map m, pair p
    for n in range(2):
        for m in range(8):
            conv = wh[m, 0] * main[n] + wh[m, 1] * second[n] + bh[m]
            normalized = (conv - bn.running_mean[m]) / torch.sqrt(bn.running_var[m] + bn.eps)
            h = torch.relu(normalized * bn.weight[m] + bn.bias[m])
            for p, (i, j) in enumerate(pairs):
                per_kernel = wp[:, 0] * h[i] + wp[:, 1] * h[j] + bp  # the 16 class-wise kernels
                expected[n, :, m, p] = per_kernel.view(8, 2).mean(1)  # avg pool, stride 2
    torch.testing.assert_close(aggregator.features(main, second), expected.flatten(1))


# -- the dual head network and its serving modes ---------------------------------------------------


def test_main_mode_never_runs_the_second_head_or_the_aggregator() -> None:
    net = DualHeadNet.symmetric_from(tiny_bn_net()).eval()
    calls: Counter[str] = Counter()
    parts = {"trunk": net.main.stages[0], "main_head": net.main.stages[net.attach_point],
             "second_head": net.second_head, "aggregator": net.aggregator}
    for name, part in parts.items():
        part.register_forward_hook(lambda *args, name=name: calls.update([name]))
    x, _ = tiny_batch()
    modes = RECIPE.modes(net)
    torch.testing.assert_close(modes["main"].module(x), net.main(x))
    calls.clear()
    modes["main"].module(x)
    assert calls == {"trunk": 1, "main_head": 1}
    calls.clear()
    modes["second"].module(x)
    assert calls == {"trunk": 1, "second_head": 1}
    calls.clear()
    modes["both"].module(x)  # one pass of the shared trunk feeds both heads
    assert calls == {"trunk": 1, "main_head": 1, "second_head": 1, "aggregator": 1}


@torch.no_grad()
def test_both_mode_is_the_aggregator_over_the_two_heads() -> None:
    net = DualHeadNet.symmetric_from(tiny_bn_net()).eval()
    x, _ = tiny_batch()
    expected = net.aggregator(net.main_logits(x), net.second_logits(x))
    torch.testing.assert_close(RECIPE.modes(net)["both"].module(x), expected)


@torch.no_grad()
def test_modes_and_the_attack_surfaces_of_both() -> None:
    net = DualHeadNet.symmetric_from(tiny_bn_net()).eval()
    net.second_head.classifier.bias.add_(1.0)  # so that the two heads differ
    modes = RECIPE.modes(net)
    assert tuple(modes) == RECIPE.serving_modes == ("main", "second", "both")
    assert modes["main"].attack_surfaces == {} and modes["second"].attack_surfaces == {}
    surfaces = modes["both"].attack_surfaces
    assert set(surfaces) == {"main_head", "second_head"}
    x, _ = tiny_batch()
    torch.testing.assert_close(surfaces["main_head"](x), net.main(x))
    torch.testing.assert_close(surfaces["second_head"](x), net.second_logits(x))
    torch.testing.assert_close(modes["second"].module(x), net.second_logits(x))
    assert not torch.allclose(net.main(x), net.second_logits(x))


def test_a_view_keeps_the_frozen_modules_in_eval_mode() -> None:
    net = DualHeadNet.symmetric_from(tiny_bn_net())
    net.eval()
    net.second_head.train()
    view = net.view("second")
    assert not view.training
    assert net.second_head.training and not net.main.training


# -- the stages ------------------------------------------------------------------------------------


def test_second_stage_changes_only_the_second_head() -> None:
    torch.manual_seed(0)
    net = DualHeadNet.symmetric_from(tiny_bn_net())
    stage, config = stages_by_name()["second"]
    assert stage.validate_mode == "second" and config.params["beta"] == 3.0
    assert [id(m) for m in stage.trainable(net)] == [id(net.second_head)]
    main_before, aggregator_before = state_copy(net.main), state_copy(net.aggregator)
    second_before = state_copy(net.second_head)
    # The stage's loss and its adversary only run the second path: the main head never runs.
    main_head_calls = []
    net.main.stages[net.attach_point].register_forward_hook(lambda *args: main_head_calls.append(1))
    run_stage_like_engine(net, stage, config)
    assert main_head_calls == []
    assert_state_equal(net.main, main_before)  # trunk before the attach point and main head, BN buffers too
    assert_state_equal(net.aggregator, aggregator_before)
    changed = [k for k, v in net.second_head.state_dict().items() if not torch.equal(v, second_before[k])]
    assert "classifier.weight" in changed and "stages.0.1.running_mean" in changed


def test_aggregator_stage_changes_only_the_aggregator() -> None:
    torch.manual_seed(0)
    net = DualHeadNet.symmetric_from(tiny_bn_net())
    stage, config = stages_by_name()["aggregator"]
    assert stage.validate_mode == "both" and config.params["beta"] == 2.0
    assert [id(m) for m in stage.trainable(net)] == [id(net.aggregator)]
    main_before, second_before = state_copy(net.main), state_copy(net.second_head)
    aggregator_before = state_copy(net.aggregator)
    run_stage_like_engine(net, stage, config)
    assert_state_equal(net.main, main_before)
    assert_state_equal(net.second_head, second_before)
    changed = [k for k, v in net.aggregator.state_dict().items() if not torch.equal(v, aggregator_before[k])]
    assert {"fc.weight", "head_conv.weight", "pair_conv.weight", "head_bn.running_mean"} <= set(changed)


@pytest.mark.parametrize("base", ["pgd_at", "mart"])
def test_second_stage_uses_the_base_method_too(base: str) -> None:
    net = DualHeadNet.symmetric_from(tiny_bn_net())
    stage, config = stages_by_name(base=base)["second"]
    main_before = state_copy(net.main)
    run_stage_like_engine(net, stage, config, steps=1)
    assert_state_equal(net.main, main_before)


# -- building and initialising ---------------------------------------------------------------------


@torch.no_grad()
def test_symmetric_second_head_starts_as_the_main_head() -> None:
    torch.manual_seed(0)
    net = RECIPE.build_model(FMNIST_SPEC, RECIPE.config("quick"))
    assert isinstance(net, DualHeadNet) and net.symmetric
    main_head = {f"stages.{k}": v for k, v in net.main.stages[net.attach_point:].state_dict().items()}
    main_head.update({f"classifier.{k}": v for k, v in net.main.classifier.state_dict().items()})
    second = net.second_head.state_dict()
    assert second.keys() == main_head.keys()
    assert all(torch.equal(second[k], v) for k, v in main_head.items())
    assert all(a is not b for a, b in zip(net.second_head.parameters(), net.main.stages[1].parameters()))
    x = torch.rand(4, 1, 28, 28)
    net.eval()
    torch.testing.assert_close(net.second_logits(x), net.main_logits(x))


def test_asymmetric_resnet18_head_beside_resnet34() -> None:
    torch.manual_seed(0)
    config = RECIPE.config("paper", arch="resnet34", params={"second_arch": "resnet18"})
    net = RECIPE.build_model(CIFAR_SPEC, config)
    assert isinstance(net, DualHeadNet) and not net.symmetric
    # Section V: the shared first group keeps ResNet-34's 3 blocks; the head has ResNet-18's 2-2-2.
    assert [len(stage) for stage in net.main.stages] == [3, 4, 6, 3]
    assert [len(stage) for stage in net.second_head.stages] == [2, 2, 2]
    # "the second head has approximately 50% of the parameter size of the main head" (Section III-B).
    main_head = (net.main.stages[1:], net.main.pool, net.main.classifier)
    ratio = parameter_count(net.second_head) / parameter_count(*main_head)
    assert 0.45 < ratio < 0.55
    net.eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        for output in ("main", "second", "both"):
            assert net(x, output=output).shape == (2, 10)
    with pytest.raises(ValueError):
        net.copy_main_head_to_second()


def test_asymmetric_heads_must_fit_the_attach_point() -> None:
    config = RECIPE.config("quick", params={"second_arch": "resnet18"})
    with pytest.raises(ConfigError, match="attach point"):
        RECIPE.build_model(FMNIST_SPEC, config)


# -- presets ---------------------------------------------------------------------------------------


def test_paper_preset_config_audit() -> None:
    config = RECIPE.config("paper")
    # Section IV: WRN-34-10 on CIFAR-10, training PGD-10 with eps 8/255 and step 2/255.
    assert (config.dataset, config.arch, config.base) == ("cifar10", "wrn34_10", "trades")
    assert config.params["second_arch"] is None  # symmetric (Section IV)
    assert math.isclose(config.eps, 8 / 255) and math.isclose(config.step_size, 2 / 255)
    assert config.attack_steps == 10
    assert [(s.name, s.validate_mode) for s in RECIPE.stages(config)] == [("second", "second"), ("aggregator", "both")]
    # IV-A-1/2: each head SGD lr 0.1, momentum 0.9, wd 2e-4, lr / 10 at 75, 90, 100; the second
    # head with 1/lambda2 = 3 for another 76 epochs.
    second = config.for_stage("second")
    assert (second.epochs, second.lr, second.momentum, second.weight_decay) == (76, 0.1, 0.9, 2e-4)
    assert second.schedule == "multistep" and second.milestones == [75, 90, 100] and second.gamma == 0.1
    assert second.params["beta"] == 3.0
    # IV-A-2 / Eq. 1: the aggregator 15 epochs, TRADES loss with 1/lambda = 2, lr 0.02.
    aggregator = config.for_stage("aggregator")
    assert (aggregator.epochs, aggregator.lr, aggregator.params["beta"]) == (15, 0.02, 2.0)
    # The main head is the base's TRADES run at 1/lambda1 = 6.
    assert get_recipe("trades").config("paper").params["beta"] == 6.0


def test_quick_preset_and_bad_bases() -> None:
    config = RECIPE.config("quick")
    assert (config.dataset, config.arch, config.base, config.eps) == ("fashion_mnist", "smallcnn", "trades", 0.1)
    assert config.for_stage("second").params["beta"] == 3.0 and config.for_stage("aggregator").params["beta"] == 2.0
    assert set(RECIPE.bases) == {"trades", "pgd_at", "mart"}
    with pytest.raises(ConfigError):
        RECIPE.config("quick", base="natural")
    with pytest.raises(ConfigError):
        RECIPE.config("quick", base=None)


@pytest.mark.parametrize("preset", ["paper", "standard"])
def test_the_second_head_served_is_its_last_epoch_and_the_aggregator_its_best(preset: str) -> None:
    # The paper trains the second head "for another 76 epochs"; best-by-validation-PGD picked the standard run's
    # epoch 1 of 30 (a copy of the main head). The aggregator is still chosen by its validation PGD accuracy.
    config = RECIPE.config(preset)
    assert (config.for_stage("second").select_by, config.for_stage("aggregator").select_by) == ("last", "robust")


@pytest.mark.parametrize("preset", ["quick", "standard"])
def test_the_matched_budget_control_trains_trades_on_for_the_epochs_dhats_stages_add(preset) -> None:
    dhat, control = get_recipe("dhat").config(preset), get_recipe("trades_ft").config(preset)
    aggregator = dhat.for_stage("aggregator")
    assert control.epochs == dhat.for_stage("second").epochs + aggregator.epochs
    same = ("base", "lr", "schedule", "train_subset", "batch_size", "eps", "attack_steps", "step_size", "val_size")
    assert [getattr(control, f) for f in same] == [getattr(dhat, f) for f in same]
    # The main network's own TRADES setting, not the second head's 1/lambda.
    assert control.params["beta"] == get_recipe("trades").config(preset).params["beta"]
    assert {claim.against for claim in get_recipe("dhat").claims} == {":main", "trades_ft"}

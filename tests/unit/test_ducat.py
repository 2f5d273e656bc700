"""DUCAT: dummy-class layout, soft labels and losses by hand, Eq. 6 recovery, widening, the recipe."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from training.checkpoint import CheckpointError
from training.data import DatasetSpec
from training.dummy_classes import (
    PAIRING_FILE,
    ClassPairing,
    MergedClassScores,
    RecoveredScores,
    ducat_consistency_loss,
    ducat_loss,
    ducat_mart_loss,
    ducat_trades_loss,
    read_pairing,
    recover_dummy_classes,
    soft_labels,
)
from training.errors import ConfigError
from training.recipes import StepContext, get_recipe

C = 3
PAIRING = ClassPairing((5, 3, 4))  # class 0 -> output 5, class 1 -> 3, class 2 -> 4
CLEAN = [[2.0, 0.5, -1.0, 0.3, -0.2, 1.1], [0.1, 0.3, 1.2, -0.7, 0.9, 0.0]]
ADV = [[0.5, 1.5, -0.5, 0.2, 0.8, 1.9], [1.0, -0.2, 0.4, 0.6, 1.3, -0.4]]
Y = [0, 2]
# Matches the conftest's trained_smallcnn (10 classes, 1x28x28, mean 0.5, std 0.5).
SPEC = DatasetSpec(name="fashion_mnist", class_names=tuple(f"c{k}" for k in range(10)), input_shape=(1, 28, 28),
                   mean=(0.5,), std=(0.5,), default_architecture="smallcnn")
DUCAT = get_recipe("ducat")


def softmax(row: list[float]) -> list[float]:
    exps = [math.exp(v) for v in row]
    return [e / sum(exps) for e in exps]


def kl(p: list[float], q: list[float]) -> float:
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))


def logits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.tensor(CLEAN, dtype=torch.float64), torch.tensor(ADV, dtype=torch.float64), torch.tensor(Y)


def eq10(alpha: float, beta1: float, beta2: float, clean=CLEAN, adv=ADV, y=Y) -> float:
    """Eq. 10 term by term, with the dummy of y at PAIRING.dummy_of[y]."""
    total = 0.0
    for i, label in enumerate(y):
        p, q, dummy = softmax(clean[i]), softmax(adv[i]), PAIRING.dummy_of[label]
        total += -alpha * (beta1 * math.log(p[label]) + (1 - beta1) * math.log(p[dummy]))
        total += -(1 - alpha) * (beta2 * math.log(q[dummy]) + (1 - beta2) * math.log(q[label]))
    return total / len(y)


# ----------------------------------------------------------------------------------------------
# Pairing


def test_pairing_layouts_and_json_round_trip() -> None:
    assert ClassPairing.identity(3).dummy_of == (3, 4, 5) and ClassPairing.identity(3).is_identity
    secret = ClassPairing.random(10, seed=5)
    assert sorted(secret.dummy_of) == list(range(10, 20)) and not secret.is_identity
    assert ClassPairing.random(10, seed=5) == secret, "the same seed must give the same pairing"
    assert ClassPairing.random(10, seed=6) != secret
    assert ClassPairing.from_list(json.loads(json.dumps(secret.to_list()))) == secret
    assert PAIRING.real_class_index().tolist() == [0, 1, 2, 1, 2, 0]
    for bad in ([3, 3, 4], [0, 4, 5], [3, 4, 6], [3, 4], []):
        with pytest.raises(ValueError):
            ClassPairing.from_list(bad)


# ----------------------------------------------------------------------------------------------
# Soft labels and losses against hand computation


def test_soft_labels_follow_eq8_and_the_pairing() -> None:
    labels = soft_labels(torch.tensor(Y), C, PAIRING, 0.75)
    expected = [[0.75, 0, 0, 0, 0, 0.25], [0, 0, 0.75, 0, 0.25, 0]]
    assert labels.tolist() == expected
    assert soft_labels(torch.tensor(Y), C, ClassPairing.identity(C), 1.0).tolist() == [
        [1, 0, 0, 0, 0, 0], [0, 0, 1, 0, 0, 0]]
    with pytest.raises(ValueError):
        soft_labels(torch.tensor(Y), 4, PAIRING, 0.5)


@pytest.mark.parametrize("alpha,beta1,beta2", [(0.5, 0.75, 1.0), (0.3, 0.8, 0.9)])
def test_ducat_loss_is_eq10(alpha: float, beta1: float, beta2: float) -> None:
    clean, adv, y = logits()
    got = ducat_loss(clean, adv, y, PAIRING, alpha=alpha, beta1=beta1, beta2=beta2).item()
    assert got == pytest.approx(eq10(alpha, beta1, beta2), rel=1e-12)


def test_ducat_loss_weights_are_not_interchangeable() -> None:
    # beta2 = 1: the adversarial term is -log p_dummy(y)(x') alone; alpha = 1: only the clean term.
    clean, adv, y = logits()
    adv_only = ducat_loss(clean, adv, y, PAIRING, alpha=0.0, beta1=0.75, beta2=1.0).item()
    expected = -sum(math.log(softmax(ADV[i])[PAIRING.dummy_of[Y[i]]]) for i in range(2)) / 2
    assert adv_only == pytest.approx(expected, rel=1e-12)
    clean_only = ducat_loss(clean, adv, y, PAIRING, alpha=1.0, beta1=1.0, beta2=0.0).item()
    assert clean_only == pytest.approx(-sum(math.log(softmax(CLEAN[i])[Y[i]]) for i in range(2)) / 2, rel=1e-12)


def test_trades_plug_in_adds_the_kl_over_2c_outputs() -> None:
    clean, adv, y = logits()
    boundary = sum(kl(softmax(CLEAN[i]), softmax(ADV[i])) for i in range(2)) / 2
    got = ducat_trades_loss(clean, adv, y, PAIRING, alpha=0.5, beta1=0.75, beta2=1.0, beta=6.0).item()
    assert got == pytest.approx(eq10(0.5, 0.75, 1.0) + 6.0 * boundary, rel=1e-10)


def test_mart_plug_in_treats_both_outputs_of_y_as_correct() -> None:
    clean, adv, y = logits()
    margin = weighted_kl = 0.0
    for i, label in enumerate(Y):
        p, q, own = softmax(CLEAN[i]), softmax(ADV[i]), {label, PAIRING.dummy_of[label]}
        wrong = max((k for k in range(2 * C) if k not in own), key=lambda k: q[k])
        margin += -math.log(1.0001 - q[wrong] + 1e-12)
        weighted_kl += kl(p, q) * (1.0000001 - sum(p[k] for k in own))
    # Sample 0's adversarial top output is its dummy (5); MART's own rule would have picked it.
    assert max(range(6), key=lambda k: ADV[0][k]) == PAIRING.dummy_of[0]
    expected = eq10(0.5, 0.75, 1.0) + margin / 2 + 6.0 * weighted_kl / 2
    got = ducat_mart_loss(clean, adv, y, PAIRING, alpha=0.5, beta1=0.75, beta2=1.0, beta=6.0).item()
    assert got == pytest.approx(expected, rel=1e-8)


def test_consistency_plug_in_averages_both_views_and_adds_js() -> None:
    clean, adv, y = logits()
    # View a is row 0 of CLEAN/ADV, view b row 1, both of the single label Y[0].
    views_y = [Y[0], Y[0]]
    t = 0.5
    pa, pb = (softmax([v / t for v in ADV[i]]) for i in range(2))
    m = [(a + b) / 2 for a, b in zip(pa, pb)]
    js = 0.5 * (kl(pa, m) + kl(pb, m))
    got = ducat_consistency_loss(clean, adv, y[:1], PAIRING, alpha=0.5, beta1=0.75, beta2=1.0, lam=1.0,
                                 temperature=t).item()
    assert got == pytest.approx(eq10(0.5, 0.75, 1.0, y=views_y) + js, rel=1e-10)


# ----------------------------------------------------------------------------------------------
# Recovery (Eq. 6) and the evaluation modules


def test_recovery_maps_dummy_predictions_back_and_flags_them() -> None:
    z = torch.tensor([[5.0, 0, 0, 0, 0, 0],    # real class 0
                      [0, 0, 0, 0, 0, 5.0],    # output 5: dummy of class 0 under PAIRING, of class 2 under identity
                      [0, 0, 0, 5.0, 0, 0]])   # output 3: dummy of class 1 under PAIRING, of class 0 under identity
    predicted, flagged = recover_dummy_classes(z, PAIRING)
    assert predicted.tolist() == [0, 0, 1] and flagged.tolist() == [False, True, True]
    predicted, flagged = recover_dummy_classes(z, ClassPairing.identity(C))
    assert predicted.tolist() == [0, 2, 0] and flagged.tolist() == [False, True, True]


class Fixed(nn.Module):
    """Returns the given logits whatever the input: the evaluation modules see exact values."""

    def __init__(self, values: torch.Tensor) -> None:
        super().__init__()
        self.values = values

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.values


def test_recovered_scores_argmax_is_the_eq6_prediction() -> None:
    torch.manual_seed(0)
    z = torch.randn(500, 2 * C) * 3
    scores = RecoveredScores(Fixed(z), PAIRING)(torch.zeros(1))
    assert scores.shape == (500, C)
    assert torch.equal(scores[:, 1], torch.maximum(z[:, 1], z[:, 3]))
    assert torch.equal(scores.argmax(1), recover_dummy_classes(z, PAIRING)[0])
    assert RecoveredScores(Fixed(z), PAIRING).state_dict() == {}, "the pairing is not a weight"


def test_merged_class_scores_are_log_of_paired_probabilities() -> None:
    z = torch.tensor(CLEAN, dtype=torch.float64)
    merged = MergedClassScores(Fixed(z), PAIRING)(torch.zeros(1))
    for i in range(2):
        p = softmax(CLEAN[i])
        for k in range(C):
            assert merged[i, k].item() == pytest.approx(math.log(p[k] + p[PAIRING.dummy_of[k]]), rel=1e-12)


def test_dummy_bias_offset_must_not_raise_the_dummies() -> None:
    with pytest.raises(ConfigError, match="dummy_bias_offset"):
        DUCAT.config("quick", params={"dummy_bias_offset": 1.0})


# ----------------------------------------------------------------------------------------------
# The recipe's loss with each base method


def step_context(method: str, epoch: int = 0, epochs: int = 1, **params) -> tuple[StepContext, nn.Module]:
    config = DUCAT.config("quick", attack_steps=2, epochs=epochs, params={"method": method, "pairing_seed": 3, **params})
    torch.manual_seed(0)
    model = DUCAT.build_model(SPEC, config)
    return StepContext(model=model, module=model, config=config, augment=lambda t: t, epoch=epoch), model


@pytest.mark.parametrize("method", ["pgd_at", "trades", "mart", "consistency_at"])
def test_each_method_plug_in_trains(method, synthetic_batch) -> None:
    x, y = synthetic_batch
    x, y = x[:32], y[:32]
    ctx, model = step_context(method)
    assert ctx.config.params["method"] == method
    model.train()

    def loss_now() -> torch.Tensor:
        torch.manual_seed(1)  # the same PGD start each time
        loss, scores = DUCAT.loss(ctx, x, y)
        assert scores.shape == (32, 10) and not scores.requires_grad
        return loss

    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    loss = loss_now()
    assert torch.isfinite(loss)
    optimizer.zero_grad()
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.classifier.bias.grad[10:].abs().sum() > 0, "the dummy outputs must learn"
    optimizer.step()
    assert loss_now().item() < loss.item()


@pytest.mark.parametrize("method", ["pgd_at", "mart"])
def test_before_the_start_epoch_the_plain_method_loss_runs(method, synthetic_batch) -> None:
    x, y = synthetic_batch
    ctx, _ = step_context(method, epoch=1, epochs=3, start_epoch=2)
    torch.manual_seed(1)
    plain, _ = get_recipe(method).loss(ctx, x[:16], y[:16])
    torch.manual_seed(1)
    got, _ = DUCAT.loss(ctx, x[:16], y[:16])
    assert got.item() == pytest.approx(plain.item(), rel=1e-6)
    ctx.epoch = 2
    torch.manual_seed(1)
    assert DUCAT.loss(ctx, x[:16], y[:16])[0].item() != pytest.approx(plain.item(), rel=1e-3)


# ----------------------------------------------------------------------------------------------
# Serving modes and the stored pairing


def test_pairing_json_round_trip_through_finish_and_modes(tmp_path) -> None:
    secret_config = DUCAT.config("quick", params={"secret_pairing": True, "pairing_seed": 11})
    trained = DUCAT.build_model(SPEC, secret_config)
    DUCAT.finish(trained, tmp_path, None, SPEC, secret_config)
    assert sorted(p.name for p in tmp_path.iterdir()) == [PAIRING_FILE], "written atomically, nothing else left"
    assert read_pairing(tmp_path / PAIRING_FILE) == ClassPairing.random(10, seed=11)
    # A network rebuilt without the secret still serves with the stored pairing.
    plain = DUCAT.build_model(SPEC, DUCAT.config("quick", params={"secret_pairing": False}))
    modes = DUCAT.modes(plain, tmp_path)
    assert list(modes) == list(DUCAT.serving_modes) == ["recovered", "raw"]
    assert modes["recovered"].module.pairing == ClassPairing.random(10, seed=11)
    assert set(modes["recovered"].attack_surfaces) == {"merged", "raw_logits"}
    assert modes["recovered"].attack_surfaces["merged"].pairing == ClassPairing.random(10, seed=11)
    assert modes["recovered"].attack_surfaces["raw_logits"] is plain and modes["raw"].module is plain
    # No pairing.json: the network's own pairing, identity for a plain one.
    empty = tmp_path / "empty"
    empty.mkdir()
    assert DUCAT.modes(plain, empty)["recovered"].module.pairing.is_identity
    assert DUCAT.modes(trained, empty)["recovered"].module.pairing == ClassPairing.random(10, seed=11)
    (empty / PAIRING_FILE).write_text('{"dummy_of": [1, 2]}')
    with pytest.raises(CheckpointError):
        DUCAT.modes(plain, empty)


# ----------------------------------------------------------------------------------------------
# Presets and settings


def test_paper_preset_matches_the_paper() -> None:
    config = DUCAT.config("paper")
    # Section 3.1, "Training details" and "Threat models"; CIFAR-10 and ResNet-18 (Table 1).
    assert (config.dataset, config.arch, config.base) == ("cifar10", "resnet18", None)
    assert (config.epochs, config.batch_size, config.lr, config.momentum) == (130, 128, 0.1, 0.9)
    assert config.weight_decay == 5e-4
    assert (config.schedule, config.milestones, config.gamma) == ("multistep", [100, 105], 0.1)
    assert (config.eps, config.step_size, config.attack_steps) == (8 / 255, 2 / 255, 10)
    params = config.params
    assert (params["alpha"], params["beta1"], params["beta2"], params["start_epoch"]) == (0.5, 0.75, 1.0, 105)
    assert params["method"] == "pgd_at" and params["secret_pairing"] is False
    trades = DUCAT.config("paper", params={"method": "trades"})
    assert trades.params["beta"] == 6.0, "a base method keeps its own paper settings"


def test_quick_preset_fine_tunes_the_quick_pgd_at_run() -> None:
    config = DUCAT.config("quick")
    assert (config.dataset, config.arch, config.eps, config.base) == ("fashion_mnist", "smallcnn", 0.1, "pgd_at")
    assert config.params["start_epoch"] == 0 and config.params["method"] == "pgd_at"
    assert DUCAT.config("quick", base="mart").params["method"] == "mart", "the method follows the base run"


@pytest.mark.parametrize("preset", ["quick", "standard"])
def test_the_matched_budget_control_trains_pgd_at_on_for_ducats_epochs_and_lr(preset) -> None:
    ducat, control = DUCAT.config(preset), get_recipe("pgd_at_ft").config(preset)
    budget = ("base", "epochs", "lr", "schedule", "train_subset", "batch_size", "eps", "attack_steps", "step_size")
    assert [getattr(control, f) for f in budget] == [getattr(ducat, f) for f in budget]
    assert control.base == "pgd_at" and "pgd_at_ft" in {claim.against for claim in DUCAT.claims}


@pytest.mark.parametrize("params", [{"method": "natural"}, {"beta1": 1.5}, {"alpha": "half"}, {"start_epoch": 1},
                                    {"start_epoch": -1}, {"secret_pairing": "yes"}, {"pairing_seed": -1},
                                    {"pairing_seed": "7"}, {"pairing_seed": True}])
def test_bad_settings_are_config_errors(params) -> None:
    with pytest.raises(ConfigError):
        DUCAT.config("quick", params=params)


def test_a_secret_pairing_is_drawn_for_each_run_not_derived_from_its_seed() -> None:
    config = DUCAT.config("standard")
    assert config.params["secret_pairing"] and "pairing_seed" not in config.params, "--seed must not fix the pairing"
    drawn = {DUCAT.draw_run_secrets(config)["pairing_seed"] for _ in range(4)}
    assert len(drawn) == 4 and all(0 <= seed < 2**63 for seed in drawn)
    with pytest.raises(ConfigError, match="pairing_seed"):
        DUCAT.build_model(SPEC, config)
    assert DUCAT.draw_run_secrets(DUCAT.config("standard", params={"pairing_seed": 5})) == {}, "a given seed is kept"
    assert DUCAT.draw_run_secrets(DUCAT.config("paper")) == {}, "the paper's k -> k + C has no secret"

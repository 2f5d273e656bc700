"""The training engine's settings: learning-rate schedules and bf16 autocast only where the CPU has it natively.
Training runs (resume after SIGKILL, DDP under torchrun, CLI errors): tests/integration/test_engine.py."""

from __future__ import annotations

import pytest
import torch

from training.config import TrainConfig
from training.engine import learning_rate


def test_learning_rate_schedules() -> None:
    step = TrainConfig(recipe="pgd_at", epochs=200, lr=0.1, schedule="multistep", milestones=[100, 150])
    assert [learning_rate(step, e) for e in (0, 99.9, 100, 150)] == pytest.approx([0.1, 0.1, 0.01, 0.001])
    cosine = TrainConfig(recipe="pgd_at", epochs=10, lr=0.1, schedule="cosine")
    assert learning_rate(cosine, 0) == pytest.approx(0.1) and learning_rate(cosine, 10) == pytest.approx(0.0)
    assert learning_rate(cosine, 5) == pytest.approx(0.05)
    # A tail: the cosine anneals over the first 10 epochs, as without one, then a tenth of the lr to the end.
    tailed = TrainConfig(recipe="pgd_at", epochs=15, tail_epochs=5, lr=0.1, schedule="cosine")
    assert all(learning_rate(tailed, e / 4) == learning_rate(cosine, e / 4) for e in range(40))
    assert [learning_rate(tailed, e) for e in (10, 12.5, 14.99)] == pytest.approx([0.01] * 3)


def test_tail_epochs_belong_to_a_cosine_schedule_and_leave_it_epochs_to_anneal():
    from training.errors import ConfigError
    from training.recipes import get_recipe

    pgd_at = get_recipe("pgd_at")
    assert pgd_at.config("quick", epochs=3, tail_epochs=1).tail_epochs == 1
    with pytest.raises(ConfigError, match=r"tail_epochs \(3\) .* fewer than its epochs \(3\)"):
        pgd_at.config("quick", epochs=3, tail_epochs=3)
    with pytest.raises(ConfigError, match="has a constant one"):
        pgd_at.config("quick", schedule="constant", tail_epochs=1)
    with pytest.raises(ConfigError, match="aggregator has a constant one"):  # per stage too
        get_recipe("dhat").config("standard", stages={"aggregator": {"tail_epochs": 2}})


def test_a_run_continues_to_more_epochs_only_where_its_trained_epochs_keep_their_lr():
    from training.engine import lengthening_problem
    from training.recipes import get_recipe

    def state(*epochs_done: int) -> dict:
        return {"stage": len(epochs_done) - 1, "stages": [{"epochs_done": done} for done in epochs_done]}

    pgd_at = get_recipe("pgd_at")
    trained = pgd_at.config("standard", epochs=30, tail_epochs=0)
    stages = pgd_at.stages(trained)
    assert lengthening_problem(trained, pgd_at.config("standard"), stages, state(30)) is None  # 30 cosine + 60 tail
    assert lengthening_problem(trained, trained, stages, state(12)) is None  # an interrupted run
    stretched = lengthening_problem(trained, pgd_at.config("standard", tail_epochs=0), stages, state(30))
    assert "the learning rate of the 30 epochs its" in stretched
    assert "(30 epochs, 0 of them tail, then; 90 and 0 now: a cosine run grows exactly by adding" in stretched
    # DH-AT's aggregator was trained on the second head: the second head cannot grow under it.
    dhat = get_recipe("dhat")
    short = dhat.config("standard", epochs=30, tail_epochs=0)
    problem = lengthening_problem(short, dhat.config("standard"), dhat.stages(short), state(30, 6))
    assert problem.startswith("its second stage would train 90 epochs instead of its 30")
    # THAT's 30-epoch run (its clean encoder's override without the tail_epochs 0 it states now) continues.
    that = get_recipe("that")
    that_30 = that.config("standard", epochs=30, tail_epochs=0)
    that_30.stages["clean_encoder"].pop("tail_epochs")
    assert that.config("standard").changed_settings(that_30) == ["epochs", "tail_epochs"]
    assert lengthening_problem(that_30, that.config("standard"), that.stages(that_30), state(5, 30)) is None
    # ... and so does its 90-epoch run, the preset's until THAT's robust stage got 30 more tail epochs.
    that_90 = that.config("standard", epochs=90, tail_epochs=60)
    assert lengthening_problem(that_90, that.config("standard"), that.stages(that_90), state(5, 90)) is None
    longer_aggregator = dhat.config("standard", epochs=30, tail_epochs=0, stages={"aggregator": {"epochs": 9}})
    assert lengthening_problem(short, longer_aggregator, dhat.stages(short), state(30, 6)) is None


def test_bf16_autocast_only_where_native(tmp_path):
    from training.devices import attack_autocast, cpu_has_native_bf16, step_autocast

    amx, plain = tmp_path / "amx", tmp_path / "plain"
    amx.write_text("flags\t: fpu sse2 avx512f avx512_bf16 amx_tile amx_bf16\n")
    plain.write_text("flags\t: fpu sse2 avx2\n")
    assert cpu_has_native_bf16(amx) and not cpu_has_native_bf16(plain)
    assert not cpu_has_native_bf16(tmp_path / "missing")
    cpu = torch.device("cpu")
    with attack_autocast(cpu, enabled=False):
        assert torch.mm(torch.ones(2, 2), torch.ones(2, 2)).dtype == torch.float32
    with attack_autocast(cpu):  # crafting attacks: bf16 where the CPU has it natively
        expected = torch.bfloat16 if cpu_has_native_bf16() else torch.float32
        assert torch.mm(torch.ones(2, 2), torch.ones(2, 2)).dtype == expected
    with step_autocast(cpu):  # weight updates: float32 on every CPU
        assert torch.mm(torch.ones(2, 2), torch.ones(2, 2)).dtype == torch.float32


def test_a_run_is_converged_when_its_last_third_rose_less_than_a_point():
    from training.runs import describe_rise, validation_rise

    def stage(name, clean, robust):
        return {"name": name, "history": [{"epoch": i + 1, "val_clean_acc": c, "val_robust_acc": r}
                                          for i, (c, r) in enumerate(zip(clean, robust, strict=True))]}

    flat_stage = stage("pgd_at", [0.5, 0.7, 0.80, 0.805, 0.80, 0.809], [0.3, 0.4, 0.45, 0.45, 0.451, 0.452])
    rising_stage = stage("pgd_at", [0.5, 0.7, 0.80, 0.80, 0.81, 0.83], [0.3, 0.4, 0.45, 0.45, 0.45, 0.45])
    flat = validation_rise({"stages": [flat_stage]})
    assert flat["from_epoch"] == 4 and flat["to_epoch"] == 6 and flat["flat"]  # the last third: epochs 5 and 6
    assert flat["rising_stages"] == []
    rising = validation_rise({"stages": [rising_stage]})
    assert rising["val_clean_acc"] == pytest.approx(0.03) and not rising["flat"]
    # A flat fine-tune of a base that was still rising is not converged: every stage counts.
    fine_tune = stage("ducat", [0.83, 0.83, 0.832], [0.45, 0.451, 0.45])
    assert validation_rise({"stages": [flat_stage, fine_tune]})["flat"]
    tail_of_rising = validation_rise({"stages": [rising_stage, fine_tune]})
    assert not tail_of_rising["flat"] and tail_of_rising["rising_stages"] == ["pgd_at"]
    assert tail_of_rising["from_epoch"] == 2 and tail_of_rising["to_epoch"] == 3  # the figures are the last stage's
    # `robustserve zoo list` shows the figures of the stage that rises (too few epochs here for an interval).
    assert describe_rise(tail_of_rising) == "NOT flat over the last third of pgd_at (epochs 4-6: clean +3.0, PGD +0.0)"
    # Ten images more of 1,000 is a point, not less, though float32 validation figures make it 0.00999999 (ACT's
    # tail, 75.6 -> 76.6).
    as_float32 = [torch.tensor(v).item() for v in (0.75, 0.756, 0.756, 0.766)]
    a_point = validation_rise({"stages": [stage("act", [0.8] * 4, as_float32)]})
    assert a_point["val_robust_acc"] < 0.01 and not a_point["flat"]


def test_the_rise_is_read_on_the_line_fitted_through_the_last_third():
    """One epoch's validation figure moves by about a point from the next: two single epochs once made ACT's flat
    tail rise exactly a point (its PGD-10 accuracy over epochs 30-45 below, 75.6 -> 76.6), and one low last epoch
    would hide a steady rise."""
    from training.runs import describe_rise, validation_rise

    def stage(robust):
        return {"name": "act", "history": [{"epoch": i + 1, "val_clean_acc": 0.83, "val_robust_acc": r}
                                           for i, r in enumerate(robust)]}

    act_tail = [0.756, 0.748, 0.752, 0.751, 0.749, 0.748, 0.757, 0.759, 0.756, 0.754, 0.749, 0.751, 0.753, 0.761,
                0.753, 0.766]
    noisy_flat = validation_rise({"stages": [stage([0.70] * 29 + act_tail)]})
    assert (noisy_flat["from_epoch"], noisy_flat["to_epoch"]) == (30, 45)
    assert noisy_flat["val_robust_acc"] == pytest.approx(0.0075, abs=5e-4) and noisy_flat["flat"]
    # Flat by the rule, and a rise of a point is inside its interval: the line says how near the verdict is.
    assert describe_rise(noisy_flat) == "converged (epochs 30-45: clean +0.0 [+0.0, +0.0], PGD +0.7 [-0.1, +1.6])"
    steady = [0.70 + 0.001 * i for i in range(15)] + [0.705]  # 1.4 points over the third, then one low epoch
    rising = validation_rise({"stages": [stage([0.70] * 29 + steady)]})
    assert steady[-1] - steady[0] < 0.01 and rising["val_robust_acc"] > 0.01 and not rising["flat"]


def test_the_code_version_is_read_once_per_process(monkeypatch):
    """A trades run on two cores takes most of an hour; a commit made meanwhile once went into its defense.json as
    the code it ran. The first reading is kept."""
    from training import checkpoint

    first = checkpoint.code_version()

    def no_git(*args, **kwargs):
        raise AssertionError("git was asked again")

    monkeypatch.setattr(checkpoint.subprocess, "run", no_git)
    assert checkpoint.code_version() == first


def test_changed_settings_names_what_differs_from_a_recorded_run_and_no_values():
    recorded = TrainConfig(recipe="ducat", epochs=30, device="cuda",
                           params={"beta": 6.0, "pairing_seed": 123456789}, stages={"second": {"lr": 0.01}})
    same = TrainConfig(recipe="ducat", epochs=30, device="cpu", params={"beta": 6.0}, stages={"second": {"lr": 0.01}})
    # A key only the record has was filled in by training (DUCAT's pairing seed); where it ran may be ignored.
    assert same.changed_settings(recorded, ignore=frozenset({"device"})) == []
    assert same.changed_settings(recorded) == ["device"]
    other = TrainConfig(recipe="ducat", epochs=20, params={"beta": 3.0},
                        stages={"second": {"lr": 0.01, "select_by": "last"}, "aggregator": {"epochs": 6}})
    changed = other.changed_settings(recorded, ignore=frozenset({"device"}))
    assert changed == ["epochs", "params.beta", "stages.aggregator.epochs", "stages.second.select_by"]
    # A stage override that restates what the stage had anyway is no change (THAT's clean encoder, given the
    # standard preset's tail, says tail_epochs 0, the default its 30-epoch runs were trained with).
    restated = TrainConfig(recipe="ducat", epochs=30, params={"beta": 6.0},
                           stages={"second": {"lr": 0.01, "tail_epochs": 0, "params": {"beta": 6.0}}})
    assert restated.changed_settings(recorded, ignore=frozenset({"device"})) == []
    assert "123456789" not in repr(changed) and "3.0" not in repr(changed)

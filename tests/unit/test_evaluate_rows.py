"""Evaluation rows without a trained run: the per-image worst case over hand-made rows, and pyautoattack's
gradient-masking warnings carried into an AutoAttack row. Evaluation of a trained run folder:
tests/integration/test_evaluate.py."""

from __future__ import annotations

import pytest
import torch
from helpers import constant_logits_model

from training.evaluate import (
    BLACK_BOX,
    TRANSFER,
    WHITE_BOX,
    EvalContext,
    EvalSettings,
    curves_figure,
    encode_flags,
    plan_attacks,
    run_row,
    worst_case,
)
from training.recipes import ServingMode
from training.stats import proportion

EPS = 0.1


pytestmark = pytest.mark.usefixtures("one_thread")


def _synthetic_row(attack: str, kind: str, flags: list[bool]) -> dict:
    return {"mode": "m", "attack": attack, "kind": kind, "label": attack, "eps": EPS, **proportion(flags).to_json(),
            "correct": encode_flags(torch.tensor(flags)), "settings": {}}


def test_worst_case_is_a_per_image_union_and_flags_a_stronger_black_box():
    a = [True] * 60 + [False] * 40  # 60 %
    b = [False] * 20 + [True] * 60 + [False] * 20  # 60 %, different images
    rows = [_synthetic_row("pgd", WHITE_BOX, a), _synthetic_row("apgd", WHITE_BOX, b[:50])]
    worst = worst_case(rows, "m", EPS)
    # Per image on the 50 images both ran on: only images 20..49 survive both.
    assert (worst["k"], worst["n"]) == (30, 50) and worst["lowest"]["attack"] == "pgd"
    assert worst_case(rows, "other mode", EPS) is None
    # A transfer attack as strong as the white-box ones: not flagged. Square far below them: flagged.
    similar = _synthetic_row("transfer", TRANSFER, [False] * 20 + [True] * 30 + [False] * 50)
    assert not worst_case(rows + [similar], "m", EPS)["reliability"]["unreliable"]
    square = _synthetic_row("square", BLACK_BOX, [False] * 100)
    flagged = worst_case(rows + [square], "m", EPS)
    assert flagged["reliability"]["unreliable"] and flagged["k"] == 0
    (check,) = [c for c in flagged["reliability"]["checks"] if c["attack"] == "square"]
    assert check["difference"] == pytest.approx(-0.6) and check["ci95"][1] < 0
    assert "square is below the white-box worst case by -60.0" in flagged["reliability"]["evidence"][0]


def test_autoattack_rows_carry_pyautoattacks_gradient_masking_warnings(tmp_path):
    settings = EvalSettings(n=6, eps=EPS, norm="linf", pgd_steps=2, pgd_restarts=1, objectives=("ce",), autoattack_n=6,
                            autoattack_version="fast", transfer=False, sweep=(), sweep_steps=2, batch_size=64,
                            device="cpu", seed=0)
    masked = constant_logits_model()
    ctx = EvalContext("default", ServingMode(masked, "constant", attack_surfaces={"itself": masked}),
                      torch.rand(6, 1, 28, 28), torch.zeros(6, dtype=torch.long), settings)
    plan = {planned.attack: planned for planned in plan_attacks(ctx)}
    autoattack = run_row(tmp_path, "fingerprint", "default", plan["autoattack"], measured_on="cpu", progress=False)
    assert "**pyautoattack's checks warned: zero gradients at up to 6 of 6 images" in autoattack["describe"]
    assert autoattack["settings"]["check_warnings"]
    surface = run_row(tmp_path, "fingerprint", "default", plan["apgd-ce+apgd-t@itself"], measured_on="cpu",
                      progress=False)
    assert surface["settings"]["check_warnings"]  # APGD-T's DLR loss is checked too


def test_the_curves_show_every_modes_worst_case():
    # The sweep is the primary mode's; a multi-mode run (DH-AT's heads) still shows each mode's worst case.
    rows = {mode: _synthetic_row("pgd", WHITE_BOX, [True] * k + [False] * (10 - k)) for mode, k in (("main", 6), ("both", 7))}
    report = {"run": {"defense": "dhat", "architecture": "smallcnn", "dataset": "fashion_mnist"},
              "settings": {"sweep_steps": 5, "n": 10, "eps": EPS, "norm": "linf"},
              "modes": {"main": "the main head", "both": "the aggregator"},
              "sweep": [{**rows["main"], "eps": e} for e in (0.0, EPS)],
              "results": [{**row, "mode": mode} for mode, row in rows.items()],
              "worst_case": {"main": worst_case([{**rows["main"], "mode": "main"}], "main", EPS),
                             "both": worst_case([{**rows["both"], "mode": "both"}], "both", EPS)}}
    labels = [text.get_text() for text in curves_figure(report).axes[0].get_legend().get_texts()]
    assert "worst case per image [main] (10)" in labels and "worst case per image [both] (10)" in labels

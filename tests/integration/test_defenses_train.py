"""Every defense end to end through the real engine and evaluation: base run, stages, artifacts,
serving modes and the adaptive attacks on each mode's attack surfaces."""

from __future__ import annotations

import json

import pytest
from helpers import train_tiny

from training.evaluate import evaluate_run
from training.recipes import get_recipe
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

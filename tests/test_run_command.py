"""`robustserve run`, the main job behind `make run`, on learnable synthetic Fashion-MNIST: it trains the
recipes it is given, evaluates every serving mode, writes the results table, and a second run reuses
everything it finished; its recipe list is checked before anything is trained. (Packaging and serving
are tested in test_rest.py; the demo in test_demo*.py.)"""

from __future__ import annotations

import pytest

from serving.cli import main, recipe_list
from training.errors import ConfigError
from training.recipes import RECIPES


def test_the_default_recipes_are_the_five_defenses_and_the_bases_they_need():
    from serving.cli import build_parser

    default = recipe_list(build_parser().parse_args(["run"]).recipes)
    assert {"dhat", "that", "aft_dra", "ducat", "act"} <= set(default)
    assert {"natural", "pgd_at", "trades"} <= set(default)  # AFT-DRA's, DUCAT's and DH-AT's starting runs
    for defense in ("aft_dra", "ducat", "dhat"):  # each starts from a run that the default also trains
        assert RECIPES[defense].config("quick").base in default, defense
    assert recipe_list("all") == list(RECIPES) and {"mart", "consistency_at"} <= set(recipe_list("all"))
    assert recipe_list(" natural , pgd_at,") == ["natural", "pgd_at"]


@pytest.mark.parametrize("recipes, message", [("natural,pgd_a", "unknown recipe 'pgd_a'"),
                                               (" , ", "--recipes names no recipe")])
def test_a_bad_recipe_list_is_one_line_before_anything_is_trained(recipes, message, tmp_path, capsys):
    with pytest.raises(ConfigError, match=message):
        recipe_list(recipes)
    assert main(["run", "--recipes", recipes, "--runs", str(tmp_path / "runs"), "--no-serve",
                 "--results", str(tmp_path / "RESULTS.md")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("robustserve: error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "runs").exists() and not (tmp_path / "RESULTS.md").exists()


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_run_trains_evaluates_writes_the_table_and_reuses_finished_runs(learnable_fashion_mnist, tmp_path, capsys):
    results = tmp_path / "RESULTS.md"
    args = ["run", "--recipes", "natural,pgd_at", "--runs", str(tmp_path / "runs"), "--n", "20",
            "--autoattack-n", "4", "--results", str(results), "--no-serve"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert "== natural: training into" in first and "   default: PGD-20 CW margin: " in first  # each row and its cost
    table = results.read_text()
    assert table.startswith("# Results (quick preset)")
    rows = [line for line in table.splitlines() if line.startswith("| natural ") or line.startswith("| pgd_at ")]
    assert [row.split("|")[1].strip() for row in rows] == ["natural", "pgd_at"]
    for recipe in ("natural", "pgd_at"):
        assert (tmp_path / "runs" / f"{recipe}-quick-fashion_mnist-smallcnn" / "report.json").is_file()

    assert main(args) == 0  # everything finished is reused: no training, no evaluation
    second = capsys.readouterr().out
    assert "== natural: reusing" in second and "== pgd_at: reusing" in second
    assert "training into" not in second and "   default: " not in second  # no row was computed again
    assert results.read_text() == table

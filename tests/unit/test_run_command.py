"""`robustserve run`, the main job behind `make run`: its default recipes, and its recipe list checked before
anything is trained. The run end to end: tests/integration/test_run_command_end_to_end.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from serving.cli import main, recipe_list
from training.errors import ConfigError
from training.recipes import RECIPES


def test_the_default_recipes_are_the_five_defenses_and_the_bases_they_need():
    from pathlib import Path

    from serving.cli import default_recipes

    default = recipe_list(default_recipes("quick", None))
    assert {"dhat", "that", "aft_dra", "ducat", "act"} <= set(default)
    assert {"natural", "pgd_at", "trades"} <= set(default)  # AFT-DRA's, DUCAT's and DH-AT's starting runs
    for defense in ("aft_dra", "ducat", "dhat"):  # each starts from a run that the default also trains
        assert RECIPES[defense].config("quick").base in default, defense
    assert recipe_list("all") == list(RECIPES) and {"mart", "consistency_at"} <= set(recipe_list("all"))
    assert recipe_list(" natural , pgd_at,") == ["natural", "pgd_at"]
    # The standard preset and the zoo: those and the two other baselines, the ten recipes (no control).
    for zoo_default in (default_recipes("standard", None), default_recipes("quick", Path("model_store/zoo"))):
        assert set(recipe_list(zoo_default)) == set(default) | {"mart", "consistency_at"}


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


def test_a_named_attack_suite_with_the_options_given_on_top():
    from serving.cli import SUITE_NOTES, SUITES, build_parser, default_suite, suite_settings

    args = build_parser().parse_args(["eval", "runs/x", "--suite", "cpu", "--n", "50"])
    assert suite_settings(args, args.suite) == {**SUITES["cpu"], "n": 50}
    assert suite_settings(build_parser().parse_args(["eval", "runs/x"]), "full") == {}  # evaluate_run's own defaults
    assert build_parser().parse_args(["run"]).suite is None
    assert (default_suite("quick"), default_suite("standard"), default_suite("paper")) == ("pipeline-check", "full", "full")
    assert "upper bounds" in SUITE_NOTES["cpu"] and "full" not in SUITE_NOTES  # a reduced suite says what it is
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "--suite", "fast"])


def test_zoo_add_takes_its_options_before_or_after_the_run_folders(tmp_path, capsys):
    from serving.cli import build_parser

    for argv in (["zoo", "add", "--zoo", "z", "--command", "c", "runs/a", "runs/b"],
                 ["zoo", "add", "runs/a", "runs/b", "--zoo", "z", "--command", "c"]):
        args = build_parser().parse_args(argv)
        assert (args.action, args.runs, args.zoo, args.command) == ("add", [Path("runs/a"), Path("runs/b")], Path("z"), "c")
    assert build_parser().parse_args(["zoo", "check", "--zoo", "z"]).zoo == Path("z")
    with pytest.raises(SystemExit):  # adding nothing is an argparse error, not an empty success
        build_parser().parse_args(["zoo", "add", "--zoo", "z"])
    assert "required: runs" in capsys.readouterr().err
    assert main(["zoo", "list", "--zoo", str(tmp_path)]) == 0  # an empty zoo lists nothing

"""`robustserve run`, the main job behind `make run`, on learnable synthetic Fashion-MNIST: it trains the
recipes it is given, evaluates every serving mode, writes the results table, and a second run reuses
everything it finished. (Its recipe list, checked before anything is trained: tests/unit/test_run_command.py;
packaging and serving: test_rest.py; the demo: test_demo_server.py and tests/browser.)"""

from __future__ import annotations

import pytest

from serving.cli import main
from training.checkpoint import load_tensors, save_tensors, weights_digest
from training.recipes import RECIPES
from training.run_files import read_defense_json
from training.runs import BEST, LAST, load_run


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_run_trains_evaluates_writes_the_table_and_reuses_finished_runs(learnable_fashion_mnist, tmp_path, capsys,
                                                                       monkeypatch):
    results = tmp_path / "RESULTS.md"
    args = ["run", "--recipes", "natural,pgd_at,aft_dra", "--runs", str(tmp_path / "runs"), "--n", "20",
            "--autoattack-n", "4", "--results", str(results), "--no-serve"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert "== natural: training into" in first and "   default: PGD-20 CW margin: " in first  # each row and its cost
    table = results.read_text()
    assert table.startswith("# Results (quick preset)")
    assert "Made by `robustserve run --preset quick --suite pipeline-check`" in table  # quick's default suite, named
    rows = [line for line in table.splitlines() if line.startswith("| natural ") or line.startswith("| pgd_at ")]
    assert [row.split("|")[1].strip() for row in rows] == ["natural", "pgd_at"]
    for recipe in ("natural", "pgd_at"):
        assert (tmp_path / "runs" / f"{recipe}-quick-fashion_mnist-smallcnn" / "report.json").is_file()

    assert main(args) == 0  # everything finished is reused: no training, no evaluation
    second = capsys.readouterr().out
    assert "== natural: reusing" in second and "== pgd_at: reusing" in second and "== aft_dra: reusing" in second
    assert "training into" not in second and "   default: " not in second  # no row was computed again
    assert results.read_text() == table

    # The preset changed after pgd_at was trained: the finished run is still reused, and a note names the change.
    pgd_at = RECIPES["pgd_at"]
    monkeypatch.setitem(pgd_at.presets, "quick", {**pgd_at.presets["quick"], "select_by": "last"})
    assert main(args) == 0
    third = capsys.readouterr().out
    assert "training into" not in third and "   default: " not in third
    assert third.count("note: it was trained with other") == 1
    assert "== pgd_at: reusing" in third and "note: it was trained with other select_by than the quick preset" in third

    # The preset lengthened natural by a tail after its anneal: the finished run is continued, exactly (the epochs
    # it trained keep their lr), not trained anew; what was kept is kept.
    runs = tmp_path / "runs"
    natural = RECIPES["natural"]
    monkeypatch.setitem(natural.presets, "quick", {**natural.presets["quick"], "epochs": 3, "tail_epochs": 1})
    trained_epochs = read_defense_json(runs / "natural-quick-fashion_mnist-smallcnn")["stages"][0]["history"][:2]
    assert main(args) == 0
    fourth = capsys.readouterr().out
    assert fourth.count("now trains it for longer: continuing it") == 1 and "== pgd_at: reusing" in fourth
    info = read_defense_json(runs / "natural-quick-fashion_mnist-smallcnn")
    assert info["config"]["tail_epochs"] == 1 and info["stages"][0]["history"][:2] == trained_epochs
    assert [epoch["epoch"] for epoch in info["stages"][0]["history"]] == [1, 2, 3]

    # Lengthened again, but without its last epoch's checkpoint (as a zoo entry copied into runs/): it cannot be
    # continued, and it is kept (not trained over from scratch), with a note that says why.
    natural_dir = runs / "natural-quick-fashion_mnist-smallcnn"
    (natural_dir / LAST).unlink()
    served = (natural_dir / BEST).read_bytes()
    monkeypatch.setitem(natural.presets, "quick", {**natural.presets["quick"], "epochs": 4, "tail_epochs": 2})
    assert main(args) == 0
    kept = capsys.readouterr().out
    assert "continuing it" not in kept and "training into" not in kept
    assert f"than the quick preset now gives, and it has no {LAST} to continue from" in kept
    assert (natural_dir / BEST).read_bytes() == served and len(read_defense_json(natural_dir)["stages"][0]["history"]) == 3

    # natural now serves other weights than aft_dra started from (as when it is trained anew): aft_dra is stale
    # and is trained anew, from the weights its base serves now.
    best = runs / "natural-quick-fashion_mnist-smallcnn" / BEST
    tensors, state = load_tensors(best)
    save_tensors(best, {name: tensor * 1.01 if tensor.is_floating_point() else tensor
                        for name, tensor in tensors.items()}, state)
    assert main(args) == 0
    fifth = capsys.readouterr().out
    assert "== aft_dra: training anew into" in fifth and "its base run has changed since it was trained" in fifth
    aft_dra = read_defense_json(runs / "aft_dra-quick-fashion_mnist-smallcnn")
    assert aft_dra["base"]["weights_sha256"] == weights_digest(load_run(runs / "natural-quick-fashion_mnist-smallcnn").model)

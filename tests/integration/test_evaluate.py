"""Evaluation end to end on a tiny run folder built without the training engine's loop.

The run is a SmallCNN trained for a few seconds on an easy synthetic task (class k is a bright
square at a position that depends on k), saved the way the engine saves ``best.safetensors``, with
the engine's own ``defense_info`` schema; the test split is written as real gzipped IDX files.
(Rows that need no run: tests/unit/test_evaluate_rows.py.)
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import write_idx
from safetensors.torch import save_file

from training.attacks import correct_flags
from training.config import TrainConfig
from training.data import load_dataset
from training.environment import device_name
from training.errors import ConfigError
from training.evaluate import (
    BLACK_BOX,
    MASKING_NOTE,
    PIPELINE_CHECK,
    SWEEP_FRACTIONS,
    UNRELIABLE,
    WHITE_BOX,
    decode_flags,
    evaluate_run,
    format_results_table,
    results_header,
    row_flags,
)
from training.recipes import RECIPES, ServingMode, get_recipe
from training.runs import CURVES_PNG, REPORT_JSON, REPORT_MD, ROWS_DIR, defense_info, load_run, load_test_subset

N_TEST = 200
EPS = 0.1
RUN_FILES = {"defense.json", "best.safetensors", REPORT_JSON, REPORT_MD, CURVES_PNG, ROWS_DIR}


def squares(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Class k: a slightly brighter 5x5 square at row 4 + 12 (k // 5), column 1 + 5 (k % 5), with a
    pixel of jitter, on a noisy grey background. Easy to learn, but the contrast (~0.18) is small
    enough for eps = 0.1 to erase the square and fake another: AutoAttack breaks most images with
    its first attack and skips the rest, which keeps it fast. uint8 images, int labels."""
    labels = np.arange(n) % 10
    images = rng.integers(90, 131, (n, 28, 28))
    for i, k in enumerate(labels):
        top, left = 4 + 12 * (k // 5) + rng.integers(-1, 2), 1 + 5 * (k % 5) + rng.integers(0, 2)
        images[i, top:top + 5, left:left + 5] = rng.integers(140, 171, (5, 5))
    return images, labels


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("evaluate")
    source, root, run = tmp / "source", tmp / "data", tmp / "run"
    source.mkdir()
    run.mkdir()
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 20), ("t10k", N_TEST)):
        images, labels = squares(n, rng)
        write_idx(source / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(source / f"{prefix}-labels-idx1-ubyte.gz", labels)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("ROBUSTSERVE_FASHION_MNIST_SOURCE", str(source))
        _, spec = load_dataset("fashion_mnist", "test", root=root)  # decompresses into root

    config = TrainConfig(recipe="natural", preset="quick", dataset="fashion_mnist", arch="smallcnn",
                         data_root=str(root), eps=EPS, epochs=1, device="cpu")
    recipe = get_recipe("natural")
    torch.manual_seed(0)
    model = recipe.build_model(spec, config)
    train_x, train_y = (torch.from_numpy(a) for a in squares(1024, np.random.default_rng(1)))
    train_x = train_x.float().div(255).unsqueeze(1)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    started = time.perf_counter()
    model.train()
    for _ in range(40):  # ~3 s on one core: clean accuracy ~100 %
        batch = torch.randint(0, len(train_y), (32,))
        loss = F.cross_entropy(model(train_x[batch]), train_y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    seconds = time.perf_counter() - started
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(run / "best.safetensors"))
    state = {"stage": 0, "finished": True,
             "stages": [{"name": "natural", "epochs_done": 1, "best_epoch": 1, "best_score": 1.0,
                         "history": [{"epoch": 1, "train_loss": loss.item(), "seconds": seconds}]}]}
    info = defense_info(recipe, config, spec, state, recipe.stages(config), None)
    (run / "defense.json").write_text(json.dumps(info))
    return run


@pytest.fixture(scope="module")
def report(run_dir) -> dict:
    return evaluate_run(run_dir, n=64, autoattack_n=16, pgd_steps=5, pgd_restarts=1, sweep=[0.0, EPS / 2, EPS],
                        sweep_steps=5, device="cpu")


def _row(report: dict, attack: str, mode: str = "default") -> dict:
    (row,) = [r for r in report["results"] if r["attack"] == attack and r["mode"] == mode]
    return row


def test_accuracies_are_consistent(report, run_dir):
    clean, aa = _row(report, "clean"), _row(report, "autoattack")
    pgd = [_row(report, f"pgd-{objective}") for objective in ("ce", "margin", "dlr")]
    assert clean["n"] == 64 and all(row["n"] == 64 for row in pgd) and aa["n"] == 16
    assert clean["accuracy"] >= 0.8  # the model learnt the task, so the attacks have something to break
    for row in [clean, aa, *pgd]:
        # Every figure carries its k, n and Wilson interval, and its per-image flags agree with them.
        assert row["accuracy"] == row["k"] / row["n"] and row["ci95"][0] <= row["accuracy"] <= row["ci95"][1]
        assert int(row_flags(row).sum()) == row["k"]
        assert row["accuracy"] <= clean["accuracy"]
    assert [row["kind"] for row in [clean, aa, *pgd]] == ["clean"] + [WHITE_BOX] * 4
    assert {row["label"] for row in pgd} == {"PGD-5 CE", "PGD-5 CW margin", "PGD-5 DLR"}
    assert aa["label"] == "AutoAttack" and aa["settings"]["attacks"] == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert all(row["eps"] == EPS for row in [aa, *pgd]) and clean["eps"] == 0.0
    assert pgd[0]["settings"]["steps"] == 5 and pgd[0]["settings"]["step_size"] == pytest.approx(2.5 * EPS / 5)
    # AutoAttack ran on the first 16 of the same images: compare with clean accuracy on those.
    run = load_run(run_dir)
    root = run.info["config"]["data_root"]
    x, y, _ = load_test_subset(run.info, 16, root)
    assert torch.equal(x, load_test_subset(run.info, 64, root)[0][:16])  # a smaller subset is a prefix
    assert aa["accuracy"] <= correct_flags(run.model, x, y, 64).float().mean().item()
    assert all(r["seconds"] >= 0 and r["mode"] == "default" for r in report["results"])
    assert report["checks"]["default"] == {"zero_gradient_images": 0, "n": 64}


def test_sweep_and_per_image_worst_case(report):
    sweep = report["sweep"]
    assert [row["eps"] for row in sweep] == [0.0, EPS / 2, EPS]
    assert sweep[0]["accuracy"] == _row(report, "clean")["accuracy"]  # eps 0 leaves the images as they are
    robust = [r for r in report["results"] if r["kind"] == WHITE_BOX]
    worst = report["worst_case"]["default"]
    # Robust only if every attack failed on the image, on the 16 images all of them ran on.
    union = torch.stack([row_flags(r)[:16] for r in robust]).all(0)
    assert worst["n"] == 16 and worst["k"] == int(union.sum()) and torch.equal(decode_flags(worst["correct"], 16), union)
    assert worst["accuracy"] <= min(r["accuracy"] for r in robust if r["n"] == 16)
    assert worst["lowest"]["accuracy"] == min(r["accuracy"] for r in robust) and worst["eps"] == EPS
    assert set(worst["attacks"]) == {r["attack"] for r in robust}
    assert worst["reliability"] == {"unreliable": False, "checks": [], "evidence": []}  # nothing black-box ran


def test_report_files(report, run_dir):
    assert {p.name for p in run_dir.iterdir()} == RUN_FILES  # no temporary files left behind
    assert not [p for p in (run_dir / ROWS_DIR).iterdir() if not p.name.endswith(".json")]
    saved = json.loads((run_dir / REPORT_JSON).read_text())
    assert set(saved) == {"run", "settings", "results", "sweep", "modes", "checks", "worst_case"}
    assert saved["results"] == json.loads(json.dumps(report["results"]))
    assert saved["run"]["defense"] == "natural" and saved["run"]["train_seconds"] > 0
    assert saved["run"]["compared_with"] is None
    assert saved["settings"]["eps"] == EPS and saved["settings"]["n"] == 64 and saved["settings"]["device"] == "cpu"
    assert (run_dir / CURVES_PNG).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = (run_dir / REPORT_MD).read_text()
    assert "| attack | kind | settings | accuracy % [95% CI] n | seconds |" in markdown
    assert "PGD-5 CW margin" in markdown and "| AutoAttack |" in markdown
    assert "**Worst case per image at eps 0.1: " in markdown


def test_results_table(report):
    other = copy.deepcopy(report)
    other["run"]["defense"], other["run"]["compared_with"] = "pgd_at", "natural"
    other["results"] = [r for r in other["results"] if r["attack"] != "autoattack"]
    other["run"]["trained_on"] = ["NVIDIA H200", "cpu (AMD EPYC)"]  # a base trained on a GPU, a stage on a CPU
    lines = format_results_table([report, other]).splitlines()
    assert lines[0].startswith("| defense | mode | clean % | strongest white-box % | AutoAttack % | black-box / transfer % "
                               "| worst case per image % | vs base: clean (points) | vs base: worst case (points) |")
    assert len(lines) == 4 and lines[2].startswith("| natural | default | ")
    clean = _row(report, "clean")
    cells = [cell.strip() for cell in lines[2].split("|")]
    assert cells[3] == f"{100 * clean['accuracy']:.1f} [{100 * clean['ci95'][0]:.1f}, {100 * clean['ci95'][1]:.1f}] n=64"
    assert cells[7].startswith("**") and "n=16" in cells[7] and cells[8] == cells[9] == "-"
    other_cells = [cell.strip() for cell in lines[3].split("|")]
    assert other_cells[5] == "-"  # no AutoAttack row
    # The train time names the devices the epochs ran on; this fixture's hand-made epoch names none.
    assert cells[-2].endswith(" (device not recorded)") and other_cells[-2].endswith(" (NVIDIA H200; cpu (AMD EPYC))")
    # The same images against themselves: a paired difference of zero, and no verdict either way.
    assert other_cells[8] == "natural: +0.0 [" + other_cells[8].split("[")[1] and other_cells[8].endswith(
        "n=64: no detectable difference")
    assert "†" not in "\n".join(lines)

    masked = copy.deepcopy(report)  # an AutoAttack whose checks warned: marked, with the note under the table
    next(r for r in masked["results"] if r["attack"] == "autoattack")["settings"]["check_warnings"] = ["there are 3"]
    lines = format_results_table([masked, other]).splitlines()
    assert lines[2].split("|")[5].strip().endswith("†") and "†" not in lines[3]
    assert lines[-2:] == ["", MASKING_NOTE]


def test_a_reduced_attack_list_is_never_called_autoattack(run_dir, tmp_path):
    copy_dir = tmp_path / "run"
    shutil.copytree(run_dir, copy_dir)
    reduced = evaluate_run(copy_dir, n=16, pgd_steps=2, pgd_restarts=1, objectives=["ce"], autoattack_n=8,
                           autoattack_version="fast", sweep_steps=1, device="cpu")
    assert _row(reduced, "autoattack")["label"] == "APGD-CE + APGD-T"
    assert [row["eps"] for row in reduced["sweep"]] == pytest.approx([f * EPS for f in SWEEP_FRACTIONS])  # default
    written = format_results_table([reduced]) + results_header([reduced]) + (copy_dir / REPORT_MD).read_text()
    assert "AutoAttack" not in written.replace("standard AutoAttack's settings", "")
    assert "APGD-CE + APGD-T %" in format_results_table([reduced])


def test_rows_are_stored_and_not_recomputed(run_dir, tmp_path):
    copy_dir = tmp_path / "run"
    shutil.copytree(run_dir, copy_dir, ignore=shutil.ignore_patterns(ROWS_DIR))
    settings = dict(n=16, pgd_steps=2, pgd_restarts=2, autoattack_n=0, sweep=[EPS], sweep_steps=1, device="cpu", seed=3)
    first = evaluate_run(copy_dir, **settings)
    assert [r["attack"] for r in first["results"]] == ["clean", "pgd-ce", "pgd-margin", "pgd-dlr"]
    assert not any(r["reused"] for r in first["results"] + first["sweep"])
    second = evaluate_run(copy_dir, **settings)  # everything read back: same figures, nothing recomputed
    assert all(r["reused"] for r in second["results"] + second["sweep"])
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("reused", "seconds")} for r in rows]  # noqa: E731
    assert strip(first["results"]) == strip(second["results"]) and strip(first["sweep"]) == strip(second["sweep"])
    # An evaluation interrupted after some rows: the rest is computed, the finished ones are not.
    rows = sorted((copy_dir / ROWS_DIR).iterdir())
    rows[0].unlink()
    third = evaluate_run(copy_dir, **settings)
    assert sum(not r["reused"] for r in third["results"] + third["sweep"]) == 1
    assert strip(third["results"]) == strip(first["results"])
    # More images or other settings are other rows; new weights invalidate every row.
    assert not any(r["reused"] for r in evaluate_run(copy_dir, **{**settings, "n": 20})["results"])
    model = load_run(copy_dir).model
    with torch.no_grad():
        next(model.parameters()).add_(0.01)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(copy_dir / "best.safetensors"))
    assert not any(r["reused"] for r in evaluate_run(copy_dir, **settings)["results"])


def test_each_row_names_the_device_that_measured_it(run_dir, tmp_path):
    # Rows are reused across machines (a zoo assembled on a CPU from rows measured on a GPU): each row says where
    # it was measured, report.md names it beside a stored row's seconds, and the results header counts them.
    copy_dir = tmp_path / "run"
    shutil.copytree(run_dir, copy_dir, ignore=shutil.ignore_patterns(ROWS_DIR))
    settings = dict(n=16, pgd_steps=2, pgd_restarts=1, autoattack_n=0, sweep=[EPS], sweep_steps=1, device="cpu")
    first = evaluate_run(copy_dir, **settings)
    here = device_name(torch.device("cpu"))
    assert {r["measured_on"] for r in first["results"] + first["sweep"]} == {here}
    by_attack = {json.loads(p.read_text())["attack"]: p for p in (copy_dir / ROWS_DIR).iterdir()}
    elsewhere = json.loads(by_attack["pgd-ce"].read_text())
    by_attack["pgd-ce"].write_text(json.dumps({**elsewhere, "measured_on": "NVIDIA H200"}))
    unnamed = json.loads(by_attack["pgd-margin"].read_text())
    del unnamed["measured_on"]  # a row stored before rows named their device
    by_attack["pgd-margin"].write_text(json.dumps(unnamed))
    second = evaluate_run(copy_dir, **settings)
    table = {line.split("|")[1].strip(): line for line in (copy_dir / REPORT_MD).read_text().splitlines()
             if line.startswith("| PGD-")}
    assert table["PGD-2 CE"].endswith("(stored; NVIDIA H200) |")
    assert table["PGD-2 CW margin"].endswith("(stored; device not recorded) |")
    assert table["PGD-2 DLR"].endswith("(stored) |")
    reused = sum(row["reused"] for row in second["results"])
    assert reused >= 3 and f"({reused} of {len(second['results'])} rows read back from eval_rows/)" in (
        copy_dir / REPORT_MD).read_text()  # not "0 s" alone, as if the evaluation had cost nothing
    assert (f"Attack rows measured on: NVIDIA H200: 1 row; a device not recorded (rows stored before rows named it): "
            f"1 row; {here}: 2 rows.") in results_header([second])


def test_wrong_dataset_is_a_clear_error(run_dir, tmp_path):
    copy_dir = tmp_path / "run"
    shutil.copytree(run_dir, copy_dir, ignore=shutil.ignore_patterns("report.*", "curves.png", ROWS_DIR))
    info = json.loads((copy_dir / "defense.json").read_text())
    info["classes"] = [f"class {i}" for i in range(10)]
    (copy_dir / "defense.json").write_text(json.dumps(info))
    with pytest.raises(ConfigError, match="trained on"):
        evaluate_run(copy_dir, n=8, device="cpu")
    assert not (copy_dir / REPORT_JSON).exists()
    with pytest.raises(ConfigError, match="unknown PGD objective"):
        evaluate_run(copy_dir, n=8, objectives=["hinge"], device="cpu")


class Quantised(torch.nn.Module):
    """Pixels rounded to eighths before the network: a gradient of exactly zero everywhere, the
    classic way to look robust to gradient attacks while staying as breakable as before."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(torch.round(x * 8) / 8)


def test_a_gradient_masking_mode_is_flagged_unreliable(run_dir, tmp_path, monkeypatch):
    natural = RECIPES["natural"]

    class MaskedNatural(type(natural)):
        def modes(self, model, run_dir=None):
            return {"default": ServingMode(Quantised(model), "quantised input: masks gradients")}

    monkeypatch.setitem(RECIPES, "natural", MaskedNatural())
    copy_dir = tmp_path / "run"
    shutil.copytree(run_dir, copy_dir, ignore=shutil.ignore_patterns(ROWS_DIR))
    masked = evaluate_run(copy_dir, n=48, pgd_steps=10, pgd_restarts=1, autoattack_n=48, autoattack_version="fast",
                          sweep=[], device="cpu")
    assert masked["checks"]["default"]["zero_gradient_images"] == 48  # our own check sees it, so Square runs
    square = _row(masked, "square")
    assert square["kind"] == BLACK_BOX and square["label"] == "Square"
    white = [r for r in masked["results"] if r["kind"] == WHITE_BOX]
    assert square["accuracy"] < min(r["accuracy"] for r in white)  # the gradient attacks barely moved it
    worst = masked["worst_case"]["default"]
    assert worst["reliability"]["unreliable"] and worst["accuracy"] <= square["accuracy"]
    assert UNRELIABLE in format_results_table([masked]) and UNRELIABLE.capitalize() in (copy_dir / REPORT_MD).read_text()


def test_quick_results_are_labelled_a_pipeline_check(report):
    quick = copy.deepcopy(report)
    quick["run"]["preset"] = "quick"
    assert results_header([quick]).endswith(PIPELINE_CHECK)
    paper = copy.deepcopy(report)
    paper["run"]["preset"] = "standard"
    assert PIPELINE_CHECK not in results_header([paper])

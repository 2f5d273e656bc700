"""Evaluation end to end on a tiny run folder built without the training engine's loop.

The run is a SmallCNN trained for a few seconds on an easy synthetic task (class k is a bright
square at a position that depends on k), saved the way the engine saves ``best.safetensors``, with
the engine's own ``defense_info`` schema; the test split is written as real gzipped IDX files.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from helpers import constant_logits_model, write_idx
from training.attacks import correct_flags
from training.config import TrainConfig
from training.data import load_dataset
from training.engine import defense_info
from training.errors import ConfigError
from training.evaluate import (CURVES_PNG, MASKING_NOTE, REPORT_JSON, REPORT_MD, SWEEP_FRACTIONS, current_report, evaluate_run,
                               format_results_table, load_test_subset)
from training.recipes import get_recipe
from training.runs import load_run

N_TEST = 200
EPS = 0.1
RUN_FILES = {"defense.json", "best.safetensors", REPORT_JSON, REPORT_MD, CURVES_PNG}


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
    return evaluate_run(run_dir, n=64, autoattack_n=16, pgd_steps=5, sweep=[0.0, EPS / 2, EPS], sweep_steps=5,
                        device="cpu")


def _row(report: dict, attack: str) -> dict:
    (row,) = [r for r in report["results"] if r["attack"] == attack]
    return row


def test_accuracies_are_consistent(report, run_dir):
    clean, pgd, aa = (_row(report, a) for a in ("clean", "pgd", "autoattack"))
    assert clean["n"] == pgd["n"] == 64 and aa["n"] == 16
    assert clean["accuracy"] >= 0.8  # the model learnt the task, so the attacks have something to break
    assert clean["accuracy"] >= pgd["accuracy"] >= 0.0
    assert pgd["eps"] == aa["eps"] == EPS and clean["eps"] == 0.0
    assert pgd["settings"]["steps"] == 5 and pgd["settings"]["step_size"] == pytest.approx(2.5 * EPS / 5)
    # AutoAttack ran on the first 16 of the same images: compare with clean accuracy on those.
    run = load_run(run_dir)
    root = run.info["config"]["data_root"]
    x, y, _ = load_test_subset(run.info, 16, root)
    assert torch.equal(x, load_test_subset(run.info, 64, root)[0][:16])  # a smaller subset is a prefix
    assert aa["accuracy"] <= correct_flags(run.model, x, y, 64).float().mean().item()
    assert aa["accuracy"] <= clean["accuracy"]
    assert all(r["seconds"] >= 0 and r["mode"] == "default" for r in report["results"])


def test_sweep_and_worst_case(report):
    sweep = report["sweep"]
    assert [row["eps"] for row in sweep] == [0.0, EPS / 2, EPS]
    assert sweep[0]["accuracy"] == _row(report, "clean")["accuracy"]  # eps 0 leaves the images as they are
    robust = [_row(report, "pgd"), _row(report, "autoattack")]
    worst = report["worst_case"]["default"]
    assert worst["accuracy"] == min(r["accuracy"] for r in robust)
    assert worst["attack"] == min(robust, key=lambda r: r["accuracy"])["attack"] and worst["eps"] == EPS
    assert 0.0 <= worst["per_image"]["accuracy"] <= worst["accuracy"] and worst["per_image"]["n"] == 16


def test_report_files(report, run_dir):
    assert {p.name for p in run_dir.iterdir()} == RUN_FILES  # no temporary files left behind
    saved = json.loads((run_dir / REPORT_JSON).read_text())
    assert set(saved) == {"run", "settings", "results", "sweep", "modes", "worst_case"}
    assert saved["results"] == json.loads(json.dumps(report["results"]))
    assert saved["run"]["defense"] == "natural" and saved["run"]["train_seconds"] > 0
    assert saved["settings"]["eps"] == EPS and saved["settings"]["n"] == 64 and saved["settings"]["device"] == "cpu"
    assert (run_dir / CURVES_PNG).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = (run_dir / REPORT_MD).read_text()
    assert "| measure | attack settings | accuracy % | images | seconds |" in markdown
    assert "PGD-5" in markdown and "AutoAttack" in markdown and "Worst case at eps 0.1" in markdown


def test_results_table(report):
    other = copy.deepcopy(report)
    other["run"]["defense"] = "pgd_at"
    other["results"] = [r for r in other["results"] if r["attack"] != "autoattack"]
    lines = format_results_table([report, other]).splitlines()
    assert lines[0] == ("| defense | mode | arch | clean % | PGD-5 % | AutoAttack % | adaptive % | worst case % | "
                        "train time |")
    assert len(lines) == 4 and lines[2].startswith("| natural | default | smallcnn | ")
    assert f"| {100 * _row(report, 'clean')['accuracy']:.1f} |" in lines[2]
    assert lines[3].split("|")[6].strip() == "-"  # no AutoAttack row
    assert "†" not in "\n".join(lines)

    masked = copy.deepcopy(report)  # an AutoAttack whose checks warned: marked, with the note under the table
    next(r for r in masked["results"] if r["attack"] == "autoattack")["settings"]["check_warnings"] = ["there are 3"]
    lines = format_results_table([masked, other]).splitlines()
    aa = 100 * _row(report, "autoattack")["accuracy"]
    assert lines[2].split("|")[6].strip() == f"{aa:.1f}†" and "†" not in lines[3]
    assert lines[-2:] == ["", MASKING_NOTE]


def test_defaults_skip_autoattack_and_are_reproducible(run_dir, tmp_path):
    copy_dir = tmp_path / "run"
    shutil.copytree(run_dir, copy_dir)
    settings = dict(n=16, pgd_steps=2, autoattack_n=0, sweep_steps=1, device="cpu", seed=3)
    first = evaluate_run(copy_dir, **settings)
    second = evaluate_run(copy_dir, **settings)  # overwrites the reports in place
    assert [r["attack"] for r in first["results"]] == ["clean", "pgd"]
    assert [row["eps"] for row in first["sweep"]] == pytest.approx([f * EPS for f in SWEEP_FRACTIONS])
    assert first["worst_case"]["default"]["attack"] == "pgd" and first["worst_case"]["default"]["per_image"]["n"] == 16
    assert [r["accuracy"] for r in first["results"] + first["sweep"]] == \
           [r["accuracy"] for r in second["results"] + second["sweep"]]
    assert {p.name for p in copy_dir.iterdir()} == RUN_FILES


def test_wrong_dataset_is_a_clear_error(run_dir, tmp_path):
    copy_dir = tmp_path / "run"
    shutil.copytree(run_dir, copy_dir, ignore=shutil.ignore_patterns("report.*", "curves.png"))
    info = json.loads((copy_dir / "defense.json").read_text())
    info["classes"] = [f"class {i}" for i in range(10)]
    (copy_dir / "defense.json").write_text(json.dumps(info))
    with pytest.raises(ConfigError, match="trained on"):
        evaluate_run(copy_dir, n=8, device="cpu")
    assert not (copy_dir / REPORT_JSON).exists()


def test_current_report_is_reused_only_for_the_same_sizes_and_weights(run_dir, tmp_path):
    copy_dir = tmp_path / "run"
    shutil.copytree(run_dir, copy_dir)
    evaluate_run(copy_dir, n=16, pgd_steps=2, autoattack_n=0, sweep=[EPS], sweep_steps=1, device="cpu")
    assert current_report(copy_dir, n=16, autoattack_n=0)["settings"]["n"] == 16
    assert current_report(copy_dir, n=32, autoattack_n=0) is None
    assert current_report(copy_dir, n=16, autoattack_n=8) is None
    weights = copy_dir / "best.safetensors"
    weights.touch()  # newer weights than the report: evaluate again
    os.utime(weights, (weights.stat().st_atime, (copy_dir / REPORT_JSON).stat().st_mtime + 10))
    assert current_report(copy_dir, n=16, autoattack_n=0) is None


def test_autoattack_rows_carry_pyautoattacks_gradient_masking_warnings():
    from training.evaluate import EvalContext, EvalSettings, _adaptive, _autoattack

    settings = EvalSettings(n=6, eps=EPS, norm="linf", pgd_steps=2, pgd_restarts=1, autoattack_n=6,
                            autoattack_version="fast", sweep=(), sweep_steps=2, batch_size=64, device="cpu", seed=0)
    masked = constant_logits_model()
    ctx = EvalContext("default", masked, {"itself": masked}, torch.rand(6, 1, 28, 28),
                      torch.zeros(6, dtype=torch.long), settings)
    (autoattack,) = _autoattack(ctx)
    assert "**pyautoattack's checks warned: zero gradients at up to 6 of 6 images" in autoattack.describe
    assert autoattack.settings["check_warnings"]
    # APGD-CE alone runs no zero-gradient check (pyautoattack checks only its DLR losses): nothing to add.
    apgd = [o for o in _adaptive(ctx) if o.attack == "apgd-ce@itself"][0]
    assert "warned" not in apgd.describe and "check_warnings" not in apgd.settings

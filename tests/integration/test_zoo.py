"""The model zoo (training/zoo.py, model_store/zoo/): an entry is a finished run without optimiser state
or rebuilt artifacts, records what made it, and reproduces its recorded clean accuracy."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from training.checkpoint import load_tensors
from training.dummy_classes import PAIRING_FILE, read_pairing
from training.errors import CheckpointError
from training.run_files import MEMORY_BANK, sha256_file
from training.runs import LAST, REPORT_JSON
from training.zoo import ZOO_JSON, ZOO_ROOT, add_run, check_entry, entries

COMMITTED = Path(__file__).resolve().parents[2] / ZOO_ROOT


@pytest.fixture
def served_data(served_runs, monkeypatch):
    """The synthetic data the served runs were trained on (their fixture's data root)."""
    root = served_runs["pgd_at"].parent.parent
    monkeypatch.setenv("ROBUSTSERVE_FASHION_MNIST_SOURCE", str(root / "fmnist-source"))
    monkeypatch.setenv("ROBUSTSERVE_DATA", str(root / "data"))
    return root


@pytest.mark.usefixtures("served_data")
def test_an_entry_is_the_run_without_training_state_and_reproduces_its_record(served_runs, tmp_path):
    zoo = tmp_path / "zoo"
    that = add_run(served_runs["that"], zoo, command="robustserve run --preset standard")
    pgd_at = add_run(served_runs["pgd_at"], zoo, command="robustserve run --preset standard")
    assert entries(zoo) == {"that": that, "pgd_at": pgd_at}
    names = {p.name for p in that.iterdir()}
    assert LAST not in names and MEMORY_BANK not in names and REPORT_JSON in names  # no optimiser state, no bank
    record = json.loads((that / ZOO_JSON).read_text())
    assert record["command"] == "robustserve run --preset standard" and record["code_version"]
    assert set(record["clean_accuracy"]) == {"classifier", "knn"}
    assert all(figures["n"] > 0 and 0 <= figures["k"] <= figures["n"] for figures in record["clean_accuracy"].values())

    pairs = check_entry(that)  # rebuilds the memory bank from the training set, as packaging does
    assert all(recorded == measured for recorded, measured in pairs.values())
    assert sha256_file(that / MEMORY_BANK) == sha256_file(served_runs["that"] / MEMORY_BANK)  # deterministic

    replaced = add_run(served_runs["pgd_at"], zoo, command="robustserve run --preset standard, continued")
    assert replaced == pgd_at and json.loads((pgd_at / ZOO_JSON).read_text())["command"].endswith("continued")
    assert sorted(p.name for p in zoo.iterdir()) == sorted([that.name, pgd_at.name])  # nothing left aside

    (pgd_at / "report.md").write_text("edited\n")
    with pytest.raises(CheckpointError, match="report.md does not match"):
        check_entry(pgd_at)


def test_only_finished_evaluated_runs_go_into_the_zoo(served_runs, tmp_path):
    unevaluated = tmp_path / "run"
    shutil.copytree(served_runs["pgd_at"], unevaluated)
    (unevaluated / REPORT_JSON).unlink()
    with pytest.raises(CheckpointError, match="evaluate it first"):
        add_run(unevaluated, tmp_path / "zoo", command="x")
    assert not (tmp_path / "zoo" / "run").exists()


@pytest.mark.usefixtures("served_data")
def test_evaluating_a_run_copied_without_its_memory_bank_rebuilds_it_and_keeps_the_knn_mode(served_runs, tmp_path):
    """A THAT run copied without its bank (a zoo entry, a run trained on another machine) once lost its kNN mode
    from the report without a word."""
    from training.evaluate import evaluate_run

    copied = tmp_path / "that"
    shutil.copytree(served_runs["that"], copied, ignore=shutil.ignore_patterns(MEMORY_BANK, "eval_rows"))
    report = evaluate_run(copied, n=10, autoattack_n=0, pgd_steps=1, pgd_restarts=1, objectives=["ce"], sweep=[],
                          device="cpu")
    assert {row["mode"] for row in report["results"]} == {"classifier", "knn"}
    assert sha256_file(copied / MEMORY_BANK) == sha256_file(served_runs["that"] / MEMORY_BANK)


@pytest.mark.usefixtures("served_data")
def test_a_memory_bank_made_from_other_weights_is_rebuilt_before_use(served_runs, tmp_path):
    """The bank is ignored by git: a zoo entry whose weights a pull replaced kept the older weights' bank, and
    checking, evaluating and packaging it used that bank (THAT's kNN mode at 65.0% where its weights give 79.5%)."""
    from training.knn import MemoryBank
    from training.runs import restore_artifacts

    copied = tmp_path / "that"
    shutil.copytree(served_runs["that"], copied, ignore=shutil.ignore_patterns("eval_rows"))
    fresh = sha256_file(copied / MEMORY_BANK)
    bank = MemoryBank.load(copied / MEMORY_BANK)
    stale = MemoryBank(bank.features.flip(0), bank.labels, bank.ids, bank.num_classes)
    stale.save(copied / MEMORY_BANK, built_from="0" * 64)  # built from weights this folder no longer holds
    assert {"classifier", "knn"} == set(restore_artifacts(copied).modes())
    assert sha256_file(copied / MEMORY_BANK) == fresh


@pytest.mark.parametrize("entry", sorted(entries(COMMITTED).values()) if COMMITTED.is_dir() else [],
                         ids=lambda path: path.name)
def test_each_committed_zoo_model_has_its_recorded_clean_accuracy(entry):
    """Every mode of every committed model, on the whole Fashion-MNIST test set, against its zoo.json."""
    for mode, (recorded, measured) in check_entry(entry).items():
        assert measured == pytest.approx(recorded, abs=3), mode


def test_the_zoo_ducats_pairing_can_be_read_off_its_weights():
    """SECURITY.md's warning, measured: each dummy row of the classifier starts as a copy of its real row, and after
    training the most similar one (cosine of the weight rows) still names the pairing. The secret pairing is only as
    secret as the weights."""
    entry = COMMITTED / "ducat-standard-fashion_mnist-smallcnn"
    tensors, _ = load_tensors(entry / "best.safetensors")
    rows = torch.nn.functional.normalize(tensors["classifier.weight"].float(), dim=1)
    pairing = read_pairing(entry / PAIRING_FILE)
    classes = pairing.num_classes
    read_off = (rows[:classes] @ rows[classes:].T).argmax(1) + classes
    assert read_off.tolist() == list(pairing.dummy_of)

"""The reproduction table (training/reproduction.py) on hand-made reports: each verdict from known flags."""

from __future__ import annotations

import torch

from training.evaluate import encode_flags
from training.recipes import Claim
from training.reproduction import FAILS, HOLDS, MISSING, UNDECIDED, format_reproduction_table, measure_claim
from training.stats import proportion


def _figure(flags: list[bool]) -> dict:
    return {**proportion(flags).to_json(), "correct": encode_flags(torch.tensor(flags))}


def _report(defense: str, mode: str, clean: list[bool], worst: list[bool]) -> dict:
    return {"run": {"defense": defense}, "modes": {mode: {}},
            "results": [{"mode": mode, "attack": "clean", **_figure(clean)}], "worst_case": {mode: _figure(worst)}}


N = 400
SAME = [i % 2 == 0 for i in range(N)]
MORE = [i % 2 == 0 or i % 5 == 1 for i in range(N)]  # SAME plus 80 more images, never fewer
FEWER = [i % 2 == 0 and i % 10 != 0 for i in range(N)]  # SAME less 40


def test_better_claims_hold_fail_or_stay_undecided_by_the_paired_test():
    better = Claim("x", "both", "base", "worst_case")
    reports = {"base": _report("base", "default", SAME, SAME)}
    for ours, verdict in ((MORE, HOLDS), (FEWER, FAILS), (SAME, UNDECIDED)):
        reports["d"] = _report("d", "both", SAME, ours)
        assert measure_claim(better, "d", reports).verdict == verdict


def test_no_worse_claims_need_the_whole_interval_above_the_margin():
    no_worse = Claim("x", "both", ":main", "clean", expect="no worse", margin=0.01)
    report = _report("d", "both", SAME, SAME)
    report["modes"]["main"] = {}
    report["results"].append({"mode": "main", "attack": "clean", **_figure(SAME)})
    measured = measure_claim(no_worse, "d", {"d": report})
    assert measured.difference.low == 0 and measured.verdict == HOLDS  # identical results: the interval is [0, 0]
    report["results"][-1] = {"mode": "main", "attack": "clean", **_figure(MORE)}
    assert measure_claim(no_worse, "d", {"d": report}).verdict == FAILS


def test_a_claim_whose_run_is_missing_is_not_measured_and_the_table_says_so():
    claim = Claim("x", "both", "absent", "clean")
    assert measure_claim(claim, "d", {"d": _report("d", "both", SAME, SAME)}).verdict == MISSING
    table = format_reproduction_table([_report("dhat", "both", SAME, SAME)])  # DH-AT's claims compare its own modes
    assert "| dhat both |" in table and f"**{MISSING}**" in table  # its report here has no `main` mode


def test_the_runs_claims_compare_with_are_named_for_the_pipeline():
    from training.reproduction import compared_recipes

    assert compared_recipes(["pgd_at", "ducat"]) == ["pgd_at_ft"]  # DUCAT's matched-budget control; pgd_at is asked for
    assert compared_recipes(["ducat"]) == ["pgd_at", "pgd_at_ft"]
    assert compared_recipes(["dhat"]) == ["trades_ft"]  # its main network is its own `main` mode; its control is not
    assert compared_recipes(["natural"]) == []

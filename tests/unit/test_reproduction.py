"""The reproduction table (training/reproduction.py) on hand-made reports: each verdict from known flags."""

from __future__ import annotations

import torch

from training.evaluate import encode_flags
from training.recipes import Claim
from training.reproduction import (
    ALL_IMAGES_WORST_CASE,
    FAILS,
    HOLDS,
    MISSING,
    UNDECIDED,
    format_reproduction_table,
    measure_claim,
    measure_claims,
)
from training.stats import proportion


def _figure(flags: list[bool]) -> dict:
    return {**proportion(flags).to_json(), "correct": encode_flags(torch.tensor(flags))}


def _report(defense: str, mode: str, clean: list[bool], worst: list[bool]) -> dict:
    return {"run": {"defense": defense}, "modes": {mode: {}}, "settings": {"eps": 0.1},
            "results": [{"mode": mode, "attack": "clean", "kind": "clean", "eps": 0.0, **_figure(clean)}],
            "worst_case": {mode: _figure(worst)}}


def _attack_row(mode: str, attack: str, flags: list[bool], eps: float = 0.1) -> dict:
    return {"mode": mode, "attack": attack, "label": attack, "kind": "white-box", "eps": eps, **_figure(flags)}


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


def test_a_worst_case_claim_is_measured_again_over_the_attacks_on_every_image():
    # The strongest attack ran on the first 100 images only: the worst case there cannot tell the runs apart, but the
    # per-image worst case over the two attacks that ran on all 400 images can. A sweep row at another eps is left out.
    base = _report("pgd_at", "default", SAME, SAME[:100])
    ours = _report("act", "default", SAME, [False] + SAME[1:100])  # one image fewer: ACT's "no worse" is undecided
    base["results"] += [_attack_row("default", "pgd-ce", FEWER), _attack_row("default", "pgd-dlr", SAME),
                        _attack_row("default", "apgd", FEWER[:100]), _attack_row("default", "pgd-ce", [False] * N, 0.3)]
    ours["results"] += [_attack_row("default", "pgd-ce", SAME), _attack_row("default", "pgd-dlr", MORE)]
    measured = {(m.claim.text, m.claim.metric): m for m in measure_claims([base, ours])
                if m.claim.against == "pgd_at" and m.claim.metric != "clean"}
    strongest, every_image = [m for (_, metric), m in measured.items() if metric == "worst_case"], \
        [m for (_, metric), m in measured.items() if metric == ALL_IMAGES_WORST_CASE]
    assert len(strongest) == len(every_image) == 1  # ACT's one worst-case claim against PGD-AT, and its second row
    assert strongest[0].difference.n == 100 and strongest[0].verdict == UNDECIDED
    assert every_image[0].theirs["k"] == sum(FEWER) and every_image[0].ours["k"] == sum(SAME)  # per image: min over rows
    assert every_image[0].difference.n == N and every_image[0].verdict == HOLDS
    assert f"... the same ({ALL_IMAGES_WORST_CASE})" in format_reproduction_table([base, ours])

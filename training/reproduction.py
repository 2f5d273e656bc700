"""The reproduction table: each paper's central claims (``Recipe.claims``), measured on our evaluation reports.

A claim compares one serving mode of a defense's run with another run or mode, on the same test images: the
paired difference of their per-image results (clean, the worst case over every attack, or one attack row),
with its 95% Newcombe interval and the exact McNemar test (``training.stats``). Its verdict:

* ``better`` expected: **holds** when the difference is called better, **does not hold** when it is called
  worse, else **no detectable difference**;
* ``no worse`` expected (within ``margin``): **holds** when the whole interval lies above ``-margin``, **does
  not hold** when the difference is called worse, else **no detectable difference**.

A worst-case claim is measured twice: over every attack (the strongest ones, APGD-CE + APGD-T, run on a prefix
of the images: 100 in the reduced suite, too few to separate a few points), and over the attacks run on every
image (``ALL_IMAGES_WORST_CASE``: PGD on 1,000, weaker but ten times the images). The second never replaces the
first; it says whether a difference the first cannot resolve shows against the weaker attacks.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .evaluate import decode_flags, primary_mode, worst_case
from .recipes import RECIPES, Claim
from .stats import PairedDifference, format_difference, format_proportion, paired_difference

# A worst case per image over only the attacks that ran on every image the clean row has (not APGD's prefix).
ALL_IMAGES_WORST_CASE = "worst case over the attacks on every image"

HOLDS, FAILS, UNDECIDED, MISSING = "holds", "does not hold", "no detectable difference", "not measured"
REPRODUCTION_NOTE = ("Each paper's central claims, restated for this setting (Fashion-MNIST, SmallCNN, Linf eps 0.1) and "
                     "measured on the same test images: figures in % with their 95% Wilson interval and n, the paired "
                     "difference in points with its 95% Newcombe interval. *Holds* when the difference is called in the "
                     "claimed direction (interval and exact McNemar test agree), *does not hold* when it is called the "
                     "other way, and *no worse* claims hold when the whole interval stays above -1 point. A worst-case "
                     "claim has a second row, *worst case over the attacks on every image*: the per-image worst case over the "
                     "attacks that ran on all the clean row's images (PGD; APGD-CE + APGD-T runs on fewer), weaker "
                     "attacks on more images, which can show a difference the first row's n cannot.")


@dataclass(frozen=True)
class Measured:
    claim: Claim
    defense: str
    ours: dict[str, Any] | None  # the figure (a row or a worst case) of each side
    theirs: dict[str, Any] | None
    theirs_label: str
    difference: PairedDifference | None

    @property
    def verdict(self) -> str:
        if self.difference is None:
            return MISSING
        called = self.difference.verdict
        if called == "worse":
            return FAILS
        if self.claim.expect == "better":
            return HOLDS if called == "better" else UNDECIDED
        return HOLDS if self.difference.low > -self.claim.margin else UNDECIDED


def _figure(report: dict[str, Any], mode: str, metric: str) -> dict[str, Any] | None:
    if mode not in report["modes"]:
        return None
    if metric == "worst_case":
        return report["worst_case"].get(mode)
    if metric == ALL_IMAGES_WORST_CASE:
        return _all_images_worst_case(report, mode)
    return next((r for r in report["results"] if r["mode"] == mode and r["attack"] == metric), None)


def _all_images_worst_case(report: dict[str, Any], mode: str) -> dict[str, Any] | None:
    clean = next((r for r in report["results"] if r["mode"] == mode and r["attack"] == "clean"), None)
    if clean is None:
        return None
    return worst_case([r for r in report["results"] if r["n"] == clean["n"]], mode, report["settings"]["eps"])


def measure_claim(claim: Claim, defense: str, reports: Mapping[str, dict[str, Any]]) -> Measured:
    """``claim`` of ``defense`` on the reports by defense id (missing runs or rows give a ``not measured``)."""
    recipe, _, mode = claim.against.partition(":")
    other = reports.get(recipe or defense)
    ours_report = reports.get(defense)
    if other is not None and not mode:
        mode = primary_mode(other)
    label = f"{recipe or defense} {mode}".strip()
    ours = None if ours_report is None else _figure(ours_report, claim.mode, claim.metric)
    theirs = None if other is None else _figure(other, mode, claim.against_metric or claim.metric)
    difference = None
    if ours is not None and theirs is not None:
        a, b = decode_flags(ours["correct"], ours["n"]), decode_flags(theirs["correct"], theirs["n"])
        common = min(a.numel(), b.numel())  # every subset is a prefix of one permutation: images line up
        difference = paired_difference(a[:common].tolist(), b[:common].tolist())
    return Measured(claim, defense, ours, theirs, label, difference)


def measure_claims(reports: Sequence[dict[str, Any]]) -> list[Measured]:
    """Every registered recipe's claims whose run is among ``reports``."""
    by_defense = {report["run"]["defense"]: report for report in reports}
    return [measure_claim(variant, recipe.id, by_defense) for recipe in RECIPES.values() if recipe.id in by_defense
            for claim in recipe.claims for variant in _with_all_images_worst_case(claim)]


def _with_all_images_worst_case(claim: Claim) -> list[Claim]:
    """``claim``, and after a worst-case one the same claim over the attacks run on every image."""
    if claim.metric != "worst_case" or claim.against_metric is not None:
        return [claim]
    return [claim, dataclasses.replace(claim, text="... the same", metric=ALL_IMAGES_WORST_CASE)]


def compared_recipes(recipe_ids: Sequence[str]) -> list[str]:
    """The recipes that the claims of ``recipe_ids`` compare with and that are not among them (DUCAT's
    matched-budget control ``pgd_at_ft``): the runs a reproduction table needs besides the ones asked for."""
    needed = [claim.against.partition(":")[0] for recipe_id in recipe_ids for claim in RECIPES[recipe_id].claims]
    return list(dict.fromkeys(r for r in needed if r and r not in recipe_ids))


def _cell(figure: dict[str, Any] | None) -> str:
    return "-" if figure is None else format_proportion(figure["accuracy"], *figure["ci95"], figure["n"])


def format_reproduction_table(reports: Sequence[dict[str, Any]]) -> str:
    """RESULTS.md's reproduction table: one row per claim, its two figures, the paired difference and the verdict."""
    lines = ["| defense | claim (restated for this setting) | ours | against | theirs | paired difference | verdict |",
             "|---|---|---|---|---|---|---|"]
    for m in measure_claims(reports):
        metric = m.claim.metric if m.claim.against_metric is None else f"{m.claim.metric} vs {m.claim.against_metric}"
        difference = "-" if m.difference is None else format_difference(m.difference, with_verdict=False)
        lines.append(f"| {m.defense} {m.claim.mode} | {m.claim.text} ({metric}) | {_cell(m.ours)} | {m.theirs_label} | "
                     f"{_cell(m.theirs)} | {difference} | **{m.verdict}** |")
    return "\n".join(lines) + "\n"

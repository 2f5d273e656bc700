"""Honest evaluation of a finished run: clean, PGD-k, AutoAttack and an eps sweep.

``evaluate_run`` loads a run's best weights and a fixed subset of its dataset's test split, runs
every measure in ``MEASURES`` and writes three files into the run folder, each atomically
(temporary file + rename, ``checkpoint.atomic_write``), ``report.json`` last so that its presence
means the evaluation finished:

* ``report.json``: ``{"run", "settings", "results", "sweep", "worst_case"}`` (schema below),
* ``report.md``: the same as a readable table,
* ``curves.png``: accuracy against eps from the sweep, with the attacks at the nominal eps marked.

The test subset is the first ``n`` indices of ``torch.randperm(len(test set))`` under the fixed
seed ``SUBSET_SEED`` (0), whatever the attack ``seed``: every run of a dataset is evaluated on the
same images, and a smaller ``n`` (or ``autoattack_n``) is a prefix of a larger one, so per-image
results of different measures line up.

Every serving mode of the defense (``Recipe.modes``) is evaluated: clean, PGD-k and AutoAttack on
the mode itself, plus PGD-k and APGD-CE crafted on each of the mode's attack surfaces (the adaptive
attacks that see its inference-time step: DUCAT's merged class scores, each DH-AT head, THAT's
classifier head and soft kNN vote) and judged by the mode. Each row of ``results`` is ``{"mode",
"attack", "label", "eps", "accuracy", "n", "seconds", "robust", "describe", "settings"}``
(``robust``: counts towards the mode's ``worst_case``); ``worst_case`` maps each mode to its lowest
robust accuracy and the attack that reached it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import nn

from .attacks.attacks import PGD, AutoAttackStandard, correct_flags, summarize_check_warnings
from .checkpoint import BEST, atomic_write, write_json
from .data import load_dataset
from .errors import ConfigError
from .runs import load_run

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
CURVES_PNG = "curves.png"
SUBSET_SEED = 0
# pyautoattack's versions and the attacks each runs (for the report; pyautoattack picks them).
AUTOATTACK_VERSIONS = {
    "standard": "APGD-CE, APGD-T, FAB-T, Square",
    "plus": "APGD-CE, APGD-DLR, FAB, Square, APGD-T, FAB-T",
    "rand": "APGD-CE, APGD-DLR with EOT",
    # The two attacks that decide AutoAttack's number in practice: on the quick baselines FAB-T and
    # Square (~85% of standard AA's time on CPU) did not change one prediction (session notes in
    # RESULTS.md). `robustserve eval` defaults to standard; `robustserve run` uses this on 2 cores.
    # Both run with the standard version's settings (1 restart, 9 target classes).
    "fast": "APGD-CE, APGD-T",
}
CUSTOM_VERSIONS = {"fast"}  # run as pyautoattack's version="custom" with the listed attacks
SWEEP_FRACTIONS = (0.0, 0.5, 1.0, 1.5, 2.0)  # default sweep, in units of the nominal eps


@dataclass(frozen=True)
class EvalSettings:
    """The knobs of one evaluation (``evaluate_run``'s keyword arguments after defaults are resolved)."""

    n: int
    eps: float
    norm: str
    pgd_steps: int
    pgd_restarts: int
    autoattack_n: int
    autoattack_version: str
    sweep: tuple[float, ...]
    sweep_steps: int
    batch_size: int
    device: str
    seed: int


@dataclass
class EvalContext:
    """What a measure sees: one serving mode and the evaluation images."""

    mode: str
    model: nn.Module  # the mode's module: its argmax is the served prediction, and it judges every attack
    surfaces: dict[str, nn.Module]  # the mode's adaptive attack surfaces (see recipes.ServingMode)
    x: torch.Tensor  # the test subset, pixels in [0, 1], on the CPU (attacks move batches)
    y: torch.Tensor
    settings: EvalSettings


@dataclass
class Outcome:
    """One attack's result: which images it left correctly classified, and how it was configured."""

    attack: str  # the "attack" field of a result row: "pgd", "autoattack", "pgd@merged", ...
    correct: torch.Tensor  # bool, one per attacked image (a prefix of the subset)
    eps: float
    label: str  # short name for tables: "clean", "PGD-20", "AutoAttack", "APGD-CE via merged"
    describe: str  # the attack settings in words, for report.md
    settings: dict[str, Any]


@dataclass(frozen=True)
class Measure:
    robust: bool  # attacks at the nominal eps: they count towards the worst case
    run: Callable[[EvalContext], list[Outcome]]  # empty: not applicable with these settings


def _pgd_outcome(ctx: EvalContext, eps: float, steps: int, restarts: int, surface: str | None = None) -> Outcome:
    """PGD-``steps`` with Madry's random start and step 2.5 eps / steps (``PGD``'s default),
    crafted on the mode itself or on one of its attack surfaces, judged by the mode."""
    s = ctx.settings
    # Re-seed per call: each measure's random starts do not depend on which measures ran before.
    torch.manual_seed(s.seed)
    attack = PGD(ctx.surfaces[surface] if surface else ctx.model, eps=eps, steps=steps, norm=s.norm,
                 restarts=restarts, batch_size=s.batch_size)
    x_adv = attack(ctx.x, ctx.y) if eps > 0 else ctx.x  # eps 0 leaves nothing to attack
    correct = correct_flags(ctx.model, x_adv, ctx.y, s.batch_size)
    settings = {"norm": s.norm, "steps": steps, "step_size": attack.step_size, "restarts": restarts,
                "objective": "ce", "random_start": True, "surface": surface}
    describe = (f"{s.norm.capitalize()} eps {eps:g}, {steps} steps of {attack.step_size:.4g}, "
                f"{restarts} restart{'s' if restarts != 1 else ''}, CE"
                + (f", crafted on `{surface}`" if surface else ""))
    label = f"PGD-{steps}" + (f" via {surface}" if surface else "")
    return Outcome("pgd" + (f"@{surface}" if surface else ""), correct, eps, label, describe, settings)


def _clean(ctx: EvalContext) -> list[Outcome]:
    return [Outcome("clean", correct_flags(ctx.model, ctx.x, ctx.y, ctx.settings.batch_size), 0.0, "clean", "-", {})]


def _pgd(ctx: EvalContext) -> list[Outcome]:
    s = ctx.settings
    return [_pgd_outcome(ctx, s.eps, s.pgd_steps, s.pgd_restarts)]


def _autoattack(ctx: EvalContext) -> list[Outcome]:
    s = ctx.settings
    if s.autoattack_n == 0:
        return []
    x, y = ctx.x[:s.autoattack_n], ctx.y[:s.autoattack_n]
    attacks = AUTOATTACK_VERSIONS[s.autoattack_version]
    custom = [a.strip().lower() for a in attacks.split(",")] if s.autoattack_version in CUSTOM_VERSIONS else None
    attack = AutoAttackStandard(ctx.model, eps=s.eps, norm=s.norm, seed=s.seed, version=s.autoattack_version,
                                attacks=custom, batch_size=s.batch_size)
    correct = correct_flags(ctx.model, attack(x, y), y, s.batch_size)
    settings = {"norm": s.norm, "version": s.autoattack_version, "attacks": attacks, "seed": s.seed}
    describe = f"{s.autoattack_version} ({attacks}), {s.norm.capitalize()} eps {s.eps:g}, seed {s.seed}"
    return [_with_check_warnings(Outcome("autoattack", correct, s.eps, "AutoAttack", describe, settings), attack)]


def _with_check_warnings(outcome: Outcome, attack: AutoAttackStandard) -> Outcome:
    """Add what pyautoattack's own checks warned about to the outcome's description and settings."""
    summary = summarize_check_warnings(attack.check_warnings, len(outcome.correct))
    if summary:
        outcome.describe += f"; **{summary}**"
        outcome.settings["check_warnings"] = sorted(set(attack.check_warnings))
    return outcome


def _adaptive(ctx: EvalContext) -> list[Outcome]:
    """PGD (on ``n`` images) and APGD-CE (on ``autoattack_n``) through each attack surface of the mode."""
    s = ctx.settings
    outcomes = []
    for surface, module in ctx.surfaces.items():
        outcomes.append(_pgd_outcome(ctx, s.eps, s.pgd_steps, s.pgd_restarts, surface))
        if s.autoattack_n == 0:
            continue
        x, y = ctx.x[:s.autoattack_n], ctx.y[:s.autoattack_n]
        apgd = AutoAttackStandard(module, eps=s.eps, norm=s.norm, seed=s.seed, attacks=["apgd-ce"],
                                  batch_size=s.batch_size)
        correct = correct_flags(ctx.model, apgd(x, y), y, s.batch_size)
        outcomes.append(_with_check_warnings(
            Outcome(f"apgd-ce@{surface}", correct, s.eps, f"APGD-CE via {surface}",
                    f"pyautoattack APGD-CE (100 iterations), {s.norm.capitalize()} eps {s.eps:g}, crafted on "
                    f"`{surface}`", {"norm": s.norm, "surface": surface, "seed": s.seed}), apgd))
    return outcomes


# The measures, in report order.
MEASURES: list[Measure] = [
    Measure(robust=False, run=_clean),
    Measure(robust=True, run=_pgd),
    Measure(robust=True, run=_autoattack),
    Measure(robust=True, run=_adaptive),
]


def _timed(fn: Callable[..., Any], *args: Any) -> tuple[Any, float]:
    started = time.perf_counter()
    value = fn(*args)
    return value, time.perf_counter() - started


def _accuracy(correct: torch.Tensor) -> float:
    return correct.float().mean().item() if correct.numel() else 0.0


def load_test_subset(info: dict[str, Any], n: int, data_root: str | None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The first ``n`` images of the fixed permutation of the run's test split: ``(x, y, test size)``."""
    dataset, spec = load_dataset(info["dataset"], "test", root=data_root)
    # Evaluating on data the model was not built for would give a silently meaningless number.
    if list(spec.class_names) != list(info["classes"]) or list(spec.input_shape) != list(info["input_shape"]):
        raise ConfigError(f"the {info['dataset']} test set in {data_root or 'the default data root'} has classes "
                         f"{list(spec.class_names)} and shape {list(spec.input_shape)}, but the run was trained on "
                         f"{info['classes']} and {info['input_shape']}")
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(SUBSET_SEED))[:n]
    items = [dataset[int(i)] for i in order]
    x = torch.stack([image for image, _ in items]) if items else torch.zeros(0, *spec.input_shape)
    return x, torch.tensor([label for _, label in items], dtype=torch.int64), len(dataset)


def train_seconds(info: dict[str, Any]) -> float:
    """Total training time of a run: the epochs' ``seconds`` over all stages of ``defense.json``."""
    return float(sum(epoch.get("seconds", 0.0) for stage in info.get("stages", [])
                     for epoch in stage.get("history", [])))


def worst_case(results: Sequence[dict[str, Any]], eps: float, flags: dict[int, torch.Tensor],
               mode: str) -> dict[str, Any] | None:
    """The lowest robust accuracy at the nominal ``eps`` in ``mode`` and the attack that reached it.

    ``per_image`` is stricter: an image counts only if it survives every attack, on the images that
    every attack ran on (``flags`` maps a result's index to its per-image flags).
    """
    robust = [i for i, row in enumerate(results) if row["robust"] and row["mode"] == mode and row["eps"] == eps]
    if not robust:
        return None
    worst = min(robust, key=lambda i: results[i]["accuracy"])
    common = min(flags[i].numel() for i in robust)
    survived = torch.stack([flags[i][:common] for i in robust]).all(0)
    return {"mode": mode, "eps": eps, "attack": results[worst]["attack"], "label": results[worst]["label"],
            "accuracy": results[worst]["accuracy"], "n": results[worst]["n"],
            "per_image": {"accuracy": _accuracy(survived), "n": common,
                          "attacks": [results[i]["attack"] for i in robust]}}


def evaluate_run(
    run_dir: str | Path,
    *,
    n: int = 1000,
    pgd_steps: int = 20,
    pgd_restarts: int = 1,
    eps: float | None = None,
    autoattack_n: int | None = None,
    autoattack_version: str = "standard",
    sweep: list[float] | None = None,
    sweep_steps: int = 10,
    batch_size: int = 256,
    device: str | None = None,
    seed: int = 0,
    data_root: str | None = None,
) -> dict[str, Any]:
    """Evaluate the run in ``run_dir`` (best weights) and write ``report.json``, ``report.md`` and
    ``curves.png`` into it. Returns the report.

    ``eps`` defaults to the run's threat-model eps; ``autoattack_n`` to ``n`` (0 skips AutoAttack);
    ``sweep`` to (0, 1/2, 1, 3/2, 2) x eps; ``data_root`` to the one the run trained with.
    """
    if autoattack_version not in AUTOATTACK_VERSIONS:
        raise ConfigError(f"unknown AutoAttack version {autoattack_version!r}; known: {', '.join(AUTOATTACK_VERSIONS)}")
    if n < 1 or pgd_steps < 1 or pgd_restarts < 1 or sweep_steps < 1 or batch_size < 1:
        raise ConfigError("n, pgd_steps, pgd_restarts, sweep_steps and batch_size must all be >= 1")
    started = time.perf_counter()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    run = load_run(run_dir, which="best", device=device)
    info = run.info
    threat = info.get("threat_model", {})
    eps = float(threat["eps"] if eps is None else eps)
    if eps < 0 or any(e < 0 for e in sweep or ()):
        raise ConfigError("eps must be >= 0")
    data_root = data_root if data_root is not None else info["config"].get("data_root")
    x, y, test_size = load_test_subset(info, n, data_root)
    n_requested, n = n, x.shape[0]  # fewer when the test set is smaller than asked
    sweep_eps = sweep if sweep is not None else [fraction * eps for fraction in SWEEP_FRACTIONS]
    settings = EvalSettings(
        n=n, eps=eps, norm=threat.get("norm", "linf"), pgd_steps=pgd_steps, pgd_restarts=pgd_restarts,
        autoattack_n=n if autoattack_n is None else max(0, min(autoattack_n, n)),
        autoattack_version=autoattack_version,
        sweep=tuple(sorted(float(e) for e in sweep_eps)),
        sweep_steps=sweep_steps, batch_size=batch_size, device=str(device), seed=seed,
    )

    results: list[dict[str, Any]] = []
    flags: dict[int, torch.Tensor] = {}
    sweep_rows: list[dict[str, Any]] = []
    modes = run.modes()
    for mode, serving_mode in modes.items():
        ctx = EvalContext(mode, serving_mode.module, serving_mode.attack_surfaces, x, y, settings)
        for measure in MEASURES:
            outcomes, seconds = _timed(measure.run, ctx)
            for outcome in outcomes:
                flags[len(results)] = outcome.correct
                results.append({"mode": mode, "attack": outcome.attack, "label": outcome.label, "eps": outcome.eps,
                                "robust": measure.robust, "accuracy": _accuracy(outcome.correct),
                                "n": int(outcome.correct.numel()), "seconds": seconds / len(outcomes),
                                "describe": outcome.describe, "settings": outcome.settings})
        if mode == next(iter(modes)):  # the sweep is for the first (primary) mode
            for point in settings.sweep:
                outcome, seconds = _timed(_pgd_outcome, ctx, point, sweep_steps, 1)
                sweep_rows.append({"mode": mode, "eps": point, "accuracy": _accuracy(outcome.correct),
                                   "n": n, "steps": sweep_steps, "seconds": seconds})

    report = {
        "run": {"run_dir": str(run.run_dir), "defense": info["defense"], "architecture": info["architecture"],
                "dataset": info["dataset"], "preset": info.get("preset"), "training_seed": info.get("seed"),
                "threat_model": threat, "weights": "best", "code_version": info.get("code_version"),
                "train_seconds": train_seconds(info)},
        "settings": {**asdict(settings), "sweep": list(settings.sweep), "n_requested": n_requested,
                     "test_size": test_size, "data_root": data_root,
                     "subset": f"first {n} of torch.randperm({test_size}) seeded {SUBSET_SEED}",
                     "torch": torch.__version__,
                     "evaluated_at": datetime.now(timezone.utc).isoformat(timespec="seconds")},
        "results": results,
        "sweep": sweep_rows,
        "modes": {mode: serving_mode.description for mode, serving_mode in modes.items()},
        "worst_case": {mode: worst_case(results, eps, flags, mode) for mode in modes},
    }
    report["settings"]["seconds"] = time.perf_counter() - started
    run_path = Path(run_dir)
    plot_curves(report, run_path / CURVES_PNG)
    atomic_write(run_path / REPORT_MD, lambda tmp: tmp.write_text(format_report(report)))
    write_json(run_path / REPORT_JSON, report)  # last: its presence means the evaluation finished
    return report


def current_report(run_dir: str | Path, *, n: int, autoattack_n: int | None,
                   autoattack_version: str = "standard") -> dict[str, Any] | None:
    """The run's ``report.json`` when it was made with these settings from the current best weights, else None."""
    run_path = Path(run_dir)
    report_path, weights = run_path / REPORT_JSON, run_path / BEST
    if not report_path.is_file() or not weights.is_file() or report_path.stat().st_mtime < weights.stat().st_mtime:
        return None
    report = json.loads(report_path.read_text())
    settings = report.get("settings", {})
    wanted_aa = n if autoattack_n is None else autoattack_n
    if settings.get("n_requested") != n or settings.get("autoattack_n") != min(wanted_aa, settings.get("n", 0)) \
            or settings.get("autoattack_version") != autoattack_version or "modes" not in report:
        return None
    return report


# ----------------------------------------------------------------------------------------------
# Rendering


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def _title(report: dict[str, Any]) -> str:
    run = report["run"]
    return f"{run['defense']} / {run['architecture']} / {run['dataset']}"


def format_report(report: dict[str, Any]) -> str:
    """``report.md``: per serving mode one table row per attack and the mode's worst case; then the sweep."""
    s, run = report["settings"], report["run"]
    lines = [
        f"# Evaluation: {_title(report)}",
        "",
        f"Run `{run['run_dir']}` ({run['weights']} weights, preset {run['preset']}), threat model "
        f"{s['norm']} eps {s['eps']:g}; {s['n']} of {s['test_size']} test images ({s['subset']}); "
        f"device {s['device']}, seed {s['seed']}, {s['evaluated_at']}. Attacks \"via X\" are crafted on the "
        f"attack surface X and judged by the served mode.",
    ]
    for mode, description in report["modes"].items():
        lines += ["", f"## mode `{mode}`: {description}", "",
                  "| measure | attack settings | accuracy % | images | seconds |", "|---|---|---:|---:|---:|"]
        lines += [f"| {row['label']} | {row['describe']} | {_pct(row['accuracy'])} | {row['n']} | {row['seconds']:.1f} |"
                  for row in report["results"] if row["mode"] == mode]
        worst = report["worst_case"][mode]
        if worst is not None:
            per_image = worst["per_image"]
            lines += ["", f"**Worst case at eps {worst['eps']:g}: {_pct(worst['accuracy'])} % ({worst['label']}, "
                          f"{worst['n']} images).** Per image (robust only if every attack fails) on the "
                          f"{per_image['n']} images all attacks ran on: {_pct(per_image['accuracy'])} %."]
    if report["sweep"]:
        lines += ["", f"## eps sweep, mode `{report['sweep'][0]['mode']}` (PGD-{s['sweep_steps']}, {s['n']} images)",
                  "", "| eps | accuracy % | seconds |", "|---:|---:|---:|"]
        lines += [f"| {row['eps']:.4g} | {_pct(row['accuracy'])} | {row['seconds']:.1f} |" for row in report["sweep"]]
    return "\n".join(lines) + "\n"


def primary_mode(report: dict[str, Any]) -> str:
    """The first serving mode: the one the sweep and the curves are for."""
    return next(iter(report["modes"]))


def plot_curves(report: dict[str, Any], path: Path) -> None:
    """``curves.png``: sweep accuracy against eps, the attacks at the nominal eps as markers (primary mode)."""
    # A bare Figure on the Agg canvas: no pyplot, so no global backend or figure state is touched.
    fig = Figure(figsize=(6.4, 4.4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    s, mode = report["settings"], primary_mode(report)
    sweep = report["sweep"]
    if sweep:
        ax.plot([row["eps"] for row in sweep], [100 * row["accuracy"] for row in sweep], marker="o",
                label=f"PGD-{s['sweep_steps']} sweep ({s['n']} images)")
    attacks = [r for r in report["results"] if r["robust"] and r["mode"] == mode]
    for index, row in enumerate(attacks):
        ax.scatter([row["eps"]], [100 * row["accuracy"]], marker="s*^vDPXhp<>"[index % 11], s=90, zorder=3,
                   color=f"C{index + 1}", label=f"{row['label']} ({row['n']} images)")
    ax.axvline(s["eps"], color="grey", linestyle=":", linewidth=1, label=f"nominal eps {s['eps']:g}")
    ax.set_xlabel(f"eps ({s['norm']}, pixels in [0, 1])")
    ax.set_ylabel("accuracy %")
    ax.set_ylim(-2, 102)
    ax.set_title(f"{_title(report)} [{mode}]")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))


def _rows(report: dict[str, Any], mode: str) -> list[dict[str, Any]]:
    return [r for r in report["results"] if r["mode"] == mode]


MASKING_MARK = "†"  # after an accuracy whose attack pyautoattack's own checks warned about
MASKING_NOTE = (f"{MASKING_MARK} pyautoattack's own checks warned about this attack (zero gradients, typically): "
                "a sign of gradient masking, so that number overstates robustness; the run's `report.md` "
                "says what was found.")


def _accuracy_cell(row: dict[str, Any] | None) -> str:
    return _pct(row and row["accuracy"]) + (MASKING_MARK if row and row["settings"].get("check_warnings") else "")


def _cell(rows: list[dict[str, Any]], attack: str) -> str:
    return _accuracy_cell(next((r for r in rows if r["attack"] == attack), None))


def format_results_table(reports: Sequence[dict[str, Any]], references: dict[str, str] | None = None) -> str:
    """A markdown table comparing runs: one row per serving mode of each report (as returned by
    ``evaluate_run``). ``adaptive`` is the lowest accuracy among the attacks crafted on a mode's
    attack surfaces; ``worst case`` the lowest over every attack at the nominal eps.
    ``references`` maps a defense id to its paper's own numbers (a column of their figures)."""
    pgd_labels = {r["label"] for report in reports for r in report["results"] if r["attack"] == "pgd"}
    pgd_header = pgd_labels.pop() if len(pgd_labels) == 1 else "PGD"
    header = f"| defense | mode | arch | clean % | {pgd_header} % | AutoAttack % | adaptive % | worst case % | train time |"
    rule = "|---|---|---|---:|---:|---:|---:|---:|---:|"
    if references is not None:
        header += " the paper's own numbers (theirs, on its data and network; not measured here) |"
        rule += "---|"
    lines = [header, rule]
    for report in reports:
        run = report["run"]
        for mode in report["modes"]:
            rows = _rows(report, mode)
            adaptive = [r for r in rows if "@" in r["attack"]]
            weakest = min(adaptive, key=lambda r: r["accuracy"]) if adaptive else None
            adaptive_cell = f"{_accuracy_cell(weakest)} ({weakest['label']})" if weakest else "-"
            worst = report["worst_case"][mode]
            line = (f"| {run['defense']} | {mode} | {run['architecture']} | {_cell(rows, 'clean')} | {_cell(rows, 'pgd')} | "
                    f"{_cell(rows, 'autoattack')} | {adaptive_cell} | {_pct(worst and worst['accuracy'])} | "
                    f"{_duration(run['train_seconds'])} |")
            if references is not None:
                line += f" {references.get(run['defense'], '-') if mode == primary_mode(report) else ''} |"
            lines.append(line)
    if any(MASKING_MARK in line for line in lines[2:]):
        lines += ["", MASKING_NOTE]
    return "\n".join(lines) + "\n"

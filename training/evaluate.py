"""Honest evaluation of a finished run: every serving mode under a labelled suite of attacks, with
95% intervals, a per-image worst case and a check for gradient masking.

``evaluate_run`` loads a run's best weights and a fixed subset of its dataset's test split, and
for every serving mode of the defense (``Recipe.modes``) runs:

* ``clean`` accuracy;
* white-box PGD with random restarts under three objectives (cross-entropy, the CW margin, DLR),
  crafted on the mode itself and on each of its *attack surfaces* (the modules an adaptive
  attacker differentiates through instead: DUCAT's merged class scores and raw logits, each DH-AT
  head, THAT's classifier head and its soft kNN votes); examples are always judged by the mode;
* AutoAttack on the mode (``standard``: APGD-CE, APGD-T, FAB-T, Square; a reduced list is labelled
  by its attacks, never "AutoAttack"), and APGD-CE + APGD-T on each surface;
* transfer attacks: PGD crafted on another model (the run's base run, ACT's natural model F) and
  judged by the mode;
* the query-only Square attack (5,000 queries) where the mode is not differentiable end to end
  (``ServingMode.differentiable``) or any gradient check found zero gradients.

Each mode's **worst case** is per image: an image counts as robust only if every attack that ran
on it failed, on the images all attacks ran on (every subset is a prefix of the same seeded
permutation, so per-image results line up). A mode whose black-box or transfer figure is below
its white-box worst case beyond chance (paired interval and exact test, ``training.stats``) is
marked **unreliable (gradient masking suspected)**, the way RobustBench flags entries. Every accuracy
carries its n and Wilson interval (``training.stats``).

A finished attack row is stored in ``eval_rows/`` under a key of the weights, the mode, the attack
and its settings, and is not recomputed: an interrupted evaluation resumes where it stopped, and
a re-run with other sizes recomputes only the rows that changed. Three files are written into the
run folder, each atomically, ``report.json`` last so that its presence means the evaluation
finished: ``report.json`` (schema in ``evaluate_run``), ``report.md`` and ``curves.png``
(accuracy against eps).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import nn

from .attacks.attacks import PGD, AutoAttackStandard, correct_flags, summarize_check_warnings
from .attacks.core import OBJECTIVES, attack_mode
from .checkpoint import atomic_write, weights_digest, write_json
from .devices import default_device
from .environment import device_name
from .errors import ConfigError
from .recipes import ServingMode, get_recipe
from .run_files import sha256_file
from .runs import (
    CURVES_PNG,
    REPORT_JSON,
    REPORT_MD,
    ROWS_DIR,
    TEST_SUBSET_SEED,
    base_run_dir,
    load_run,
    load_test_subset,
    restore_artifacts,
    train_seconds,
    trained_on,
)
from .stats import format_difference, format_proportion, paired_difference, proportion

EVAL_FORMAT = 2  # part of every row's key: bumped when an attack's code changes what it computes
ARTIFACTS = ("pairing.json", "memory_bank.safetensors")  # run files that change what a mode serves

# pyautoattack's versions and the attacks each runs. Only a full version is called "AutoAttack";
# a reduced list is named by its attacks wherever a figure is shown.
AUTOATTACK_VERSIONS: dict[str, tuple[str, ...]] = {
    "standard": ("apgd-ce", "apgd-t", "fab-t", "square"),
    "plus": ("apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t"),
    "rand": ("apgd-ce", "apgd-dlr"),
    # The two gradient attacks of standard AutoAttack, with its settings (1 restart, 9 target
    # classes): what `robustserve run`'s quick evaluation affords on two cores.
    "fast": ("apgd-ce", "apgd-t"),
}
FULL_VERSIONS = {"standard": "AutoAttack", "plus": "AutoAttack+", "rand": "AutoAttack (rand, EOT)"}
ATTACK_NAMES = {"apgd-ce": "APGD-CE", "apgd-t": "APGD-T", "apgd-dlr": "APGD-DLR", "fab": "FAB", "fab-t": "FAB-T",
                "square": "Square"}
SURFACE_APGD = ("apgd-ce", "apgd-t")  # what runs on every attack surface
OBJECTIVE_NAMES = {"ce": "CE", "margin": "CW margin", "dlr": "DLR"}
SQUARE_QUERIES = 5000  # pyautoattack's standard budget, never reduced
SWEEP_FRACTIONS = (0.0, 0.5, 1.0, 1.5, 2.0)  # default sweep, in units of the nominal eps

CLEAN, WHITE_BOX, BLACK_BOX, TRANSFER, SWEEP = "clean", "white-box", "black-box", "transfer", "sweep"
ROBUST_KINDS = (WHITE_BOX, BLACK_BOX, TRANSFER)  # the kinds that count towards the worst case
UNRELIABLE = "unreliable (gradient masking suspected)"


def autoattack_label(version: str) -> str:
    """"AutoAttack" for the full version, else the attacks that ran: "APGD-CE + APGD-T"."""
    return FULL_VERSIONS.get(version) or " + ".join(ATTACK_NAMES[a] for a in AUTOATTACK_VERSIONS[version])


@dataclass(frozen=True)
class EvalSettings:
    """The knobs of one evaluation (``evaluate_run``'s keyword arguments after defaults are resolved)."""

    n: int  # images for clean, PGD and transfer rows
    eps: float
    norm: str
    pgd_steps: int
    pgd_restarts: int
    objectives: tuple[str, ...]
    autoattack_n: int  # images for AutoAttack, the surfaces' APGD and Square (a prefix of the n)
    autoattack_version: str
    transfer: bool
    sweep: tuple[float, ...]
    sweep_steps: int
    batch_size: int
    device: str
    seed: int


@dataclass
class EvalContext:
    """What the attack plan sees: one serving mode and the evaluation images."""

    mode: str
    serving: ServingMode  # its module's argmax is the served prediction, and it judges every attack
    x: torch.Tensor  # the test subset, pixels in [0, 1], on the CPU (attacks move batches)
    y: torch.Tensor
    settings: EvalSettings
    transfer_sources: dict[str, nn.Module] = field(default_factory=dict)
    source_digests: dict[str, str] = field(default_factory=dict)  # transfer source -> weights digest

    @property
    def model(self) -> nn.Module:
        return self.serving.module


@dataclass
class PlannedAttack:
    """One row of the report before it runs: what it is, and how to get its per-image flags."""

    attack: str  # the row's id within its mode: "pgd-margin@merged", "autoattack", "square", ...
    kind: str  # CLEAN, WHITE_BOX, BLACK_BOX, TRANSFER or SWEEP
    label: str  # short name for tables: "PGD-20 CW margin via merged", "APGD-CE + APGD-T", ...
    describe: str  # the settings in words, for report.md
    eps: float
    n: int  # images attacked: the first n of the subset
    settings: dict[str, Any]  # everything that decides the result: part of the row's cache key
    # (progress bar label or None) -> (per-image correct flags, pyautoattack's check warnings)
    run: Callable[[str | None], tuple[torch.Tensor, list[str]]]


# ----------------------------------------------------------------------------------------------
# The attack plan of one mode


def _pgd_attack(ctx: EvalContext, source: nn.Module, source_name: str | None, kind: str, objective: str,
                eps: float, steps: int, restarts: int, n: int) -> PlannedAttack:
    """PGD-``steps`` (Madry's random start, step 2.5 eps / steps) on ``objective``, crafted on
    ``source`` (the mode itself when ``source_name`` is None) and judged by the mode."""
    s = ctx.settings
    step_size = 2.5 * eps / max(steps, 1)

    def run(progress: str | None) -> tuple[torch.Tensor, list[str]]:
        torch.manual_seed(s.seed)  # each row's random starts do not depend on which rows ran before
        x, y = ctx.x[:n], ctx.y[:n]
        attack = PGD(source, eps=eps, steps=steps, norm=s.norm, restarts=restarts, objective=objective,
                     batch_size=s.batch_size)
        x_adv = attack(x, y, progress=progress) if eps > 0 else x
        return correct_flags(ctx.model, x_adv, y, s.batch_size), []

    via = {TRANSFER: f" from {source_name}", WHITE_BOX: f" via {source_name}"}.get(kind, "") if source_name else ""
    label = f"PGD-{steps} {OBJECTIVE_NAMES[objective]}{via}"
    describe = (f"{s.norm.capitalize()} eps {eps:g}, {steps} steps of {step_size:.4g}, {restarts} random "
                f"start{'s' if restarts != 1 else ''}, {OBJECTIVE_NAMES[objective]} loss"
                + (f", crafted on `{source_name}`" if source_name else ""))
    prefix = {SWEEP: "sweep-", TRANSFER: "transfer-"}.get(kind, "")
    attack_id = f"{prefix}pgd-{objective}" + (f"@{source_name}" if source_name else "")
    settings = {"norm": s.norm, "steps": steps, "step_size": step_size, "restarts": restarts, "objective": objective,
                "random_start": True, "source": source_name, "seed": s.seed,
                "source_weights": ctx.source_digests.get(source_name or "")}
    return PlannedAttack(attack_id, kind, label, describe, eps, n, settings, run)


def _autoattack_attack(ctx: EvalContext, attacks: Sequence[str] | None, source: nn.Module,
                       source_name: str | None, kind: str = WHITE_BOX) -> PlannedAttack:
    """pyautoattack on the first ``autoattack_n`` images: the configured version on the mode itself
    (``attacks`` None), or an explicit attack list (on a surface, or Square)."""
    s = ctx.settings
    n = s.autoattack_n
    version = s.autoattack_version if attacks is None else "custom"
    names = AUTOATTACK_VERSIONS[s.autoattack_version] if attacks is None else tuple(attacks)

    def run(progress: str | None) -> tuple[torch.Tensor, list[str]]:
        custom = list(names) if version == "custom" or s.autoattack_version == "fast" else None
        attack = AutoAttackStandard(source, eps=s.eps, norm=s.norm, seed=s.seed, version=s.autoattack_version, attacks=custom,
                     batch_size=min(s.batch_size, 100))
        x_adv = attack(ctx.x[:n], ctx.y[:n], progress=progress)
        return correct_flags(ctx.model, x_adv, ctx.y[:n], s.batch_size), attack.check_warnings

    listed = " + ".join(ATTACK_NAMES[a] for a in names)
    label = (autoattack_label(s.autoattack_version) if attacks is None else listed) + \
        (f" via {source_name}" if source_name else "")
    budget = f" ({SQUARE_QUERIES} queries)" if "square" in names else ""
    describe = (f"pyautoattack {listed}{budget} with standard AutoAttack's settings, {s.norm.capitalize()} eps "
                f"{s.eps:g}, seed {s.seed}" + (f", crafted on `{source_name}`" if source_name else ""))
    attack_id = ("autoattack" if attacks is None else "+".join(names)) + (f"@{source_name}" if source_name else "")
    settings = {"norm": s.norm, "attacks": list(names), "version": s.autoattack_version if attacks is None else
                "custom", "seed": s.seed, "source": source_name}
    return PlannedAttack(attack_id, kind, label, describe, s.eps, n, settings, run)


def plan_attacks(ctx: EvalContext) -> list[PlannedAttack]:
    """The white-box and transfer rows of one mode, in report order (clean first)."""
    s = ctx.settings

    def clean(progress: str | None) -> tuple[torch.Tensor, list[str]]:
        return correct_flags(ctx.model, ctx.x, ctx.y, s.batch_size), []

    plan = [PlannedAttack(CLEAN, CLEAN, "clean", "-", 0.0, s.n, {}, clean)]
    surfaces: list[tuple[str | None, nn.Module]] = [(None, ctx.model), *ctx.serving.attack_surfaces.items()]
    for name, source in surfaces:
        plan += [_pgd_attack(ctx, source, name, WHITE_BOX, objective, s.eps, s.pgd_steps, s.pgd_restarts, s.n)
                 for objective in s.objectives]
    if s.autoattack_n:
        plan.append(_autoattack_attack(ctx, None, ctx.model, None))
        plan += [_autoattack_attack(ctx, SURFACE_APGD, source, name) for name, source in surfaces[1:]]
    plan += [_pgd_attack(ctx, source, name, TRANSFER, "ce", s.eps, s.pgd_steps, s.pgd_restarts, s.n)
             for name, source in ctx.transfer_sources.items()]
    return plan


def needs_square(ctx: EvalContext, rows: Sequence[dict[str, Any]], zero_gradients: int) -> bool:
    """Square runs where gradients cannot be trusted: a mode that is not differentiable end to end,
    zero input gradients at clean images, or a pyautoattack check that warned (see ``plan_attacks``)."""
    warned = any(row["settings"].get("check_warnings") for row in rows)
    return ctx.settings.autoattack_n > 0 and (not ctx.serving.differentiable or zero_gradients > 0 or warned)


def plan_sweep(ctx: EvalContext) -> list[PlannedAttack]:
    s = ctx.settings
    return [_pgd_attack(ctx, ctx.model, None, SWEEP, "ce", point, s.sweep_steps, 1, s.n) for point in s.sweep]


def zero_gradient_images(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> int:
    """Clean images at which the cross-entropy's input gradient is exactly zero: a gradient attack
    cannot start there (a hard argmax, a quantiser, a saturated vote), so its figure means little."""
    device = next(model.parameters()).device
    count = 0
    with attack_mode(model, "eval"):
        for start in range(0, x.shape[0], batch_size):
            xb = x[start:start + batch_size].to(device).requires_grad_(True)
            with torch.enable_grad():
                loss = OBJECTIVES["ce"](model(xb).float(), y[start:start + batch_size].to(device), None).sum()
                (grad,) = torch.autograd.grad(loss, xb, allow_unused=True)
            count += xb.shape[0] if grad is None else int((grad.flatten(1).abs().amax(1) == 0).sum())
    return count


# ----------------------------------------------------------------------------------------------
# Rows: run once, stored, reused


def encode_flags(flags: torch.Tensor) -> str:
    """Per-image booleans as hex of their packed bits (1 = correct after the attack)."""
    return np.packbits(flags.cpu().numpy().astype(np.uint8)).tobytes().hex()


def decode_flags(text: str, n: int) -> torch.Tensor:
    return torch.from_numpy(np.unpackbits(np.frombuffer(bytes.fromhex(text), dtype=np.uint8))[:n].astype(bool))


def row_flags(row: dict[str, Any]) -> torch.Tensor:
    return decode_flags(row["correct"], row["n"])


def _row_key(fingerprint: str, mode: str, planned: PlannedAttack) -> str:
    key = {"format": EVAL_FORMAT, "run": fingerprint, "mode": mode, "attack": planned.attack, "eps": planned.eps,
           "n": planned.n, "subset_seed": TEST_SUBSET_SEED, "settings": planned.settings}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]


def run_row(run_dir: Path, fingerprint: str, mode: str, planned: PlannedAttack, *, measured_on: str,
            progress: bool) -> dict[str, Any]:
    """The row of ``planned``: from ``eval_rows/`` when it finished before, else computed and stored with
    ``measured_on`` (``environment.device_name``): a stored row's seconds are that device's."""
    path = run_dir / ROWS_DIR / f"{_row_key(fingerprint, mode, planned)}.json"
    if path.is_file():
        try:
            return {**json.loads(path.read_text()), "reused": True}
        except ValueError:
            pass  # a damaged row file: compute the row again
    started = time.perf_counter()
    flags, warnings = planned.run(planned.label if progress else None)
    seconds = time.perf_counter() - started
    measured = proportion(flags.tolist())
    settings = dict(planned.settings)
    summary = summarize_check_warnings(warnings, planned.n)
    describe = planned.describe + (f"; **{summary}**" if summary else "")
    if warnings:
        settings["check_warnings"] = sorted(set(warnings))
    row = {"mode": mode, "attack": planned.attack, "kind": planned.kind, "label": planned.label, "eps": planned.eps,
           **measured.to_json(), "seconds": seconds, "measured_on": measured_on, "describe": describe,
           "settings": settings, "correct": encode_flags(flags)}
    path.parent.mkdir(exist_ok=True)
    write_json(path, row)
    if progress:
        print(f"   {mode}: {planned.label}: {format_proportion(measured.value, measured.low, measured.high, measured.n)}"
              f" in {_duration(seconds)}", flush=True)
    return {**row, "reused": False}


def run_fingerprint(run_dir: Path, model: nn.Module) -> str:
    """What decides a mode's outputs: the weights and the artifacts beside them."""
    parts = [weights_digest(model)] + [sha256_file(run_dir / name) for name in ARTIFACTS if (run_dir / name).is_file()]
    return hashlib.sha256("/".join(parts).encode()).hexdigest()


# ----------------------------------------------------------------------------------------------
# Worst case and reliability


def _common_flags(rows: Sequence[dict[str, Any]]) -> torch.Tensor:
    """Per image, survived every row (on the images all of them ran on)."""
    common = min(row["n"] for row in rows)
    return torch.stack([row_flags(row)[:common] for row in rows]).all(0)


def reliability(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Does a black-box or transfer attack beat the white-box worst case by more than chance? Each
    such row is compared, on the same images, with the per-image union of the white-box rows."""
    white = [r for r in rows if r["kind"] == WHITE_BOX]
    others = [r for r in rows if r["kind"] in (BLACK_BOX, TRANSFER)]
    checks = []
    if white:
        white_union = _common_flags(white)
        for row in others:
            common = min(row["n"], white_union.numel())
            diff = paired_difference(row_flags(row)[:common].tolist(), white_union[:common].tolist())
            # "text": the difference as report.md shows it (black-box minus white-box, points).
            checks.append({"attack": row["attack"], "label": row["label"], **diff.to_json(),
                           "text": format_difference(diff, with_verdict=False)})
    unreliable = [c for c in checks if c["verdict"] == "worse"]
    return {"unreliable": bool(unreliable), "checks": checks,
            "evidence": [f"{c['label']} is below the white-box worst case by {c['text']} points" for c in unreliable]}


def worst_case(rows: Sequence[dict[str, Any]], mode: str, eps: float) -> dict[str, Any] | None:
    """The mode's per-image worst case at the nominal ``eps``: robust only if every attack failed,
    on the images all of them ran on; with the lowest single row and the reliability check."""
    attacked = [r for r in rows if r["mode"] == mode and r["kind"] in ROBUST_KINDS and r["eps"] == eps]
    if not attacked:
        return None
    survived = _common_flags(attacked)
    lowest = min(attacked, key=lambda r: r["accuracy"])
    return {"mode": mode, "eps": eps, **proportion(survived.tolist()).to_json(), "correct": encode_flags(survived),
            "attacks": [r["attack"] for r in attacked],
            "lowest": {key: lowest[key] for key in ("attack", "label", "accuracy", "ci95", "n")},
            "reliability": reliability(attacked)}


# ----------------------------------------------------------------------------------------------
# The evaluation


def _transfer_sources(run_dir: Path, info: dict[str, Any], serving: ServingMode,
                      device: str) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """The mode's transfer sources: its own (ACT's F) and, unless the mode is the base network, the
    primary mode of the run's base run (when its folder is still there)."""
    sources = dict(serving.transfer_sources)
    base_dir = base_run_dir(run_dir, info)
    if serving.transfer_from_base and base_dir is not None:
        base = load_run(base_dir, device=device)
        sources[f"{base.info['defense']}_base_run"] = next(iter(base.modes().values())).module
    return sources, {name: weights_digest(module) for name, module in sources.items()}


def evaluate_run(
    run_dir: str | Path,
    *,
    n: int | None = None,
    pgd_steps: int = 50,
    pgd_restarts: int = 3,
    objectives: Sequence[str] = ("ce", "margin", "dlr"),
    eps: float | None = None,
    autoattack_n: int | None = 1000,
    autoattack_version: str = "standard",
    transfer: bool = True,
    sweep: list[float] | None = None,
    sweep_steps: int = 10,
    batch_size: int = 256,
    device: str | None = None,
    seed: int = 0,
    data_root: str | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Evaluate the run in ``run_dir`` (best weights) and write ``report.json``, ``report.md`` and
    ``curves.png`` into it. Returns the report.

    ``n`` defaults to the whole test set; ``autoattack_n`` (AutoAttack, the surfaces' APGD and
    Square) to 1,000 (at most ``n``; 0 skips them); ``eps`` to the run's threat-model eps; ``sweep``
    to (0, 1/2, 1, 3/2, 2) x eps; ``data_root`` to the one the run trained with. ``progress`` shows a
    bar per attack and prints each row with its cost.

    The report: ``run`` (what was evaluated), ``settings``, ``results`` (one row per attack and
    mode: ``mode, attack, kind, label, eps, accuracy, k, n, ci95, seconds, describe, settings,
    correct`` (per-image flags, ``decode_flags``), ``reused``), ``sweep`` (rows of the primary
    mode), ``modes`` (their descriptions), ``checks`` (zero-gradient images per mode) and
    ``worst_case`` (per mode, see ``worst_case``).
    """
    if autoattack_version not in AUTOATTACK_VERSIONS:
        raise ConfigError(f"unknown AutoAttack version {autoattack_version!r}; known: {', '.join(AUTOATTACK_VERSIONS)}")
    unknown = [o for o in objectives if o not in OBJECTIVE_NAMES]
    if unknown or not objectives:
        raise ConfigError(f"unknown PGD objective(s) {unknown or objectives}; known: {', '.join(OBJECTIVE_NAMES)}")
    if (n is not None and n < 1) or pgd_steps < 1 or pgd_restarts < 1 or sweep_steps < 1 or batch_size < 1:
        raise ConfigError("n, pgd_steps, pgd_restarts, sweep_steps and batch_size must all be >= 1")
    started = time.perf_counter()
    device = str(default_device(device))
    run_dir = Path(run_dir)
    # A copied run (a zoo entry, a run from another machine) lacks THAT's memory bank: rebuilt, so that no serving
    # mode drops out of the report unnoticed.
    run = restore_artifacts(run_dir, data_root, device=device)
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
        objectives=tuple(objectives), autoattack_n=max(0, min(n if autoattack_n is None else autoattack_n, n)),
        autoattack_version=autoattack_version, transfer=transfer,
        sweep=tuple(sorted(float(e) for e in sweep_eps)), sweep_steps=sweep_steps, batch_size=batch_size,
        device=str(device), seed=seed,
    )
    fingerprint = run_fingerprint(run_dir, run.model)
    measured_on = device_name(torch.device(device))

    results: list[dict[str, Any]] = []
    sweep_rows: list[dict[str, Any]] = []
    checks: dict[str, dict[str, int]] = {}
    modes = run.modes()
    for index, (mode, serving) in enumerate(modes.items()):
        sources, digests = _transfer_sources(run_dir, info, serving, device) if transfer else ({}, {})
        ctx = EvalContext(mode, serving, x, y, settings, sources, digests)
        if progress:
            print(f"== {info['defense']} · {mode}", flush=True)
        zero = zero_gradient_images(serving.module, x, y, batch_size)
        checks[mode] = {"zero_gradient_images": zero, "n": n}
        rows = [run_row(run_dir, fingerprint, mode, planned, measured_on=measured_on, progress=progress)
                for planned in plan_attacks(ctx)]
        if needs_square(ctx, rows, zero):
            square = _autoattack_attack(ctx, ["square"], serving.module, None, BLACK_BOX)
            rows.append(run_row(run_dir, fingerprint, mode, square, measured_on=measured_on, progress=progress))
        results += rows
        if index == 0:  # the sweep is for the first (primary) mode
            sweep_rows = [run_row(run_dir, fingerprint, mode, planned, measured_on=measured_on, progress=progress)
                          for planned in plan_sweep(ctx)]

    recipe = get_recipe(info["defense"])
    report = {
        "run": {"run_dir": str(run.run_dir), "defense": info["defense"], "architecture": info["architecture"],
                "dataset": info["dataset"], "preset": info.get("preset"), "training_seed": info.get("seed"),
                "threat_model": threat, "weights": "best", "code_version": info.get("code_version"),
                "train_seconds": train_seconds(info), "trained_on": trained_on(info),
                "compared_with": (info.get("base") or {}).get("recipe") or recipe.compared_with},
        "settings": {**asdict(settings), "objectives": list(settings.objectives), "sweep": list(settings.sweep),
                     "n_requested": n_requested, "test_size": test_size, "data_root": data_root,
                     "subset": f"first {n} of torch.randperm({test_size}) seeded {TEST_SUBSET_SEED}",
                     "autoattack_label": autoattack_label(autoattack_version),
                     "torch": torch.__version__, "measured_on": measured_on,
                     "evaluated_at": datetime.now(timezone.utc).isoformat(timespec="seconds")},
        "results": results,
        "sweep": sweep_rows,
        "modes": {mode: serving.description for mode, serving in modes.items()},
        "checks": checks,
        "worst_case": {mode: worst_case(results, mode, eps) for mode in modes},
    }
    report["settings"]["seconds"] = time.perf_counter() - started
    plot_curves(report, run_dir / CURVES_PNG)
    atomic_write(run_dir / REPORT_MD, lambda tmp: tmp.write_text(format_report(report)))
    write_json(run_dir / REPORT_JSON, report)  # last: its presence means the evaluation finished
    return report


# ----------------------------------------------------------------------------------------------
# Rendering


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def figure(row: dict[str, Any] | None) -> str:
    """``46.0 [33.0, 60.0] n=50`` for a row (or a worst case), ``-`` for none."""
    return "-" if row is None else format_proportion(row["accuracy"], *row["ci95"], row["n"])


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def _title(report: dict[str, Any]) -> str:
    run = report["run"]
    return f"{run['defense']} / {run['architecture']} / {run['dataset']}"


def _worst_case_lines(worst: dict[str, Any]) -> list[str]:
    lowest = worst["lowest"]
    lines = [f"**Worst case per image at eps {worst['eps']:g}: {figure(worst)}** (robust only if every one of the "
             f"{len(worst['attacks'])} attacks failed on the image; on the {worst['n']} images all of them ran on). "
             f"Lowest single attack: {lowest['label']}, {figure(lowest)}."]
    rel = worst["reliability"]
    if rel["unreliable"]:
        lines.append(f"**{UNRELIABLE.capitalize()}:** " + "; ".join(rel["evidence"]) + ".")
    elif rel["checks"]:
        lines.append("No black-box or transfer attack falls below the white-box worst case beyond its interval (its "
                     "accuracy minus the white-box one, points): " +
                     "; ".join(f"{c['label']} {c['text']}" for c in rel["checks"]) + ".")
    return lines


def _stored_note(row: dict[str, Any], settings: dict[str, Any]) -> str:
    """`` (stored)`` after a row read back from ``eval_rows/``, naming the device its seconds are from when that
    is not the one this report ran on."""
    if not row.get("reused"):
        return ""
    where = row.get("measured_on", "device not recorded")
    return " (stored)" if where == settings.get("measured_on") else f" (stored; {where})"


def format_report(report: dict[str, Any]) -> str:
    """``report.md``: per serving mode one row per attack, the per-image worst case and the reliability
    check; then the sweep."""
    s, run = report["settings"], report["run"]
    reused = sum(bool(row.get("reused")) for row in report["results"])
    # A report assembled from stored rows took seconds; say so, or "0 s" reads as the evaluation's cost.
    stored = f" ({reused} of {len(report['results'])} rows read back from eval_rows/)" if reused else ""
    lines = [
        f"# Evaluation: {_title(report)}",
        "",
        f"Run `{run['run_dir']}` ({run['weights']} weights, preset {run['preset']}), threat model "
        f"{s['norm']} eps {s['eps']:g}; {s['n']} of {s['test_size']} test images ({s['subset']}), "
        f"{s['autoattack_n']} of them for {s['autoattack_label']}, the surfaces' APGD and Square; device "
        f"{s.get('measured_on', s['device'])}, seed {s['seed']}, {s['evaluated_at']}, {_duration(s['seconds'])}{stored}. "
        f"Accuracies are % with their 95% Wilson interval and n. Attacks \"via X\" are crafted on the attack "
        f"surface X, \"from X\" on another model X (transfer); all are judged by the served mode.",
    ]
    for mode, description in report["modes"].items():
        lines += ["", f"## mode `{mode}`: {description}", "",
                  "| attack | kind | settings | accuracy % [95% CI] n | seconds |", "|---|---|---|---|---:|"]
        lines += [f"| {row['label']} | {row['kind']} | {row['describe']} | {figure(row)} | "
                  f"{row['seconds']:.1f}{_stored_note(row, s)} |" for row in report["results"] if row["mode"] == mode]
        check = report["checks"][mode]
        if check["zero_gradient_images"]:
            lines += ["", f"Gradient check: the cross-entropy's input gradient is exactly zero at "
                          f"{check['zero_gradient_images']} of {check['n']} clean images (Square was run)."]
        worst = report["worst_case"][mode]
        if worst is not None:
            lines += [""] + _worst_case_lines(worst)
    if report["sweep"]:
        lines += ["", f"## eps sweep, mode `{report['sweep'][0]['mode']}` (PGD-{s['sweep_steps']} CE, {s['n']} images)",
                  "", "| eps | accuracy % [95% CI] n | seconds |", "|---:|---|---:|"]
        lines += [f"| {row['eps']:.4g} | {figure(row)} | {row['seconds']:.1f} |" for row in report["sweep"]]
    return "\n".join(lines) + "\n"


def primary_mode(report: dict[str, Any]) -> str:
    """The first serving mode: the one the sweep and the curves are for."""
    return next(iter(report["modes"]))


def plot_curves(report: dict[str, Any], path: Path) -> None:
    """``curves.png`` (``curves_figure``)."""
    fig = curves_figure(report)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))


def curves_figure(report: dict[str, Any]) -> Figure:
    """The primary mode's sweep accuracy against eps with its intervals and its attacks at the nominal eps as
    markers, and every mode's per-image worst case."""
    # A bare Figure on the Agg canvas: no pyplot, so no global backend or figure state is touched.
    fig = Figure(figsize=(7.2, 4.8))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    s, mode = report["settings"], primary_mode(report)
    sweep = report["sweep"]
    if sweep:
        eps_values = [row["eps"] for row in sweep]
        ax.plot(eps_values, [100 * row["accuracy"] for row in sweep], marker="o",
                label=f"PGD-{s['sweep_steps']} sweep ({s['n']} images)")
        ax.fill_between(eps_values, [100 * row["ci95"][0] for row in sweep], [100 * row["ci95"][1] for row in sweep],
                        alpha=0.2, label="95% interval")
    attacks = [r for r in report["results"] if r["kind"] in ROBUST_KINDS and r["mode"] == mode]
    for index, row in enumerate(attacks):
        ax.scatter([row["eps"]], [100 * row["accuracy"]], marker="s*^vDPXhp<>"[index % 11], s=50, zorder=3,
                   color=f"C{(index + 2) % 10}", label=f"{row['label']} ({row['n']})")
    # Every mode's worst case per image (the sweep and the single attacks are the primary mode's): DH-AT's heads,
    # THAT's kNN beside its classifier, DUCAT's raw logits, each at the nominal eps, side by side.
    for index, (other, worst) in enumerate((m, w) for m, w in report["worst_case"].items() if w is not None):
        below, above = (max(0.0, 100 * d) for d in (worst["accuracy"] - worst["ci95"][0], worst["ci95"][1] - worst["accuracy"]))
        ax.errorbar([worst["eps"] * (1 + 0.03 * index)], [100 * worst["accuracy"]], yerr=[[below], [above]],
                    fmt="_", color="k" if other == mode else f"C{(index + 5) % 10}", markersize=18, capsize=4,
                    zorder=4, label=f"worst case per image [{other}] ({worst['n']})")
    ax.axvline(s["eps"], color="grey", linestyle=":", linewidth=1, label=f"nominal eps {s['eps']:g}")
    ax.set_xlabel(f"eps ({s['norm']}, pixels in [0, 1])")
    ax.set_ylabel("accuracy %")
    ax.set_ylim(-2, 102)
    ax.set_title(f"{_title(report)} [{mode}]")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize="x-small", ncol=2)
    fig.tight_layout()
    return fig


MASKING_MARK = "†"  # after an accuracy whose attack pyautoattack's own checks warned about
MASKING_NOTE = (f"{MASKING_MARK} pyautoattack's own checks warned about this attack (zero gradients, typically): "
                "a sign of gradient masking, so that number overstates robustness; the run's `report.md` "
                "says what was found.")


def _marked(row: dict[str, Any] | None, text: str) -> str:
    return text + (MASKING_MARK if row and row["settings"].get("check_warnings") else "")


def _lowest(rows: Sequence[dict[str, Any]], kinds: Sequence[str]) -> str:
    """The lowest row of these kinds: its figure and label."""
    chosen = [r for r in rows if r["kind"] in kinds]
    if not chosen:
        return "-"
    row = min(chosen, key=lambda r: r["accuracy"])
    return f"{_marked(row, figure(row))} ({row['label']})"


def compare_with_base(report: dict[str, Any], mode: str, base: dict[str, Any] | None) -> tuple[str, str]:
    """Clean and worst-case accuracy of ``mode`` minus its base's primary mode, paired on the same images."""
    if base is None:
        return "-", "-"
    base_mode = primary_mode(base)
    cells = []
    for ours, theirs in (
        (_row(report, mode, CLEAN), _row(base, base_mode, CLEAN)),
        (report["worst_case"][mode], base["worst_case"][base_mode]),
    ):
        if ours is None or theirs is None:
            cells.append("-")
            continue
        a, b = decode_flags(ours["correct"], ours["n"]), decode_flags(theirs["correct"], theirs["n"])
        common = min(a.numel(), b.numel())
        cells.append(format_difference(paired_difference(a[:common].tolist(), b[:common].tolist())))
    return cells[0], cells[1]


def measured_robustness(report: dict[str, Any], mode: str) -> str:
    """One sentence on what the evaluation measured for ``mode``: its clean accuracy and per-image worst case,
    each with its interval and n (for the demo's summary)."""
    clean, worst = _row(report, mode, CLEAN), report["worst_case"].get(mode)
    if clean is None or worst is None:
        return f"`{mode}` has no evaluation in this report"
    flag = f"; **{UNRELIABLE}**" if worst["reliability"]["unreliable"] else ""
    return (f"clean {figure(clean)}, worst case per image over {len(worst['attacks'])} attacks at eps "
            f"{worst['eps']:g} {figure(worst)} (preset {report['run']['preset']}){flag}")


def _row(report: dict[str, Any], mode: str, attack: str) -> dict[str, Any] | None:
    return next((r for r in report["results"] if r["mode"] == mode and r["attack"] == attack), None)


PIPELINE_CHECK = ("**The quick figures are a pipeline check, not a measurement of the defenses**: the models are a "
                  "few hundred SGD steps old and the image counts are small, as the intervals show.")


def results_header(reports: Sequence[dict[str, Any]]) -> str:
    """The paragraph above the results table: what ran, on how many images (from the first report's
    settings; the table's cells carry each figure's own n)."""
    s = reports[0]["settings"]
    presets = {report["run"]["preset"] for report in reports}
    objectives = ", ".join(OBJECTIVE_NAMES[o] for o in s["objectives"])
    eps = ", ".join(sorted({f"{report['settings']['eps']:g}" for report in reports}))
    text = (f"Linf eps = {eps}. Clean accuracy and "
            f"PGD-{s['pgd_steps']} with {s['pgd_restarts']} random starts ({objectives} losses) on the first {s['n']} "
            f"test images of a seeded permutation; {s['autoattack_label']} and Square ({SQUARE_QUERIES} queries, on "
            f"modes that are not differentiable end to end or whose gradients vanish) on the first "
            f"{s['autoattack_n']} of them. Every serving mode is attacked on itself and on each of its attack surfaces "
            f"(PGD and APGD-CE + APGD-T: DUCAT's merged class scores and raw logits, each DH-AT head, THAT's "
            f"classifier head, soft kNN votes and feature-space pull), and by transfer from the run a defense starts "
            f"from (ACT: from its natural model F). Every figure is % with its 95% Wilson interval and n. *Worst case "
            f"per image*: an image counts as robust only if every attack failed on it. *vs base*: the paired "
            f"difference (95% Newcombe interval) with the run the defense starts from or its paper compares with; "
            f"better or worse only when the interval excludes zero and the exact McNemar test agrees (p < 0.05). "
            f"*Unreliable*: a black-box or transfer attack beat the white-box worst case beyond chance (the same "
            f"paired test). Train time includes the base run and names the devices its epochs ran on. Each run's "
            f"`report.md` has every attack. {where_rows_were_measured(reports)}")
    return text + ("\n\n" + PIPELINE_CHECK if presets == {"quick"} else "")


def _where_trained(run: dict[str, Any]) -> str:
    """`` (on X)`` after a train time: the devices its epochs ran on (a report from before reports named them: none)."""
    return f" ({'; '.join(run['trained_on'])})" if run.get("trained_on") else ""


def where_rows_were_measured(reports: Sequence[dict[str, Any]]) -> str:
    """Which devices measured the attack rows behind the table: the table may be assembled on one machine from
    rows stored on others (``eval_rows/`` is keyed by the weights, not the device)."""
    counts: dict[str, int] = {}
    for report in reports:
        for row in report["results"]:
            where = row.get("measured_on", "a device not recorded (rows stored before rows named it)")
            counts[where] = counts.get(where, 0) + 1
    return "Attack rows measured on: " + "; ".join(f"{where}: {k} {'row' if k == 1 else 'rows'}"
                                                   for where, k in sorted(counts.items())) + "."


def format_results_table(reports: Sequence[dict[str, Any]], references: dict[str, str] | None = None) -> str:
    """A markdown table comparing runs: one row per serving mode of each report (as returned by
    ``evaluate_run``), every figure with its 95% interval and n.

    *strongest white-box* is the lowest single white-box row (on the mode or a surface); *black-box /
    transfer* the lowest Square or transfer row; *worst case* the per-image worst case over all of
    them. *vs base* is the paired difference with the run the defense starts from (or is compared
    with in its paper), when that run is in ``reports``. ``references`` maps a defense id to its
    paper's own numbers (a column of their figures)."""
    by_defense = {report["run"]["defense"]: report for report in reports}
    aa_labels = {report["settings"]["autoattack_label"] for report in reports}
    aa_header = aa_labels.pop() if len(aa_labels) == 1 else "AutoAttack or its listed attacks"
    header = (f"| defense | mode | clean % | strongest white-box % | {aa_header} % | black-box / transfer % | "
              f"worst case per image % | vs base: clean (points) | vs base: worst case (points) | "
              f"reliability | train time |")
    rule = "|---|---|---|---|---|---|---|---|---|---|---:|"
    if references is not None:
        header += " the paper's own numbers (theirs, on its data and network; not measured here) |"
        rule += "---|"
    lines = [header, rule]
    for report in reports:
        run = report["run"]
        compared = run.get("compared_with")
        base = by_defense.get(compared) if compared else None
        for mode in report["modes"]:
            rows = [r for r in report["results"] if r["mode"] == mode]
            worst = report["worst_case"][mode]
            clean_diff, worst_diff = compare_with_base(report, mode, base)
            aa = _row(report, mode, "autoattack")
            flagged = worst is not None and worst["reliability"]["unreliable"]
            train_time = _duration(run["train_seconds"]) + _where_trained(run)
            line = (f"| {run['defense']} | {mode} | {figure(_row(report, mode, CLEAN))} | {_lowest(rows, [WHITE_BOX])} | "
                    f"{_marked(aa, figure(aa))} | {_lowest(rows, [BLACK_BOX, TRANSFER])} | **{figure(worst)}** | "
                    f"{f'{compared}: {clean_diff}' if base else '-'} | {worst_diff} | "
                    f"{('**' + UNRELIABLE + '**') if flagged else 'ok'} | {train_time} |")
            if references is not None:
                line += f" {references.get(run['defense'], '-') if mode == primary_mode(report) else ''} |"
            lines.append(line)
    if any(MASKING_MARK in line for line in lines[2:]):
        lines += ["", MASKING_NOTE]
    return "\n".join(lines) + "\n"

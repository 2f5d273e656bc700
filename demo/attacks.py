"""The demo's attacks: the project's registry (``training.attacks``) on one image, bounded, on the 8-bit grid.

White-box attacks (FGSM, PGD, DRA, APGD) differentiate through the chosen defense's own weights and
serving mode, loaded from its run folder. Where the mode has an inference-time step that a plain
gradient would not see through, they attack its adaptive surface instead (``attack_surface``).
Square is black-box: it sees only the REST replies of the served endpoint, one query per image
(``RestScores``), and stops at ``SQUARE_QUERIES``.

Whatever the attack, its result is snapped to 8-bit pixels inside the eps ball (``quantise``): the
PNG sent over REST is then exactly the image the page shows, and the eps the page states holds for it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from serving.decode import png_bytes
from serving.runtime import MAX_TOP_K
from training.attacks import build_attack
from training.errors import RobustServeError
from training.recipes import ServingMode

MAX_EPS = 0.3
MAX_STEPS = 100
SQUARE_QUERIES = 300  # an interactive budget: the registry's Square spends 5000 per image
SEED = 0  # the same image, attack and settings always give the same adversarial image



class AttackError(RobustServeError, ValueError):
    """Settings outside the demo's bounds."""


@dataclass(frozen=True)
class AttackSpec:
    """One attack of the page's menu: a registry name and how the demo drives it."""

    name: str  # in training.attacks.ATTACKS
    label: str
    about: str
    takes_steps: bool = False
    threat: str = "linf"  # what eps bounds: the Linf ball, or DRA's mean absolute perturbation ("l1_mean")
    black_box: bool = False

    def expected_calls(self, steps: int) -> int | None:
        """Model calls the attack makes (gradient steps or REST queries), for the progress bar; None: not known."""
        return {"fgsm": 1, "pgd": steps, "dra": steps + 1, "square": SQUARE_QUERIES}.get(self.name)


ATTACK_SPECS = {spec.label: spec for spec in (
    AttackSpec("fgsm", "FGSM", "one signed-gradient step of size eps (Goodfellow et al.)"),
    AttackSpec("pgd", "PGD", "projected gradient ascent from a random start in the eps ball (Madry et al.)",
               takes_steps=True),
    AttackSpec("dra", "DRA", "AFT-DRA's L1-normalised steps on the most salient 2/3 of the pixels; eps bounds the "
               "mean absolute change per pixel", takes_steps=True, threat="l1_mean"),
    AttackSpec("apgd", "APGD", "pyautoattack's APGD-CE and APGD-DLR with their own step-size schedule "
               "(100 iterations each; the steps setting does not apply)"),
    AttackSpec("square", "Square (black-box)", f"random square updates that only see the REST replies: at most "
               f"{SQUARE_QUERIES} queries, no gradient, no weights", black_box=True),
)}


def check_settings(eps: float, steps: int) -> None:
    if not 0 <= eps <= MAX_EPS:
        raise AttackError(f"eps must be from 0 to {MAX_EPS}, got {eps}")
    if not 1 <= steps <= MAX_STEPS:
        raise AttackError(f"steps must be from 1 to {MAX_STEPS}, got {steps}")


def grid_eps(eps: float) -> float:
    """eps snapped down to whole 8-bit levels (k/255): the largest ball whose corners are PNG pixels."""
    return math.floor(eps * 255 + 1e-6) / 255


def quantise(x: torch.Tensor, x_adv: torch.Tensor, eps: float, threat: str = "linf") -> torch.Tensor:
    """``x_adv`` on the 8-bit grid (x.mul(255).round() / 255), clipped back into the eps ball around ``x``.

    ``x`` (one image) is on the grid already. Rounding can step half a level outside the ball; the clip
    takes it back to the nearest whole level inside. DRA bounds the mean |delta|, which no per-pixel clip
    restores, so there rounding falls back to truncation toward ``x``, which never adds to any norm.
    """
    clean = x.mul(255).round()
    delta = x_adv.mul(255).round() - clean
    if threat == "linf":
        limit = round(grid_eps(eps) * 255)
        delta = delta.clamp(-limit, limit)
    elif delta.abs().mean() > eps * 255:
        delta = (x_adv.mul(255) - clean).trunc()
    return (clean + delta) / 255


def perturbation_norms(x: torch.Tensor, x_adv: torch.Tensor) -> dict[str, float]:
    """Linf, L2, mean |delta| and the share of changed pixels of ``x_adv - x``."""
    delta = (x_adv - x).flatten()
    return {"linf": float(delta.abs().max()), "l2": float(delta.norm()), "mean_abs": float(delta.abs().mean()),
            "changed": float((delta != 0).float().mean())}


def to_png(x: torch.Tensor) -> bytes:
    """One image [1, H, W] on the 8-bit grid as PNG bytes."""
    return png_bytes(x)


@dataclass(frozen=True)
class Surface:
    """What a white-box attack differentiates through."""

    module: nn.Module
    name: str  # the attack surface's name, or "module" for the served mode itself
    description: str


def attack_surface(mode: ServingMode) -> Surface:
    """The mode's adaptive surface where its recipe names one (``ServingMode.adaptive_surface``), else the
    served module itself. (DH-AT names none: its single heads are weaker than attacking through its aggregator.)"""
    if mode.adaptive_surface is not None:
        name, why = mode.adaptive_surface
        return Surface(mode.attack_surfaces[name], name, why)
    return Surface(mode.module, "module", f"the served mode itself: {mode.description}")


class _Counted(nn.Module):
    """Reports every forward pass (one per gradient step of the attack) to drive the progress bar."""

    def __init__(self, module: nn.Module, on_call: Callable[[int], None]) -> None:
        super().__init__()
        self.module = module
        self.on_call = on_call
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.on_call(self.calls)
        return self.module(x)


def white_box(spec: AttackSpec, module: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, steps: int,
              on_call: Callable[[int], None] = lambda calls: None) -> torch.Tensor:
    """The registry's attack ``spec.name`` on ``module`` (seeded), quantised into the eps ball."""
    settings: dict[str, Any] = {"eps": eps, **({"steps": steps} if spec.takes_steps else {})}
    with torch.random.fork_rng(devices=[]):  # seeded without disturbing anyone else's random stream
        torch.manual_seed(SEED)
        x_adv = build_attack(spec.name, _Counted(module, on_call), **settings)(x, y)
    return quantise(x, x_adv.detach(), eps, spec.threat)


class QueryBudgetSpent(Exception):
    """Raised by ``RestScores`` instead of sending a query beyond its budget."""


class RestScores:
    """A black-box attacker's whole view of a served endpoint: images in, log-probabilities out, over REST.

    Every image is sent as the PNG of its 8-bit pixels, the top-k asked for is every class, and the
    reply's probabilities become log-scores (what Square's margin loss takes). It counts the queries,
    refuses any beyond ``budget``, and keeps the query that came closest to changing the prediction
    away from ``label``: that image, not a guess, is the attack's result.
    """

    ALL_CLASSES = MAX_TOP_K  # the runtime's top_k limit: every class of any served model

    def __init__(self, ask: Callable[[bytes, int], dict[str, Any]], label: int, budget: int = SQUARE_QUERIES,
                 on_call: Callable[[int], None] = lambda calls: None) -> None:
        self.ask = ask  # (png, top_k) -> the endpoint's reply
        self.label = label
        self.budget = budget
        self.on_call = on_call
        self.queries = 0
        self.best: torch.Tensor | None = None
        self.best_margin = math.inf

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([self._query(image) for image in x])

    def _query(self, image: torch.Tensor) -> torch.Tensor:
        if self.queries >= self.budget:
            raise QueryBudgetSpent
        self.queries += 1
        self.on_call(self.queries)
        reply = self.ask(to_png(image), self.ALL_CLASSES)
        probabilities = torch.zeros(len(reply["top_k"]))
        for entry in reply["top_k"]:
            probabilities[entry["index"]] = entry["probability"]
        scores = probabilities.clamp_min(1e-12).log()
        others = torch.cat([scores[:self.label], scores[self.label + 1:]])
        margin = float(scores[self.label] - others.max())
        if margin < self.best_margin:
            self.best, self.best_margin = image.clone(), margin
        return scores


def square(scores: RestScores, x: torch.Tensor, *, eps: float) -> torch.Tensor:
    """Square (Andriushchenko et al.) against ``scores``; returns its best query, quantised into the eps ball.

    The registry's ``square`` runs it through AutoAttack's wrapper, whose 5000 queries and sanity checks
    (more model calls) are beyond an interactive page; this is pyautoattack's same ``SquareAttack`` with
    the query budget of ``scores``.
    """
    from pyautoattack.square import SquareAttack

    attack = SquareAttack(scores, norm="Linf", n_queries=scores.budget, eps=eps, seed=SEED, device=x.device)
    with torch.random.fork_rng(devices=[]):  # SquareAttack seeds the global generator
        try:
            attack.perturb(x, torch.tensor([scores.label]))
        except QueryBudgetSpent:
            pass
    best = x[0] if scores.best is None else scores.best  # no query at all only when the budget is 0
    return quantise(x, best[None], eps)


def amplified(x: torch.Tensor, x_adv: torch.Tensor) -> tuple[np.ndarray, float]:
    """The perturbation of one gray image [1, 1, H, W] as a picture (mid-gray = unchanged, black/white = the
    largest change) and its gain."""
    delta = (x_adv - x)[0, 0].cpu().numpy()
    largest = float(np.abs(delta).max())
    gain = 0.5 / largest if largest > 0 else 1.0
    return np.clip(np.round((0.5 + gain * delta) * 255), 0, 255).astype(np.uint8), gain

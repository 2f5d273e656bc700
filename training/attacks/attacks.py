"""Named attacks: torchattacks-style callables ``attack(x, y) -> x_adv`` on top of the PGD core.

Every white-box gradient attack here is a setting of ``core.pgd``/``core.perturb``; AutoAttack and
Square come from ``pyautoattack`` (the original authors' code). ``ATTACKS`` maps a name to a class
so the CLI, the evaluation and the demo can build any of them from a name and keyword settings.
"""

from __future__ import annotations

import contextlib
import logging
import re
from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import ClassVar

import torch
from torch import nn
from tqdm import tqdm

from ..errors import ConfigError
from .core import BNMode, attack_mode, perturb, pgd


class Attack(ABC):
    """Base class: holds the model and settings; ``__call__`` batches and moves inputs."""

    name: ClassVar[str]
    white_box: ClassVar[bool] = True

    def __init__(self, model: nn.Module, *, eps: float, batch_size: int = 512) -> None:
        if eps < 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        self.model = model
        self.eps = eps
        self.batch_size = batch_size

    @abstractmethod
    def perturb_batch(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Adversarial examples for one batch already on the model's device."""

    def __call__(self, x: torch.Tensor, y: torch.Tensor, *, progress: str | None = None) -> torch.Tensor:
        """Adversarial examples for ``x`` in batches; ``progress`` names a progress bar over the batches."""
        device = next(self.model.parameters()).device
        starts = range(0, x.shape[0], self.batch_size)
        if progress is not None:
            starts = tqdm(starts, desc=progress, unit="batch", leave=False, dynamic_ncols=True)
        out = [self.perturb_batch(x[start:start + self.batch_size].to(device), y[start:start + self.batch_size].to(device))
               for start in starts]
        if len(out) == 1:
            return out[0].to(x.device)
        return torch.cat(out).to(x.device) if out else x.clone()

    def __repr__(self) -> str:
        settings = ", ".join(f"{k}={v}" for k, v in vars(self).items() if k not in ("model", "batch_size"))
        return f"{type(self).__name__}({settings})"


ATTACKS: dict[str, type[Attack]] = {}


def register_attack(cls: type[Attack]) -> type[Attack]:
    ATTACKS[cls.name] = cls
    return cls


def build_attack(name: str, model: nn.Module, **settings) -> Attack:
    try:
        cls = ATTACKS[name]
    except KeyError:
        raise ConfigError(f"unknown attack {name!r}; known: {', '.join(sorted(ATTACKS))}") from None
    return cls(model, **settings)


@register_attack
class PGD(Attack):
    """Madry et al.'s PGD: Linf or L2, random start, restarts, targeted, any objective."""

    name = "pgd"

    def __init__(self, model: nn.Module, *, eps: float, steps: int = 20, step_size: float | None = None,
                 norm: str = "linf", objective: str = "ce", random_start: bool = True, restarts: int = 1,
                 targeted: bool = False, bn_mode: BNMode = "eval", batch_size: int = 512) -> None:
        super().__init__(model, eps=eps, batch_size=batch_size)
        self.steps = steps
        self.step_size = step_size if step_size is not None else 2.5 * eps / max(steps, 1)
        self.norm = norm
        self.objective = objective
        self.random_start = random_start
        self.restarts = restarts
        self.targeted = targeted
        self.bn_mode = bn_mode

    def perturb_batch(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return pgd(self.model, x, y, eps=self.eps, step_size=self.step_size, steps=self.steps,
                   threat=self.norm, objective=self.objective, start="uniform" if self.random_start else "none",
                   restarts=self.restarts, targeted=self.targeted, bn_mode=self.bn_mode)


@register_attack
class FGSM(PGD):
    """Goodfellow et al.'s single signed-gradient step of size eps."""

    name = "fgsm"

    def __init__(self, model: nn.Module, *, eps: float, **settings) -> None:
        super().__init__(model, eps=eps, steps=1, step_size=eps, random_start=False, **settings)


@register_attack
class FGSMRandomStart(PGD):
    """Wong et al.'s "fast is better than free": uniform start, one step of 1.25 eps."""

    name = "fgsm_rs"

    def __init__(self, model: nn.Module, *, eps: float, **settings) -> None:
        super().__init__(model, eps=eps, steps=1, step_size=1.25 * eps, random_start=True, **settings)


@register_attack
class DRA(Attack):
    """Dynamically Regulated Adversary (AFT-DRA paper, Algorithm 1).

    T steps of ``alpha * g / ||g||_1`` with ``alpha = budget / T``; then only the top-``p`` fraction
    of input values, ranked by the gradient magnitude at the final iterate, keep their perturbation
    and the rest go back to the clean value.

    Units (the paper leaves them open): ``eps`` is the *mean* absolute perturbation per input value,
    in pixels in [0, 1], so the L1 budget is ``eps * C * H * W``. This is the reading under which the
    paper's numbers hang together: DRA at eps is then comparable to Linf PGD at eps (whose L1 norm is
    at most ``eps * C * H * W``), and the paper finds DRA eps = 1/255 about as strong as PGD eps =
    2.55/255 on CIFAR-10. A raw L1 budget of 1/255 per image would be no attack at all.
    """

    name = "dra"

    def __init__(self, model: nn.Module, *, eps: float, steps: int = 20, p: float = 2 / 3,
                 bn_mode: BNMode = "eval", batch_size: int = 512) -> None:
        super().__init__(model, eps=eps, batch_size=batch_size)
        if not 0.0 < p <= 1.0:
            raise ValueError(f"p must be in (0, 1], got {p}")
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        self.steps = steps
        self.p = p
        self.bn_mode = bn_mode

    def perturb_batch(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        budget = self.eps * x[0].numel()
        with attack_mode(self.model, self.bn_mode):
            x_adv, _ = perturb(self.model, x, y, eps=budget, step_size=budget / self.steps,
                               steps=self.steps, threat="l1_dra", start="none")
            # Line 4 of Algorithm 1: rank by the gradient at the current (final) iterate.
            _, final_grad = perturb(self.model, x_adv, y, eps=0.0, step_size=0.0, steps=1,
                                    threat="l1_dra", start="none")
        return keep_top_fraction(x, x_adv, final_grad.abs(), self.p)


def keep_top_fraction(x: torch.Tensor, x_adv: torch.Tensor, saliency: torch.Tensor, p: float) -> torch.Tensor:
    """Keep ``x_adv`` on the top-``p`` fraction of values per sample by ``saliency``, ``x`` elsewhere."""
    flat = saliency.flatten(1)
    k = max(1, int(round(p * flat.shape[1])))
    keep = torch.zeros_like(flat, dtype=torch.bool).scatter_(1, flat.topk(k, dim=1).indices, True)
    return torch.where(keep.view_as(x), x_adv, x)


class _PyAutoAttack(Attack):
    """Base for attacks run by ``pyautoattack`` (its own APGD, FAB and Square implementations)."""

    attack_list: ClassVar[list[str] | None] = None

    def __init__(self, model: nn.Module, *, eps: float, norm: str = "linf", seed: int = 0,
                 version: str = "standard", attacks: list[str] | None = None, batch_size: int = 500) -> None:
        super().__init__(model, eps=eps, batch_size=batch_size)
        self.norm = norm
        self.seed = seed
        self.version = version  # pyautoattack's standard | plus | rand; ignored with a custom attack list
        self.attacks = attacks if attacks is not None else self.attack_list
        # What pyautoattack's own sanity checks warned about (zero gradients, outputs that are not
        # logits, randomness): a sign that its numbers overstate robustness, so it belongs in the report.
        self.check_warnings: list[str] = []

    def perturb_batch(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        from pyautoattack import AutoAttack

        norms = {"linf": "Linf", "l2": "L2", "l1": "L1"}
        version = "custom" if self.attacks is not None else self.version
        with attack_mode(self.model, "eval"), _collected_warnings(_AUTOATTACK_LOGGER) as warned:
            runner = AutoAttack(self.model, norm=norms[self.norm], eps=self.eps, version=version,
                                attacks=self.attacks if version == "custom" else None,
                                device=x.device, seed=self.seed)
            if version == "custom":
                # pyautoattack leaves a custom list at its constructor defaults (APGD-CE with 5
                # restarts); run it with the standard version's settings instead, so that a custom
                # list is exactly a subset of standard AutoAttack.
                runner._set_version("standard")
                runner.attacks_to_run = self.attacks
            x_adv, _ = runner.run_standard_evaluation(x, y, batch_size=self.batch_size)
        self.check_warnings += warned
        return x_adv


_AUTOATTACK_LOGGER = "auto-attack"  # the logger pyautoattack's checks write to
_ZERO_GRADIENT = re.compile(r"there are (\d+) points with zero gradient")


@contextlib.contextmanager
def _collected_warnings(logger_name: str) -> Iterator[list[str]]:
    """Collect what ``logger_name`` warns inside the block. With a handler of its own the logger no
    longer falls back to printing on stderr; records still propagate to handlers the user configured."""
    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    logger, handler = logging.getLogger(logger_name), Collect(logging.WARNING)
    logger.addHandler(handler)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)


def summarize_check_warnings(messages: list[str], n: int) -> str:
    """pyautoattack's check warnings for an attack on ``n`` images, in one clause ("" if none)."""
    found = [(_ZERO_GRADIENT.search(m), m) for m in messages]
    zero = [int(match.group(1)) for match, _ in found if match]
    parts = [f"zero gradients at up to {max(zero)} of {n} images"] if zero else []
    parts += sorted({m.split("!")[0].split(". ")[0].strip() for match, m in found if not match})
    return f"pyautoattack's checks warned: {'; '.join(parts)} (a sign of gradient masking)" if parts else ""


@register_attack
class AutoAttackStandard(_PyAutoAttack):
    """Croce & Hein's AutoAttack, standard version (APGD-CE, APGD-T, FAB-T, Square), or a custom list."""

    name = "autoattack"


@register_attack
class APGD(_PyAutoAttack):
    """APGD on cross-entropy and DLR (the gradient half of AutoAttack)."""

    name = "apgd"
    attack_list = ["apgd-ce", "apgd-dlr"]


@register_attack
class Square(_PyAutoAttack):
    """Andriushchenko et al.'s Square attack: score-based black-box, 5000 queries."""

    name = "square"
    white_box = False
    attack_list = ["square"]


@torch.no_grad()
def predicted_classes(model: nn.Module, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Per-image top-1 class (int64, on the CPU) of ``model`` in eval mode (restored afterwards)."""
    device = next(model.parameters()).device
    classes = []
    with attack_mode(model, "eval"):
        for start in range(0, x.shape[0], batch_size):
            classes.append(model(x[start:start + batch_size].to(device)).argmax(1).cpu())
    return torch.cat(classes) if classes else torch.zeros(0, dtype=torch.int64)


def correct_flags(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Per-image top-1 correctness (bool, on the CPU) of ``model`` in eval mode (restored afterwards)."""
    return predicted_classes(model, x, batch_size) == y.cpu()


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> float:
    """Top-1 accuracy of ``model`` on tensors ``x``, ``y``."""
    return correct_flags(model, x, y, batch_size).float().mean().item() if x.shape[0] else 0.0

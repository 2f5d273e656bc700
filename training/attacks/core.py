"""The one PGD core that every gradient attack and every training recipe calls.

An attack is a choice of three things, each from a registry:

* an *objective* to maximise per sample (``OBJECTIVES``: cross-entropy, TRADES' KL to the clean
  output, the CW margin, DLR),
* a *threat model* (``THREAT_MODELS``: Linf, L2, and the L1-normalised step of DRA), which says how
  to start, how to step along the gradient and how to project back,
* the loop settings (eps, step size, steps, restarts, start, targeted).

``perturb`` runs one start of the loop; ``pgd`` adds restarts and keeps, per sample, the worst
case found. FGSM, FGSM-RS, PGD and DRA (``attacks.py``) are thin settings of these two functions.

Model state is explicit: ``attack_mode`` puts the model in eval mode (or keeps BatchNorm in train
mode for recipes that want batch statistics, restoring the running statistics afterwards) and
restores the caller's mode on exit. Gradients are taken with respect to the input only, so the
attack never touches parameter ``.grad``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

BNMode = Literal["eval", "train"]

# ----------------------------------------------------------------------------------------------
# Objectives: (logits of the perturbed input, labels, logits of the clean input) -> loss per sample


def _ce(logits: torch.Tensor, y: torch.Tensor, clean_logits: torch.Tensor | None) -> torch.Tensor:
    return F.cross_entropy(logits, y, reduction="none")


def _kl_to_clean(logits: torch.Tensor, y: torch.Tensor, clean_logits: torch.Tensor | None) -> torch.Tensor:
    # TRADES' inner maximisation: KL(f(x) || f(x')), labels unused.
    if clean_logits is None:
        raise ValueError("the 'kl' objective needs the clean logits")
    p_clean = F.softmax(clean_logits, dim=1)
    return (p_clean * (F.log_softmax(clean_logits, dim=1) - F.log_softmax(logits, dim=1))).sum(1)


def _largest_other(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf")).amax(1)


def _margin(logits: torch.Tensor, y: torch.Tensor, clean_logits: torch.Tensor | None) -> torch.Tensor:
    # Carlini-Wagner margin: positive once the input is misclassified.
    return _largest_other(logits, y) - logits.gather(1, y[:, None]).squeeze(1)


def _dlr(logits: torch.Tensor, y: torch.Tensor, clean_logits: torch.Tensor | None) -> torch.Tensor:
    # Croce & Hein's Difference of Logits Ratio: the margin made invariant to logit scale.
    top = logits.sort(dim=1, descending=True).values
    return _margin(logits, y, None) / (top[:, 0] - top[:, 2] + 1e-12)


Objective = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]
OBJECTIVES: dict[str, Objective] = {"ce": _ce, "kl": _kl_to_clean, "margin": _margin, "dlr": _dlr}


def objective_function(objective: str | Objective) -> Objective:
    """A named objective, or a recipe's own per-sample callable (ACT maximises its L_G)."""
    return objective if callable(objective) else OBJECTIVES[objective]

# ----------------------------------------------------------------------------------------------
# Threat models


def _per_sample_norm(t: torch.Tensor, p: float) -> torch.Tensor:
    return t.flatten(1).norm(p=p, dim=1).clamp_min(1e-12).view(-1, *([1] * (t.dim() - 1)))


@dataclass(frozen=True)
class ThreatModel:
    name: str
    random_init: Callable[[torch.Tensor, float], torch.Tensor]  # (x, eps) -> delta inside the ball
    ascent: Callable[[torch.Tensor], torch.Tensor]  # gradient -> unit step direction
    project: Callable[[torch.Tensor, float], torch.Tensor]  # (delta, eps) -> delta inside the ball


def _l2_init(x: torch.Tensor, eps: float) -> torch.Tensor:
    direction = torch.randn_like(x)
    radius = torch.rand(x.shape[0], *([1] * (x.dim() - 1)), device=x.device, dtype=x.dtype)
    return eps * radius * direction / _per_sample_norm(direction, 2)


THREAT_MODELS: dict[str, ThreatModel] = {
    "linf": ThreatModel(
        "linf",
        random_init=lambda x, eps: torch.empty_like(x).uniform_(-eps, eps),
        ascent=torch.sign,
        project=lambda d, eps: d.clamp(-eps, eps),
    ),
    "l2": ThreatModel(
        "l2",
        random_init=_l2_init,
        ascent=lambda g: g / _per_sample_norm(g, 2),
        project=lambda d, eps: d * (eps / _per_sample_norm(d, 2)).clamp(max=1.0),
    ),
    # DRA (AFT-DRA, Algorithm 1): steps of alpha * g / ||g||_1. With alpha = eps / T the L1 norm of
    # the total perturbation is at most eps by construction, so there is no separate projection.
    "l1_dra": ThreatModel(
        "l1_dra",
        random_init=lambda x, eps: torch.zeros_like(x),
        ascent=lambda g: g / _per_sample_norm(g, 1),
        project=lambda d, eps: d,
    ),
}

# Where the loop starts: the clean point, uniform in the threat model's ball (Madry et al.), or
# TRADES' tiny Gaussian (its KL objective has zero gradient at the clean point itself).
STARTS: dict[str, Callable[[ThreatModel, torch.Tensor, float], torch.Tensor]] = {
    "none": lambda threat, x, eps: torch.zeros_like(x),
    "uniform": lambda threat, x, eps: threat.random_init(x, eps),
    "trades": lambda threat, x, eps: 0.001 * torch.randn_like(x),
}

# ----------------------------------------------------------------------------------------------
# Model state


@contextlib.contextmanager
def attack_mode(model: nn.Module, bn_mode: BNMode = "eval") -> Iterator[None]:
    """Run an attack with a known model state and give the caller's state back afterwards.

    ``eval``: BatchNorm uses running statistics and dropout is off (the usual choice).
    ``train``: BatchNorm uses batch statistics (Madry et al.'s PGD-AT); the running statistics are
    snapshotted and restored so the attack's many forward passes do not drift them.
    """
    # Per module: a training stage may keep frozen parts in eval mode inside a model in train mode.
    was_training = {module: module.training for module in model.modules()}
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []
    if bn_mode == "eval":
        model.eval()
    elif bn_mode == "train":
        model.train()
        saved = [(buf, buf.detach().clone()) for name, buf in model.named_buffers()
                 if "running_" in name or "num_batches" in name]
    else:
        raise ValueError(f"bn_mode must be 'eval' or 'train', got {bn_mode!r}")
    try:
        yield
    finally:
        with torch.no_grad():
            for buf, value in saved:
                buf.copy_(value)
        for module, training in was_training.items():
            module.training = training


# ----------------------------------------------------------------------------------------------
# The loop


def _input_gradient(model: nn.Module, x_adv: torch.Tensor, y: torch.Tensor, objective: Objective,
                    clean_logits: torch.Tensor | None) -> torch.Tensor:
    """d(sum of the per-sample objective)/d(input): samples are independent, so one backward does all."""
    x_adv = x_adv.detach().requires_grad_(True)
    with torch.enable_grad():
        (grad,) = torch.autograd.grad(objective(model(x_adv).float(), y, clean_logits).sum(), x_adv)
    return grad


def perturb(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    step_size: float,
    steps: int,
    threat: str = "linf",
    objective: str | Objective = "ce",
    start: str = "uniform",
    targeted: bool = False,
    clean_logits: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One start of projected gradient ascent. Returns ``(x_adv, gradient at x_adv)``.

    The model is called as it is (see ``attack_mode``). For a targeted attack ``y`` holds the
    targets and the objective is minimised. ``x_adv`` always stays in [0, 1].
    """
    threat_model = THREAT_MODELS[threat]
    objective_fn = objective_function(objective)
    signed_step = -step_size if targeted else step_size  # a targeted attack descends on the target's loss
    x = x.detach()
    x_adv = (x + threat_model.project(STARTS[start](threat_model, x, eps), eps)).clamp(0.0, 1.0)
    grad = None
    for _ in range(steps):
        grad = _input_gradient(model, x_adv, y, objective_fn, clean_logits)
        delta = threat_model.project(x_adv - x + signed_step * threat_model.ascent(grad), eps)
        x_adv = (x + delta).clamp_(0.0, 1.0)
    return x_adv, grad


def pgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    step_size: float,
    steps: int,
    threat: str = "linf",
    objective: str | Objective = "ce",
    start: str = "uniform",
    restarts: int = 1,
    targeted: bool = False,
    clean_logits: torch.Tensor | None = None,
    bn_mode: BNMode = "eval",
) -> torch.Tensor:
    """PGD with restarts: per sample, keep the start that fools the model, else the highest loss.

    A restart attacks only the samples that no earlier start has fooled (what AutoAttack does):
    the result per sample is the same as running every start on every sample, at a fraction of
    the cost once most samples are fooled. The ``kl`` objective compares with the clean logits;
    they are computed here, in the attack's model state, unless the caller passes them.
    """
    if eps < 0 or steps < 0 or restarts < 1:
        raise ValueError(f"need eps >= 0, steps >= 0, restarts >= 1 (got {eps}, {steps}, {restarts})")
    objective_fn = objective_function(objective)
    sign = -1.0 if targeted else 1.0
    with attack_mode(model, bn_mode):
        if objective == "kl" and clean_logits is None:
            with torch.no_grad():
                clean_logits = model(x).float()
        best, best_score = x.detach().clone(), torch.full((x.shape[0],), float("-inf"), device=x.device)
        todo = torch.arange(x.shape[0], device=x.device)  # samples no start has fooled yet
        for _ in range(restarts):
            clean_todo = None if clean_logits is None else clean_logits[todo]
            x_adv, _ = perturb(model, x[todo], y[todo], eps=eps, step_size=step_size, steps=steps, threat=threat,
                               objective=objective, start=start, targeted=targeted, clean_logits=clean_todo)
            if restarts == 1:
                return x_adv
            with torch.no_grad():
                logits = model(x_adv).float()
                success = (logits.argmax(1) == y[todo]) if targeted else (logits.argmax(1) != y[todo])
                # Success dominates, then the objective breaks ties.
                score = sign * objective_fn(logits, y[todo], clean_todo) + 1e6 * success.float()
            better = score > best_score[todo]
            best[todo[better]] = x_adv[better]
            best_score[todo[better]] = score[better]
            todo = todo[~success]
            if todo.numel() == 0:
                break
    return best

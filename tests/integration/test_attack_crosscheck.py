"""Our attack core against a second implementation: torchattacks, on the same trained model and images.

A bug in the PGD core (a wrong sign, a lost projection, a loss that does not reach the input)
would make every robustness figure of the project too high, and no test of the core against
itself would notice. Here the project's PGD with the cross-entropy, CW-margin and DLR losses must
agree with torchattacks' ``PGD`` and its ``UPGD`` with ``loss="margin"`` / ``"dlr"`` (its PGD on
Carlini & Wagner's margin, kappa 0; ``torchattacks.CW`` itself is the L2 optimisation attack, another
threat model) within the paired 95% interval, at an eps where the model is neither fully robust nor
fully broken. A deliberately broken attack must fail the same check, so the check can fail.
"""

from __future__ import annotations

import pytest
import torch
from helpers import FAINT, learnable_images

from training.attacks import PGD, correct_flags
from training.stats import paired_difference, proportion

EPS, STEPS = 0.02, 20  # at this eps PGD leaves ~58% of the held-out images correct: room to disagree both ways

STEP = 2.5 * EPS / STEPS  # the step PGD takes by default
torchattacks = pytest.importorskip(
    "torchattacks", reason="needs the torchattacks package (`make install` installs it with --no-deps)")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def held_out() -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = learnable_images(200, seed=11, contrast=FAINT)
    return torch.from_numpy(images).float().div(255).unsqueeze(1), torch.from_numpy(labels).long()


def _flags(model, x_adv, y) -> list[bool]:
    return correct_flags(model, x_adv, y).tolist()


def _agree(ours: list[bool], theirs: list[bool]) -> bool:
    return paired_difference(ours, theirs).verdict == "no detectable difference"


@pytest.mark.parametrize("objective, loss", [("ce", None), ("margin", "margin"), ("dlr", "dlr")])
def test_our_pgd_agrees_with_torchattacks(objective, loss, trained_smallcnn, held_out) -> None:
    x, y = held_out
    torch.manual_seed(0)
    ours = _flags(trained_smallcnn, PGD(trained_smallcnn, eps=EPS, steps=STEPS, step_size=STEP, objective=objective)(x, y), y)
    theirs_attack = (torchattacks.PGD(trained_smallcnn, eps=EPS, alpha=STEP, steps=STEPS, random_start=True)
                     if loss is None else
                     torchattacks.UPGD(trained_smallcnn, eps=EPS, alpha=STEP, steps=STEPS, random_start=True, loss=loss,
                                       decay=0.0))
    torch.manual_seed(1)  # another random start: agreement must not depend on sharing one
    theirs = _flags(trained_smallcnn, theirs_attack(x, y), y)
    clean = _flags(trained_smallcnn, x, y)
    # Not a trivial agreement: both attacks break a good share of the images, and not all of them.
    assert proportion(clean).value >= 0.95
    assert 0.2 < proportion(ours).value < 0.9 and 0.2 < proportion(theirs).value < 0.9
    assert paired_difference(ours, clean).verdict == "worse"
    assert _agree(ours, theirs), paired_difference(ours, theirs)


def test_the_crosscheck_catches_a_broken_attack(trained_smallcnn, held_out) -> None:
    x, y = held_out
    torch.manual_seed(0)
    theirs = _flags(trained_smallcnn, torchattacks.PGD(trained_smallcnn, eps=EPS, alpha=STEP, steps=STEPS,
                                                       random_start=True)(x, y), y)
    # Gradient descent on the true label's loss (a sign bug): it makes the images *easier*.
    broken = _flags(trained_smallcnn, PGD(trained_smallcnn, eps=EPS, steps=STEPS, step_size=STEP, targeted=True)(x, y), y)
    assert paired_difference(broken, theirs).verdict == "better"
    assert not _agree(broken, theirs)

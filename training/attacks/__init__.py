"""Attacks: one PGD core (``core``) and the named attacks built on it (``attacks``)."""

from .attacks import (
    APGD,
    ATTACKS,
    DRA,
    FGSM,
    PGD,
    Attack,
    AutoAttackStandard,
    FGSMRandomStart,
    Square,
    accuracy,
    build_attack,
    correct_flags,
    keep_top_fraction,
)
from .core import OBJECTIVES, THREAT_MODELS, attack_mode, perturb, pgd

__all__ = [
    "ATTACKS", "APGD", "DRA", "FGSM", "PGD", "Attack", "AutoAttackStandard", "FGSMRandomStart", "OBJECTIVES",
    "Square", "THREAT_MODELS", "accuracy", "correct_flags", "attack_mode", "build_attack", "keep_top_fraction", "perturb", "pgd",
]

"""DUCAT's class pairing: which of the 2C outputs is the dummy class of each real class, and its file.

The data part of ``training.dummy_classes`` (which holds DUCAT's losses and modules): torch is imported
only by the methods that make torch tensors, so the serving runtime reads and applies a pairing with
numpy alone.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import CheckpointError

if TYPE_CHECKING:
    import torch

PAIRING_FILE = "pairing.json"  # in a DUCAT run folder: {"dummy_of": ClassPairing.to_list()}


@dataclass(frozen=True)
class ClassPairing:
    """``dummy_of[k]``: the output index in [C, 2C) of real class k's dummy class."""

    dummy_of: tuple[int, ...]

    def __post_init__(self) -> None:
        c = len(self.dummy_of)
        if c < 1 or sorted(self.dummy_of) != list(range(c, 2 * c)):
            raise ValueError(f"a class pairing maps the C real classes one-to-one onto the outputs "
                             f"C..2C-1; got {list(self.dummy_of)}")

    @property
    def num_classes(self) -> int:
        """C, the number of real classes."""
        return len(self.dummy_of)

    @property
    def is_identity(self) -> bool:
        return self.dummy_of == tuple(range(self.num_classes, 2 * self.num_classes))

    @property
    def real_class_of(self) -> tuple[int, ...]:
        """For each of the 2C outputs, the real class it counts for (the projection of Eq. 6)."""
        real_of = list(range(2 * self.num_classes))
        for k, dummy in enumerate(self.dummy_of):
            real_of[dummy] = k
        return tuple(real_of)

    @classmethod
    def identity(cls, num_classes: int) -> ClassPairing:
        """The paper's layout (and its authors' code): class k's dummy is output k + C."""
        return cls(tuple(range(num_classes, 2 * num_classes)))

    @classmethod
    def random(cls, num_classes: int, seed: int) -> ClassPairing:
        """A secret pairing: a random permutation of the dummy outputs, fixed by ``seed`` (torch's generator, so
        that a seed keeps giving the pairing it gave)."""
        import torch

        generator = torch.Generator().manual_seed(seed)
        return cls(tuple((torch.randperm(num_classes, generator=generator) + num_classes).tolist()))

    def to_list(self) -> list[int]:
        return list(self.dummy_of)

    @classmethod
    def from_list(cls, dummy_of: list[int]) -> ClassPairing:
        return cls(tuple(int(k) for k in dummy_of))

    def dummy_index(self, device: torch.device | str | None = None) -> torch.Tensor:
        """``dummy_of`` as a long tensor: ``logits[:, dummy_index]`` are the dummy logits in real-class order."""
        import torch

        return torch.tensor(self.dummy_of, dtype=torch.long, device=device)

    def real_class_index(self, device: torch.device | str | None = None) -> torch.Tensor:
        """``real_class_of`` as a long tensor."""
        import torch

        return torch.tensor(self.real_class_of, dtype=torch.long, device=device)


def read_pairing(path: Path) -> ClassPairing:
    """The pairing stored at ``path`` (a ``PAIRING_FILE``)."""
    try:
        return ClassPairing.from_list(json.loads(Path(path).read_text())["dummy_of"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{path} does not hold a DUCAT class pairing: {err}") from err

"""The staged backbone contract every architecture follows.

A network is ``normalize -> stem -> stages[0] -> ... -> stages[-1] -> pool -> classifier``.
Recipes rely on this shape instead of knowing architectures:

* DH-AT splits the network at ``attach_point`` (the number of stages that the two heads share),
* THAT takes ``embed(x)``, the pooled embedding that feeds the classifier,
* DUCAT widens ``classifier`` from C to 2C outputs with ``widen_classifier``.

Inputs are always pixels in [0, 1]; normalisation is the first layer so that attacks work in
pixel space and exported graphs take raw pixels.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class Normalize(nn.Module):
    """Per-channel ``(x - mean) / std`` held as buffers, so it travels with the weights."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class StagedNet(nn.Module):
    """An ordered list of stages plus a final linear classifier.

    ``attach_point`` is the number of leading stages that a second head shares with the main
    head (DH-AT): for ResNets and WRNs the end of the first residual group, for SmallCNN the end of
    its first conv block.
    """

    def __init__(
        self,
        *,
        normalize: nn.Module,
        stem: nn.Module,
        stages: Sequence[nn.Module],
        pool: nn.Module,
        classifier: nn.Linear,
        attach_point: int = 1,
    ) -> None:
        super().__init__()
        if not 0 < attach_point < len(stages):
            raise ValueError(f"attach_point must be in 1..{len(stages) - 1}, got {attach_point}")
        self.normalize = normalize
        self.stem = stem
        self.stages = nn.ModuleList(stages)
        self.pool = pool
        self.classifier = classifier
        self.attach_point = attach_point

    @property
    def embedding_dim(self) -> int:
        return self.classifier.in_features

    @property
    def num_outputs(self) -> int:
        return self.classifier.out_features

    def trunk(self, x: torch.Tensor, upto: int | None = None) -> torch.Tensor:
        """Pixels -> the activation after ``stages[:upto]`` (all stages when ``upto`` is None)."""
        h = self.stem(self.normalize(x))
        for stage in self.stages[:upto]:
            h = stage(h)
        return h

    def head(self, h: torch.Tensor, start: int) -> torch.Tensor:
        """The activation after ``stages[:start]`` -> pooled embedding."""
        for stage in self.stages[start:]:
            h = stage(h)
        return self.pool(h)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Pixels -> the pooled embedding that feeds ``classifier``."""
        return self.pool(self.trunk(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))

    def widen_classifier(self, factor: int = 2, bias_offset: float = -20.0) -> None:
        """Grow the classifier from C to ``factor * C`` outputs (DUCAT's dummy classes).

        The first C rows keep their weights. The new rows copy the original weights and their bias
        plus ``bias_offset`` (<= 0), so every prediction of a trained model is unchanged at the start
        (at 0 a tie, which recovers to the real class) while the dummy rows already point in a
        useful direction.
        """
        old = self.classifier
        c = old.out_features
        new = nn.Linear(old.in_features, factor * c, bias=True).to(old.weight.device, old.weight.dtype)
        with torch.no_grad():
            new.weight.copy_(old.weight.repeat(factor, 1))
            bias = old.bias if old.bias is not None else torch.zeros(c, device=old.weight.device)
            new.bias[:c].copy_(bias)
            new.bias[c:].copy_(bias.repeat(factor - 1) + bias_offset)
        self.classifier = new

"""DH-AT's dual head network (Jiang et al., "Dual Head Adversarial Training", Section III-B).

A base network (``main``: trunk + main head) gets a second head attached at its ``attach_point``
(the end of the first residual group / conv block), and a lightweight aggregator CNN combines the
logits of the two heads. The trunk up to the attach point runs once and feeds both heads.

* symmetric: the second head has the same layers as the main head (Fig. 2),
* asymmetric: the second head comes from a shallower architecture, e.g. the stages of a
  ResNet-18 after its first group beside a ResNet-34 main network (Fig. 3).

Each serving mode is a ``HeadView``: ``main`` runs only trunk + main head (the second head and the
aggregator never run), ``second`` runs trunk + second head, ``both`` runs the aggregator over both.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .base import StagedNet

# What a DualHeadNet can compute: one serving mode each, and ``heads``: the aggregated, main and
# second logits stacked [B, 3, C] from one trunk pass (what the ``both`` mode exports, so the
# server can also report whether the heads disagree).
OUTPUTS = ("main", "second", "both", "heads")


class Aggregator(nn.Module):
    """The lightweight CNN that merges the two heads' logits (Section III-B, Figs. 4-6).

    As the papers README settles it, for C classes and P = C(C-1)/2 class pairs:

    1. stack the logits into a 1 x C x 2 map (class x head),
    2. head-wise conv: 8 kernels of 1x2 over the head axis -> 8 x C, then BN + ReLU,
    3. class-wise conv: 16 kernels of size 2, each applied to every class pair (i < j) of every
       one of the 8 head-wise maps -> 16 x 8 x P (one kernel is shared by the 8 maps, as in Fig. 6),
    4. average pool with kernel 2 and stride 2 over the 16-kernel axis -> 8 x 8 x P,
    5. flatten (64 P values: 2880 for C = 10) and a fully connected layer to C scores.
    """

    HEAD_KERNELS = 8
    PAIR_KERNELS = 16

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"the aggregator needs at least 2 classes, got {num_classes}")
        self.num_classes = num_classes
        self.num_pairs = num_classes * (num_classes - 1) // 2
        self.head_conv = nn.Conv2d(1, self.HEAD_KERNELS, kernel_size=(1, 2))
        self.head_bn = nn.BatchNorm2d(self.HEAD_KERNELS)
        self.pair_conv = nn.Conv2d(1, self.PAIR_KERNELS, kernel_size=(1, 2))
        # Flat (i0, j0, i1, j1, ...) over the pairs i < j in row-major order. Derived from C, so not
        # part of the checkpoint (persistent=False); a buffer so that .to(device) moves it.
        pairs = torch.triu_indices(num_classes, num_classes, offset=1).t().reshape(-1)
        self.register_buffer("pairs", pairs, persistent=False)
        self.fc = nn.Linear(self.feature_dim, num_classes)

    @property
    def feature_dim(self) -> int:
        """The length of the flattened features that feed the FC layer (2880 for C = 10)."""
        return (self.PAIR_KERNELS // 2) * self.HEAD_KERNELS * self.num_pairs

    def features(self, main_logits: torch.Tensor, second_logits: torch.Tensor) -> torch.Tensor:
        """Two ``(N, C)`` logit batches -> the ``(N, feature_dim)`` features before the FC layer."""
        n = main_logits.shape[0]
        logits = torch.stack([main_logits, second_logits], dim=-1).unsqueeze(1)  # N x 1 x C x 2
        head_maps = F.relu(self.head_bn(self.head_conv(logits))).reshape(n, self.HEAD_KERNELS, self.num_classes)
        # Row c * P + p holds (map_c[i_p], map_c[j_p]): one row per (head-wise map, class pair).
        pair_rows = head_maps[:, :, self.pairs].reshape(n, 1, self.HEAD_KERNELS * self.num_pairs, 2)
        pair_maps = self.pair_conv(pair_rows)  # N x 16 x (8 P) x 1
        # Average pool, kernel 2 and stride 2, along the 16-kernel axis: kernels 2a and 2a+1 merge.
        pooled = pair_maps.reshape(n, self.PAIR_KERNELS // 2, 2, -1).mean(2)
        return pooled.flatten(1)

    def forward(self, main_logits: torch.Tensor, second_logits: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(main_logits, second_logits))


class SecondHead(nn.Module):
    """The stages after the attach point, then pool and classifier: activation -> logits.

    Laid out like a ``StagedNet``'s head (``stages``, ``pool``, ``classifier``) so that a symmetric
    second head's stage ``i`` lines up with the main network's stage ``attach_point + i``.
    """

    def __init__(self, stages: Sequence[nn.Module], pool: nn.Module, classifier: nn.Linear) -> None:
        super().__init__()
        self.stages = nn.ModuleList(stages)
        self.pool = pool
        self.classifier = classifier

    @classmethod
    def from_net(cls, net: StagedNet, start: int) -> SecondHead:
        """Deep copies of ``net``'s stages from ``start`` on, its pool and its classifier."""
        return cls([copy.deepcopy(stage) for stage in net.stages[start:]], copy.deepcopy(net.pool),
                   copy.deepcopy(net.classifier))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for stage in self.stages:
            h = stage(h)
        return self.classifier(self.pool(h))


def _attach_shape(net: StagedNet, input_shape: Sequence[int]) -> torch.Size:
    """The shape of ``net``'s activation at its attach point for one input of ``input_shape``."""
    was_training = net.training
    net.eval()  # a one-image batch through BatchNorm in train mode would also move its statistics
    with torch.no_grad():
        shape = net.trunk(torch.zeros(1, *input_shape), upto=net.attach_point).shape
    net.train(was_training)
    return shape


class DualHeadNet(nn.Module):
    """``main`` (a whole ``StagedNet``) + ``second_head`` at ``main.attach_point`` + ``aggregator``.

    ``forward(x, output)`` computes ``output`` in ``OUTPUTS``; the default ``both`` is the
    aggregator's scores over both heads, from one pass of the shared trunk. The ``output`` keyword
    lets training reach one head through a DistributedDataParallel wrapper of the whole network.
    """

    def __init__(self, main: StagedNet, second_head: SecondHead, *, symmetric: bool) -> None:
        super().__init__()
        self.main = main
        self.second_head = second_head
        self.aggregator = Aggregator(main.num_outputs)
        self.symmetric = symmetric

    @classmethod
    def symmetric_from(cls, main: StagedNet) -> DualHeadNet:
        """A second head with the main head's layers, starting as an exact copy of them."""
        return cls(main, SecondHead.from_net(main, main.attach_point), symmetric=True)

    @classmethod
    def asymmetric_from(cls, main: StagedNet, second: StagedNet, input_shape: Sequence[int]) -> DualHeadNet:
        """A second head made of ``second``'s layers after ``second.attach_point`` (its trunk is dropped).

        The two networks must produce the same activation shape at their attach points (a
        ResNet-18 head on a ResNet-34 trunk: 64 channels at full resolution) and the same classes.
        """
        main_shape, second_shape = _attach_shape(main, input_shape), _attach_shape(second, input_shape)
        if main_shape != second_shape:
            raise ConfigError(f"the second head expects {tuple(second_shape[1:])} activations at its attach point, "
                              f"the main network gives {tuple(main_shape[1:])}; pick a second architecture of "
                              f"the same family")
        if second.num_outputs != main.num_outputs:
            raise ConfigError(f"the heads disagree on the classes: {main.num_outputs} vs {second.num_outputs}")
        return cls(main, SecondHead.from_net(second, second.attach_point), symmetric=False)

    @property
    def attach_point(self) -> int:
        return self.main.attach_point

    def copy_main_head_to_second(self) -> None:
        """Make a symmetric second head an exact copy of the main head (weights and BN statistics)."""
        if not self.symmetric:
            raise ValueError("only a symmetric second head has the main head's layers")
        for offset, stage in enumerate(self.second_head.stages):
            stage.load_state_dict(self.main.stages[self.attach_point + offset].state_dict())
        self.second_head.pool.load_state_dict(self.main.pool.state_dict())
        self.second_head.classifier.load_state_dict(self.main.classifier.state_dict())

    def shared(self, x: torch.Tensor) -> torch.Tensor:
        """Pixels -> the trunk's activation at the attach point (what both heads read)."""
        return self.main.trunk(x, upto=self.attach_point)

    def main_head(self, h: torch.Tensor) -> torch.Tensor:
        """Attach-point activation -> the main head's logits."""
        return self.main.classifier(self.main.head(h, self.attach_point))

    def main_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Pixels -> the base network's own logits: trunk + main head, nothing else."""
        return self.main(x)

    def second_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Pixels -> trunk + second head logits."""
        return self.second_head(self.shared(x))

    def forward(self, x: torch.Tensor, output: str = "both") -> torch.Tensor:
        if output == "main":
            return self.main_logits(x)
        if output == "second":
            return self.second_logits(x)
        if output in ("both", "heads"):
            h = self.shared(x)
            main_logits, second_logits = self.main_head(h), self.second_head(h)
            aggregated = self.aggregator(main_logits, second_logits)
            return aggregated if output == "both" else torch.stack([aggregated, main_logits, second_logits], dim=1)
        raise ValueError(f"output must be one of {', '.join(OUTPUTS)}, got {output!r}")

    def view(self, output: str) -> HeadView:
        """The serving-mode module computing ``output`` of this network."""
        return HeadView(self, output)


class HeadView(nn.Module):
    """One output of a ``DualHeadNet`` (or of a DDP wrapper around one) as a pixels -> scores module."""

    def __init__(self, net: nn.Module, output: str) -> None:
        super().__init__()
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {', '.join(OUTPUTS)}, got {output!r}")
        self.net = net
        self.output = output
        # Mirror the network's mode without touching its submodules: a training stage keeps frozen
        # parts in eval mode, and nn.Module.train() would flip them all.
        self.training = net.training

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x, output=self.output)

"""THAT's networks (Wu et al., "Two Head Adversarial Training", Sec. 3).

* ``CleanEncoder`` g(X; W_c): a backbone plus a two-layer projection head to a 128-D, unit-norm
  feature v (MoCo v2's head, the paper's clean encoder). It is trained first and then frozen.
* ``TwoHeadNet`` f(X; W_a): a shared backbone (W_ab) with a ``feature_head`` of two FC layers to a
  128-D unit-norm feature u (W_af) and a ``classifier_head`` (W_ac) whose logits are cosines
  between the normalised embedding and normalised class weights, divided by a learnable
  temperature eta (Eq. 6).
* ``FeatureQueue``: the memory bank of clean features that serve as negatives in Eq. 5, a FIFO
  held in buffers so that checkpoints (and an exact resume) carry it.
* ``THATModel``: all three in one module, the thing the training engine checkpoints.

Both encoders take a ``StagedNet`` and use its pooled embedding (``embed``); the backbone's own
linear classifier is replaced by ``nn.Identity`` because the heads take over its role. An unused
linear layer would get no gradient, which DistributedDataParallel refuses, and would bloat the
checkpoint with weights that nothing reads.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .base import StagedNet

FEATURE_DIM = 128  # the paper's feature size for both encoders (Sec. 3)


class ProjectionHead(nn.Module):
    """Two FC layers with a ReLU between them, then L2 normalisation (MoCo v2's MLP head).

    The hidden layer is as wide as the input embedding, as in MoCo v2 (2048 -> 2048 -> 128 on a
    ResNet-50).
    """

    def __init__(self, in_features: int, out_features: int = FEATURE_DIM) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(in_features, in_features), nn.ReLU(inplace=True),
                                    nn.Linear(in_features, out_features))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.layers(h), dim=1)


class CosineClassifier(nn.Module):
    """Eq. 6's classifier: logit_i = z_hat . w_hat_i / eta, with unit-norm embedding and class weights.

    The temperature eta is learnt; it is stored as its logarithm so that SGD can never make it
    zero or negative.
    """

    def __init__(self, in_features: int, num_classes: int, temperature: float) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"the temperature must be positive, got {temperature}")
        self.weight = nn.Parameter(torch.randn(num_classes, in_features) / math.sqrt(in_features))
        self.log_temperature = nn.Parameter(torch.tensor(math.log(temperature)))

    @property
    def num_classes(self) -> int:
        return self.weight.shape[0]

    @property
    def temperature(self) -> torch.Tensor:
        return self.log_temperature.exp()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        cosines = F.normalize(h, dim=1) @ F.normalize(self.weight, dim=1).T
        return cosines / self.temperature


def _drop_linear_classifier(backbone: StagedNet) -> int:
    """Replace the backbone's linear classifier by the identity; return the embedding width."""
    dim = backbone.embedding_dim
    backbone.classifier = nn.Identity()  # type: ignore[assignment]  # the heads replace it
    return dim


class CleanEncoder(nn.Module):
    """g(X; W_c): backbone -> projection head -> unit-norm 128-D feature.

    ``prototypes`` (only when ``num_classes`` is given) are the class weights of the supervised
    objective the clean encoder may be trained with (a cosine classifier over the 128-D feature, see
    the ``that`` recipe); the paper's self-supervised MoCo v2 encoder, like our instance-discriminative
    one, has none. ``forward`` never uses them.
    """

    def __init__(self, backbone: StagedNet, num_classes: int | None, *, feature_dim: int = FEATURE_DIM,
                 temperature: float = 0.2) -> None:
        super().__init__()
        dim = _drop_linear_classifier(backbone)
        self.backbone = backbone
        self.projection = ProjectionHead(dim, feature_dim)
        self.prototypes = CosineClassifier(feature_dim, num_classes, temperature) if num_classes else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pixels in [0, 1] -> the clean feature v, shape [N, feature_dim], unit norm."""
        return self.projection(self.backbone.embed(x))

    def class_scores(self, x: torch.Tensor) -> torch.Tensor:
        """The prototype logits of the clean encoder's supervised training objective."""
        if self.prototypes is None:
            raise ValueError("this clean encoder is trained without labels: it has no class prototypes")
        return self.prototypes(self(x))


class TwoHeadNet(nn.Module):
    """f(X; W_a): a shared backbone with a feature head and a normalised classifier head.

    ``forward`` returns the classifier head's logits (the ``classifier`` serving mode),
    ``features`` the feature head's unit-norm 128-D vector u, ``both`` the pair from one pass of
    the backbone (what training needs).
    """

    def __init__(self, backbone: StagedNet, *, feature_dim: int = FEATURE_DIM, temperature: float = 0.2) -> None:
        super().__init__()
        num_classes = backbone.num_outputs
        dim = _drop_linear_classifier(backbone)
        self.backbone = backbone
        self.feature_head = ProjectionHead(dim, feature_dim)
        self.classifier_head = CosineClassifier(dim, num_classes, temperature)

    @property
    def num_classes(self) -> int:
        return self.classifier_head.num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier_head(self.backbone.embed(x))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.feature_head(self.backbone.embed(x))

    def both(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(u, logits)`` from a single pass through the backbone."""
        h = self.backbone.embed(x)
        return self.feature_head(h), self.classifier_head(h)


class RobustFeatures(nn.Module):
    """The feature head of a ``TwoHeadNet`` as a module of its own (pixels -> u): the query
    encoder of the kNN mode, and what gets exported to ONNX for it."""

    def __init__(self, net: TwoHeadNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.features(x)


class FeatureQueue(nn.Module):
    """A FIFO of unit-norm clean features (MoCo's queue; THAT's memory of negatives for Eq. 5).

    ``features[i]`` is slot i; ``pointer`` is the slot the next feature goes to, so the oldest
    entries are overwritten first. Both are buffers: they are saved and restored with the weights.
    It starts full of random unit vectors, as MoCo's does, so that every step has ``size``
    negatives.
    """

    def __init__(self, size: int, dim: int = FEATURE_DIM) -> None:
        super().__init__()
        if size < 1:
            raise ValueError(f"the queue needs at least one slot, got {size}")
        self.register_buffer("features", F.normalize(torch.randn(size, dim), dim=1))
        self.register_buffer("pointer", torch.zeros((), dtype=torch.long))

    @property
    def size(self) -> int:
        return self.features.shape[0]

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Write ``keys`` [n, dim] over the n oldest entries (wrapping around the end).

        Under torch.distributed every process contributes its keys, gathered in rank order as in
        MoCo, so all processes keep the same queue.
        """
        keys = keys.detach().to(self.features.dtype)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered = [torch.empty_like(keys) for _ in range(dist.get_world_size())]
            dist.all_gather(gathered, keys)
            keys = torch.cat(gathered)
        keys = keys[-self.size:]  # more keys than slots: only the newest survive
        slots = (self.pointer + torch.arange(keys.shape[0], device=keys.device)) % self.size
        self.features[slots] = keys
        self.pointer.copy_((self.pointer + keys.shape[0]) % self.size)

    def snapshot(self) -> torch.Tensor:
        """A copy of the current entries: the loss must not see a later in-place ``enqueue``."""
        return self.features.clone()


Branch = Literal["robust", "clean", "clean_features"]


class THATModel(nn.Module):
    """The clean encoder, the robust two-head network and the queue of clean features.

    ``forward(x, branch)`` is what a training step differentiates through (so that
    DistributedDataParallel sees it): ``"robust"`` gives ``(u, logits)`` of the robust network,
    ``"clean"`` the clean encoder's prototype logits, ``"clean_features"`` its features v. ``clean_features`` is the frozen clean
    encoder at work during robust training: no gradient and no BatchNorm update, whatever mode
    the caller left the module in.
    """

    def __init__(self, clean_encoder: CleanEncoder, robust: TwoHeadNet, queue: FeatureQueue) -> None:
        super().__init__()
        self.clean_encoder = clean_encoder
        self.robust = robust
        self.queue = queue

    def forward(self, x: torch.Tensor, branch: Branch = "robust") -> tuple[torch.Tensor, torch.Tensor] | torch.Tensor:
        if branch == "robust":
            return self.robust.both(x)
        if branch == "clean":
            return self.clean_encoder.class_scores(x)
        if branch == "clean_features":
            return self.clean_encoder(x)
        raise ValueError(f"branch must be 'robust', 'clean' or 'clean_features', got {branch!r}")

    @torch.no_grad()
    def clean_features(self, x: torch.Tensor) -> torch.Tensor:
        """v = g(x) from the frozen clean encoder, in float32."""
        was_training = self.clean_encoder.training
        self.clean_encoder.eval()  # running statistics, and they stay as they are
        try:
            return self.clean_encoder(x).float()
        finally:
            self.clean_encoder.train(was_training)

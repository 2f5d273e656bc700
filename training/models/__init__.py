"""Architectures, all built through one registry on the staged backbone contract."""

from . import resnet_cifar, smallcnn, torchvision_resnet, wideresnet  # noqa: F401  (registers their architectures)
from .base import Normalize, StagedNet
from .registry import ARCHITECTURES, build_model, register_architecture

__all__ = ["ARCHITECTURES", "Normalize", "StagedNet", "build_model", "register_architecture"]

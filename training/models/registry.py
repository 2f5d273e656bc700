"""A timm-style registry: ``@register_architecture`` on a builder, ``build_model(name, ...)`` to make one."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..errors import ConfigError
from .base import StagedNet


@dataclass(frozen=True)
class ArchitectureInfo:
    name: str
    builder: Callable[..., StagedNet]
    input_size: int  # the side length the architecture is designed for (28, 32 or 224)
    description: str


ARCHITECTURES: dict[str, ArchitectureInfo] = {}


def register_architecture(name: str, *, input_size: int, description: str):
    """Register ``builder(num_classes, in_channels, mean, std) -> StagedNet`` under ``name``."""

    def decorator(builder: Callable[..., StagedNet]) -> Callable[..., StagedNet]:
        if name in ARCHITECTURES:
            raise ValueError(f"architecture {name!r} registered twice")
        ARCHITECTURES[name] = ArchitectureInfo(name, builder, input_size, description)
        return builder

    return decorator


def build_model(
    name: str,
    *,
    num_classes: int,
    in_channels: int,
    mean: Sequence[float],
    std: Sequence[float],
) -> StagedNet:
    try:
        info = ARCHITECTURES[name]
    except KeyError:
        known = ", ".join(sorted(ARCHITECTURES))
        raise ConfigError(f"unknown architecture {name!r}; known: {known}") from None
    return info.builder(num_classes=num_classes, in_channels=in_channels, mean=mean, std=std)

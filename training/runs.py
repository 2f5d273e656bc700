"""Loading a finished run: its ``defense.json`` and a model with the run's weights."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import BEST, LAST, CheckpointError, load_tensors, model_tensors, read_defense_json
from .config import TrainConfig
from .data import DatasetSpec
from .recipes import ServingMode, get_recipe


@dataclass
class LoadedRun:
    run_dir: Path
    info: dict[str, Any]  # defense.json
    model: nn.Module  # the recipe's trained module, in eval mode

    @property
    def spec(self) -> DatasetSpec:
        return spec_from_info(self.info)

    def modes(self) -> dict[str, ServingMode]:
        """The run's serving modes, with any artifacts (memory bank, class pairing) from its folder."""
        return get_recipe(self.info["defense"]).modes(self.model, self.run_dir)


def spec_from_info(info: dict[str, Any]) -> DatasetSpec:
    """The dataset facts a model needs, read back from ``defense.json`` (no data is loaded)."""
    return DatasetSpec(name=info["dataset"], class_names=tuple(info["classes"]),
                       input_shape=tuple(info["input_shape"]), mean=tuple(info["normalization"]["mean"]),
                       std=tuple(info["normalization"]["std"]), default_architecture=info["architecture"])


def base_run_dir(run_dir: Path, info: dict[str, Any]) -> Path | None:
    """The folder of the run that ``run_dir`` started from, if it has one and it is still there: the
    path recorded at training (relative to where training ran), else a sibling of the same name
    (run folders moved together)."""
    base = info.get("base")
    if not base:
        return None
    recorded = Path(base["run_dir"])
    for candidate in (recorded, Path(run_dir).parent / recorded.name):
        if (candidate / "defense.json").is_file():
            return candidate
    return None


def load_run(run_dir: str | Path, *, which: str = "best", device: str | torch.device = "cpu") -> LoadedRun:
    """Rebuild the run's model through its recipe and load the ``best`` (or ``last``) weights."""
    run_dir = Path(run_dir)
    info = read_defense_json(run_dir)
    config = TrainConfig(**info["config"])
    model = get_recipe(info["defense"]).build_model(spec_from_info(info), config)
    tensors, _ = load_tensors(run_dir / {"best": BEST, "last": LAST}[which])
    weights = model_tensors(tensors, "model/") if which == "last" else tensors
    try:
        model.load_state_dict(weights)
    except RuntimeError as err:
        raise CheckpointError(f"the weights in {run_dir} do not fit a {info['architecture']} "
                              f"for {info['defense']}: {str(err).splitlines()[0]}") from err
    return LoadedRun(run_dir, info, model.to(device).eval())

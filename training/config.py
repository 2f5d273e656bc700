"""Training configuration: one dataclass, filled from a recipe's preset and then from CLI overrides."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError

# Settings that only say how long a run trains: a run may continue to other values of them, where the epochs it has
# trained keep their learning rates (engine.lengthening_problem).
LENGTH_OF_TRAINING = frozenset({"epochs", "tail_epochs"})


@dataclass
class TrainConfig:
    recipe: str
    preset: str = "quick"
    dataset: str = "fashion_mnist"
    arch: str | None = None  # None: the dataset's default architecture
    data_root: str | None = None
    download: bool = False
    # Optimisation (SGD with momentum, as every paper here uses).
    epochs: int = 1
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    schedule: str = "multistep"  # multistep | cosine | constant
    # A cosine schedule's constant tail: the cosine anneals over the first ``epochs - tail_epochs`` epochs and the
    # last ``tail_epochs`` run at ``tail_lr_factor`` x lr. The tail shows on the validation curve whether more
    # training at a small lr still improves the model, which the anneal's own lift hides (docs/epoch-experiment/).
    tail_epochs: int = 0
    tail_lr_factor: float = 0.1
    milestones: list[int] = field(default_factory=list)  # epochs at which lr *= gamma (multistep)
    gamma: float = 0.1
    # Training adversary (Linf PGD unless the recipe says otherwise).
    eps: float = 0.1
    step_size: float = 0.025
    attack_steps: int = 10
    attack_bn: str = "eval"  # BatchNorm mode while crafting training attacks: eval | train
    # Data budget: train on the first N shuffled training images (None: all).
    train_subset: int | None = None
    # Validation each epoch on images held out of the training set (never the test set).
    val_size: int = 1000
    val_attack_steps: int = 10
    select_by: str = "robust"  # served weights: best validation robust (PGD) or clean accuracy, or the last epoch
    # Multi-stage recipes: the finished run this one starts from (a recipe id in Recipe.bases, or
    # None to train from scratch), the folder holding it (None: that recipe's default run folder
    # under runs/ with the same preset, dataset and architecture), and per-stage overrides of any
    # setting here (e.g. {"aggregator": {"epochs": 1, "lr": 0.02}}).
    base: str | None = None
    base_run: str | None = None
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Recipe-specific hyper-parameters (TRADES' beta, Consistency-AT's lambda and temperature, ...).
    params: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    device: str | None = None  # None: cuda when available, else cpu
    amp: bool = True  # bf16 autocast: whole steps on CUDA; training attacks on CPUs with AMX or AVX512-BF16 (training.devices)
    # NHWC convolutions: faster on CUDA (tensor cores) and on CPUs too (oneDNN; the PGD-AT step x1.8 on the Xeon
    # with AMX, `robustserve bench train-step`); the weights are saved in the usual layout either way.
    channels_last: bool = True
    workers: int = 0

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}

    def updated(self, overrides: dict[str, Any]) -> TrainConfig:
        """A copy with ``overrides`` applied; ``params`` and ``stages`` are merged, unknown keys are an error."""
        unknown = set(overrides) - self.field_names()
        if unknown:
            raise ConfigError(f"unknown training setting(s): {', '.join(sorted(unknown))}")
        merged = {**overrides}
        if "params" in overrides:
            merged["params"] = {**self.params, **overrides["params"]}
        if "stages" in overrides:  # per stage, as params: an override adds to the preset's stage settings
            merged["stages"] = {name: {**self.stages.get(name, {}), **settings}
                                for name, settings in {**self.stages, **overrides["stages"]}.items()}
        return dataclasses.replace(self, **merged)

    def changed_settings(self, recorded: TrainConfig, ignore: frozenset[str] = frozenset()) -> list[str]:
        """The settings (``params.beta``, ``stages.second.select_by``) that these give otherwise than ``recorded``,
        a run's saved ones; ``ignore``: top-level names. Names only, never values (a DUCAT run records the seed of
        its secret pairing). A key only ``recorded`` has is what training filled in (that seed), not a change."""
        def changed(now: Any, then: Any, name: str) -> list[str]:
            if isinstance(now, dict) and isinstance(then, dict):
                return [c for k in sorted(now) for c in changed(now[k], then.get(k), f"{name}.{k}")]
            return [] if now == then else [name]

        names = [c for k in sorted(self.field_names() - ignore - {"stages"})
                 for c in changed(getattr(self, k), getattr(recorded, k), k)]
        # A stage's settings are what its overrides make of the top level's, compared as such (an override that
        # restates a default, THAT's clean encoder's tail_epochs 0, is no change) and only where either run has an
        # override (a top-level change is named once, above).
        for stage in sorted(set(self.stages) | set(recorded.stages)):
            now, then = self.for_stage(stage), recorded.for_stage(stage)
            overrides = (self.stages.get(stage, {}), recorded.stages.get(stage, {}))
            for key in sorted(set(overrides[0]) | set(overrides[1]) - ignore):
                if key == "params":
                    params = set(overrides[0].get("params", {})) | set(overrides[1].get("params", {}))
                    names += [c for p in sorted(params) for c in changed(now.params.get(p), then.params.get(p),
                                                                         f"stages.{stage}.params.{p}")]
                else:
                    names += changed(getattr(now, key), getattr(then, key), f"stages.{stage}.{key}")
        return names

    def for_stage(self, name: str) -> TrainConfig:
        """The settings of stage ``name``: these with its ``stages[name]`` overrides applied."""
        return self.updated(self.stages.get(name, {}))

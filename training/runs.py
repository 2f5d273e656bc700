"""The run folder: one home for its name, its layout, when it is finished, the run it starts from,
its ``defense.json`` and loading it back.

A run folder ``runs/<recipe>-<preset>-<dataset>-<arch>`` holds

* ``last.safetensors``: model weights (``model/...``), optimiser buffers (``optim/...``) and the
  training state as JSON metadata: one file, so one atomic rename moves the whole epoch forward;
* ``best.safetensors``: the weights of the epoch with the best validation score (what is served);
  a multi-stage recipe keeps each earlier stage's best in ``best-<stage>.safetensors``;
* ``defense.json``: what the run is (``defense_info``); ``finished`` once every stage and artifact is done;
* the recipe's artifacts (DUCAT's ``pairing.json``, THAT's memory bank);
* from ``robustserve eval``: ``report.json`` (written last: the evaluation finished), ``report.md``,
  ``curves.png`` and ``eval_rows/`` (one file per finished attack row).

Everything that needs a run folder (training, evaluation, export, packaging, the demo, the
benchmarks) asks this module; none of them needs the training engine to find or read one.
Reading ``defense.json`` lives in the torch-free ``training.run_files`` (imported here), which the
serving worker uses instead of this module and its imports.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .checkpoint import CheckpointError, code_version, load_tensors, model_tensors, weights_digest
from .config import TrainConfig
from .data import DATASETS, DatasetSpec, load_dataset, plain_train_set
from .errors import ConfigError
from .recipes import ServingMode, get_recipe
from .run_files import DEFENSE_JSON, read_defense_json
from .stats import fitted_rise

if TYPE_CHECKING:
    from .recipes import Recipe, Stage

RUNS_ROOT = Path("runs")
LAST = "last.safetensors"
BEST = "best.safetensors"
REPORT_JSON = "report.json"
REPORT_MD = "report.md"
CURVES_PNG = "curves.png"
ROWS_DIR = "eval_rows"
TEST_SUBSET_SEED = 0  # the fixed permutation of the test split every evaluation takes its first n images from


# -- naming and layout ------------------------------------------------------------------------

def run_dir_for(config: TrainConfig, root: Path = RUNS_ROOT) -> Path:
    """The default folder of ``config``'s run: ``<root>/<recipe>-<preset>-<dataset>-<arch>``, the
    architecture being the dataset's default when the config names none."""
    arch = config.arch or DATASETS[config.dataset].default_architecture
    return Path(root) / f"{config.recipe}-{config.preset}-{config.dataset}-{arch}"


def preset_run_dir(recipe: str, preset: str, root: Path = RUNS_ROOT, **settings: Any) -> Path:
    """The default folder of ``recipe``'s run at ``preset`` (with ``settings`` overriding the preset)."""
    return run_dir_for(get_recipe(recipe).config(preset, **settings), root)


def stage_best_file(stages: list[Stage], index: int) -> str:
    """Where a stage keeps its best weights: ``best.safetensors`` (served) for the last stage,
    ``best-<stage>.safetensors`` (the start of the next stage) for earlier ones."""
    return BEST if index == len(stages) - 1 else f"best-{stages[index].name}.safetensors"


def run_finished(run_dir: Path) -> bool:
    """True when ``run_dir`` holds a run whose every stage (and its artifacts) is done."""
    return (Path(run_dir) / DEFENSE_JSON).is_file() and bool(read_defense_json(run_dir).get("finished"))


# -- the run a run starts from ----------------------------------------------------------------

def base_config(config: TrainConfig) -> TrainConfig | None:
    """The settings of the base run ``config`` starts from: the base recipe's preset of the same
    name, on the same data, architecture and seed (None: ``config`` trains from scratch)."""
    if config.base is None:
        return None
    shared = {"dataset": config.dataset, "arch": config.arch, "data_root": config.data_root, "seed": config.seed}
    return get_recipe(config.base).config(config.preset, **{k: v for k, v in shared.items() if v is not None})


def resolve_base_run(config: TrainConfig, root: Path = RUNS_ROOT) -> Path | None:
    """The folder of the finished run ``config`` will start from (None: it trains from scratch)."""
    base = base_config(config)
    if base is None:
        return None
    return Path(config.base_run) if config.base_run is not None else run_dir_for(base, root)


def base_run_dir(run_dir: Path, info: dict[str, Any]) -> Path | None:
    """The folder of the run that the trained ``run_dir`` started from, if it has one and it is still
    there: the path recorded at training (relative to where training ran), else a sibling of the same
    name (run folders moved together)."""
    base = info.get("base")
    if not base:
        return None
    recorded = Path(base["run_dir"])
    for candidate in (recorded, Path(run_dir).parent / recorded.name):
        if (candidate / DEFENSE_JSON).is_file():
            return candidate
    return None


def base_changed(run_dir: Path) -> bool:
    """True when the finished ``run_dir`` started from a base run whose served weights are no longer those it
    started from (the base was trained anew, or lengthened, since); False without a base or when it is gone."""
    info = read_defense_json(run_dir)
    base_dir = base_run_dir(run_dir, info)
    return base_dir is not None and weights_digest(load_run(base_dir).model) != info["base"]["weights_sha256"]


# -- defense.json ------------------------------------------------------------------------------

def defense_info(recipe: Recipe, config: TrainConfig, spec: DatasetSpec, state: dict[str, Any],
                 stages: list[Stage], base: LoadedRun | None) -> dict[str, Any]:
    """The run's ``defense.json``: everything serving and evaluation need to rebuild and describe it.

    ``stages`` lists the base run's stages first (marked with their ``run`` folder), so the
    training time of a defense includes what it was built on.
    """
    base_stages = [{**stage, "run": str(base.run_dir)} for stage in base.info["stages"]] if base else []
    own = [{"name": record["name"], "epochs_done": record["epochs_done"], "best_epoch": record["best_epoch"],
            "trainable": "all" if stage.trainable is None else "part", "history": record["history"]}
           for stage, record in zip(stages, state["stages"])]
    return {
        "defense": recipe.id,
        "description": recipe.description,
        "architecture": config.arch or spec.default_architecture,
        "dataset": spec.name,
        "classes": list(spec.class_names),
        "input_shape": list(spec.input_shape),
        "normalization": {"mean": list(spec.mean), "std": list(spec.std)},
        "preset": config.preset,
        "seed": config.seed,
        "threat_model": {"norm": "linf", "eps": config.eps},
        "base": None if base is None else {"recipe": base.info["defense"], "run_dir": str(base.run_dir),
                                           "weights_sha256": weights_digest(base.model)},
        "stages": base_stages + own,
        "finished": state["finished"],
        "serving_modes": list(recipe.serving_modes),
        "weights": BEST,
        "config": asdict(config),
        "code_version": code_version(),
    }


FLAT_WITHIN = 0.01  # the standard presets' convergence rule: less than 1 point of rise over the last third
VALIDATION_KEYS = ("val_clean_acc", "val_robust_acc")  # the validation figures the rule reads


def validation_rise(info: dict[str, Any]) -> dict[str, Any]:
    """How much the last stage's validation clean and robust accuracy rose over its last third of epochs (from the
    epoch before that third to the last, on the least-squares line through those epochs), and whether the run is
    flat: the rule by which a ``standard`` run counts as converged. Every stage must pass it (both rises under
    ``FLAT_WITHIN``), the base run's included: a short fine-tune of a base that was still rising is not converged
    however flat its own few epochs are. ``rising_stages`` names the stages that fail."""
    rises = {stage["name"]: _last_third_rise(stage["history"]) for stage in info["stages"] if stage["history"]}
    # Rounded: the figures are float32 fractions of the validation images, and ten images more of 1,000 (a point,
    # not less than a point) came out as a rise of 0.00999999.
    rising = [name for name, rise in rises.items()
              if not all(round(rise[key], 6) < FLAT_WITHIN for key in VALIDATION_KEYS)]
    last = rises[info["stages"][-1]["name"]]
    return {**last, "flat": not rising, "rising_stages": rising, "stages": rises}


def describe_rise(rise: dict[str, Any]) -> str:
    """``validation_rise`` in one line: the verdict, then each rising stage's rises over its last third (the last
    stage's when none rises) with their intervals, in points: ``converged (epochs 30-45: clean +0.5 [-0.6, +1.5],
    PGD +0.7 [-0.1, +1.6])`` (the zoo's `act`)."""
    def figure(stage: dict[str, Any], key: str) -> str:
        interval = stage["ci95"][key]
        return f"{100 * stage[key]:+.1f}" + (f" [{100 * interval[0]:+.1f}, {100 * interval[1]:+.1f}]" if interval else "")

    def figures(stage: dict[str, Any]) -> str:
        return (f"epochs {stage['from_epoch']}-{stage['to_epoch']}: clean {figure(stage, 'val_clean_acc')}, "
                f"PGD {figure(stage, 'val_robust_acc')}")

    if rise["flat"]:
        return f"converged ({figures(rise)})"
    return "NOT flat over the last third of " + ", ".join(
        f"{name} ({figures(rise['stages'][name])})" for name in rise["rising_stages"])


def _last_third_rise(history: list[dict[str, Any]]) -> dict[str, Any]:
    # The fitted line, not the last epoch minus the first: one epoch's figure on 1,000 validation images moves by
    # 0.5-1 point from the next (docs/standard-zoo-tail/), so two single epochs made a flat curve "rise" a point
    # about one time in four (ACT: +1.0 at 45 epochs, +1.4 at 60, its fitted line +0.7 and +0.6) and could hide a
    # steady rise behind one low last epoch. With two epochs in the window the line is their difference. The rule
    # reads the rise itself; its interval (+-0.5-1.8 points over 15-20 epochs) says how near the point a verdict is.
    window = history[max(len(history) - len(history) // 3 - 1, 0):]
    epochs = [entry["epoch"] for entry in window]
    rises = {key: fitted_rise(epochs, [entry[key] for entry in window]) for key in VALIDATION_KEYS}
    return {"from_epoch": epochs[0], "to_epoch": epochs[-1], **{key: rise.rise for key, rise in rises.items()},
            "ci95": {key: None if rise.low is None else [rise.low, rise.high] for key, rise in rises.items()}}


def spec_from_info(info: dict[str, Any]) -> DatasetSpec:
    """The dataset facts a model needs, read back from ``defense.json`` (no data is loaded)."""
    return DatasetSpec(name=info["dataset"], class_names=tuple(info["classes"]),
                       input_shape=tuple(info["input_shape"]), mean=tuple(info["normalization"]["mean"]),
                       std=tuple(info["normalization"]["std"]), default_architecture=info["architecture"])


def trained_on(info: dict[str, Any]) -> list[str]:
    """The devices a run's epochs ran on, over all stages of ``defense.json``, in the order first met (an epoch
    from before epochs named their device counts as ``device not recorded``)."""
    devices = [epoch.get("trained_on", "device not recorded") for stage in info.get("stages", [])
               for epoch in stage.get("history", [])]
    return list(dict.fromkeys(devices))


def train_seconds(info: dict[str, Any]) -> float:
    """Total training time of a run: the epochs' ``seconds`` over all stages of ``defense.json``."""
    return float(sum(epoch.get("seconds", 0.0) for stage in info.get("stages", [])
                     for epoch in stage.get("history", [])))


# -- loading -----------------------------------------------------------------------------------

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


def restore_artifacts(run_dir: Path, data_root: str | None = None, device: str | torch.device = "cpu") -> LoadedRun:
    """Rebuild the artifacts a run folder was copied without (the model zoo leaves out THAT's memory bank), or
    that were made from other weights than its best (``Recipe.artifacts_current``): the recipe's own ``finish`` from
    the best weights and the training set (``data_root``, else the run's own), as at the end of training. Returns
    the loaded run (its modes read the restored artifacts)."""
    run = load_run(run_dir, device=device)
    recipe = get_recipe(run.info["defense"])
    if not recipe.artifacts_current(run.model, Path(run_dir)):
        data_root = data_root if data_root is not None else run.info["config"].get("data_root")
        train_set, spec = plain_train_set(run.info["dataset"], data_root)
        with torch.no_grad():
            recipe.finish(run.model, Path(run_dir), train_set, spec, TrainConfig(**run.info["config"]))
    return run


def load_test_subset(info: dict[str, Any], n: int | None, data_root: str | None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The first ``n`` images (all when None) of the fixed permutation of the run's test split:
    ``(x, y, test size)``."""
    dataset, spec = load_dataset(info["dataset"], "test", root=data_root)
    # Evaluating on data the model was not built for would give a silently meaningless number.
    if list(spec.class_names) != list(info["classes"]) or list(spec.input_shape) != list(info["input_shape"]):
        raise ConfigError(f"the {info['dataset']} test set in {data_root or 'the default data root'} has classes "
                         f"{list(spec.class_names)} and shape {list(spec.input_shape)}, but the run was trained on "
                         f"{info['classes']} and {info['input_shape']}")
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(TEST_SUBSET_SEED))[:n]
    items = [dataset[int(i)] for i in order]
    x = torch.stack([image for image, _ in items]) if items else torch.zeros(0, *spec.input_shape)
    return x, torch.tensor([label for _, label in items], dtype=torch.int64), len(dataset)

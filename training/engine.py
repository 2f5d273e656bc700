"""The training engine: data, SGD with the papers' schedules, validation, checkpoints, resume, DDP.

Determinism is by construction rather than by saving RNG state: every epoch re-seeds the global
RNG and the shuffling generator from ``(seed, epoch)``. A run resumed after a crash restarts the
interrupted epoch from its first batch and ends with the same weights as an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from .attacks.attacks import PGD, accuracy, predicted_classes
from .checkpoint import (
    CheckpointError,
    code_version,
    load_optimizer_tensors,
    load_state,
    load_tensors,
    model_tensors,
    optimizer_tensors,
    save_tensors,
    weights_digest,
    write_json,
)
from .config import LENGTH_OF_TRAINING, TrainConfig
from .data import load_dataset, plain_train_set
from .devices import attack_autocast, default_device, step_autocast
from .environment import device_name
from .errors import ConfigError, TrainingDivergedError, cannot_write
from .recipes import Recipe, Stage, StepContext, get_recipe
from .runs import (
    BEST,
    DEFENSE_JSON,
    LAST,
    RUNS_ROOT,
    LoadedRun,
    base_config,
    defense_info,
    load_run,
    resolve_base_run,
    run_dir_for,
    run_finished,
    stage_best_file,
)

# A stage is checked for a collapse to one output once its validation clean accuracy has reached COLLAPSE_LEARNT x
# chance (30% for 10 classes): before that, a network that still predicts one class has not learnt yet.
COLLAPSE_LEARNT = 3.0


def learning_rate(config: TrainConfig, progress: float) -> float:
    """The learning rate at ``progress`` epochs into training (fractional within an epoch)."""
    if config.schedule == "multistep":
        return config.lr * config.gamma ** sum(progress >= m for m in config.milestones)
    if config.schedule == "cosine":
        anneal = config.epochs - config.tail_epochs
        if progress >= anneal and config.tail_epochs:
            return config.lr * config.tail_lr_factor
        return 0.5 * config.lr * (1 + math.cos(math.pi * min(progress / anneal, 1.0)))
    if config.schedule == "constant":
        return config.lr
    raise ConfigError(f"unknown schedule {config.schedule!r}; use multistep, cosine or constant")


def lengthening_problem(saved: TrainConfig, config: TrainConfig, stages: list[Stage], state: dict[str, Any]) -> str | None:
    """Why a run trained with ``saved`` (its checkpoint ``state``) cannot continue exactly under ``config``, which
    may train for longer; None when it can. The epochs already trained must keep their learning rates (a cosine
    stretched over more epochs would not; one given a tail after its anneal does), and only the stage in progress,
    or the last one, may grow: the stages after an earlier one were trained on its weights."""
    for index, (stage, record) in enumerate(zip(stages, state["stages"])):
        then, now, done = saved.for_stage(stage.name), config.for_stage(stage.name), record["epochs_done"]
        if index < state["stage"] and now.epochs != done:
            return (f"its {stage.name} stage would train {now.epochs} epochs instead of its {done}, and the stages "
                    "after it were trained on those")
        # An epoch's steps run at fractional progress in [epoch, epoch + 1).
        if any(not math.isclose(learning_rate(then, p / 4), learning_rate(now, p / 4)) for p in range(4 * done)):
            return (f"the learning rate of the {done} epochs its {stage.name} stage has trained would change "
                    f"({then.epochs} epochs, {then.tail_epochs} of them tail, then; {now.epochs} and {now.tail_epochs} now: "
                    "a cosine run grows exactly by adding as many tail_epochs as epochs)")
    return None


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> Distributed:
        """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; without them training is single-process."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        return cls(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))


def _figure(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def seed_epoch(seed: int, epoch: int) -> torch.Generator:
    """Seed the global RNG (augmentation, attack starts, dropout) and return the shuffling generator."""
    torch.manual_seed(seed * 1_000_003 + epoch)
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


@dataclass
class Split:
    """Which training-set indices train and which are held out for validation (fixed by the seed)."""

    train: torch.Tensor
    val: torch.Tensor

    @classmethod
    def make(cls, n: int, config: TrainConfig) -> Split:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(config.seed))
        val, train = order[:config.val_size], order[config.val_size:]
        if config.train_subset is not None:
            train = train[:config.train_subset]
        return cls(train=train, val=val)


def _stack(dataset: Dataset, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    items = [dataset[int(i)] for i in indices]
    return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items])


class Trainer:
    """Trains one recipe, stage after stage, into one run folder."""

    def __init__(self, config: TrainConfig, run_dir: Path | None = None, *, resume: bool = False,
                 force: bool = False, progress: bool = True, runs_root: Path = RUNS_ROOT) -> None:
        code_version()  # the commit this process runs, read (and cached) before any later commit can change it
        self.recipe: Recipe = get_recipe(config.recipe)
        self.dist = Distributed.from_env()
        self.config = config
        self.train_set, self.spec = load_dataset(config.dataset, "train", root=config.data_root, download=config.download)
        self.run_dir = Path(run_dir) if run_dir else run_dir_for(config, runs_root)
        self.progress = progress and self.dist.is_main
        self.stages = self.recipe.stages(config)
        self.base_dir = resolve_base_run(config, runs_root)
        self._check_run_dir(resume, force)
        config = self.config = self._with_run_secrets(config, resume)
        self.device = default_device(config.device)
        if self.device.type == "cuda" and self.dist.world_size > 1:
            self.device = torch.device("cuda", self.dist.local_rank)
        # Each epoch names the device it ran on: a run resumed or continued elsewhere (a base from a GPU, a stage
        # on a CPU) keeps an honest record of where its seconds came from.
        self.trained_on = device_name(self.device) + (f" x{self.dist.world_size}" if self.dist.world_size > 1 else "")
        if config.batch_size % self.dist.world_size:
            raise ConfigError(f"--batch-size {config.batch_size} must be a multiple of the {self.dist.world_size} DDP processes")
        self.split = Split.make(len(self.train_set), config)
        self.plain_train_set = plain_train_set(config.dataset, config.data_root)[0]
        self.val_x, self.val_y = _stack(self.plain_train_set, self.split.val)
        torch.manual_seed(config.seed)  # the initial weights, identical on every DDP rank
        self.module: nn.Module = self.recipe.build_model(self.spec, config)
        self.base: LoadedRun | None = None
        if self.base_dir is not None:
            self.base = self._load_base(self.base_dir)
            self.recipe.initialize(self.module, self.base, config)
        self.module = self.module.to(self.device)
        if config.channels_last:
            self.module = self.module.to(memory_format=torch.channels_last)
        self.state: dict[str, Any] = {
            "stage": 0, "finished": False,
            "stages": [{"name": stage.name, "epochs_done": 0, "best_score": -1.0, "best_epoch": None, "history": []}
                       for stage in self.stages]}
        self.optimizer = self._optimizer(0)
        if resume and (self.run_dir / LAST).exists():
            self._load_last()

    # -- setup ---------------------------------------------------------------------------------

    def _check_run_dir(self, resume: bool, force: bool) -> None:
        exists = (self.run_dir / LAST).exists()
        if exists and not (resume or force):
            raise CheckpointError(f"{self.run_dir} already holds a run; pass --resume to continue it "
                                  f"or --force to start over")
        if not self.dist.is_main:
            return
        try:
            if force and exists:
                for index in range(len(self.stages)):
                    (self.run_dir / stage_best_file(self.stages, index)).unlink(missing_ok=True)
                for name in (LAST, DEFENSE_JSON):
                    (self.run_dir / name).unlink(missing_ok=True)
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:  # a read-only or full disk, a parent without permission
            raise CheckpointError(cannot_write(self.run_dir, err, "choose another --out")) from err
        if not os.access(self.run_dir, os.W_OK):
            code = errno.EROFS if os.statvfs(self.run_dir).f_flag & os.ST_RDONLY else errno.EACCES
            denied = OSError(code, os.strerror(code))
            raise CheckpointError(cannot_write(self.run_dir, denied, "choose another --out"))

    def _with_run_secrets(self, config: TrainConfig, resume: bool) -> TrainConfig:
        """``config`` with the recipe's per-run secrets (``Recipe.draw_run_secrets``): those a resumed run started
        with, else drawn now, on rank 0 and sent to the other ranks so that every rank trains the same network."""
        drawn = self.recipe.draw_run_secrets(config)
        if not drawn:
            return config
        if resume and (self.run_dir / LAST).exists():
            try:
                saved = load_state(self.run_dir / LAST) or {}
            except CheckpointError:  # unreadable: _load_last reports it
                saved = {}
            saved_params = saved.get("config", {}).get("params", {})
            drawn = {key: saved_params.get(key, value) for key, value in drawn.items()}
        if self.dist.world_size > 1:
            shared = [drawn]
            dist.broadcast_object_list(shared, src=0)
            drawn = shared[0]
        return config.updated({"params": {**config.params, **drawn}})

    def _load_base(self, base_dir: Path) -> LoadedRun:
        if not run_finished(base_dir):
            raise CheckpointError(f"{self.config.recipe} starts from a finished {self.config.base} run, and {base_dir} "
                                  f"holds none; train it first (`robustserve train {self.config.base} --preset "
                                  f"{self.config.preset}`) or point --set base_run=FOLDER at one")
        base = load_run(base_dir)
        if base.info["dataset"] != self.spec.name or base.info["classes"] != list(self.spec.class_names):
            raise CheckpointError(f"the base run {base_dir} was trained on {base.info['dataset']}, not {self.spec.name}")
        return base

    def _trainable(self, index: int) -> list[nn.Module]:
        stage = self.stages[index]
        return list(stage.trainable(self.module)) if stage.trainable is not None else [self.module]

    def _optimizer(self, index: int) -> torch.optim.Optimizer:
        """SGD over the stage's trainable modules; every other parameter is frozen."""
        cfg = self.config.for_stage(self.stages[index].name)
        self.module.requires_grad_(False)
        params: list[nn.Parameter] = []
        for part in self._trainable(index):
            part.requires_grad_(True)
            params.extend(part.parameters())
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                               nesterov=cfg.nesterov)

    def _train_mode(self, index: int) -> None:
        """Frozen modules stay in eval mode: their BatchNorm statistics must not move either."""
        self.module.eval()
        for part in self._trainable(index):
            part.train()

    def _load_last(self) -> None:
        try:
            tensors, state = load_tensors(self.run_dir / LAST)
        except CheckpointError as err:  # a truncated or foreign file: nothing to continue from
            raise CheckpointError(f"cannot resume {self.run_dir}: {err}; start over with --force") from err
        if state is None or "config" not in state or "stages" not in state:
            raise CheckpointError(f"{self.run_dir / LAST} carries no training state of this version; start over with --force")
        saved = TrainConfig(**state["config"])
        # Everything but the length of training and where it runs must match to continue exactly.
        diffs = self.config.changed_settings(saved, ignore=LENGTH_OF_TRAINING | {"device", "workers"})
        problem = (f"it was trained with different {', '.join(diffs)}" if diffs
                   else lengthening_problem(saved, self.config, self.stages, state))
        if problem:
            raise CheckpointError(f"cannot resume {self.run_dir}: {problem}; use the same settings, or --force to start over")
        try:
            self.module.load_state_dict(model_tensors(tensors, "model/"))
        except RuntimeError as err:
            raise CheckpointError(f"{self.run_dir / LAST} does not fit this model; start over with --force") from err
        self.state = {k: state[k] for k in ("stage", "finished", "stages")}
        self.optimizer = self._optimizer(self.state["stage"])
        load_optimizer_tensors(self.optimizer, tensors)

    # -- the loop ------------------------------------------------------------------------------

    def _autocast(self) -> contextlib.AbstractContextManager:
        return step_autocast(self.device, self.config.amp)

    def _batches(self, config: TrainConfig, generator: torch.Generator) -> DataLoader:
        order = self.split.train[torch.randperm(len(self.split.train), generator=generator)]
        # Every rank takes the same global batches (the last partial one dropped) and its own slice
        # of each, so a DDP run sees exactly the batches of a single-process run.
        size, world = config.batch_size, self.dist.world_size
        batches = [order[i:i + size][self.dist.rank::world].tolist() for i in range(0, len(order) - size + 1, size)]
        return DataLoader(self.train_set, batch_sampler=batches, num_workers=config.workers)

    def _augment(self, x: torch.Tensor) -> torch.Tensor:
        return self.spec.augment(x, None) if self.spec.augment is not None else x

    def _to_device(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if self.config.channels_last else x

    def train_epoch(self, model: nn.Module, index: int, epoch: int) -> dict[str, float | None]:
        stage = self.stages[index]
        cfg = self.config.for_stage(stage.name)
        # Each (stage, epoch) has its own seed, so a resumed run replays exactly what it missed.
        generator = seed_epoch(self.config.seed, 1000 * index + epoch)
        loader = self._batches(cfg, generator)
        ctx = StepContext(model=model, module=self.module, config=cfg, augment=self._augment, epoch=epoch)
        self._train_mode(index)
        seen = correct = 0
        scored = True  # False once the stage's loss gives no class scores (a self-supervised stage)
        loss_sum = 0.0
        label = self._stage_label(index)
        bar = tqdm(loader, desc=f"{label} epoch {epoch + 1}/{cfg.epochs}",
                   disable=not self.progress, leave=False, file=sys.stderr, dynamic_ncols=True,
                   mininterval=1.0 if sys.stderr.isatty() else 30.0)  # a log file gets a line per 30 s
        for step, (x, y) in enumerate(bar):
            for group in self.optimizer.param_groups:
                group["lr"] = learning_rate(cfg, epoch + step / len(loader))
            x, y = self._to_device(x), y.to(self.device)
            with self._autocast():
                loss, logits = stage.loss(ctx, x, y)
            loss_value = loss.item()
            if not math.isfinite(loss_value):
                # One NaN step turns every weight into NaN, and later epochs would then train and validate a dead
                # network without complaint: stop before the update, with the last finished epoch on disk.
                raise TrainingDivergedError(
                    f"{label}: the training loss became {loss_value} at epoch {epoch + 1}, step {step + 1} of "
                    f"{len(loader)}; {self.run_dir} keeps its last finished epoch. Fix: train it again with --force "
                    "and a lower --lr, or --set amp=false (bf16 autocast) on a GPU (a resume would replay the same steps)")
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            seen += y.shape[0]
            if logits is None:
                scored = False
            else:
                correct += (logits.argmax(1) == y).sum().item()
            loss_sum += loss_value * y.shape[0]
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}", refresh=False)
        bar.close()
        return {"train_loss": loss_sum / max(seen, 1), "train_acc": correct / max(seen, 1) if scored else None}

    def validation_mode(self, index: int) -> nn.Module:
        """The serving mode stage ``index`` is validated and selected on."""
        modes = self.recipe.modes(self.module)
        return modes[self.stages[index].validate_mode or next(iter(modes))].module

    def validate(self, index: int) -> tuple[dict[str, float], torch.Tensor]:
        """Clean and PGD accuracy of the stage's serving mode on the held-out training images, and the classes it
        predicts for the clean ones (the collapse check reads them)."""
        cfg = self.config
        mode = self.validation_mode(index)
        torch.manual_seed(cfg.seed)  # the same PGD starts every epoch, so epochs compare fairly
        with attack_autocast(self.device, cfg.amp):
            x_adv = PGD(mode, eps=cfg.eps, steps=cfg.val_attack_steps)(self.val_x, self.val_y)
        with self._autocast():
            clean = predicted_classes(mode, self.val_x)
            return ({"val_clean_acc": (clean == self.val_y.cpu()).float().mean().item(),
                     "val_robust_acc": accuracy(mode, x_adv, self.val_y)}, clean)

    @staticmethod
    def _score(config: TrainConfig, metrics: dict[str, float]) -> float:
        return metrics["val_clean_acc" if config.select_by == "clean" else "val_robust_acc"]

    def _save(self, index: int, improved: bool) -> None:
        weights = self.module.state_dict()
        state = {**self.state, "config": asdict(self.config)}
        prefixed = {f"model/{k}": v for k, v in weights.items()}
        if improved:
            save_tensors(self.run_dir / stage_best_file(self.stages, index), weights, state)
        save_tensors(self.run_dir / LAST, {**prefixed, **optimizer_tensors(self.optimizer)}, state)
        self._write_defense_json()

    def _write_defense_json(self) -> None:
        write_json(self.run_dir / DEFENSE_JSON,
                   defense_info(self.recipe, self.config, self.spec, self.state, self.stages, self.base))

    def _start_stage(self, index: int) -> None:
        """A stage begins from the best weights of the stage before it, with a fresh optimiser."""
        if index > 0 and self.state["stages"][index]["epochs_done"] == 0:
            tensors, _ = load_tensors(self.run_dir / stage_best_file(self.stages, index - 1))
            self.module.load_state_dict(tensors)
        if index != self.state["stage"]:  # a resumed stage already has its optimiser, with its state
            self.optimizer = self._optimizer(index)
        self.state["stage"] = index

    def fit(self) -> Path:
        if self.state["finished"]:
            self._log(f"{self.run_dir}: already trained; nothing to do")
            return self.run_dir
        for index in range(self.state["stage"], len(self.stages)):
            self._start_stage(index)
            self._fit_stage(index)
        self._finish()
        return self.run_dir

    def _fit_stage(self, index: int) -> None:
        stage, record = self.stages[index], self.state["stages"][index]
        cfg = self.config.for_stage(stage.name)
        model: nn.Module = self.module
        if self.dist.world_size > 1:
            model = DistributedDataParallel(self.module, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        prefix = f"[{stage.name}] " if len(self.stages) > 1 else ""
        for epoch in range(record["epochs_done"], cfg.epochs):
            started = time.perf_counter()
            metrics = self.train_epoch(model, index, epoch)
            validation, clean_predicted = self.validate(index)
            metrics.update(validation)
            metrics.update(seconds=time.perf_counter() - started, trained_on=self.trained_on)
            self._check_not_collapsed(index, epoch, clean_predicted, record["history"])
            # select_by "last": the paper serves its final weights (AFT-DRA ends on clean-only epochs).
            improved = cfg.select_by == "last" or self._score(cfg, metrics) > record["best_score"]
            if improved:
                record.update(best_score=self._score(cfg, metrics), best_epoch=epoch + 1)
            record["history"].append({"epoch": epoch + 1, **metrics})
            record["epochs_done"] = epoch + 1
            if self.dist.is_main:
                self._save(index, improved)
            self._log(f"{prefix}epoch {epoch + 1}/{cfg.epochs}  loss {metrics['train_loss']:.4f}  "
                      f"train acc {_figure(metrics['train_acc'])}  val clean {metrics['val_clean_acc']:.4f}  "
                      f"val PGD-{self.config.val_attack_steps} {metrics['val_robust_acc']:.4f}  "
                      f"({metrics['seconds']:.1f}s){'  *best' if improved else ''}")
        if self.dist.world_size > 1:
            self._check_ranks_agree()

    def _check_not_collapsed(self, index: int, epoch: int, clean_predicted: torch.Tensor, history: list[dict]) -> None:
        """Stop a stage whose network collapsed to one output after it had learnt (every validation image gets the
        same class; its ReLUs are dead and no later epoch brings it back). TRADES at lr 0.05 did at epoch 8 of 30 and
        trained 22 dead epochs. The epoch is not saved, so the run keeps the one before."""
        learnt = max((e["val_clean_acc"] for e in history), default=0.0)
        predicted = clean_predicted.unique()
        if learnt >= COLLAPSE_LEARNT / self.spec.num_classes and predicted.numel() == 1:
            raise TrainingDivergedError(
                f"{self._stage_label(index)}: at epoch {epoch + 1} every validation image got class {predicted.item()}, "
                f"after a validation clean accuracy of {learnt:.1%}: the network has collapsed to one output; "
                f"{self.run_dir} keeps epoch {epoch}. Fix: train it again with --force and a lower --lr")

    def _stage_label(self, index: int) -> str:
        """How messages name a stage: the recipe, with the stage's name when there are several."""
        return f"{self.config.recipe}/{self.stages[index].name}" if len(self.stages) > 1 else self.config.recipe

    def _finish(self) -> None:
        """Load the served (best) weights, let the recipe write its artifacts, and mark the run finished."""
        if self.dist.is_main:
            tensors, _ = load_tensors(self.run_dir / BEST)
            self.module.load_state_dict(tensors)
            # In the usual layout, as packaging and evaluation load the weights: an artifact computed from them
            # (THAT's memory bank) then matches the one packaging rebuilds, bit for bit.
            self.module = self.module.to(memory_format=torch.contiguous_format).eval()
            self.recipe.finish(self.module, self.run_dir, self.plain_train_set, self.spec, self.config)
            self.state["finished"] = True
            self._write_defense_json()

    def _check_ranks_agree(self) -> None:
        """Every rank must end with the same weights and have trained with the same settings, per-run secrets
        included (a rank with its own DUCAT pairing would train other targets on the same weights)."""
        ranks: list[tuple[str, dict[str, Any]]] = [("", {})] * self.dist.world_size
        dist.all_gather_object(ranks, (weights_digest(self.module), asdict(self.config)))
        digests = [digest for digest, _ in ranks]
        for rank, rank_digest in enumerate(digests):
            self._log(f"rank {rank} final weights sha256 {rank_digest}")
        if len(set(digests)) != 1:
            raise RuntimeError(f"DDP ranks finished with different weights: {digests}")
        if any(settings != ranks[0][1] for _, settings in ranks[1:]):  # not printed: the settings hold the secrets
            raise RuntimeError("DDP ranks trained with different settings")

    def _log(self, message: str) -> None:
        if self.dist.is_main:
            print(message, flush=True)


@contextlib.contextmanager
def distributed_session(dist_info: Distributed) -> Iterator[None]:
    """Initialise the process group under torchrun (gloo on CPU, nccl on GPU) and tear it down."""
    if dist_info.world_size == 1:
        yield
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(dist_info.local_rank)
    dist.init_process_group(backend=backend)
    try:
        yield
    finally:
        dist.destroy_process_group()


def train(config: TrainConfig, run_dir: Path | None = None, *, resume: bool = False, force: bool = False,
          progress: bool = True, runs_root: Path = RUNS_ROOT) -> Path:
    """Train ``config`` into ``run_dir`` (single process, or one rank under torchrun).

    A recipe that starts from a base run gets that run trained first (into its default folder
    under ``runs_root``, resuming it if it was interrupted) unless ``config.base_run`` names one.
    """
    base, base_dir = base_config(config), resolve_base_run(config, runs_root)
    if base is not None and base_dir is not None and config.base_run is None and not run_finished(base_dir):
        print(f"== {config.recipe} starts from {config.base}: training it into {base_dir}", flush=True)
        train(base, base_dir, resume=True, progress=progress, runs_root=runs_root)
    with distributed_session(Distributed.from_env()):
        return Trainer(config, run_dir, resume=resume, force=force, progress=progress, runs_root=runs_root).fit()

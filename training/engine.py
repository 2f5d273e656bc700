"""The training engine: data, SGD with the papers' schedules, validation, checkpoints, resume, DDP.

Determinism is by construction rather than by saving RNG state: every epoch re-seeds the global
RNG and the shuffling generator from ``(seed, epoch)``. A run resumed after a crash restarts the
interrupted epoch from its first batch and ends with the same weights as an uninterrupted run.
"""

from __future__ import annotations

import contextlib
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
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from .attacks.attacks import PGD, accuracy
from .checkpoint import (BEST, DEFENSE_JSON, LAST, CheckpointError, code_version, load_optimizer_tensors,
                         load_tensors, model_tensors, optimizer_tensors, save_tensors, weights_digest, write_json)
from .config import TrainConfig
from .data import DatasetSpec, load_dataset
from .models import StagedNet
from .recipes import Recipe, StepContext, get_recipe
from .errors import ConfigError


def learning_rate(config: TrainConfig, progress: float) -> float:
    """The learning rate at ``progress`` epochs into training (fractional within an epoch)."""
    if config.schedule == "multistep":
        return config.lr * config.gamma ** sum(progress >= m for m in config.milestones)
    if config.schedule == "cosine":
        return 0.5 * config.lr * (1 + math.cos(math.pi * min(progress / config.epochs, 1.0)))
    if config.schedule == "constant":
        return config.lr
    raise ConfigError(f"unknown schedule {config.schedule!r}; use multistep, cosine or constant")


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


def default_run_dir(config: TrainConfig, spec_arch: str, root: Path = Path("runs")) -> Path:
    return root / f"{config.recipe}-{config.preset}-{config.dataset}-{config.arch or spec_arch}"


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
    """Trains one recipe into one run folder."""

    def __init__(self, config: TrainConfig, run_dir: Path | None = None, *, resume: bool = False,
                 force: bool = False, progress: bool = True) -> None:
        self.recipe: Recipe = get_recipe(config.recipe)
        self.dist = Distributed.from_env()
        self.config = config
        self.train_set, self.spec = load_dataset(config.dataset, "train", root=config.data_root, download=config.download)
        self.run_dir = Path(run_dir) if run_dir else default_run_dir(config, self.spec.default_architecture)
        self.progress = progress and self.dist.is_main
        self._check_run_dir(resume, force)
        self.device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if self.device.type == "cuda" and self.dist.world_size > 1:
            self.device = torch.device("cuda", self.dist.local_rank)
        if config.batch_size % self.dist.world_size:
            raise ConfigError(f"--batch-size {config.batch_size} must be a multiple of the {self.dist.world_size} DDP processes")
        self.split = Split.make(len(self.train_set), config)
        self.val_x, self.val_y = _stack(self.train_set, self.split.val)
        torch.manual_seed(config.seed)  # the initial weights, identical on every DDP rank
        self.module: StagedNet = self.recipe.build_model(self.spec, config).to(self.device)
        if self._on_cuda(config.channels_last):
            self.module = self.module.to(memory_format=torch.channels_last)
        self.optimizer = torch.optim.SGD(self.module.parameters(), lr=config.lr, momentum=config.momentum,
                                         weight_decay=config.weight_decay, nesterov=config.nesterov)
        self.state: dict[str, Any] = {"epochs_done": 0, "best_score": -1.0, "best_epoch": None, "history": []}
        if resume and (self.run_dir / LAST).exists():
            self._load_last()

    # -- setup ---------------------------------------------------------------------------------

    def _on_cuda(self, flag: bool) -> bool:
        return flag and self.device.type == "cuda"

    def _check_run_dir(self, resume: bool, force: bool) -> None:
        exists = (self.run_dir / LAST).exists()
        if exists and not (resume or force):
            raise CheckpointError(f"{self.run_dir} already holds a run; pass --resume to continue it "
                                  f"or --force to start over")
        if force and exists and self.dist.is_main:
            for name in (LAST, BEST, DEFENSE_JSON):
                (self.run_dir / name).unlink(missing_ok=True)
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if not os.access(self.run_dir, os.W_OK):
                raise CheckpointError(f"cannot write to {self.run_dir}; choose another --out")

    def _load_last(self) -> None:
        tensors, state = load_tensors(self.run_dir / LAST)
        if state is None or "config" not in state:
            raise CheckpointError(f"{self.run_dir / LAST} carries no training state; start over with --force")
        saved = TrainConfig(**state["config"])
        # Everything but the length of training and where it runs must match to continue exactly.
        free = {"epochs", "device", "workers"}
        diffs = [k for k in TrainConfig.field_names() - free if getattr(saved, k) != getattr(self.config, k)]
        if diffs:
            raise CheckpointError(f"cannot resume {self.run_dir}: it was trained with different {', '.join(sorted(diffs))}; "
                                  f"use the same settings, or --force to start over")
        try:
            self.module.load_state_dict(model_tensors(tensors, "model/"))
        except RuntimeError as err:
            raise CheckpointError(f"{self.run_dir / LAST} does not fit this model; start over with --force") from err
        load_optimizer_tensors(self.optimizer, tensors)
        self.state = {k: state[k] for k in ("epochs_done", "best_score", "best_epoch", "history")}

    # -- the loop ------------------------------------------------------------------------------

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self._on_cuda(self.config.amp):
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _batches(self, generator: torch.Generator) -> DataLoader:
        order = self.split.train[torch.randperm(len(self.split.train), generator=generator)]
        # Every rank takes the same global batches (the last partial one dropped) and its own slice
        # of each, so a DDP run sees exactly the batches of a single-process run.
        size, world = self.config.batch_size, self.dist.world_size
        batches = [order[i:i + size][self.dist.rank::world].tolist() for i in range(0, len(order) - size + 1, size)]
        return DataLoader(self.train_set, batch_sampler=batches, num_workers=self.config.workers)

    def _augment(self, x: torch.Tensor) -> torch.Tensor:
        return self.spec.augment(x, None) if self.spec.augment is not None else x

    def _to_device(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if self._on_cuda(self.config.channels_last) else x

    def train_epoch(self, model: torch.nn.Module, epoch: int) -> dict[str, float]:
        generator = seed_epoch(self.config.seed, epoch)
        loader = self._batches(generator)
        ctx = StepContext(model=model, module=self.module, config=self.config, augment=self._augment, epoch=epoch)
        model.train()
        seen = correct = 0
        loss_sum = 0.0
        bar = tqdm(loader, desc=f"{self.config.recipe} epoch {epoch + 1}/{self.config.epochs}",
                   disable=not self.progress, leave=False, file=sys.stderr, dynamic_ncols=True,
                   mininterval=1.0 if sys.stderr.isatty() else 30.0)  # a log file gets a line per 30 s
        for step, (x, y) in enumerate(bar):
            for group in self.optimizer.param_groups:
                group["lr"] = learning_rate(self.config, epoch + step / len(loader))
            x, y = self._to_device(x), y.to(self.device)
            with self._autocast():
                loss, logits = self.recipe.loss(ctx, x, y)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            seen += y.shape[0]
            correct += (logits.argmax(1) == y).sum().item()
            loss_sum += loss.item() * y.shape[0]
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}", refresh=False)
        bar.close()
        return {"train_loss": loss_sum / max(seen, 1), "train_acc": correct / max(seen, 1)}

    def validate(self) -> dict[str, float]:
        """Clean and PGD accuracy on the held-out training images."""
        cfg = self.config
        torch.manual_seed(cfg.seed)  # the same PGD starts every epoch, so epochs compare fairly
        with self._autocast():
            attack = PGD(self.module, eps=cfg.eps, steps=cfg.val_attack_steps)
            x_adv = attack(self.val_x, self.val_y)
            return {"val_clean_acc": accuracy(self.module, self.val_x, self.val_y),
                    "val_robust_acc": accuracy(self.module, x_adv, self.val_y)}

    def _score(self, metrics: dict[str, float]) -> float:
        return metrics["val_robust_acc" if self.config.select_by == "robust" else "val_clean_acc"]

    def _save(self, metrics: dict[str, float], improved: bool) -> None:
        weights = self.module.state_dict()
        state = {**self.state, "config": asdict(self.config)}
        prefixed = {f"model/{k}": v for k, v in weights.items()}
        save_tensors(self.run_dir / LAST, {**prefixed, **optimizer_tensors(self.optimizer)}, state)
        if improved:
            save_tensors(self.run_dir / BEST, weights, state)
        write_json(self.run_dir / DEFENSE_JSON, defense_info(self.recipe, self.config, self.spec, self.state))

    def fit(self) -> Path:
        start_epoch = self.state["epochs_done"]
        if start_epoch >= self.config.epochs:
            self._log(f"{self.run_dir}: already trained for {start_epoch} epochs; nothing to do")
            return self.run_dir
        model: torch.nn.Module = self.module
        if self.dist.world_size > 1:
            model = DistributedDataParallel(self.module, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        for epoch in range(start_epoch, self.config.epochs):
            started = time.perf_counter()
            metrics = self.train_epoch(model, epoch)
            metrics.update(self.validate())
            metrics["seconds"] = time.perf_counter() - started
            improved = self._score(metrics) > self.state["best_score"]
            if improved:
                self.state.update(best_score=self._score(metrics), best_epoch=epoch + 1)
            self.state["history"].append({"epoch": epoch + 1, **metrics})
            self.state["epochs_done"] = epoch + 1
            if self.dist.is_main:
                self._save(metrics, improved)
            self._log(f"epoch {epoch + 1}/{self.config.epochs}  loss {metrics['train_loss']:.4f}  "
                      f"train acc {metrics['train_acc']:.4f}  val clean {metrics['val_clean_acc']:.4f}  "
                      f"val PGD-{self.config.val_attack_steps} {metrics['val_robust_acc']:.4f}  "
                      f"({metrics['seconds']:.1f}s){'  *best' if improved else ''}")
        if self.dist.world_size > 1:
            self._check_ranks_agree()
        return self.run_dir

    def _check_ranks_agree(self) -> None:
        digest = weights_digest(self.module)
        digests: list[str] = [""] * self.dist.world_size
        dist.all_gather_object(digests, digest)
        for rank, rank_digest in enumerate(digests):
            self._log(f"rank {rank} final weights sha256 {rank_digest}")
        if len(set(digests)) != 1:
            raise RuntimeError(f"DDP ranks finished with different weights: {digests}")

    def _log(self, message: str) -> None:
        if self.dist.is_main:
            print(message, flush=True)


def defense_info(recipe: Recipe, config: TrainConfig, spec: DatasetSpec, state: dict[str, Any]) -> dict[str, Any]:
    """The run's ``defense.json``: everything serving and evaluation need to rebuild and describe it."""
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
        "stages": [{"name": recipe.id, "epochs_done": state["epochs_done"], "best_epoch": state["best_epoch"],
                    "history": state["history"]}],
        "serving_modes": list(recipe.serving_modes),
        "weights": BEST,
        "config": asdict(config),
        "code_version": code_version(),
    }


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
          progress: bool = True) -> Path:
    """Train ``config`` into ``run_dir`` (single process, or one rank under torchrun)."""
    with distributed_session(Distributed.from_env()):
        return Trainer(config, run_dir, resume=resume, force=force, progress=progress).fit()

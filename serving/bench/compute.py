"""Compute benchmarks: ``robustserve bench attacks``, ``at-step`` and ``all``. Every function returns a plain,
JSON-serialisable dict.

* ``bench_attacks``: our PGD (``training.attacks.PGD``, i.e. ``core.pgd``) against torchattacks'
  ``PGD`` on the same model and the same batch, timed interleaved so that machine noise hits both.
* ``bench_at_step``: one PGD-k adversarial-training step (attack, forward/backward, SGD step) with
  bf16 autocast (CUDA only; a no-op on CPU) and channels_last, in img/s and achieved TFLOP/s.
* ``bench_train_step``: the training's own PGD-AT step (``training.devices``' autocast policy) in the
  variants the speed-up trial compares: float32, bf16 attack where bf16 is native, each in the usual layout
  and channels_last, and under ``torch.compile``; interleaved, as ratios to float32, with the default step
  split into attack and update.
* ``run_benchmarks``: the attacks and the AT step (the AT step only on CUDA) plus the environment.
* ``forward_flops_per_image``: a model's forward FLOPs (also bench serve's DH-AT head comparison).

torchattacks is a peer to compare against, not a dependency of the project; install it with
``pip install --no-deps torchattacks`` (its pinned ``requests~=2.25.1`` would downgrade requests).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import statistics
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, flop_registry

from training.attacks.attacks import PGD
from training.attacks.core import pgd
from training.devices import attack_autocast, cpu_has_native_bf16, default_device, step_autocast
from training.environment import describe_environment
from training.errors import ConfigError
from training.models import ARCHITECTURES, build_model

from .common import BenchmarkError, given, timed, timed_calls

H100_BF16_DENSE_TFLOPS = 989.0
TOP_OPS = 6  # the ops bench train-step's profile names
NUM_CLASSES = 10
TORCHATTACKS_HINT = "pip install --no-deps torchattacks"

# ----------------------------------------------------------------------------------------------
# Helpers


def _sync(device: torch.device) -> Callable[[], None] | None:
    """What makes a timing of work on ``device`` wait for it (``common.timed``'s ``sync``): CUDA runs asynchronously."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return None


def _input_shape(arch: str) -> tuple[int, int, int]:
    """(channels, height, width) of the inputs ``arch`` is designed for (28 px ones are grayscale)."""
    try:
        size = ARCHITECTURES[arch].input_size
    except KeyError:
        raise ConfigError(f"unknown architecture {arch!r}; known: {', '.join(sorted(ARCHITECTURES))}") from None
    return (1 if size == 28 else 3), size, size


def default_eps(arch: str) -> float:
    """Linf budget the benchmark uses: 0.1 for 28 px (MNIST-like), 8/255 otherwise."""
    return 0.1 if _input_shape(arch)[1] == 28 else 8 / 255


def _model_and_batch(arch: str, batch_size: int, device: torch.device, seed: int = 0
                     ) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A randomly initialised model and a random batch in [0, 1], without touching the global RNG."""
    c, h, w = _input_shape(arch)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(arch, num_classes=NUM_CLASSES, in_channels=c, mean=[0.5] * c, std=[0.25] * c)
        # SmallCNN starts with a zero classifier (TRADES' init), whose input gradient is zero: give it
        # random weights so both attacks take real steps.
        nn.init.normal_(model.classifier.weight, std=0.1)
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(batch_size, c, h, w, generator=gen)
    y = torch.randint(0, NUM_CLASSES, (batch_size,), generator=gen)
    return model.to(device), x.to(device), y.to(device)


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _import_torchattacks():
    try:
        import torchattacks
    except ImportError as exc:
        raise BenchmarkError(
            "bench_attacks compares against torchattacks, which is not a project dependency: "
            f"install it with `{TORCHATTACKS_HINT}` (plain pip would downgrade requests)"
        ) from exc
    return torchattacks


def _setup(benchmark: str, arch: str, x: torch.Tensor, batch_size: int, steps: int, repeats: int,
           eps: float) -> dict[str, Any]:
    """The settings every benchmark result starts with."""
    return {"benchmark": benchmark, "arch": arch, "input_shape": list(x.shape[1:]), "batch_size": batch_size,
            "steps": steps, "repeats": repeats, "eps": eps}


# ----------------------------------------------------------------------------------------------
# Attack throughput: ours vs torchattacks


def bench_attacks(
    *,
    arch: str = "smallcnn",
    batch_size: int = 128,
    steps: int = 10,
    repeats: int = 5,
    device: str | None = None,
) -> dict[str, Any]:
    """Our PGD-``steps`` against ``torchattacks.PGD`` on the same model and batch.

    Linf, eps 0.1 for 28 px inputs else 8/255, step eps/4, random start, model in eval mode.
    After one (seeded) warm-up call each, the two run interleaved (ours, theirs, ours, theirs...)
    for ``repeats`` rounds; the medians give img/s, and ``ratio`` = ours / theirs (>= 1: we are at
    least as fast). ``agreement`` is the fraction of pixels on which the two warm-up outputs,
    started from the same random point, agree to 1e-6: near 1 means both did the same work.
    """
    if repeats < 1 or batch_size < 1 or steps < 1:
        raise ConfigError(f"need repeats, batch_size, steps >= 1 (got {repeats}, {batch_size}, {steps})")
    torchattacks = _import_torchattacks()
    dev = default_device(device)
    model, x, y = _model_and_batch(arch, batch_size, dev)
    model.eval()
    eps = default_eps(arch)
    step_size = eps / 4

    ours = PGD(model, eps=eps, steps=steps, step_size=step_size, norm="linf", random_start=True,
               batch_size=batch_size)
    theirs = torchattacks.PGD(model, eps=eps, alpha=step_size, steps=steps, random_start=True)

    # Warm-up, seeded identically so the outputs can be compared.
    with _seeded(0, dev):
        adv_ours = ours(x, y)
    with _seeded(0, dev):
        adv_theirs = theirs(x, y)
    agreement = ((adv_ours - adv_theirs).abs() <= 1e-6).float().mean().item()
    max_pert = max((adv_ours - x).abs().max().item(), (adv_theirs - x).abs().max().item())

    times = timed_calls({"ours": lambda: ours(x, y), "theirs": lambda: theirs(x, y)}, repeats, warmup=0,
                        sync=_sync(dev))
    t_ours, t_theirs = times["ours"], times["theirs"]
    med_ours, med_theirs = statistics.median(t_ours), statistics.median(t_theirs)
    ours_ips, theirs_ips = batch_size / med_ours, batch_size / med_theirs
    return {
        **_setup("attacks", arch, x, batch_size, steps, repeats, eps),
        "step_size": step_size,
        "ours_s": med_ours,
        "theirs_s": med_theirs,
        "ours_img_s": ours_ips,
        "theirs_img_s": theirs_ips,
        "ratio": ours_ips / theirs_ips,
        "ours_times_s": t_ours,
        "theirs_times_s": t_theirs,
        "agreement": agreement,
        "max_perturbation": max_pert,
        "environment": describe_environment(dev),
    }


# ----------------------------------------------------------------------------------------------
# Adversarial-training step throughput


def _autocast(device: torch.device) -> contextlib.AbstractContextManager:
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


class _OpFlopCounter(TorchDispatchMode):
    """FLOPs of every op with a formula in torch's ``flop_registry``, without module tracking.

    ``FlopCounterMode`` tracks modules with backward hooks, which ``torch.autograd.grad`` (the
    attack's input gradient) refuses; this counts the same formulas over the whole region.
    """

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func._overloadpacket
        if packet not in flop_registry:
            with self:  # count what the op decomposes into, as FlopCounterMode does
                decomposed = func.decompose(*args, **kwargs)
            if decomposed is not NotImplemented:
                return decomposed
            return func(*args, **kwargs)
        out = func(*args, **kwargs)
        self.total += int(flop_registry[packet](*args, **kwargs, out_val=out))
        return out


def forward_flops_per_image(model: nn.Module, x1: torch.Tensor) -> int:
    """Forward FLOPs of ``model`` on one image ``x1`` (shape ``1 x C x H x W``)."""
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x1)
    return int(counter.get_total_flops())


def bench_at_step(
    *,
    arch: str = "preactresnet18",
    batch_size: int = 512,
    steps: int = 10,
    repeats: int = 5,
    device: str | None = None,
    peak_tflops: float = H100_BF16_DENSE_TFLOPS,
    bn_mode: str = "eval",
) -> dict[str, Any]:
    """Throughput of one PGD-``steps`` adversarial-training step: attack + forward/backward + SGD step.

    bf16 autocast on CUDA (none on CPU), channels_last model and inputs. One warm-up step (two on
    CUDA, for cudnn autotuning), then the median of ``repeats`` timed steps.

    ``model_tflops`` uses the usual nominal count: ``3 * fwd_flops * (steps + 1)`` per image (each
    attack step counted as a full forward+backward). The attack's backward only needs input
    gradients, so ``executed_tflops`` also reports the FLOPs counted (torch's FLOP formulas) on one real step
    (about ``(2 * steps + 3) * fwd_flops``). ``fraction_of_peak`` = ``model_tflops / peak_tflops``.
    """
    if repeats < 1 or batch_size < 1 or steps < 1:
        raise ConfigError(f"need repeats, batch_size, steps >= 1 (got {repeats}, {batch_size}, {steps})")
    dev = default_device(device)
    model, x, y = _model_and_batch(arch, batch_size, dev)
    model = model.to(memory_format=torch.channels_last)
    x = x.contiguous(memory_format=torch.channels_last)
    eps = default_eps(arch)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    attack = PGD(model, eps=eps, steps=steps, step_size=eps / 4, norm="linf", random_start=True,
                 bn_mode=bn_mode, batch_size=batch_size)  # type: ignore[arg-type]

    def step(xb: torch.Tensor, yb: torch.Tensor) -> None:
        model.train()
        with _autocast(dev):
            x_adv = attack.perturb_batch(xb, yb)  # core.pgd on the batch, no re-batching copy
            loss = F.cross_entropy(model(x_adv).float(), yb)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    # FLOPs: forward on one image (eval mode, no grad), and one real step on two images.
    model.eval()
    fwd = forward_flops_per_image(model, x[:1])
    counter = _OpFlopCounter()
    with counter:
        step(x[:2], y[:2])
    executed_per_image = counter.total / 2
    nominal_per_image = 3 * fwd * (steps + 1)

    saved_benchmark = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        times = timed_calls({"step": lambda: step(x, y)}, repeats, warmup=2 if dev.type == "cuda" else 1,
                            sync=_sync(dev))["step"]
    finally:
        torch.backends.cudnn.benchmark = saved_benchmark
    med = statistics.median(times)
    ips = batch_size / med
    model_tflops = ips * nominal_per_image / 1e12
    return {
        **_setup("at_step", arch, x, batch_size, steps, repeats, eps),
        "bn_mode": bn_mode,
        "autocast": "bfloat16" if dev.type == "cuda" else None,
        "channels_last": True,
        "step_s": med,
        "times_s": times,
        "img_s": ips,
        "fwd_flops_per_image": fwd,
        "flops_per_image": nominal_per_image,
        "executed_flops_per_image": executed_per_image,
        "model_tflops": model_tflops,
        "executed_tflops": ips * executed_per_image / 1e12,
        "peak_tflops": peak_tflops,
        "fraction_of_peak": model_tflops / peak_tflops,
        "environment": describe_environment(dev),
    }


# ----------------------------------------------------------------------------------------------
# The training step's speed-ups, tried side by side


def bench_train_step(
    *,
    arch: str = "smallcnn",
    batch_size: int = 128,
    steps: int = 5,
    repeats: int = 5,
    device: str | None = None,
    compile_model: bool = True,
) -> dict[str, Any]:
    """The training's PGD-AT step (``steps``-step Linf PGD at step eps/2, as the standard preset's training
    adversary, then cross-entropy, backward and an SGD step) in each variant of ``step_variants``, interleaved.

    ``variants``: img/s and ``ratio`` to float32 in the usual (NCHW) layout of each; ``compile_s``: the first call
    of a compiled variant (compilation included). ``profile``: the training default (``training.devices``' autocast
    policy, channels_last, eager) split into its attack and its update, timed separately, the attack's
    ``attack_share`` of the two, and the ``TOP_OPS`` ops that take the most of one step's own time (torch.profiler,
    self time: share of the step).
    """
    if repeats < 1 or batch_size < 1 or steps < 1:
        raise ConfigError(f"need repeats, batch_size, steps >= 1 (got {repeats}, {batch_size}, {steps})")
    dev = default_device(device)
    eps = default_eps(arch)
    # One model per layout, with the same initial weights and batch (y too): converting a module's layout converts
    # it in place.
    layouts = {}
    for channels_last in (False, True):
        model, x, y = _model_and_batch(arch, batch_size, dev)
        if channels_last:
            model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        layouts[channels_last] = (model, torch.compile(model) if compile_model else None, x, optimizer)

    def attack(net: nn.Module, x: torch.Tensor, bf16: bool) -> torch.Tensor:
        with attack_autocast(dev, bf16):
            return pgd(net, x, y, eps=eps, step_size=eps / 2, steps=steps)

    def update(net: nn.Module, optimizer: torch.optim.Optimizer, x_adv: torch.Tensor, bf16: bool) -> None:
        net.train()
        with step_autocast(dev, bf16):
            loss = F.cross_entropy(net(x_adv).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def step(variant: StepVariant) -> None:
        model, compiled, x, optimizer = layouts[variant.channels_last]
        net = compiled if variant.compiled else model
        update(net, optimizer, attack(net, x, variant.bf16), variant.bf16)

    calls = {name: functools.partial(step, variant) for name, variant in step_variants(dev, compile_model).items()}
    compile_s = {name: timed(call, _sync(dev))[0] for name, call in calls.items() if name.startswith("compiled")}
    times = timed_calls(calls, repeats, warmup=1, sync=_sync(dev))
    img_s = {name: batch_size / statistics.median(t) for name, t in times.items()}

    default_bf16 = dev.type == "cuda" or cpu_has_native_bf16()
    model, _, x, optimizer = layouts[True]
    x_adv = attack(model, x, default_bf16)
    phases = timed_calls({"attack": lambda: attack(model, x, default_bf16),
                          "update": lambda: update(model, optimizer, x_adv, default_bf16)},
                         repeats, warmup=1, sync=_sync(dev))
    attack_s, update_s = (statistics.median(phases[p]) for p in ("attack", "update"))
    with torch.profiler.profile() as profiler:  # one default step, op by op
        update(model, optimizer, attack(model, x, default_bf16), default_bf16)
    def self_time(op: Any) -> float:  # on CUDA the kernels' time, which the CPU only launches
        return op.self_device_time_total if dev.type == "cuda" else op.self_cpu_time_total

    ops = sorted(profiler.key_averages(), key=self_time, reverse=True)
    total = sum(self_time(op) for op in ops)
    top_ops = {op.key: self_time(op) / total for op in ops[:TOP_OPS]}
    return {
        **_setup("train_step", arch, x, batch_size, steps, repeats, eps),
        "native_bf16": default_bf16,
        "variants": {name: {"img_s": ips, "ratio": ips / img_s["float32"], "times_s": times[name]}
                     for name, ips in img_s.items()},
        "compile_s": compile_s,
        "profile": {"variant": ("bf16_attack" if default_bf16 else "float32") + "_channels_last",
                    "attack_s": attack_s, "update_s": update_s, "attack_share": attack_s / (attack_s + update_s),
                    "top_ops": top_ops},
        "environment": describe_environment(dev),
    }


class StepVariant(NamedTuple):
    bf16: bool  # autocast as training would use it (training.devices)
    compiled: bool  # a torch.compile'd model
    channels_last: bool  # model and batch in NHWC


def step_variants(device: torch.device, compile_model: bool) -> dict[str, StepVariant]:
    """What ``bench_train_step`` tries: each precision in each layout, and compiled in the training's layout
    (channels_last). The bf16 variants only where bf16 is native (elsewhere ``attack_autocast`` leaves them float32)."""
    precisions = {"float32": False}
    if device.type == "cuda" or cpu_has_native_bf16():
        precisions["bf16_attack" if device.type == "cpu" else "bf16"] = True
    variants: dict[str, StepVariant] = {}
    for name, bf16 in precisions.items():
        variants[name] = StepVariant(bf16, compiled=False, channels_last=False)
        variants[f"{name}_channels_last"] = StepVariant(bf16, compiled=False, channels_last=True)
        if compile_model:
            variants[f"compiled_{name}_channels_last"] = StepVariant(bf16, compiled=True, channels_last=True)
    return variants


def run_benchmarks(
    *,
    arch: str = "smallcnn",
    batch_size: int = 128,
    steps: int = 10,
    repeats: int = 5,
    device: str | None = None,
    at_arch: str = "preactresnet18",
    at_batch_size: int = 512,
    peak_tflops: float = H100_BF16_DENSE_TFLOPS,
) -> dict[str, Any]:
    """``bench_attacks``, plus ``bench_at_step`` when the device is CUDA."""
    dev = default_device(device)
    result: dict[str, Any] = {
        "environment": describe_environment(dev),
        "attacks": bench_attacks(arch=arch, batch_size=batch_size, steps=steps, repeats=repeats, device=str(dev)),
    }
    if dev.type == "cuda":
        result["at_step"] = bench_at_step(arch=at_arch, batch_size=at_batch_size, steps=steps, repeats=repeats,
                                          device=str(dev), peak_tflops=peak_tflops)
    return result


# ---------------------------------------------------------------------------------------------- command line
# Options left unset keep the functions' defaults (``common.given``).

SETTINGS = ("arch", "batch_size", "steps", "repeats", "device")


def _add_options(p: argparse.ArgumentParser, arch: str, batch_size: int, peak: bool, of: str = "", steps: int = 10) -> None:
    p.add_argument("--arch", help=f"architecture{of} (default {arch})")
    p.add_argument("--batch-size", type=int, help=f"images per batch{of} (default {batch_size})")
    p.add_argument("--steps", type=int, help=f"PGD steps (default {steps})")
    p.add_argument("--repeats", type=int, help="timed rounds (default 5)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    if peak:
        p.add_argument("--peak-tflops", type=float,
                       help=f"the device's bf16 dense peak for at-step (default: H100's {H100_BF16_DENSE_TFLOPS:g})")


def add_attacks_options(p: argparse.ArgumentParser) -> None:
    _add_options(p, "smallcnn", 128, peak=False)


def run_attacks(args: argparse.Namespace) -> dict[str, Any]:
    return bench_attacks(**given(args, *SETTINGS))


def add_at_step_options(p: argparse.ArgumentParser) -> None:
    _add_options(p, "preactresnet18", 512, peak=True)


def run_at_step(args: argparse.Namespace) -> dict[str, Any]:
    return bench_at_step(**given(args, *SETTINGS, "peak_tflops"))


def add_all_options(p: argparse.ArgumentParser) -> None:
    """``--arch`` and ``--batch-size`` are the attack comparison's; at-step keeps its own (preactresnet18, 512)."""
    _add_options(p, "smallcnn", 128, peak=True, of=" of the attack comparison")


def run_all(args: argparse.Namespace) -> dict[str, Any]:
    return run_benchmarks(**given(args, *SETTINGS, "peak_tflops"))


def add_train_step_options(p: argparse.ArgumentParser) -> None:
    _add_options(p, "smallcnn", 128, peak=False, steps=5)
    p.add_argument("--no-compile", dest="compile_model", action="store_false", default=None,
                   help="leave out the torch.compile variants (their compilation takes a minute or more on a CPU)")


def run_train_step(args: argparse.Namespace) -> dict[str, Any]:
    return bench_train_step(**given(args, *SETTINGS, "compile_model"))

"""Datasets: a registry of loaders that all return pixels in [0, 1] and integer labels.

CONTRACT (the engine, evaluation and serving rely on it):

* ``DATASETS[name]`` is a ``DatasetInfo``; ``load_dataset(name, split, root=..., download=...)``
  returns ``(dataset, spec)`` where ``dataset[i] == (image float32 CxHxW in [0, 1], label int)``.
* ``spec`` is a ``DatasetSpec``: class names, input shape, the normalisation the model applies
  inside itself, the default architecture, and ``augment``: a batch-level augmentation
  ``(x: NCHW tensor in [0, 1], generator) -> tensor`` applied by the engine on the training
  device, or None when the dataset augments per item (ImageFolder).
* Missing data raises ``DataNotFoundError`` whose message names the fix.
"""

from __future__ import annotations

import functools
import gzip
import math
import os
import shutil
import struct
import uuid
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset
from torchvision import datasets
from torchvision import transforms as T

from .errors import ConfigError, RobustServeError

BatchAugment = Callable[[torch.Tensor, torch.Generator | None], torch.Tensor]


class DataNotFoundError(RobustServeError, FileNotFoundError):
    """The dataset's files are not where they should be; the message says how to get them."""


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    class_names: tuple[str, ...]
    input_shape: tuple[int, int, int]  # (channels, height, width)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    default_architecture: str
    augment: BatchAugment | None = field(default=None, compare=False, repr=False)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


class CorruptDataError(RobustServeError, ValueError):
    """A data file exists but cannot be parsed; the message names the file and the fix."""


# A loader turns (split, root, download, **options) into the dataset and its spec.
Loader = Callable[..., tuple[Dataset, DatasetSpec]]


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    loader: Loader
    description: str
    default_architecture: str  # known without loading any data (run folders are named by it)


DATASETS: dict[str, DatasetInfo] = {}
DEFAULT_DATASET = "fashion_mnist"
SPLITS = ("train", "test")


def register_dataset(name: str, *, description: str, default_architecture: str) -> Callable[[Loader], Loader]:
    """Register ``loader(split, root, download, **options) -> (dataset, spec)`` under ``name``."""

    def decorator(loader: Loader) -> Loader:
        if name in DATASETS:
            raise ValueError(f"dataset {name!r} registered twice")
        DATASETS[name] = DatasetInfo(name, loader, description, default_architecture)
        return loader

    return decorator


def load_dataset(
    name: str,
    split: str,
    *,
    root: str | Path | None = None,
    download: bool = False,
    **options: Any,
) -> tuple[Dataset, DatasetSpec]:
    """Load ``split`` ("train" or "test") of dataset ``name``; ``options`` go to its loader
    (e.g. ``image_size`` for imagefolder)."""
    try:
        info = DATASETS[name]
    except KeyError:
        raise ConfigError(f"unknown dataset {name!r}; known: {', '.join(sorted(DATASETS))}") from None
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}; expected one of {SPLITS}")
    return info.loader(split, None if root is None else Path(root), download, **options)


def plain_train_set(name: str, root: str | Path | None = None) -> tuple[Dataset, DatasetSpec]:
    """The training split without per-item augmentation (an ImageFolder augments as it reads): what
    validation and the artifacts built from training images (THAT's memory bank) must see."""
    dataset, spec = load_dataset(name, "train", root=root)
    if spec.augment is None:
        dataset = load_dataset(name, "train", root=root, augment=False)[0]
    return dataset, spec


def default_root(root: Path | None) -> Path:
    """``root`` if given, else $ROBUSTSERVE_DATA, else ``data/`` relative to the current directory."""
    return root if root is not None else Path(os.environ.get("ROBUSTSERVE_DATA", "data"))


class TensorImageDataset(Dataset):
    """All images in memory as one uint8 NCHW tensor: indexing is a slice, not a PIL decode, which is
    what keeps 28/32-pixel training fast on a couple of CPU cores. Use ``.images``/``.labels`` in bulk."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, classes: Sequence[str]) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4 or len(images) != len(labels):
            shape = tuple(images.shape)
            raise ValueError(f"expected uint8 NCHW images and one label each, got {shape}, {len(labels)} labels")
        self.images = images.contiguous()
        self.labels = labels.to(torch.int64)
        self.classes = list(classes)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index].float().div_(255), int(self.labels[index])


def random_crop_flip(
    x: torch.Tensor, generator: torch.Generator | None, *, pad: int, flip: bool
) -> torch.Tensor:
    """Zero-pad by ``pad``, crop back to the original size at a random offset, and optionally flip
    horizontally with probability 1/2 -- per image, in one gather, on ``x``'s device.

    Random numbers come from ``generator`` (CPU; None -> global RNG) so a seed reproduces a batch
    whatever device ``x`` lives on."""
    n, c, h, w = x.shape
    rng_device = generator.device if generator is not None else torch.device("cpu")
    dy, dx = torch.randint(0, 2 * pad + 1, (2, n), generator=generator, device=rng_device).to(x.device)
    rows = torch.arange(h, device=x.device) + dy[:, None]  # (n, h) rows of the padded image
    cols = torch.arange(w, device=x.device) + dx[:, None]  # (n, w)
    if flip:
        mirrored = torch.rand(n, generator=generator, device=rng_device).to(x.device) < 0.5
        cols = torch.where(mirrored[:, None], cols.flip(1), cols)
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    channel = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, channel, rows[:, None, :, None], cols[:, None, None, :]]


# --- Fashion-MNIST ---------------------------------------------------------------------------

FASHION_MNIST_SOURCE = Path("/usr/share/datasets/fashion-mnist")  # Debian: dataset-fashion-mnist
_IDX_FILES = {  # split -> (images, labels) file names, as torchvision expects them in raw/
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_MAGIC = {3: 2051, 1: 2049}  # ndim -> magic number of a uint8 IDX file
# What fixes a corrupt file: the system copy comes back from Debian, a decompressed one from the system copy.
REINSTALL_FIX = "Fix: sudo apt-get install --reinstall dataset-fashion-mnist (or replace the file)"


def _fashion_mnist_source() -> Path:
    return Path(os.environ.get("ROBUSTSERVE_FASHION_MNIST_SOURCE", FASHION_MNIST_SOURCE))


def _check_idx(path: Path, ndim: int, shown: Path | None = None, fix: str = REINSTALL_FIX) -> int:
    """Validate an IDX file's header and length; return the item count. torchvision's reader would
    otherwise fail on a truncated file with an assert or a tensor-view traceback."""
    shown = shown or path
    header = 4 * (ndim + 1)
    with open(path, "rb") as f:
        head = f.read(header)
    if len(head) < header:
        raise CorruptDataError(f"corrupt IDX file {shown}: only {len(head)} bytes, header needs {header}. {fix}")
    magic, *dims = struct.unpack(f">{ndim + 1}I", head)
    if magic != _IDX_MAGIC[ndim]:
        raise CorruptDataError(f"corrupt IDX file {shown}: magic {magic}, expected {_IDX_MAGIC[ndim]}. {fix}")
    size, expected = path.stat().st_size, header + math.prod(dims)
    if size != expected:
        raise CorruptDataError(f"corrupt IDX file {shown}: {size} bytes, header {dims} implies {expected}. {fix}")
    return dims[0]


def _prepare_fashion_mnist(raw: Path) -> None:
    """Make sure raw/ holds all four decompressed IDX files (torchvision checks for all of them),
    decompressing missing ones from the system folder."""
    source = _fashion_mnist_source()
    for names in _IDX_FILES.values():
        for name, ndim in zip(names, (3, 1)):
            target, packed = raw / name, source / f"{name}.gz"
            if target.exists():
                continue
            if not packed.exists():
                raise DataNotFoundError(
                    f"Fashion-MNIST not found: neither {target} nor {packed} exists. Fix: "
                    f"sudo apt-get install dataset-fashion-mnist (or put the IDX files in {raw})"
                )
            raw.mkdir(parents=True, exist_ok=True)
            # Decompress to a temp file in the same folder and rename: a crash or a concurrent
            # run never leaves a half-written file that would look present next time.
            tmp = raw / f".{name}.{uuid.uuid4().hex}.tmp"  # unique per writer, normal permissions
            try:
                with open(tmp, "wb") as out, gzip.open(packed, "rb") as src:
                    shutil.copyfileobj(src, out, 1 << 20)
                _check_idx(tmp, ndim, shown=packed)
                os.replace(tmp, target)
            except (gzip.BadGzipFile, EOFError, zlib.error) as e:  # EOFError: truncated stream
                raise CorruptDataError(f"corrupt gzip file {packed}: {e}. {REINSTALL_FIX}") from None
            finally:
                tmp.unlink(missing_ok=True)


@register_dataset("fashion_mnist", description="Fashion-MNIST 28x28 grey clothes, 10 classes (Debian data)",
                  default_architecture="smallcnn")
def _load_fashion_mnist(split: str, root: Path | None, download: bool) -> tuple[Dataset, DatasetSpec]:
    # `download` is ignored: the files come from the Debian package, never from the internet.
    root = default_root(root)
    raw = root / "FashionMNIST" / "raw"
    _prepare_fashion_mnist(raw)
    images_name, labels_name = _IDX_FILES[split]
    # A decompressed file is only a copy: deleting it makes the next run decompress it again.
    fix = f"Fix: delete it; it is decompressed again from {_fashion_mnist_source()}"
    if _check_idx(raw / images_name, 3, fix=fix) != _check_idx(raw / labels_name, 1, fix=fix):
        raise CorruptDataError(f"{raw / images_name} and {raw / labels_name} hold different item counts. "
                               f"Fix: delete both; they are decompressed again from {_fashion_mnist_source()}")
    tv = datasets.FashionMNIST(str(root), train=split == "train", download=False)
    dataset = TensorImageDataset(tv.data.unsqueeze(1), tv.targets, tv.classes)
    spec = DatasetSpec(
        name="fashion_mnist",
        class_names=tuple(tv.classes),
        input_shape=(1, 28, 28),
        mean=(0.2860,),
        std=(0.3530,),
        default_architecture=DATASETS["fashion_mnist"].default_architecture,
        # Translation only: flips would be label-safe for clothes, but the usual robust-training
        # recipes on (Fashion-)MNIST use no flip, so results stay comparable with published ones.
        augment=functools.partial(random_crop_flip, pad=2, flip=False),
    )
    return dataset, spec


# --- CIFAR-10 / CIFAR-100 --------------------------------------------------------------------


def _cifar_loader(
    name: str, cls: type[datasets.CIFAR10], mean: tuple[float, ...], std: tuple[float, ...]
) -> Loader:
    """One loader body for CIFAR-10 and CIFAR-100: they differ only in class, folder and statistics."""

    def load(split: str, root: Path | None, download: bool) -> tuple[Dataset, DatasetSpec]:
        root = default_root(root)
        try:
            tv = cls(str(root), train=split == "train", download=download)
        except RuntimeError as e:  # torchvision: "Dataset not found or corrupted" (md5 mismatch too)
            raise DataNotFoundError(
                f"{name} not found or corrupted in {root} ({e}). Fix: "
                f"--download (needs internet) or put {cls.base_folder} in {root}"
            ) from None
        images = torch.from_numpy(tv.data).permute(0, 3, 1, 2)  # torchvision keeps NHWC
        dataset = TensorImageDataset(images, torch.tensor(tv.targets), tv.classes)
        spec = DatasetSpec(
            name=name,
            class_names=tuple(tv.classes),
            input_shape=(3, 32, 32),
            mean=mean,
            std=std,
            default_architecture=DATASETS[name].default_architecture,
            augment=functools.partial(random_crop_flip, pad=4, flip=True),  # the standard CIFAR recipe
        )
        return dataset, spec

    return load


for _name, _cls, _mean, _std in (
    ("cifar10", datasets.CIFAR10, (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)),
    ("cifar100", datasets.CIFAR100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
):
    register_dataset(_name, description=f"{_cls.__name__} 32x32 colour, torchvision's python format",
                     default_architecture="preactresnet18")(
        _cifar_loader(_name, _cls, _mean, _std)
    )


# --- ImageFolder (ImageNet layout) -----------------------------------------------------------

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@register_dataset("imagefolder", description="any root/{train,val}/<class>/<image> tree, ImageNet-style",
                  default_architecture="resnet50")
def _load_imagefolder(
    split: str, root: Path | None, download: bool, *, image_size: int | None = None, augment: bool = True
) -> tuple[Dataset, DatasetSpec]:
    """``image_size`` (default $ROBUSTSERVE_IMAGE_SIZE or 224) lets tests use tiny trees.
    ``augment=False`` gives the training images with the evaluation transform: what validation and
    artifacts built from training images (THAT's memory bank) must see."""
    size = image_size or int(os.environ.get("ROBUSTSERVE_IMAGE_SIZE", 224))
    folder = root / ("train" if split == "train" else "val") if root is not None else None
    if folder is None or not folder.is_dir():
        found = "no root given" if folder is None else f"{folder} is not a folder"
        raise DataNotFoundError(f"imagefolder needs root=<folder with train/ and val/ class subfolders>; {found}")
    # Images differ in size, so they are decoded, resized and augmented per item (spec.augment None).
    if split == "train" and augment:
        transform = T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ToTensor()])
    else:  # the ImageNet evaluation convention: resize to 256/224 of the crop, then centre-crop
        transform = T.Compose([T.Resize(round(size * 256 / 224)), T.CenterCrop(size), T.ToTensor()])
    dataset = datasets.ImageFolder(str(folder), transform=transform)
    spec = DatasetSpec(
        name="imagefolder",
        class_names=tuple(dataset.classes),
        input_shape=(3, size, size),
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        default_architecture=DATASETS["imagefolder"].default_architecture,
    )
    return dataset, spec

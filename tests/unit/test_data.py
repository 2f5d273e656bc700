"""Dataset loaders on tiny data written in the real on-disk formats (nothing is fetched)."""

from __future__ import annotations

import hashlib
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import write_idx
from PIL import Image
from torchvision import datasets

from training.data import (
    DATASETS,
    FASHION_MNIST_SOURCE,
    CorruptDataError,
    DataNotFoundError,
    TensorImageDataset,
    load_dataset,
)
from training.errors import ConfigError

N_TRAIN, N_TEST = 20, 8


@pytest.fixture
def fashion_source(tmp_path, monkeypatch) -> Path:
    source = tmp_path / "source"
    source.mkdir()
    rng = np.random.default_rng(0)
    for prefix, n in (("train", N_TRAIN), ("t10k", N_TEST)):
        write_idx(source / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx(source / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    monkeypatch.setenv("ROBUSTSERVE_FASHION_MNIST_SOURCE", str(source))
    return source


def test_registry_and_bad_names():
    assert {"fashion_mnist", "cifar10", "cifar100", "imagefolder"} <= set(DATASETS)
    with pytest.raises(ConfigError, match="known: .*fashion_mnist"):
        load_dataset("nope", "train")
    with pytest.raises(ConfigError, match="split"):
        load_dataset("fashion_mnist", "val")


def test_fashion_mnist_from_idx(fashion_source, tmp_path):
    root = tmp_path / "data"
    for split, n in (("train", N_TRAIN), ("test", N_TEST)):
        ds, spec = load_dataset("fashion_mnist", split, root=root)
        assert isinstance(ds, TensorImageDataset) and len(ds) == n
        assert ds.images.shape == (n, 1, 28, 28) and ds.images.dtype == torch.uint8
        assert ds.labels.tolist() == [i % 10 for i in range(n)]
        x, y = ds[3]
        assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and y == 3
        assert 0 <= x.min() and x.max() <= 1 and x.max() > 0
        assert spec.input_shape == (1, 28, 28) and spec.num_classes == 10
        assert spec.class_names[0] == "T-shirt/top" and spec.default_architecture == "smallcnn"
    raw = root / "FashionMNIST" / "raw"
    assert sorted(p.name for p in raw.iterdir()) == sorted(  # decompressed, no temp files left
        f"{p}-{k}-ubyte" for p in ("train", "t10k") for k in ("images-idx3", "labels-idx1")
    )


def test_default_root_from_env(fashion_source, tmp_path, monkeypatch):
    monkeypatch.setenv("ROBUSTSERVE_DATA", str(tmp_path / "elsewhere"))
    ds, _ = load_dataset("fashion_mnist", "test")
    assert len(ds) == N_TEST and (tmp_path / "elsewhere" / "FashionMNIST" / "raw").is_dir()


def test_truncated_idx_is_a_clear_error(fashion_source, tmp_path):
    write_idx(fashion_source / "train-images-idx3-ubyte.gz", np.zeros((N_TRAIN, 28, 28)), truncate=100)
    with pytest.raises(CorruptDataError, match="train-images-idx3-ubyte") as info:
        load_dataset("fashion_mnist", "train", root=tmp_path / "data")
    assert isinstance(info.value, ValueError) and "\n" not in str(info.value)
    assert not (tmp_path / "data" / "FashionMNIST" / "raw" / "train-images-idx3-ubyte").exists()


def test_truncated_gzip_is_a_clear_error(fashion_source, tmp_path):
    packed = fashion_source / "t10k-labels-idx1-ubyte.gz"
    packed.write_bytes(packed.read_bytes()[:-12])  # cut the gzip trailer and some data
    with pytest.raises(CorruptDataError, match="t10k-labels-idx1-ubyte"):
        load_dataset("fashion_mnist", "test", root=tmp_path / "data")


def test_corrupt_file_already_in_raw(fashion_source, tmp_path):
    raw = tmp_path / "data" / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    (raw / "t10k-images-idx3-ubyte").write_bytes(struct.pack(">4I", 2051, N_TEST, 28, 28) + b"\0" * 50)
    with pytest.raises(CorruptDataError, match="t10k-images-idx3-ubyte"):
        load_dataset("fashion_mnist", "test", root=tmp_path / "data")


def test_missing_fashion_mnist_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("ROBUSTSERVE_FASHION_MNIST_SOURCE", str(tmp_path / "nowhere"))
    with pytest.raises(DataNotFoundError, match="apt-get install dataset-fashion-mnist") as info:
        load_dataset("fashion_mnist", "train", root=tmp_path / "data")
    assert "FashionMNIST/raw" in str(info.value)


def _pickle(path: Path, obj: dict) -> str:
    path.write_bytes(pickle.dumps(obj))
    return hashlib.md5(path.read_bytes()).hexdigest()


CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.fixture
def cifar10_root(tmp_path, monkeypatch) -> Path:
    """A 4-images-per-batch cifar-10-batches-py folder in torchvision's format.

    The real batches are Python-2 pickles whose byte-string keys come back as str under the
    encoding="latin1" torchvision uses, so str keys here give exactly what torchvision reads."""
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    md5 = {
        name: _pickle(folder / name, {"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), "labels": [0, 1, 2, 9]})
        for name in names
    }
    meta_md5 = _pickle(folder / "batches.meta", {"label_names": CIFAR10_CLASSES})
    # torchvision checks every file against hard-coded md5s of the real archive (in _check_integrity
    # and again, via the module-level check_integrity, in _load_meta), so patching _check_integrity
    # alone is not enough. Point the class's lists at the fake files' md5s instead: the integrity
    # check still runs, on our files.
    monkeypatch.setattr(datasets.CIFAR10, "train_list", [[n, md5[n]] for n in names[:5]])
    monkeypatch.setattr(datasets.CIFAR10, "test_list", [["test_batch", md5["test_batch"]]])
    monkeypatch.setattr(datasets.CIFAR10, "meta", {**datasets.CIFAR10.meta, "md5": meta_md5})
    return tmp_path


def test_cifar10_folder(cifar10_root):
    train, spec = load_dataset("cifar10", "train", root=cifar10_root)
    test, _ = load_dataset("cifar10", "test", root=cifar10_root)
    assert train.images.shape == (20, 3, 32, 32) and train.images.dtype == torch.uint8 and len(test) == 4
    # NCHW must be the CHW reading of each 3072-byte row (red plane first), not a scrambled one.
    row = pickle.loads((cifar10_root / "cifar-10-batches-py" / "data_batch_1").read_bytes())["data"][1]
    assert torch.equal(train.images[1], torch.from_numpy(row.reshape(3, 32, 32)))
    x, y = train[1]
    assert x.shape == (3, 32, 32) and y == 1 and 0 <= x.min() and x.max() <= 1
    assert spec.class_names == tuple(CIFAR10_CLASSES) and spec.input_shape == (3, 32, 32)
    assert spec.default_architecture == "preactresnet18"


def test_corrupt_cifar_file(cifar10_root):
    (cifar10_root / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"garbage")
    with pytest.raises(DataNotFoundError, match="corrupted"):
        load_dataset("cifar10", "train", root=cifar10_root)


@pytest.mark.parametrize(
    "name, folder", [("cifar10", "cifar-10-batches-py"), ("cifar100", "cifar-100-python")]
)
def test_missing_cifar_names_the_fix(tmp_path, name, folder):
    with pytest.raises(DataNotFoundError, match=f"--download \\(needs internet\\) or put {folder}"):
        load_dataset(name, "train", root=tmp_path)


def test_imagefolder_tree(tmp_path):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(2):
                pixels = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(tmp_path / split / cls / f"{i}.png")
    for split in ("train", "test"):
        ds, spec = load_dataset("imagefolder", split, root=tmp_path, image_size=32)
        x, y = ds[len(ds) - 1]
        assert len(ds) == 4 and x.shape == (3, 32, 32) and y == 1 and 0 <= x.min() and x.max() <= 1
        assert spec.input_shape == (3, 32, 32) and spec.class_names == ("cat", "dog") and spec.augment is None
    # Without augmentation the training images are the same on every read (validation, memory banks).
    plain, _ = load_dataset("imagefolder", "train", root=tmp_path, image_size=32, augment=False)
    assert torch.equal(plain[0][0], plain[0][0])
    augmented, _ = load_dataset("imagefolder", "train", root=tmp_path, image_size=32)
    torch.manual_seed(0)
    assert any(not torch.equal(augmented[0][0], augmented[0][0]) for _ in range(5))
    with pytest.raises(DataNotFoundError, match="train/ and val/"):
        load_dataset("imagefolder", "train", root=None)


@pytest.mark.parametrize("name, data_fixture, pad, flips", [
    ("fashion_mnist", "fashion_source", 2, False),  # translation only
    ("cifar10", "cifar10_root", 4, True),
])
def test_augment(request, tmp_path, name, data_fixture, pad, flips):
    request.getfixturevalue(data_fixture)
    _, spec = load_dataset(name, "train", root=tmp_path / "data" if name == "fashion_mnist" else tmp_path)
    x = torch.rand((32, *spec.input_shape), generator=torch.Generator().manual_seed(1))
    a = spec.augment(x, torch.Generator().manual_seed(7))
    b = spec.augment(x, torch.Generator().manual_seed(7))
    c = spec.augment(x, torch.Generator().manual_seed(8))
    assert a.shape == x.shape and a.dtype == x.dtype and 0 <= a.min() and a.max() <= 1
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, x)
    assert spec.augment(x, None).shape == x.shape  # global RNG works too
    # Each output is its input shifted by at most `pad` (zeros filling in), maybe mirrored: the
    # input's centre shows up, intact, at one offset. Record whether it was mirrored.
    mirrored = []
    for out, inp in zip(a, x):
        centre = inp[:, pad:-pad, pad:-pad]
        h, w = centre.shape[1:]
        hits = [
            flip
            for dy in range(2 * pad + 1)
            for dx in range(2 * pad + 1)
            for flip in (False, True)
            if torch.equal(out[:, dy : dy + h, dx : dx + w], centre.flip(-1) if flip else centre)
        ]
        assert len(hits) == 1
        mirrored.append(hits[0])
    assert any(mirrored) == flips and not all(mirrored)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_augment_on_cuda_matches_cpu(fashion_source, tmp_path):
    """Random numbers are drawn on the CPU generator, so the device does not change the result."""
    _, spec = load_dataset("fashion_mnist", "train", root=tmp_path / "data")
    x = torch.rand(8, 1, 28, 28)
    on_cpu = spec.augment(x, torch.Generator().manual_seed(3))
    on_gpu = spec.augment(x.cuda(), torch.Generator().manual_seed(3))
    assert on_gpu.is_cuda and torch.equal(on_gpu.cpu(), on_cpu)


@pytest.mark.skipif(
    not FASHION_MNIST_SOURCE.is_dir(),
    reason="real Fashion-MNIST needs the Debian package: sudo apt-get install dataset-fashion-mnist",
)
def test_real_fashion_mnist(tmp_path, monkeypatch):
    monkeypatch.delenv("ROBUSTSERVE_FASHION_MNIST_SOURCE", raising=False)
    monkeypatch.chdir(tmp_path)  # the default root is data/ relative to the current directory
    train, spec = load_dataset("fashion_mnist", "train")
    test, _ = load_dataset("fashion_mnist", "test")
    assert train.images.shape == (60000, 1, 28, 28) and len(test) == 10000
    assert set(train.labels.tolist()) == set(range(10)) and spec.class_names[-1] == "Ankle boot"
    assert (tmp_path / "data" / "FashionMNIST" / "raw" / "train-images-idx3-ubyte").is_file()

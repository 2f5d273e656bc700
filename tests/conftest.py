"""Shared fixtures: small synthetic data and a small model trained on it in a few seconds."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from helpers import learnable_images, write_fashion_mnist_source
from training.models import StagedNet, build_model

FAINT = 40  # grey levels: the attack tests want a model that PGD at eps = 0.1 can fool


@pytest.fixture(scope="module")
def one_thread():
    """Tiny batches gain nothing from intra-op threads, and on a shared 2-core machine two spinning
    threads per process make SmallCNN's steps up to 10x slower. Use with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def synthetic_batch() -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = learnable_images(128, seed=7, contrast=FAINT)
    return torch.from_numpy(images).float().div(255).unsqueeze(1), torch.from_numpy(labels).long()


@pytest.fixture(scope="session")
def trained_smallcnn() -> StagedNet:
    """A SmallCNN trained on clean synthetic images: accurate, and not robust."""
    torch.manual_seed(0)
    images, labels = learnable_images(1000, seed=3, contrast=FAINT)
    x = torch.from_numpy(images).float().div(255).unsqueeze(1)
    y = torch.from_numpy(labels).long()
    model = build_model("smallcnn", num_classes=10, in_channels=1, mean=(0.5,), std=(0.5,))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(3):
        for start in range(0, len(x), 100):
            loss = F.cross_entropy(model(x[start:start + 100]), y[start:start + 100])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


@pytest.fixture
def learnable_fashion_mnist(tmp_path, monkeypatch):
    """Point the Fashion-MNIST loader at learnable synthetic IDX files and a fresh data root."""
    source = write_fashion_mnist_source(tmp_path / "fmnist-source")
    monkeypatch.setenv("ROBUSTSERVE_FASHION_MNIST_SOURCE", str(source))
    monkeypatch.setenv("ROBUSTSERVE_DATA", str(tmp_path / "data"))
    return source

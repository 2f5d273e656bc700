"""Fixtures of the integration tests only: a small trained model, learnable Fashion-MNIST files on disk and nginx
in front of the session's TorchServe. The fixtures the unit or browser tests share are in ``tests/conftest.py``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import FAINT, learnable_images, write_fashion_mnist_source

from training.models import StagedNet, build_model


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


@pytest.fixture(scope="session")
def served_proxy(served):
    """nginx (``serving.proxy``) in front of ``served``, as ``robustserve serve start --proxy`` runs it: TLS with a
    self-signed certificate, a 2 s client timeout, 5 requests per second and client in bursts of 10."""
    from helpers import free_ports

    from serving import proxy

    [port] = free_ports(1)
    settings = proxy.ProxySettings(state_dir=served.state_dir, upstream=served.inference_address, port=port,
                                   client_timeout_s=2, rate_per_s=5, burst=10)
    with proxy.running(settings):
        yield settings

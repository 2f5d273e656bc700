"""Shared fixtures: small synthetic data and a small model trained on it in a few seconds."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from helpers import learnable_images, train_tiny, write_fashion_mnist_source
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


SERVED_RECIPES = ("pgd_at", "trades", "dhat", "ducat", "that")  # every serving behaviour; trades is dhat's base


@pytest.fixture(scope="session")
def served_runs(tmp_path_factory) -> dict:
    """Tiny finished, evaluated and exported runs of every serving behaviour, on learnable synthetic
    Fashion-MNIST files (the data root stays set for the session: exports read its test images)."""
    from training.evaluate import evaluate_run
    from training.export import export_run

    root = tmp_path_factory.mktemp("served")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ROBUSTSERVE_FASHION_MNIST_SOURCE", str(write_fashion_mnist_source(root / "fmnist-source")))
        patch.setenv("ROBUSTSERVE_DATA", str(root / "data"))
        runs = {}
        for recipe_id in SERVED_RECIPES:
            runs[recipe_id] = run_dir = train_tiny(recipe_id, root / "runs")
            evaluate_run(run_dir, n=10, autoattack_n=0, pgd_steps=1, pgd_restarts=1, objectives=["ce"], sweep=[],
                         device="cpu")
            export_run(run_dir)
    torch.set_num_threads(threads)
    return runs


@pytest.fixture(scope="session")
def served_store(served_runs, tmp_path_factory):
    """A model store with the archive of every served model of ``served_runs``."""
    from serving.package import package_run

    store = tmp_path_factory.mktemp("model_store")
    for run_dir in served_runs.values():
        package_run(run_dir, model_store=store)
    return store


@pytest.fixture(scope="session")
def served(served_store, tmp_path_factory):
    """One real TorchServe on loopback over ``served_store``, shared by the REST, demo and hardening tests
    (starting one costs ~15 s). Dynamic batching with a 20 ms window, so concurrent requests share batches."""
    from helpers import free_server_ports
    from serving import server

    # A short state_dir: TorchServe's worker sockets live under it, at most 107 bytes of path.
    settings = server.ServerSettings(model_store=served_store, state_dir=tmp_path_factory.mktemp("ts"),
                                     batch_size=8, max_batch_delay_ms=20, **free_server_ports())
    with server.running(settings):
        yield settings


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

"""Fixtures shared by tests/unit, tests/integration and tests/browser: small synthetic data, one intra-op thread, and
tiny served runs with one real TorchServe over them (the integration and browser tests). Fixtures of the integration
tests alone are in ``tests/integration/conftest.py``."""

from __future__ import annotations

import pytest
import torch
from helpers import FAINT, learnable_images, train_tiny, write_fashion_mnist_source


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


@pytest.fixture(scope="module")
def demo(served, served_runs):
    """The demo (``demo.app.Demo``) over ``served``, for tests/integration/test_demo_server.py and the browser test."""
    from demo.app import Demo, state_dir_client

    data_root = next(iter(served_runs.values())).parent.parent / "data"  # the fixture's synthetic Fashion-MNIST
    return Demo(state_dir_client(served.state_dir), served_runs, data_root=data_root)

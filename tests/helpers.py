"""Test data in the real on-disk formats, and small trained models, shared by the test modules."""

from __future__ import annotations

import gzip
import socket
import ssl
import struct
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np


def write_idx(path: Path, array: np.ndarray, *, truncate: int = 0) -> None:
    """A gzipped uint8 IDX file: magic 2051 (3-d images) / 2049 (1-d labels), big-endian dims."""
    magic = {3: 2051, 1: 2049}[array.ndim]
    payload = struct.pack(f">{array.ndim + 1}I", magic, *array.shape) + array.astype(np.uint8).tobytes()
    with gzip.open(path, "wb") as f:
        f.write(payload[: len(payload) - truncate])


def learnable_images(n: int, seed: int, num_classes: int = 10, size: int = 28,
                     contrast: int = 150) -> tuple[np.ndarray, np.ndarray]:
    """Images a small CNN learns in seconds: class k is an 8x8 square, ``contrast`` grey levels above
    uniform noise in [0, 60), at its own position. A faint square (small contrast) is easy to learn
    and easy to attack at eps = 0.1."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % num_classes
    images = rng.integers(0, 60, (n, size, size)).astype(np.float64)
    for i, k in enumerate(labels):
        row, col = 2 + 6 * (k // 4), 2 + 6 * (k % 4)
        images[i, row:row + 8, col:col + 8] += contrast
    return np.clip(images, 0, 255).astype(np.uint8), labels


FAINT = 40  # grey levels: the attack tests want a model that PGD at eps = 0.1 can fool


def write_fashion_mnist_source(folder: Path, n_train: int = 600, n_test: int = 200) -> Path:
    """A Fashion-MNIST source folder (the four IDX .gz files) holding learnable synthetic images."""
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, n, seed in (("train", n_train, 0), ("t10k", n_test, 1)):
        images, labels = learnable_images(n, seed)
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return folder


# One epoch per stage on the synthetic data: enough for a model whose every part has trained weights.
TINY = {"batch_size": 50, "train_subset": None, "val_size": 100, "attack_steps": 2, "val_attack_steps": 2}


def tiny_config(recipe_id: str, **overrides):
    """The quick preset of ``recipe_id`` cut to one epoch per stage on the synthetic data."""
    from training.recipes import get_recipe

    recipe = get_recipe(recipe_id)
    config = recipe.config("quick", **TINY, **overrides)
    return recipe.config("quick", **TINY, **overrides,
                         stages={stage.name: {"epochs": 1} for stage in recipe.stages(config)})


def train_tiny(recipe_id: str, runs_root: Path) -> Path:
    """A finished tiny run of ``recipe_id`` in ``runs_root/<recipe_id>`` (its base run trained first, beside it)."""
    from training.engine import train
    from training.recipes import get_recipe

    overrides = {}
    base = get_recipe(recipe_id).config("quick").base
    if base is not None:
        base_dir = runs_root / base
        overrides["base_run"] = str(base_dir if (base_dir / "defense.json").is_file() else train_tiny(base, runs_root))
    return train(tiny_config(recipe_id, **overrides), runs_root / recipe_id, progress=False)


def tiny_bn_net(num_classes: int = 4):
    """A StagedNet with BatchNorm in the trunk and in both heads, small enough for many SGD steps (DH-AT's tests)."""
    from torch import nn

    from training.models import Normalize, StagedNet

    def block(cin: int, cout: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU())

    return StagedNet(normalize=Normalize((0.5,), (0.5,)), stem=block(1, 4),
                     stages=[block(4, 4), block(4, 8), block(8, 8)],
                     pool=nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()), classifier=nn.Linear(8, num_classes),
                     attach_point=1)


def constant_logits_model():
    """Always class 0, with a gradient of exactly zero: the gradient masking pyautoattack checks for."""
    import torch

    class ConstantLogits(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = torch.nn.Linear(28 * 28, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.linear(x.flatten(1)) * 0 + torch.arange(10.0).flip(0)

    return ConstantLogits()


def processes_started_from(fragment: str) -> list:
    """Live processes (TorchServe frontends and workers) with ``fragment`` in their command line, e.g. the prefix
    of a benchmark's temporary folder: what must be gone once that benchmark returns."""
    import psutil

    found = []
    for process in psutil.process_iter(["cmdline"]):
        if any(fragment in part for part in process.info["cmdline"] or ()):
            found.append(process)
    return found


@dataclass
class TlsExchange:
    """What a raw TLS client saw: everything the server sent back and, counted from its last byte sent, how long
    until the first byte of a reply (None: none came) and until the server closed the connection."""

    reply: bytes
    seconds: float
    first_byte_seconds: float | None

    @property
    def status(self) -> int | None:
        """The HTTP status of the reply, or None when the server closed without one."""
        line = self.reply.split(b"\r\n", 1)[0].split()
        return int(line[1]) if len(line) > 1 and line[0].startswith(b"HTTP/") else None

    @property
    def body(self) -> bytes:
        return self.reply.partition(b"\r\n\r\n")[2]


def tls_exchange(host: str, port: int, context: ssl.SSLContext, sends: list[bytes], *, source: str | None = None,
                 limit_s: float = 30) -> TlsExchange:
    """Connect over TLS (from ``source`` address, a loopback one), send each chunk, then read until the server
    closes the connection or ``limit_s`` passes (a bounded wait: then the exchange is what came so far)."""
    raw = socket.create_connection((host, port), timeout=limit_s, source_address=(source, 0) if source else None)
    with context.wrap_socket(raw, server_hostname="localhost") as connection:
        for chunk in sends:
            connection.sendall(chunk)
        start, received, first = time.monotonic(), b"", None
        try:
            while time.monotonic() - start < limit_s:
                data = connection.recv(65536)
                if not data:
                    break
                first = time.monotonic() - start if first is None else first
                received += data
        except (TimeoutError, ConnectionResetError, ssl.SSLError):
            pass
        return TlsExchange(received, time.monotonic() - start, first)


def listening_sockets(pid: int) -> set[tuple[str, int]]:
    """(IPv4 address, port) of every socket the process ``pid`` and its descendants listen on. The JVM listens on
    IPv6 sockets with IPv4-mapped addresses, given here as the IPv4 address they map."""
    import ipaddress

    import psutil

    process = psutil.Process(pid)
    found = set()
    for member in (process, *process.children(recursive=True)):
        for connection in member.net_connections("inet"):
            if connection.status == psutil.CONN_LISTEN:
                address = ipaddress.ip_address(connection.laddr.ip)
                found.add((str(getattr(address, "ipv4_mapped", None) or address), connection.laddr.port))
    return found


# Ports for servers the tests start: one definition, in serving.server.
from serving.server import free_ports, free_server_ports  # noqa: E402,F401

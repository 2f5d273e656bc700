"""THAT's nearest-neighbour defense (Wu et al., Sec. 3 "Defense strategies", Eq. 8).

A memory bank holds one unit-norm feature per training image (the paper: from the clean
encoder) with its label. A query's feature (from the robust feature head) is compared with all of
them by inner product; the k most similar vote, each with its similarity as weight:

    P(c | x) = sum over the top-k neighbours i of  u_t . u_i * [y_i = c]          (Eq. 8)

``knn_vote`` is the reference: an exact search in torch. The serving runtime searches a FAISS
``IndexFlatIP`` over the same file and must give the same neighbours (the tests check that).
``KNNClassifier`` is the served mode as a module (pixels -> Eq. 8 scores). An adaptive attacker
differentiates through a smooth stand-in instead of the hard top-k: ``SoftKNN`` (a softmax vote of
the whole bank), ``TopKSoftKNN`` (the served top-k vote with exponential weights, whose gradient
flows through the selected neighbours) or ``NearestClassFeatures`` (a feature-space attack: pull
the query's feature towards the nearest bank features of another class).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .checkpoint import load_state, save_tensors

# MEMORY_BANK, the bank's file name: packaging, THAT's recipe and the benchmarks import it from here.
from .run_files import MEMORY_BANK, read_memory_bank  # noqa: F401


@dataclass
class MemoryBank:
    features: torch.Tensor  # [N, D] float32, unit-norm rows
    labels: torch.Tensor  # [N] int64
    ids: torch.Tensor  # [N] int64: the index of each row's image in the training set
    num_classes: int

    def __len__(self) -> int:
        return self.features.shape[0]

    def to(self, device: torch.device | str) -> MemoryBank:
        return MemoryBank(self.features.to(device), self.labels.to(device), self.ids.to(device), self.num_classes)

    def save(self, path: Path, *, built_from: str | None = None) -> None:
        """Write the bank atomically as safetensors (never a pickle), with ``built_from``: the
        ``weights_digest`` of the model whose encoder filled it (``memory_bank_source``)."""
        save_tensors(Path(path), {"features": self.features, "labels": self.labels, "ids": self.ids},
                     {"num_classes": self.num_classes, **({"built_from": built_from} if built_from else {})})

    @classmethod
    def load(cls, path: Path) -> MemoryBank:
        features, labels, ids, num_classes = read_memory_bank(Path(path), "pt")
        return cls(features.float(), labels.long(), ids.long(), num_classes)


def memory_bank_source(path: Path) -> str | None:
    """The ``weights_digest`` a bank file records as built from (``MemoryBank.save``); None for a bank that
    records none (written before banks did). Reads the file's header only."""
    return (load_state(Path(path)) or {}).get("built_from")


@torch.no_grad()
def build_memory_bank(encoder_fn: Callable[[torch.Tensor], torch.Tensor], train_set: Dataset, batch_size: int,
                      *, num_classes: int, device: torch.device | str = "cpu") -> MemoryBank:
    """Encode every image of ``train_set``, in index order, into a bank (the paper's M_train).

    ``encoder_fn`` maps a batch of pixels on ``device`` to features; they are re-normalised here so
    that a bank is unit-norm whatever the encoder returns.
    """
    features, labels = [], []
    for x, y in DataLoader(train_set, batch_size=batch_size, shuffle=False):
        features.append(torch.nn.functional.normalize(encoder_fn(x.to(device)).float(), dim=1).cpu())
        labels.append(torch.as_tensor(y, dtype=torch.long))
    features_t = torch.cat(features)
    return MemoryBank(features_t, torch.cat(labels), torch.arange(len(features_t), dtype=torch.long), num_classes)


def knn_search(query_features: torch.Tensor, bank_features: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k by inner product: ``(similarities [B, k], indices [B, k])``, most similar first
    (what FAISS's ``IndexFlatIP.search`` returns)."""
    similarities = query_features.float() @ bank_features.T
    return similarities.topk(min(k, bank_features.shape[0]), dim=1)


def knn_vote(query_features: torch.Tensor, bank: MemoryBank, k: int,
             temperature: float | None = None) -> torch.Tensor:
    """Class scores [B, C] from the k nearest bank entries (Eq. 8).

    Each neighbour adds its weight to its class: the inner product itself (Eq. 8, ``temperature``
    None), or ``exp(similarity / temperature)`` (Wu et al. 2018's weighted vote, which THAT cites
    for its memory bank). Gradients flow through the similarities of the selected neighbours.
    """
    similarities, indices = knn_search(query_features, bank.features, k)
    weights = similarities if temperature is None else (similarities / temperature).exp()
    scores = torch.zeros(query_features.shape[0], bank.num_classes, device=weights.device, dtype=weights.dtype)
    return scores.scatter_add(1, bank.labels[indices], weights)


class _BankModule(nn.Module):
    """A module with an encoder and a memory bank held as non-persistent buffers: ``.to(device)``
    moves the bank, and ``state_dict`` holds only the encoder (the bank has its own file)."""

    def __init__(self, encoder: nn.Module, bank: MemoryBank) -> None:
        super().__init__()
        self.encoder = encoder
        self.num_classes = bank.num_classes
        self.register_buffer("bank_features", bank.features, persistent=False)
        self.register_buffer("bank_labels", bank.labels, persistent=False)
        self.register_buffer("bank_ids", bank.ids, persistent=False)

    @property
    def bank(self) -> MemoryBank:
        return MemoryBank(self.bank_features, self.bank_labels, self.bank_ids, self.num_classes)


class KNNClassifier(_BankModule):
    """The kNN serving mode: pixels -> ``encoder`` feature -> Eq. 8 class scores over the bank.

    The argmax is the kNN prediction. ``encoder`` (the robust feature head) is what is exported;
    the runtime does the vote over FAISS.
    """

    def __init__(self, encoder: nn.Module, bank: MemoryBank, k: int, temperature: float | None = None) -> None:
        super().__init__(encoder, bank)
        self.k = k
        self.temperature = temperature

    def vote(self, query_features: torch.Tensor) -> torch.Tensor:
        """Eq. 8 scores of already-encoded queries."""
        return knn_vote(query_features, self.bank, self.k, self.temperature)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.vote(self.encoder(x))


class SoftKNN(_BankModule):
    """A differentiable surrogate of the kNN vote for adaptive attacks.

    Every bank entry votes with weight softmax(similarity / temperature) over the whole bank, so
    the class probability is p_c = sum of the weights of class c. The scores returned are the
    per-class log-sum-exp of similarity / temperature, i.e. log p_c up to a per-row constant, so
    their argmax is the soft vote's and cross-entropy on them is exactly -log p_y. Unlike the
    hard top-k, entries just outside the neighbourhood still pull on the gradient, which is what an
    attacker needs to swap neighbours in; a small temperature makes the vote follow the nearest
    entries, as the real one does.
    """

    def __init__(self, encoder: nn.Module, bank: MemoryBank, temperature: float) -> None:
        super().__init__(encoder, bank)
        if temperature <= 0:
            raise ValueError(f"the soft kNN temperature must be positive, got {temperature}")
        self.temperature = temperature

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.encoder(x).float() @ self.bank_features.T / self.temperature  # [B, N]
        shift = logits.amax(dim=1, keepdim=True).detach()  # keeps exp() finite; cancels below
        weights = (logits - shift).exp()
        mass = torch.zeros(logits.shape[0], self.num_classes, device=logits.device, dtype=logits.dtype)
        mass = mass.scatter_add(1, self.bank_labels.expand_as(weights), weights)
        return mass.clamp_min(torch.finfo(mass.dtype).tiny).log() + shift


class TopKSoftKNN(_BankModule):
    """The top-k vote with weights exp(similarity / temperature), as log class scores.

    Closer to the served vote than ``SoftKNN``: only the k nearest entries count, as in Eq. 8, and
    the gradient flows through their similarities. A class with no neighbour gets a score of about
    -87 (log of the smallest float), so cross-entropy still pulls towards the classes present.
    """

    def __init__(self, encoder: nn.Module, bank: MemoryBank, k: int, temperature: float) -> None:
        super().__init__(encoder, bank)
        self.k = k
        self.temperature = temperature

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.encoder(x).float()
        similarities, indices = knn_search(features, self.bank_features, self.k)
        # Shift by the largest similarity so exp() stays finite for a small temperature.
        shift = similarities[:, :1].detach() / self.temperature
        weights = (similarities / self.temperature - shift).exp()
        mass = torch.zeros(features.shape[0], self.num_classes, device=weights.device, dtype=weights.dtype)
        mass = mass.scatter_add(1, self.bank_labels[indices], weights)
        return mass.clamp_min(torch.finfo(mass.dtype).tiny).log() + shift


class NearestClassFeatures(_BankModule):
    """A feature-space attack surface: class c scores the mean similarity of the query's feature to
    its ``per_class`` most similar bank features of class c (divided by ``temperature``).

    Raising another class's score pulls the feature into that class's part of the bank, which is
    what flips a kNN vote; unlike a vote, every class has a score and a gradient everywhere.
    """

    def __init__(self, encoder: nn.Module, bank: MemoryBank, per_class: int, temperature: float) -> None:
        super().__init__(encoder, bank)
        self.per_class = per_class
        self.temperature = temperature

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        similarities = self.encoder(x).float() @ self.bank_features.T  # [B, N]
        scores = []
        for c in range(self.num_classes):
            of_class = similarities[:, self.bank_labels == c]
            top = of_class.topk(min(self.per_class, of_class.shape[1]), dim=1).values if of_class.shape[1] else \
                torch.full_like(similarities[:, :1], -1.0)
            scores.append(top.mean(dim=1))
        return torch.stack(scores, dim=1) / self.temperature

"""THAT's memory bank behind FAISS: the search and the Eq. 8 vote of the ``that_knn`` endpoint.

The bank's features are unit-norm, so inner product is cosine similarity and an ``IndexFlatIP``
gives the exact top-k that ``training.knn.knn_vote`` computes in torch. For large banks an
``IndexIVFFlat`` (``nlist`` k-means cells, ``nprobe`` of them searched per query) trades a little
recall for speed; ``robustserve bench serve`` measures both. The index moves to the GPU when FAISS
sees one and stays on the CPU otherwise.

Files (in a run folder after packaging, and in the ``that_knn`` archive):

* ``memory_bank.faiss``: the FAISS index (FAISS's own binary format, no pickle),
* ``memory_bank.safetensors``: the bank of record: features, labels, ids (training-set indices).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from training.run_files import MEMORY_BANK, read_memory_bank

FAISS_INDEX = "memory_bank.faiss"
INDEX_KINDS = ("flat", "ivf")
MAX_K = 1000  # bounded work per request; the paper uses 50


def _faiss():
    import faiss

    return faiss


def build_index(features: np.ndarray, kind: str = "flat", *, nlist: int | None = None, nprobe: int = 16,
                seed: int = 0, train_sample: np.ndarray | None = None):
    """A CPU FAISS inner-product index over ``features`` [N, D] (float32, unit-norm rows).

    ``ivf``: ``nlist`` cells (default about 4 sqrt(N)) trained by k-means on ``train_sample`` when
    given (e.g. a random subset of a large bank, to bound the k-means time), else on the bank itself.
    """
    faiss = _faiss()
    features = np.ascontiguousarray(features, dtype=np.float32)
    n, dim = features.shape
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif kind == "ivf":
        sample = features if train_sample is None else np.ascontiguousarray(train_sample, dtype=np.float32)
        nlist = nlist or max(1, min(len(sample) // 39, int(4 * np.sqrt(n))))  # FAISS wants >= 39 points per cell
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = seed
        index.train(sample)
        index.nprobe = min(nprobe, nlist)
    else:
        raise ValueError(f"index kind must be one of {', '.join(INDEX_KINDS)}, got {kind!r}")
    index.add(features)
    return index


def on_best_device(index) -> tuple[object, str]:
    """``(index, device)``: moved to the GPU(s) when FAISS sees one, else the CPU index as it is."""
    faiss = _faiss()
    if faiss.get_num_gpus() > 0:
        return faiss.index_cpu_to_all_gpus(index), "cuda"
    return index, "cpu"


@dataclass
class Neighbours:
    similarities: np.ndarray  # [B, k] float32, most similar first
    rows: np.ndarray  # [B, k] int64 rows of the bank


class FaissMemoryBank:
    """A FAISS index over the bank's features with the labels and training ids of its rows."""

    def __init__(self, index, labels: np.ndarray, ids: np.ndarray, num_classes: int,
                 temperature: float | None = None) -> None:
        if index.ntotal != len(labels) or len(labels) != len(ids):
            raise ValueError(f"the FAISS index holds {index.ntotal} vectors but the bank has {len(labels)} labels "
                             f"and {len(ids)} ids")
        self.index, self.device = on_best_device(index)
        self.labels = labels.astype(np.int64)
        self.ids = ids.astype(np.int64)
        self.num_classes = num_classes
        self.temperature = temperature  # None: Eq. 8's similarity weights; T: exp(similarity / T)

    def __len__(self) -> int:
        return len(self.labels)

    @classmethod
    def load(cls, folder: Path, temperature: float | None = None) -> FaissMemoryBank:
        """The bank in ``folder``: its FAISS index file and the labels and ids of the bank of record."""
        _, labels, ids, num_classes = read_memory_bank(Path(folder) / MEMORY_BANK, "np")
        index = _faiss().read_index(str(Path(folder) / FAISS_INDEX))
        return cls(index, labels, ids, num_classes, temperature)

    def search(self, queries: np.ndarray, k: int) -> Neighbours:
        similarities, rows = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
        return Neighbours(similarities, rows.astype(np.int64))

    def vote(self, neighbours: Neighbours) -> np.ndarray:
        """Eq. 8 class scores [B, C]: each neighbour adds its weight to its label's class."""
        weights = neighbours.similarities.astype(np.float64)
        if self.temperature is not None:
            weights = np.exp(weights / self.temperature)
        valid = neighbours.rows >= 0  # IVF may return fewer than k hits (-1 rows)
        scores = np.zeros((len(weights), self.num_classes))
        batch = np.broadcast_to(np.arange(len(weights))[:, None], weights.shape)
        np.add.at(scores, (batch[valid], self.labels[neighbours.rows[valid]]), weights[valid])
        return scores

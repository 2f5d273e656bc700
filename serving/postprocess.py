"""What the runtime does with a mode's graph output outside the graph, one ``PostProcessor`` per kind.

``ServingMode.postprocess`` names the kind; each turns a batch of graph outputs into one
reply body per request (the fields of DESIGN.md's replies beyond model, version and mode):

* ``prediction``: ``{"index", "name"}``; ``top_k``: ``[{"index", "name", "probability"}]``,
* ``signal``: the defense's attack signal, where it gives one (DUCAT: the prediction fell in a
  dummy class, and nothing about which one; DH-AT ``both``: the heads disagree; kNN: the share of
  neighbours that agree),
* ``neighbours`` (kNN): ``[{"id", "label", "name", "similarity"}]``, most similar first.

Each must predict what the mode's module predicts (``ServingMode.module``); the serving tests
compare them on real images. All are numpy: a worker on the ONNX backend never imports torch.
"""

from __future__ import annotations

import os
import shutil
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from training.pairing import PAIRING_FILE, ClassPairing, read_pairing
from training.run_files import MEMORY_BANK

from .knn_index import FaissMemoryBank, Neighbours

RAW_DUMMY_CLASSES = "raw_dummy_classes"  # the post-processing of DUCAT's raw 2C scores
PRIVATE = 0o600  # a secret class pairing, and an archive holding one


@dataclass(frozen=True)
class RequestOptions:
    """One request's choices, validated by the runtime."""

    mode: str
    top_k: int
    values: Mapping[str, Any] = field(default_factory=dict)  # the mode's post-processor's own parameters (kNN's k)


@dataclass
class ModelContext:
    """What post-processing needs beyond the graph: class names and the defense's artifacts, which each
    post-processor reads into it (``PostProcessor.load``)."""

    class_names: tuple[str, ...]
    pairing: ClassPairing | None = None  # DUCAT
    bank: FaissMemoryBank | None = None  # THAT kNN
    default_k: int | None = None  # THAT kNN

    def raw_class_names(self) -> tuple[str, ...]:
        """DUCAT's 2C output names: the real classes, then the dummies.

        With the paper's public layout (k -> k + C) output C + k is "dummy of <class k>". A secret pairing
        is not spelled out to every client: its dummy outputs are only numbered ("dummy 0" is output C),
        and the recovered prediction, which needs the pairing, is computed here, server-side.
        """
        assert self.pairing is not None
        c = len(self.class_names)
        if not self.pairing.is_identity:
            return tuple(self.class_names) + tuple(f"dummy {j}" for j in range(c))
        return tuple(self.class_names) + tuple(f"dummy of {name}" for name in self.class_names)


Reply = dict[str, Any]


class PostProcessor(ABC):
    """One kind of post-processing (``ServingMode.postprocess`` names it): what a served model of that kind
    needs beyond its graph, declared in one place.

    * ``reply``: graph outputs of one batch -> one reply body per request,
    * ``parameters``: the request options it takes besides the mode and ``top_k``, and ``options`` to check them,
    * ``artifacts``: the run files it reads; ``package`` copies them (and what is built from them) into an
      archive and returns its ``served.json`` settings; ``load`` reads them back into the ``ModelContext``.

    The runtime and packaging ask these; neither knows any kind by name.
    """

    parameters: tuple[str, ...] = ()
    artifacts: tuple[str, ...] = ()

    @abstractmethod
    def reply(self, outputs: np.ndarray, options: Sequence[RequestOptions], ctx: ModelContext) -> list[Reply]:
        """One reply body per request of the batch."""

    def options(self, given: Mapping[str, Any], ctx: ModelContext) -> dict[str, Any]:
        """This kind's parameters of one request, checked (``RequestOptions.values``)."""
        return {}

    def package(self, run_dir: Path, staging: Path, params: Mapping[str, Any], settings: Any) -> dict[str, Any]:
        """Copy the artifacts from ``run_dir`` into the archive folder ``staging``; return the settings the
        runtime needs (``served.json``'s ``postprocess`` entry). ``params``: the recipe's params."""
        for name in self.artifacts:
            if (run_dir / name).is_file():
                shutil.copy2(run_dir / name, staging / name)
        return {}

    def load(self, folder: Path, settings: Mapping[str, Any], ctx: ModelContext) -> None:  # noqa: B027 (optional hook)
        """Read the artifacts of an extracted archive into ``ctx``. Default: it has none."""


POSTPROCESSORS: dict[str, PostProcessor] = {}


def postprocessor(kind: str) -> Callable[[type[PostProcessor]], type[PostProcessor]]:
    def register(cls: type[PostProcessor]) -> type[PostProcessor]:
        POSTPROCESSORS[kind] = cls()
        return cls

    return register


def softmax(scores: np.ndarray) -> np.ndarray:
    shifted = np.exp(scores - scores.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def _class(index: int, names: Sequence[str]) -> dict[str, Any]:
    return {"index": int(index), "name": names[index]}


def ranked(probabilities: np.ndarray, names: Sequence[str], top_k: int, *, prediction: int | None = None) -> Reply:
    """``prediction`` (default: the most probable class) and the ``top_k`` classes by probability."""
    order = np.argsort(-probabilities, kind="stable")[:top_k]
    return {"prediction": _class(int(probabilities.argmax()) if prediction is None else prediction, names),
            "top_k": [{**_class(int(i), names), "probability": float(probabilities[i])} for i in order]}


@postprocessor("logits")
class ClassLogits(PostProcessor):
    def reply(self, outputs: np.ndarray, options: Sequence[RequestOptions], ctx: ModelContext) -> list[Reply]:
        return [ranked(p, ctx.class_names, o.top_k) for p, o in zip(softmax(outputs), options, strict=True)]


@postprocessor("dual_head")
class DualHead(PostProcessor):
    """DH-AT ``both``: outputs [B, 3, C] = aggregated, main and second logits of one trunk pass."""

    def reply(self, outputs: np.ndarray, options: Sequence[RequestOptions], ctx: ModelContext) -> list[Reply]:
        replies = []
        for heads, o in zip(outputs, options, strict=True):
            main, second = int(heads[1].argmax()), int(heads[2].argmax())
            reply = ranked(softmax(heads[0]), ctx.class_names, o.top_k)
            reply["signal"] = {"heads_disagree": main != second, "main_head": _class(main, ctx.class_names),
                               "second_head": _class(second, ctx.class_names)}
            replies.append(reply)
        return replies


def _dummy_signal(raw_top: int, ctx: ModelContext) -> dict[str, Any]:
    # Only whether the raw argmax fell in a dummy class: which dummy it was, beside the recovered class, is one
    # pair of a secret pairing per reply (issue 16).
    return {"dummy_class_hit": raw_top >= len(ctx.class_names)}


class DummyClasses(PostProcessor):
    """DUCAT's 2C outputs, read with the run's class pairing (``pairing.json``, owner-only when secret)."""

    artifacts = (PAIRING_FILE,)

    def package(self, run_dir: Path, staging: Path, params: Mapping[str, Any], settings: Any) -> dict[str, Any]:
        super().package(run_dir, staging, params, settings)
        os.chmod(staging / PAIRING_FILE, PRIVATE)  # the archive folder holds a secret from here on
        return {}

    def load(self, folder: Path, settings: Mapping[str, Any], ctx: ModelContext) -> None:
        ctx.pairing = read_pairing(folder / PAIRING_FILE)


@postprocessor("recover_dummy_classes")
class RecoverDummyClasses(DummyClasses):
    """DUCAT ``recovered``: Eq. 6 with the stored pairing; probabilities over the recovered C scores. The numpy
    form of ``training.dummy_classes.recover_dummy_classes`` (the prediction) and ``recovered_scores``."""

    def reply(self, outputs: np.ndarray, options: Sequence[RequestOptions], ctx: ModelContext) -> list[Reply]:
        assert ctx.pairing is not None
        raw_top = outputs.argmax(1)
        predicted = np.asarray(ctx.pairing.real_class_of)[raw_top]
        scores = np.maximum(outputs[:, :ctx.pairing.num_classes], outputs[:, list(ctx.pairing.dummy_of)])
        replies = []
        for p, pred, raw, o in zip(softmax(scores), predicted.tolist(), raw_top, options, strict=True):
            reply = ranked(p, ctx.class_names, o.top_k, prediction=pred)
            reply["signal"] = _dummy_signal(int(raw), ctx)
            replies.append(reply)
        return replies


@postprocessor(RAW_DUMMY_CLASSES)
class RawDummyClasses(DummyClasses):
    """DUCAT ``raw``: the 2C softmax as it is, with the same dummy-class signal. Not served for a secret pairing
    unless the operator turned it on (``serving.runtime.withheld_modes``)."""

    def reply(self, outputs: np.ndarray, options: Sequence[RequestOptions], ctx: ModelContext) -> list[Reply]:
        names = ctx.raw_class_names()
        replies = []
        for p, o in zip(softmax(outputs), options, strict=True):
            reply = ranked(p, names, o.top_k)
            reply["signal"] = _dummy_signal(int(p.argmax()), ctx)
            replies.append(reply)
        return replies


@postprocessor("knn")
class KNNVote(PostProcessor):
    """THAT ``knn``: outputs are query features [B, D]; FAISS search over the memory bank, then the Eq. 8 vote
    with each request's ``k`` (default: the recipe's ``knn_k``)."""

    parameters = ("k",)
    artifacts = (MEMORY_BANK,)
    max_k = 1000

    def options(self, given: Mapping[str, Any], ctx: ModelContext) -> dict[str, Any]:
        from .decode import parse_integer

        assert ctx.bank is not None
        return {"k": parse_integer("k", given.get("k", ctx.default_k or 50), 1, min(len(ctx.bank), self.max_k))}

    def package(self, run_dir: Path, staging: Path, params: Mapping[str, Any], settings: Any) -> dict[str, Any]:
        """The bank, and the FAISS index over it that ``settings`` (``PackageSettings``) asks for."""
        import faiss

        from training.knn import MemoryBank

        from .knn_index import FAISS_INDEX, build_index

        super().package(run_dir, staging, params, settings)
        bank = MemoryBank.load(run_dir / MEMORY_BANK)
        index = build_index(bank.features.numpy(), settings.knn_index, nlist=settings.nlist, nprobe=settings.nprobe)
        faiss.write_index(index, str(staging / FAISS_INDEX))
        return {"k": params.get("knn_k"), "temperature": params.get("knn_temperature"),
                "index": {"kind": settings.knn_index, "vectors": len(bank),
                          **({"nlist": index.nlist, "nprobe": index.nprobe} if settings.knn_index == "ivf" else {})}}

    def load(self, folder: Path, settings: Mapping[str, Any], ctx: ModelContext) -> None:
        ctx.bank = FaissMemoryBank.load(folder, settings.get("temperature"))
        ctx.default_k = settings.get("k")

    def reply(self, outputs: np.ndarray, options: Sequence[RequestOptions], ctx: ModelContext) -> list[Reply]:
        bank = ctx.bank
        assert bank is not None
        found = bank.search(outputs, max(o.values["k"] for o in options))
        replies = []
        for sims, rows, o in zip(found.similarities, found.rows, options, strict=True):
            k = o.values["k"]
            found_rows = rows[:k] >= 0  # IVF can find fewer than k
            sims, rows = sims[:k][found_rows], rows[:k][found_rows]
            scores = bank.vote(Neighbours(sims[None], rows[None]))[0]
            prediction = int(scores.argmax())
            total = scores.sum()
            shares = scores / total if total > 0 else np.full_like(scores, 1 / len(scores))
            reply = ranked(shares, ctx.class_names, o.top_k, prediction=prediction)
            labels = bank.labels[rows]
            reply["neighbours"] = [{"id": int(bank.ids[r]), "label": int(label), "name": ctx.class_names[label],
                                    "similarity": float(s)} for r, label, s in zip(rows, labels, sims, strict=True)]
            reply["signal"] = {"agreement": float((labels == prediction).mean()) if len(rows) else 0.0, "k": len(rows)}
            replies.append(reply)
        return replies

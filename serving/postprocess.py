"""What the runtime does with a mode's graph output outside the graph, one function per kind.

``ServingMode.postprocess`` names the kind; each function turns a batch of graph outputs into one
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

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from training.pairing import ClassPairing

from .knn_index import FaissMemoryBank, Neighbours


@dataclass(frozen=True)
class RequestOptions:
    """One request's choices, validated by the runtime."""

    mode: str
    top_k: int
    k: int | None = None  # kNN neighbours (the ``knn`` kind only)


@dataclass
class ModelContext:
    """What post-processing needs beyond the graph: class names and the defense's artifacts."""

    class_names: tuple[str, ...]
    pairing: ClassPairing | None = None  # DUCAT
    bank: FaissMemoryBank | None = None  # THAT kNN

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
Postprocess = Callable[[np.ndarray, Sequence[RequestOptions], ModelContext], list[Reply]]
POSTPROCESSORS: dict[str, Postprocess] = {}


def postprocessor(kind: str) -> Callable[[Postprocess], Postprocess]:
    def register(fn: Postprocess) -> Postprocess:
        POSTPROCESSORS[kind] = fn
        return fn

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
def class_logits(outputs: np.ndarray, options: Sequence[RequestOptions], ctx: ModelContext) -> list[Reply]:
    return [ranked(p, ctx.class_names, o.top_k) for p, o in zip(softmax(outputs), options, strict=True)]


@postprocessor("dual_head")
def dual_head(outputs: np.ndarray, options: Sequence[RequestOptions], ctx: ModelContext) -> list[Reply]:
    """DH-AT ``both``: outputs [B, 3, C] = aggregated, main and second logits of one trunk pass."""
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


@postprocessor("recover_dummy_classes")
def recover(outputs: np.ndarray, options: Sequence[RequestOptions], ctx: ModelContext) -> list[Reply]:
    """DUCAT ``recovered``: Eq. 6 with the stored pairing; probabilities over the recovered C scores. The numpy
    form of ``training.dummy_classes.recover_dummy_classes`` (the prediction) and ``recovered_scores``."""
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


@postprocessor("raw_dummy_classes")
def raw_dummy(outputs: np.ndarray, options: Sequence[RequestOptions], ctx: ModelContext) -> list[Reply]:
    """DUCAT ``raw``: the 2C softmax as it is, with the same dummy-class signal. Not served for a secret pairing
    unless the operator turned it on (``serving.runtime.withheld_modes``)."""
    names = ctx.raw_class_names()
    replies = []
    for p, o in zip(softmax(outputs), options, strict=True):
        reply = ranked(p, names, o.top_k)
        reply["signal"] = _dummy_signal(int(p.argmax()), ctx)
        replies.append(reply)
    return replies


@postprocessor("knn")
def knn(outputs: np.ndarray, options: Sequence[RequestOptions], ctx: ModelContext) -> list[Reply]:
    """THAT ``knn``: outputs are query features [B, D]; FAISS search, then the Eq. 8 vote per request's k."""
    bank = ctx.bank
    assert bank is not None
    found = bank.search(outputs, max(o.k or 0 for o in options))
    replies = []
    for sims, rows, o in zip(found.similarities, found.rows, options, strict=True):
        found_rows = rows[:o.k] >= 0  # IVF can find fewer than k
        sims, rows = sims[:o.k][found_rows], rows[:o.k][found_rows]
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

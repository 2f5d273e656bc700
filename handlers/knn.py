"""TorchServe handler for THAT's kNN classification endpoint over the FAISS memory bank."""

from handlers.base import RuntimeHandler


class KNNHandler(RuntimeHandler):
    """``k`` neighbours per request (also as the ``X-K`` header); replies carry the neighbours
    (training id, label, similarity) and the share of them that agree."""

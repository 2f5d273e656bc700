"""TorchServe handler for a plain classifier (the baselines, AFT-DRA, ACT, THAT's classifier head)."""

from handlers.base import RuntimeHandler


class ClassifierHandler(RuntimeHandler):
    """Softmax top-k of the model's logits; ``top_k`` per request."""

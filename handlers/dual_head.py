"""TorchServe handler for DH-AT: ``head=main|second|both`` per request."""

from handlers.base import RuntimeHandler


class DualHeadHandler(RuntimeHandler):
    """``head`` comes as a JSON field, a query parameter (``/dhat/predict?head=both``,
    ``/invocations?model_name=dhat&head=both``), a form field or the ``X-Head`` header; ``both``
    also reports whether the two heads disagree."""

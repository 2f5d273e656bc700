"""TorchServe handler for DUCAT: dummy classes recovered to real ones, or the raw 2C scores."""

from handlers.base import RuntimeHandler


class DummyClassHandler(RuntimeHandler):
    """``mode=recovered`` (default) or ``mode=raw`` (also as the ``X-Mode`` header); a prediction that
    fell in a dummy class is reported as an attack signal. ``raw`` is refused (403) for a secret class
    pairing unless the archive was packaged with ``raw_with_secret_pairing``."""

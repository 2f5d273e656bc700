"""The TorchServe side of every served model: requests in, ``serving.runtime`` calls, replies out.

``RuntimeHandler`` does only translation. It loads a ``serving.runtime.Runtime`` from the extracted
archive (the runtime checks the archive's SHA-256 manifest first and refuses a changed one), turns
each TorchServe request of a dynamic batch into the runtime's fields (body, form fields, query
parameters, and the request headers a handler class maps to parameters), and sets each reply's
own HTTP status, so one bad request in a batch gets its 4xx while the others get their answers.
It also counts requests per model and mode and the attack signals raised, as Prometheus metrics.

Subclasses, one per behaviour, only say which request headers stand for which parameters.
"""

from __future__ import annotations

import json
import logging
from http import HTTPStatus
from typing import Any, ClassVar

from serving.runtime import ArchiveError, Runtime

logger = logging.getLogger(__name__)

# Prometheus counters (the server config sets model_metrics_auto_detect, so TorchServe exports them).
REQUESTS_METRIC = "RobustServeRequests"
SIGNALS_METRIC = "RobustServeAttackSignals"
METRIC_DIMENSIONS = ["ModelName", "Mode"]
TORCHSERVE_FIELDS = ("model_name",)  # TorchServe's own routing parameters, not the model's


def attack_signal(reply: dict[str, Any]) -> bool:
    """Whether a reply raises its defense's attack signal (a dummy class hit, disagreeing heads, or
    kNN neighbours of which at most half agree)."""
    signal = reply.get("signal") or {}
    return bool(signal.get("dummy_class_hit") or signal.get("heads_disagree") or signal.get("agreement", 1.0) <= 0.5)


class RuntimeHandler:
    """A TorchServe custom handler (``initialize`` / ``handle``) around a ``Runtime``."""

    headers: ClassVar[dict[str, str]] = {}  # request header -> runtime parameter

    def __init__(self) -> None:
        self.runtime: Runtime | None = None
        self.counters: dict[str, Any] = {}
        self.initialized = False

    def initialize(self, context: Any) -> None:
        properties = context.system_properties
        gpu = properties.get("gpu_id")
        device = f"cuda:{gpu}" if gpu is not None and _cuda_available() else "cpu"
        try:
            self.runtime = Runtime(properties["model_dir"], device=device)
        except ArchiveError as err:
            logger.error("robustserve: refusing to load model %s: %s", context.model_name, err)
            raise
        logger.info("robustserve: loaded %s", json.dumps(self.runtime.describe()))
        from ts.metrics.metric_type_enum import MetricTypes

        self.counters = {name: context.metrics.add_metric_to_cache(name, unit="count",
                                                                   dimension_names=METRIC_DIMENSIONS,
                                                                   metric_type=MetricTypes.COUNTER)
                         for name in (REQUESTS_METRIC, SIGNALS_METRIC)}
        self.initialized = True

    def fields(self, request: dict[str, Any], index: int, context: Any) -> dict[str, Any]:
        """One TorchServe request as runtime fields: its body / form / query fields plus mapped headers."""
        # /invocations routes by a model_name query parameter, which TorchServe passes on as a field.
        fields = {name: value for name, value in request.items() if name not in TORCHSERVE_FIELDS}
        for header, parameter in self.headers.items():
            value = context.get_request_header(index, header)
            if value is not None and parameter not in fields:
                fields[parameter] = value
        return fields

    def handle(self, data: list[dict[str, Any]], context: Any) -> list[str]:
        assert self.runtime is not None
        try:
            results = self.runtime.handle([self.fields(request, i, context) for i, request in enumerate(data)])
        except Exception:  # a bug must cost this batch a 500, never the worker
            logger.exception("robustserve: inference failed for a batch of %d", len(data))
            results = [(500, {"error": "internal error while serving this request; see the model log",
                              "status": 500})] * len(data)
        replies = []
        for i, (status, reply) in enumerate(results):
            context.set_response_content_type(i, "application/json")
            if status != 200:
                context.set_response_status(code=status, phrase=HTTPStatus(status).phrase, idx=i)
            self.count(context, reply)
            replies.append(json.dumps(reply))
        return replies

    def count(self, context: Any, reply: dict[str, Any]) -> None:
        """Requests per model and mode (``rejected`` for a 4xx); attack signals raised."""
        dimensions = [context.model_name, reply.get("mode", "rejected")]
        self.counters[REQUESTS_METRIC].add_or_update(1, dimensions)
        if attack_signal(reply):
            self.counters[SIGNALS_METRIC].add_or_update(1, dimensions)


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()

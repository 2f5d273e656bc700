"""The TorchServe side of every served model: requests in, ``serving.runtime`` calls, replies out.

``RuntimeHandler`` does only translation. It loads a ``serving.runtime.Runtime`` from the extracted
archive (the runtime checks the archive's SHA-256 manifest first and refuses a changed one), turns
each TorchServe request of a dynamic batch into the runtime's ``Fields`` (body, form fields, query
parameters, request headers, the body's content type, and the names given more than once), and sets
each reply's own HTTP status, so one bad request in a batch gets its 4xx while the others get their
answers. A refused request is one line in the model log. It also counts requests per model and mode
and the attack signals raised, as Prometheus metrics.

The server leaves request bodies undecoded (``decode_input_request=false``, ``serving.server``), so the
runtime applies its size limits before any JSON is parsed. Subclasses, one per behaviour, only document it.
"""

from __future__ import annotations

import json
import logging
from http import HTTPStatus
from typing import Any

from serving.runtime import ArchiveError, Fields, Runtime, cuda_available

logger = logging.getLogger(__name__)

# Prometheus counters (the server config sets model_metrics_auto_detect, so TorchServe exports them).
REQUESTS_METRIC = "RobustServeRequests"
SIGNALS_METRIC = "RobustServeAttackSignals"
METRIC_DIMENSIONS = ["ModelName", "Mode"]
TORCHSERVE_FIELDS = ("model_name",)  # TorchServe's own routing parameters, not the model's
REPEATED_NAMES = "robustserve_repeated_names"  # set on each request's RequestProcessor by _keep_repeated_names


def _keep_repeated_names() -> None:
    """Make TorchServe's worker remember which parameter names a request repeated.

    TorchServe 0.12 (its last release) builds each request's dict of query parameters and form fields in the
    static ``Service.retrieve_data_for_inference``, where a name given twice (``?top_k=3&top_k=4``, a form with
    two ``data`` files) keeps only its last value; nothing else tells the handler. This wraps it to set the
    repeated names on each request's ``RequestProcessor`` as an attribute (not a header: a client cannot
    forge it). Runs once per worker, from ``initialize``.
    """
    from ts.service import Service

    build = Service.retrieve_data_for_inference
    if getattr(build, REPEATED_NAMES, False):
        return

    def retrieve_data_for_inference(batch: list[dict[str, Any]]) -> Any:
        processors, inputs, request_ids = build(batch)
        for request, processor in zip(batch, processors, strict=True):
            names = [parameter["name"] for parameter in request["parameters"]]
            setattr(processor, REPEATED_NAMES, tuple(sorted({name for name in names if names.count(name) > 1})))
        return processors, inputs, request_ids

    setattr(retrieve_data_for_inference, REPEATED_NAMES, True)
    Service.retrieve_data_for_inference = staticmethod(retrieve_data_for_inference)


def attack_signal(reply: dict[str, Any]) -> bool:
    """Whether a reply raises its defense's attack signal (a dummy class hit, disagreeing heads, or
    kNN neighbours of which at most half agree)."""
    signal = reply.get("signal") or {}
    return bool(signal.get("dummy_class_hit") or signal.get("heads_disagree") or signal.get("agreement", 1.0) <= 0.5)


class RuntimeHandler:
    """A TorchServe custom handler (``initialize`` / ``handle``) around a ``Runtime``."""

    def __init__(self) -> None:
        self.runtime: Runtime | None = None
        self.counters: dict[str, Any] = {}
        self.initialized = False

    def initialize(self, context: Any) -> None:
        properties = context.system_properties
        gpu = properties.get("gpu_id")
        device = f"cuda:{gpu}" if gpu is not None and cuda_available() else "cpu"
        try:
            self.runtime = Runtime(properties["model_dir"], device=device)
        except ArchiveError as err:
            logger.error("robustserve: refusing to load model %s: %s", context.model_name, err)
            raise
        logger.info("robustserve: loaded %s", json.dumps(self.runtime.describe()))
        _keep_repeated_names()
        from ts.metrics.metric_type_enum import MetricTypes

        self.counters = {name: context.metrics.add_metric_to_cache(name, unit="count",
                                                                   dimension_names=METRIC_DIMENSIONS,
                                                                   metric_type=MetricTypes.COUNTER)
                         for name in (REQUESTS_METRIC, SIGNALS_METRIC)}
        self.initialized = True

    def fields(self, request: dict[str, Any], index: int, context: Any) -> Fields:
        """One TorchServe request as the runtime's ``Fields``."""
        processor = context.request_processor[index]
        # The worker keeps request headers and, under each parameter's own name, {"content-type": ...}.
        properties = processor.get_request_properties()
        # /invocations routes by a model_name query parameter, which TorchServe passes on as a field.
        values = {name: value for name, value in request.items() if name not in TORCHSERVE_FIELDS}
        return Fields(values=values,
                      headers={name: value for name, value in properties.items() if isinstance(value, str)},
                      content_types={name: properties[name].get("content-type", "") for name in values
                                     if isinstance(properties.get(name), dict)},
                      repeated=getattr(processor, REPEATED_NAMES, ()))

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
            if 400 <= status < 500:  # one line per refused request; json.dumps keeps the client's text on it
                logger.info("robustserve: refused %d %s", status, json.dumps(reply.get("error")))
            self.count(context, reply)
            replies.append(json.dumps(reply))
        return replies

    def count(self, context: Any, reply: dict[str, Any]) -> None:
        """Requests per model and mode (``rejected`` for a 4xx); attack signals raised."""
        dimensions = [context.model_name, reply.get("mode", "rejected")]
        self.counters[REQUESTS_METRIC].add_or_update(1, dimensions)
        if attack_signal(reply):
            self.counters[SIGNALS_METRIC].add_or_update(1, dimensions)

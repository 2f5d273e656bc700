"""``robustserve bench load``'s figures (``serving.bench.load.summarize``) from hand-made replies: failures counted
by status and endpoint. The load itself, a killed worker and the other faults: tests/integration/test_faults.py."""

from __future__ import annotations

import pytest

from serving.bench import common
from serving.bench import load as bl

pytestmark = pytest.mark.usefixtures("one_thread")


def test_failures_are_counted_by_status_and_endpoint():
    replies = [common.Reply("a", 0.0, 0.010, 200), common.Reply("a", 0.0, 0.020, 507, "{}"),
               common.Reply("b", 0.5, 0.530, common.NO_REPLY, "connection refused"), common.Reply("b", 0.6, 1.0, 200)]
    points = [common.Endpoint("a", "m"), common.Endpoint("b", "m", {"head": "both"})]
    figures = bl.summarize(replies, points)
    assert figures["requests"] == 4 and figures["ok"] == 2 and figures["failed"] == 2
    assert figures["failed_by_status"] == {"0": 1, "507": 1} and figures["failed_by_endpoint"] == {"a": 1, "b": 1}
    assert figures["failure_examples"] == ["a: HTTP 507: {}", "b: no reply: connection refused"]
    assert figures["wall_s"] == pytest.approx(1.0) and figures["throughput_req_s"] == pytest.approx(4.0)
    assert figures["endpoints"]["b"]["failed"] == 1 and figures["endpoints"]["b"]["req_s"] == pytest.approx(2.0)
    assert points[1].path == "/m/predict?head=both"  # not /predictions/m: TorchServe drops the query there

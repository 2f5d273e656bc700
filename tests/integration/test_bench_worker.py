"""serving/bench/worker.py: a fresh serving worker's start-up and peak memory, on a packaged tiny run
(the other benchmark dicts: tests/unit/test_bench.py)."""

from __future__ import annotations


def test_worker_benchmark_starts_a_fresh_worker_without_torch_on_onnx(served_runs, tmp_path):
    from serving.bench.common import package_and_extract
    from serving.bench.worker import start_figures

    folders = package_and_extract({"pgd_at": served_runs["pgd_at"]}, tmp_path / "store", tmp_path / "unpacked")
    onnx = start_figures(folders["pgd_at"], "onnx", repeats=1)
    eager = start_figures(folders["pgd_at"], "torch", repeats=1)
    assert not onnx["imports_torch"] and eager["imports_torch"]
    assert 0 < onnx["start_s"] and 0 < onnx["peak_rss_mib"] < eager["peak_rss_mib"]

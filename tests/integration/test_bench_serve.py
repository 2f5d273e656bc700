"""serving/bench/serve.py: `robustserve bench serve` on tiny runs, quick mode, a real TorchServe.

The figures are timings of a shared machine, so nothing here judges a speed: the dict must be
complete and self-consistent (percentiles ordered, every ratio the ratio of its parts, recalls in
[0, 1], the exact index's recall 1), and no server may outlive the benchmark, even a failed one.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import psutil
import pytest
from helpers import processes_started_from

from serving.bench import BENCHMARKS
from serving.bench import serve as bs
from serving.bench.common import KNN_K, RECIPES, find_runs, format_table
from serving.client import Client
from training.errors import ConfigError

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

ENDPOINTS = ("pgd_at", "dhat head=main", "dhat head=both", "ducat recovered", "ducat mode=raw", "that",
             "that_knn k=50", "resnet18 (natural)")
SERVED_MODES = ("pgd_at/default", "dhat/main", "dhat/second", "dhat/both", "ducat/recovered", "ducat/raw",
                "that/classifier", "that_knn/knn", "natural/default")


def bench_processes() -> list[psutil.Process]:
    """TorchServe frontends and workers started from a bench serve temporary folder."""
    return processes_started_from(bs.TEMP_PREFIX)


def bench_folders() -> set[Path]:
    return set(Path(tempfile.gettempdir()).glob(f"{bs.TEMP_PREFIX}*"))


@pytest.fixture(scope="module")
def result(served_runs):
    before = bench_folders()
    figures = bs.bench_serve(runs=served_runs, quick=True)
    assert not bench_processes(), "a TorchServe or nginx process outlived the benchmark"
    assert bench_folders() <= before, "the temporary model store and server state were not removed"
    return figures


def approx(value):
    return pytest.approx(value, rel=1e-9)


def test_registered_and_plain_data(result):
    assert BENCHMARKS["serve"].run is bs.run
    json.dumps(result)
    table = format_table(result, title="bench serve")
    assert "e2e_over_forward" in table and "dhat head=both" in table
    assert result["settings"]["quick"] and result["settings"]["clients"] == [1, 8]
    assert result["environment"]["torch"] and set(result["definitions"])
    assert all(seconds >= 0 for seconds in result["seconds"].values())


def test_every_endpoint_over_rest_and_its_overhead(result):
    assert tuple(result["endpoints"]) == ENDPOINTS
    for label, figures in result["endpoints"].items():
        for clients in (1, 8):
            assert 0 < figures[f"c{clients}_p50_ms"] <= figures[f"c{clients}_p99_ms"], label
            assert figures[f"c{clients}_req_s"] > 0, label
        for part in ("forward_ms", "postprocess_ms", "infer_ms", "handle_ms"):
            assert figures[part] > 0, (label, part)
        e2e = figures["c1_p50_ms"]
        assert figures["overhead_ms"] == approx(e2e - figures["forward_ms"])
        assert figures["e2e_over_forward"] == approx(e2e / figures["forward_ms"])
        assert figures["outside_runtime_ms"] == approx(e2e - figures["handle_ms"])
    modes = {label: figures["mode"] for label, figures in result["endpoints"].items()}
    assert modes == {"pgd_at": "default", "dhat head=main": "main", "dhat head=both": "both",
                     "ducat recovered": "recovered", "ducat mode=raw": "raw", "that": "classifier",
                     "that_knn k=50": "knn", "resnet18 (natural)": "default"}


def test_the_latency_the_proxy_adds_at_1_and_8_clients(result):
    figures = result["proxy"]
    assert figures["endpoint"] == bs.PROXY_ENDPOINT and result["settings"]["proxy"]["nginx"]
    for clients in (1, 8):
        for route in ("direct", "proxy"):
            assert 0 < figures[f"c{clients}_{route}_p50_ms"] <= figures[f"c{clients}_{route}_p99_ms"]
        for key in ("p50_ms", "p99_ms"):
            added = figures[f"c{clients}_proxy_{key}"] - figures[f"c{clients}_direct_{key}"]
            assert figures[f"c{clients}_added_{key}"] == approx(added)


def test_resnet18_ratio_is_its_endpoints(result):
    resnet, endpoint = result["resnet18"], result["endpoints"]["resnet18 (natural)"]
    assert resnet["train_s"] > 0 and resnet["train_images"] == 10 * bs.QUICK["resnet_images"][0]
    assert resnet["e2e_p50_ms"] == endpoint["c1_p50_ms"] and resnet["forward_ms"] == endpoint["forward_ms"]
    assert resnet["e2e_over_forward"] == approx(resnet["e2e_p50_ms"] / resnet["forward_ms"])
    target = result["targets"]["resnet18 e2e / forward"]
    assert target["value"] == resnet["e2e_over_forward"] and target["met"] == (target["value"] <= 1.3)


def test_dhat_main_against_both(result):
    heads = result["dhat_heads"]
    assert 0 < heads["main_flops"] < heads["both_flops"]  # main never runs the second head or the aggregator
    assert heads["flop_ratio"] == approx(heads["main_flops"] / heads["both_flops"])
    for prefix in ("b1", "b8", "e2e"):
        assert heads[f"{prefix}_time_ratio"] == approx(heads[f"{prefix}_main_ms"] / heads[f"{prefix}_both_ms"])
        assert heads[f"{prefix}_over_flop_prediction"] == approx(heads[f"{prefix}_time_ratio"] / heads["flop_ratio"])
    assert heads["e2e_main_ms"] == result["endpoints"]["dhat head=main"]["c1_p50_ms"]
    target = result["targets"]["dhat main / FLOP-predicted (b1)"]
    assert target["value"] == heads["b1_over_flop_prediction"] and target["met"] == (target["value"] <= 1.10)


def test_ducat_recovery_against_its_base(result):
    ducat = result["ducat_recovery"]
    recovered, base = result["endpoints"]["ducat recovered"], result["endpoints"]["pgd_at"]
    assert ducat["ducat_infer_ms"] == recovered["infer_ms"] and ducat["base_infer_ms"] == base["infer_ms"]
    assert ducat["infer_ratio"] == approx(ducat["ducat_infer_ms"] / ducat["base_infer_ms"])
    assert ducat["recovery_ms"] == approx(ducat["ducat_postprocess_ms"] - ducat["base_postprocess_ms"])
    assert ducat["recovery_over_base_infer"] == approx(ducat["recovery_ms"] / ducat["base_infer_ms"])
    assert result["targets"]["ducat infer / base infer"]["value"] == ducat["infer_ratio"]


def test_onnx_against_eager_for_every_served_mode(result):
    assert set(result["onnx_vs_eager"]) == set(SERVED_MODES)
    for figures in result["onnx_vs_eager"].values():
        for batch in (1, 8):
            onnx, eager = figures[f"b{batch}_onnx_img_s"], figures[f"b{batch}_eager_img_s"]
            assert onnx > 0 and eager > 0 and figures[f"b{batch}_ratio"] == approx(onnx / eager)
    worst = min(figures["b1_ratio"] for figures in result["onnx_vs_eager"].values())
    assert result["targets"]["onnx / eager (worst mode, b1)"]["value"] == worst


def test_knn_flat_against_ivf(result, served_runs):
    from training.knn import MEMORY_BANK, MemoryBank

    knn = result["knn"]
    assert knn["faiss_threads"] >= 1 and knn["k"] == KNN_K
    real_size = len(MemoryBank.load(served_runs["that"] / MEMORY_BANK))
    banks = {name: figures for name, figures in knn.items() if isinstance(figures, dict)}
    assert set(banks) == {f"real bank ({real_size})", "synthetic (20000)"}
    for name, bank in banks.items():
        assert bank["flat"]["recall"] == 1.0 and bank["flat"]["build_s"] >= 0
        assert 1 <= bank["nlist"] <= 4096 and bank["train_sample"] <= bank["vectors"]
        ivfs = {key: figures for key, figures in bank.items() if key.startswith("ivf ")}
        assert ivfs, name
        meeting = []
        for key, ivf in ivfs.items():
            assert 0.0 <= ivf["recall"] <= 1.0 and ivf["build_s"] > 0
            for batch in (1, 64):
                assert ivf[f"b{batch}_ms_per_query"] > 0
                assert ivf[f"speedup_b{batch}"] == approx(bank["flat"][f"b{batch}_ms_per_query"]
                                                          / ivf[f"b{batch}_ms_per_query"])
            assert ivf["meets_target"] == (ivf["recall"] >= 0.95 and ivf["speedup_b1"] >= 10)
            if ivf["meets_target"]:
                meeting.append(f"nlist={bank['nlist']}, nprobe={key.removeprefix('ivf nprobe=')}")
        assert bank["meets_target"] == meeting
        # nprobe = nlist searches every cell: exact.
        if f"ivf nprobe={bank['nlist']}" in ivfs:
            assert ivfs[f"ivf nprobe={bank['nlist']}"]["recall"] == 1.0


def test_an_endpoint_answered_with_another_behaviour_stops_the_benchmark(served, served_runs):
    """Every row of the ``result`` fixture passed ``check_behaviour``; here the route the benchmarks took before
    2026-12-05, on which TorchServe drops the query: "dhat head=both" was answered by the default head."""
    from serving.bench.common import BenchmarkError, Endpoint, check_behaviour, eval_images
    from serving.server import read_keys

    client = Client(served.inference_address, token=read_keys(served)["inference"])
    image = eval_images(served_runs["pgd_at"], 1)[1][0]
    both = Endpoint("dhat head=both", "dhat", {"head": "both"})
    check_behaviour(client, both, image)
    both.__dict__["path"] = "/predictions/dhat?head=both"  # what the cached path was
    with pytest.raises(BenchmarkError, match="mode 'main'"):
        check_behaviour(client, both, image)
    with pytest.raises(BenchmarkError, match="HTTP 403"):  # raw scores are not served for a secret pairing
        check_behaviour(client, Endpoint("ducat mode=raw", "ducat", {"mode": "raw"}), image)


def test_find_runs_by_folder_name(served_runs, tmp_path):
    for recipe in RECIPES:
        (tmp_path / f"{recipe}-quick-fashion_mnist-smallcnn").symlink_to(served_runs[recipe])
    assert find_runs(tmp_path) == {r: tmp_path / f"{r}-quick-fashion_mnist-smallcnn" for r in RECIPES}
    (tmp_path / "ducat-quick-fashion_mnist-smallcnn").unlink()
    with pytest.raises(ConfigError, match="finished ducat run"):
        find_runs(tmp_path)


def test_a_failure_while_serving_stops_the_server(served_runs, tmp_path):
    """bench_serve measures REST inside ``running_server``; whatever fails in there, the server goes down.

    (One model keeps this cheap; a successful benchmark's cleanup is checked by the ``result`` fixture.)
    """
    from serving.package import package_run

    package_run(served_runs["pgd_at"], model_store=tmp_path / "store")
    state_dir = Path(tempfile.mkdtemp(prefix=bs.TEMP_PREFIX))
    try:
        with pytest.raises(RuntimeError, match="injected failure"), \
                bs.running_server(tmp_path / "store", ["pgd_at"], state_dir / "ts") as (url, token):
            assert Client(url, token=token).request("GET", "/ping")[0] == 200 and bench_processes(), "the server is not running"
            raise RuntimeError("injected failure")
        assert not bench_processes(), "a TorchServe process outlived the failure"
    finally:
        shutil.rmtree(state_dir, ignore_errors=True)

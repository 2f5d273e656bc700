"""serving/bench/compute.py and common.py: the benchmark dicts are complete and self-consistent (tiny sizes, CPU)."""

from __future__ import annotations

import importlib.util
import json

import pytest

from serving.bench.common import BenchmarkError, format_table
from serving.bench.compute import bench_at_step, bench_attacks, bench_train_step

HAS_TORCHATTACKS = importlib.util.find_spec("torchattacks") is not None


@pytest.mark.skipif(not HAS_TORCHATTACKS,
                    reason="needs the torchattacks package (`make install` installs it with --no-deps)")
def test_bench_attacks_smallcnn() -> None:
    result = bench_attacks(arch="smallcnn", batch_size=16, steps=10, repeats=1, device="cpu")
    assert result["ours_img_s"] > 0 and result["theirs_img_s"] > 0
    assert result["ratio"] == pytest.approx(result["ours_img_s"] / result["theirs_img_s"])
    assert result["eps"] == pytest.approx(0.1) and result["step_size"] == pytest.approx(0.025)
    assert len(result["ours_times_s"]) == len(result["theirs_times_s"]) == 1
    # Same model, batch and start point: both attacks did the same work and stayed in the ball.
    assert result["agreement"] > 0.99
    assert result["max_perturbation"] <= 0.1 + 1e-6
    env = result["environment"]
    assert env["torch"] and env["device_name"] and env["torch_threads"] >= 1
    json.dumps(result)  # plain data, ready for a JSON dump
    assert "ratio" in format_table(result)


def test_bench_attacks_without_torchattacks(monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    real_import = builtins.__import__

    def no_torchattacks(name, *args, **kwargs):
        if name == "torchattacks" or name.startswith("torchattacks."):
            raise ImportError("No module named 'torchattacks'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_torchattacks)
    with pytest.raises(BenchmarkError, match="pip install --no-deps torchattacks"):
        bench_attacks(arch="smallcnn", batch_size=2, steps=1, repeats=1, device="cpu")


def test_bench_at_step_cpu() -> None:
    result = bench_at_step(arch="smallcnn", batch_size=8, steps=2, repeats=1, device="cpu")
    assert result["img_s"] > 0
    assert result["fwd_flops_per_image"] > 0
    assert result["flops_per_image"] == 3 * result["fwd_flops_per_image"] * (2 + 1)
    # The attack's backward is input-only: about (2 * steps + 3) forward passes actually run.
    assert result["executed_flops_per_image"] == pytest.approx(7 * result["fwd_flops_per_image"], rel=0.05)
    assert result["model_tflops"] == pytest.approx(result["img_s"] * result["flops_per_image"] / 1e12)
    assert result["fraction_of_peak"] == pytest.approx(result["model_tflops"] / 989.0)
    assert result["autocast"] is None  # bf16 autocast is CUDA only
    json.dumps(result)


def test_format_table_nests_sections_and_shows_an_empty_one_as_a_row() -> None:
    table = format_table({"requests": 3, "latency_ms": {"p50": 1.25, "p99": 2.5}, "failed_by_status": {}},
                         title="bench load")
    assert table.splitlines() == ["== bench load ==", "requests          3", "failed_by_status  none", "",
                                  "== latency_ms ==", "p50  1.25", "p99  2.5"]


def test_bench_train_step_times_each_variant_against_float32_and_splits_the_step() -> None:
    from training import devices

    result = bench_train_step(arch="smallcnn", batch_size=8, steps=2, repeats=1, device="cpu", compile_model=False)
    precisions = ["float32", "bf16_attack"] if devices.cpu_has_native_bf16() else ["float32"]
    expected = [name for precision in precisions for name in (precision, f"{precision}_channels_last")]
    assert list(result["variants"]) == expected and result["native_bf16"] == devices.cpu_has_native_bf16()
    assert result["variants"]["float32"]["ratio"] == 1.0
    for figures in result["variants"].values():
        assert figures["img_s"] > 0 and len(figures["times_s"]) == 1
    profile = result["profile"]
    assert profile["attack_share"] == pytest.approx(profile["attack_s"] / (profile["attack_s"] + profile["update_s"]))
    assert result["compile_s"] == {}
    assert 0 < len(profile["top_ops"]) <= 6 and 0 < sum(profile["top_ops"].values()) <= 1 + 1e-9
    json.dumps(result)


def test_train_step_variants_follow_the_training_autocast_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from serving.bench import compute

    Variant = compute.StepVariant
    monkeypatch.setattr(compute, "cpu_has_native_bf16", lambda: False)
    assert compute.step_variants(torch.device("cpu"), True) == {
        "float32": Variant(bf16=False, compiled=False, channels_last=False),
        "float32_channels_last": Variant(bf16=False, compiled=False, channels_last=True),
        "compiled_float32_channels_last": Variant(bf16=False, compiled=True, channels_last=True)}
    monkeypatch.setattr(compute, "cpu_has_native_bf16", lambda: True)
    assert list(compute.step_variants(torch.device("cpu"), False)) == [
        "float32", "float32_channels_last", "bf16_attack", "bf16_attack_channels_last"]
    assert compute.step_variants(torch.device("cuda"), False)["bf16"] == Variant(True, False, False)

"""The intervals and the paired test against values worked out by hand (and against scipy)."""

from __future__ import annotations

import math

import pytest
from scipy.stats import binomtest, linregress
from scipy.stats import t as student_t

from training.stats import (
    fitted_rise,
    format_difference,
    format_proportion,
    mcnemar_exact_p,
    paired_difference,
    proportion,
    t_quantile_975,
    verdict,
    wilson_interval,
)


def test_wilson_interval_by_hand() -> None:
    # 8 of 10 with z = 1.96: centre (0.8 + 3.8416/20) / 1.38416 = 0.716738,
    # half-width 1.96 * sqrt(0.016 + 0.009604) / 1.38416 = 0.226581.
    low, high = wilson_interval(8, 10, z=1.96)
    assert low == pytest.approx(0.490157, abs=1e-6) and high == pytest.approx(0.943319, abs=1e-6)
    # The ends: 0 of 10 is [0, 0.2775], 10 of 10 its mirror image; never outside [0, 1].
    assert wilson_interval(0, 10, z=1.96) == (0.0, pytest.approx(0.277540, abs=1e-6))
    assert wilson_interval(10, 10, z=1.96) == (pytest.approx(1 - 0.277540, abs=1e-6), 1.0)
    # More images, narrower interval, around the same proportion.
    assert (wilson_interval(460, 1000)[1] - wilson_interval(460, 1000)[0]
            < wilson_interval(46, 100)[1] - wilson_interval(46, 100)[0])
    assert all(math.isnan(v) for v in wilson_interval(0, 0))
    with pytest.raises(ValueError):
        wilson_interval(11, 10)


def test_proportion_of_flags() -> None:
    measured = proportion([True] * 23 + [False] * 27)
    assert (measured.k, measured.n, measured.value) == (23, 50, 0.46)
    assert (measured.low, measured.high) == wilson_interval(23, 50)
    assert measured.to_json() == {"accuracy": 0.46, "k": 23, "n": 50, "ci95": [measured.low, measured.high]}
    assert format_proportion(0.46, 0.3291, 0.5966, 50) == "46.0 [32.9, 59.7] n=50"


def test_mcnemar_exact_by_hand_and_against_scipy() -> None:
    # 10 images only A gets right, 2 only B: 2 * (C(12,0) + C(12,1) + C(12,2)) / 2^12 = 158 / 4096.
    assert mcnemar_exact_p(10, 2) == pytest.approx(158 / 4096)
    assert mcnemar_exact_p(2, 10) == mcnemar_exact_p(10, 2)
    assert mcnemar_exact_p(0, 0) == 1.0 and mcnemar_exact_p(5, 5) == 1.0
    for only_a, only_b in ((0, 7), (3, 9), (40, 25), (1, 1)):
        assert mcnemar_exact_p(only_a, only_b) == pytest.approx(binomtest(only_a, only_a + only_b, 0.5).pvalue)


def test_paired_difference_by_hand() -> None:
    # 50 images: 30 both right, 10 only A, 2 only B, 8 neither. p1 = 0.8, p2 = 0.64, D = 0.16.
    # Wilson: A [0.669626, 0.887564], B [0.501408, 0.758614]; phi = (30*8 - 10*2) / sqrt(40*10*32*18) = 0.458333.
    # Newcombe (method 10): D - sqrt(0.130374^2 - 2 phi 0.130374 * 0.118614 + 0.118614^2) = 0.030034,
    # D + sqrt(0.087564^2 - 2 phi 0.087564 * 0.138592 + 0.138592^2) = 0.285503.
    a = [True] * 30 + [True] * 10 + [False] * 2 + [False] * 8
    b = [True] * 30 + [False] * 10 + [True] * 2 + [False] * 8
    diff = paired_difference(a, b, z=1.96)
    assert (diff.n, diff.only_a, diff.only_b) == (50, 10, 2)
    assert diff.difference == pytest.approx(0.16)
    assert diff.low == pytest.approx(0.030034, abs=1e-6) and diff.high == pytest.approx(0.285503, abs=1e-6)
    assert diff.mcnemar_p == pytest.approx(158 / 4096)
    assert diff.verdict == "better"
    assert format_difference(diff) == "+16.0 [+3.0, +28.6] n=50: better"
    swapped = paired_difference(b, a, z=1.96)  # B - A: the mirror image
    assert swapped.difference == pytest.approx(-0.16) and swapped.verdict == "worse"
    assert (swapped.low, swapped.high) == (pytest.approx(-diff.high), pytest.approx(-diff.low))


def test_identical_models_show_no_difference() -> None:
    flags = [True, False, True, True, False] * 20
    diff = paired_difference(flags, flags)
    assert diff.difference == 0.0 and diff.low < 0 < diff.high and diff.mcnemar_p == 1.0
    assert diff.verdict == "no detectable difference"
    assert verdict(0.01, 0.2) == "better" and verdict(-0.2, -0.01) == "worse" and verdict(-0.1, 0.1).startswith("no")
    assert verdict(0.01, 0.2, p_value=0.2).startswith("no")  # the exact test must agree as well


def test_pairing_narrows_the_interval() -> None:
    # Two models that disagree on 12 of 400 images, all in A's favour (McNemar p = 2 / 2^12): the paired
    # comparison calls it, though two independent samples with these accuracies (0.53 vs 0.50) could not
    # be told apart.
    a = [True] * 200 + [True] * 12 + [False] * 188
    b = [True] * 200 + [False] * 12 + [False] * 188
    diff = paired_difference(a, b)
    assert diff.verdict == "better" and diff.mcnemar_p == pytest.approx(2 / 4096)
    independent = wilson_interval(212, 400)[0] - wilson_interval(200, 400)[1]
    assert independent < 0 < diff.low


def test_a_difference_the_exact_test_does_not_support_is_not_called() -> None:
    # 4 to 0 discordant images of 200: Newcombe's interval just excludes zero, McNemar's p is 0.125.
    a = [True] * 100 + [True] * 4 + [False] * 96
    b = [True] * 100 + [False] * 4 + [False] * 96
    diff = paired_difference(a, b)
    assert diff.low > 0 and diff.mcnemar_p == pytest.approx(0.125)
    assert diff.verdict == "no detectable difference"


def test_paired_difference_rejects_unpaired_input() -> None:
    with pytest.raises(ValueError, match="one entry per image"):
        paired_difference([True, False], [True])
    with pytest.raises(ValueError, match="no images"):
        paired_difference([], [])


@pytest.mark.parametrize("df", [3, 5, 13, 18, 30, 200])
def test_the_t_quantile_is_student_s(df: int) -> None:
    assert t_quantile_975(df) == pytest.approx(student_t.ppf(0.975, df), rel=2e-3)


def test_the_fitted_rise_and_its_interval_are_the_regression_s() -> None:
    """ACT's validation PGD-10 accuracy over epochs 30-45 at the 45-epoch preset: its line, and the slope's 95%
    interval from scipy's standard error, times the 15 epochs."""
    epochs = list(range(30, 46))
    robust = [75.6, 74.8, 75.2, 75.1, 74.9, 74.8, 75.7, 75.9, 75.6, 75.4, 74.9, 75.1, 75.3, 76.1, 75.3, 76.6]
    rise, fit = fitted_rise(epochs, robust), linregress(epochs, robust)
    half = student_t.ppf(0.975, len(epochs) - 2) * fit.stderr * 15
    assert rise.rise == pytest.approx(fit.slope * 15)
    assert (rise.low, rise.high) == (pytest.approx(fit.slope * 15 - half, rel=1e-3),
                                     pytest.approx(fit.slope * 15 + half, rel=1e-3))
    assert rise.low < 0 < 1 < rise.high  # flat by the rule (+0.7), and a point within the noise
    short = fitted_rise([4, 5, 6], [1.0, 2.0, 2.0])
    assert short.rise == pytest.approx(1.0) and short.low is short.high is None  # too few epochs for an interval
    backwards = fitted_rise(epochs[::-1], robust[::-1])  # the same line read from its other end
    assert (backwards.rise, backwards.low, backwards.high) == pytest.approx((-rise.rise, -rise.high, -rise.low))

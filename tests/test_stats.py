"""Intervals and paired tests on seeded simulations with known truth, and the exact McNemar test by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from amp.evaluation import EvalRow
from amp.stats import (
    bootstrap_interval,
    clopper_pearson_interval,
    interval,
    mcnemar_exact,
    paired_difference,
    wilson_interval,
)


def row(name: str, metric: str, outcomes) -> EvalRow:
    r = EvalRow(name)
    r.add(metric, torch.as_tensor(outcomes))
    return r


def test_interval_hand_values():
    # 0 of 10: Wilson's upper bound is z²/(n + z²), Clopper–Pearson's 1 - (α/2)^(1/n)
    z = 1.959963984540054
    assert wilson_interval(0, 10) == pytest.approx((0.0, z * z / (10 + z * z)))
    assert clopper_pearson_interval(0, 10) == pytest.approx((0.0, 1 - 0.025 ** (1 / 10)))
    assert clopper_pearson_interval(10, 10) == pytest.approx((0.025 ** (1 / 10), 1.0))
    low, high = wilson_interval(50, 100)
    assert low == pytest.approx(1 - high) and 0.40 < low < 0.41


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_proportion_intervals_cover_the_truth(p):
    n, trials = 60, 4000
    rng = np.random.default_rng(0)
    successes = rng.binomial(n, p, size=trials)
    for method, low_bound in (("wilson", 0.92), ("exact", 0.945)):
        table = [interval(np.arange(n) < k, method=method) for k in range(n + 1)]  # k hits of n
        covered = np.mean([table[k][0] <= p <= table[k][1] for k in successes])
        assert low_bound <= covered <= 0.99, (method, covered)


def test_bootstrap_interval_covers_the_mean():
    rng = np.random.default_rng(1)
    trials, covered = 200, 0
    for trial in range(trials):
        values = rng.exponential(1.0, size=100)  # skewed, true mean 1
        low, high = bootstrap_interval(values, resamples=500, seed=trial)
        covered += low <= 1.0 <= high
    assert 0.88 <= covered / trials <= 0.99


def test_bootstrap_is_seeded():
    values = torch.linspace(0, 1, 50)
    assert interval(values) == interval(values) == bootstrap_interval(values, seed=0)
    assert bootstrap_interval(values, seed=1) != bootstrap_interval(values, seed=0)
    assert interval(values.numpy() > 0.5, method="bootstrap") == interval(values.numpy() > 0.5, method="bootstrap")


def test_mcnemar_exact_hand_computed():
    # 2x2 table: both right 30, only a right 2, only b right 8, both wrong 10 -> discordant 2 vs 8
    a = [True] * 30 + [True] * 2 + [False] * 8 + [False] * 10
    b = [True] * 30 + [False] * 2 + [True] * 8 + [False] * 10
    expected = 2 * (math.comb(10, 0) + math.comb(10, 1) + math.comb(10, 2)) / 2**10  # = 0.109375
    assert mcnemar_exact(a, b) == pytest.approx(expected)
    assert mcnemar_exact(b, a) == pytest.approx(expected)
    assert mcnemar_exact(a, a) == 1.0  # no discordant pairs
    assert mcnemar_exact([True] * 5, [False] * 5) == pytest.approx(2 / 32)


def test_paired_test_detects_a_real_difference():
    rng = np.random.default_rng(2)
    a = rng.random(500) < 0.6
    b = a.copy()
    b[np.flatnonzero(~a)[:60]] = True  # b gets 60 more items right, never fewer
    result = paired_difference(row("dense", "zero_shot_top1", a), row("pruned", "zero_shot_top1", b), "zero_shot_top1")
    assert result.difference == pytest.approx(60 / 500)
    assert 0 < result.low < result.difference < result.high
    assert result.p_value < 1e-10 and result.test == "exact McNemar" and result.items == 500
    assert result.significant and "pruned is higher than dense" in result.verdict


def test_paired_test_on_means():
    rng = np.random.default_rng(3)
    a = torch.from_numpy(rng.normal(0.95, 0.02, 300)).float()
    b = a - 0.01 + torch.from_numpy(rng.normal(0, 0.002, 300)).float()
    result = paired_difference(row("a", "fidelity_cosine", a), row("b", "fidelity_cosine", b), "fidelity_cosine")
    assert result.test == "paired bootstrap" and not result.proportion
    assert result.high < 0 and result.p_value < 0.01 and "b is lower than a" in result.verdict


def test_identical_rows_show_no_difference():
    hits = torch.rand(200, generator=torch.Generator().manual_seed(4)) < 0.7
    result = paired_difference(row("a", "knn_top1", hits), row("b", "knn_top1", hits.clone()), "knn_top1")
    assert (result.difference, result.low, result.high, result.p_value) == (0.0, 0.0, 0.0, 1.0)
    assert not result.significant and "no difference measured" in result.verdict
    # a small, noisy difference whose interval contains 0 is reported the same way
    other = hits.clone()
    other[:3] = ~other[:3]
    assert "no difference measured" in paired_difference(row("a", "m", hits), row("b", "m", other), "m").verdict


def test_paired_test_needs_the_same_items():
    with pytest.raises(ValueError, match="different items"):
        paired_difference(row("a", "m", [True, False]), row("b", "m", [True]), "m")
    with pytest.raises(ValueError, match="unknown interval method"):
        interval([True, False], method="normal")


def test_no_verdict_when_the_interval_and_the_exact_test_disagree():
    from amp.stats import PairedDifference

    borderline = PairedDifference("top-1", "a", "b", 0.003, 0.0001, 0.0059, 0.055, "exact McNemar", 10_000)
    assert not borderline.significant and "no difference measured" in borderline.verdict
    clear = PairedDifference("top-1", "a", "b", 0.003, 0.0011, 0.0059, 0.004, "exact McNemar", 10_000)
    assert clear.significant and "b is higher than a" in clear.verdict


def test_a_difference_that_excludes_zero_never_prints_as_zero():
    from amp.notebook import difference_text

    assert difference_text(0.0123, 0.0041, 0.0205) == "+0.012 [+0.004, +0.021]"  # 3 digits are enough
    tiny = difference_text(0.0003, 0.00012, 0.00051)  # measured, but below 3-digit rounding
    assert tiny == "+0.0003 [+0.0001, +0.0005]" and "+0.000 " not in tiny
    assert difference_text(-0.0006, -0.0011, -0.00004) == "-0.00060 [-0.00110, -0.00004]"
    assert difference_text(0.0002, -0.0001, 0.0005) == "+0.000 [-0.000, +0.001]"  # contains 0: 3 digits

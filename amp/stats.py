"""How sure a measured number is: 95 % intervals per metric and paired tests between two models.

Every metric of an :class:`amp.evaluation.EvalRow` is a mean over items (test images, queries): a proportion when the
items are hits (bool), a plain mean otherwise (cosines). Proportions get Wilson or exact Clopper–Pearson intervals,
means a percentile bootstrap over items. Two rows measured on the same items are compared item by item: a paired
bootstrap of the difference gives its interval, the exact McNemar test (proportions) or the bootstrap (means) its
p-value. Bootstraps are seeded, so the same outcomes always give the same numbers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy import stats as scipy_stats

RESAMPLES = 2000
PROPORTION_METHODS = ("wilson", "exact", "bootstrap")


def _array(values: torch.Tensor | np.ndarray | Sequence) -> np.ndarray:
    array = values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
    if array.ndim != 1 or len(array) == 0:
        raise ValueError(f"expected a non-empty 1-d array of per-item outcomes, got shape {array.shape}")
    return array


def _z(confidence: float) -> float:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    return float(scipy_stats.norm.ppf(0.5 + confidence / 2))


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion: good coverage even near 0 or 1 and for small ``n``."""
    if n <= 0 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n and n > 0, got {successes} of {n}")
    z, p = _z(confidence), successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def clopper_pearson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Exact (Clopper–Pearson) interval of a proportion: never below the nominal coverage, so a little wide."""
    if n <= 0 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n and n > 0, got {successes} of {n}")
    alpha = 1 - confidence
    low = 0.0 if successes == 0 else float(scipy_stats.beta.ppf(alpha / 2, successes, n - successes + 1))
    high = 1.0 if successes == n else float(scipy_stats.beta.ppf(1 - alpha / 2, successes + 1, n - successes))
    return low, high


def bootstrap_means(values: np.ndarray, resamples: int = RESAMPLES, seed: int = 0) -> np.ndarray:
    """Means of ``resamples`` seeded resamples (with replacement) of the items."""
    rng = np.random.default_rng(seed)
    values = np.asarray(values, dtype=np.float64)
    means = np.empty(resamples)
    chunk = max(1, 2**22 // len(values))  # bounds the (resamples, items) index matrix
    for start in range(0, resamples, chunk):
        count = min(chunk, resamples - start)
        means[start : start + count] = values[rng.integers(0, len(values), size=(count, len(values)))].mean(axis=1)
    return means


def _percentiles(samples: np.ndarray, confidence: float) -> tuple[float, float]:
    alpha = 1 - confidence
    low, high = np.quantile(samples, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def bootstrap_interval(
    values: torch.Tensor | np.ndarray | Sequence, confidence: float = 0.95, resamples: int = RESAMPLES, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean over items."""
    _z(confidence)
    return _percentiles(bootstrap_means(_array(values), resamples, seed), confidence)


def interval(
    values: torch.Tensor | np.ndarray | Sequence,
    confidence: float = 0.95,
    method: str = "wilson",
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> tuple[float, float]:
    """Interval of a mean over items: hits (bool) by ``method`` (wilson, exact, bootstrap), else bootstrap."""
    array = _array(values)
    if array.dtype != bool:
        return bootstrap_interval(array, confidence, resamples, seed)
    if method == "wilson":
        return wilson_interval(int(array.sum()), len(array), confidence)
    if method == "exact":
        return clopper_pearson_interval(int(array.sum()), len(array), confidence)
    if method == "bootstrap":
        return bootstrap_interval(array, confidence, resamples, seed)
    raise ValueError(f"unknown interval method {method!r}; choose one of {PROPORTION_METHODS}")


def mcnemar_exact(hits_a: torch.Tensor | np.ndarray | Sequence, hits_b: torch.Tensor | np.ndarray | Sequence) -> float:
    """Two-sided exact McNemar p-value of paired hits: a binomial(n, 1/2) test on the n discordant items."""
    a, b = _array(hits_a).astype(bool), _array(hits_b).astype(bool)
    if len(a) != len(b):
        raise ValueError(f"paired outcomes differ in length: {len(a)} vs {len(b)}")
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    discordant = only_a + only_b
    if discordant == 0:
        return 1.0
    return min(1.0, 2 * float(scipy_stats.binom.cdf(min(only_a, only_b), discordant, 0.5)))


@dataclass(frozen=True)
class PairedDifference:
    """``b − a`` of one metric measured on the same items, with its interval and p-value."""

    metric: str
    name_a: str
    name_b: str
    difference: float
    low: float
    high: float
    p_value: float
    test: str  # "exact McNemar" (proportions) or "paired bootstrap" (means)
    items: int
    confidence: float = 0.95
    proportion: bool = True

    @property
    def significant(self) -> bool:
        """A difference was measured at this confidence: the interval excludes 0 *and* the test's p-value is below
        1 − confidence. The two usually agree; where they do not (a bootstrap interval that just misses 0 beside an
        exact McNemar p of 0.055), the claim is not made."""
        return not self.low <= 0.0 <= self.high and self.p_value < 1 - self.confidence

    def _show(self, value: float) -> str:
        return f"{100 * value:+.1f}" if self.proportion else f"{value:+.4f}"

    @property
    def verdict(self) -> str:
        """One line for a report: the difference, its interval and p-value, and what they mean."""
        unit = " pts" if self.proportion else ""
        numbers = (
            f"Δ {self._show(self.difference)}{unit}, {self.confidence:.0%} CI [{self._show(self.low)}, "
            f"{self._show(self.high)}], {self.test} p = {self.p_value:.2g}, {self.items} items"
        )
        if not self.significant:
            return f"{self.metric}, {self.name_b} vs {self.name_a}: no difference measured ({numbers})"
        direction = "higher" if self.difference > 0 else "lower"
        return f"{self.metric}: {self.name_b} is {direction} than {self.name_a} ({numbers})"


def paired_difference(
    row_a,
    row_b,
    metric: str,
    dataset: str | None = None,
    confidence: float = 0.95,
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> PairedDifference:
    """``row_b − row_a`` for ``metric`` over the items both rows measured (rows: :class:`amp.evaluation.EvalRow`)."""
    _z(confidence)
    a, b = _array(row_a.outcome(metric, dataset)), _array(row_b.outcome(metric, dataset))
    if len(a) != len(b):
        raise ValueError(f"{metric}: the rows were measured on different items ({len(a)} vs {len(b)})")
    proportion = a.dtype == bool and b.dtype == bool
    differences = b.astype(np.float64) - a.astype(np.float64)
    observed = float(differences.mean())
    samples = bootstrap_means(differences, resamples, seed)
    low, high = _percentiles(samples, confidence)
    if proportion:
        p_value, test = mcnemar_exact(a, b), "exact McNemar"
    else:  # how often the bootstrap, centred on 0 (no difference), lands at least as far out as the observation
        extreme = np.abs(samples - observed) >= abs(observed) - 1e-12
        p_value, test = float((extreme.sum() + 1) / (resamples + 1)), "paired bootstrap"
    return PairedDifference(
        metric, row_a.name, row_b.name, observed, low, high, min(1.0, p_value), test, len(a), confidence, proportion
    )

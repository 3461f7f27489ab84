"""Confidence intervals for an eval report (95 %): Wilson score for accuracies, normal approximation for
mean loglikelihoods, paired bootstrap (percentile) for the accuracy difference between two models."""

from __future__ import annotations

import math
import random

Z95 = 1.959963984540054
BOOTSTRAP_ITERS = 1000
CI_METHODS = {
    "accuracy_ci": "95% Wilson score interval",
    "mean_loglikelihood_ci": "95% normal approximation (mean +- 1.96 * sd / sqrt(n))",
    "delta_accuracy_ci": f"95% paired bootstrap percentile interval over items ({BOOTSTRAP_ITERS} resamples, seed 0)",
}


def wilson(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (sensible at 0 %, 100 % and small n)."""
    if n == 0:
        return (0.0, 1.0)
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def mean_ci(values: list[float], z: float = Z95) -> tuple[float, float] | None:
    """Mean +- z standard errors; None under two values."""
    n = len(values)
    if n < 2:
        return None
    m = sum(values) / n
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1))
    return (m - z * sd / math.sqrt(n), m + z * sd / math.sqrt(n))


def paired_bootstrap(a: list[bool], b: list[bool], iters: int = BOOTSTRAP_ITERS, seed: int = 0
                     ) -> tuple[float, float]:
    """Percentile interval of mean(b) - mean(a) resampling items (pairs kept together)."""
    n = len(a)
    if n == 0:
        return (0.0, 0.0)
    d = [int(y) - int(x) for x, y in zip(a, b, strict=True)]
    rng = random.Random(seed)
    means = sorted(sum(d[rng.randrange(n)] for _ in range(n)) / n for _ in range(iters))
    return (means[int(0.025 * iters)], means[min(iters - 1, int(0.975 * iters))])

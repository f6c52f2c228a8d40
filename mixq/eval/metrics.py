"""Standard errors, stated once: lm-evaluation-harness's convention, sample standard deviation (n - 1) / sqrt(n).

For a 0/1 outcome that is sqrt(p (1 - p) / (n - 1)). With fewer than two values a standard error is
unknown: NaN (never 0.0, which would read as certainty).
"""

from __future__ import annotations

import math

import numpy as np


def mean_stderr(xs) -> tuple[float, float]:
    """(mean, standard error of the mean) of `xs`; NaN where undefined (no values / fewer than two)."""
    x = np.asarray(list(xs) if not isinstance(xs, np.ndarray) else xs, dtype=np.float64).reshape(-1)
    if x.size == 0:
        return float("nan"), float("nan")
    mean = float(x.mean())
    if x.size < 2:
        return mean, float("nan")
    return mean, float(x.std(ddof=1) / math.sqrt(x.size))


def stderr(xs) -> float:
    """Standard error of the mean of `xs` (see `mean_stderr`)."""
    return mean_stderr(xs)[1]


def proportion_stderr(k: int, n: int) -> float:
    """Standard error of the proportion k/n: sqrt(p (1 - p) / (n - 1)), the same convention for 0/1 outcomes."""
    if n < 2:
        return float("nan")
    p = k / n
    return math.sqrt(p * (1 - p) / (n - 1))

"""Statistics for comparing quantized models: standard errors, intervals and paired tests.

Pure Python + numpy (no scipy). Conventions:
- Standard errors are stated once, in `mixq.eval.metrics` (lm-evaluation-harness's n - 1
  convention; NaN, i.e. unknown, for fewer than two values).
- Significance level: `ALPHA` (5%) for every test the reports mark.
- Intervals are 95% unless `level` says otherwise.
- Paired difference of proportions: Newcombe's hybrid score interval for paired data (method 10 of
  Newcombe 1998, "Improved confidence intervals for the difference between binomial proportions
  based on paired data"), with his continuity-adjusted correlation estimate (as in Altman et al.,
  "Statistics with confidence", and Fagerland et al.'s "square-and-add" interval). It keeps close
  to nominal coverage where the Wald interval does not (small discordant counts, accuracies near
  0 or 1) and needs no resampling. Its companion test is
  McNemar's exact test (two-sided binomial test on the discordant pairs).
- Unpaired difference: Newcombe's hybrid score interval for independent proportions (method 10 of
  Newcombe 1998, "Interval estimation for the difference between independent proportions") with a
  pooled two-proportion z test.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

ALPHA = 0.05   # significance level of every difference the reports mark


def z_value(level: float = 0.95) -> float:
    """Two-sided normal quantile: 1.96 for level 0.95."""
    return NormalDist().inv_cdf(0.5 + level / 2)


def wilson_interval(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for one proportion k/n."""
    if n <= 0:
        return (0.0, 1.0)
    z = z_value(level)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def binom_two_sided_p(k: int, n: int) -> float:
    """Exact two-sided p of k successes in n fair coin flips: min(1, 2 P(X <= min(k, n-k)))."""
    if n == 0:
        return 1.0
    m = min(k, n - k)
    tail = sum(math.comb(n, i) for i in range(m + 1))
    return min(1.0, 2 * tail / 2**n)   # big-int true division is correctly rounded


def mcnemar_exact(b: int, c: int) -> float:
    """McNemar's exact test: two-sided p for b vs c discordant pairs (b: only first right, c: only second)."""
    return binom_two_sided_p(b, b + c)


@dataclass
class PairedCounts:
    """2x2 table of paired binary outcomes x (variant) and y (reference)."""
    both: int       # x=1, y=1
    only_x: int     # x=1, y=0
    only_y: int     # x=0, y=1
    neither: int    # x=0, y=0

    @property
    def n(self) -> int:
        return self.both + self.only_x + self.only_y + self.neither

    @classmethod
    def from_outcomes(cls, x, y) -> "PairedCounts":
        x = np.asarray(x, dtype=bool)
        y = np.asarray(y, dtype=bool)
        if x.shape != y.shape:
            raise ValueError(f"paired outcomes differ in length: {x.shape} vs {y.shape}")
        return cls(int((x & y).sum()), int((x & ~y).sum()), int((~x & y).sum()), int((~x & ~y).sum()))


@dataclass
class DiffResult:
    """A difference of two means (x - y) with its 95% interval and two-sided p."""
    diff: float
    lo: float
    hi: float
    p: float
    method: str
    n_x: int
    n_y: int
    discordant: tuple[int, int] | None = None   # (only_x, only_y) for paired binary outcomes

    @property
    def significant(self) -> bool:
        return self.p < ALPHA

    def to_dict(self) -> dict:
        d = {"diff": self.diff, "ci95": [self.lo, self.hi], "p": self.p, "method": self.method,
             "n_x": self.n_x, "n_y": self.n_y}
        if self.discordant is not None:
            d["discordant"] = list(self.discordant)
        return d


def newcombe_paired_interval(t: PairedCounts, level: float = 0.95) -> tuple[float, float]:
    """Newcombe's hybrid score interval (method 10) for p_x - p_y from paired binary outcomes."""
    n = t.n
    if n == 0:
        return (-1.0, 1.0)
    kx, ky = t.both + t.only_x, t.both + t.only_y
    px, py = kx / n, ky / n
    lx, ux = wilson_interval(kx, n, level)
    ly, uy = wilson_interval(ky, n, level)
    denom = kx * (n - kx) * ky * (n - ky)
    # correlation of the two margins, with Newcombe's continuity adjustment: ad - bc is reduced by
    # n/2 when positive (and set to 0 below n/2); a negative ad - bc is used as is
    a = t.both * t.neither - t.only_x * t.only_y
    a = a - n / 2 if a > n / 2 else (0.0 if a >= 0 else a)
    phi = a / math.sqrt(denom) if denom > 0 else 0.0
    d = px - py
    dl = (px - lx) ** 2 - 2 * phi * (px - lx) * (uy - py) + (uy - py) ** 2
    du = (ux - px) ** 2 - 2 * phi * (ux - px) * (py - ly) + (py - ly) ** 2
    return (max(-1.0, d - math.sqrt(max(dl, 0.0))), min(1.0, d + math.sqrt(max(du, 0.0))))


def paired_proportion_diff(x, y, level: float = 0.95) -> DiffResult:
    """Paired binary outcomes: difference of accuracies, Newcombe interval, McNemar exact p."""
    t = PairedCounts.from_outcomes(x, y)
    lo, hi = newcombe_paired_interval(t, level)
    n = t.n
    diff = (t.only_x - t.only_y) / n if n else 0.0
    return DiffResult(diff, lo, hi, mcnemar_exact(t.only_x, t.only_y), "mcnemar-exact+newcombe-paired",
                      n, n, (t.only_x, t.only_y))


def unpaired_proportion_diff(kx: int, nx: int, ky: int, ny: int, level: float = 0.95) -> DiffResult:
    """Independent proportions: Newcombe hybrid score interval and pooled two-proportion z test."""
    px, py = kx / nx, ky / ny
    lx, ux = wilson_interval(kx, nx, level)
    ly, uy = wilson_interval(ky, ny, level)
    d = px - py
    lo = d - math.sqrt((px - lx) ** 2 + (uy - py) ** 2)
    hi = d + math.sqrt((ux - px) ** 2 + (py - ly) ** 2)
    pool = (kx + ky) / (nx + ny)
    se = math.sqrt(pool * (1 - pool) * (1 / nx + 1 / ny))
    p = 1.0 if se == 0 else math.erfc(abs(d) / se / math.sqrt(2))
    return DiffResult(d, max(-1.0, lo), min(1.0, hi), p, "unpaired-z+newcombe", nx, ny)


def paired_bootstrap(x, y, *, n_boot: int = 2000, seed: int = 0, level: float = 0.95,
                     strata=None) -> DiffResult:
    """Paired bootstrap of mean(x) - mean(y): percentile interval and two-sided bootstrap p.

    Documents are resampled as pairs (within each stratum when `strata` labels are given, and the
    statistic is then the mean over strata of the per-stratum means, e.g. the task-averaged
    accuracy). p is twice the smaller share of resampled differences on either side of 0
    (floored at 1/n_boot).
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"paired samples must be 1-D and of equal length: {x.shape} vs {y.shape}")
    rng = np.random.default_rng(seed)
    d = x - y
    groups = [np.arange(d.size)] if strata is None else \
        [np.flatnonzero(np.asarray(strata) == s) for s in dict.fromkeys(strata)]
    point = float(np.mean([d[g].mean() for g in groups]))
    boot = np.zeros(n_boot)
    for g in groups:
        idx = rng.integers(0, g.size, size=(n_boot, g.size))
        boot += d[g][idx].mean(axis=1)
    boot /= len(groups)
    alpha = 1 - level
    lo, hi = np.quantile(boot, [alpha / 2, 1 - alpha / 2])
    if np.all(boot == 0):
        p = 1.0
    else:
        p = min(1.0, max(2 * min((boot <= 0).mean(), (boot >= 0).mean()), 1 / n_boot))
    return DiffResult(point, float(lo), float(hi), float(p), "paired-bootstrap", x.size, y.size)


def holm(pvalues: list[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (same order as given)."""
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: pvalues[i])
    adjusted = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted


def pareto_front(points: list[tuple[float, float]], *, maximize_y: bool) -> list[int]:
    """Indices of points not dominated (x smaller is better; y larger or smaller is better)."""
    front = []
    for i, (xi, yi) in enumerate(points):
        dominated = False
        for j, (xj, yj) in enumerate(points):
            if j == i:
                continue
            better_y = yj >= yi if maximize_y else yj <= yi
            strictly = xj < xi or (yj > yi if maximize_y else yj < yi)
            if xj <= xi and better_y and strictly:
                dominated = True
                break
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])

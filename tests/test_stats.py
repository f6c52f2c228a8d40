"""mixq.stats: exact tests on constructed cases, interval coverage on seeded simulations."""

import math

import numpy as np
import pytest

from mixq.eval.metrics import proportion_stderr, stderr
from mixq.report import stats


def test_mcnemar_known_answers():
    assert stats.mcnemar_exact(0, 10) == pytest.approx(2 / 1024, rel=1e-12)
    assert stats.mcnemar_exact(10, 0) == pytest.approx(2 / 1024, rel=1e-12)
    assert stats.mcnemar_exact(5, 5) == 1.0           # symmetric
    assert stats.mcnemar_exact(0, 0) == 1.0           # no discordant pairs
    assert stats.mcnemar_exact(2, 8) == pytest.approx(2 * (1 + 10 + 45) / 1024, rel=1e-12)
    # large counts stay exact and finite (big-int arithmetic)
    p = stats.mcnemar_exact(400, 600)
    assert 0 < p < 1e-9


def test_mcnemar_matches_scipy_binomtest():
    scipy_stats = pytest.importorskip("scipy.stats")
    for b, c in [(3, 17), (7, 9), (0, 1), (25, 40), (120, 90)]:
        assert stats.mcnemar_exact(b, c) == pytest.approx(scipy_stats.binomtest(b, b + c, 0.5).pvalue, rel=1e-9)


def test_wilson_known_values():
    lo, hi = stats.wilson_interval(5, 10)
    assert (lo, hi) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    lo, hi = stats.wilson_interval(0, 10)
    assert lo == pytest.approx(0.0, abs=1e-12) and hi == pytest.approx(0.2775, abs=1e-4)


def test_reports_use_the_one_standard_error_convention():
    # the reports' standard errors are mixq.eval.metrics's (the harness's n - 1; NaN, not 0, when unknown)
    assert not hasattr(stats, "mean_se") and not hasattr(stats, "proportion_se")
    xs = [1, 0, 1, 1, 0, 1, 0, 1]
    assert stderr(xs) == pytest.approx(np.std(xs, ddof=1) / math.sqrt(len(xs)))
    assert proportion_stderr(5, 8) == pytest.approx(stderr(xs))
    assert math.isnan(stderr([3.0])) and math.isnan(proportion_stderr(1, 1))


def test_paired_difference_counts_and_interval():
    x = [1] * 30 + [1] * 12 + [0] * 4 + [0] * 54      # variant
    y = [1] * 30 + [0] * 12 + [1] * 4 + [0] * 54      # reference
    d = stats.paired_proportion_diff(x, y)
    assert d.discordant == (12, 4)
    assert d.diff == pytest.approx(0.08)
    assert d.lo < 0.08 < d.hi
    assert d.p == pytest.approx(stats.mcnemar_exact(12, 4))
    # identical outcomes: zero difference, p = 1, interval around 0
    same = stats.paired_proportion_diff(x, x)
    assert same.diff == 0 and same.p == 1.0 and same.lo <= 0 <= same.hi


def test_newcombe_paired_published_example():
    # Cavo et al. (2012) as worked in Fagerland, Lydersen & Laake, "Statistical Analysis of Contingency
    # Tables", ch. 8: table [[59, 6], [16, 80]] -> -0.0621 (95% CI -0.1186 to -0.0046)
    t = stats.PairedCounts(both=59, only_x=6, only_y=16, neither=80)
    lo, hi = stats.newcombe_paired_interval(t)
    assert (t.only_x - t.only_y) / t.n == pytest.approx(-0.0621, abs=5e-5)
    assert (lo, hi) == pytest.approx((-0.1186, -0.0046), abs=5e-5)


def test_newcombe_unpaired_published_example():
    # Perondi et al. (2004) as worked in Fagerland et al., ch. 4: 7/34 vs 1/34 -> 0.1765 (0.0189 to 0.3404)
    d = stats.unpaired_proportion_diff(7, 34, 1, 34)
    assert d.diff == pytest.approx(0.1765, abs=5e-5)
    assert (d.lo, d.hi) == pytest.approx((0.0189, 0.3404), abs=5e-5)


def test_holm():
    assert stats.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert stats.holm([0.5]) == [0.5]
    assert stats.holm([0.9, 0.8]) == pytest.approx([1.0, 1.0])   # capped at 1
    assert stats.holm([0.02, 0.9]) == pytest.approx([0.04, 0.9])


def test_bootstrap_constructed_cases():
    y = np.array([0, 1] * 50, dtype=float)
    shifted = stats.paired_bootstrap(y + 1, y, n_boot=500, seed=1)    # every pair differs by exactly 1
    assert (shifted.diff, shifted.lo, shifted.hi) == (1.0, 1.0, 1.0)
    assert shifted.p == pytest.approx(1 / 500)
    same = stats.paired_bootstrap(y, y, n_boot=500, seed=1)
    assert (same.diff, same.lo, same.hi, same.p) == (0.0, 0.0, 0.0, 1.0)
    # seeded: reproducible; large-sample interval close to mean ± 1.96 sd/sqrt(n)
    rng = np.random.default_rng(0)
    d = rng.normal(0.3, 1.0, size=2000)
    a = stats.paired_bootstrap(d, np.zeros_like(d), n_boot=2000, seed=7)
    b = stats.paired_bootstrap(d, np.zeros_like(d), n_boot=2000, seed=7)
    assert (a.lo, a.hi) == (b.lo, b.hi)
    half = 1.96 * d.std(ddof=1) / math.sqrt(d.size)
    assert (a.hi - a.lo) / 2 == pytest.approx(half, rel=0.1)
    assert a.p < 1e-3


def test_bootstrap_strata_average_of_means():
    x = np.array([1, 1, 1, 1, 0, 0], dtype=float)
    y = np.zeros(6)
    strata = ["a", "a", "a", "a", "b", "b"]
    r = stats.paired_bootstrap(x, y, n_boot=200, seed=0, strata=strata)
    assert r.diff == pytest.approx(0.5)      # mean of per-task means (1.0, 0.0), not the pooled 4/6
    assert r.lo == pytest.approx(0.5) and r.hi == pytest.approx(0.5)


def _paired_sample(rng, n, p_x, p_y, rho):
    """Correlated binary pairs via a Gaussian copula."""
    from statistics import NormalDist
    z = rng.multivariate_normal([0, 0], [[1, rho], [rho, 1]], size=n)
    tx, ty = NormalDist().inv_cdf(p_x), NormalDist().inv_cdf(p_y)
    return (z[:, 0] < tx).astype(int), (z[:, 1] < ty).astype(int)


def _true_diff(p_x, p_y):
    return p_x - p_y


@pytest.mark.parametrize("n,p_x,p_y,rho", [(200, 0.62, 0.55, 0.6), (100, 0.85, 0.85, 0.8)])
def test_newcombe_paired_coverage(n, p_x, p_y, rho):
    rng = np.random.default_rng(123)
    sims, covered = 400, 0
    for _ in range(sims):
        x, y = _paired_sample(rng, n, p_x, p_y, rho)
        d = stats.paired_proportion_diff(x, y)
        covered += d.lo <= _true_diff(p_x, p_y) <= d.hi
    # binomial SE of a coverage estimate at 95% over 400 sims is 1.1%
    assert 0.92 <= covered / sims <= 0.985


def test_mcnemar_type_one_error_under_null():
    rng = np.random.default_rng(5)
    sims = 400
    rejections = sum(stats.paired_proportion_diff(*_paired_sample(rng, 150, 0.6, 0.6, 0.7)).p < 0.05
                     for _ in range(sims))
    assert rejections / sims <= 0.075          # exact test: at most nominal (plus simulation noise)
    rng = np.random.default_rng(6)
    power = sum(stats.paired_proportion_diff(*_paired_sample(rng, 300, 0.70, 0.60, 0.7)).p < 0.05
                for _ in range(100))
    assert power >= 80                          # a real 10-point gap at n=300 is detected


def test_bootstrap_coverage():
    rng = np.random.default_rng(11)
    sims, covered = 200, 0
    for s in range(sims):
        x, y = _paired_sample(rng, 200, 0.6, 0.5, 0.5)
        r = stats.paired_bootstrap(x, y, n_boot=400, seed=s)
        covered += r.lo <= 0.1 <= r.hi
    assert 0.90 <= covered / sims <= 0.99


def test_unpaired_coverage_and_null():
    rng = np.random.default_rng(3)
    sims, covered, rejected = 400, 0, 0
    for _ in range(sims):
        kx, ky = rng.binomial(120, 0.7), rng.binomial(150, 0.62)
        d = stats.unpaired_proportion_diff(kx, 120, ky, 150)
        covered += d.lo <= 0.08 <= d.hi
        k1, k2 = rng.binomial(120, 0.5), rng.binomial(150, 0.5)
        rejected += stats.unpaired_proportion_diff(k1, 120, k2, 150).p < 0.05
    assert 0.92 <= covered / sims <= 0.985
    assert rejected / sims <= 0.08


def test_pareto_front():
    pts = [(4.5, 0.60), (6.5, 0.62), (8.5, 0.61), (5.0, 0.58), (16.0, 0.63)]
    assert stats.pareto_front(pts, maximize_y=True) == [0, 1, 4]
    kld = [(4.5, 0.05), (6.5, 0.01), (8.5, 0.012), (16.0, 0.0)]
    assert stats.pareto_front(kld, maximize_y=False) == [0, 1, 3]


def test_stats_import_without_scipy():
    import subprocess
    import sys
    code = ("import sys; sys.modules['scipy'] = None; import mixq.report.stats as s; "
            "print(s.mcnemar_exact(0, 10))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert float(out) == pytest.approx(2 / 1024)

"""Tests of the verdict's statistics: the paired sign-flip test (beseg.report.stats) and the decisions (beseg.report.verdict)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy import stats

from beseg.report.stats import (
    SCREEN_CUTOFF, SignFlips, min_detectable_difference, min_sign_flip_p, paired_comparison, paired_test, run_variance,
    sign_flip_pvalues,
)
from beseg.report.verdict import ALPHA, decide, holm, judge


def _exact_p(d: np.ndarray) -> float:
    """scipy's exact paired permutation test of the mean (every sign pattern)."""
    return float(stats.permutation_test((d,), lambda x, axis: np.mean(x, axis=axis), permutation_type="samples",
                                        n_resamples=np.inf, alternative="two-sided", vectorized=True).pvalue)


# --------------------------------------------------------------------------- the test


@pytest.mark.parametrize("n", [5, 9, 12, 16])
def test_exact_p_value_is_scipys_permutation_test(n):
    rng = np.random.default_rng(n)
    d = rng.normal(0.02, 0.05, n)
    d[1] = 0.0  # a zero difference and a tie in magnitude, which the count must not lose to rounding
    d[2] = -d[3]
    t = paired_test(d, np.zeros(n))
    assert t.flips.exact and t.p_value == pytest.approx(_exact_p(d), abs=1e-12)


def _exact_p_two_halves(d: np.ndarray) -> float:
    """The exact sign-flip p-value of 20-odd cases: every sign pattern of each half, summed pairwise."""
    half = len(d) // 2

    def sums(x):
        signs = 1 - 2 * ((np.arange(2 ** len(x))[:, None] >> np.arange(len(x))) & 1)
        return signs @ x

    w = (sums(d[:half])[:, None] + sums(d[half:])[None, :]) / len(d)
    return float(np.mean(np.abs(w) >= abs(d.mean()) * (1 - 1e-9)))


def test_random_patterns_beyond_16_cases_estimate_the_exact_p_value():
    rng = np.random.default_rng(4)
    d = rng.normal(0.01, 0.05, 20)
    t = paired_test(d, np.zeros(20))
    assert not t.flips.exact and t.flips.size == 2**16
    # Monte Carlo error of a p-value from 2^16 patterns: SD sqrt(p(1-p)/65536) < 0.002.
    assert t.p_value == pytest.approx(_exact_p_two_halves(d), abs=0.008)
    assert paired_test(d, np.zeros(20)).p_value == t.p_value  # deterministic given the seed


def test_smallest_p_value_is_two_over_two_to_the_n():
    for n in (4, 5, 8, 11):
        d = np.arange(1, n + 1) * 0.01  # every difference of one sign
        t = paired_test(d, np.zeros(n))
        assert t.p_value == pytest.approx(min_sign_flip_p(n)) == pytest.approx(_exact_p(d))
        assert t.min_p == pytest.approx(2 / 2**n)
    assert min_sign_flip_p(4) == 0.125 and min_sign_flip_p(11) < 0.001  # REFERENCE.md's figures
    r = paired_comparison([0.9, 0.8, 0.7, 0.6, 0.5], [0.5, 0.5, 0.5, 0.5, 0.5])
    assert r.min_p == pytest.approx(2 / 2**4)  # a zero difference has no sign to flip


@pytest.mark.parametrize("seed", range(6))
def test_an_interval_excludes_zero_exactly_when_its_test_rejects(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(6, 30))
    t = paired_test(rng.normal(rng.uniform(-0.03, 0.03), 0.04, n), np.zeros(n), seed=seed)
    for alpha in (0.2, 0.05, 0.01, 0.05 / 19, 0.001):
        low, high = t.interval(alpha)
        assert low <= t.mean_diff <= high
        assert (t.p_value <= alpha) == (low > 0 or high < 0), (alpha, t.p_value, low, high)
        if math.isfinite(low):  # the end is where the inverted test starts rejecting (to 1e-4 of the scale)
            assert t._p_at(low) > alpha and t._p_at(low - 1e-4 * max(abs(t.mean_diff), t.sd)) <= alpha
        if alpha > 0.001:
            assert t.interval(alpha / 2)[0] <= low  # a stricter level widens the interval


def test_interval_matches_scipy_inverted():
    rng = np.random.default_rng(3)
    base = rng.uniform(0.7, 0.9, 12)
    system = base + rng.normal(0.02, 0.03, 12)
    r = paired_comparison(system, base)
    d = system - base
    assert r.n == 12 and r.mean_diff == pytest.approx(d.mean()) and r.p_value == pytest.approx(_exact_p(d))
    # Independently: scipy's exact test of d - delta does not reject just inside the ends and rejects just outside.
    for end, out in ((r.ci_low, -1e-4 * d.std(ddof=1)), (r.ci_high, 1e-4 * d.std(ddof=1))):
        assert _exact_p(d - (end - out)) > 0.05 and _exact_p(d - (end + out)) <= 0.05
    assert r == paired_comparison(system, base)  # deterministic


def test_interval_covers_the_true_mean():
    # Coverage of the 95% interval over 300 normal samples of 12: near 95% (binomial 99.9% band).
    rng = np.random.default_rng(11)
    hits = sum(r.ci_low <= 0.1 <= r.ci_high
               for r in (paired_comparison(rng.normal(0.1, 1.0, 12), np.zeros(12), seed=i) for i in range(300)))
    assert 0.91 * 300 <= hits <= 0.985 * 300


def test_too_few_cases_give_an_unbounded_interval_and_no_detectable_difference():
    t = paired_test([0.9, 0.8, 0.85, 0.7], [0.5, 0.5, 0.5, 0.5])
    assert t.p_value == pytest.approx(0.125)  # all four differences positive: the smallest p with 4 cases
    assert t.interval(0.05) == (-math.inf, math.inf) and math.isinf(t.mdd(0.05))
    assert all(map(math.isfinite, t.interval(0.2)))


def test_degenerate_inputs_give_nan_with_note():
    r = paired_comparison([0.5, 0.7], [0.5, 0.7])
    assert r.mean_diff == 0.0 and math.isnan(r.ci_low) and math.isnan(r.p_value) and "zero" in r.note
    r = paired_comparison([0.9], [0.8])
    assert r.n == 1 and r.mean_diff == pytest.approx(0.1) and math.isnan(r.p_value) and "one" in r.note
    r = paired_comparison([math.nan, 0.9, 0.8, 0.7], [0.5, 0.5, math.nan, 0.6])
    assert r.n == 2 and "2 case(s)" in r.note and r.mean_diff == pytest.approx(0.25)
    r = paired_comparison([math.nan], [0.5])
    assert r.n == 0 and math.isnan(r.mean_diff) and "no paired" in r.note
    with pytest.raises(ValueError, match="equal length"):
        paired_comparison([1.0, 2.0], [1.0])


@pytest.mark.parametrize("n", [6, 10, 20, 40])
def test_minimum_detectable_difference_has_the_stated_power(n):
    # Independent check of what the number means: the exact power of the two-sided paired t-test
    # (noncentral t) at a true mean difference of MDD is 80%, up to the t-approximation's error.
    sd = 0.07
    mdd = min_detectable_difference(sd, n)
    df, crit = n - 1, stats.t.ppf(0.975, n - 1)

    def power(delta):
        nc = delta * math.sqrt(n) / sd
        return stats.nct.sf(crit, df, nc) + stats.nct.cdf(-crit, df, nc)

    assert 0.785 <= power(mdd) <= 0.805
    assert power(0.5 * mdd) < 0.4  # half that difference would usually be missed
    assert min_detectable_difference(2 * sd, n) == pytest.approx(2 * mdd)  # in the unit of the SD
    assert math.isnan(min_detectable_difference(sd, 1))
    # A stricter level needs a larger difference; so does seed variance on top of the cases'.
    assert min_detectable_difference(sd, n, alpha=0.05 / 19) > mdd
    assert min_detectable_difference(sd, n, run_var=(sd / 4) ** 2, run_df=4) > mdd


def test_vectorised_p_values_equal_one_at_a_time_and_screening_changes_no_decision():
    rng = np.random.default_rng(8)
    d = rng.normal(0.0, 1.0, (300, 14)) + rng.normal(0, 0.6, (300, 1))  # some clearly non-zero means
    flips = SignFlips(14, 0)
    screened = sign_flip_pvalues(d, flips)
    full = sign_flip_pvalues(d, flips, screen=False)
    redone = screened <= SCREEN_CUTOFF
    assert 0 < redone.sum() < 300 and np.array_equal(screened[redone], full[redone])  # every pattern where it matters
    assert np.array_equal(screened <= 0.05, full <= 0.05)
    assert full[:5] == pytest.approx([paired_test(row, np.zeros(14)).p_value for row in d[:5]])
    assert sign_flip_pvalues(d.reshape(3, 100, 14), flips).shape == (3, 100)


# --------------------------------------------------------------------------- seeds and cases together


def _runs(rng: np.random.Generator, cases: int, seeds: int, seed_sd: float, effect: float = 0.0):
    """A system's and a baseline's (seeds, cases) values: a case effect, a per-case deviation and a run shift."""
    case = rng.normal(0.85, 0.05, cases)
    system = case + effect + rng.normal(0, 0.02, cases) + rng.normal(0, seed_sd, (seeds, 1))
    baseline = case + rng.normal(0, 0.02, cases) + rng.normal(0, seed_sd, (seeds, 1))
    return system, baseline


def test_interval_widens_when_seed_spread_grows_while_cases_are_fixed():
    rng = np.random.default_rng(2)
    cases = rng.normal(0.85, 0.05, 16)
    system = cases + rng.normal(0.01, 0.02, 16)  # per case; identical in every seed at first
    baseline = cases
    shifts = np.array([[-1.0], [0.2], [0.8]])  # each run shifts all its cases (mean 0: the estimate stays put)
    widths, means = [], []
    for spread in (0.0, 0.005, 0.01, 0.02, 0.04):
        t = paired_test(system + spread * shifts, baseline - spread * shifts[::-1])
        low, high = t.interval(0.05)
        widths.append(high - low)
        means.append(t.mean_diff)
    assert means == pytest.approx([means[0]] * 5)
    assert all(a < b for a, b in zip(widths, widths[1:])), widths
    # Without seed spread it is the single-run test of the seed-averaged cases.
    assert widths[0] == pytest.approx(np.subtract(*paired_test(system, baseline).interval(0.05)[::-1]))


def test_run_variance_estimates_the_seed_variance_of_the_mean():
    # Unbiased on average: the run-level variance of the mean difference is seed_sd^2 * (1/S_a + 1/S_b).
    rng = np.random.default_rng(5)
    estimates = []
    for _ in range(400):
        system, baseline = _runs(rng, 20, 3, 0.01)
        estimates.append(float(run_variance(system, baseline)[0]))
    assert np.mean(estimates) == pytest.approx(0.01**2 * (2 / 3), rel=0.15)
    assert run_variance(np.ones((1, 5)), np.ones((1, 5))) == (0.0, 0)
    _, df = run_variance(np.zeros((3, 5)), np.zeros((1, 5)))
    assert df == 2


def test_two_level_test_keeps_its_level_when_seeds_differ_and_the_case_only_test_does_not():
    # 3 seeds per system whose runs shift all their cases: averaging seeds per case and resampling cases alone
    # treats one lucky seed as a real difference; the two-level test keeps its 5%.
    rng = np.random.default_rng(9)
    pairs = [_runs(rng, 16, 3, 0.015) for _ in range(400)]
    flips = SignFlips(16, 0)
    diffs = np.array([s.mean(0) - b.mean(0) for s, b in pairs])
    var = np.array([float(run_variance(s, b)[0]) for s, b in pairs])
    two_level = sign_flip_pvalues(diffs, flips, var, 4)
    case_only = sign_flip_pvalues(diffs, flips)
    assert (case_only <= 0.05).mean() > 0.15
    assert (two_level <= 0.05).mean() <= 0.08


# --------------------------------------------------------------------------- Holm and the gate


def _holm_by_hand(p: list[float], alpha: float) -> list[bool]:
    order = sorted(range(len(p)), key=lambda i: p[i])
    reject = [False] * len(p)
    for step, i in enumerate(order):
        if p[i] > alpha / (len(p) - step):
            break
        reject[i] = True
    return reject


@pytest.mark.parametrize("p", [
    [0.01, 0.04, 0.03, 0.005], [0.2, 0.001, 0.011, 0.5, 0.0125], [0.0, 1.0], [0.03], [0.012, 0.012, 0.012, 0.012],
])
def test_holm_matches_the_step_down_rule(p):
    h = holm(p, 0.05)
    assert list(h.reject) == _holm_by_hand(p, 0.05)
    assert list(h.reject) == list(h.adjusted <= 0.05)
    # Each comparison's level: alpha / (m - i + 1) up to the first non-rejected step, that level after it.
    order = np.argsort(p, kind="stable")
    levels = h.level[order]
    stop = int(h.reject.sum())
    assert levels[:stop + 1] == pytest.approx([0.05 / (len(p) - i) for i in range(min(stop + 1, len(p)))])
    assert all(levels[stop:] == levels[min(stop, len(p) - 1)])
    assert list(h.reject) == [pi <= lv for pi, lv in zip(p, h.level)]


def test_holm_vectorised_equals_row_by_row_and_nan_is_never_rejected():
    rng = np.random.default_rng(1)
    p = rng.uniform(0, 0.03, (50, 7))
    h = holm(p)
    for row in range(50):
        assert np.array_equal(h.reject[row], holm(p[row]).reject)
    assert not holm([math.nan, 0.0001]).reject[0]


def test_the_family_is_tested_only_after_the_primary_rejects():
    family = [0.0001, 0.2, 0.03]  # Holm: 0.0001 <= 0.05/3, then 0.03 > 0.05/2: stop
    open_gate = decide(0.01, family)
    assert bool(open_gate.primary) and list(open_gate.family) == [True, False, False]
    closed = decide(0.2, family)
    assert not closed.primary and not closed.family.any() and closed.holm.reject[0]  # Holm alone would have
    assert bool(closed.any_uncorrected) and not closed.any_claim
    # Many experiments at once give the same decisions as one at a time.
    many = decide(np.array([0.01, 0.2]), np.array([family, family]))
    assert np.array_equal(many.family, np.array([open_gate.family, closed.family]))


def test_gatekeeping_is_the_closed_testing_procedure():
    # Closed testing with alpha for any intersection holding the primary (rejected iff p0 <= alpha) and Bonferroni
    # for the others rejects exactly what the gated Holm rejects: so the whole verdict controls the family-wise rate.
    rng = np.random.default_rng(6)
    for _ in range(200):
        p0 = float(rng.choice([0.01, 0.2]))
        pf = list(rng.choice([0.001, 0.006, 0.013, 0.03, 0.4], size=4))
        hyps = range(5)
        p = [p0, *pf]

        def local(subset):
            return p0 <= ALPHA if 0 in subset else min(p[i] for i in subset) <= ALPHA / len(subset)

        closed = [all(local(s) for k in range(1, 6) for s in itertools.combinations(hyps, k) if j in s) for j in hyps]
        d = decide(p0, pf)
        assert closed == [bool(d.primary), *map(bool, d.family)]


def test_judge_gives_each_comparison_its_holm_level_and_interval():
    rng = np.random.default_rng(0)
    primary = paired_test(rng.normal(0.05, 0.02, 16), np.zeros(16))
    clear = paired_test(rng.normal(-0.08, 0.02, 16), np.zeros(16))
    null = paired_test(np.repeat(rng.normal(0.0, 0.02, 8), 2) * np.tile([1, -1], 8), np.zeros(16))  # mean 0
    first, calls = judge(primary, [clear, null])
    assert first.reject and first.level == ALPHA and first.interval == primary.interval(ALPHA)
    assert calls[0].reject and calls[0].level == pytest.approx(ALPHA / 2) and calls[0].interval[1] < 0
    assert not calls[1].reject and calls[1].level == pytest.approx(ALPHA / 1)  # the last step: alpha / 1
    assert calls[1].interval[0] <= 0 <= calls[1].interval[1]
    _, untested = judge(null, [clear])  # the primary does not reject: nothing else is tested
    assert not untested[0].tested and not untested[0].reject and math.isnan(untested[0].interval[0])

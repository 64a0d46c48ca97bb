"""Paired comparison of two systems on the same cases: the sign-flip test, its intervals, and its power.

The data of one comparison are a system's and the baseline's per-case values of one metric, one row
per run (seed or repeat) and one column per case. The estimate is the mean over cases of
``system - baseline``, each case's value first averaged over the system's runs, so for Dice and NSD
a positive difference is an improvement and for the distances (mm) a negative one is.

The test is the paired sign-flip (permutation) test of that mean: under the null hypothesis that
the two systems are exchangeable on every case, each case's difference is as likely to have the
other sign, so the p-value is the share of sign patterns whose mean is at least as far from 0 as
the observed one. With n <= 16 paired cases every one of the 2^n patterns is used (exact);
beyond, :data:`MAX_PATTERNS` random patterns (the observed one among them, which keeps the
p-value valid). Its smallest possible value is 2 / 2^n (exact) or 1 / :data:`MAX_PATTERNS`: with
few cases no difference can be significant, whatever the data, and the report says so. Intervals
are the test inverted: every shift ``delta`` whose test on ``difference - delta`` does not reject
at the level, so an interval excludes 0 exactly when the test rejects at that level.

Seeds and cases together: the case-level sign flips see how much the mean moves with the cases,
not how much it moves with the training seed (a seed that trains a better model shifts every case
of its run alike). With two or more runs per system the between-run variance of the run means,
less its share of per-case noise that the cases already carry (a two-way, runs x cases, variance
components estimate, pooled over the two systems), is added to the test's null distribution as an
independent Student-t term with the runs' degrees of freedom: a two-level (cases and seeds)
analysis, so the intervals widen when seeds disagree. With one run per system the seed variance
cannot be estimated and the claim is about these trained models.

Everything is deterministic given ``seed`` (the random patterns and t draws). The report and
``beseg bench verdict`` compute their p-values with :func:`sign_flip_pvalues`, vectorised over
many comparisons. For the thousands of simulated comparisons of the benchmark it screens with the
first :data:`SCREEN_PATTERNS` patterns (a random subset) and recomputes only the p-values at or
below :data:`SCREEN_CUTOFF` with all of them: a p-value above the cutoff rejects at no level the
verdict uses, so the decisions are the full test's (but for a chance below 1e-20 per comparison).
Pattern means are computed in float32; ties within a relative 1e-5 count as extreme, which can only
make a p-value larger.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import stats

__all__ = [
    "MAX_PATTERNS", "SCREEN_PATTERNS", "SCREEN_CUTOFF", "SignFlips", "PairedComparison", "PairedTest",
    "paired_test", "paired_comparison", "sign_flip_pvalues", "run_variance", "min_detectable_difference",
    "min_sign_flip_p",
]

#: Sign patterns of the test: all 2^n up to n = 16 cases (exact), else this many random ones.
MAX_PATTERNS = 2**16
#: Patterns of the first, screening pass of :func:`sign_flip_pvalues`.
SCREEN_PATTERNS = 2**12
#: p-values of the screening pass at or below this are recomputed with every pattern.
SCREEN_CUTOFF = 0.1
#: Relative slack when comparing a pattern's |mean| with the observed one: rounding (the pattern means are
#: computed in float32) never makes a tie count as less extreme; it can only make the p-value larger.
_TIE = 1e-5
#: Elements of one block of pattern means (columns x patterns), to bound memory.
_BLOCK = 2**21


class SignFlips:
    """The sign patterns of a paired sign-flip test on ``n`` cases, and the t draws of the run-level term.

    Row 0 is the observed pattern (all +1). Exact (``2**n <= max_patterns``): every pattern, rows 1..
    in a random order, so that any leading block is a random subset; else ``max_patterns`` random
    patterns. Deterministic given ``seed``.

    Args:
        n: number of paired cases, >= 1.
        seed: seed of the pattern order or draw and of the t draws.
        max_patterns: the most patterns to use.
    """

    def __init__(self, n: int, seed: int = 0, max_patterns: int = MAX_PATTERNS) -> None:
        if n < 1:
            raise ValueError(f"a sign-flip test needs at least one case, got {n}.")
        rng = np.random.default_rng([seed, n])
        self.n = n
        self.seed = seed
        self.exact = n < 63 and 2**n <= max_patterns
        if self.exact:
            bits = (np.arange(2**n, dtype=np.int64)[:, None] >> np.arange(n)) & 1
            signs = (1 - 2 * bits).astype(np.int8)  # row 0: all +1
            signs[1:] = signs[1:][rng.permutation(2**n - 1)]
        else:
            signs = rng.choice(np.array([-1, 1], dtype=np.int8), size=(max_patterns, n))
            signs[0] = 1
        self.signs = signs
        self._t: dict[int, np.ndarray] = {}

    @property
    def size(self) -> int:
        """Number of patterns."""
        return int(self.signs.shape[0])

    @property
    def min_p(self) -> float:
        """The smallest p-value the test can give: 2 / 2^n (exact), else 1 / patterns."""
        return min(1.0, 2.0 / 2.0**self.n) if self.exact else 1.0 / self.size

    def t_draws(self, df: int) -> np.ndarray:
        """One Student-t draw with ``df`` degrees of freedom per pattern (row 0: 0, the observed one), cached."""
        if df not in self._t:
            rng = np.random.default_rng([self.seed, self.n, df, 7])
            draws = rng.standard_t(df, size=self.size)
            draws[0] = 0.0
            self._t[df] = draws
        return self._t[df]

    def describe(self) -> str:
        """``all 65536 sign patterns`` or ``65536 random sign patterns``."""
        return f"all {self.size} sign patterns" if self.exact else f"{self.size} random sign patterns"


def _counts(d: np.ndarray, signs: np.ndarray, scale: np.ndarray | None, tau: np.ndarray | None) -> np.ndarray:
    """Per row of ``d`` (k, n): how many patterns give a |mean| at least the observed one (pattern 0's).

    With ``scale`` (k,) and ``tau`` (B,), pattern b's mean gets ``scale * tau[b]`` added first.
    """
    k, n = d.shape
    b_total = signs.shape[0]
    counts = np.zeros(k, dtype=np.int64)
    observed = np.abs(d.mean(axis=1))
    threshold = (observed * (1 - _TIE)).astype(np.float32)
    d32 = d.astype(np.float32)
    rows = max(1, _BLOCK // b_total) if b_total <= _BLOCK else 1
    cols = min(b_total, _BLOCK)
    for p0 in range(0, b_total, cols):
        block = (signs[p0:p0 + cols].T / np.float32(n)).astype(np.float32)  # (n, B')
        t32 = None if tau is None else tau[p0:p0 + cols].astype(np.float32)
        for r0 in range(0, k, rows):
            w = d32[r0:r0 + rows] @ block
            if scale is not None and t32 is not None:
                w += scale[r0:r0 + rows, None].astype(np.float32) * t32[None, :]
            np.abs(w, out=w)
            counts[r0:r0 + rows] += np.count_nonzero(w >= threshold[r0:r0 + rows, None], axis=1)
    return counts


def sign_flip_pvalues(diffs: np.ndarray, flips: SignFlips, run_var: np.ndarray | float | None = None,
                      run_df: int = 0, screen: bool = True) -> np.ndarray:
    """Two-sided p-values of the paired sign-flip test of mean 0, for many comparisons at once.

    Args:
        diffs: ``(..., n)`` per-case differences (finite), ``n == flips.n``.
        flips: the sign patterns (:class:`SignFlips`).
        run_var: ``(...)`` or scalar, the run-level (seed) variance of the mean difference to add to the
            null distribution (:func:`run_variance`); None or 0 for none.
        run_df: its degrees of freedom (>= 1 where ``run_var > 0``).
        screen: first use :data:`SCREEN_PATTERNS` patterns and only recompute the p-values at or below
            :data:`SCREEN_CUTOFF` with all of them (for many comparisons at once: a p-value above the
            cutoff then comes from the screening patterns, and the chance that the full test would have
            put it at or below 0.05 is below 1e-20); False: every p-value from every pattern.

    Returns:
        ``(...)`` p-values in ``[flips.min_p, 1]``: the share of patterns at least as extreme.
    """
    d = np.asarray(diffs, dtype=np.float64)
    if d.shape[-1] != flips.n:
        raise ValueError(f"diffs have {d.shape[-1]} cases, the sign patterns {flips.n}.")
    lead = d.shape[:-1]
    flat = d.reshape(-1, flips.n)
    scale = tau = None
    if run_var is not None and np.any(np.asarray(run_var) > 0):
        if run_df < 1:
            raise ValueError("a run-level variance needs run_df >= 1.")
        scale = np.sqrt(np.broadcast_to(np.asarray(run_var, dtype=np.float64), lead).reshape(-1))
        tau = flips.t_draws(run_df)
    first = min(SCREEN_PATTERNS if screen else flips.size, flips.size)
    p = _counts(flat, flips.signs[:first], scale, None if tau is None else tau[:first]) / first
    if first < flips.size:
        redo = np.flatnonzero(p <= SCREEN_CUTOFF)
        if redo.size:
            sub_scale = None if scale is None else scale[redo]
            p[redo] = _counts(flat[redo], flips.signs, sub_scale, tau) / flips.size
    return p.reshape(lead)


def run_variance(system_runs: np.ndarray, baseline_runs: np.ndarray) -> tuple[np.ndarray, int]:
    """The seed (run-level) variance of the mean paired difference, from the runs' per-case values.

    Per system with S >= 2 runs of n >= 2 cases (two-way layout, runs x cases), the variance of the
    run means less the residual (run x case) variance / n estimates the variance of a run's shift
    common to all its cases; it is pooled over the two systems (weighted by S - 1), truncated at 0,
    and scaled by ``1/S_system + 1/S_baseline``. A system with one run takes the other's estimate.

    Args:
        system_runs: ``(..., S_a, n)`` complete (finite) values.
        baseline_runs: ``(..., S_b, n)`` on the same cases.

    Returns:
        ``(variance (...), degrees of freedom)``; ``(0, 0)`` when neither system has two runs.
    """
    num, df = 0.0, 0
    for y in (np.asarray(system_runs, dtype=np.float64), np.asarray(baseline_runs, dtype=np.float64)):
        s, n = y.shape[-2:]
        if s < 2 or n < 2:
            continue
        run_means = y.mean(axis=-1)
        resid = y - run_means[..., None] - y.mean(axis=-2, keepdims=True) + run_means.mean(axis=-1)[..., None, None]
        within = (resid**2).sum(axis=(-2, -1)) / ((s - 1) * (n - 1))
        num = num + (s - 1) * (run_means.var(axis=-1, ddof=1) - within / n)
        df += s - 1
    if df == 0:
        lead = np.broadcast_shapes(np.shape(system_runs)[:-2], np.shape(baseline_runs)[:-2])
        return np.zeros(lead), 0
    per_run = np.maximum(np.asarray(num) / df, 0.0)
    s_a, s_b = np.shape(system_runs)[-2], np.shape(baseline_runs)[-2]
    return per_run * (1.0 / s_a + 1.0 / s_b), df


def min_detectable_difference(sd: float, n: int, alpha: float = 0.05, power: float = 0.8, run_var: float = 0.0,
                              run_df: int = 0) -> float:
    """Smallest true mean paired difference a two-sided test at ``alpha`` detects with probability ``power``.

    The t-approximation ``(t[1 - alpha/2, df] + t[power, df]) * SE``, with ``SE^2 = sd^2 / n + run_var``
    and ``df = n - 1``, or Welch-Satterthwaite's combination of ``n - 1`` and ``run_df`` when
    ``run_var > 0``. It treats the observed SD as the true one; the exact power there is close to
    ``power``, slightly below it for small ``n``.

    Args:
        sd: standard deviation of the per-case differences (``ddof=1``), >= 0.
        n: number of pairs.
        alpha: two-sided significance level, in (0, 1).
        power: the probability of detecting the difference, in (0, 1).
        run_var: the run-level variance of the mean difference (:func:`run_variance`).
        run_df: its degrees of freedom.

    Returns:
        The difference in the unit of ``sd``; NaN when ``n < 2`` or ``sd`` is not finite.

    Raises:
        ValueError: ``alpha`` or ``power`` outside (0, 1), or a negative ``sd``.
    """
    if not (0.0 < alpha < 1.0 and 0.0 < power < 1.0):
        raise ValueError(f"alpha and power must be in (0, 1), got {alpha} and {power}.")
    if sd < 0:
        raise ValueError(f"sd must be >= 0, got {sd}.")
    if n < 2 or not math.isfinite(sd):
        return math.nan
    case_var = sd**2 / n
    df = float(n - 1)
    if run_var > 0 and run_df >= 1:
        df = (case_var + run_var) ** 2 / (case_var**2 / (n - 1) + run_var**2 / run_df)
    return float((stats.t.ppf(1 - alpha / 2, df) + stats.t.ppf(power, df)) * math.sqrt(case_var + run_var))


def min_sign_flip_p(n: int) -> float:
    """The smallest two-sided p-value of the exact sign-flip (or Wilcoxon signed-rank) test on ``n`` cases.

    It is reached when every difference has the same sign: ``2 / 2**n`` (at most 1), so with
    ``n <= 5`` no result can reach p < 0.05. NaN for ``n < 1``.
    """
    return math.nan if n < 1 else min(1.0, 2.0 / 2.0**n)


@dataclass(frozen=True)
class PairedComparison:
    """A paired comparison's unadjusted summary (what the report's paired table shows).

    Attributes:
        n: number of cases with a finite value in both systems (the pairs used).
        mean_diff: mean of ``system - baseline`` over those cases, in the metric's unit.
        ci_low: lower end of the unadjusted interval of ``mean_diff`` (NaN if undefined; -inf if the
            test cannot reject at that level with these cases).
        ci_high: upper end (NaN if undefined; +inf likewise).
        p_value: two-sided sign-flip p-value (NaN if undefined).
        note: why something is NaN or which pairs were dropped; "" when nothing needs saying.
        mdd: the smallest mean difference the test at 5% detects with 80% power on these cases
            (:func:`min_detectable_difference`; NaN for fewer than 2 pairs, inf when the test cannot
            reach 5% with these cases).
        min_p: the smallest p-value the test can give with these cases.
        confidence: the interval's confidence level.
    """

    n: int
    mean_diff: float
    ci_low: float
    ci_high: float
    p_value: float
    note: str = ""
    mdd: float = math.nan
    min_p: float = math.nan
    confidence: float = 0.95


@dataclass
class PairedTest:
    """One comparison's sign-flip test, ready to give p-values and intervals at any level.

    Attributes:
        n: paired cases used.
        mean_diff: the mean difference (system - baseline).
        sd: standard deviation of the per-case differences (``ddof=1``; NaN for n < 2).
        run_var: the run-level variance added to the null distribution (0 with one run per system).
        run_df: its degrees of freedom (0 when none).
        runs: ``(system runs, baseline runs)``.
        p_value: the two-sided p-value (NaN when there is no test).
        note: what was dropped, or why there is no test.
        flips: the sign patterns (None when there is no test).
        nonzero: paired cases with a non-zero difference (a zero difference has no sign to flip).
    """

    n: int
    mean_diff: float
    sd: float
    run_var: float
    run_df: int
    runs: tuple[int, int]
    p_value: float
    note: str = ""
    flips: SignFlips | None = None
    nonzero: int = 0
    _w: np.ndarray = field(default=None, repr=False)  # type: ignore[assignment]
    _mean_sign: np.ndarray = field(default=None, repr=False)  # type: ignore[assignment]

    @property
    def testable(self) -> bool:
        """True when there is a test (two or more pairs, not all differences zero)."""
        return self.flips is not None

    @property
    def min_p(self) -> float:
        """The smallest p-value the test can give with these cases: 2 / 2^(non-zero differences), at least
        1 / patterns with random patterns (NaN without a pair)."""
        if self.flips is None:
            return min_sign_flip_p(self.nonzero) if self.n else math.nan
        floor = 0.0 if self.flips.exact else 1.0 / self.flips.size
        return max(floor, min_sign_flip_p(self.nonzero))

    def _p_at(self, delta: float) -> float:
        """The p-value of the test of mean ``delta`` (every pattern)."""
        assert self.flips is not None
        w = self._w - delta * self._mean_sign
        if self.run_var > 0:
            w = w + math.sqrt(self.run_var) * self.flips.t_draws(self.run_df)
        return float(np.count_nonzero(np.abs(w) >= abs(self.mean_diff - delta) * (1 - _TIE)) / w.size)

    def interval(self, alpha: float) -> tuple[float, float]:
        """The ``1 - alpha`` interval of the mean difference: the shifts the test does not reject at ``alpha``.

        It excludes 0 exactly when ``p_value <= alpha``. An end is infinite when no shift is rejected
        on that side (``alpha`` below :attr:`min_p`); NaN without a test.
        """
        if not self.testable:
            return math.nan, math.nan
        if self.flips.exact and alpha < self.flips.min_p and self.run_var == 0:
            return -math.inf, math.inf  # no shift can be rejected with these cases
        rejects_zero = self.p_value <= alpha
        scale = max(abs(self.mean_diff), self.sd, math.sqrt(self.run_var), 1e-12)
        ends = []
        for side in (-1.0, 1.0):
            zero_side = side * (0.0 - self.mean_diff) > 0  # 0 lies on this side of the estimate
            if zero_side and rejects_zero:
                inside, outside = self.mean_diff, 0.0  # the end lies between the estimate and 0
            else:
                inside = 0.0 if zero_side else self.mean_diff  # not rejected here
                step, outside = scale, None
                for _ in range(64):
                    if self._p_at(inside + side * step) <= alpha:
                        outside = inside + side * step
                        break
                    step *= 4
                if outside is None:
                    ends.append(side * math.inf)
                    continue
            for _ in range(60):  # bisection, keeping p(inside) > alpha >= p(outside), to 1e-4 of the differences' scale
                mid = (inside + outside) / 2
                if mid in (inside, outside) or abs(outside - inside) <= 1e-4 * scale:
                    break
                if self._p_at(mid) <= alpha:
                    outside = mid
                else:
                    inside = mid
            ends.append(inside)
        return ends[0], ends[1]

    def mdd(self, alpha: float, power: float = 0.8) -> float:
        """The smallest true difference detected with ``power`` at ``alpha`` (inf when no p-value can reach
        ``alpha`` with this many cases; NaN without a test)."""
        if self.flips is None or not math.isfinite(self.sd):
            return math.nan
        if self.flips.min_p > alpha:
            return math.inf
        return min_detectable_difference(self.sd, self.n, alpha, power, self.run_var, self.run_df)

    def summary(self, confidence: float = 0.95) -> PairedComparison:
        """The unadjusted :class:`PairedComparison` at ``confidence``."""
        low, high = self.interval(1 - confidence)
        return PairedComparison(self.n, self.mean_diff, low, high, self.p_value, self.note, self.mdd(1 - confidence),
                                self.min_p, confidence)


def _as_runs(values: Sequence | np.ndarray) -> np.ndarray:
    a = np.asarray(values, dtype=float)
    return a[None] if a.ndim == 1 else a


def paired_test(system_runs: Sequence | np.ndarray, baseline_runs: Sequence | np.ndarray, seed: int = 0,
                flips: dict[int, SignFlips] | None = None) -> PairedTest:
    """The sign-flip test of one comparison, from each system's per-run, per-case values.

    Args:
        system_runs: ``(S_a, n)`` (or ``(n,)`` for one run): the system's values, one row per run
            (seed or repeat), one column per case; NaN where a run has no value.
        baseline_runs: ``(S_b, n)`` (or ``(n,)``) on the same cases in the same order.
        seed: seed of the random sign patterns and t draws.
        flips: a cache ``{n: SignFlips}`` shared between comparisons (filled here).

    Returns:
        A :class:`PairedTest`. Each case's value is averaged over the system's runs (NaN runs skipped);
        cases without a value in both systems are dropped and counted in ``note``. The run-level
        variance uses the cases every run scored. With no pair everything is NaN; with one pair,
        or when every difference is zero, the mean is reported without a test, with a note.

    Raises:
        ValueError: the two disagree on the number of cases.
    """
    a, b = _as_runs(system_runs), _as_runs(baseline_runs)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"system and baseline must have the same cases, got {a.shape} and {b.shape}.")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a case without any value: NaN, dropped below
        ma, mb = np.nanmean(a, axis=0), np.nanmean(b, axis=0)
    keep = np.isfinite(ma) & np.isfinite(mb)
    d = ma[keep] - mb[keep]
    notes = [f"{int((~keep).sum())} case(s) without a value in both systems dropped"] if (~keep).any() else []
    runs = (a.shape[0], b.shape[0])
    nan = math.nan
    if d.size == 0:
        return PairedTest(0, nan, nan, 0.0, 0, runs, nan, "; ".join(notes + ["no paired cases"]))
    mean = float(d.mean())
    nonzero = int(np.count_nonzero(d))
    if d.size < 2:
        return PairedTest(1, mean, nan, 0.0, 0, runs, nan, "; ".join(notes + ["one paired case: no interval or test"]),
                          nonzero=nonzero)
    sd = float(d.std(ddof=1))
    if not nonzero:
        return PairedTest(int(d.size), 0.0, 0.0, 0.0, 0, runs, nan,
                          "; ".join(notes + ["all differences are zero: no interval or test"]))
    complete = np.isfinite(a).all(axis=0) & np.isfinite(b).all(axis=0)
    run_var, run_df = run_variance(a[:, complete], b[:, complete])
    run_var = float(run_var)
    cache = flips if flips is not None else {}
    if d.size not in cache:
        cache[d.size] = SignFlips(d.size, seed)
    pattern = cache[d.size]
    p = float(sign_flip_pvalues(d, pattern, run_var, run_df, screen=False))
    w = pattern.signs.astype(np.float64) @ d / d.size
    mean_sign = pattern.signs.mean(axis=1, dtype=np.float64)
    return PairedTest(int(d.size), mean, sd, run_var, run_df, runs, p, "; ".join(notes), pattern, nonzero, w, mean_sign)


def paired_comparison(system: Sequence[float] | np.ndarray, baseline: Sequence[float] | np.ndarray,
                      confidence: float = 0.95, seed: int = 0) -> PairedComparison:
    """Mean paired difference of two systems' per-case values, with the sign-flip test and its interval.

    Args:
        system: per-case values of the compared system (one run), in case order.
        baseline: per-case values of the baseline, same cases in the same order.
        confidence: confidence level of the interval, in (0, 1).
        seed: seed of the random sign patterns (more than 16 cases).

    Returns:
        The unadjusted :class:`PairedComparison` (see :func:`paired_test` for NaN and dropped pairs).

    Raises:
        ValueError: the two sequences differ in length or are not 1D, or ``confidence`` is not in (0, 1).
    """
    a, b = np.asarray(system, dtype=float), np.asarray(baseline, dtype=float)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"system and baseline must be 1D and of equal length, got {a.shape} and {b.shape}.")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}.")
    return paired_test(a, b, seed=seed).summary(confidence)

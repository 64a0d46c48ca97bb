"""Paired comparison of two systems on the same cases: mean difference, bootstrap CI, Wilcoxon p.

One number per case and system (already averaged over seeds) is paired by case. The difference is
``system - baseline``, so for Dice and NSD a positive difference is an improvement and for the
distances (mm) a negative one is. The interval is a percentile bootstrap of the mean difference
over cases (:func:`scipy.stats.bootstrap`, cases resampled with replacement), and the p-value is
the two-sided paired Wilcoxon signed-rank test (:func:`scipy.stats.wilcoxon`). Both are
deterministic given ``seed``.

The percentile method is used rather than BCa because BCa's jackknife acceleration is degenerate
for the handful of validation cases these tasks have (9 on Task09), where it returns NaN.

What a test *could* have found is reported beside what it found (:func:`min_detectable_difference`,
:func:`min_wilcoxon_p`): with few cases no difference is significant, and "no significant
difference" then says nothing about the systems.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

__all__ = ["PairedComparison", "paired_comparison", "min_detectable_difference", "min_wilcoxon_p"]


@dataclass(frozen=True)
class PairedComparison:
    """Result of :func:`paired_comparison`.

    Attributes:
        n: number of cases with a finite value in both systems (the pairs used).
        mean_diff: mean of ``system - baseline`` over those cases, in the metric's unit.
        ci_low: lower end of the bootstrap confidence interval of ``mean_diff`` (NaN if undefined).
        ci_high: upper end (NaN if undefined).
        p_value: two-sided paired Wilcoxon signed-rank p-value (NaN if undefined).
        note: why something is NaN or which pairs were dropped; "" when nothing needs saying.
        mdd: the smallest mean difference a paired t-test on these ``n`` cases would detect with
            80% power at two-sided alpha 0.05, given the observed SD of the differences (the
            metric's unit; NaN for fewer than 2 pairs or all-zero differences), see
            :func:`min_detectable_difference`.
        min_p: the smallest p-value the exact two-sided Wilcoxon test can give for the number of
            non-zero differences (:func:`min_wilcoxon_p`; NaN with none).
    """

    n: int
    mean_diff: float
    ci_low: float
    ci_high: float
    p_value: float
    note: str = ""
    mdd: float = math.nan
    min_p: float = math.nan


def min_detectable_difference(sd: float, n: int, alpha: float = 0.05, power: float = 0.8) -> float:
    """Smallest true mean paired difference detectable by a two-sided paired t-test.

    The usual t-approximation: ``(t[1 - alpha/2, n-1] + t[power, n-1]) * sd / sqrt(n)``, where
    ``t[q, df]`` is the q-quantile of Student's t with ``df`` degrees of freedom. It treats the
    observed SD as the true one; the exact power at that difference (noncentral t) is close to
    ``power`` and slightly below it for small ``n``.

    Args:
        sd: standard deviation of the paired differences (sample SD, ``ddof=1``), >= 0.
        n: number of pairs.
        alpha: two-sided significance level, in (0, 1).
        power: the probability of detecting the difference, in (0, 1).

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
    df = n - 1
    return float((stats.t.ppf(1 - alpha / 2, df) + stats.t.ppf(power, df)) * sd / math.sqrt(n))


def min_wilcoxon_p(n: int) -> float:
    """The smallest two-sided p-value of the exact Wilcoxon signed-rank test on ``n`` non-zero differences.

    It is reached when every difference has the same sign: ``2 / 2**n`` (at most 1), so with
    ``n <= 5`` no result can reach p < 0.05. NaN for ``n < 1``.
    """
    return math.nan if n < 1 else min(1.0, 2.0 / 2.0**n)


def paired_comparison(
    system: Sequence[float] | np.ndarray,
    baseline: Sequence[float] | np.ndarray,
    confidence: float = 0.95,
    n_resamples: int = 10_000,
    seed: int = 0,
) -> PairedComparison:
    """Mean paired difference with a percentile bootstrap CI and a Wilcoxon signed-rank p-value.

    Args:
        system: per-case values of the compared system, in case order.
        baseline: per-case values of the baseline, same cases in the same order.
        confidence: confidence level of the interval, in (0, 1).
        n_resamples: bootstrap resamples of the cases.
        seed: seed of the bootstrap's random generator (same seed, same interval).

    Returns:
        A :class:`PairedComparison`. Pairs where either value is NaN (an undefined distance) are
        dropped and counted in ``note``. With no pair everything is NaN; with one pair, or when
        every difference is zero, the mean is reported and the CI and p-value are NaN, with a note.
        ``mdd`` and ``min_p`` say how large a difference these cases could show at all.

    Raises:
        ValueError: the two sequences differ in length, or ``confidence`` is not in (0, 1).
    """
    a = np.asarray(system, dtype=float)
    b = np.asarray(baseline, dtype=float)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"system and baseline must be 1D and of equal length, got {a.shape} and {b.shape}.")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}.")
    keep = np.isfinite(a) & np.isfinite(b)
    d = a[keep] - b[keep]
    notes = []
    if (~keep).any():
        notes.append(f"{int((~keep).sum())} case(s) without a value in both systems dropped")
    nan = math.nan
    if d.size == 0:
        return PairedComparison(0, nan, nan, nan, nan, "; ".join(notes + ["no paired cases"]))
    mean = float(d.mean())
    if d.size < 2:
        return PairedComparison(1, mean, nan, nan, nan, "; ".join(notes + ["one paired case: no CI or test"]),
                                min_p=min_wilcoxon_p(int(np.count_nonzero(d))))
    if not d.any():
        return PairedComparison(
            int(d.size), 0.0, nan, nan, nan, "; ".join(notes + ["all differences are zero: no CI or test"])
        )
    mdd = min_detectable_difference(float(d.std(ddof=1)), int(d.size))
    min_p = min_wilcoxon_p(int(np.count_nonzero(d)))
    with warnings.catch_warnings():
        # Identical differences give a zero-width interval, which is the right answer, not a problem.
        warnings.simplefilter("ignore", stats.DegenerateDataWarning)
        boot = stats.bootstrap(
            (d,), np.mean, confidence_level=confidence, n_resamples=n_resamples, method="percentile",
            rng=np.random.default_rng(seed),
        )
    # Zero differences are dropped by the default zero_method ("wilcox"); the exact null
    # distribution is used for small n without ties, the normal approximation otherwise.
    p = float(stats.wilcoxon(d).pvalue)
    return PairedComparison(
        int(d.size), mean, float(boot.confidence_interval.low), float(boot.confidence_interval.high), p,
        "; ".join(notes), mdd, min_p,
    )

"""The verdict's decisions: one primary comparison at 5%, then the other comparisons as a Holm family.

This is the one place where "better", "worse" and "no difference shown" are decided; the report
(:mod:`beseg.report.document`) and ``beseg bench verdict`` (:mod:`beseg.bench.verdict`) both call it,
so the false-positive rate the benchmark measures is the report's.

The procedure (a closed testing procedure, so it controls the family-wise error rate strongly):

1. The primary comparison, declared before training (``plan.json``), is tested alone at
   :data:`ALPHA`: its p-value and its ``1 - ALPHA`` interval answer it.
2. Only if it rejects, every other comparison of the verdict (every other system x metric x class)
   is tested as one family with Holm's step-down procedure at :data:`ALPHA`: sort the m p-values,
   reject the i-th smallest while it is at most ``ALPHA / (m - i + 1)``. Each comparison's interval
   is at the level it was tested at (the stopping step's level for those after it), so an adjusted
   interval excludes 0 exactly when Holm rejects it.

Gating the family on the primary (serial gatekeeping) is what keeps the primary at its nominal 5%
and the whole verdict at 5% too: any procedure that tests the primary at the full 5% and makes a
false claim in at most 5% of experiments must test nothing else when the primary does not reject.
Without the gate the primary and the family would each spend 5%, and a failed primary would leave
5% for finding a metric, a class or a system where the new loss "wins" by chance: the trap this
design exists to avoid. "Uncorrected" is the rule the report used before: each comparison on its
own at 5%.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from beseg.report.stats import PairedTest

__all__ = ["ALPHA", "Holm", "Decision", "Call", "holm", "decide", "judge"]

#: Two-sided significance level of the primary comparison and family-wise level of the others.
ALPHA = 0.05


@dataclass(frozen=True)
class Holm:
    """Holm's step-down procedure over the last axis.

    Attributes:
        reject: ``(..., m)`` rejected hypotheses.
        adjusted: ``(..., m)`` Holm-adjusted p-values (``reject == adjusted <= alpha``).
        level: ``(..., m)`` the level each hypothesis was tested at: ``alpha / (m - i + 1)`` for the
            i-th smallest p-value up to the first one not rejected, that step's level after it.
    """

    reject: np.ndarray
    adjusted: np.ndarray
    level: np.ndarray


def holm(p_values: np.ndarray | Sequence[float], alpha: float = ALPHA) -> Holm:
    """Holm's step-down procedure on the last axis of ``p_values`` (NaN counts as 1: never rejected).

    Args:
        p_values: ``(..., m)`` p-values, m >= 0.
        alpha: family-wise level, in (0, 1).

    Returns:
        :class:`Holm` arrays of the shape of ``p_values``.
    """
    p = np.nan_to_num(np.asarray(p_values, dtype=np.float64), nan=1.0)
    m = p.shape[-1]
    if m == 0:
        return Holm(np.zeros(p.shape, bool), p.copy(), p.copy())
    order = np.argsort(p, axis=-1, kind="stable")
    ranked = np.take_along_axis(p, order, axis=-1)
    factors = m - np.arange(m)  # m, m-1, ..., 1
    thresholds = alpha / factors
    passed = np.cumprod(ranked <= thresholds, axis=-1).astype(bool)
    adjusted = np.maximum.accumulate(np.minimum(1.0, factors * ranked), axis=-1)
    stop = passed.sum(axis=-1, keepdims=True)  # the first step not rejected (m: all rejected)
    level = thresholds[np.minimum(np.arange(m), np.minimum(stop, m - 1))]
    inverse = np.argsort(order, axis=-1, kind="stable")
    back = lambda x: np.take_along_axis(x, inverse, axis=-1)  # noqa: E731 - undo the sort
    return Holm(back(passed), back(adjusted), back(level))


@dataclass(frozen=True)
class Decision:
    """The verdict's decisions for one or many experiments (leading axes).

    Attributes:
        primary: ``(...)`` the primary comparison rejects at ``alpha``.
        family: ``(..., m)`` the family's rejections (only where the primary rejects).
        holm: Holm's procedure on the family, as if it were tested regardless of the primary.
        uncorrected_primary: ``(...)`` the primary's p-value is at most ``alpha`` (same as ``primary``).
        uncorrected_family: ``(..., m)`` each family p-value at most ``alpha``, on its own.
    """

    primary: np.ndarray
    family: np.ndarray
    holm: Holm
    uncorrected_primary: np.ndarray
    uncorrected_family: np.ndarray

    @property
    def any_claim(self) -> np.ndarray:
        """``(...)`` the verdict calls something better or worse."""
        return self.primary | self.family.any(axis=-1)

    @property
    def any_uncorrected(self) -> np.ndarray:
        """``(...)`` some comparison's unadjusted interval excludes 0 (the uncorrected rule)."""
        return self.uncorrected_primary | self.uncorrected_family.any(axis=-1)


def decide(primary_p: np.ndarray | float, family_p: np.ndarray | Sequence[float], alpha: float = ALPHA) -> Decision:
    """The verdict's decisions from the p-values: the primary at ``alpha``, then the gated Holm family.

    Args:
        primary_p: ``(...)`` the primary comparison's p-value (NaN: not computed, not rejected).
        family_p: ``(..., m)`` every other comparison's p-value.
        alpha: the level of the primary and the family-wise level of the family.

    Returns:
        The :class:`Decision`.
    """
    p0 = np.nan_to_num(np.asarray(primary_p, dtype=np.float64), nan=1.0)
    pf = np.nan_to_num(np.asarray(family_p, dtype=np.float64), nan=1.0)
    primary = p0 <= alpha
    h = holm(pf, alpha)
    return Decision(primary, h.reject & primary[..., None], h, primary, pf <= alpha)


@dataclass(frozen=True)
class Call:
    """One comparison as the verdict states it.

    Attributes:
        role: ``"primary"`` or ``"family"``.
        tested: False for a family comparison whose gate stayed closed (the primary did not reject).
        reject: the test rejects (at ``level``).
        level: the two-sided level it was tested at (``alpha``, or its Holm level).
        p_value: the unadjusted p-value (NaN: not computed).
        adjusted_p: Holm-adjusted p-value for a family comparison, else the p-value.
        interval: the ``1 - level`` interval of the mean difference ((NaN, NaN) without a test).
        mdd: the smallest difference detectable with 80% power at ``level`` (inf: unreachable with these cases).
    """

    role: str
    tested: bool
    reject: bool
    level: float
    p_value: float
    adjusted_p: float
    interval: tuple[float, float]
    mdd: float


def judge(primary: PairedTest | None, family: Sequence[PairedTest], alpha: float = ALPHA) -> tuple[Call | None, list[Call]]:
    """The verdict on one experiment: :func:`decide` on the tests' p-values, with intervals at each level.

    Args:
        primary: the primary comparison's test (None: it could not be computed; nothing is tested then).
        family: every other comparison's test.
        alpha: see :func:`decide`.

    Returns:
        ``(the primary's Call or None, one Call per family test, in order)``.
    """
    p0 = primary.p_value if primary is not None else math.nan
    decision = decide(p0, [t.p_value for t in family], alpha)
    gate = bool(decision.primary)
    first = None
    if primary is not None:
        first = Call("primary", True, gate, alpha, p0, p0, primary.interval(alpha), primary.mdd(alpha))
    calls = []
    for i, test in enumerate(family):
        level = float(decision.holm.level[i])
        calls.append(Call("family", gate, bool(decision.family[i]), level, test.p_value,
                          float(decision.holm.adjusted[i]) if test.testable else math.nan,
                          test.interval(level) if gate else (math.nan, math.nan), test.mdd(level)))
    return first, calls

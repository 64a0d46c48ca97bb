"""The report's numbers, computed from the collected runs only: Table 1, paired comparisons, cost.

Aggregation rules (the report states them too):

* Table 1: for each run, the mean over its scored cases; then mean and sample standard deviation
  (``ddof=1``) over seeds (over repeats for a system without a seed: nnU-Net's ``repeat<k>`` runs;
  "seed" below means either). The "mean" column averages a run's per-class means first. A distance
  penalised because the class was empty in exactly one of prediction and label (see
  :mod:`beseg.metrics`) is a number and enters the mean; an undefined (NaN) value is skipped.
  Both are counted per class and metric. Failed cases have no value and are counted per run.
* Paired comparisons: each case's value is averaged over a system's seeds, then paired by case
  with the baseline's, and tested by the sign-flip test with the seeds' own variance added
  (:func:`beseg.report.stats.paired_test`). The ``"mean"`` column (the primary comparison's mean
  foreground value) averages each case's classes first (NaN when a class has none).
* Cost: per run the median step time and median loss time of its training steps, and the share
  of the total step time spent in the loss; then the mean over seeds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from beseg.metrics import DISTANCE_METRICS, METRIC_NAMES
from beseg.report.collect import Results, Run
from beseg.report.stats import PairedComparison, PairedTest, SignFlips, paired_test

__all__ = [
    "MEAN_COLUMN", "Cell", "RunMean", "CostRow", "ComparisonRow", "run_mean", "table1_columns", "table1",
    "seed_averaged_cases", "paired_differences", "penalised_cases", "case_values", "comparison", "comparisons", "cost",
    "is_penalised",
]

#: Table 1's column averaging over classes, present when a task has more than one class.
MEAN_COLUMN = "mean"


@dataclass(frozen=True)
class Cell:
    """One Table 1 entry.

    Attributes:
        mean: mean over seeds of the per-run case means.
        std: sample standard deviation over seeds (NaN with one seed).
        n_seeds: runs that had a value.
        n_undefined: case values (over all seeds) that were NaN and skipped.
        n_penalised: case values (over all seeds) that are the fixed distance penalty (a class
            empty in exactly one mask); they are in the mean.
        n_values: case values (over all seeds) in the mean.
    """

    mean: float
    std: float
    n_seeds: int
    n_undefined: int
    n_penalised: int = 0
    n_values: int = 0


class RunMean(NamedTuple):
    """A run's mean of one metric over its cases, and what went into it."""

    mean: float
    n_values: int
    n_undefined: int
    n_penalised: int


@dataclass(frozen=True)
class ComparisonRow:
    """A system against the baseline on one class and metric.

    Attributes:
        system: the compared system.
        cls: the class, or :data:`MEAN_COLUMN` (each case's mean over the classes).
        metric: the metric.
        result: the unadjusted summary (95% interval, p-value, power).
        penalised: paired cases whose value (in any seed) is a distance penalty, for the system
            and for the baseline.
        test: the test itself, for the verdict's intervals at other levels.
    """

    system: str
    cls: str
    metric: str
    result: PairedComparison
    penalised: tuple[int, int] = (0, 0)
    test: PairedTest | None = None


@dataclass(frozen=True)
class CostRow:
    """Training cost of one system, means over its seeds.

    Attributes:
        system: system name.
        n_runs: runs with training-log entries.
        step_s: median over the run's "train" log entries of their ``step_time_s`` (seconds per
            training step; an entry may itself summarise an epoch).
        loss_s: the same for ``loss_time_s`` (seconds per step spent computing the loss).
        loss_share: sum of ``loss_time_s`` / sum of ``step_time_s`` over entries with both, in [0, 1].
        n_steps: "train" log entries with a finite step time, summed over runs.
    """

    system: str
    n_runs: int
    step_s: float
    loss_s: float
    loss_share: float
    n_steps: int


def _nanmean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else math.nan


def is_penalised(row: dict[str, Any], metric: str) -> bool:
    """True when ``row[metric]`` is the fixed distance penalty of a class empty in exactly one mask."""
    return (metric in DISTANCE_METRICS and row.get("empty_in") in ("prediction", "label")
            and not math.isnan(row[metric]))


def run_mean(run: Run, column: str, metric: str) -> RunMean:
    """A run's mean of ``metric`` over cases for one class (or the class average ``"mean"``).

    Returns:
        The mean (NaN when no case has a value; for ``"mean"`` the mean of the per-class means)
        and the counts of values used, NaN values skipped and penalised values used.
    """
    if column == MEAN_COLUMN:
        parts = [run_mean(run, cls, metric) for cls in run.classes]
        return RunMean(_nanmean([p.mean for p in parts]), sum(p.n_values for p in parts),
                       sum(p.n_undefined for p in parts), sum(p.n_penalised for p in parts))
    rows = [r for r in run.per_case if r["class"] == column]
    values = [r[metric] for r in rows]
    undefined = sum(math.isnan(v) for v in values)
    return RunMean(_nanmean(values), len(values) - undefined, undefined, sum(is_penalised(r, metric) for r in rows))


def table1_columns(results: Results) -> list[str]:
    """The classes, plus :data:`MEAN_COLUMN` when there is more than one."""
    return results.classes + ([MEAN_COLUMN] if len(results.classes) > 1 else [])


def table1(results: Results) -> dict[str, dict[str, dict[str, Cell]]]:
    """``table[system][column][metric]`` = :class:`Cell` over the system's seeds."""
    table: dict[str, dict[str, dict[str, Cell]]] = {}
    for system in results.systems:
        runs = results.runs_of(system)
        table[system] = {}
        for column in table1_columns(results):
            table[system][column] = {}
            for metric in METRIC_NAMES:
                per_run = [run_mean(r, column, metric) for r in runs]
                means = [p.mean for p in per_run if not math.isnan(p.mean)]
                table[system][column][metric] = Cell(
                    mean=float(np.mean(means)) if means else math.nan,
                    std=float(np.std(means, ddof=1)) if len(means) > 1 else math.nan,
                    n_seeds=len(means),
                    n_undefined=sum(p.n_undefined for p in per_run),
                    n_penalised=sum(p.n_penalised for p in per_run),
                    n_values=sum(p.n_values for p in per_run),
                )
    return table


def case_values(run: Run, column: str, metric: str) -> dict[str, float]:
    """``{case: value}`` of one run, for a class or :data:`MEAN_COLUMN` (the mean over the classes; NaN when
    a class has no value for the case)."""
    if column != MEAN_COLUMN:
        return run.values(column, metric)
    per_class = [run.values(cls, metric) for cls in run.classes]
    cases = sorted(set.intersection(*(set(v) for v in per_class))) if per_class else []
    return {c: float(np.mean([v[c] for v in per_class])) for c in cases}


def seed_averaged_cases(results: Results, system: str, cls: str, metric: str) -> dict[str, float]:
    """``{case: value}`` averaged over the system's seeds (NaN seeds skipped; NaN if all are)."""
    by_case: dict[str, list[float]] = {}
    for run in results.runs_of(system):
        for case, value in case_values(run, cls, metric).items():
            by_case.setdefault(case, []).append(value)
    return {case: _nanmean(v) for case, v in sorted(by_case.items())}


def penalised_cases(results: Results, system: str, cls: str, metric: str) -> set[str]:
    """The cases whose value of ``metric`` is a distance penalty in at least one of the system's runs
    (in at least one class for :data:`MEAN_COLUMN`)."""
    return {r["case"] for run in results.runs_of(system) for r in run.per_case
            if (cls == MEAN_COLUMN or r["class"] == cls) and is_penalised(r, metric)}


def paired_differences(results: Results, system: str, baseline: str, cls: str, metric: str) -> dict[str, float]:
    """``{case: system - baseline}`` over the cases both scored with a finite value (seed-averaged)."""
    a = seed_averaged_cases(results, system, cls, metric)
    b = seed_averaged_cases(results, baseline, cls, metric)
    return {c: a[c] - b[c] for c in sorted(set(a) & set(b)) if math.isfinite(a[c]) and math.isfinite(b[c])}


def _run_matrix(results: Results, system: str, cls: str, metric: str, cases: list[str]) -> np.ndarray:
    """``(runs, cases)`` values of the system's runs on ``cases`` (NaN where a run has none)."""
    rows = [case_values(run, cls, metric) for run in results.runs_of(system)]
    return np.array([[row.get(c, math.nan) for c in cases] for row in rows], dtype=float).reshape(len(rows), len(cases))


def comparison(results: Results, system: str, baseline: str, cls: str, metric: str, seed: int = 0,
               flips: dict[int, SignFlips] | None = None) -> ComparisonRow:
    """``system`` against ``baseline`` on one class (or :data:`MEAN_COLUMN`) and metric, paired by case.

    Cases evaluated by only one of the two systems are left out (and counted in the note).

    Args:
        results: the collected runs.
        system: the compared system.
        baseline: the baseline.
        cls: a class or :data:`MEAN_COLUMN`.
        metric: the metric.
        seed: seed of the random sign patterns.
        flips: sign patterns shared between comparisons (``{n: SignFlips}``, filled here).
    """
    a = {c for run in results.runs_of(system) for c in case_values(run, cls, metric)}
    b = {c for run in results.runs_of(baseline) for c in case_values(run, cls, metric)}
    common = sorted(a & b)
    test = paired_test(_run_matrix(results, system, cls, metric, common),
                       _run_matrix(results, baseline, cls, metric, common), seed=seed, flips=flips)
    unpaired = len(a ^ b)
    if unpaired:
        test.note = "; ".join(filter(None, [test.note, f"{unpaired} case(s) evaluated by only one system left out"]))
    sa, sb = seed_averaged_cases(results, system, cls, metric), seed_averaged_cases(results, baseline, cls, metric)
    paired = {c for c in common if math.isfinite(sa[c]) and math.isfinite(sb[c])}
    penalised = (len(penalised_cases(results, system, cls, metric) & paired),
                 len(penalised_cases(results, baseline, cls, metric) & paired))
    return ComparisonRow(system, cls, metric, test.summary(), penalised, test)


def comparisons(results: Results, baseline: str, seed: int = 0,
                flips: dict[int, SignFlips] | None = None) -> list[ComparisonRow]:
    """Every other system against ``baseline``, per class and metric, paired by case (:func:`comparison`).

    Returns [] when the baseline has no run.
    """
    if baseline not in results.systems:
        return []
    flips = flips if flips is not None else {}
    return [comparison(results, system, baseline, cls, metric, seed, flips)
            for system in results.systems if system != baseline
            for cls in results.classes for metric in METRIC_NAMES]


def cost(results: Results) -> list[CostRow]:
    """Training time per step and the share spent in the loss, per system (from ``metrics.jsonl``)."""
    rows = []
    for system in results.systems:
        step, loss, share, n_steps = [], [], [], 0
        for run in results.runs_of(system):
            pairs = [(float(e["step_time_s"]), float(e.get("loss_time_s", math.nan))) for e in run.train
                     if isinstance(e.get("step_time_s"), (int, float)) and math.isfinite(e["step_time_s"])]
            if not pairs:
                continue
            st = np.array([p[0] for p in pairs])
            lt = np.array([p[1] for p in pairs])
            step.append(float(np.median(st)))
            loss.append(float(np.nanmedian(lt)) if np.isfinite(lt).any() else math.nan)
            ok = np.isfinite(lt)
            share.append(float(lt[ok].sum() / st[ok].sum()) if ok.any() and st[ok].sum() > 0 else math.nan)
            n_steps += len(pairs)
        rows.append(CostRow(system, len(step), _nanmean(step), _nanmean(loss), _nanmean(share), n_steps))
    return rows

"""The report's numbers, computed from the collected runs only: Table 1, paired comparisons, cost.

Aggregation rules (the report states them too):

* Table 1: for each run, the mean over validation cases (NaN distances, from a class missing in the
  prediction or the label, are skipped and counted); then mean and sample standard deviation
  (``ddof=1``) over seeds. The "mean" column averages a run's per-class means first.
* Paired comparisons: each case's value is averaged over a system's seeds, then paired by case
  with the baseline's (:func:`beseg.report.stats.paired_comparison`).
* Cost: per run the median step time and median loss time of its training steps, and the share
  of the total step time spent in the loss; then the mean over seeds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from beseg.metrics import METRIC_NAMES
from beseg.report.collect import Results, Run
from beseg.report.stats import PairedComparison, paired_comparison

__all__ = [
    "MEAN_COLUMN", "Cell", "CostRow", "ComparisonRow", "run_mean", "table1_columns", "table1",
    "seed_averaged_cases", "comparisons", "cost",
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
    """

    mean: float
    std: float
    n_seeds: int
    n_undefined: int


@dataclass(frozen=True)
class ComparisonRow:
    """A system against the baseline on one class and metric."""

    system: str
    cls: str
    metric: str
    result: PairedComparison


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


def run_mean(run: Run, column: str, metric: str) -> tuple[float, int]:
    """A run's mean of ``metric`` over cases for one class (or the class average ``"mean"``).

    Returns:
        (mean, number of NaN case values skipped). NaN when no case has a value.
    """
    if column == MEAN_COLUMN:
        parts = [run_mean(run, cls, metric) for cls in run.classes]
        return _nanmean([p[0] for p in parts]), sum(p[1] for p in parts)
    values = list(run.values(column, metric).values())
    return _nanmean(values), sum(math.isnan(v) for v in values)


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
                means = [m for m, _ in per_run if not math.isnan(m)]
                table[system][column][metric] = Cell(
                    mean=float(np.mean(means)) if means else math.nan,
                    std=float(np.std(means, ddof=1)) if len(means) > 1 else math.nan,
                    n_seeds=len(means),
                    n_undefined=sum(n for _, n in per_run),
                )
    return table


def seed_averaged_cases(results: Results, system: str, cls: str, metric: str) -> dict[str, float]:
    """``{case: value}`` averaged over the system's seeds (NaN seeds skipped; NaN if all are)."""
    by_case: dict[str, list[float]] = {}
    for run in results.runs_of(system):
        for case, value in run.values(cls, metric).items():
            by_case.setdefault(case, []).append(value)
    return {case: _nanmean(v) for case, v in sorted(by_case.items())}


def comparisons(results: Results, baseline: str, seed: int = 0) -> list[ComparisonRow]:
    """Every other system against ``baseline``, per class and metric, paired by case.

    Cases evaluated by only one of the two systems are left out (and counted in the note).
    Returns [] when the baseline has no run.
    """
    if baseline not in results.systems:
        return []
    rows = []
    for system in results.systems:
        if system == baseline:
            continue
        for cls in results.classes:
            for metric in METRIC_NAMES:
                a = seed_averaged_cases(results, system, cls, metric)
                b = seed_averaged_cases(results, baseline, cls, metric)
                common = sorted(set(a) & set(b))
                result = paired_comparison([a[c] for c in common], [b[c] for c in common], seed=seed)
                unpaired = len(set(a) ^ set(b))
                if unpaired:
                    extra = f"{unpaired} case(s) evaluated by only one system left out"
                    result = replace(result, note="; ".join(filter(None, [result.note, extra])))
                rows.append(ComparisonRow(system, cls, metric, result))
    return rows


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

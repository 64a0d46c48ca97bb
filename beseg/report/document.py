"""Assemble the comparison report's content (blocks of text, tables and figures) from collected runs.

Every number shown comes from :mod:`beseg.report.tables`, which reads only the run folders; the
paper's values come from :mod:`beseg.report.paper` and are labelled as the paper's.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from beseg.errors import BesegError
from beseg.metrics import HIGHER_IS_BETTER, METRIC_NAMES
from beseg.report import figures, tables
from beseg.report.collect import Results
from beseg.report.dataset import case_files
from beseg.report.paper import PAPER_SOURCE, PAPER_TABLE1, msd_task_key, paper_dice
from beseg.report.render import Block, Figure, Heading, Paragraph, Table
from beseg.report.stats import PairedComparison

__all__ = ["build_document", "format_value", "format_cell"]

_LABELS = {"dice": "Dice", "hd95_mm": "HD95 (mm)", "asd_mm": "ASD (mm)", "nsd": "NSD"}
_DIGITS = {"dice": 3, "hd95_mm": 2, "asd_mm": 2, "nsd": 3}
N_RESAMPLES = 10_000


def format_value(metric: str, value: float, signed: bool = False) -> str:
    """A metric value with the report's precision (Dice/NSD 3 decimals, mm 2); NaN gives "n/a"."""
    if math.isnan(value):
        return "n/a"
    return f"{value:{'+' if signed else ''}.{_DIGITS[metric]}f}"


def format_cell(metric: str, cell: tables.Cell) -> str:
    """``mean ± std`` over seeds; the std is left out with one seed, and skipped NaNs are counted."""
    text = format_value(metric, cell.mean)
    if not math.isnan(cell.std):
        text += f" ± {format_value(metric, cell.std)}"
    if cell.n_undefined:
        text += f" ({cell.n_undefined} undef.)"
    return text


def _seeds(results: Results, system: str) -> str:
    return ",".join(str(r.seed) for r in results.runs_of(system))


def _table1_blocks(results: Results) -> list[Block]:
    t = tables.table1(results)
    columns = tables.table1_columns(results)
    task_key = msd_task_key(results.task)
    header = ["system", "seeds", *(f"{c} Dice" for c in columns)]
    if task_key:
        header.append(f"paper {task_key} Dice")
    rows = []
    for system in results.systems:
        row = [system, _seeds(results, system), *(format_cell("dice", t[system][c]["dice"]) for c in columns)]
        if task_key:
            ref = paper_dice(system, results.task)
            row.append(f"{ref[1]:.2f}" if ref else "")
        rows.append(tuple(row))
    notes = [
        "Each run's Dice is its mean over validation cases; the table shows the mean ± sample standard "
        "deviation (ddof=1) of those run means over seeds.",
    ]
    if len(columns) > len(results.classes):
        notes.append("'mean' averages each run's per-class means before averaging over seeds.")
    blocks: list[Block] = [
        Heading("Table 1: Dice"),
        Table(tuple(header), tuple(rows), caption=f"Validation Dice on {results.task}", notes=tuple(notes)),
    ]
    if task_key:
        blocks.append(Table(
            ("paper system", "beseg system", f"paper {task_key} Dice"),
            tuple((r.label, r.system, f"{r.dice[task_key]:.2f}") for r in PAPER_TABLE1),
            caption="The paper's Table 1 (for orientation, not reproduced conditions)",
            notes=(f"Source: {PAPER_SOURCE}.",),
        ))
    boundary = [m for m in METRIC_NAMES if m != "dice"]
    header = ["system", *(f"{c} {_LABELS[m]}" for c in columns for m in boundary)]
    rows = [tuple([s, *(format_cell(m, t[s][c][m]) for c in columns for m in boundary)]) for s in results.systems]
    tol = results.runs[0].summary.get("nsd_tolerance_mm")
    blocks.append(Table(
        tuple(header), tuple(rows), caption="Boundary metrics (mean ± std over seeds)",
        notes=(
            "HD95: the larger of the two directed 95th-percentile boundary distances; ASD: mean of both "
            "directions' boundary distances; NSD: share of boundary voxels within the tolerance"
            + (f" ({tol} mm)" if tol is not None else "") + " of the other boundary. Distances in mm.",
            "'undef.' counts case values left out because the class was empty in exactly one of "
            "prediction and label (no distance exists).",
        ),
    ))
    return blocks


def _ci(metric: str, r: PairedComparison) -> str:
    if math.isnan(r.ci_low):
        return "n/a"
    return f"[{format_value(metric, r.ci_low, True)}, {format_value(metric, r.ci_high, True)}]"


def _comparison_blocks(results: Results, baseline: str, seed: int) -> list[Block]:
    blocks: list[Block] = [Heading(f"Paired comparison against {baseline}")]
    rows = tables.comparisons(results, baseline, seed=seed)
    if not rows:
        why = (f"the baseline {baseline} has no run in this results folder" if baseline not in results.systems
               else f"there is no other system to compare with {baseline}")
        return blocks + [Paragraph(f"Not computed: {why}.")]
    n = max(r.result.n for r in rows)
    blocks.append(Paragraph(
        f"Per validation case, each system's value is averaged over its seeds and the baseline's is "
        f"subtracted (system − {baseline}). Shown: the mean difference, a 95% percentile bootstrap "
        f"interval ({N_RESAMPLES} resamples of the cases, seed {seed}) and the two-sided paired Wilcoxon "
        f"signed-rank p-value. Better is a positive difference for Dice and NSD, a negative one for "
        f"HD95 and ASD. With {n} cases the smallest possible exact p-value is {2 / 2 ** n:.3g}; an interval "
        f"that contains 0 means the data do not show a difference."
    ))
    body = []
    for r in rows:
        better = ""
        res = r.result
        if not math.isnan(res.ci_low) and (res.ci_low > 0 or res.ci_high < 0):
            better = "better" if (res.ci_low > 0) == HIGHER_IS_BETTER[r.metric] else "worse"
        body.append((r.system, r.cls, _LABELS[r.metric], str(res.n), format_value(r.metric, res.mean_diff, True),
                     _ci(r.metric, res), "n/a" if math.isnan(res.p_value) else f"{res.p_value:.3g}",
                     better, res.note))
    blocks.append(Table(("system", "class", "metric", "cases", "mean diff.", "95% CI", "Wilcoxon p",
                         "CI excludes 0", "note"), tuple(body)))
    return blocks


def _cost_blocks(results: Results) -> list[Block]:
    rows = []
    for c in tables.cost(results):
        if c.n_runs == 0:
            rows.append((c.system, "0", "0", "n/a", "n/a", "n/a"))
            continue
        rows.append((c.system, str(c.n_runs), str(c.n_steps), f"{c.step_s:.3f}",
                     "n/a" if math.isnan(c.loss_s) else f"{c.loss_s * 1000:.1f}",
                     "n/a" if math.isnan(c.loss_share) else f"{100 * c.loss_share:.1f}"))
    return [
        Heading("Cost"),
        Table(("system", "runs", "train log entries", "median step (s)", "median loss (ms)", "loss share (%)"),
              tuple(rows), caption="Training time per step and the share spent computing the loss",
              notes=("Per run: median over its 'train' entries of metrics.jsonl (step_time_s, loss_time_s); "
                     "loss share = sum of loss times / sum of step times. Then the mean over runs. Timings are from the machine that trained.",)),
    ]


def _overlay_cases(results: Results, data: dict, baseline: str, be_system: str) -> list[figures.OverlayCase]:
    """Best, median and worst case by the Dice difference be_system − baseline (first class)."""
    systems = [s for s in (baseline, be_system) if s in results.systems] or results.systems[:1]
    cls = results.classes[0]
    first = systems[0]
    score = tables.seed_averaged_cases(results, first, cls, "dice")
    if len(systems) == 2:
        other = tables.seed_averaged_cases(results, systems[1], cls, "dice")
        score = {c: other[c] - score[c] for c in score if c in other}
    ranked = [c for c in sorted(score, key=lambda c: (-np.nan_to_num(score[c], nan=-np.inf), c)) if c in data]
    picks: list[tuple[str, str]] = []
    for why, idx in (("largest gain", 0), ("median", len(ranked) // 2), ("largest loss", len(ranked) - 1)):
        if ranked and ranked[idx] not in (p[0] for p in picks):
            picks.append((ranked[idx], why))
    out = []
    for case, why in picks:
        preds = {}
        for system in systems:
            run = next((r for r in results.runs_of(system) if r.prediction_path(case).is_file()), None)
            if run is not None:
                preds[run.name] = run.prediction_path(case)
        label = f"{case}\n{why} in {cls} Dice\n({' − '.join(systems[::-1])})" if len(systems) == 2 else case
        out.append(figures.OverlayCase(label, data[case][0], data[case][1], preds))
    return out


def _figure_blocks(results: Results, data_dir: Path | None, fig_dir: Path, baseline: str,
                   be_system: str, notes: list[str]) -> list[Block]:
    blocks: list[Block] = [Heading("Figures")]
    try:
        blocks.append(Figure(figures.learning_curve_figure(results, fig_dir / "learning_curves.png"),
                             "Learning curves: training loss and validation mean Dice per step; one line "
                             "per seed, one colour per system."))
    except (OSError, ValueError) as exc:
        notes.append(f"learning curves not drawn: {exc}")
    if data_dir is None:
        notes.append("no dataset folder given: Figure 1 panels not drawn")
        return blocks
    try:
        data = case_files(data_dir)
        cases = sorted({row["case"] for r in results.runs for row in r.per_case} & set(data))
        if not cases:
            raise ValueError(f"none of the evaluated cases is listed in {Path(data_dir) / 'dataset.json'}")
        blocks.append(Figure(figures.filter_figure(data[cases[0]][1], fig_dir / "figure1_filter.png"),
                             f"Figure 1 (a-c) from the label of {cases[0]} (foreground, cropped, resampled to "
                             f"1 mm): (a) a profile of the mask and of the BE filter's output along the dashed "
                             f"line; (b) the mask; (c) the filtered mask, non-zero only near the boundary."))
        overlay = _overlay_cases(results, data, baseline, be_system)
        blocks.append(Figure(figures.contour_figure(overlay, fig_dir / "figure1_contours.png"),
                             "Figure 1 (d): ground truth and predicted contours on the axial slice with the "
                             "most ground truth; cases chosen by the rule in each title."))
    except (BesegError, OSError, ValueError) as exc:
        notes.append(f"Figure 1 not drawn: {exc}")
    return blocks


def build_document(results: Results, data_dir: str | Path | None, fig_dir: str | Path,
                   baseline: str = "segresnet_dice", be_system: str = "segresnet_be",
                   seed: int = 0) -> list[Block]:
    """The whole report as blocks, drawing the figures into ``fig_dir`` on the way.

    Args:
        results: the collected runs.
        data_dir: the dataset folder (MSD layout) for the figure images; None skips Figure 1.
        fig_dir: folder for the PNG figures (created).
        baseline: system every other system is compared with.
        be_system: system whose predictions the contour figure shows beside the baseline's.
        seed: bootstrap seed.

    Returns:
        The blocks, ready for :mod:`beseg.report.render`. Problems drawing a figure become notes in
        the report rather than errors.
    """
    notes = list(results.notes)
    split = results.runs[0].summary.get("split", "?")
    n_cases = len({row["case"] for r in results.runs for row in r.per_case})
    body: list[Block] = []
    body += _table1_blocks(results)
    body += _comparison_blocks(results, baseline, seed)
    body += _cost_blocks(results)
    body += _figure_blocks(results, Path(data_dir) if data_dir is not None else None, Path(fig_dir),
                           baseline, be_system, notes)
    head: list[Block] = [
        Heading(f"beseg comparison report: {results.task}", level=1),
        Paragraph(f"Results folder {results.root}; {len(results.runs)} runs of {len(results.systems)} systems; "
                  f"{n_cases} {split} cases; classes: {', '.join(results.classes)}.",
                  tuple(f"{s}: seeds {_seeds(results, s)}" for s in results.systems)),
    ]
    if notes:
        head += [Heading("Notes"), Paragraph("Problems found while reading the runs and drawing figures:",
                                             tuple(notes))]
    return head + body

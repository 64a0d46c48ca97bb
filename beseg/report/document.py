"""Assemble the comparison report's content (blocks of text, tables and figures) from collected runs.

Every number shown comes from :mod:`beseg.report.tables`, which reads only the run folders (or the
scored prediction folders); the paper's values come from :mod:`beseg.report.paper` and are
labelled as the paper's. The report's first lines say how the numbers were made (the protocol
recorded in each ``summary.json``), and every table says on which cases, how many were scored,
and how many values were penalised or undefined.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from beseg.data.msd import MSDTask
from beseg.errors import BesegError
from beseg.experiment.layout import RUN_UNITS
from beseg.experiment.primary import Primary
from beseg.metrics import DISTANCE_METRICS, HIGHER_IS_BETTER, METRIC_NAMES
from beseg.report import figures, tables, verdict
from beseg.report.collect import Results, Run
from beseg.report.dataset import case_files
from beseg.report.paper import PAPER_SOURCE, PAPER_TABLE1, msd_task_key, paper_dice
from beseg.report.render import Block, Figure, Heading, Paragraph, Table
from beseg.report.stats import MAX_PATTERNS

__all__ = ["build_document", "direction", "format_value", "format_cell", "protocol_statement", "settings_text",
           "split_noun", "primary_row"]

_LABELS = {"dice": "Dice", "hd95_mm": "HD95 (mm)", "asd_mm": "ASD (mm)", "nsd": "NSD"}
_NAMES = {"dice": "Dice", "hd95_mm": "HD95", "asd_mm": "ASD", "nsd": "NSD"}
_DIGITS = {"dice": 3, "hd95_mm": 2, "asd_mm": 2, "nsd": 3}
#: ``summary.json`` ``split`` -> how captions name the cases.
_SPLIT_NOUNS = {"test": "test", "val": "validation", "oof": "out-of-fold", "train": "training", "all": "all-case"}

#: ``(image or None, label)`` per case id, for the figures.
CaseFiles = Mapping[str, tuple[Path | None, Path]]


def format_value(metric: str, value: float, signed: bool = False) -> str:
    """A metric value with the report's precision (Dice/NSD 3 decimals, mm 2); NaN gives "n/a"."""
    if math.isnan(value):
        return "n/a"
    if math.isinf(value):
        return ("+" if signed and value > 0 else "") + ("inf" if value > 0 else "-inf")
    return f"{value:{'+' if signed else ''}.{_DIGITS[metric]}f}"


def format_cell(metric: str, cell: tables.Cell) -> str:
    """``mean ± std`` over seeds; the std is left out with one seed; penalised and skipped NaN values are counted."""
    text = format_value(metric, cell.mean)
    if not math.isnan(cell.std):
        text += f" ± {format_value(metric, cell.std)}"
    counts = [f"{cell.n_penalised} pen." if cell.n_penalised else "", f"{cell.n_undefined} undef." if cell.n_undefined else ""]
    if any(counts):
        text += f" ({', '.join(c for c in counts if c)})"
    return text


# --------------------------------------------------------------------------- how the numbers were made


def _field(results: Results, key: str) -> list:
    """The distinct values of a summary key over the runs, in run order (None where absent)."""
    return list(dict.fromkeys(r.summary.get(key) for r in results.runs))


def split_noun(results: Results) -> str | None:
    """``test``, ``validation``, ``out-of-fold``... for the runs' recorded split; None if unknown or mixed."""
    splits = _field(results, "split")
    return _SPLIT_NOUNS.get(splits[0]) if len(splits) == 1 and isinstance(splits[0], str) else None


def protocol_statement(results: Results) -> tuple[str, bool]:
    """The report's opening sentence on how its numbers were made, and whether they are optimistic.

    Read from each run's ``summary.json`` keys ``protocol``, ``split``, ``folds`` and
    ``selection``; summaries without them give "unknown protocol".
    """
    protocols = _field(results, "protocol")
    if len(protocols) > 1:
        listing = "; ".join(f"{r.name}: {r.summary.get('protocol') or 'unknown'}" for r in results.runs)
        return (f"Mixed protocols ({listing}): these numbers are not comparable with each other, and the runs made "
                "on the cases that chose their checkpoint are optimistic.", True)
    protocol = protocols[0]
    selections = [s for s in _field(results, "selection") if s]
    if len(selections) > 1:  # e.g. beseg's best.pt beside nnU-Net's final checkpoint: say whose is whose
        by_selection: dict[str, list[str]] = {}
        for r in results.runs:
            systems = by_selection.setdefault(str(r.summary.get("selection") or "not recorded"), [])
            systems += [] if r.system in systems else [r.system]
        selections = [f"{', '.join(systems)}: {s}" for s, systems in by_selection.items()]
    selection = f" (checkpoint: {'; '.join(map(str, selections))})" if selections else ""
    if protocol == "heldout":
        return ("Protocol: heldout. Every number is on held-out test cases that neither training nor the choice "
                f"of the checkpoint saw{selection}.", False)
    if protocol == "cv":
        folds = [f for f in _field(results, "folds") if f]
        k = f"{folds[0]}-fold " if len(folds) == 1 else ""
        return (f"Protocol: cv ({k}cross-validation). Every case is scored once, out of fold, by the model that "
                f"neither trained on it nor chose its checkpoint with it{selection}.", False)
    if protocol == "paper":
        return ("Protocol: paper. OPTIMISTIC: the numbers are on the validation cases that also chose the "
                f"checkpoint{selection}, as in the paper; selection on the reported cases biases every number "
                "upward, by different amounts per system. Use --protocol heldout (or --folds K) for unbiased numbers.",
                True)
    if results.kind == "predictions":
        return ("Unknown protocol: these are prediction folders scored by beseg score, and how their models were "
                "trained and selected is not recorded (beseg score --protocol records it). If a checkpoint or any "
                "setting was chosen on these cases, the numbers are optimistic.", False)
    return ("Unknown protocol: the evaluations do not record how their cases were chosen (made by an older beseg). "
            "If these are the validation cases that chose best.pt, the numbers are optimistic.", False)


def _cases_cell(results: Results, system: str) -> str:
    """Scored cases per run (a range over seeds), and the failed ones."""
    runs = results.runs_of(system)
    counts = sorted({len(r.cases) for r in runs})
    text = str(counts[0]) if len(counts) == 1 else f"{counts[0]}–{counts[-1]}"
    failed = sum(len(r.failed) for r in runs)
    return text + (f" ({failed} failed)" if failed else "")


def _over(results: Results) -> str:
    """What the runs of a system are told apart by, as the captions say it: ``seeds``, ``repeats`` or both."""
    return " / ".join(f"{u}s" for u in results.units()) or "seeds"


def _run_numbers(results: Results, system: str, labelled: bool = True) -> str:
    """``seeds 0,1`` or ``repeats 0,1`` (both, ``; ``-joined, for a system with both); ``0,1`` unlabelled."""
    runs = results.runs_of(system)
    numbers = {u: ",".join(str(r.seed) for r in runs if r.unit == u) for u in results.units(system)}
    if not labelled:
        return ",".join(numbers.values())
    return "; ".join(f"{u}s {n}" for u, n in numbers.items())


def _run_counts(system_runs: Sequence[Run], baseline_runs: Sequence[Run]) -> str:
    """How many runs a verdict rests on: ``3 seeds``, ``2–3 seeds``, or ``2 repeats / 2 seeds`` when the
    system's runs and the baseline's are told apart differently (system first)."""
    units = {r.unit for r in [*system_runs, *baseline_runs]}
    if len(units) <= 1:
        unit = units.pop() if units else "seed"
        counts = sorted({len(system_runs), len(baseline_runs)})
        return f"{'–'.join(map(str, counts))} {unit}{'s' if counts[-1] > 1 else ''}"

    def count(runs: Sequence[Run]) -> str:
        by_unit = Counter(r.unit for r in runs)
        return " + ".join(f"{by_unit[u]} {u}{'s' if by_unit[u] > 1 else ''}" for u in RUN_UNITS if by_unit[u])

    return f"{count(system_runs)} / {count(baseline_runs)}"


def settings_text(config: Mapping[str, Any]) -> str:
    """A run's settings as its ``config.yaml`` records them, in a few words ("" when none are recorded).

    beseg's runs give ``network segresnet, loss dice_be`` (``model.network`` and ``loss.name``);
    an nnU-Net run (``kind: nnunet``) gives ``nnU-Net v2 2.8.1: trainer nnUNetTrainerBE,
    configuration 3d_fullres, plans nnUNetPlans`` from its ``nnunet`` section.
    """
    if config.get("kind") == "nnunet":
        nn = config.get("nnunet") if isinstance(config.get("nnunet"), Mapping) else {}
        parts = [f"{key} {nn[key]}" for key in ("trainer", "configuration", "plans") if nn.get(key) not in (None, "")]
        version = f" {nn['nnunetv2']}" if nn.get("nnunetv2") else ""
        return f"nnU-Net v2{version}: " + (", ".join(parts) if parts else "trainer not recorded")
    model, loss = config.get("model"), config.get("loss")
    network = model.get("network") if isinstance(model, Mapping) else config.get("network")
    loss_name = loss.get("name") if isinstance(loss, Mapping) else loss
    return ", ".join(f"{what} {value}" for what, value in (("network", network), ("loss", loss_name))
                     if isinstance(value, str) and value)


def _system_settings(results: Results, system: str) -> str:
    """The system's settings (:func:`settings_text`); each run's where its runs disagree."""
    runs = results.runs_of(system)
    texts = list(dict.fromkeys(t for t in (settings_text(r.config) for r in runs) if t))
    if len(texts) <= 1:
        return "".join(texts)
    return "settings differ between runs: " + "; ".join(f"{r.name}: {settings_text(r.config) or 'not recorded'}"
                                                        for r in runs)


def _nnunet_systems(results: Results) -> list[str]:
    return [s for s in results.systems if any(r.is_nnunet for r in results.runs_of(s))]


# --------------------------------------------------------------------------- tables


def _table1_blocks(results: Results, optimistic: bool) -> list[Block]:
    t = tables.table1(results)
    columns = tables.table1_columns(results)
    runs_kind = results.kind == "runs"
    task_key = msd_task_key(results.task) if runs_kind else None
    noun = split_noun(results)
    repeats = results.has_repeats
    over = _over(results)
    header = ["system", *([("seeds / repeats" if repeats else "seeds")] if runs_kind else []),
              *(f"{c} Dice" for c in columns), "cases"]
    if task_key:
        header.append(f"paper {task_key} Dice")
    rows = []
    for system in results.systems:
        row = [system, *([_run_numbers(results, system, labelled=repeats)] if runs_kind else []),
               *(format_cell("dice", t[system][c]["dice"]) for c in columns), _cases_cell(results, system)]
        if task_key:
            ref = paper_dice(system, results.task)
            row.append(f"{ref[1]:.2f}" if ref else "")
        rows.append(tuple(row))
    cases = f"{noun} cases" if noun else "scored cases (split not recorded)"
    notes = [
        f"Each run's Dice is its mean over its {cases}; " + (
            f"the table shows the mean ± sample standard deviation (ddof=1) of those run means over {over}."
            if runs_kind else "one prediction folder per system, so there is no spread over seeds."),
        "'cases': cases scored per run; a failed case (unreadable, or not on its label's grid) has no value, is in "
        "no mean, and is listed under Notes.",
    ]
    if len(columns) > len(results.classes):
        notes.append(f"'mean' averages each run's per-class means before averaging over {over}.")
    caption = f"{noun.capitalize()} Dice on {results.task}" if noun else f"Dice on {results.task} (split not recorded)"
    if optimistic:
        caption += " (optimistic: these cases chose the checkpoint)"
    blocks: list[Block] = [Heading("Table 1: Dice"), Table(tuple(header), tuple(rows), caption=caption, notes=tuple(notes))]
    if task_key:
        blocks.append(Table(
            ("paper system", "beseg system", f"paper {task_key} Dice"),
            tuple((r.label, r.system, f"{r.dice[task_key]:.2f}") for r in PAPER_TABLE1),
            caption="The paper's Table 1 (validation Dice; for orientation, not reproduced conditions)",
            notes=(f"Source: {PAPER_SOURCE}.",),
        ))
    boundary = [m for m in METRIC_NAMES if m != "dice"]
    header = ["system", *(f"{c} {_LABELS[m]}" for c in columns for m in boundary)]
    rows = [tuple([s, *(format_cell(m, t[s][c][m]) for c in columns for m in boundary)]) for s in results.systems]
    tol = _field(results, "nsd_tolerance_mm")
    blocks.append(Table(
        tuple(header), tuple(rows),
        caption=f"Boundary metrics on the {cases}" + (f" (mean ± std over {over})" if runs_kind else ""),
        notes=(
            "HD95: the larger of the two directed 95th-percentile boundary distances; ASD: mean of both "
            "directions' boundary distances; NSD: share of boundary voxels within the tolerance"
            + (f" ({tol[0]} mm)" if len(tol) == 1 and tol[0] is not None else "") + " of the other boundary. "
            "Distances in mm.",
            _penalty_note(results, f"over all {over}" if runs_kind else "over all cases"),
        ),
    ))
    blocks.append(_counts_table(results))
    return blocks


def _penalty_note(results: Results, over: str) -> str:
    penalties = [p for p in _field(results, "distance_penalty_mm") if p is not None]
    fixed = f"{penalties[0]} mm" if len(penalties) == 1 else "a fixed penalty"
    return (f"'pen.' counts case values ({over}) where the class was empty in exactly one of prediction and "
            f"label: HD95 and ASD are then {fixed} (the BraTS convention for HD95), included in the mean, so a missed "
            "structure counts against a system; 'undef.' counts values that are undefined (NaN: such distances in "
            "evaluations made without a penalty) and left out of the mean. Dice and NSD are 0 in that case.")


def _counts_table(results: Results) -> Table:
    """Per system and class: the values behind each distance mean, penalised and undefined."""
    t = tables.table1(results)
    header = ["system", "class", "case values", *(f"{_LABELS[m]} {k}" for m in DISTANCE_METRICS
                                                  for k in ("penalised", "undefined")), "Dice, NSD undefined"]
    rows = []
    for system in results.systems:
        for cls in results.classes:
            cells = t[system][cls]
            n = cells["dice"].n_values + cells["dice"].n_undefined
            rows.append((system, cls, str(n),
                         *(str(getattr(cells[m], k)) for m in DISTANCE_METRICS for k in ("n_penalised", "n_undefined")),
                         str(cells["dice"].n_undefined + cells["nsd"].n_undefined)))
    return Table(tuple(header), tuple(rows), caption="Penalised and undefined values per class and metric",
                 notes=("Counted over every scored case of every run of the system.",))


def _interval(metric: str, ends: tuple[float, float]) -> str:
    """``[-0.020, +0.021]``; "n/a" without a test, "unbounded" when no shift can be rejected."""
    low, high = ends
    if math.isnan(low) or math.isnan(high):
        return "n/a"
    if math.isinf(low) and math.isinf(high):
        return "unbounded"
    return f"[{format_value(metric, low, True)}, {format_value(metric, high, True)}]"


def _level(alpha: float) -> str:
    """A confidence level as a percentage: 0.05 -> ``95%``, 0.05/19 -> ``99.74%``."""
    return f"{100 * (1 - alpha):.4g}%"


def direction(metric: str, mean_diff: float, reject: bool) -> str:
    """``better``, ``worse`` or ``no difference shown``: only what the test's decision supports.

    A difference is called only where its test rejects (the primary at 5%, the others by Holm);
    its sign then says better or worse by the metric's direction (higher Dice/NSD, lower HD95/ASD).
    """
    if not reject:
        return "no difference shown"
    return "better" if (mean_diff > 0) == HIGHER_IS_BETTER[metric] else "worse"


def _word(row: tables.ComparisonRow, call: verdict.Call) -> str:
    """The verdict's word for one comparison: :func:`direction`, or why there is none."""
    if not row.test or not row.test.testable:
        return "not computed"
    if not call.tested:
        return "not tested"
    return direction(row.metric, row.result.mean_diff, call.reject)


def _metric_label(metric: str, results: Results, cls: str) -> str:
    """``Dice``, ``Dice ET``, or ``mean foreground Dice`` (the mean over several classes)."""
    if cls == tables.MEAN_COLUMN:
        return f"mean foreground {_NAMES[metric]}"
    return _NAMES[metric] + (f" {cls}" if len(results.classes) > 1 else "")


def _unit(metric: str) -> str:
    return " mm" if metric in DISTANCE_METRICS else ""


def _power_text(row: tables.ComparisonRow, call: verdict.Call, level: str) -> str:
    """What the test could have found at its level."""
    unit = _unit(row.metric)
    if math.isinf(call.mdd):
        return (f"with {row.result.n} cases no difference can reach the {level} level (the smallest possible p-value "
                f"is {row.test.flips.min_p:.3g})")
    if math.isnan(call.mdd):
        return ""
    return f"the test could have detected {format_value(row.metric, call.mdd)}{unit} (80% power)"


def _provenance(primary: Primary, results: Results) -> str:
    """How the primary comparison came about, as the verdict's second sentence says it."""
    other = "system" if primary.context != "score" else "folder"
    metric = f"{'mean foreground ' if len(results.classes) > 1 else ''}{_NAMES[primary.metric]}"
    rule = f"the default rule (the baseline's BE version if it is compared, else the first other {other}; {metric})"
    how = f"by {rule}" if primary.chosen == "default" else "with --primary"
    if primary.context == "report":
        return (f"No primary comparison is declared in {results.root / 'plan.json'} (a results folder from an older "
                f"beseg, or not made by beseg compare): it was chosen when this report was written, by {rule}, which "
                "does not look at the results.")
    if primary.context == "score":
        if primary.chosen == "default":
            return (f"beseg score chose it after the predictions were made, by {rule}, which does not look at the "
                    "scores (--primary NAME:METRIC names another).")
        return ("It was given with --primary to beseg score, after the predictions were made; beseg cannot check that "
                "it was chosen before any score was seen.")
    if primary.previous:
        last = primary.previous[-1]
        when = str(last.get("replaced_at") or "")[:10]
        done = int(last.get("runs_done") or 0)
        text = (f"It was changed with --replan on {when or 'an unknown date'}, after {done} of "
                f"{last.get('runs_total') or '?'} runs had finished (declared before: {last.get('system')} vs "
                f"{last.get('baseline')} in {_NAMES.get(str(last.get('metric')), last.get('metric'))}"
                f"{', on ' + str(last.get('declared_at'))[:10] if last.get('declared_at') else ''}); ")
        return text + ("a primary comparison changed after results were seen is not protected by its declaration."
                       if done else "no run had finished, so it was still chosen before any result was seen.")
    if primary.runs_done:
        return (f"It was declared in plan.json, {how}, after {primary.runs_done} of {primary.runs_total} runs had "
                "finished (the results folder predates primary comparisons), so declaring it did not protect its "
                "5% level.")
    return f"It was declared in plan.json before any run had finished, {how}."


def _primary_sentence(results: Results, primary: Primary, row: tables.ComparisonRow | None,
                      call: verdict.Call | None, optimistic: bool) -> str:
    """The verdict's first sentence: the primary comparison alone, at 5%, with its interval and p-value."""
    label = (f"mean foreground {_NAMES[primary.metric]}" if len(results.classes) > 1
             else _NAMES[primary.metric])
    head = f"Primary comparison, {primary.system} vs {primary.baseline} in {label}"
    if row is None or call is None or not row.test or not row.test.testable:
        missing = [s for s in (primary.system, primary.baseline) if s not in results.systems]
        why = (f"{' and '.join(missing)} {'has' if len(missing) == 1 else 'have'} no "
               f"{'run' if results.kind == 'runs' else 'scores'} here" if missing
               else (row.result.note if row is not None and row.result.note else "too few cases"))
        return f"{head}: not computed ({why})."
    noun = split_noun(results) or "scored"
    seeds = (f", {_run_counts(results.runs_of(primary.system), results.runs_of(primary.baseline))}"
             if results.kind == "runs" else "")
    res, unit = row.result, _unit(primary.metric)
    word = _word(row, call)
    text = (f"{head} on {res.n} {noun} cases{seeds}: {word}, {format_value(primary.metric, res.mean_diff, True)}{unit} "
            f"(95% interval {_interval(primary.metric, call.interval)}{unit}; p = {call.p_value:.3g}, two-sided, "
            "5% level)")
    if word == "no difference shown":
        power = _power_text(row, call, "5%")
        text += f"; {power}" if power else ""
    return text + "." + (" (Optimistic protocol: these cases chose the checkpoint.)" if optimistic else "")


#: The verdict's metric families: one sentence per system and family.
_FAMILIES = (("overlap", ("dice",)), ("boundaries", tuple(m for m in METRIC_NAMES if m != "dice")))


def _family_items(results: Results, rows: list[tables.ComparisonRow], calls: list[verdict.Call],
                  baseline: str) -> list[str]:
    """One sentence per system and metric family, each comparison at its Holm level."""
    noun = split_noun(results) or "scored"
    sentences = []
    for system in dict.fromkeys(r.system for r in rows):
        mine = [(r, c) for r, c in zip(rows, calls) if r.system == system]
        n = max(r.result.n for r, _ in mine)
        seeds = f", {_run_counts(results.runs_of(system), results.runs_of(baseline))}" if results.kind == "runs" else ""
        for family, metrics in _FAMILIES:
            parts = []
            for r, c in ((r, c) for m in metrics for r, c in mine if r.metric == m):
                what = _metric_label(r.metric, results, r.cls)
                word = _word(r, c)
                if word == "not computed":
                    parts.append(f"not computed for {what} ({r.result.note or 'too few cases'})")
                    continue
                unit, level = _unit(r.metric), _level(c.level)
                text = (f"{word} in {what} ({format_value(r.metric, r.result.mean_diff, True)}{unit}, {level} interval "
                        f"{_interval(r.metric, c.interval)}{unit}, Holm-adjusted p = {c.adjusted_p:.3g})")
                if word == "no difference shown":
                    power = _power_text(r, c, level)
                    power = power.replace(" (80% power)", "")
                    text += f"; at that level {power}" if power.startswith("the test") else (f"; {power}" if power else "")
                parts.append(text)
            if parts:
                sentences.append(f"{system} vs {baseline} on {n} {noun} cases{seeds}, {family}: " + "; ".join(parts) + ".")
    return sentences


def _grid(family: list[tables.ComparisonRow], primary: tables.ComparisonRow | None) -> str:
    """``5 systems x 4 metrics x 1 class, less the primary``: what the family is made of."""
    grid = family + ([primary] if primary is not None and primary.cls != tables.MEAN_COLUMN else [])
    systems = len(dict.fromkeys(r.system for r in grid))
    classes = len(dict.fromkeys(r.cls for r in grid))
    metrics = len(dict.fromkeys(r.metric for r in grid))
    less = ", less the primary" if len(grid) > len(family) else ""
    return (f"{systems} system{'s' if systems != 1 else ''} x {metrics} metrics x {classes} "
            f"class{'es' if classes != 1 else ''}{less}")


def _family_paragraph(results: Results, family: list[tables.ComparisonRow], calls: list[verdict.Call],
                      baseline: str, primary_row: tables.ComparisonRow | None,
                      primary_call: verdict.Call | None) -> Paragraph | None:
    """The corrected family: Holm's decisions where the primary opened the gate, else why nothing was tested."""
    if not family:
        return None
    m = len(family)
    grid = _grid(family, primary_row)
    reach = ""
    min_p = min((r.test.flips.min_p for r in family if r.test and r.test.flips is not None), default=math.nan)
    if math.isfinite(min_p) and min_p > verdict.ALPHA / m:
        n = max(r.result.n for r in family)
        reach = (f" With {n} cases the smallest possible p-value is {min_p:.3g}, above Holm's first threshold "
                 f"0.05/{m} = {verdict.ALPHA / m:.3g}: no secondary comparison could be called at all.")
    if primary_call is not None and primary_call.reject:
        return Paragraph(f"Secondary comparisons, tested because the primary comparison rejected: the other {m} "
                         f"({grid}) as one family, with Holm's step-down procedure at 5% family-wise. Each interval is "
                         f"at the comparison's Holm level, and 'better' or 'worse' only where Holm rejects.{reach}",
                         tuple(_family_items(results, family, calls, baseline)))
    why = "it could not be computed" if primary_call is None else "it did not reject"
    noun = split_noun(results) or "scored"
    items = []
    for system in dict.fromkeys(r.system for r in family):
        mine = [r for r in family if r.system == system]
        seeds = f", {_run_counts(results.runs_of(system), results.runs_of(baseline))}" if results.kind == "runs" else ""
        metrics = ", ".join(dict.fromkeys(_NAMES[r.metric] for r in mine))
        classes = len(dict.fromkeys(r.cls for r in mine))
        what = f"{metrics}" + (f" x {classes} classes" if classes > 1 else "")
        items.append(f"{system} vs {baseline} on {max(r.result.n for r in mine)} {noun} cases{seeds}: not tested "
                     f"({what}).")
    return Paragraph(f"Secondary comparisons: the other {m} ({grid}) were not tested. They form one family, tested with "
                     "Holm's step-down procedure at 5% family-wise only after the primary comparison rejects, so that "
                     f"the whole verdict makes a false claim in at most 5% of experiments; {why}. Their unadjusted "
                     f"numbers are in the paired table below, as description, not findings.{reach}", tuple(items))


def _method_text(results: Results, primary: Primary, family: list[tables.ComparisonRow],
                 primary_row: tables.ComparisonRow | None) -> str:
    """The verdict's protocol sentence: the primary, the family, the correction, the test and the resampling."""
    tests = ([primary_row] if primary_row is not None else []) + family
    flips = next((r.test.flips for r in tests if r.test and r.test.flips is not None), None)
    patterns = (f"exact over all 2^n sign patterns up to 16 cases, else {MAX_PATTERNS} random ones"
                if flips is None else f"here {flips.describe()} of the {flips.n} cases")
    runs = {s: len(results.runs_of(s)) for s in dict.fromkeys(r.system for r in tests) | {primary.baseline: 0}
            if s in results.systems}
    single = [s for s, k in runs.items() if k < 2]
    if results.kind != "runs":
        seeds = ("There is one prediction folder per system, so seed-to-seed variation is not in the intervals: the "
                 "claims are about these predictions, not about retraining the models.")
    else:
        over = _over(results)
        seeds = (f"Seeds and cases together: each case's value is first averaged over a system's {over}, and where a "
                 f"system has two or more, the between-run variance of the run means (less the per-case noise the cases "
                 "already carry) is added to the test's null distribution as a Student-t term: a two-level (cases and "
                 "seeds) analysis, so intervals widen when seeds disagree.")
        if single and len(single) == len(runs):
            seeds += (" Here every system has one run, so that variance cannot be estimated: the claims are about "
                      "these trained models, not about retraining them.")
        elif single:
            seeds += f" {', '.join(single)} {'has' if len(single) == 1 else 'have'} one run and borrow the other's estimate."
    gated = (f"The verdict tests one primary comparison ({primary.system} vs {primary.baseline} in "
             f"{'mean foreground ' if len(results.classes) > 1 else ''}{_NAMES[primary.metric]}) alone at the 5% level")
    if family:
        gated += (f"; every other comparison shown ({len(family)}: {_grid(family, primary_row)}) is one family, corrected "
                  "with Holm's step-down procedure at 5% family-wise and tested only after the primary comparison "
                  "rejects (serial gatekeeping: where no system differs from the baseline, the whole verdict calls "
                  "something 'better' or 'worse' in at most 5% of experiments; beseg bench verdict measures it)")
    return (f"{gated}. Each comparison is a two-sided paired sign-flip (permutation) test of the mean difference over "
            f"cases ({patterns}); its intervals are the test inverted, so an interval excludes 0 exactly when its test "
            f"rejects at that level. {seeds} The paired table keeps every comparison's unadjusted 95% interval and "
            "p-value.")


def _verdict_blocks(results: Results, primary: Primary, primary_row: tables.ComparisonRow | None,
                    family: list[tables.ComparisonRow], primary_call: verdict.Call | None, calls: list[verdict.Call],
                    optimistic: bool, fig_dir: Path, notes: list[str]) -> list[Block]:
    """The report's first screen: the primary verdict, the corrected family and the paired plot; then how they were
    tested. Nothing when only one system was evaluated (there is no comparison)."""
    if primary.system == primary.baseline and primary_row is None and not family:
        return []
    blocks: list[Block] = [Heading("Verdict"),
                           Paragraph(_primary_sentence(results, primary, primary_row, primary_call, optimistic) + " "
                                     + _provenance(primary, results))]
    paragraph = _family_paragraph(results, family, calls, primary.baseline, primary_row, primary_call)
    if paragraph is not None:
        blocks.append(paragraph)
    tests = ([primary_row] if primary_row is not None else []) + family
    if not tests:
        return blocks
    panels = []
    for r in tests:
        if r.metric != "dice" or r.cls == tables.MEAN_COLUMN:
            continue
        diffs = tables.paired_differences(results, r.system, primary.baseline, r.cls, "dice")
        label = r.system if len(results.classes) == 1 else f"{r.system}, {r.cls}"
        panels.append(figures.PairedPanel(label, diffs, r.result.mean_diff, (r.result.ci_low, r.result.ci_high)))
    try:
        path = figures.paired_difference_figure(panels, f"Dice difference per case (system − {primary.baseline})",
                                                fig_dir / "paired_dice.png")
        averaged = f"averaged over {_over(results)}" if results.has_repeats else "seed-averaged"
        unbounded = (" (none where it is unbounded: too few cases)"
                     if any(not all(map(math.isfinite, p.ci)) for p in panels) else "")
        blocks.append(Figure(path, f"Per-case Dice differences to {primary.baseline}: one dot per case ({averaged}); "
                                   f"black bar: the unadjusted 95% interval of the mean difference{unbounded}; red tick: "
                                   "the mean. The cases that moved most either way are named."))
    except (OSError, ValueError) as exc:
        notes.append(f"paired Dice plot not drawn: {exc}")
    # How it was tested goes below the plot, so that the first screen holds the answer.
    blocks.append(Paragraph(_method_text(results, primary, family, primary_row)))
    return blocks


def _comparison_blocks(results: Results, primary_row: tables.ComparisonRow | None, family: list[tables.ComparisonRow],
                       primary_call: verdict.Call | None, calls: list[verdict.Call], baseline: str,
                       seed: int) -> list[Block]:
    blocks: list[Block] = [Heading(f"Paired comparison against {baseline}")]
    placeholder = verdict.Call("primary", True, False, verdict.ALPHA, math.nan, math.nan, (math.nan, math.nan), math.nan)
    rows = [(primary_row, primary_call or placeholder)] if primary_row is not None else []
    rows += list(zip(family, calls))
    if not rows:
        why = (f"the baseline {baseline} has no {'run' if results.kind == 'runs' else 'scores'} here"
               if baseline not in results.systems else f"there is no other system to compare with {baseline}")
        return blocks + [Paragraph(f"Not computed: {why}.")]
    noun = split_noun(results) or "scored"
    n = max(r.result.n for r, _ in rows)
    averaged = f"each system's value is averaged over its {_over(results)} and " if results.kind == "runs" else ""
    blocks.append(Paragraph(
        f"Per {noun} case, {averaged}the baseline's is subtracted (system − {baseline}). Shown, UNADJUSTED for the "
        f"number of comparisons: the paired cases, the mean difference, its 95% interval and the two-sided p-value of "
        f"the paired sign-flip test (random sign patterns seeded with {seed}; with several runs per system the seed "
        f"variance is in both). 'verdict' is the corrected decision of the Verdict section: the primary comparison at "
        f"5%, the others by Holm ('Holm p' is the adjusted p-value) and only after the primary rejects. Better is a "
        f"positive difference for Dice and NSD, a negative one for HD95 and ASD. What the test could have found: "
        f"'MDD' is the minimum detectable mean difference at 80% power and two-sided 5%, (t(0.975, df) + t(0.80, df)) "
        f"× SE with SE from the observed spread of the paired differences (t-approximation; 'none' when no p-value "
        f"can reach 5% with these cases); 'min. p' is the smallest p-value the test can give, 2 / 2^n for n cases "
        f"(with {n} cases: {2 / 2 ** n:.3g}). A true difference smaller than the MDD would usually go unnoticed. "
        f"'pen.' counts paired cases whose value was a distance penalty (system / baseline)."
    ))
    body = []
    for r, c in rows:
        res = r.result
        mdd = "none" if math.isinf(res.mdd) else format_value(r.metric, res.mdd)
        body.append((r.system, r.cls, _LABELS[r.metric], str(res.n), format_value(r.metric, res.mean_diff, True),
                     _interval(r.metric, (res.ci_low, res.ci_high)),
                     "n/a" if math.isnan(res.p_value) else f"{res.p_value:.3g}", c.role,
                     "n/a" if math.isnan(c.adjusted_p) or c.role == "primary" or not c.tested else f"{c.adjusted_p:.3g}",
                     _word(r, c), mdd, "n/a" if math.isnan(res.min_p) else f"{res.min_p:.3g}",
                     f"{r.penalised[0]} / {r.penalised[1]}", res.note))
    blocks.append(Table(("system", "class", "metric", "cases", "mean diff.", "95% interval (unadjusted)",
                         "p (unadjusted)", "role", "Holm p", "verdict", "MDD (80% power)", "min. p", "pen.", "note"),
                        tuple(body), caption=f"Paired differences on the {noun} cases (unadjusted intervals and p-values)",
                        notes=(f"Class '{tables.MEAN_COLUMN}': each case's mean over the classes (the primary "
                               "comparison's mean foreground value).",) if len(results.classes) > 1 else ()))
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
    notes = ["Per run: median over its 'train' entries of metrics.jsonl (step_time_s, loss_time_s); "
             "loss share = sum of loss times / sum of step times. Then the mean over runs. Timings are from "
             "the machine that trained."]
    nnunet = _nnunet_systems(results)
    if nnunet:
        notes.append(f"nnU-Net ({', '.join(nnunet)}): one entry per epoch; its step time is the epoch's wall time / "
                     "iterations per epoch, so it includes nnU-Net's per-epoch validation. nnU-Net does not time its "
                     "loss: median loss and loss share are n/a.")
    return [
        Heading("Cost"),
        Table(("system", "runs", "train log entries", "median step (s)", "median loss (ms)", "loss share (%)"),
              tuple(rows), caption="Training time per step and the share spent computing the loss",
              notes=tuple(notes)),
    ]


# --------------------------------------------------------------------------- figures


def _overlay_cases(results: Results, data: CaseFiles, baseline: str, be_system: str) -> list[figures.OverlayCase]:
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


def _figure_blocks(results: Results, task: MSDTask | None, cases: CaseFiles | None, fig_dir: Path, baseline: str,
                   be_system: str, notes: list[str]) -> list[Block]:
    blocks: list[Block] = [Heading("Figures")]
    if results.kind == "runs":
        try:
            nnunet = _nnunet_systems(results)
            per = " / ".join(results.units()) or "seed"
            caption = ("Learning curves: training loss and validation mean Dice per step; one line "
                       f"per {per}, one colour per system.")
            if nnunet:
                caption += (f" nnU-Net ({', '.join(nnunet)}): its own training loss (Dice + cross-entropy, negative "
                            "by construction) and its pseudo Dice on validation patches, once per epoch; not on the "
                            "same scale as beseg's losses and sliding-window validation Dice.")
            blocks.append(Figure(figures.learning_curve_figure(results, fig_dir / "learning_curves.png"), caption))
        except (OSError, ValueError) as exc:
            notes.append(f"learning curves not drawn: {exc}")
    if cases is None and task is None:
        notes.append("no dataset folder given: Figure 1 panels not drawn")
        return blocks
    try:
        data = dict(cases) if cases is not None else case_files(task)
        where = "the labels folder" if cases is not None else str(task.root / "dataset.json")
        scored = sorted({row["case"] for r in results.runs for row in r.per_case} & set(data))
        if not scored:
            raise ValueError(f"none of the evaluated cases is listed in {where}")
        blocks.append(Figure(figures.filter_figure(data[scored[0]][1], fig_dir / "figure1_filter.png"),
                             f"Figure 1 (a-c) from the label of {scored[0]} (foreground, cropped, resampled to "
                             f"1 mm): (a) a profile of the mask and of the BE filter's output along the dashed "
                             f"line; (b) the mask; (c) the filtered mask, non-zero only near the boundary."))
        overlay = _overlay_cases(results, data, baseline, be_system)
        no_image = " (no image found: contours on black)" if any(o.image is None for o in overlay) else ""
        blocks.append(Figure(figures.contour_figure(overlay, fig_dir / "figure1_contours.png"),
                             "Figure 1 (d): ground truth and predicted contours on the axial slice with the "
                             f"most ground truth; cases chosen by the rule in each title{no_image}."))
    except (BesegError, OSError, ValueError) as exc:
        notes.append(f"Figure 1 not drawn: {exc}")
    return blocks


# --------------------------------------------------------------------------- the document


def _failure_notes(results: Results) -> list[str]:
    notes = []
    for run in results.runs:
        for case, reason in run.failed:
            notes.append(f"{run.name}: case {case} failed (in no mean): {reason}")
        missing = run.summary.get("missing")
        if isinstance(missing, list) and missing:
            notes.append(f"{run.name}: {len(missing)} labelled case(s) without a prediction, not scored: "
                         + ", ".join(map(str, missing)))
    return notes


def primary_row(results: Results, primary: Primary, rows: list[tables.ComparisonRow], seed: int = 0,
                flips: dict | None = None) -> tables.ComparisonRow | None:
    """The primary comparison's row: its system against the baseline in its metric, averaged over the classes
    (the class itself with one class); None when either system has no run."""
    if primary.system == primary.baseline or not {primary.system, primary.baseline} <= set(results.systems):
        return None
    column = results.classes[0] if len(results.classes) == 1 else tables.MEAN_COLUMN
    for row in rows:
        if (row.system, row.cls, row.metric) == (primary.system, column, primary.metric):
            return row
    return tables.comparison(results, primary.system, primary.baseline, column, primary.metric, seed, flips)


def build_document(results: Results, task: MSDTask | None, fig_dir: str | Path, primary: Primary,
                   seed: int = 0, cases: CaseFiles | None = None) -> list[Block]:
    """The whole report as blocks, drawing the figures into ``fig_dir`` on the way.

    Args:
        results: the collected runs (or scored prediction folders).
        task: the dataset the runs used (:func:`beseg.data.load_task`), for the figure images; None skips
            Figure 1 unless ``cases`` is given.
        fig_dir: folder for the PNG figures (created).
        primary: the primary comparison; its baseline is the one every system is compared with, and
            its system is shown beside the baseline in the contour figure.
        seed: seed of the tests' random sign patterns.
        cases: ``{case: (image or None, label)}`` for the figures, instead of ``task``.

    Returns:
        The blocks, ready for :mod:`beseg.report.render`. Problems drawing a figure become notes in
        the report rather than errors.
    """
    notes = list(results.notes) + _failure_notes(results)
    statement, optimistic = protocol_statement(results)
    noun = split_noun(results)
    n_cases = len({row["case"] for r in results.runs for row in r.per_case})
    baseline = primary.baseline
    flips: dict = {}
    rows = tables.comparisons(results, baseline, seed=seed, flips=flips)
    first = primary_row(results, primary, rows, seed, flips)
    family = [r for r in rows if r is not first]
    primary_call, calls = verdict.judge(first.test if first is not None and first.test.testable else None,
                                        [r.test for r in family])
    verdict_blocks = _verdict_blocks(results, primary, first, family, primary_call, calls, optimistic, Path(fig_dir),
                                     notes)
    body: list[Block] = []
    body += _table1_blocks(results, optimistic)
    body += _comparison_blocks(results, first, family, primary_call, calls, baseline, seed)
    if results.kind == "runs":
        body += _cost_blocks(results)
    body += _figure_blocks(results, task, cases, Path(fig_dir),
                           baseline, primary.system, notes)
    if results.kind == "runs":
        what = (f"Results folder {results.root}; {len(results.runs)} runs of {len(results.systems)} systems; "
                f"{n_cases} {noun or 'scored'} cases; classes: {', '.join(results.classes)}.")
        repeated = [s for s in results.systems if "repeat" in results.units(s)]
        if repeated:
            what += (f" Repeats ({', '.join(repeated)}): nnU-Net sets no seed; its repeats are reruns of identical "
                     "settings, so their spread is run-to-run nondeterminism, not seed variation.")
        items = tuple(f"{s}: {_run_numbers(results, s)}" + (f"; {t}" if (t := _system_settings(results, s)) else "")
                      for s in results.systems)
    else:
        what = (f"Prediction folders scored by beseg score into {results.root}; {len(results.systems)} systems; "
                f"{n_cases} {noun or 'scored'} cases; classes: {', '.join(results.classes)}.")
        items = tuple(f"{r.system}: {r.summary.get('predictions', r.predictions_dir)}" for r in results.runs)
    title = "beseg comparison report" if results.kind == "runs" else "beseg score report"
    head: list[Block] = [
        Heading(f"{title}: {results.task}", level=1),
        Paragraph(statement),
        *verdict_blocks,
        Heading("How the numbers were made"),
        Paragraph(what, items),
    ]
    if notes:
        head += [Heading("Notes"), Paragraph("Problems found while reading the runs and drawing figures:",
                                             tuple(notes))]
    return head + body

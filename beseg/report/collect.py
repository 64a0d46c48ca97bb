"""Read a ``beseg compare`` results folder, or ``beseg score`` outputs, into tidy per-run records.

Layout of a results folder (nothing else is read)::

    RESULTS_DIR/<system>/seed<k>/config.yaml          system, network, loss (shown, not computed on)
    RESULTS_DIR/<system>/seed<k>/metrics.jsonl        "train" lines (step, loss, step_time_s,
                                                      loss_time_s) and "val" lines (step, dice_mean)
    RESULTS_DIR/<system>/seed<k>/eval/per_case.csv    case,class,dice,hd95_mm,asd_mm,nsd[,empty_in]
    RESULTS_DIR/<system>/seed<k>/eval/summary.json    task, classes, and if present split, protocol,
                                                      folds, selection, nsd_tolerance_mm,
                                                      distance_penalty_mm, failed
    RESULTS_DIR/<system>/seed<k>/eval/predictions/<case>.nii.gz   (used by the figures)

A system without a seed (an nnU-Net trainer) keeps its runs in ``<system>/repeat<k>/`` instead, with
the same files: repeat ``k`` is an independent rerun of identical settings. Its ``config.yaml``
has ``kind: nnunet`` and an ``nnunet`` section (trainer, configuration, plans) instead of
``model``/``loss``, and its "train" lines have no ``loss_time_s``.

(Cross-validation keeps each fold's run in ``<system>/seed<k>/fold<f>/``; only the merged
``<system>/seed<k>/eval/`` is read.) :func:`collect_scored` reads the same two files from
``beseg score`` output folders instead, one "run" per scored prediction folder, with the
predictions read from that folder.

A run without a readable ``per_case.csv`` and ``summary.json`` is unfinished: it is skipped
with a note that the report prints. Problems in the optional parts (config, training log) become
notes too. Only problems that leave nothing to report raise :class:`beseg.errors.ReportError`.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from beseg.errors import DataError, ReportError
from beseg.experiment.layout import RUN_UNITS, ResultsLayout
from beseg.metrics import METRIC_NAMES
from beseg.score import Summary

__all__ = ["Run", "Results", "collect_results", "collect_scored", "read_run"]

_CSV_COLUMNS = ("case", "class", *METRIC_NAMES)


@dataclass
class Run:
    """One system trained and evaluated with one seed (or, for a system without a seed, one repeat).

    Attributes:
        system: system name (the run's grandparent folder name, or the scored prediction folder's name).
        seed: the ``k`` of its ``seed<k>`` (or ``repeat<k>``) folder; None for a scored prediction folder.
        path: the run folder (for a scored prediction folder: the folder holding its scores).
        task: task name from ``eval/summary.json`` (``task09``, ``phantom_spleen``...).
        classes: scored class names, in the order of ``eval/summary.json``.
        summary: the whole ``eval/summary.json`` object.
        config: the parsed ``config.yaml`` ({} if missing or unreadable).
        per_case: one dict per ``per_case.csv`` row: ``case``, ``class``, the metrics as floats
            (NaN where empty or ``nan``; distances in mm) and ``empty_in`` (``""`` in tables
            written before that column existed).
        train: ``metrics.jsonl`` objects with ``"kind": "train"``, in file order.
        val: ``metrics.jsonl`` objects with ``"kind": "val"``, in file order.
        predictions_dir: where the predicted label maps are (default ``path/eval/predictions``).
        unit: ``"seed"`` (a ``seed<k>`` folder) or ``"repeat"`` (a ``repeat<k>`` folder: a system
            without a seed, rerun ``k`` of identical settings).
    """

    system: str
    seed: int | None
    path: Path
    task: str
    classes: list[str]
    summary: dict[str, Any]
    config: dict[str, Any] = field(default_factory=dict)
    per_case: list[dict[str, Any]] = field(default_factory=list)
    train: list[dict[str, Any]] = field(default_factory=list)
    val: list[dict[str, Any]] = field(default_factory=list)
    predictions_dir: Path | None = None
    unit: str = "seed"

    @property
    def name(self) -> str:
        """``<system>/seed<k>`` or ``<system>/repeat<k>`` (the system alone for a scored prediction folder), as
        notes and figures name it."""
        return self.system if self.seed is None else ResultsLayout.run_id(self.system, self.seed, unit=self.unit)

    @property
    def is_nnunet(self) -> bool:
        """True for an nnU-Net run (``kind: nnunet`` in its ``config.yaml`` or ``eval/summary.json``)."""
        return self.config.get("kind") == "nnunet" or self.summary.get("kind") == "nnunet"

    @property
    def failed(self) -> list[tuple[str, str]]:
        """``(case, reason)`` of the cases that could not be scored, from ``summary.json``."""
        return Summary(self.summary).failed

    @property
    def cases(self) -> list[str]:
        """The scored case ids, sorted."""
        return sorted({r["case"] for r in self.per_case})

    def prediction_path(self, case: str) -> Path:
        """Where the run's predicted label map of ``case`` is (it may not exist)."""
        folder = self.predictions_dir if self.predictions_dir is not None else self.path / "eval" / "predictions"
        plain = folder / f"{case}.nii"
        return plain if plain.is_file() and not (folder / f"{case}.nii.gz").is_file() else folder / f"{case}.nii.gz"

    def values(self, cls: str, metric: str) -> dict[str, float]:
        """``{case: value}`` of one class and metric."""
        return {r["case"]: r[metric] for r in self.per_case if r["class"] == cls}


@dataclass
class Results:
    """Every usable run of a results folder, and notes on what was skipped or incomplete.

    Attributes:
        root: the results folder (for scored prediction folders: the folder holding their scores).
        runs: usable runs, sorted by system name, then seeds before repeats, then number.
        notes: one human-readable line per skipped run or problem found.
        kind: ``"runs"`` (trained and evaluated by beseg: seeds, training logs) or
            ``"predictions"`` (prediction folders scored by ``beseg score``: no seeds, no logs).
    """

    root: Path
    runs: list[Run]
    notes: list[str]
    kind: str = "runs"

    @property
    def task(self) -> str:
        """The task every run evaluated."""
        return self.runs[0].task

    @property
    def classes(self) -> list[str]:
        """The classes every run scored."""
        return self.runs[0].classes

    @property
    def systems(self) -> list[str]:
        """System names with at least one usable run, sorted."""
        return sorted({r.system for r in self.runs})

    def runs_of(self, system: str) -> list[Run]:
        """The usable runs of ``system``, by seed (or repeat)."""
        return [r for r in self.runs if r.system == system]

    def units(self, system: str | None = None) -> list[str]:
        """``"seed"`` and/or ``"repeat"``: what tells the runs (of ``system``) apart, in that order."""
        found = {r.unit for r in (self.runs if system is None else self.runs_of(system))}
        return [u for u in RUN_UNITS if u in found]

    @property
    def has_repeats(self) -> bool:
        """True when some system's runs are ``repeat<k>`` folders (a system without a seed: nnU-Net)."""
        return "repeat" in self.units()


class _Skip(Exception):
    """A run folder that cannot be used; the message says why."""


def _float(text: str | None) -> float:
    """A CSV cell as float: empty or ``nan`` give NaN; anything else unparsable raises ValueError."""
    if text is None or text.strip() == "":
        return math.nan
    return float(text)


def _read_per_case(path: Path, classes: list[str]) -> list[dict[str, Any]]:
    try:
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            missing = [c for c in _CSV_COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise _Skip(f"{path}: missing column(s) {', '.join(missing)}")
            rows = []
            for i, row in enumerate(reader, start=2):
                try:
                    rows.append({"case": row["case"], "class": row["class"],
                                 **{m: _float(row[m]) for m in METRIC_NAMES}, "empty_in": row.get("empty_in") or ""})
                except (TypeError, ValueError):
                    raise _Skip(f"{path}, line {i}: a metric is not a number") from None
    except OSError as exc:
        raise _Skip(f"{path}: cannot read ({exc.strerror or exc})") from None
    if not rows:
        raise _Skip(f"{path}: no rows")
    unknown = sorted({r["class"] for r in rows} - set(classes))
    if unknown:
        raise _Skip(f"{path}: class(es) {', '.join(unknown)} not in summary.json's classes {classes}")
    return rows


def _read_log(path: Path, notes: list[str]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Train and val entries of ``metrics.jsonl``; unreadable lines are counted in a note."""
    train: list[dict[str, Any]] = []
    val: list[dict[str, Any]] = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        notes.append(f"{path}: missing or unreadable; no learning curve or cost for this run")
        return train, val
    bad = 0
    for line in lines:
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if isinstance(obj, dict) and obj.get("kind") == "train":
            train.append(obj)
        elif isinstance(obj, dict) and obj.get("kind") == "val":
            val.append(obj)
    if bad:
        # A run killed mid-write leaves a truncated last line; the rest is still good.
        notes.append(f"{path}: {bad} line(s) are not JSON and were ignored")
    return train, val


def _read_config(path: Path, notes: list[str]) -> dict[str, Any]:
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError:
        notes.append(f"{path}: missing; network and loss are not shown for this run")
        return {}
    except yaml.YAMLError as exc:
        notes.append(f"{path}: not valid YAML ({str(exc).splitlines()[0]})")
        return {}
    return config if isinstance(config, dict) else {}


def _read_scores(folder: Path) -> tuple[dict[str, Any], list[str], list[dict[str, Any]]]:
    """``(summary, classes, per-case rows)`` of a folder holding ``summary.json`` and ``per_case.csv``.

    Raises:
        _Skip: either file is missing or malformed.
    """
    try:
        summary = Summary.read(folder / "summary.json")
    except DataError as exc:
        raise _Skip(str(exc)) from None
    return dict(summary.data), summary.classes, _read_per_case(folder / "per_case.csv", summary.classes)


def read_run(path: str | Path, system: str, seed: int, notes: list[str], unit: str = "seed") -> Run:
    """Read one run folder.

    Args:
        path: the ``<system>/seed<k>`` (or ``<system>/repeat<k>``) folder.
        system: the system name.
        seed: the seed (or repeat) number.
        notes: list that problems in the optional files are appended to.
        unit: ``"seed"`` or ``"repeat"``: what ``seed`` counts.

    Returns:
        The :class:`Run`.

    Raises:
        ReportError: the evaluation output (``eval/summary.json``, ``eval/per_case.csv``) is
            missing or malformed, so the run cannot be used.
    """
    path = Path(path)
    try:
        summary, classes, per_case = _read_scores(path / "eval")
    except _Skip as exc:
        raise ReportError(str(exc)) from None
    run_notes: list[str] = []
    config = _read_config(path / "config.yaml", run_notes)
    train, val = _read_log(path / "metrics.jsonl", run_notes)
    notes.extend(run_notes)
    return Run(system, seed, path, summary["task"], classes, summary, config, per_case, train, val, unit=unit)


def _same_kind(root: Path, runs: list[Run]) -> None:
    kinds = {(r.task, tuple(r.classes)) for r in runs}
    if len(kinds) > 1:
        listing = ", ".join(f"{r.name}: {r.task} {r.classes}" for r in runs)
        raise ReportError(f"{root}: runs evaluated different tasks or classes ({listing})")


def collect_results(results_dir: str | Path) -> Results:
    """Read every ``<system>/seed<k>`` and ``<system>/repeat<k>`` run of a results folder.

    Args:
        results_dir: the folder ``beseg compare`` wrote.

    Returns:
        :class:`Results` with the usable runs and a note for each skipped run or problem.

    Raises:
        ReportError: the folder does not exist, holds no usable run, or its runs evaluated
            different tasks or classes (they would not be comparable).
    """
    root = Path(results_dir)
    if not root.is_dir():
        raise ReportError(f"{root}: results folder does not exist")
    runs: list[Run] = []
    notes: list[str] = []
    for system, seed, path, unit in ResultsLayout(root).result_dirs():
        try:
            runs.append(read_run(path, system, seed, notes, unit))
        except ReportError as exc:
            notes.append(f"skipped {ResultsLayout.run_id(system, seed, unit=unit)}: {exc}")
    if not runs:
        detail = "; ".join(notes) if notes else "no <system>/seed<k>/ folders (nor <system>/repeat<k>/) found"
        raise ReportError(f"{root}: no finished run to report ({detail})")
    _same_kind(root, runs)
    runs.sort(key=lambda r: (r.system, RUN_UNITS.index(r.unit), r.seed))
    return Results(root, runs, notes)


def collect_scored(folders: Sequence[tuple[str, str | Path, str | Path]], root: str | Path) -> Results:
    """Read ``beseg score`` outputs, one "run" per scored prediction folder, in the order given.

    Args:
        folders: ``(system name, folder with per_case.csv and summary.json, prediction folder)``.
        root: the folder holding them all (shown in the report).

    Returns:
        :class:`Results` of kind ``"predictions"``.

    Raises:
        ReportError: a folder's scores are missing or malformed, two systems share a name, or
            they scored different tasks or classes.
    """
    root = Path(root)
    names = [name for name, _, _ in folders]
    if len(set(names)) != len(names) or not names:
        raise ReportError(f"systems need distinct names, got {names}")
    runs = []
    for name, scores, predictions in folders:
        try:
            summary, classes, per_case = _read_scores(Path(scores))
        except _Skip as exc:
            raise ReportError(str(exc)) from None
        runs.append(Run(name, None, Path(scores), summary["task"], classes, summary, per_case=per_case,
                        predictions_dir=Path(predictions)))
    _same_kind(root, runs)
    return Results(root, runs, [], kind="predictions")

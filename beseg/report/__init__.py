"""The comparison report: Table 1, paired statistics, cost and figures, as Markdown and HTML.

Two sources, one report:

* :func:`write_report` reads the run folders of a ``beseg compare`` results directory (see
  :mod:`beseg.report.collect` for the exact files) and takes the comparison's dataset (the
  :class:`~beseg.data.MSDTask` it loaded) for the figure images.
* :func:`compare_predictions` scores two or more prediction folders against the same labels
  (:func:`beseg.score.score_predictions`) and reports them the same way (``beseg score A B``):
  how an nnU-Net user compares ``nnUNetTrainer`` with ``nnUNetTrainerBE``.

Both write ``report.md``, a self-contained ``report.html`` and ``figures/*.png``. The verdict answers
the primary comparison first (declared in ``plan.json`` by ``beseg compare``; see
:mod:`beseg.experiment.primary`), then the other comparisons as one Holm-corrected family
(:mod:`beseg.report.verdict`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from beseg.data.msd import MSDTask, case_id, list_nifti
from beseg.errors import ReportError
from beseg.experiment.primary import Primary, be_counterpart, default_baseline, parse_primary, read_primary
from beseg.fileio import atomic_write_text
from beseg.report.collect import Results, Run, collect_results, collect_scored
from beseg.report.document import CaseFiles, build_document
from beseg.report.render import Block, to_html, to_markdown
from beseg.report.stats import PairedComparison, paired_comparison
from beseg.score import ScoreResult, score_predictions

__all__ = [
    "write_report", "compare_predictions", "default_names", "collect_results", "collect_scored", "Results", "Run",
    "paired_comparison", "PairedComparison", "report_primary",
]


def _write(blocks: list[Block], out: Path, title: str) -> Path:
    """Write ``report.md`` and ``report.html`` (atomically) into ``out``; returns the HTML path."""
    atomic_write_text(out / "report.md", to_markdown(blocks, out / "report.md"))
    return atomic_write_text(out / "report.html", to_html(blocks, title))


def report_primary(results: Results, declared: Primary | None = None, baseline: str | None = None) -> Primary:
    """The primary comparison a report answers: the declared one, else the default rule's, chosen now.

    Args:
        results: the collected runs.
        declared: what ``plan.json`` declares (:func:`beseg.experiment.primary.read_primary`).
        baseline: the baseline asked for (default: the declared one, else
            :func:`beseg.experiment.primary.default_baseline`).

    Raises:
        ReportError: ``baseline`` is not the declared primary comparison's baseline.
    """
    if declared is not None:
        if baseline is not None and baseline != declared.baseline:
            raise ReportError(f"the primary comparison declared in plan.json is {declared.describe()}; the report "
                              f"compares with its baseline {declared.baseline}, not {baseline}.")
        return declared
    baseline = baseline or default_baseline(results.systems)
    return Primary(be_counterpart(baseline, results.systems), baseline, "dice", "default", "report")


def write_report(
    results_dir: str | Path,
    task: MSDTask | None,
    out_dir: str | Path | None = None,
    baseline: str | None = None,
    seed: int = 0,
) -> Path:
    """Write the comparison report of a ``beseg compare`` results folder.

    Args:
        results_dir: folder with ``<system>/seed<k>/`` run folders (and ``plan.json``).
        task: the dataset the runs used (:func:`beseg.data.load_task`), for the figures' images and labels;
            None leaves Figure 1 out.
        out_dir: where to write; default ``results_dir/report``.
        baseline: the system every other one is compared with (paired per case); default the
            baseline of the primary comparison ``plan.json`` declares, else
            :func:`beseg.experiment.primary.default_baseline`.
        seed: seed of the tests' random sign patterns (same seed, same report).

    Returns:
        Path of the written ``report.html`` (``report.md`` and ``figures/`` are beside it).

    Raises:
        ReportError: the results folder is missing, has no finished run, or its runs disagree on
            the task or classes, or ``baseline`` contradicts the declared primary comparison.
            Unfinished runs and figure problems are notes in the report.
        ConfigError: ``plan.json``'s primary comparison is malformed.
    """
    results = collect_results(results_dir)
    primary = report_primary(results, read_primary(results_dir), baseline)
    out = Path(out_dir) if out_dir is not None else Path(results_dir) / "report"
    out.mkdir(parents=True, exist_ok=True)
    blocks = build_document(results, task, out / "figures", primary, seed=seed)
    return _write(blocks, out, f"beseg comparison report: {results.task}")


def default_names(folders: Sequence[str | Path]) -> list[str]:
    """Names for prediction folders: the last path component that tells them all apart.

    ``.../nnUNetTrainer__nnUNetPlans__3d_fullres/fold_0/validation`` and
    ``.../nnUNetTrainerBE__nnUNetPlans__3d_fullres/fold_0/validation`` become
    ``nnUNetTrainer__nnUNetPlans__3d_fullres`` and ``nnUNetTrainerBE__nnUNetPlans__3d_fullres``.

    Raises:
        ReportError: no single path component differs between every pair (give names).
    """
    parts = [Path(f).resolve().parts[::-1] for f in folders]
    for depth in range(min(map(len, parts))):
        names = [p[depth] for p in parts]
        if len(set(names)) == len(names):
            return names
    raise ReportError(f"cannot name the prediction folders {[str(f) for f in folders]} apart by one folder name; "
                      "give --names.")


def _image_for(case: str, images_dir: Path | None) -> Path | None:
    """The image of ``case``: ``CASE.nii.gz`` or nnU-Net's first channel ``CASE_0000.nii.gz``."""
    if images_dir is None:
        return None
    for name in (f"{case}.nii.gz", f"{case}.nii", f"{case}_0000.nii.gz", f"{case}_0000.nii"):
        if (images_dir / name).is_file():
            return images_dir / name
    return None


def compare_predictions(
    pred_dirs: Sequence[str | Path],
    labels_dir: str | Path,
    out_dir: str | Path,
    names: Sequence[str] | None = None,
    baseline: str | None = None,
    images_dir: str | Path | None = None,
    seed: int = 0,
    primary: str | None = None,
    **score_kwargs: Any,
) -> tuple[list[ScoreResult], Path]:
    """Score each prediction folder against the same labels, then write the paired comparison report.

    Writes ``out_dir/<name>/per_case.csv`` and ``summary.json`` per folder (as a single
    ``beseg score`` writes them) and ``out_dir/report/report.{md,html}`` with ``figures/``.

    Args:
        pred_dirs: two or more prediction folders (``CASE.nii.gz`` label maps).
        labels_dir: the ground-truth label folder they share.
        out_dir: output folder (created).
        names: one name per folder (default :func:`default_names`).
        baseline: the system the others are compared with (default the first folder's name).
        images_dir: images for the contour figure (``CASE.nii.gz`` or ``CASE_0000.nii.gz``);
            default the ``imagesTr`` beside a ``labelsTr`` folder, if there is one.
        seed: seed of the tests' random sign patterns.
        primary: ``NAME:METRIC``, the comparison the verdict answers first (default: the baseline's BE
            counterpart if there is one, else the first other folder, in Dice); the report says it was
            chosen after the predictions were made.
        **score_kwargs: passed to :func:`beseg.score.score_predictions` (``classes``,
            ``dataset_json``, ``nsd_tolerance_mm``, ``distance_penalty_mm``, ``workers`` ...).

    Returns:
        ``(one ScoreResult per folder, path of report.html)``.

    Raises:
        ReportError: fewer than two folders, names that are not distinct or not usable as folder
            names, a baseline that is not one of them, or a folder none of whose cases could be
            scored (its per_case.csv and summary.json are written first).
        ConfigError: a malformed or impossible ``primary`` (checked before anything is scored).
        DataError, ConfigError, ValueError: as :func:`beseg.score.score_predictions`.
    """
    if len(pred_dirs) < 2:
        raise ReportError(f"a comparison needs two or more prediction folders, got {len(pred_dirs)}.")
    names = list(names) if names is not None else default_names(pred_dirs)
    if len(names) != len(pred_dirs):
        raise ReportError(f"--names gives {len(names)} name(s) for {len(pred_dirs)} prediction folders.")
    if len(set(names)) != len(names):
        raise ReportError(f"system names must be distinct, got {names}.")
    bad = [n for n in names if not n or n in (".", "..", "report") or "/" in n or "\\" in n]
    if bad:
        raise ReportError(f"system name(s) {bad} cannot be folder names under {out_dir} (no '/', not 'report').")
    baseline = baseline or names[0]
    if baseline not in names:
        raise ReportError(f"baseline {baseline!r} is not one of the systems {names}.")
    if primary:
        system, metric = parse_primary(primary, names, baseline)
        declared = Primary(system, baseline, metric, "--primary", "score")
    else:
        declared = Primary(be_counterpart(baseline, names), baseline, "dice", "default", "score")
    out_dir, labels_dir = Path(out_dir), Path(labels_dir)
    scored = [score_predictions(folder, labels_dir, out_dir / name, name=name, **score_kwargs)
              for folder, name in zip(pred_dirs, names)]
    empty = [s for s in scored if not s.rows]
    if empty:
        raise ReportError("; ".join(f"{s.predictions}: no case could be scored ({len(s.failed)} failed, e.g. "
                                    f"{s.failed[0][1] if s.failed else 'none'}); see {s.out_dir / 'summary.json'}"
                                    for s in empty))
    results = collect_scored([(s.name, s.out_dir, s.predictions) for s in scored], out_dir)
    if images_dir is None and labels_dir.name == "labelsTr" and (labels_dir.parent / "imagesTr").is_dir():
        images_dir = labels_dir.parent / "imagesTr"
    images = Path(images_dir) if images_dir is not None else None
    cases: CaseFiles = {case_id(p): (_image_for(case_id(p), images), p) for p in list_nifti(labels_dir)}
    report = out_dir / "report"
    report.mkdir(parents=True, exist_ok=True)
    blocks = build_document(results, None, report / "figures", declared, seed=seed, cases=cases)
    return scored, _write(blocks, report, f"beseg score report: {results.task}")

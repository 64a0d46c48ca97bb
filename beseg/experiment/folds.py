"""Cross-validation: the K fold evaluations of one (system, seed) merged into one run the report reads.

The merge depends on its inputs: the merged ``summary.json`` records a SHA-256 of each fold's
``eval/summary.json`` and ``eval/per_case.csv`` (``fold_inputs``), and :func:`merge_is_current`
compares them with the folds as they are now. So a fold evaluated again at any time (by another
compare, after a crash between a fold's evaluation and the merge, by hand) makes the next compare
merge again, instead of the report reading a merge of the fold's old scores.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from beseg.data.splits import PROTOCOLS
from beseg.errors import DataError, ReportError
from beseg.fileio import atomic_output, atomic_write_text
from beseg.metrics import BRATS_DISTANCE_PENALTY_MM
from beseg.score import Summary, summarize, write_scores

__all__ = ["merge_folds", "fold_inputs", "merge_is_current"]

#: The files of a fold's evaluation that the merge reads.
_INPUTS = ("summary.json", "per_case.csv")


def _read_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """``per_case.csv`` -> (columns, rows), cells as written (no number is re-formatted)."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        return list(reader.fieldnames or []), rows


def _link_or_copy(src: Path, dst: Path) -> None:
    """Put ``src`` at ``dst`` atomically: a hard link (no copy of the data) where the file system allows it."""
    with atomic_output(dst, suffix=".nii.gz") as tmp:
        tmp.unlink()
        try:
            os.link(src, tmp)
        except OSError:  # another file system, or no hard links: copy
            shutil.copy2(src, tmp)


def fold_inputs(fold_dirs: Sequence[str | Path]) -> dict[str, dict[str, str | None]]:
    """``{fold folder name: {file: SHA-256 hex, or None when missing}}`` of the files the merge reads."""
    out: dict[str, dict[str, str | None]] = {}
    for fold_dir in map(Path, fold_dirs):
        out[fold_dir.name] = {}
        for name in _INPUTS:
            try:
                with open(fold_dir / "eval" / name, "rb") as f:
                    out[fold_dir.name][name] = hashlib.file_digest(f, "sha256").hexdigest()
            except OSError:
                out[fold_dir.name][name] = None
    return out


def merge_is_current(seed_dir: str | Path, fold_dirs: Sequence[str | Path]) -> bool:
    """Whether ``seed_dir/eval/summary.json`` is the merge of the folds' evaluations as they are now.

    False when the merged summary is missing or unreadable, was made before merges recorded their inputs, or any
    fold's ``summary.json`` or ``per_case.csv`` changed (was evaluated again) since.
    """
    try:
        merged = json.loads((Path(seed_dir) / "eval" / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(merged, dict) and merged.get("fold_inputs") == fold_inputs(fold_dirs)


def merge_folds(seed_dir: str | Path, fold_dirs: Sequence[str | Path], expected: Sequence[str]) -> dict[str, Any]:
    """Merge the K fold evaluations of one (system, seed) into ``seed_dir/eval/``, as one run.

    Every case must have been tested by exactly one fold. The per-case rows and predictions are
    gathered unchanged (hard links where possible); ``summary.json`` is rebuilt from the merged rows
    by the same code as a single evaluation (:func:`beseg.score.summarize`), with
    ``protocol: "cv"``, ``split: "oof"``, ``folds: K`` and each fold's ``epoch``. Fold 0's
    ``config.yaml`` and ``metrics.jsonl`` are copied beside ``eval/`` so the report can show the
    system's settings, step cost and a learning curve (fold 0's). ``fold_inputs`` records the
    hashes of the files read (:func:`fold_inputs`), for :func:`merge_is_current`.

    Args:
        seed_dir: ``RESULTS_DIR/<system>/seed<k>``.
        fold_dirs: the fold run folders, fold 0 first, each evaluated on its test cases.
        expected: every case id of the task.

    Returns:
        The merged summary.

    Raises:
        ReportError: a fold is not evaluated, two folds scored the same case, a case has no
            out-of-fold prediction, or the folds' CSV columns differ.
    """
    seed_dir, fold_dirs = Path(seed_dir), [Path(d) for d in fold_dirs]
    inputs = fold_inputs(fold_dirs)  # before reading: a fold rewritten meanwhile makes the next check merge again
    rows: list[dict[str, str]] = []
    failed: list[tuple[str, str]] = []
    columns: list[str] | None = None
    owner: dict[str, Path] = {}
    summaries = []
    for fold_dir in fold_dirs:
        try:
            summary = Summary.read(fold_dir / "eval" / "summary.json").data
            cols, fold_rows = _read_rows(fold_dir / "eval" / "per_case.csv")
        except (OSError, ValueError, DataError) as err:
            raise ReportError(f"{fold_dir}: cannot read its evaluation ({err}); rerun the comparison.") from None
        if columns is not None and cols != columns:
            raise ReportError(f"{fold_dir / 'eval' / 'per_case.csv'}: columns {cols} differ from fold 0's {columns}.")
        columns = cols
        for case in summary.get("case_ids") or sorted({r["case"] for r in fold_rows}):
            if case in owner:
                raise ReportError(f"case {case} was tested by {owner[case]} and by {fold_dir}; folds must not overlap.")
            owner[case] = fold_dir
        rows.extend(fold_rows)
        failed.extend((f["case"], f["reason"]) for f in summary.get("failed", []))
        summaries.append(summary)
    missing = sorted(set(expected) - set(owner))
    if missing:
        raise ReportError(f"{seed_dir}: no out-of-fold prediction for case(s) {', '.join(missing)}.")

    out_dir = seed_dir / "eval"
    for case, fold_dir in owner.items():
        src = fold_dir / "eval" / "predictions" / f"{case}.nii.gz"
        if src.is_file():
            _link_or_copy(src, out_dir / "predictions" / f"{case}.nii.gz")
    for name in ("config.yaml", "metrics.jsonl"):
        if (fold_dirs[0] / name).is_file():
            atomic_write_text(seed_dir / name, (fold_dirs[0] / name).read_text(encoding="utf-8"))
    first = summaries[0]
    # Summarised by the same code as one evaluation (beseg.score), so the report reads the merge as one run.
    merged = summarize(
        rows, first["classes"], failed, first.get("nsd_tolerance_mm", 1.0),
        first.get("distance_penalty_mm", BRATS_DISTANCE_PENALTY_MM),
        task=first["task"], system=first.get("system"), protocol="cv", split=PROTOCOLS["cv"].merged_split, folds=len(fold_dirs), fold=None,
        selection=f"{first.get('selection', 'best.pt by val Dice')}, per fold", case_ids=sorted(owner),
        checkpoint="fold*/checkpoints (one model per fold)", epoch=[s.get("epoch") for s in summaries],
        fold_runs=[d.name for d in fold_dirs], log="config.yaml and metrics.jsonl beside eval/ are fold 0's",
        fold_inputs=inputs,
    )
    write_scores(out_dir, rows, merged)  # the summary last: it marks the merge as complete
    return merged

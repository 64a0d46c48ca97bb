"""The k-fold merge (:mod:`beseg.experiment.folds`) depends on its inputs: a fold evaluated again makes it stale.

The end-to-end case (a real cross-validation, a fold evaluated again after the merge, the same compare
command merging again) is in ``tests/test_experiment.py::test_cross_validation_scores_every_case_once_and_merges_the_folds``.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from beseg.experiment.folds import fold_inputs, merge_folds, merge_is_current
from beseg.score import summarize, write_scores


def _evaluate(fold_dir: Path, dice: dict[str, float]) -> None:
    """Write a fold's ``eval/`` as ``beseg evaluate`` does: one spleen row per case."""
    rows = [{"case": case, "class": "spleen", "dice": value, "hd95_mm": 1.0, "asd_mm": 0.5, "nsd": 0.9}
            for case, value in dice.items()]
    write_scores(fold_dir / "eval", rows, summarize(rows, ["spleen"], task="phantom_spleen", system="s",
                                                     protocol="cv", split="test", case_ids=sorted(dice), epoch=1))


def _merged_dice(seed_dir: Path) -> dict[str, float]:
    with open(seed_dir / "eval" / "per_case.csv", newline="") as f:
        return {row["case"]: float(row["dice"]) for row in csv.DictReader(f)}


@pytest.fixture
def folds(tmp_path) -> tuple[Path, list[Path]]:
    seed_dir = tmp_path / "s" / "seed0"
    fold_dirs = [seed_dir / "fold0", seed_dir / "fold1"]
    _evaluate(fold_dirs[0], {"a": 0.9, "b": 0.8})
    _evaluate(fold_dirs[1], {"c": 0.7, "d": 0.6})
    return seed_dir, fold_dirs


def test_a_merge_is_current_until_a_fold_is_evaluated_again(folds):
    seed_dir, fold_dirs = folds
    assert not merge_is_current(seed_dir, fold_dirs)  # nothing merged yet
    merged = merge_folds(seed_dir, fold_dirs, ["a", "b", "c", "d"])
    assert merged["fold_inputs"] == fold_inputs(fold_dirs) and merge_is_current(seed_dir, fold_dirs)
    assert merged["mean"]["dice"] == pytest.approx((0.9 + 0.8 + 0.7 + 0.6) / 4)

    _evaluate(fold_dirs[1], {"c": 0.2, "d": 0.6})  # fold 1 evaluated again (another checkpoint, a fixed label...)
    assert not merge_is_current(seed_dir, fold_dirs)
    merge_folds(seed_dir, fold_dirs, ["a", "b", "c", "d"])
    assert _merged_dice(seed_dir) == {"a": 0.9, "b": 0.8, "c": 0.2, "d": 0.6} and merge_is_current(seed_dir, fold_dirs)


def test_a_merge_without_a_record_of_its_inputs_or_with_a_fold_missing_is_not_current(folds):
    seed_dir, fold_dirs = folds
    merge_folds(seed_dir, fold_dirs, ["a", "b", "c", "d"])
    (fold_dirs[0] / "eval" / "per_case.csv").unlink()
    assert not merge_is_current(seed_dir, fold_dirs)
    _evaluate(fold_dirs[0], {"a": 0.9, "b": 0.8})
    summary = seed_dir / "eval" / "summary.json"
    summary.write_text(summary.read_text().replace('"fold_inputs"', '"older_key"'))  # a merge from before the record
    assert not merge_is_current(seed_dir, fold_dirs)

"""Small helpers that several commands share: exit codes, the data folder, protocols, printing."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

EXIT_FAILURE = 1
EXIT_USAGE = 2


def data_dir(data: str | None, task: str, progress: bool = True) -> Path:
    """The ``--data`` folder, or the generated phantom for phantom tasks.

    Raises:
        ConfigError: no ``--data`` for a task that has no generated phantom.
    """
    from beseg.data.presets import canonical_task
    from beseg.errors import ConfigError

    if data:
        return Path(data)
    task = canonical_task(task)
    if task.startswith("phantom_"):
        from beseg.data import ensure_phantom

        return ensure_phantom(task.split("_", 1)[1], progress=progress)
    raise ConfigError(f"--data DIR is required for task {task!r} (the folder holding dataset.json).")


def distance_penalty(value: float | None) -> float | None:
    """``--distance-penalty``: None (not given) is the BraTS default, NaN means "leave undefined" (None)."""
    from beseg.metrics import BRATS_DISTANCE_PENALTY_MM

    if value is None:
        return BRATS_DISTANCE_PENALTY_MM
    return None if math.isnan(value) else value


def add_distance_penalty(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--distance-penalty", type=float, default=None, metavar="MM",
                        help="HD95 and ASD of a class empty in exactly one of prediction and label (default 373.13, "
                             "the BraTS convention); nan leaves them undefined (left out of means, counted)")


def report_failures(failed: list[tuple[str, str]]) -> int:
    """List failed inputs on stderr; the exit code (1 if any failed)."""
    if not failed:
        return 0
    print(f"{len(failed)} input(s) failed:", file=sys.stderr)
    for name, reason in failed:
        print(f"  - {reason if reason.startswith(name) else f'{name}: {reason}'}", file=sys.stderr)
    return EXIT_FAILURE


def add_protocol(parser: argparse.ArgumentParser, default: str) -> None:
    parser.add_argument("--protocol", choices=("heldout", "paper"), default=default,
                        help="heldout: best.pt chosen on validation cases, every number on held-out test cases "
                             "(data.test_frac, default 0.2); paper: the paper's 80/20 split, scored on the validation "
                             f"cases that chose best.pt (optimistic). Default {default}")
    parser.add_argument("--folds", type=int, default=None, metavar="K",
                        help="k-fold cross-validation (with --protocol heldout): every case is scored once, by the "
                             "fold model that neither trained on it nor chose best.pt with it")


def split_systems(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def print_report(result: Any) -> None:
    """The closing lines of compare, demo and reproduce: time, results folder, report link."""
    minutes, seconds = divmod(int(round(result.seconds)), 60)
    print(f"done in {minutes} min {seconds:02d} s; results in {result.results_dir}")
    if result.report is not None:
        print(f"report: {result.report.parent / 'report.md'}")
        print(f"open it: {result.report.resolve().as_uri()}")

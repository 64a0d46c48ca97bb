"""``beseg reproduce``: the paper's full protocol (Table 1, paper patch sizes) on real MSD data.

This is :func:`beseg.experiment.compare.run_compare` with every Table 1 row and the ``task01_*`` or
``task09_*`` presets (paper patches, 500/300 epochs, AMP). It is meant for GPUs: on a CPU a single
run takes days, so without CUDA it refuses unless ``cpu_ok`` is set.

Protocol: it reproduces the paper, so by default it uses the paper's protocol (``paper``: the
80/20 split, Task09 32/9 and Task01 388/96, with ``best.pt`` chosen on the validation cases that
are then reported), which makes its numbers comparable to the paper's Table 1 and optimistic; it
says so when it starts, and the report marks them. ``protocol="heldout"`` (or ``folds=K``) gives
numbers on cases no selection saw, as :func:`run_compare` does by default.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from beseg.errors import ConfigError
from beseg.experiment.compare import TABLE1_SYSTEMS, CompareResult, run_compare

__all__ = ["PAPER_TASKS", "run_reproduce"]

#: Tasks with paper presets, and the MSD folder each expects.
PAPER_TASKS: dict[str, str] = {"task01": "Task01_BrainTumour", "task09": "Task09_Spleen"}


def run_reproduce(task: str, data_dir: str | Path | None, seeds: int = 3, out: str | Path | None = None,
                  systems: Sequence[str] = TABLE1_SYSTEMS, overrides: Sequence[str] = (), cpu_ok: bool = False,
                  progress: bool = True, log: Callable[[str], None] = print, protocol: str = "paper",
                  folds: int | None = None, launcher=None, dry_run: bool = False, measure: bool | None = None,
                  time_margin: float | None = None) -> CompareResult:
    """Run every Table 1 row with the paper's settings for ``task`` and write the report.

    Args:
        task: ``task01`` or ``task09``.
        data_dir: the MSD task folder (e.g. ``Task09_Spleen``), checked before any training.
        seeds: seeds per system.
        out: results folder; default ``results-<task>``.
        systems: rows to run (default all six).
        overrides: config overrides for every run.
        cpu_ok: run even when no CUDA device is present.
        progress: progress bars.
        log: receives the progress lines.
        protocol: ``paper`` (default: the paper's split and selection, optimistic) or ``heldout``.
        folds: K-fold cross-validation (with ``protocol="heldout"``).
        launcher: where the runs execute (see :func:`beseg.experiment.compare.run_compare`); with
            the SLURM launcher the GPU check is the jobs' business, not this machine's.
        dry_run, measure, time_margin: the cost plan (see :func:`~beseg.experiment.compare.run_compare`); a dry
            run trains nothing, so it needs no GPU (without one it measures and projects the CPU).

    Returns:
        The :class:`CompareResult`.

    Raises:
        ConfigError: unknown task, no --data, no GPU without ``cpu_ok``, or a bad protocol.
        DataError: the folder fails the data check or is not the task's data.
    """
    import torch

    key = task.lower()
    if key not in PAPER_TASKS:
        raise ConfigError(f"--task must be one of {', '.join(PAPER_TASKS)}, got {task!r}.")
    if data_dir is None:
        raise ConfigError(f"--data DIR is required: the MSD {PAPER_TASKS[key]} folder (holding dataset.json, "
                          "imagesTr/, labelsTr/); check it with `beseg data check DIR`.")
    if not torch.cuda.is_available() and getattr(launcher, "name", "local") == "local" and not dry_run:
        message = (f"no CUDA device: the paper protocol ({len(systems)} systems x {seeds} seed(s), paper patch "
                   "sizes and epochs) is meant for GPUs and would take weeks on a CPU")
        if not cpu_ok:
            raise ConfigError(f"{message}; pass --cpu-ok to run it anyway, or try `beseg demo`.")
        log(f"warning: {message}; continuing because of --cpu-ok.")
    if protocol == "paper" and folds is None:
        log("note: the paper's protocol: best.pt is chosen on the validation cases that are then reported, so the "
            "numbers are optimistic (comparable to the paper's Table 1, not held out); --protocol heldout or --folds K "
            "for held-out numbers.")
    return run_compare(data_dir, systems, seeds, out or f"results-{key}", overrides=overrides, prefix=key,
                       progress=progress, log=log, protocol=protocol, folds=folds, launcher=launcher,
                       dry_run=dry_run, measure=measure, time_margin=time_margin)

"""``beseg reproduce``: the paper's full protocol (Table 1, paper patch sizes) on real MSD data.

This is :func:`beseg.experiment.compare.run_compare` with every Table 1 row and the ``task01_*`` or
``task09_*`` presets (paper patches, 500/300 epochs, AMP). It is meant for GPUs: on a CPU a single
run takes days, so without CUDA it refuses unless ``cpu_ok`` is set.

Protocol: it reproduces the paper, so by default it uses the paper's protocol (``paper``: the
80/20 split, Task09 32/9 and Task01 388/96, with ``best.pt`` chosen on the validation cases that
are then reported), which makes its numbers comparable to the paper's Table 1 and optimistic; it
says so when it starts, and the report marks them. ``protocol="heldout"`` (or ``folds=K``) gives
numbers on cases no selection saw, as :func:`run_compare` does by default.

Data: ``data`` is the MSD task folder (or the task, loaded). With ``download=True`` it is first put in place by
:func:`beseg.data.download.install_task` (resumable, MD5-checked, safely unpacked) unless it is there
already, at ``data`` or, without one, at :func:`beseg.data.download.data_root` ``/ TaskNN_Name``;
the same call again resumes an interrupted download and skips what is done. :func:`run_compare` loads it
once and hands the task down.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from beseg.data.download import MSD_ARCHIVES
from beseg.data.msd import MSDTask
from beseg.errors import ConfigError
from beseg.experiment.compare import TABLE1_SYSTEMS, CompareResult, run_compare

__all__ = ["PAPER_TASKS", "run_reproduce"]

#: Tasks with paper presets, and the MSD folder each expects.
PAPER_TASKS: dict[str, str] = {task: archive.folder for task, archive in MSD_ARCHIVES.items()}


def run_reproduce(task: str, data: MSDTask | str | Path | None, seeds: int = 3, out: str | Path | None = None,
                  systems: Sequence[str] = TABLE1_SYSTEMS, overrides: Sequence[str] = (), cpu_ok: bool = False,
                  progress: bool = True, log: Callable[[str], None] = print, protocol: str = "paper",
                  folds: int | None = None, launcher=None, download: bool = False, url: str | None = None,
                  md5: str | None = None, primary: str | None = None, replan: bool = False, dry_run: bool = False,
                  measure: bool | None = None, time_margin: float | None = None) -> CompareResult:
    """Run every Table 1 row with the paper's settings for ``task`` and write the report.

    Args:
        task: ``task01`` or ``task09``.
        data: the MSD task folder (e.g. ``Task09_Spleen``) or the task loaded from it, checked before any
            training; with ``download``, the folder where it is put (default
            :func:`beseg.data.download.data_root` ``/ TaskNN_Name``).
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
        download: put the task folder in place first (download, MD5, safe extraction) unless it is there.
        url, md5: with ``download``, the archive's URL and MD5 (default the public mirror's and MONAI's sum).
        primary: ``SYSTEM:METRIC``, the comparison the report answers first (default: segresnet_be vs
            segresnet_dice in Dice); ``replan``: allow changing the declared one (see :func:`run_compare`).
        dry_run, measure, time_margin: the cost plan (see :func:`~beseg.experiment.compare.run_compare`); a dry
            run trains nothing, so it needs no GPU (without one it measures and projects the CPU).

    Returns:
        The :class:`CompareResult`.

    Raises:
        ConfigError: unknown task, no --data (nor ``download``), no GPU without ``cpu_ok``, a bad protocol, or
            ``url``/``md5`` without ``download``.
        DataError: the folder fails the data check or is not the task's data; a download that failed
            (one line naming the URL or file).
    """
    import torch

    key = task.lower()
    if key not in PAPER_TASKS:
        raise ConfigError(f"--task must be one of {', '.join(PAPER_TASKS)}, got {task!r}.")
    if (url or md5) and not download:
        raise ConfigError("--url and --md5 go with --download.")
    if data is None and not download:
        raise ConfigError(f"--data DIR is required: the MSD {PAPER_TASKS[key]} folder (holding dataset.json, "
                          "imagesTr/, labelsTr/); check it with `beseg data check DIR`. Or --download to fetch it.")
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
    if download and not isinstance(data, MSDTask):  # after the GPU check: nothing is fetched for a refused run
        from beseg.data.download import data_root, install_task

        target = Path(data) if data else data_root() / PAPER_TASKS[key]
        data = install_task(key, target, url=url, md5=md5, progress=progress, log=log).task_dir
        log(f"data: {data}")
    return run_compare(data, systems, seeds, out or f"results-{key}", overrides=overrides, prefix=key,
                       progress=progress, log=log, protocol=protocol, folds=folds, launcher=launcher, primary=primary,
                       replan=replan, dry_run=dry_run, measure=measure, time_margin=time_margin)

"""Small helpers that several commands share: exit codes, the data folder, protocols, printing."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

from beseg.errors import EXIT_FAILURE, report_failures  # noqa: F401 - the commands' shared failure list


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


def add_protocol(parser: argparse.ArgumentParser, default: str) -> None:
    from beseg.protocols import PROTOCOLS

    trained = tuple(name for name, spec in PROTOCOLS.items() if not spec.folds)  # cv is chosen by --folds
    parser.add_argument("--protocol", choices=trained, default=default,
                        help="; ".join(f"{name}: {PROTOCOLS[name].description}" for name in trained)
                        + f" (held-out test cases: data.test_frac, default 0.2). Default {default}")
    parser.add_argument("--folds", type=int, default=None, metavar="K",
                        help=f"{PROTOCOLS['cv'].description}, by the fold model that neither trained on it nor chose "
                             "best.pt with it (with --protocol heldout)")


def add_primary(parser: argparse.ArgumentParser, scored: bool = False) -> None:
    """The primary comparison option of compare and reproduce (with ``--replan``), or of score (``scored``);
    see :mod:`beseg.experiment.primary`."""
    what, other = ("NAME", "folder") if scored else ("SYSTEM", "system")
    when = ("the report says it was chosen after the predictions were made" if scored
            else "recorded in RESULTS_DIR/plan.json before training")
    parser.add_argument("--primary", metavar=f"{what}:METRIC",
                        help="the comparison the report answers first, against the baseline, at 5%% (metric: dice, "
                             f"hd95, asd or nsd, averaged over the classes; default: the baseline's BE version if it "
                             f"is compared, else the first other {other}, in Dice); {when}")
    if not scored:
        parser.add_argument("--replan", action="store_true",
                            help="allow changing the primary comparison (or the baseline) recorded in plan.json; the "
                                 "report says it was changed and after how many finished runs")


def add_launchers(parser: argparse.ArgumentParser, status: bool = True) -> None:
    """compare's (and reproduce's) launcher options: where the runs execute (see :mod:`beseg.experiment.launch`)."""
    group = parser.add_argument_group(
        "where the runs execute", "Each run is an independent job: trained, then evaluated into RESULTS_DIR. "
        "Rerunning the same command skips finished runs and resumes interrupted ones, whichever launcher ran them.")
    if status:
        group.add_argument("--status", action="store_true",
                           help="print one line per run (state, host/pid or job, epoch, best val Dice, time) and exit; "
                                "`beseg compare RESULTS_DIR --status`")
    group.add_argument("--launcher", choices=("local", "slurm"), default="local",
                       help="local: this machine (default); slurm: one SLURM job per run, submitted with sbatch")
    group.add_argument("--devices", metavar="0,1,...",
                       help="local: GPUs to use, one run per GPU at a time (training and evaluation on that GPU)")
    group.add_argument("--jobs", type=int, default=1, metavar="N",
                       help="local: CPU runs at a time, each with its share of the cores (default 1: in this process)")
    group.add_argument("--slurm-partition", metavar="NAME", help="slurm: partition (default: the cluster's default)")
    group.add_argument("--slurm-time", metavar="TIME",
                       help="slurm: time limit per job, e.g. 12:00:00, or auto: each job's from the measured cost plan "
                            "(--slurm-time-margin x its projected time, capped by the partition's MaxTime; a run "
                            "longer than that is planned to requeue); a job that reaches its limit is requeued and "
                            "resumes from last.pt")
    group.add_argument("--slurm-time-margin", type=float, default=None, metavar="X",
                       help="slurm: with --slurm-time auto, ask for X times each run's projected time (default 1.5)")
    group.add_argument("--gpus-per-run", type=int, default=0, metavar="G",
                       help="slurm: GPUs per run (G > 1 trains with DDP inside the job; default 0: CPU)")
    group.add_argument("--cpus-per-run", type=int, default=1, metavar="C", help="slurm: CPU cores per run (default 1)")
    group.add_argument("--mem-per-run", metavar="MEM", help="slurm: memory per run, e.g. 32G")
    group.add_argument("--slurm-arg", action="append", default=[], metavar="KEY=VALUE",
                       help="slurm: any other sbatch option, repeatable (account=X, qos=Y, constraint=a100)")
    group.add_argument("--detach", action="store_true",
                       help="slurm: submit, print the job ids and return; the same command later collects")
    plan = parser.add_argument_group(
        "cost plan", "What the comparison will cost before anything trains: the work of every run, timings measured "
        "on this machine's device with the real presets and data, the projected wall time for these launcher "
        "options, and the peak memory of a training step (docs/clusters.md).")
    plan.add_argument("--dry-run", action="store_true",
                      help="check the data, pin the split, measure a few training steps, one validation and one store "
                           "case of each system, print the cost plan and write it into RESULTS_DIR/plan.json; "
                           "nothing trains or is submitted")
    plan.add_argument("--no-measure", action="store_true",
                      help="with --dry-run or --slurm-time auto: use the timings cached in RESULTS_DIR/cost/ "
                           "instead of measuring")


def make_launcher(args: argparse.Namespace) -> Any:
    from beseg.experiment.launch import make_launcher as make

    from beseg.errors import ConfigError

    if args.launcher != "slurm" and args.slurm_time_margin is not None:
        raise ConfigError("--slurm-time-margin only applies with --launcher slurm --slurm-time auto.")
    if args.slurm_time_margin is not None and args.slurm_time != "auto":
        raise ConfigError("--slurm-time-margin only applies with --slurm-time auto.")
    if args.dry_run and args.detach:
        raise ConfigError("--dry-run submits nothing, so --detach has nothing to do; drop one of them.")
    return make(args.launcher, devices=args.devices, jobs=args.jobs, partition=args.slurm_partition,
                time_limit=args.slurm_time, gpus=args.gpus_per_run, cpus=args.cpus_per_run,
                mem=args.mem_per_run, extra=args.slurm_arg, detach=args.detach)


def cost_options(args: argparse.Namespace) -> dict[str, Any]:
    """``run_compare``'s cost-plan arguments from ``--dry-run``, ``--no-measure`` and ``--slurm-time-margin``."""
    return {"dry_run": args.dry_run, "measure": False if args.no_measure else None,
            "time_margin": args.slurm_time_margin}


def finish(result: Any, out: Any) -> int:
    """Print what a comparison did: the cost plan of a dry run, job ids when detached, the failed runs (exit 1),
    or the report."""
    if result.dry_run:
        from beseg.experiment.cost import format_cost_plan

        for line in format_cost_plan(result.cost or {}):
            print(line)
        print(f"dry run: nothing was trained or submitted; the plan is in {result.results_dir / 'plan.json'} "
              "(key \"cost\"); the same command without --dry-run runs it")
        broken = [name for name, entry in (result.cost or {}).get("figures", {}).items() if entry["figures"].get("error")]
        if broken:
            print(f"{len(broken)} system(s) failed while being measured ({', '.join(broken)}): their runs would fail; "
                  "see the warnings above", file=sys.stderr)
            return EXIT_FAILURE
        return 0
    if result.detached:
        for run_id, job in result.jobs.items():
            print(f"{run_id}: SLURM job {job}")
        print(f"submitted; `beseg compare {out} --status` shows progress, and the same command again collects "
              "the results and writes the report")
        return 0
    if result.failed:
        print(f"{len(result.failed)} run(s) failed:", file=sys.stderr)
        for run_id, (error, log) in result.failed.items():
            print(f"  - {run_id}: {error}" + (f" (log: {log})" if log else ""), file=sys.stderr)
        print("the other runs are kept; fix the cause and run the same command again to retry the failed ones",
              file=sys.stderr)
        return EXIT_FAILURE
    print_report(result)
    return 0


def split_systems(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def print_report(result: Any) -> None:
    """The closing lines of compare, demo and reproduce: time, results folder, report link."""
    minutes, seconds = divmod(int(round(result.seconds)), 60)
    print(f"done in {minutes} min {seconds:02d} s; results in {result.results_dir}")
    if result.report is not None:
        print(f"report: {result.report.parent / 'report.md'}")
        print(f"open it: {result.report.resolve().as_uri()}")

"""``beseg reproduce``: the paper's full protocol (all Table 1 rows, paper patches) on real MSD data."""

from __future__ import annotations

import argparse

from beseg.commands.common import (
    add_launchers, add_primary, add_protocol, cost_options, finish, make_launcher, split_systems,
)



def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Compare all six Table 1 rows with the task01_*/task09_* presets on the MSD folder. "
                          "Without a CUDA device it refuses unless --cpu-ok is given.")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides for every run")
    parser.add_argument("--task", required=True, choices=("task01", "task09"), help="MSD task")
    parser.add_argument("--data", metavar="DIR", help="the MSD task folder (Task01_BrainTumour or Task09_Spleen); "
                                                      "with --download, where it is put")
    parser.add_argument("--download", action="store_true",
                        help="download the task first if it is not in place (as `beseg data download`: resumable, "
                             "MD5-checked); into --data, else $BESEG_DATA_DIR/<TaskNN_Name>, else "
                             "$BESEG_CACHE/msd/<TaskNN_Name>")
    parser.add_argument("--url", metavar="URL", help="with --download: the archive's URL (default the public mirror, "
                                                     "or $BESEG_MSD_MIRROR)")
    parser.add_argument("--md5", metavar="SUM", help="with --download: the archive's expected MD5")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per system (default 3)")
    parser.add_argument("--out", metavar="RESULTS_DIR", help="results folder (default results-<task>)")
    parser.add_argument("--systems", default=None, metavar="A,B,...", help="subset of Table 1 rows (default all)")
    add_protocol(parser, "paper")
    add_primary(parser)
    parser.add_argument("--cpu-ok", action="store_true", help="run even without a CUDA device")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_launchers(parser, status=False)


def run(args: argparse.Namespace) -> int:
    from beseg.experiment.plan import TABLE1_SYSTEMS
    from beseg.experiment.reproduce import run_reproduce

    systems = split_systems(args.systems) if args.systems else list(TABLE1_SYSTEMS)
    result = run_reproduce(args.task, args.data, seeds=args.seeds, out=args.out, systems=systems,
                           overrides=args.overrides, cpu_ok=args.cpu_ok, progress=not args.no_progress,
                           protocol=args.protocol, folds=args.folds, launcher=make_launcher(args),
                           download=args.download, url=args.url, md5=args.md5, primary=args.primary,
                           replan=args.replan, **cost_options(args))
    return finish(result, result.results_dir)

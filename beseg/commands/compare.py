"""``beseg compare``: train and evaluate systems x seeds on one split, then write the Table 1 report."""

from __future__ import annotations

import argparse

from beseg.commands.common import (
    add_launchers, add_primary, add_protocol, cost_options, data_dir, finish, make_launcher, split_systems,
)



def add_arguments(parser: argparse.ArgumentParser) -> None:
    from beseg.experiment.plan import ALIASES, TABLE1_SYSTEMS

    names = ", ".join([*TABLE1_SYSTEMS, *ALIASES])
    parser.description = (
        "Train and evaluate every system with every seed on the same split (finished runs are skipped, interrupted "
        "ones resumed), then write RESULTS_DIR/report/report.{md,html}. By default best.pt is chosen on validation "
        "cases and every reported number is on held-out test cases.")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides for every run")
    parser.add_argument("--data", metavar="DIR", help="MSD task folder (default for phantom tasks: the phantom)")
    parser.add_argument("--systems", default="dice,dice_be", metavar="A,B,...",
                        help=f"comma-separated Table 1 rows or aliases ({names}), YAML config files, or nnU-Net v2 "
                             "trainers nnunet:TRAINER[@CONFIGURATION] (e.g. nnunet:nnUNetTrainer,nnunet:nnUNetTrainerBE) "
                             "(default: dice,dice_be)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per system: 0..N-1 (default 3); repeats of an "
                                                             "nnU-Net trainer, which has no seed")
    parser.add_argument("--nnunet-python", metavar="PYTHON",
                        help="interpreter of the environment with nnunetv2 (and beseg) that runs the nnunet: systems "
                             "(default: $BESEG_NNUNET_PYTHON, else this one)")
    parser.add_argument("--baseline", metavar="SYSTEM",
                        help="the system the report compares the others with (default: nnUNetTrainer if compared, "
                             "else segresnet_dice, else the first)")
    add_primary(parser)
    parser.add_argument("--out", metavar="RESULTS_DIR", help="results folder (reused to resume); required")
    parser.add_argument("--task", "--preset-prefix", dest="task", metavar="TASK",
                        help="preset prefix: phantom_spleen, task09 or task01 (default: from the dataset)")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for every run (repeatable), e.g. --set train.epochs=5")
    add_protocol(parser, "heldout")
    parser.add_argument("--no-report", action="store_true", help="train and evaluate only")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_launchers(parser)


def run(args: argparse.Namespace) -> int:
    from beseg.data.presets import canonical_task
    from beseg.errors import ConfigError

    if args.status:
        from beseg.experiment.status import format_status, plan_status

        folders = [o for o in args.overrides if "=" not in o]
        if len(folders) + (args.out is not None) != 1:
            raise ConfigError("--status needs the results folder: `beseg compare RESULTS_DIR --status`.")
        print(format_status(plan_status(args.out or folders[0])))
        return 0
    if args.out is None:
        raise ConfigError("--out RESULTS_DIR is required (the results folder; reused to resume).")
    from beseg.experiment.compare import run_compare

    launcher = make_launcher(args)
    progress = not args.no_progress
    task = canonical_task(args.task) if args.task else None
    data = args.data
    if data is None:
        if not (task or "").startswith("phantom_"):
            raise ConfigError("--data DIR is required: the MSD task folder holding dataset.json (only "
                              "--task phantom_spleen generates its own data).")
        data = data_dir(None, task, progress)
    result = run_compare(data, split_systems(args.systems), args.seeds, args.out, overrides=[*args.sets, *args.overrides],
                         prefix=task, progress=progress, report=not args.no_report, protocol=args.protocol,
                         folds=args.folds, launcher=launcher, nnunet_python=args.nnunet_python,
                         baseline=args.baseline, primary=args.primary, replan=args.replan, **cost_options(args))
    return finish(result, args.out)

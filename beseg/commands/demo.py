"""``beseg demo``: Dice vs Dice + BE on the phantom spleen, scored on held-out test cases, with the report."""

from __future__ import annotations

import argparse

from beseg.commands.common import print_report



def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Generate the 40-case phantom spleen (cached), train SegResNet + Dice and SegResNet + Dice + BE with a "
        "CPU-sized schedule on 20 cases (4 more choose best.pt), score both on the 16 held-out test cases, and write "
        "the report into OUT/report/. Rerunning reuses OUT (finished runs are skipped).")
    parser.add_argument("--out", default="beseg-demo", metavar="DIR", help="results folder (default ./beseg-demo)")
    parser.add_argument("--seeds", type=int, default=1, help="seeds per system (default 1)")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="extra config override for both runs (repeatable), e.g. --set train.threads=4")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    # Test-only knobs: a tiny demo for the test suite; hidden from --help.
    for flag in ("--epochs", "--steps", "--patch", "--init-filters", "--val-every", "--phantom-cases"):
        parser.add_argument(flag, type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--phantom-size", type=int, nargs=3, default=None, help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    from beseg.experiment.demo import demo_overrides, run_demo

    phantom = {}
    if args.phantom_cases is not None:
        phantom.update(cases=args.phantom_cases, test_cases=0)
    if args.phantom_size is not None:
        phantom["size"] = tuple(args.phantom_size)
    overrides = demo_overrides(epochs=args.epochs, steps=args.steps, patch=args.patch,
                               init_filters=args.init_filters, val_every=args.val_every)
    result = run_demo(args.out, seeds=args.seeds, overrides=[*overrides, *args.sets], phantom=phantom or None,
                      progress=not args.no_progress)
    print_report(result)
    return 0

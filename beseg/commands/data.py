"""``beseg data check|phantom``: validate MSD task folders and make phantom datasets."""

from __future__ import annotations

import argparse

from beseg.commands.common import EXIT_FAILURE



def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="data_command", required=True, metavar="WHAT")
    check = sub.add_parser("check", help="validate an MSD task folder; exits 1 listing every problem")
    check.add_argument("dir", metavar="DIR", help="task folder containing dataset.json")
    check.add_argument("--affine-tol", type=float, default=1e-3,
                       help="largest allowed image/label affine difference (mm)")
    check.set_defaults(func=_check)
    phantom = sub.add_parser("phantom", help="write a synthetic task folder in MSD layout")
    phantom.add_argument("out", metavar="OUT", help="folder to create")
    phantom.add_argument("--task", choices=("spleen", "brain"), default="spleen",
                         help="spleen: CT-like, read like Task09; brain: 4-channel MRI-like, read like Task01")
    phantom.add_argument("--cases", type=int, default=24, help="training cases")
    phantom.add_argument("--test-cases", type=int, default=4, help="unlabelled cases in imagesTs/")
    phantom.add_argument("--seed", type=int, default=0, help="random seed (same seed, same files)")
    phantom.add_argument("--size", type=int, nargs=3, default=(96, 96, 32), metavar=("X", "Y", "Z"),
                         help="voxels per axis")
    phantom.add_argument("--spacing", type=float, nargs=3, default=(0.8, 0.8, 2.5), metavar=("SX", "SY", "SZ"),
                         help="voxel size in mm")
    phantom.set_defaults(func=_phantom)


def run(args: argparse.Namespace) -> int:
    return args.func(args)


def _check(args: argparse.Namespace) -> int:
    from beseg.data.check import check_task

    report = check_task(args.dir, affine_tol=args.affine_tol)
    if report.cases:
        print(report.format_table())
        print()
    print(report.format_summary())
    return 0 if report.ok else EXIT_FAILURE


def _phantom(args: argparse.Namespace) -> int:
    import time

    from beseg.data.phantom import make_phantom

    start = time.perf_counter()
    out = make_phantom(args.out, task=args.task, cases=args.cases, test_cases=args.test_cases, seed=args.seed,
                       size=tuple(args.size), spacing=tuple(args.spacing))
    print(f"wrote {args.task} phantom ({args.cases} training + {args.test_cases} test cases) to {out} "
          f"in {time.perf_counter() - start:.1f} s")
    return 0

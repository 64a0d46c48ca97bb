"""Command-line interface: ``beseg <command> ...``.

The CLI only parses arguments and hands them to the library; every user-facing failure is a
:class:`~beseg.errors.BesegError` (or a ``ValueError``/``TypeError`` raised for a bad argument),
printed as one line on stderr with a non-zero exit and no traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from beseg import __version__
from beseg.errors import BesegError

EXIT_USAGE = 2
EXIT_FAILURE = 1


def _add_bench(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help="benchmarks (results go to stdout; record them in docs/benchmarks.md)")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True, metavar="WHAT")
    loss = bench_sub.add_parser(
        "loss", help="forward+backward time and peak memory of the BE loss against the paper's form and MONAI DiceLoss"
    )
    loss.add_argument("--shapes", nargs="+", default=None, metavar="B,C,H,W,D",
                      help="input shapes (default: 2,1,96,96,96 and 1,3,128,128,128)")
    loss.add_argument("--repeats", type=int, default=15, help="timed repetitions per case; the median is reported")
    loss.add_argument("--warmup", type=int, default=3, help="untimed repetitions before timing")
    loss.add_argument("--threads", type=int, default=2, help="torch intra-op threads (CPU)")
    loss.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    loss.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    loss.set_defaults(func=_run_bench_loss)
    data = bench_sub.add_parser(
        "data", help="patches/s of the cached phantom training pipeline against the CPU training step time"
    )
    data.add_argument("--cases", type=int, default=12, help="phantom spleen training cases to generate")
    data.add_argument("--patch", type=int, nargs=3, default=(64, 64, 64), metavar=("X", "Y", "Z"),
                      help="patch size (voxels at 1 mm)")
    data.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    data.add_argument("--patches", type=int, default=200, help="patches to time after the cache is warm")
    data.add_argument("--steps", type=int, default=3, help="timed training steps per model (median reported)")
    data.add_argument("--threads", type=int, default=2, help="torch intra-op threads for the training step")
    data.add_argument("--cache", choices=("memory", "disk"), default="memory", help="dataset cache kind")
    data.set_defaults(func=_run_bench_data)


def _run_bench_loss(args: argparse.Namespace) -> int:
    from beseg.bench.loss import parse_shape, run_loss_benchmark

    shapes = [parse_shape(s) for s in args.shapes] if args.shapes else None
    run_loss_benchmark(
        shapes=shapes, repeats=args.repeats, warmup=args.warmup, threads=args.threads,
        device=args.device, memory=not args.no_memory,
    )
    return 0


def _run_bench_data(args: argparse.Namespace) -> int:
    from beseg.bench.data import run_data_benchmark

    run_data_benchmark(cases=args.cases, patch_size=tuple(args.patch), workers=args.workers,
                       patches=args.patches, steps=args.steps, threads=args.threads, cache=args.cache)
    return 0


def _add_data(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="check MSD task folders and make phantom datasets")
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="WHAT")
    check = data_sub.add_parser("check", help="validate an MSD task folder; exits 1 listing every problem")
    check.add_argument("dir", metavar="DIR", help="task folder containing dataset.json")
    check.add_argument("--affine-tol", type=float, default=1e-3,
                       help="largest allowed image/label affine difference (mm)")
    check.set_defaults(func=_run_data_check)
    phantom = data_sub.add_parser("phantom", help="write a synthetic task folder in MSD layout")
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
    phantom.set_defaults(func=_run_data_phantom)


def _run_data_check(args: argparse.Namespace) -> int:
    from beseg.data.check import check_task

    report = check_task(args.dir, affine_tol=args.affine_tol)
    if report.cases:
        print(report.format_table())
        print()
    print(report.format_summary())
    return 0 if report.ok else EXIT_FAILURE


def _run_data_phantom(args: argparse.Namespace) -> int:
    import time

    from beseg.data.phantom import make_phantom

    start = time.perf_counter()
    out = make_phantom(args.out, task=args.task, cases=args.cases, test_cases=args.test_cases, seed=args.seed,
                       size=tuple(args.size), spacing=tuple(args.spacing))
    print(f"wrote {args.task} phantom ({args.cases} training + {args.test_cases} test cases) to {out} "
          f"in {time.perf_counter() - start:.1f} s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="beseg", description="Boundary-enhanced 3D medical image segmentation."
    )
    parser.add_argument("--version", action="version", version=f"beseg {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_bench(sub)
    _add_data(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (BesegError, ValueError, TypeError, FileNotFoundError, PermissionError) as err:
        print(f"beseg {args.command}: error: {err}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print(f"beseg {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

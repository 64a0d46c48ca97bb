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


def _run_bench_loss(args: argparse.Namespace) -> int:
    from beseg.bench.loss import parse_shape, run_loss_benchmark

    shapes = [parse_shape(s) for s in args.shapes] if args.shapes else None
    run_loss_benchmark(
        shapes=shapes, repeats=args.repeats, warmup=args.warmup, threads=args.threads,
        device=args.device, memory=not args.no_memory,
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="beseg", description="Boundary-enhanced 3D medical image segmentation."
    )
    parser.add_argument("--version", action="version", version=f"beseg {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_bench(sub)
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

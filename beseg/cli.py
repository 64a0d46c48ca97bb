"""Command-line interface: ``beseg <command> ...``.

The CLI is a table of commands. Each command's parser and handler live together in its module under
:mod:`beseg.commands`, which is imported only when that command runs, so ``beseg --help`` and
``beseg score --help`` import no training code.

Errors: beseg's own errors (:class:`~beseg.errors.BesegError`, whose messages name the file or
argument) and OS errors (a missing file, a full disk) are printed as one line on stderr with exit
code 1. Any other exception is a bug in beseg: it keeps its traceback and asks for a report.
``--debug`` (or ``BESEG_DEBUG=1``) prints the traceback of every error.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from importlib import import_module

from beseg import __version__
from beseg.errors import EXIT_BUG, EXIT_FAILURE, run_reporting_errors  # noqa: F401 - the exit codes, for callers

#: command -> one-line help; the command's code is ``beseg.commands.<command>``.
COMMANDS: dict[str, str] = {
    "demo": "the main command: Dice vs Dice + BE on the phantom spleen, scored on 16 held-out test cases, report in "
            "./beseg-demo/ (about 5 min on 2 CPU cores)",
    "train": "train a config preset or YAML file on a task folder",
    "evaluate": "Dice, HD95, ASD and NSD per case of a trained model",
    "predict": "segment NIfTI images into label maps in their own geometry (several runs: an ensemble)",
    "export": "write a self-contained ONNX model folder (beseg-predict runs it without PyTorch)",
    "compare": "train and evaluate systems x seeds on one split, then write the Table 1 report",
    "reproduce": "the paper's full protocol (all Table 1 rows, paper patches) on real MSD data; for GPUs",
    "score": "Dice, HD95, ASD and NSD of NIfTI prediction folders (nnU-Net, MONAI, ...) against labels; two or more "
             "folders: the paired comparison report",
    "configs": "list the shipped config presets (the paper's Table 1 rows)",
    "data": "download, check and prepare MSD task folders, make phantom datasets",
    "bench": "benchmarks (results go to stdout; record them in docs/benchmarks.md)",
    "nnunet": "BE trainers for nnU-Net v2 (needs the nnunet extra)",
}
#: Commands that train in this process; they set the CPU allocator as :mod:`beseg.allocator` explains.
TRAINING_COMMANDS = ("train", "compare", "demo", "reproduce")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``beseg`` parser; only ``command``'s module is imported and given its options.

    Args:
        command: the command being run (None: only the list of commands, as for ``beseg --help``).
    """
    parser = argparse.ArgumentParser(prog="beseg", description="Boundary-enhanced 3D medical image segmentation.")
    parser.add_argument("--version", action="version", version=f"beseg {__version__}")
    parser.add_argument("--debug", action="store_true", default=os.environ.get("BESEG_DEBUG", "") not in ("", "0"),
                        help="print the full traceback of any error (also BESEG_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        cmd = sub.add_parser(name, help=help_text, description=help_text[:1].upper() + help_text[1:] + ".")
        if name == command:
            module = import_module(f"beseg.commands.{name}")
            module.add_arguments(cmd)
            cmd.set_defaults(run=module.run)
    return parser


def _command(argv: Sequence[str]) -> str | None:
    """The command named in ``argv`` (the first argument that is one), or None."""
    return next((a for a in argv if a in COMMANDS), None)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Parse ``beseg`` arguments (without the program name) as :func:`main` does.

    Overrides (``KEY=VALUE``) may also come after options such as ``--out``, which argparse alone
    rejects. Nothing runs: the docs test parses every ``beseg ...`` line of the documentation here.

    Raises:
        SystemExit: a usage error (argparse prints it and exits with code 2), or ``--help``/``--version``.
    """
    argv = list(argv)
    parser = build_parser(_command(argv))
    args, extra = parser.parse_known_args(argv)
    if extra:
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.command in TRAINING_COMMANDS:
        from beseg.allocator import keep_freed_memory

        keep_freed_memory()  # the process is beseg's own: keep freed volumes (see beseg.allocator)
    # one line for beseg's errors and OS errors (a full disk), exit 1; any other exception is a bug (exit 3)
    return run_reporting_errors(f"beseg {args.command}", lambda: int(args.run(args) or 0), args.debug)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

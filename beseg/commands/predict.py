"""``beseg predict``: segment NIfTI images into label maps in their own geometry (several runs: an ensemble)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from beseg.commands.common import report_failures


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from beseg_runtime.window import DEFAULT_WARN_BELOW

    parser.description = ("RUN_DIR|CHECKPOINT... come first (run folders holding checkpoints/, or .pt files), then "
                          "the images; several runs average their probabilities (e.g. the k folds).")
    parser.add_argument("paths", nargs="+", metavar="PATH",
                        help="one or more runs (RUN_DIR or CHECKPOINT.pt), then NIfTI images (.nii, .nii.gz) or "
                             "folders of them")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="output folder for OUT/<name>.nii.gz (not the folder of an input)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace label maps in DIR that beseg wrote earlier (never any other file)")
    parser.add_argument("--mirror", action="store_true",
                        help="test-time mirroring: average over the 8 flips of the three axes (8x the time)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--warn-below", type=float, default=DEFAULT_WARN_BELOW, metavar="FRACTION",
                        help="warn about a scan under FRACTION of the window along some axis once resampled (it is "
                             f"still predicted, padded); default {DEFAULT_WARN_BELOW}, 0 never warns")


def split_runs(paths: Sequence[str]) -> tuple[list[str], list[str]]:
    """Leading run folders (holding checkpoints/) and .pt files, then the images.

    Raises:
        ConfigError: no run first, or no image after the runs.
    """
    from pathlib import Path

    from beseg.errors import ConfigError

    runs = 0
    while runs < len(paths) and (paths[runs].endswith(".pt") or (Path(paths[runs]) / "checkpoints").is_dir()):
        runs += 1
    if runs == 0:
        raise ConfigError(f"{paths[0]} is not a run folder (no checkpoints/ in it) or a .pt checkpoint; give the "
                          "run(s) first, then the images.")
    if runs == len(paths):
        raise ConfigError("no images given after the run(s).")
    return list(paths[:runs]), list(paths[runs:])


def run(args: argparse.Namespace) -> int:
    import sys

    from beseg.engine.predict import predict_files
    from beseg.errors import DataError

    runs, images = split_runs(args.paths)
    result = predict_files(runs, images, args.out, device=args.device, mirror_axes=(0, 1, 2) if args.mirror else (),
                           overwrite=args.overwrite, warn_below=args.warn_below,
                           on_warning=lambda message: print(f"beseg predict: warning: {message}", file=sys.stderr,
                                                            flush=True))
    if not result.written and not result.failed:
        raise DataError("no NIfTI images (.nii, .nii.gz) in " + ", ".join(images))
    for path in result.written:
        print(f"wrote {path}")
    return report_failures(result.failed)

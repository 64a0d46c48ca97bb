"""``beseg predict``: segment NIfTI images into label maps in their own geometry."""

from __future__ import annotations

import argparse

from beseg.commands.common import report_failures



def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", metavar="CHECKPOINT|RUN_DIR")
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="NIfTI images (.nii or .nii.gz)")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder")
    parser.add_argument("--device", default="auto")


def run(args: argparse.Namespace) -> int:
    from beseg.engine.predict import predict_files

    result = predict_files(args.checkpoint, args.images, args.out, device=args.device)
    for path in result.written:
        print(f"wrote {path}")
    return report_failures(result.failed)

"""``beseg export``: a self-contained ONNX model folder that ``beseg-predict`` runs without PyTorch."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR|CHECKPOINT", help="one run, or several as an ensemble")
    parser.add_argument("--out", required=True, metavar="MODEL_DIR", help="the model folder to create")
    parser.add_argument("--mirror", action="store_true", help="record test-time mirroring over the three axes")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing MODEL_DIR")


def run(args: argparse.Namespace) -> int:
    from beseg.engine.export import export_runs

    result = export_runs(args.runs, args.out, mirror_axes=(0, 1, 2) if args.mirror else (), overwrite=args.overwrite)
    print(f"wrote {result.out_dir}: " + ", ".join(result.files))
    return 0

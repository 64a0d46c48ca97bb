"""``beseg-predict MODEL_DIR IMAGE_OR_FOLDER... --out DIR``: an exported model, without PyTorch.

Every failure is one line on stderr naming the file and the reason, with a non-zero exit: 1 when
the model folder cannot be used, onnxruntime is missing, the outputs would overwrite an input or
collide (checked before anything runs), or any image failed (the others are still written, and the
failed ones are listed at the end); 3 for a bug in beseg (with its traceback). Warnings (a scan much
smaller than the window, still predicted) are one line each on stderr.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from beseg_runtime.errors import EXIT_FAILURE, report_failures, run_reporting_errors

PROG = "beseg-predict"


def build_parser() -> argparse.ArgumentParser:
    from beseg_runtime.window import DEFAULT_WARN_BELOW

    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Segment NIfTI images with a model folder written by `beseg export` (onnxruntime, no PyTorch). "
                    "Label maps are written in each input's own grid and affine, as OUT/<name>.nii.gz; OUT may not "
                    "be an input's folder, and existing files there are not replaced (see --overwrite).")
    parser.add_argument("model_dir", metavar="MODEL_DIR", help="folder written by `beseg export`")
    parser.add_argument("images", nargs="+", metavar="IMAGE_OR_FOLDER", help="NIfTI images, or folders of them")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder (not the folder of an input)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace label maps in DIR that beseg wrote earlier (never any other file)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                        help="auto: onnxruntime's CUDA provider when it has one, else the CPU")
    parser.add_argument("--no-mirror", action="store_true", help="skip the test-time mirroring pipeline.json asks for")
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads")
    parser.add_argument("--batch-size", type=int, default=1, help="windows per network call")
    parser.add_argument("--warn-below", type=float, default=DEFAULT_WARN_BELOW, metavar="FRACTION",
                        help="warn about a scan under FRACTION of the window along some axis once resampled (it is "
                             f"still predicted, padded); default {DEFAULT_WARN_BELOW}, 0 never warns")
    parser.add_argument("--quiet", action="store_true", help="no 'wrote' lines")
    parser.add_argument("--debug", action="store_true", default=os.environ.get("BESEG_DEBUG", "") not in ("", "0"),
                        help="print the full traceback of any error (also BESEG_DEBUG=1)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_reporting_errors(PROG, lambda: _predict(args), args.debug)


def _predict(args: argparse.Namespace) -> int:
    from beseg_runtime.runtime import Predictor

    predictor = Predictor(args.model_dir, device=args.device, mirror=False if args.no_mirror else None,
                          threads=args.threads, batch_size=max(args.batch_size, 1), warn_below=args.warn_below)
    if not args.quiet:
        p = predictor.pipeline
        print(f"{args.model_dir}: task {p.raw.get('task')}, {len(p.members)} network(s), mirroring "
              f"{list(predictor.mirror_axes) or 'off'}, onnxruntime {predictor.providers[0]}", flush=True)
    result = predictor.predict_files(
        args.images, args.out, progress=not args.quiet, overwrite=args.overwrite,
        on_warning=lambda message: print(f"{PROG}: warning: {message}", file=sys.stderr, flush=True))
    if not result.written and not result.failed:
        print(f"{PROG}: error: no NIfTI images (.nii, .nii.gz) in " + ", ".join(args.images), file=sys.stderr)
        return EXIT_FAILURE
    return report_failures(result.failed)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

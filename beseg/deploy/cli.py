"""``beseg-predict MODEL_DIR IMAGE_OR_FOLDER... --out DIR``: an exported model, without PyTorch.

Every failure is one line on stderr naming the file and the reason, with a non-zero exit: 1 when
the model folder cannot be used or any image failed (the others are still written).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from beseg.errors import BesegError

EXIT_FAILURE = 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="beseg-predict",
        description="Segment NIfTI images with a model folder written by `beseg export` (onnxruntime, no PyTorch). "
                    "Label maps are written in each input's own grid and affine, as OUT/<name>.nii.gz.")
    parser.add_argument("model_dir", metavar="MODEL_DIR", help="folder written by `beseg export`")
    parser.add_argument("images", nargs="+", metavar="IMAGE_OR_FOLDER", help="NIfTI images, or folders of them")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                        help="auto: onnxruntime's CUDA provider when it has one, else the CPU")
    parser.add_argument("--no-mirror", action="store_true", help="skip the test-time mirroring pipeline.json asks for")
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads")
    parser.add_argument("--batch-size", type=int, default=1, help="windows per network call")
    parser.add_argument("--quiet", action="store_true", help="no 'wrote' lines")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from beseg.deploy.runtime import Predictor

        predictor = Predictor(args.model_dir, device=args.device, mirror=False if args.no_mirror else None,
                              threads=args.threads, batch_size=max(args.batch_size, 1))
        if not args.quiet:
            p = predictor.pipeline
            print(f"{args.model_dir}: task {p.raw.get('task')}, {len(p.members)} network(s), mirroring "
                  f"{list(predictor.mirror_axes) or 'off'}, onnxruntime {predictor.providers[0]}", flush=True)
        result = predictor.predict_files(args.images, args.out, progress=not args.quiet)
    except (BesegError, OSError, ValueError) as err:
        print(f"beseg-predict: error: {err}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print("beseg-predict: interrupted", file=sys.stderr)
        return 130
    for image, reason in result.failed:
        print(f"beseg-predict: error: {reason}", file=sys.stderr)
    if not result.written and not result.failed:
        print("beseg-predict: error: no NIfTI images (.nii, .nii.gz) in " + ", ".join(args.images), file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_FAILURE if result.failed else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

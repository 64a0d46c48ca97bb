"""``beseg score``: score folders of NIfTI predictions against labels; two or more give the paired report."""

from __future__ import annotations

import argparse
import sys

from beseg.commands.common import EXIT_FAILURE, add_distance_penalty, add_primary, distance_penalty, report_failures



def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Score every CASE.nii.gz of PRED_DIR against LABELS/CASE.nii.gz per case and class, in mm at each label's own "
        "spacing, into OUT/per_case.csv and OUT/summary.json. With two or more PRED_DIRs, each is scored into "
        "OUT/<name>/ and OUT/report/report.{md,html} compares them case by case against the first (or --baseline). "
        "Exit code 1 if a case failed or has no prediction.")
    parser.add_argument("pred_dirs", nargs="+", metavar="PRED_DIR", help="folder(s) of predicted label maps")
    parser.add_argument("--labels", required=True, metavar="DIR",
                        help="ground-truth label maps with the same case ids (nnU-Net labelsTr or gt_segmentations)")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder")
    parser.add_argument("--classes", metavar="SPEC",
                        help="scored classes as NAME=V[,V...] separated by ';', a region joining label values, e.g. "
                             "'TC=2,3;WT=1,2,3;ET=3' (default: --dataset-json, the dataset.json beside LABELS, or "
                             "every non-zero value in the labels)")
    parser.add_argument("--dataset-json", metavar="FILE", help="dataset.json (MSD or nnU-Net v2) naming the classes")
    parser.add_argument("--names", metavar="A,B,...",
                        help="system names, one per PRED_DIR (default: the folder names that tell them apart)")
    parser.add_argument("--baseline", metavar="NAME", help="system the others are compared with (default the first)")
    add_primary(parser, scored=True)
    parser.add_argument("--images", metavar="DIR",
                        help="images for the report's contour figure (CASE.nii.gz or CASE_0000.nii.gz; default the "
                             "imagesTr beside a labelsTr folder)")
    parser.add_argument("--nsd-tolerance", type=float, default=1.0, metavar="MM",
                        help="normalised surface Dice tolerance in mm (default 1)")
    add_distance_penalty(parser)
    parser.add_argument("--ignore-label", type=int, default=None, metavar="V",
                        help="label value whose voxels count in no metric (nnU-Net v2's ignore label; default the "
                             "'ignore' label of the dataset.json, if any); it is not a class")
    parser.add_argument("--affine-tol", type=float, default=1e-3, metavar="MM",
                        help="largest allowed difference between a prediction's and its label's affine (default 1e-3)")
    from beseg.protocols import PROTOCOLS

    parser.add_argument("--protocol", choices=tuple(PROTOCOLS),
                        help="how the predictions were made, recorded for the report: heldout (test cases), cv "
                             "(out-of-fold), paper (the cases that chose the checkpoint: optimistic)")
    parser.add_argument("--only-predicted", action="store_true",
                        help="score only the cases that have a prediction (e.g. one nnU-Net fold's validation folder "
                             "against the whole labelsTr); without it a labelled case without a prediction is an error")
    parser.add_argument("--workers", type=int, default=None, metavar="N",
                        help="worker processes (default: the CPUs available, at most 8)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from beseg.report import compare_predictions
    from beseg.score import score_predictions

    kwargs = {"classes": args.classes, "dataset_json": args.dataset_json, "nsd_tolerance_mm": args.nsd_tolerance,
              "distance_penalty_mm": distance_penalty(args.distance_penalty),
              "affine_tol_mm": args.affine_tol, "ignore_label": args.ignore_label, "workers": args.workers,
              "protocol": args.protocol, "only_predicted": args.only_predicted, "progress": not args.no_progress}
    if len(args.pred_dirs) == 1:
        if args.names or args.baseline or args.images or args.primary:
            from beseg.errors import ConfigError

            raise ConfigError("--names, --baseline, --primary and --images are for comparing two or more PRED_DIRs.")
        scored, report = [score_predictions(args.pred_dirs[0], args.labels, args.out, **kwargs)], None
    else:
        names = [n.strip() for n in args.names.split(",")] if args.names else None
        scored, report = compare_predictions(args.pred_dirs, args.labels, args.out, names=names,
                                             baseline=args.baseline, images_dir=args.images, primary=args.primary,
                                             **kwargs)
    failed: list[tuple[str, str]] = []
    for result in scored:
        summary = result.summary
        penalised = sum(c["penalised"] for per_class in summary["counts"].values() for c in per_class.values())
        means = ", ".join(f"{k} {v:.4f}" if v is not None else f"{k} n/a" for k, v in summary["mean"].items())
        how = [f"ignore label {summary['ignore_label']}"] if summary.get("ignore_label") is not None else []
        how += [b for b in [{"2": "2D boundaries", "mixed": "2D and 3D boundaries"}.get(str(summary.get("dim")))] if b]
        print(f"{result.name}: {summary['cases']} case(s) scored" + (f" ({'; '.join(how)})" if how else "")
              + f": {means}" + (f" ({penalised} penalised distance(s))" if penalised else ""))
        print(f"wrote {result.out_dir / 'per_case.csv'} and {result.out_dir / 'summary.json'}")
        if result.extra:
            print(f"{result.name}: {len(result.extra)} prediction(s) without a label, not scored: "
                  + ", ".join(result.extra), file=sys.stderr)
        if result.missing:
            print(f"{result.name}: {len(result.missing)} labelled case(s) without a prediction: "
                  + ", ".join(result.missing) + " (--only-predicted scores the predicted subset, e.g. one fold)",
                  file=sys.stderr)
        failed += [(case if len(scored) == 1 else f"{result.name}/{case}", reason) for case, reason in result.failed]
    if report is not None:
        print(f"report: {report.parent / 'report.md'}")
        print(f"open it: {report.resolve().as_uri()}")
    code = report_failures(failed)
    return EXIT_FAILURE if code or any(r.missing for r in scored) else 0

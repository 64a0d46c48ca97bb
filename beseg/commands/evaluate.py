"""``beseg evaluate``: Dice, HD95, ASD and NSD per case of a trained model on its split's cases."""

from __future__ import annotations

import argparse

from beseg.commands.common import add_distance_penalty, data_dir, distance_penalty, report_failures



def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", metavar="RUN_DIR|CHECKPOINT")
    parser.add_argument("--data", metavar="DIR", help="the task folder (default for phantom tasks: the phantom)")
    parser.add_argument("--split", choices=("test", "val", "train", "all"), default="test",
                        help="cases of the run's split file: test (held out; default), val (chose best.pt: "
                             "optimistic), train, or all labelled cases")
    parser.add_argument("--out", metavar="DIR", help="output folder (default RUN_DIR/eval)")
    parser.add_argument("--nsd-tolerance", type=float, default=1.0, metavar="MM", help="surface Dice tolerance in mm")
    add_distance_penalty(parser)
    parser.add_argument("--affine-tol", type=float, default=1e-3, metavar="MM",
                        help="largest allowed difference between a label's and its image's affine (default 1e-3); "
                             "a label on another grid fails its case")
    parser.add_argument("--device", default="auto")


def run(args: argparse.Namespace) -> int:
    from beseg.engine.evaluate import evaluate
    from beseg.engine.predict import load_model

    data = args.data
    if data is None:
        data = data_dir(None, load_model(args.checkpoint, "cpu").preset.name)
    result = evaluate(args.checkpoint, data, split=args.split, out=args.out,
                      nsd_tolerance_mm=args.nsd_tolerance, device=args.device,
                      distance_penalty_mm=distance_penalty(args.distance_penalty), affine_tol_mm=args.affine_tol)
    mean, protocol = result.summary["mean"], result.summary.get("protocol")
    how = f"protocol {protocol}" + ("; optimistic: these cases chose best.pt" if protocol == "paper" else "")
    print(f"{result.summary['cases']} case(s) of split {args.split}" + (f" ({how})" if protocol else "") + ": "
          + ", ".join(f"{k} {v:.4f}" if v is not None else f"{k} n/a" for k, v in mean.items()))
    print(f"wrote {result.out_dir / 'per_case.csv'} and {result.out_dir / 'summary.json'}")
    return report_failures(result.failed)

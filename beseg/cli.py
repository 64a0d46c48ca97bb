"""Command-line interface: ``beseg <command> ...``.

The CLI only parses arguments and hands them to the library; every user-facing failure is a
:class:`~beseg.errors.BesegError` (or a ``ValueError``/``TypeError`` raised for a bad argument),
printed as one line on stderr with a non-zero exit and no traceback (so is any ``OSError``, e.g. a full disk).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from beseg import __version__
from beseg.errors import BesegError

EXIT_USAGE = 2
EXIT_FAILURE = 1
#: Commands that train in this process; they set the CPU allocator as :mod:`beseg.allocator` explains.
TRAINING_COMMANDS = ("train", "compare", "demo", "reproduce")


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
    loss.add_argument("--malloc", choices=("default", "keep"), default="default",
                      help="CPU allocator: glibc's defaults (as in your own loop), or keeping freed memory as "
                           "beseg train does")
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
    train = bench_sub.add_parser(
        "train", help="share of a SegResNet training step spent in the BE loss, and sliding-window inference time"
    )
    train.add_argument("--patch", type=int, nargs=3, default=(96, 96, 96), metavar=("X", "Y", "Z"))
    train.add_argument("--init-filters", type=int, default=16)
    train.add_argument("--volume", type=int, nargs=3, default=(160, 160, 160), metavar=("X", "Y", "Z"),
                       help="volume for the sliding-window inference timing")
    train.add_argument("--repeats", type=int, default=3)
    train.add_argument("--threads", type=int, default=2)
    train.add_argument("--device", default="cpu", help="cpu or cuda[:N] (CUDA runs the step under float16 autocast)")
    train.add_argument("--malloc", choices=("default", "keep"), default="default",
                       help="CPU allocator: glibc's defaults, or keeping freed memory as beseg train does")
    train.set_defaults(func=_run_bench_train)
    predict = bench_sub.add_parser(
        "predict", help="seconds per case of `beseg predict` against the exported ONNX pipeline, side by side")
    predict.add_argument("--cases", nargs="+", choices=("phantom", "task09"), default=["phantom", "task09"],
                         help="phantom: 96x96x32 at 0.8x0.8x2.5 mm; task09: MSD Task09 geometry, 512x512x90 at "
                              "0.79x0.79x5 mm")
    predict.add_argument("--repeats", type=int, default=3, help="timed predictions per side (median reported)")
    predict.add_argument("--threads", type=int, default=2, help="torch and onnxruntime intra-op threads")
    predict.add_argument("--init-filters", type=int, default=16, help="SegResNet width")
    predict.set_defaults(func=_run_bench_predict)


def _run_bench_loss(args: argparse.Namespace) -> int:
    from beseg.bench.loss import parse_shape, run_loss_benchmark

    shapes = [parse_shape(s) for s in args.shapes] if args.shapes else None
    run_loss_benchmark(
        shapes=shapes, repeats=args.repeats, warmup=args.warmup, threads=args.threads,
        device=args.device, memory=not args.no_memory, malloc=args.malloc,
    )
    return 0


def _run_bench_train(args: argparse.Namespace) -> int:
    from beseg.bench.train import run_train_benchmark

    run_train_benchmark(patch=tuple(args.patch), init_filters=args.init_filters, repeats=args.repeats,
                        volume=tuple(args.volume), threads=args.threads, device=args.device, malloc=args.malloc)
    return 0


def _run_bench_predict(args: argparse.Namespace) -> int:
    from beseg.bench.predict import run_predict_benchmark

    run_predict_benchmark(cases=args.cases, repeats=args.repeats, threads=args.threads, init_filters=args.init_filters)
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


def _add_engine(sub: argparse._SubParsersAction) -> None:
    configs = sub.add_parser("configs", help="list the shipped config presets (the paper's Table 1 rows)")
    configs.set_defaults(func=_run_configs)

    train = sub.add_parser("train", help="train a config preset or YAML file on a task folder")
    train.add_argument("config", nargs="?", metavar="CONFIG", help="preset name (see `beseg configs`) or YAML path")
    train.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. train.epochs=5")
    train.add_argument("--data", metavar="DIR", help="MSD task folder (default for phantom tasks: a generated phantom)")
    train.add_argument("--out", metavar="RUN_DIR", help="run folder (default runs/<system>-seed<seed>)")
    train.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
    train.add_argument("--no-progress", action="store_true", help="no progress bars")
    train.set_defaults(func=_run_train)

    evaluate = sub.add_parser("evaluate", help="Dice, HD95, ASD and NSD per case of a trained model")
    evaluate.add_argument("checkpoint", metavar="RUN_DIR|CHECKPOINT")
    evaluate.add_argument("--data", metavar="DIR", help="the task folder (default for phantom tasks: the phantom)")
    evaluate.add_argument("--split", choices=("test", "val", "train", "all"), default="test",
                          help="cases of the run's split file: test (held out; default), val (chose best.pt: "
                               "optimistic), train, or all labelled cases")
    evaluate.add_argument("--out", metavar="DIR", help="output folder (default RUN_DIR/eval)")
    evaluate.add_argument("--nsd-tolerance", type=float, default=1.0, metavar="MM",
                          help="surface Dice tolerance in mm")
    evaluate.add_argument("--distance-penalty", type=float, default=None, metavar="MM",
                          help="HD95 and ASD of a class empty in exactly one of prediction and label (default "
                               "373.13, the BraTS convention); nan leaves them undefined (left out of means, counted)")
    evaluate.add_argument("--device", default="auto")
    evaluate.set_defaults(func=_run_evaluate)

    predict = sub.add_parser(
        "predict", help="segment NIfTI images into label maps in their own geometry (several runs: an ensemble)",
        description="RUN_DIR|CHECKPOINT... come first (run folders holding checkpoints/, or .pt files), then the "
                    "images; several runs average their probabilities (e.g. the k folds).")
    predict.add_argument("paths", nargs="+", metavar="PATH",
                         help="one or more runs (RUN_DIR or CHECKPOINT.pt), then NIfTI images (.nii, .nii.gz) or "
                              "folders of them")
    predict.add_argument("--out", required=True, metavar="DIR", help="output folder")
    predict.add_argument("--mirror", action="store_true",
                         help="test-time mirroring: average over the 8 flips of the three axes (8x the time)")
    predict.add_argument("--device", default="auto")
    predict.set_defaults(func=_run_predict)

    export = sub.add_parser(
        "export", help="write a self-contained ONNX model folder (beseg-predict runs it without PyTorch)")
    export.add_argument("runs", nargs="+", metavar="RUN_DIR|CHECKPOINT", help="one run, or several as an ensemble")
    export.add_argument("--out", required=True, metavar="MODEL_DIR", help="the model folder to create")
    export.add_argument("--mirror", action="store_true", help="record test-time mirroring over the three axes")
    export.add_argument("--overwrite", action="store_true", help="replace an existing MODEL_DIR")
    export.set_defaults(func=_run_export)


def _run_configs(args: argparse.Namespace) -> int:
    from beseg.engine.config import list_presets

    for name, description in list_presets().items():
        print(f"{name:<32} {description}")
    return 0


def _data_dir(data: str | None, task: str, progress: bool = True):
    """The --data folder, or the generated phantom for phantom tasks."""
    from pathlib import Path

    from beseg.errors import ConfigError

    if data:
        return Path(data)
    if task.startswith("phantom-"):
        from beseg.data import ensure_phantom

        return ensure_phantom(task.split("-", 1)[1], progress=progress)
    raise ConfigError(f"--data DIR is required for task {task!r} (the folder holding dataset.json).")


def _run_train(args: argparse.Namespace) -> int:
    from pathlib import Path

    from beseg.engine.config import load_config
    from beseg.engine.trainer import train
    from beseg.errors import ConfigError

    progress = not args.no_progress
    if args.resume:
        if args.config or args.overrides:
            raise ConfigError("--resume continues a run with its own saved config; give no CONFIG or overrides.")
        from beseg.engine.trainer import load_resume_checkpoint

        task = load_resume_checkpoint(args.resume)["config"]["data"]["task"]
        result = train(None, _data_dir(args.data, task, progress), args.resume, resume=True, progress=progress)
    else:
        if not args.config:
            raise ConfigError("give a CONFIG (a preset name from `beseg configs`, or a YAML file), or --resume RUN_DIR.")
        config, _ = load_config(args.config, args.overrides)
        out = Path(args.out or f"runs/{config.system}-seed{config.train.seed}")
        if (out / "checkpoints" / "last.pt").exists():
            raise ConfigError(f"run folder {out} already holds a checkpoint; use --resume {out} or another --out.")
        result = train(config, _data_dir(args.data, config.data.task, progress), out, progress=progress)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one line from rank 0 only
        print(f"done: {result.run_dir} (best validation Dice {result.best_dice:.4f})")
    return 0


def _run_evaluate(args: argparse.Namespace) -> int:
    from beseg.engine.evaluate import evaluate
    from beseg.engine.predict import load_model

    data = args.data
    if data is None:
        data = _data_dir(None, load_model(args.checkpoint, "cpu").preset.name)
    result = evaluate(args.checkpoint, data, split=args.split, out=args.out,
                      nsd_tolerance_mm=args.nsd_tolerance, device=args.device,
                      distance_penalty_mm=_distance_penalty(args.distance_penalty))
    mean, protocol = result.summary["mean"], result.summary.get("protocol")
    how = f"protocol {protocol}" + ("; optimistic: these cases chose best.pt" if protocol == "paper" else "")
    print(f"{result.summary['cases']} case(s) of split {args.split}" + (f" ({how})" if protocol else "") + ": "
          + ", ".join(f"{k} {v:.4f}" if v is not None else f"{k} n/a" for k, v in mean.items()))
    print(f"wrote {result.out_dir / 'per_case.csv'} and {result.out_dir / 'summary.json'}")
    return _report_failures(result.failed)


def _split_runs(paths: Sequence[str]) -> tuple[list[str], list[str]]:
    """Leading run folders (holding checkpoints/) and .pt files, then the images."""
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


def _run_predict(args: argparse.Namespace) -> int:
    from beseg.engine.predict import predict_files
    from beseg.errors import DataError

    runs, images = _split_runs(args.paths)
    result = predict_files(runs, images, args.out, device=args.device, mirror_axes=(0, 1, 2) if args.mirror else ())
    if not result.written and not result.failed:
        raise DataError("no NIfTI images (.nii, .nii.gz) in " + ", ".join(images))
    for path in result.written:
        print(f"wrote {path}")
    return _report_failures(result.failed)


def _run_export(args: argparse.Namespace) -> int:
    from beseg.engine.export import export_runs

    result = export_runs(args.runs, args.out, mirror_axes=(0, 1, 2) if args.mirror else (), overwrite=args.overwrite)
    print(f"wrote {result.out_dir}: " + ", ".join(result.files))
    return 0


def _add_compare(sub: argparse._SubParsersAction) -> None:
    from beseg.report.compare import ALIASES, TABLE1_SYSTEMS

    names = ", ".join([*TABLE1_SYSTEMS, *ALIASES])
    compare = sub.add_parser(
        "compare", help="train and evaluate systems x seeds on one split, then write the Table 1 report",
        description="Train and evaluate every system with every seed on the same split (finished runs are "
                    "skipped, interrupted ones resumed), then write RESULTS_DIR/report/report.{md,html}. By default "
                    "best.pt is chosen on validation cases and every reported number is on held-out test cases.")
    compare.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides for every run")
    compare.add_argument("--data", metavar="DIR", help="MSD task folder (default for phantom tasks: the phantom)")
    compare.add_argument("--systems", default="dice,dice_be", metavar="A,B,...",
                         help=f"comma-separated Table 1 rows or aliases ({names}) or YAML config files "
                              "(default: dice,dice_be)")
    compare.add_argument("--seeds", type=int, default=3, help="seeds per system: 0..N-1 (default 3)")
    compare.add_argument("--out", required=True, metavar="RESULTS_DIR", help="results folder (reused to resume)")
    compare.add_argument("--task", "--preset-prefix", dest="task", metavar="TASK",
                         help="preset prefix: phantom_spleen, task09 or task01 (default: from the dataset)")
    compare.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                         help="config override for every run (repeatable), e.g. --set train.epochs=5")
    _add_protocol(compare, "heldout")
    compare.add_argument("--no-report", action="store_true", help="train and evaluate only")
    compare.add_argument("--no-progress", action="store_true", help="no progress bars")
    compare.set_defaults(func=_run_compare)

    demo = sub.add_parser(
        "demo", help="the main command: Dice vs Dice + BE on the phantom spleen, scored on 16 held-out test cases, "
                     "report in ./beseg-demo/ (about 11 min on 2 CPU cores)",
        description="Generate the 40-case phantom spleen (cached), train SegResNet + Dice and SegResNet + Dice + BE "
                    "with a CPU-sized schedule on 20 cases (4 more choose best.pt), score both on the 16 held-out "
                    "test cases, and write the report into OUT/report/. Rerunning reuses OUT (finished runs are "
                    "skipped).")
    demo.add_argument("--out", default="beseg-demo", metavar="DIR", help="results folder (default ./beseg-demo)")
    demo.add_argument("--seeds", type=int, default=1, help="seeds per system (default 1)")
    demo.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                      help="extra config override for both runs (repeatable), e.g. --set train.threads=4")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    # Test-only knobs: a tiny demo for the test suite; hidden from --help.
    for flag in ("--epochs", "--steps", "--patch", "--init-filters", "--val-every", "--phantom-cases"):
        demo.add_argument(flag, type=int, default=None, help=argparse.SUPPRESS)
    demo.add_argument("--phantom-size", type=int, nargs=3, default=None, help=argparse.SUPPRESS)
    demo.set_defaults(func=_run_demo)

    reproduce = sub.add_parser(
        "reproduce", help="the paper's full protocol (all Table 1 rows, paper patches) on real MSD data; for GPUs",
        description="Compare all six Table 1 rows with the task01_*/task09_* presets on the MSD folder. Without "
                    "a CUDA device it refuses unless --cpu-ok is given.")
    reproduce.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides for every run")
    reproduce.add_argument("--task", required=True, choices=("task01", "task09"), help="MSD task")
    reproduce.add_argument("--data", metavar="DIR", help="the MSD task folder (Task01_BrainTumour or Task09_Spleen)")
    reproduce.add_argument("--seeds", type=int, default=3, help="seeds per system (default 3)")
    reproduce.add_argument("--out", metavar="RESULTS_DIR", help="results folder (default results-<task>)")
    reproduce.add_argument("--systems", default=None, metavar="A,B,...", help="subset of Table 1 rows (default all)")
    _add_protocol(reproduce, "paper")
    reproduce.add_argument("--cpu-ok", action="store_true", help="run even without a CUDA device")
    reproduce.add_argument("--no-progress", action="store_true", help="no progress bars")
    reproduce.set_defaults(func=_run_reproduce)


def _add_protocol(parser: argparse.ArgumentParser, default: str) -> None:
    parser.add_argument("--protocol", choices=("heldout", "paper"), default=default,
                        help="heldout: best.pt chosen on validation cases, every number on held-out test cases "
                             "(data.test_frac, default 0.2); paper: the paper's 80/20 split, scored on the validation "
                             f"cases that chose best.pt (optimistic). Default {default}")
    parser.add_argument("--folds", type=int, default=None, metavar="K",
                        help="k-fold cross-validation (with --protocol heldout): every case is scored once, by the "
                             "fold model that neither trained on it nor chose best.pt with it")


def _systems(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def _print_report(result) -> None:
    minutes, seconds = divmod(int(round(result.seconds)), 60)
    print(f"done in {minutes} min {seconds:02d} s; results in {result.results_dir}")
    if result.report is not None:
        print(f"report: {result.report.parent / 'report.md'}")
        print(f"open it: {result.report.resolve().as_uri()}")


def _run_compare(args: argparse.Namespace) -> int:
    from beseg.errors import ConfigError
    from beseg.report.compare import run_compare

    progress = not args.no_progress
    data = args.data
    if data is None:
        task = (args.task or "").lower().replace("_", "-")
        if not task.startswith("phantom-"):
            raise ConfigError("--data DIR is required: the MSD task folder holding dataset.json (only "
                              "--task phantom_spleen generates its own data).")
        data = _data_dir(None, task, progress)
    result = run_compare(data, _systems(args.systems), args.seeds, args.out, overrides=[*args.sets, *args.overrides],
                         prefix=args.task.lower().replace("-", "_") if args.task else None, progress=progress,
                         report=not args.no_report, protocol=args.protocol, folds=args.folds)
    _print_report(result)
    return 0


def _run_demo(args: argparse.Namespace) -> int:
    from beseg.report.demo import demo_overrides, run_demo

    phantom = {}
    if args.phantom_cases is not None:
        phantom.update(cases=args.phantom_cases, test_cases=0)
    if args.phantom_size is not None:
        phantom["size"] = tuple(args.phantom_size)
    overrides = demo_overrides(epochs=args.epochs, steps=args.steps, patch=args.patch,
                               init_filters=args.init_filters, val_every=args.val_every)
    result = run_demo(args.out, seeds=args.seeds, overrides=[*overrides, *args.sets], phantom=phantom or None,
                      progress=not args.no_progress)
    _print_report(result)
    return 0


def _run_reproduce(args: argparse.Namespace) -> int:
    from beseg.report.compare import TABLE1_SYSTEMS
    from beseg.report.reproduce import run_reproduce

    systems = _systems(args.systems) if args.systems else list(TABLE1_SYSTEMS)
    result = run_reproduce(args.task, args.data, seeds=args.seeds, out=args.out, systems=systems,
                           overrides=args.overrides, cpu_ok=args.cpu_ok, progress=not args.no_progress,
                           protocol=args.protocol, folds=args.folds)
    _print_report(result)
    return 0


def _add_nnunet(sub: argparse._SubParsersAction) -> None:
    nnunet = sub.add_parser(
        "nnunet", help="BE trainers for nnU-Net v2 (needs the nnunet extra)",
        description="nnU-Net v2 (>= 2.8) finds the trainers nnUNetTrainerBE, nnUNetTrainerDiceBE, "
                    "nnUNetTrainerDiceNoBE, nnUNetTrainerBESpacing, nnUNetTrainerDiceBESpacing and their short "
                    "schedules (e.g. nnUNetTrainerBE_5epochs) in the folder named by nnUNet_extTrainer: "
                    "export nnUNet_extTrainer=$(beseg nnunet trainer-dir)")
    nnunet_sub = nnunet.add_subparsers(dest="nnunet_command", required=True, metavar="WHAT")
    trainer_dir = nnunet_sub.add_parser("trainer-dir", help="print the folder to put in nnUNet_extTrainer")
    trainer_dir.set_defaults(func=_run_nnunet_trainer_dir)


def _run_nnunet_trainer_dir(args: argparse.Namespace) -> int:
    from beseg.nnunet import require_nnunet, trainer_dir

    require_nnunet()
    print(trainer_dir())
    return 0


def _add_score(sub: argparse._SubParsersAction) -> None:
    score = sub.add_parser(
        "score", help="Dice, HD95, ASD and NSD of NIfTI prediction folders (nnU-Net, MONAI, ...) against labels; "
                      "two or more folders: the paired comparison report",
        description="Score every CASE.nii.gz of PRED_DIR against LABELS/CASE.nii.gz per case and class, in mm at each "
                    "label's own spacing, into OUT/per_case.csv and OUT/summary.json. With two or more PRED_DIRs, "
                    "each is scored into OUT/<name>/ and OUT/report/report.{md,html} compares them case by case "
                    "against the first (or --baseline). Exit code 1 if a case failed or has no prediction.")
    score.add_argument("pred_dirs", nargs="+", metavar="PRED_DIR", help="folder(s) of predicted label maps")
    score.add_argument("--labels", required=True, metavar="DIR",
                       help="ground-truth label maps with the same case ids (nnU-Net labelsTr or gt_segmentations)")
    score.add_argument("--out", required=True, metavar="DIR", help="output folder")
    score.add_argument("--classes", metavar="SPEC",
                       help="scored classes as NAME=V[,V...] separated by ';', a region joining label values, e.g. "
                            "'TC=2,3;WT=1,2,3;ET=3' (default: --dataset-json, the dataset.json beside LABELS, or "
                            "every non-zero value in the labels)")
    score.add_argument("--dataset-json", metavar="FILE", help="dataset.json (MSD or nnU-Net v2) naming the classes")
    score.add_argument("--names", metavar="A,B,...",
                       help="system names, one per PRED_DIR (default: the folder names that tell them apart)")
    score.add_argument("--baseline", metavar="NAME", help="system the others are compared with (default the first)")
    score.add_argument("--images", metavar="DIR",
                       help="images for the report's contour figure (CASE.nii.gz or CASE_0000.nii.gz; default the "
                            "imagesTr beside a labelsTr folder)")
    score.add_argument("--nsd-tolerance", type=float, default=1.0, metavar="MM",
                       help="normalised surface Dice tolerance in mm (default 1)")
    score.add_argument("--distance-penalty", type=float, default=None, metavar="MM",
                       help="HD95 and ASD of a class empty in exactly one of prediction and label (default 373.13, "
                            "the BraTS convention); nan leaves them undefined (left out of means, counted)")
    score.add_argument("--affine-tol", type=float, default=1e-3, metavar="MM",
                       help="largest allowed difference between a prediction's and its label's affine (default 1e-3)")
    score.add_argument("--protocol", choices=("heldout", "cv", "paper"),
                       help="how the predictions were made, recorded for the report: heldout (test cases), cv "
                            "(out-of-fold), paper (the cases that chose the checkpoint: optimistic)")
    score.add_argument("--only-predicted", action="store_true",
                       help="score only the cases that have a prediction (e.g. one nnU-Net fold's validation folder "
                            "against the whole labelsTr); without it a labelled case without a prediction is an error")
    score.add_argument("--workers", type=int, default=None, metavar="N",
                       help="worker processes (default: the CPUs available, at most 8)")
    score.add_argument("--no-progress", action="store_true", help="no progress bar")
    score.set_defaults(func=_run_score)


def _run_score(args: argparse.Namespace) -> int:
    from beseg.report import compare_predictions
    from beseg.score import score_predictions

    kwargs = {"classes": args.classes, "dataset_json": args.dataset_json, "nsd_tolerance_mm": args.nsd_tolerance,
              "distance_penalty_mm": _distance_penalty(args.distance_penalty),
              "affine_tol_mm": args.affine_tol, "workers": args.workers, "protocol": args.protocol,
              "only_predicted": args.only_predicted, "progress": not args.no_progress}
    if len(args.pred_dirs) == 1:
        if args.names or args.baseline or args.images:
            from beseg.errors import ConfigError

            raise ConfigError("--names, --baseline and --images are for comparing two or more PRED_DIRs.")
        scored, report = [score_predictions(args.pred_dirs[0], args.labels, args.out, **kwargs)], None
    else:
        names = [n.strip() for n in args.names.split(",")] if args.names else None
        scored, report = compare_predictions(args.pred_dirs, args.labels, args.out, names=names,
                                             baseline=args.baseline, images_dir=args.images, **kwargs)
    failed: list[tuple[str, str]] = []
    for result in scored:
        summary = result.summary
        penalised = sum(c["penalised"] for per_class in summary["counts"].values() for c in per_class.values())
        means = ", ".join(f"{k} {v:.4f}" if v is not None else f"{k} n/a" for k, v in summary["mean"].items())
        print(f"{result.name}: {summary['cases']} case(s) scored: {means}"
              + (f" ({penalised} penalised distance(s))" if penalised else ""))
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
    code = _report_failures(failed)
    return EXIT_FAILURE if code or any(r.missing for r in scored) else 0


def _distance_penalty(value: float | None) -> float | None:
    """``--distance-penalty``: None (not given) is the BraTS default, NaN means "leave undefined" (None)."""
    import math

    from beseg.metrics import BRATS_DISTANCE_PENALTY_MM

    if value is None:
        return BRATS_DISTANCE_PENALTY_MM
    return None if math.isnan(value) else value


def _report_failures(failed: list[tuple[str, str]]) -> int:
    if not failed:
        return 0
    print(f"{len(failed)} input(s) failed:", file=sys.stderr)
    for name, reason in failed:
        print(f"  - {reason if reason.startswith(name) else f'{name}: {reason}'}", file=sys.stderr)
    return EXIT_FAILURE


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="beseg", description="Boundary-enhanced 3D medical image segmentation."
    )
    parser.add_argument("--version", action="version", version=f"beseg {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_bench(sub)
    _add_data(sub)
    _add_engine(sub)
    _add_compare(sub)
    _add_nnunet(sub)
    _add_score(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    # Overrides (KEY=VALUE) may come after options such as --out, which argparse alone rejects.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command in TRAINING_COMMANDS:
        from beseg.allocator import keep_freed_memory

        keep_freed_memory()  # the process is beseg's own: keep freed volumes (see beseg.allocator)
    try:
        return int(args.func(args) or 0)
    except (BesegError, ValueError, TypeError, OSError) as err:  # OSError: e.g. a full disk
        print(f"beseg {args.command}: error: {err}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print(f"beseg {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

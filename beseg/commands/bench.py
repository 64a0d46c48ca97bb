"""``beseg bench loss|data|train|predict|verdict``: benchmarks whose results go to stdout (record them in docs/benchmarks.md)."""

from __future__ import annotations

import argparse



def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench_command", required=True, metavar="WHAT")
    loss = sub.add_parser(
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
    loss.set_defaults(func=_loss)
    data = sub.add_parser(
        "data", help="patches/s of the store's training loader (1 and N workers), memory per worker, and the "
                     "ratio to the training step it feeds",
        description="Prepare (or reuse) the preprocessed store of DATA for CONFIG and time the training loader "
                    "against the config's CPU training step. Without --data: a generated phantom spleen.")
    data.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. data.patch_size=[64,64,64]")
    data.add_argument("--data", metavar="DIR", help="MSD task folder (default: a generated phantom spleen)")
    data.add_argument("--config", default="phantom_spleen_segresnet_be", metavar="CONFIG",
                      help="preset name or YAML file (default phantom_spleen_segresnet_be)")
    data.add_argument("--cases", type=int, default=12, help="phantom spleen cases to generate without --data")
    data.add_argument("--patch", type=int, nargs=3, default=None, metavar=("X", "Y", "Z"),
                      help="patch size (voxels at 1 mm; default the config's)")
    data.add_argument("--workers", type=int, default=2, help="the N of the N-worker timing (1 worker is always timed)")
    data.add_argument("--items", type=int, default=20, help="case visits timed per loader timing")
    data.add_argument("--steps", type=int, default=3, help="timed training steps (median reported; 0: none)")
    data.add_argument("--threads", type=int, default=2, help="torch intra-op threads for the training step")
    data.add_argument("--baseline", action="store_true",
                      help="also time the cache: memory chain (the loader before the store) on the same cases")
    data.add_argument("--train-memory", type=int, default=None, metavar="STEPS",
                      help="instead: the peak PSS (process tree, loader workers included) of a STEPS-step training "
                           "of CONFIG on --data, without validation")
    data.set_defaults(func=_data)
    train = sub.add_parser(
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
    train.set_defaults(func=_train)
    predict = sub.add_parser(
        "predict", help="seconds per case of `beseg predict` against the exported ONNX pipeline, side by side")
    predict.add_argument("--cases", nargs="+", choices=("phantom", "task09"), default=["phantom", "task09"],
                         help="phantom: 96x96x32 at 0.8x0.8x2.5 mm; task09: MSD Task09 geometry, 512x512x90 at "
                              "0.79x0.79x5 mm")
    predict.add_argument("--repeats", type=int, default=3, help="timed predictions per side (median reported)")
    predict.add_argument("--threads", type=int, default=2, help="torch and onnxruntime intra-op threads")
    predict.add_argument("--init-filters", type=int, default=16, help="SegResNet width")
    predict.set_defaults(func=_predict)
    verdict = sub.add_parser(
        "verdict", help="family-wise false-positive rate of the report's verdict, with and without the correction, "
                        "and its power, on simulated experiments",
        description="Simulate experiments in which K systems and a baseline are drawn from one distribution of per-case "
                    "scores (case difficulty shared by every system and metric, correlated metrics), run the report's "
                    "own decision code on each, and print how often it calls anything better or worse: corrected (the "
                    "primary comparison at 5%, the others by Holm after it) and uncorrected (every comparison's own "
                    "95% interval); then the power of the primary comparison to find a true Dice gain.")
    verdict.add_argument("--systems", type=int, nargs="+", default=[2, 6, 10], metavar="K",
                         help="systems compared with the baseline (default: 2 6 10)")
    verdict.add_argument("--cases", type=int, nargs="+", default=[16, 48], metavar="N",
                         help="paired cases per experiment (default: 16 48)")
    verdict.add_argument("--metrics", type=int, default=4, choices=(1, 2, 3, 4),
                         help="the first M of Dice, HD95, ASD, NSD (default 4)")
    verdict.add_argument("--simulations", type=int, default=2000, help="experiments per rate (default 2000)")
    verdict.add_argument("--effect", type=float, default=0.03,
                         help="mean Dice gain of the primary system in the power simulations (default 0.03)")
    verdict.add_argument("--seeds", type=int, default=1, help="runs per system (default 1)")
    verdict.add_argument("--seed-sd", type=float, default=0.0, metavar="SD",
                         help="seed-to-seed SD of a run's mean Dice (each run shifts all its cases; default 0)")
    verdict.add_argument("--seed", type=int, default=0, help="random seed of the simulation (default 0)")
    verdict.set_defaults(func=_verdict)


def run(args: argparse.Namespace) -> int:
    return args.func(args)


def _loss(args: argparse.Namespace) -> int:
    from beseg.bench.loss import parse_shape, run_loss_benchmark

    shapes = [parse_shape(s) for s in args.shapes] if args.shapes else None
    run_loss_benchmark(
        shapes=shapes, repeats=args.repeats, warmup=args.warmup, threads=args.threads,
        device=args.device, memory=not args.no_memory, malloc=args.malloc,
    )
    return 0


def _train(args: argparse.Namespace) -> int:
    from beseg.bench.train import run_train_benchmark

    run_train_benchmark(patch=tuple(args.patch), init_filters=args.init_filters, repeats=args.repeats,
                        volume=tuple(args.volume), threads=args.threads, device=args.device, malloc=args.malloc)
    return 0


def _predict(args: argparse.Namespace) -> int:
    from beseg.bench.predict import run_predict_benchmark

    run_predict_benchmark(cases=args.cases, repeats=args.repeats, threads=args.threads, init_filters=args.init_filters)
    return 0


def _verdict(args: argparse.Namespace) -> int:
    from beseg.bench.verdict import run_verdict_benchmark
    from beseg.errors import ConfigError

    if min(args.systems) < 1 or min(args.cases) < 2 or args.simulations < 1 or args.seeds < 1 or args.seed_sd < 0:
        raise ConfigError("--systems must be at least 1, --cases at least 2, --simulations and --seeds at least 1, "
                          "--seed-sd at least 0.")
    run_verdict_benchmark(args.systems, args.cases, args.metrics, args.simulations, args.effect, args.seeds,
                          args.seed_sd, args.seed)
    return 0


def _data(args: argparse.Namespace) -> int:
    from beseg.bench.data import run_data_benchmark
    from beseg.data import load_task
    from beseg.errors import ConfigError

    if args.workers < 1 or args.items < 1 or args.steps < 0:
        raise ConfigError("--workers and --items must be at least 1, --steps at least 0.")
    if args.train_memory is not None and not args.data:
        raise ConfigError("--train-memory needs --data DIR.")
    task = load_task(args.data) if args.data else None
    if args.train_memory is not None:
        from beseg.bench.data import training_memory

        res = training_memory(task, args.config, args.overrides, steps=args.train_memory)
        print(f"short training ({args.train_memory} steps, {args.config} on {args.data}): peak PSS "
              f"{res['peak_pss_gb']:.2f} GB over {res['processes']} process(es), {res['seconds']:.0f} s")
        return 0
    run_data_benchmark(task, args.config, args.overrides, cases=args.cases, workers=args.workers,
                       items=args.items, steps=args.steps, threads=args.threads, baseline=args.baseline,
                       patch_size=tuple(args.patch) if args.patch else None)
    return 0

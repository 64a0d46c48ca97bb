"""``beseg train``: train a config preset or YAML file on a task folder (also under torchrun)."""

from __future__ import annotations

import argparse

from beseg.commands.common import data_dir



def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", metavar="CONFIG", help="preset name (see `beseg configs`) or YAML path")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. train.epochs=5")
    parser.add_argument("--data", metavar="DIR", help="MSD task folder (default for phantom tasks: a generated phantom)")
    parser.add_argument("--out", metavar="RUN_DIR", help="run folder (default runs/<system>-seed<seed>)")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    # A comparison's multi-rank run (srun): the dataset is the plan's, loaded again and checked against its identity.
    parser.add_argument("--plan", metavar="PLAN_JSON", help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from beseg.engine.config import load_config
    from beseg.engine.trainer import train
    from beseg.errors import ConfigError

    progress = not args.no_progress
    planned = None
    if args.plan:
        from beseg.experiment.plan import planned_task, read_plan_json

        if args.data:
            raise ConfigError("--plan takes the dataset from the plan; give no --data.")
        planned = planned_task(read_plan_json(Path(args.plan).parent))
    if args.resume:
        if args.config or args.overrides:
            raise ConfigError("--resume continues a run with its own saved config; give no CONFIG or overrides.")
        from beseg.engine.trainer import load_resume_checkpoint

        task = load_resume_checkpoint(args.resume)["config"]["data"]["task"]
        result = train(None, planned or data_dir(args.data, task, progress), args.resume, resume=True, progress=progress)
    else:
        if not args.config:
            raise ConfigError("give a CONFIG (a preset name from `beseg configs`, or a YAML file), or --resume RUN_DIR.")
        config, _ = load_config(args.config, args.overrides)
        out = Path(args.out or f"runs/{config.system}-seed{config.train.seed}")
        if (out / "checkpoints" / "last.pt").exists():
            raise ConfigError(f"run folder {out} already holds a checkpoint; use --resume {out} or another --out.")
        result = train(config, planned or data_dir(args.data, config.data.task, progress), out, progress=progress)
    from beseg.engine.distributed import launch_env

    if launch_env().rank == 0:  # under torchrun or srun, one line from rank 0 only
        print(f"done: {result.run_dir} (best validation Dice {result.best_dice:.4f})")
    return 0

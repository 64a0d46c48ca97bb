"""Execute one planned run: claim its folder, train (or resume), evaluate into the results layout, release.

Every launcher ends here: the local one calls :func:`execute_run` in its own process (one run at a
time) or starts ``python -m beseg.experiment.worker RESULTS RUN_ID`` per run (devices, ``--jobs``),
and a SLURM job script runs the same command. The worker reads the run from ``RESULTS/plan.json``, and
the dataset too: it loads the task folder again from the identity the plan recorded
(:func:`beseg.experiment.plan.planned_task`), once it holds the run's claim and knows the run is
unfinished. A dataset whose ``dataset.json`` changed since planning fails the run in one line (in
``.failed``, which the launchers list) and nothing trains; so does each rank of a multi-rank run, which
``srun`` starts as ``beseg train --plan``. :func:`execute_run` called in the planning process (the
local launcher without devices or jobs) is handed the task that process loaded: the run sees the
dataset the comparison was planned on, and nothing reads ``dataset.json`` again.

A run that raises leaves ``RUN_DIR/.failed`` (the error and the log file) for ``--status`` and the
final listing; it is removed when the run is tried again. Every write to the run folder is fenced by
the claim: a worker whose claim was taken over (it was stopped past the stale limit) stops without
writing, ``.failed`` included. Exit codes of the module: 0 done (or found done), 1 failed,
:data:`EXIT_BUSY` another live process holds the run, :data:`EXIT_CLAIM_LOST` another process took the
run over while this one worked on it.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from beseg.data.msd import MSDTask
from beseg.data.splits import get_protocol
from beseg.engine.claim import Claim, RunLockedError, slurm_job_id
from beseg.engine.config import Config
from beseg.engine.evaluate import evaluate
from beseg.engine.rundir import RunDir
from beseg.engine.trainer import train
from beseg.errors import BesegError
from beseg.experiment import nnunet_runs
from beseg.experiment.nnunet_runs import NNUNetSystem
from beseg.fileio import EXIT_LOCK_LOST, LockLostError, atomic_write_text

__all__ = ["EXIT_BUSY", "EXIT_CLAIM_LOST", "FAILED_FILE", "RUN_RECORD", "execute_run", "read_failure", "main"]

#: Exit code of the worker when another live process holds the run (sysexits' EX_TEMPFAIL).
EXIT_BUSY = 75
#: Exit code of the worker when another process took the run over while it worked (it wrote nothing since).
EXIT_CLAIM_LOST = EXIT_LOCK_LOST
#: Marker of a run whose last attempt failed (JSON: error, log, host, time).
FAILED_FILE = ".failed"
#: Record of the attempt that finished the run (JSON: host, pid, job_id, started, finished, seconds).
RUN_RECORD = "run.json"


def read_failure(run_dir: str | Path) -> dict[str, Any] | None:
    """The ``.failed`` record of a run folder, or None."""
    try:
        record = json.loads((Path(run_dir) / FAILED_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return record if isinstance(record, dict) else None


def execute_run(run_dir: str | Path, config: Config, task: MSDTask | Callable[[], MSDTask], protocol: str,
                log_file: str | Path | None = None, progress: bool = True,
                log: Callable[[str], None] = print, label: str | None = None,
                ranks: int = 1, nnunet: NNUNetSystem | None = None,
                nnunet_install: Mapping[str, Any] | None = None, claim: Claim | None = None) -> dict[str, Any] | None:
    """Train (fresh or resumed) and evaluate one run, holding its claim throughout.

    Args:
        run_dir: the run folder.
        config: the run's config (its ``data.split_file`` where the split file is now).
        task: the comparison's dataset; or (a worker process) the function that loads it again from
            ``plan.json`` and checks it is the planned one (:func:`beseg.experiment.plan.planned_task`): it is
            called under the claim, once the run is known to be unfinished, so what it raises (a dataset
            changed since planning) is this run's failure, recorded in ``.failed``, and nothing trains.
        protocol: ``heldout``, ``cv`` or ``paper``: what is evaluated (its ``eval_split``).
        log_file: where this run's output goes, recorded in ``.failed`` when it fails.
        progress: progress bars.
        log: receives warnings about failed cases.
        label: the run's name in messages.
        ranks: train as one DDP run of this many ranks, started with ``srun -n ranks`` inside the
            current SLURM allocation (evaluation stays in this process); an nnU-Net run trains on
            this many GPUs (``-num_gpus``).
        nnunet: the trainer of an nnU-Net run (:mod:`beseg.experiment.nnunet_runs`); its results
            folder is where ``config.data.split_file`` is.
        nnunet_install: ``{"python", "version"}``: the nnU-Net installation that runs an nnU-Net run
            (plan.json's ``nnunet``).
        claim: the run's :class:`Claim` object to take (one that has watched the holder's heartbeat, so what it
            saw counts); default a new one.

    Returns:
        The evaluation summary, or None when the run was found finished already (nothing done).

    Raises:
        RunLockedError: another live process holds the run.
        LockLostError: another process took the run over meanwhile; nothing was written since.
        Exception: whatever training or evaluation raised (``.failed`` records it first).
    """
    from beseg.experiment.plan import run_state  # the plan's state rules, shared with planning

    run_dir = Path(run_dir)
    label = label or str(run_dir)
    claim = claim or Claim(RunDir(run_dir).lock)
    taken = claim.acquire()
    try:
        if nnunet is not None:
            state, _ = nnunet_runs.run_state(run_dir, nnunet, _fold_of(config))
        else:
            state, _ = run_state(run_dir, config)
        if state == "done":
            return None
        claim.check()
        (run_dir / FAILED_FILE).unlink(missing_ok=True)
        if taken:
            RunDir(run_dir).remove_leftovers()  # of an earlier attempt that was killed mid-write
        started = time.time()
        try:
            if not isinstance(task, MSDTask):
                task = task()
            if nnunet is not None:
                summary = _execute_nnunet(run_dir, config, task, protocol, nnunet, nnunet_install or {}, ranks,
                                          progress, log, label, claim.check)
            elif state in ("fresh", "resume") and ranks > 1:
                _train_with_srun(config, run_dir, state == "resume", ranks, claim)
            elif state == "fresh":
                train(config, task, run_dir, progress=progress)
            elif state == "resume":
                train(config, task, run_dir, resume=True, progress=progress)
            if nnunet is None:
                evaluated = evaluate(run_dir, task, split=get_protocol(protocol).eval_split, progress=progress,
                                     protocol=protocol, device=config.train.device, split_file=config.data.split_file,
                                     fence=claim.check)
                summary = evaluated.summary
        except Exception as err:
            if not isinstance(err, LockLostError):
                # A failure of a process that lost the run meanwhile (a DDP step under srun stops with its own
                # error) is the loss, not a failure of the run: nothing is recorded.
                try:
                    claim.check()
                except LockLostError as lost:
                    raise lost from err
                text = str(err) if isinstance(err, BesegError) else f"{type(err).__name__}: {err}"
                try:
                    atomic_write_text(run_dir / FAILED_FILE, json.dumps({
                        "error": text.strip().splitlines()[0][:500] if text.strip() else type(err).__name__,
                        "log": str(log_file) if log_file else None, "host": socket.gethostname(),
                        "time": time.time()}), fence=claim.check)
                except OSError:
                    pass  # a full disk: the error itself still goes up, only --status will not show it
            raise
        finished = time.time()
        atomic_write_text(run_dir / RUN_RECORD, json.dumps({
            "host": socket.gethostname(), "pid": os.getpid(), "job_id": slurm_job_id(), "started": started,
            "finished": finished, "seconds": finished - started, "state": state}), fence=claim.check)
        for failure in summary.get("failed", []):
            log(f"warning: {label}: case {failure['case']} could not be evaluated: {failure['reason']}")
        return summary
    finally:
        if taken:
            claim.release()


def _fold_of(config: Config) -> int:
    """nnU-Net's fold of a run: its cross-validation fold, else 0 (the one split)."""
    from beseg.data import load_split

    return load_split(config.data.split_file).fold or 0


def _execute_nnunet(run_dir: Path, config: Config, task: MSDTask, protocol: str, system: NNUNetSystem,
                    install: Mapping[str, Any], ranks: int, progress: bool, log: Callable[[str], None],
                    label: str, fence: Callable[[], None]) -> dict[str, Any]:
    """One nnU-Net run: its results folder is the split file's folder; its classes are the task preset's (a dataset
    without a preset: its ``dataset.json``'s, as ``beseg score`` reads them)."""
    from beseg.data.presets import PRESETS
    from beseg.experiment.layout import ResultsLayout

    split_file = Path(config.data.split_file)
    python = install.get("python") or nnunet_runs.resolve_python()
    device = os.environ.get("BESEG_RUN_DEVICE") or config.train.device
    preset = PRESETS.get(config.data.task)
    return nnunet_runs.execute(run_dir, system, _fold_of(config), ResultsLayout(split_file.parent), task,
                               split_file, protocol, python, config.data.task,
                               preset.scored_classes if preset is not None else None, device=device, ranks=ranks,
                               version=install.get("version"), progress=progress, log=log, label=label, fence=fence)


def _train_with_srun(config: Config, run_dir: Path, resume: bool, ranks: int, claim: Claim) -> None:
    """``srun -n ranks beseg train --plan RESULTS/plan.json ...``: one DDP run inside this job (ranks find their rank
    through SLURM's variables).

    Each rank loads the dataset from the plan, checked as this worker's was (:func:`~beseg.experiment.plan.planned_task`;
    the plan is the one beside the run's split file). The ranks inherit this process's claim
    (``BESEG_CLAIM_TOKEN``), so rank 0 does not see it as someone else's.

    Raises:
        TrainingError: the training step failed (its output is in this run's log).
    """
    import subprocess

    import yaml

    from beseg.engine.config import config_to_dict
    from beseg.engine.trainer import TrainingError
    from beseg.experiment.layout import ResultsLayout

    plan = ResultsLayout(Path(config.data.split_file).parent).plan
    cmd = ["srun", "-n", str(ranks), "--kill-on-bad-exit=1", sys.executable, "-m", "beseg.cli", "train",
           "--no-progress", "--plan", str(plan)]
    if resume:
        cmd += ["--resume", str(run_dir)]
    else:
        request = run_dir / ".requested-config.yaml"
        atomic_write_text(request, yaml.safe_dump(config_to_dict(config), sort_keys=False), fence=claim.check)
        cmd += [str(request), "--out", str(run_dir)]
    env = {**os.environ, "BESEG_CLAIM_TOKEN": claim.token or ""}
    code = subprocess.run(cmd, env=env).returncode
    if code == EXIT_LOCK_LOST:
        claim.check()  # rank 0 found the claim taken over: say so, as this process's own loss
    if code != 0:
        raise TrainingError(f"`srun -n {ranks} beseg train` exited with code {code}; its output is above in this log.")


def _terminated(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m beseg.experiment.worker RESULTS RUN_ID``: execute one run of a plan."""
    from beseg.experiment.layout import ResultsLayout
    from beseg.experiment.plan import planned_task, read_plan_json

    parser = argparse.ArgumentParser(prog="python -m beseg.experiment.worker",
                                     description="execute one run of RESULTS/plan.json")
    parser.add_argument("results", metavar="RESULTS")
    parser.add_argument("run_id", metavar="RUN_ID")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--ranks", type=int, default=1, help="train as one DDP run of N ranks through srun")
    args = parser.parse_args(argv)
    from beseg.allocator import keep_freed_memory

    keep_freed_memory()
    # SIGTERM (scancel, a requeue, the end of a job) unwinds like Ctrl-C: the claim is released on the way out.
    signal.signal(signal.SIGTERM, _terminated)
    layout = ResultsLayout(Path(args.results).resolve())
    try:
        plan = read_plan_json(layout.root)
        entry = next((e for e in plan["runs"] if e["id"] == args.run_id), None)
        if entry is None:
            print(f"worker: no run {args.run_id!r} in {layout.plan}", file=sys.stderr)
            return 1
        kind = entry.get("kind", "beseg")
        if kind not in ("beseg", nnunet_runs.KIND):
            print(f"worker: run {args.run_id!r} is of kind {kind!r}, which this beseg cannot execute "
                  "(upgrade beseg on this host)", file=sys.stderr)
            return 1
        nnunet = NNUNetSystem(**entry["nnunet"]) if kind == nnunet_runs.KIND else None
        config = entry["resolved"]
        if os.environ.get("BESEG_RUN_DEVICE"):
            config.train.device = os.environ["BESEG_RUN_DEVICE"]  # training and evaluation on the launcher's GPU
        threads = os.environ.get("BESEG_RUN_THREADS")
        if threads and not config.train.threads:
            config.train.threads = int(threads)  # this run's share of the cores (local --jobs)
        print(f"worker: {args.run_id} on {socket.gethostname()} (pid {os.getpid()}"
              + (f", SLURM job {os.environ['SLURM_JOB_ID']}" if os.environ.get("SLURM_JOB_ID") else "") + ")",
              flush=True)
        summary = execute_run(entry["path"], config, lambda: planned_task(plan), plan["protocol"],
                              layout.log(args.run_id), progress=not args.no_progress, label=args.run_id,
                              ranks=args.ranks, nnunet=nnunet, nnunet_install=plan.get("nnunet"))
    except RunLockedError as err:
        print(f"worker: {err}", file=sys.stderr)
        return EXIT_BUSY
    except LockLostError as err:
        print(f"worker: {err}", file=sys.stderr)
        return EXIT_CLAIM_LOST
    except Exception as err:  # the run failed: its .failed says so; the traceback goes to its log
        traceback.print_exc()
        print(f"worker: {args.run_id} failed: {err}", file=sys.stderr)
        return 1
    if summary is None:
        print(f"worker: {args.run_id} was finished already", flush=True)
    else:
        dice = summary["mean"].get("dice")
        print(f"worker: {args.run_id} done: Dice {dice:.4f} over {summary['cases']} case(s)" if dice is not None
              else f"worker: {args.run_id} done: no case could be scored", flush=True)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

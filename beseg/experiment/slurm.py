"""``--launcher slurm``: one SLURM job per run, submitted with ``sbatch``.

Why sbatch and not submitit: it needs no extra package on the login node or the compute nodes,
and every job is a plain script, ``RESULTS/slurm/<run>.sbatch``, that a user (or their cluster's
admins) can read, edit and resubmit by hand. What submitit adds, pickled callables and
checkpoint/requeue, beseg has already: a run is a command (``python -m beseg.experiment.worker
RESULTS RUN_ID``) and it resumes from ``last.pt`` by itself.

Each job script:

* asks for ``--ntasks`` = the run's ranks (``--gpus-per-run``, at least 1), ``--cpus-per-task``,
  ``--gres=gpu:G``, ``--mem``, ``--time``, ``--partition`` and any ``--slurm-arg KEY=VALUE``;
* writes its output to ``RESULTS/logs/<run>.log`` (appended across restarts);
* is ``--requeue``-able (a preempted job goes back to the queue) and asks for ``USR1`` a few
  minutes before its time limit (``--signal=B:USR1@<grace>``): the script then requeues its own job
  (``scontrol requeue``), and the next start resumes from the run's ``last.pt`` (at most the
  epochs since the last checkpoint are redone; ``train.checkpoint_every``);
* runs the worker, which claims the run (the claim records the job id: a claim of a job SLURM no
  longer runs is taken over), trains, on G > 1 GPUs as one G-rank DDP run through ``srun -n G``
  (:func:`beseg.engine.distributed.launch_env`), and evaluates.

The compare command then waits, with one progress line, until every job has ended (``squeue``),
and reads each run's outcome from its folder; ``--detach`` returns after submitting. Running the
same command again submits only runs that are neither finished nor queued.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from beseg.errors import BesegError, ConfigError
from beseg.experiment.launch import LaunchOutcome, Progress
from beseg.experiment.layout import ResultsLayout

__all__ = ["SlurmLauncher", "SlurmError", "job_states"]

#: Seconds before the time limit at which a job is told to requeue itself.
SIGNAL_GRACE_S = 300
_DURATION = re.compile(r"^(\d+-)?\d+(:\d{1,2}){0,2}$")
_MEM = re.compile(r"^\d+[KMGT]?$", re.I)


class SlurmError(BesegError):
    """SLURM refused a request or cannot be reached."""


def _run(cmd: Sequence[str], what: str) -> str:
    try:
        out = subprocess.run(list(cmd), capture_output=True, text=True, timeout=120)
    except FileNotFoundError:
        raise SlurmError(f"{cmd[0]} not found: --launcher slurm needs SLURM's commands on PATH (sbatch, squeue, "
                         "scontrol); run beseg compare on the cluster's login node.") from None
    except subprocess.TimeoutExpired:
        raise SlurmError(f"{' '.join(cmd[:2])} did not answer in 120 s while {what}.") from None
    if out.returncode != 0:
        raise SlurmError(f"{' '.join(cmd[:2])} failed while {what}: {out.stderr.strip() or out.stdout.strip()}")
    return out.stdout


def job_states(job_ids: Sequence[str]) -> dict[str, str]:
    """``{job id: state}`` of the jobs SLURM still lists (PENDING, RUNNING, COMPLETING, ...); ended jobs are absent.

    Raises:
        SlurmError: squeue is missing or fails.
    """
    if not job_ids:
        return {}
    out = subprocess.run(["squeue", "-h", "-j", ",".join(job_ids), "-o", "%i %T"], capture_output=True, text=True,
                         timeout=120)
    if out.returncode != 0:
        if "invalid job id" in out.stderr.lower():  # every one of them has ended and been forgotten
            return {}
        raise SlurmError(f"squeue failed: {out.stderr.strip()}")
    states = {}
    for line in out.stdout.splitlines():
        job, _, state = line.strip().partition(" ")
        if job:
            states[job] = state
    return states


def _ended_job(job_id: str) -> tuple[str, str]:
    """``(state, exit code)`` of an ended job from ``scontrol show job`` (``("ENDED", "")`` once SLURM forgot it)."""
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=120)
    state = re.search(r"\bJobState=(\S+)", out.stdout)
    code = re.search(r"\bExitCode=(\S+)", out.stdout)
    return (state.group(1) if state else "ENDED"), (code.group(1) if code else "")


class SlurmLauncher:
    """Submits each run as one SLURM job (see the module docstring).

    Args:
        partition, time_limit, mem: ``--partition``, ``--time``, ``--mem`` of each job (None: the cluster's default).
        gpus: GPUs per run; G > 1 trains as one G-rank DDP run inside the job.
        cpus: CPU cores per run (shared by its ranks).
        extra: further ``KEY=VALUE`` sbatch options (``account=X``, ``qos=Y``, ``constraint=a100``).
        detach: return after submitting.
        ranks: ranks per run (default ``max(1, gpus)``; more ranks than GPUs trains with gloo on CPU).
        poll_s: how often ``squeue`` is asked while waiting.
        python: the interpreter the jobs run (default this one: the cluster must see the same environment).

    Raises:
        ConfigError: an invalid option.
    """

    name = "slurm"

    def __init__(self, partition: str | None = None, time_limit: str | None = None, gpus: int = 0, cpus: int = 1,
                 mem: str | None = None, extra: Sequence[str] = (), detach: bool = False, ranks: int | None = None,
                 poll_s: float = 5.0, python: str | None = None) -> None:
        if gpus < 0 or cpus < 1:
            raise ConfigError(f"--gpus-per-run must be >= 0 and --cpus-per-run >= 1, got {gpus} and {cpus}.")
        if time_limit is not None and not _DURATION.match(time_limit):
            raise ConfigError(f"--slurm-time {time_limit!r}: use SLURM's form, e.g. 90, 12:00:00 or 2-00:00:00.")
        if mem is not None and not _MEM.match(mem):
            raise ConfigError(f"--mem-per-run {mem!r}: use SLURM's form, e.g. 32G or 16000M.")
        self.options: list[tuple[str, str]] = []
        for item in extra:
            key, sep, value = item.partition("=")
            key = key.strip().lstrip("-")
            if not sep or not key or not re.fullmatch(r"[a-z][a-z0-9-]*", key):
                raise ConfigError(f"--slurm-arg {item!r}: give KEY=VALUE, e.g. account=myproject or qos=long.")
            self.options.append((key, value.strip()))
        self.partition, self.time_limit, self.mem = partition, time_limit, mem
        self.gpus, self.cpus, self.detach, self.poll_s = gpus, cpus, detach, poll_s
        self.ranks = ranks if ranks is not None else max(1, gpus)
        if self.ranks < 1 or (gpus and gpus != self.ranks):
            raise ConfigError(f"a run has one rank per GPU: {gpus} GPU(s) but {self.ranks} rank(s).")
        self.python = python or sys.executable

    # -- job scripts ----------------------------------------------------------------------------

    def script(self, results: ResultsLayout, run_id: str) -> str:
        """The sbatch script of one run."""
        threads = max(1, self.cpus // self.ranks)
        head = [
            ("job-name", f"beseg:{run_id}"), ("output", str(results.log(run_id))), ("open-mode", "append"),
            ("nodes", "1"), ("ntasks", str(self.ranks)), ("cpus-per-task", str(threads)),
            ("signal", f"B:USR1@{SIGNAL_GRACE_S}"),
        ]
        if self.gpus:
            head.append(("gres", f"gpu:{self.gpus}"))
        for key, value in (("partition", self.partition), ("time", self.time_limit), ("mem", self.mem)):
            if value:
                head.append((key, value))
        head += self.options
        root = str(Path(__file__).resolve().parents[2])
        worker = [self.python, "-m", "beseg.experiment.worker", str(results.root), run_id, "--no-progress",
                  "--ranks", str(self.ranks)]
        lines = ["#!/bin/bash", f"# beseg compare: run {run_id} of {results.root}", "#SBATCH --requeue",
                 *(f"#SBATCH --{k}={v}" for k, v in head), "",
                 f"cd {shlex.quote(os.getcwd())}",
                 f"export PYTHONPATH={shlex.quote(root)}${{PYTHONPATH:+:$PYTHONPATH}}",
                 f"export OMP_NUM_THREADS={threads} BESEG_RUN_THREADS={threads}",
                 'echo "beseg: SLURM job $SLURM_JOB_ID (start $((${SLURM_RESTART_COUNT:-0} + 1))) on $(hostname)"',
                 "requeue() {",
                 '    echo "beseg: job $SLURM_JOB_ID is near its time limit or preempted: stopping the run and '
                 'requeueing the job; the run resumes from its last checkpoint"',
                 '    kill -TERM "$worker" 2>/dev/null; wait "$worker"',  # it releases its claim on SIGTERM
                 '    scontrol requeue "$SLURM_JOB_ID"',
                 "    exit 0",
                 "}",
                 "trap requeue USR1",
                 " ".join(shlex.quote(w) for w in worker) + " &",
                 "worker=$!",
                 'wait "$worker"',
                 ""]
        return "\n".join(lines)

    def _queued_job(self, results: ResultsLayout, run_id: str) -> str | None:
        """The job id of this run from an earlier submission if SLURM still has it queued or running."""
        try:
            job = results.job_id_file(run_id).read_text().strip()
        except OSError:
            return None
        return job if job and job in job_states([job]) else None

    def submit(self, results: ResultsLayout, run_id: str) -> str:
        """Write the run's script and ``sbatch`` it; returns the job id.

        Raises:
            SlurmError: sbatch refused it (its message says why).
        """
        path = results.sbatch(run_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        results.logs.mkdir(parents=True, exist_ok=True)
        path.write_text(self.script(results, run_id))
        job = _run(["sbatch", "--parsable", str(path)], f"submitting {run_id}").strip().split(";")[0]
        results.job_id_file(run_id).write_text(job + "\n")
        return job

    # -- executing ------------------------------------------------------------------------------

    def execute(self, results: ResultsLayout, run_ids: Sequence[str], log: Callable[[str], None]) -> LaunchOutcome:
        """Submit every run (unless it is queued already), then wait for the jobs unless ``detach``.

        Returns:
            The :class:`LaunchOutcome` (with ``detach``: every run ``busy``, ``jobs`` their job ids).

        Raises:
            SlurmError: SLURM is unreachable or refused a job.
        """
        from beseg.experiment.worker import EXIT_BUSY, EXIT_CLAIM_LOST, read_failure

        for tool in ("sbatch", "squeue", "scontrol"):
            if shutil.which(tool) is None:
                raise SlurmError(f"{tool} not found: --launcher slurm needs SLURM's commands on PATH.")
        outcome = LaunchOutcome()
        for run_id in run_ids:
            queued = self._queued_job(results, run_id)
            if queued is not None:
                outcome.jobs[run_id] = queued
                log(f"{run_id}: already queued as SLURM job {queued}")
                continue
            outcome.jobs[run_id] = self.submit(results, run_id)
            log(f"{run_id}: submitted as SLURM job {outcome.jobs[run_id]} (script {results.sbatch(run_id)}, "
                f"log {results.log(run_id)})")
        if self.detach:
            outcome.busy = list(run_ids)
            return outcome
        progress = Progress(len(run_ids), log)
        waiting = dict(outcome.jobs)
        while waiting:
            states = job_states(list(waiting.values()))
            for run_id, job in list(waiting.items()):
                if job in states:
                    continue
                del waiting[run_id]
                run_dir = results.root / run_id
                if (run_dir / "eval" / "summary.json").is_file() and (run_dir / "run.json").is_file():
                    outcome.done.append(run_id)
                    continue
                failure = read_failure(run_dir)
                state, code = _ended_job(job)
                if failure is None and code.split(":")[0] in (str(EXIT_BUSY), str(EXIT_CLAIM_LOST)):
                    outcome.busy.append(run_id)
                    log(f"{run_id}: another process " + ("took it over" if code.startswith(f"{EXIT_CLAIM_LOST}:")
                                                         else "holds it") + "; left to that process")
                    continue
                error = (failure or {}).get("error") or f"SLURM job {job} ended ({state}, exit code {code or '?'}) " \
                                                        "before the run finished"
                outcome.failed[run_id] = (error, results.log(run_id))
                log(f"{run_id}: FAILED in SLURM job {job} ({error}); log {results.log(run_id)}")
            running = sum(s in ("RUNNING", "COMPLETING") for s in states.values())
            progress.update(len(outcome.done), running, len(outcome.failed))
            if waiting:
                time.sleep(self.poll_s)
        return outcome

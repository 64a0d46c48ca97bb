"""``--launcher slurm``: one SLURM job per run, submitted with ``sbatch``.

Why sbatch and not submitit: it needs no extra package on the login node or the compute nodes,
and every job is a plain script, ``RESULTS/slurm/<run>.sbatch``, that a user (or their cluster's
admins) can read, edit and resubmit by hand. What submitit adds, pickled callables and
checkpoint/requeue, beseg has already: a run is a command (``python -m beseg.experiment.worker
RESULTS RUN_ID``) and it resumes from ``last.pt`` by itself.

Each job script:

* asks for ``--ntasks`` = the run's ranks (``--gpus-per-run``, at least 1), ``--cpus-per-task``,
  ``--gres=gpu:G``, ``--mem``, ``--time``, ``--partition`` and any ``--slurm-arg KEY=VALUE``; with
  ``--slurm-time auto`` each run's ``--time`` comes from the measured cost plan
  (:mod:`beseg.experiment.cost`, which sets :attr:`SlurmLauncher.run_limits`);
* writes its output to ``RESULTS/logs/<run>.log`` (appended across restarts);
* is ``--requeue``-able (a preempted job goes back to the queue) and asks for ``USR1`` before its
  time limit (``--signal=B:USR1@<grace>``, :func:`signal_grace_s`: 5 minutes, a tenth of shorter
  limits, at least 5 s): the script then requeues its own job
  (``scontrol requeue``), and the next start resumes from the run's ``last.pt`` (at most the
  epochs since the last checkpoint are redone; ``train.checkpoint_every``);
* runs the worker, which claims the run (the claim records the job id: a claim of a job SLURM no
  longer runs is taken over), trains, on G > 1 GPUs as one G-rank DDP run through ``srun -n G``
  (:func:`beseg.engine.distributed.launch_env`), and evaluates.

Paths in the script are quoted: ``#SBATCH`` values with spaces in double quotes (``%`` in the log
path doubled, since sbatch expands ``%j``...), shell words with :func:`shlex.quote`.

The compare command then waits, with one progress line, until every job has ended (``squeue``),
and reads each run's outcome from its folder; ``--detach`` returns after submitting. Running the
same command again submits only runs that are neither finished nor queued (a run whose script
SLURM lists, however it got there, is queued).

SLURM's commands go through :func:`beseg.slurm_calls.call`: one that hangs or fails without a
refusal is retried with a doubling pause (``BESEG_SLURM_ATTEMPTS``, ``BESEG_SLURM_TIMEOUT_S``,
``BESEG_SLURM_BACKOFF_S``), and a ``sbatch`` is retried only after the queue was searched for the
job it may have submitted. When SLURM stays unreachable the command ends with one line that names
the command and how to follow the jobs (``beseg compare RESULTS --status``); the jobs are never
cancelled and keep running.
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
from dataclasses import dataclass, replace
from pathlib import Path

from beseg.errors import ConfigError
from beseg.experiment.outcome import LaunchOutcome, Progress
from beseg.experiment.layout import ResultsLayout
from beseg.fileio import atomic_write_text
from beseg.slurm_calls import SlurmError, SlurmRetry, SlurmUnreachable, call

__all__ = ["SlurmLauncher", "SlurmError", "SlurmUnreachable", "PartitionLimits", "format_duration", "job_states",
           "parse_duration", "partition_limits", "signal_grace_s"]

#: Seconds before the time limit at which a job is told to requeue itself (at most; see :func:`signal_grace_s`).
SIGNAL_GRACE_S = 300
#: The least warning a job gets, for very short limits.
MIN_SIGNAL_GRACE_S = 5
#: ``--slurm-time`` value that takes each run's limit from the measured cost plan.
AUTO_TIME = "auto"
_DURATION = re.compile(r"^(\d+-)?\d+(:\d{1,2}){0,2}$")
_MEM = re.compile(r"^\d+[KMGT]?$", re.I)
#: #SBATCH values written without quotes.
_PLAIN = re.compile(r"[A-Za-z0-9_.,:/=@+%-]*")


def job_states(job_ids: Sequence[str], retry: SlurmRetry | None = None,
               log: Callable[[str], None] | None = None) -> dict[str, str]:
    """``{job id: state}`` of the jobs SLURM still lists (PENDING, RUNNING, COMPLETING, ...); ended jobs are absent.

    Args:
        job_ids: the jobs.
        retry: how a hanging or failing ``squeue`` is retried (default :meth:`SlurmRetry.from_env`).
        log: one line per retry.

    Raises:
        SlurmError: squeue is missing or refused the request.
        SlurmUnreachable: squeue did not answer (every attempt timed out or failed).
    """
    if not job_ids:
        return {}
    out = call(["squeue", "-h", "-j", ",".join(job_ids), "-o", "%i %T"], retry, log)
    if out.returncode != 0:
        if "invalid job id" in out.stderr.lower():  # every one of them has ended and been forgotten
            return {}
        raise SlurmError(f"squeue refused to list jobs {','.join(job_ids)}: {out.stderr.strip()}")
    states = {}
    for line in out.stdout.splitlines():
        job, _, state = line.strip().partition(" ")
        if job:
            states[job] = state
    return states


def parse_duration(text: str) -> int | None:
    """A SLURM duration in seconds: ``MM``, ``MM:SS``, ``HH:MM:SS``, ``D-HH``, ``D-HH:MM``, ``D-HH:MM:SS``;
    ``None`` for ``UNLIMITED``/``INFINITE``.

    Raises:
        ConfigError: not a SLURM duration.
    """
    text = text.strip()
    if text.upper() in ("UNLIMITED", "INFINITE", "NONE"):
        return None
    if not _DURATION.match(text):
        raise ConfigError(f"{text!r} is not a SLURM time (e.g. 90, 12:00:00 or 2-00:00:00).")
    days, _, rest = text.rpartition("-")
    parts = [int(p) for p in rest.split(":")]
    if days:  # D-HH[:MM[:SS]]
        hours, minutes, seconds = (parts + [0, 0])[:3]
        return ((int(days) * 24 + hours) * 60 + minutes) * 60 + seconds
    if len(parts) == 1:
        return parts[0] * 60
    if len(parts) == 2:
        return parts[0] * 60 + parts[1]
    return (parts[0] * 60 + parts[1]) * 60 + parts[2]


def format_duration(seconds: float) -> str:
    """Seconds as a SLURM time, rounded up to whole minutes (SLURM's unit): ``0:05:00``, ``1-06:30:00``."""
    minutes = max(1, -(-int(round(seconds)) // 60))
    days, minutes = divmod(minutes, 24 * 60)
    text = f"{minutes // 60}:{minutes % 60:02d}:00"
    return f"{days}-{text.zfill(8)}" if days else text


def signal_grace_s(limit_s: float | None) -> int:
    """How long before a time limit of ``limit_s`` seconds a job is told to requeue itself: :data:`SIGNAL_GRACE_S`,
    or a tenth of a shorter limit (at least :data:`MIN_SIGNAL_GRACE_S`), so a short job still trains first."""
    if limit_s is None:
        return SIGNAL_GRACE_S
    return int(min(SIGNAL_GRACE_S, max(MIN_SIGNAL_GRACE_S, limit_s // 10)))


@dataclass(frozen=True)
class PartitionLimits:
    """A partition's time limits, as ``scontrol show partition`` reports them.

    Attributes:
        name: the partition (the cluster's default when none was named).
        max_s: ``MaxTime`` in seconds (``None``: unlimited).
        default_s: ``DefaultTime``, what a job without ``--time`` gets (``None``: ``MaxTime``).
    """

    name: str
    max_s: int | None
    default_s: int | None


def partition_limits(partition: str | None = None, retry: SlurmRetry | None = None,
                     log: Callable[[str], None] | None = None) -> PartitionLimits:
    """The time limits of ``partition`` (default: the cluster's default partition), read with ``scontrol``.

    Args:
        partition: the partition (None: the cluster's default).
        retry: how a hanging or failing ``scontrol`` is retried (default :meth:`SlurmRetry.from_env`).
        log: one line per retry.

    Raises:
        SlurmError: scontrol is missing or refused the request, or no such partition.
        SlurmUnreachable: scontrol did not answer.
    """
    out = call(["scontrol", "show", "partition", "-o", *([partition] if partition else [])], retry, log)
    if out.returncode != 0:
        raise SlurmError(f"scontrol refused to show partition {partition or '(default)'}: {out.stderr.strip()}")
    for line in out.stdout.splitlines():
        fields = dict(re.findall(r"(\w+)=(\S*)", line))
        if partition is None and fields.get("Default") != "YES":
            continue
        if partition is not None and fields.get("PartitionName") != partition:
            continue
        default = fields.get("DefaultTime", "NONE")
        return PartitionLimits(fields.get("PartitionName", partition or "?"),
                               parse_duration(fields.get("MaxTime", "UNLIMITED")),
                               None if default.upper() == "NONE" else parse_duration(default))
    raise SlurmError(f"no partition {partition!r} in `scontrol show partition`" if partition else
                     "the cluster has no default partition; give --slurm-partition.")


def _ended_job(job_id: str, retry: SlurmRetry | None = None,
               log: Callable[[str], None] | None = None) -> tuple[str, str]:
    """``(state, exit code)`` of an ended job from ``scontrol show job`` (``("ENDED", "")`` once SLURM forgot it).

    Raises:
        SlurmUnreachable: scontrol did not answer.
    """
    out = call(["scontrol", "show", "job", "-o", job_id], retry, log)
    state = re.search(r"\bJobState=(\S+)", out.stdout)
    code = re.search(r"\bExitCode=(\S+)", out.stdout)
    return (state.group(1) if state else "ENDED"), (code.group(1) if code else "")


def _directive(key: str, value: str) -> str:
    """One ``#SBATCH --key=value`` line; a value with spaces or shell characters in double quotes (sbatch reads them).

    Raises:
        ConfigError: a value sbatch cannot read back (a double quote, backslash or line break in it).
    """
    if re.search(r'["\\\r\n]', value):
        raise ConfigError(f"sbatch option --{key}={value!r}: a double quote, backslash or line break cannot be written "
                          "in a job script's #SBATCH line; use another value (for a path: another folder).")
    return f"#SBATCH --{key}={value}" if _PLAIN.fullmatch(value) else f'#SBATCH --{key}="{value}"'


class SlurmLauncher:
    """Submits each run as one SLURM job (see the module docstring).

    Args:
        partition, time_limit, mem: ``--partition``, ``--time``, ``--mem`` of each job (None: the cluster's default);
            ``time_limit="auto"``: each run's from :attr:`run_limits` (the measured cost plan).
        gpus: GPUs per run; G > 1 trains as one G-rank DDP run inside the job.
        cpus: CPU cores per run (shared by its ranks).
        extra: further ``KEY=VALUE`` sbatch options (``account=X``, ``qos=Y``, ``constraint=a100``).
        detach: return after submitting.
        ranks: ranks per run (default ``max(1, gpus)``; more ranks than GPUs trains with gloo on CPU).
        poll_s: how often ``squeue`` is asked while waiting.
        python: the interpreter the jobs run (default this one: the cluster must see the same environment).
        retry: how a hanging or failing ``sbatch``/``squeue``/``scontrol`` is retried (default
            :meth:`~beseg.slurm_calls.SlurmRetry.from_env`: ``BESEG_SLURM_ATTEMPTS``, ``BESEG_SLURM_TIMEOUT_S``,
            ``BESEG_SLURM_BACKOFF_S``).

    Raises:
        ConfigError: an invalid option.
    """

    name = "slurm"

    def __init__(self, partition: str | None = None, time_limit: str | None = None, gpus: int = 0, cpus: int = 1,
                 mem: str | None = None, extra: Sequence[str] = (), detach: bool = False, ranks: int | None = None,
                 poll_s: float = 5.0, python: str | None = None, retry: SlurmRetry | None = None) -> None:
        if gpus < 0 or cpus < 1:
            raise ConfigError(f"--gpus-per-run must be >= 0 and --cpus-per-run >= 1, got {gpus} and {cpus}.")
        if time_limit is not None and time_limit != AUTO_TIME and not _DURATION.match(time_limit):
            raise ConfigError(f"--slurm-time {time_limit!r}: use SLURM's form, e.g. 90, 12:00:00 or 2-00:00:00, or "
                              "auto (from the measured cost plan).")
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
        self.retry = retry or SlurmRetry.from_env()
        #: ``{run id: seconds}``: each run's ``--time`` under ``--slurm-time auto`` (set from the cost plan).
        self.run_limits: dict[str, int] = {}

    def limit_s(self, run_id: str) -> int | None:
        """The run's time limit in seconds: its :attr:`run_limits` entry, else ``--slurm-time`` (``None``: not set)."""
        if run_id in self.run_limits:
            return self.run_limits[run_id]
        return parse_duration(self.time_limit) if self.time_limit not in (None, AUTO_TIME) else None

    # -- job scripts ----------------------------------------------------------------------------

    def script(self, results: ResultsLayout, run_id: str) -> str:
        """The sbatch script of one run."""
        threads = max(1, self.cpus // self.ranks)
        limit = self.limit_s(run_id)
        head = [
            # sbatch expands %j, %x... in file names; %% is a literal %
            ("job-name", f"beseg:{run_id}"), ("output", str(results.log(run_id)).replace("%", "%%")),
            ("open-mode", "append"),
            ("nodes", "1"), ("ntasks", str(self.ranks)), ("cpus-per-task", str(threads)),
            ("signal", f"B:USR1@{signal_grace_s(limit)}"),
        ]
        if self.gpus:
            head.append(("gres", f"gpu:{self.gpus}"))
        time_limit = format_duration(limit) if run_id in self.run_limits else \
            (self.time_limit if self.time_limit != AUTO_TIME else None)
        for key, value in (("partition", self.partition), ("time", time_limit), ("mem", self.mem)):
            if value:
                head.append((key, value))
        head += self.options
        root = str(Path(__file__).resolve().parents[2])
        worker = [self.python, "-m", "beseg.experiment.worker", str(results.root), run_id, "--no-progress",
                  "--ranks", str(self.ranks)]
        lines = ["#!/bin/bash", f"# beseg compare: run {run_id} of {results.root}", "#SBATCH --requeue",
                 *(_directive(k, v) for k, v in head), "",
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

    def queued_jobs(self, log: Callable[[str], None] | None = None,
                    retry: SlurmRetry | None = None) -> dict[str, str]:
        """``{job script: job id}`` of this user's jobs SLURM still lists (queued, running, completing).

        A run whose script is among them is queued already (submitted by an earlier command, by a ``sbatch`` that
        timed out after all, or by hand), so it is not submitted again.

        Raises:
            SlurmError: squeue refused the request.
            SlurmUnreachable: squeue did not answer.
        """
        out = call(["squeue", "-h", "-u", str(os.getuid()), "-o", "%i|%o"], retry or self.retry, log)
        if out.returncode != 0:
            raise SlurmError(f"squeue refused to list this user's jobs: {out.stderr.strip() or out.stdout.strip()}")
        jobs = {}
        for line in out.stdout.splitlines():
            job, _, script = line.strip().partition("|")
            if job and script:
                jobs[script] = job
        return jobs

    @staticmethod
    def _recorded_job(results: ResultsLayout, run_id: str, queued: dict[str, str]) -> str | None:
        """The job id an earlier submission recorded for the run (``RESULTS/slurm/<run>.jobid``), if SLURM lists it."""
        try:
            job = results.job_id_file(run_id).read_text().strip()
        except OSError:
            return None
        return job if job and job in queued.values() else None

    def submit(self, results: ResultsLayout, run_id: str, log: Callable[[str], None] | None = None) -> str:
        """Write the run's script and ``sbatch`` it; returns the job id.

        A ``sbatch`` that hangs or fails without a refusal is retried (:attr:`retry`); before each retry the queue is
        searched for the script, so that a job the failed attempt did submit is taken, not submitted twice.

        Raises:
            SlurmError: sbatch refused it (its message says why).
            SlurmUnreachable: sbatch did not answer.
        """
        path = results.sbatch(run_id).absolute()
        path.parent.mkdir(parents=True, exist_ok=True)
        results.logs.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, self.script(results, run_id))
        cmd = ["sbatch", "--parsable", str(path)]

        def submitted_after_all() -> subprocess.CompletedProcess | None:
            try:
                job = self.queued_jobs(retry=replace(self.retry, attempts=1)).get(str(path))
            except SlurmError:  # cannot tell: submit again (the run's claim keeps a second job from training it)
                return None
            if job is not None and log is not None:
                log(f"{run_id}: the failed sbatch submitted it after all, as SLURM job {job}")
            return subprocess.CompletedProcess(cmd, 0, job, "") if job is not None else None

        out = call(cmd, self.retry, log, before_retry=submitted_after_all)
        if out.returncode != 0:
            raise SlurmError(f"sbatch refused {run_id} ({path}): {out.stderr.strip() or out.stdout.strip()}")
        job = out.stdout.strip().split(";")[0]
        atomic_write_text(results.job_id_file(run_id), job + "\n")
        return job

    # -- executing ------------------------------------------------------------------------------

    def execute(self, results: ResultsLayout, run_ids: Sequence[str], log: Callable[[str], None]) -> LaunchOutcome:
        """Submit every run (unless it is queued already), then wait for the jobs unless ``detach``.

        Returns:
            The :class:`LaunchOutcome` (with ``detach``: every run ``busy``, ``jobs`` their job ids).

        Raises:
            SlurmError: SLURM is unreachable or refused a job.
        """
        for tool in ("sbatch", "squeue", "scontrol"):
            if shutil.which(tool) is None:
                raise SlurmError(f"{tool} not found: --launcher slurm needs SLURM's commands on PATH.")
        outcome = LaunchOutcome()
        try:
            queued = self.queued_jobs(log)
            for run_id in run_ids:
                job = queued.get(str(results.sbatch(run_id).absolute())) or self._recorded_job(results, run_id, queued)
                if job is not None:
                    outcome.jobs[run_id] = job
                    atomic_write_text(results.job_id_file(run_id), job + "\n")
                    log(f"{run_id}: already queued as SLURM job {job}")
                    continue
                outcome.jobs[run_id] = self.submit(results, run_id, log)
                log(f"{run_id}: submitted as SLURM job {outcome.jobs[run_id]} (script {results.sbatch(run_id)}, "
                    f"log {results.log(run_id)})")
        except SlurmError as err:  # unreachable, or a refusal: the jobs submitted so far are left to run
            raise SlurmError(_stopped(err, results, outcome.jobs, submitting=True)) from None
        if self.detach:
            outcome.busy = list(run_ids)
            return outcome
        progress = Progress(len(run_ids), log)
        waiting = dict(outcome.jobs)
        try:
            self._wait(results, waiting, outcome, progress, log)
        except SlurmUnreachable as err:
            raise SlurmError(_stopped(err, results, outcome.jobs)) from None
        return outcome

    def _wait(self, results: ResultsLayout, waiting: dict[str, str], outcome: LaunchOutcome, progress: Progress,
              log: Callable[[str], None]) -> None:
        """Poll ``squeue`` until every job in ``waiting`` (``{run id: job id}``) has ended; file each run's outcome."""
        from beseg.experiment.worker import EXIT_BUSY, EXIT_CLAIM_LOST, read_failure

        while waiting:
            states = job_states(list(waiting.values()), self.retry, log)
            for run_id, job in list(waiting.items()):
                if job in states:
                    continue
                del waiting[run_id]
                run_dir = results.root / run_id
                if (run_dir / "eval" / "summary.json").is_file() and (run_dir / "run.json").is_file():
                    outcome.done.append(run_id)
                    continue
                failure = read_failure(run_dir)
                state, code = _ended_job(job, self.retry, log)
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


def _stopped(err: SlurmError, results: ResultsLayout, jobs: dict[str, str], submitting: bool = False) -> str:
    """The one line of a comparison that stops because SLURM does not answer (or refused a job while submitting):
    the jobs it submitted are left running, and the same command picks them up."""
    ids = sorted(set(jobs.values()), key=lambda j: (len(j), j))
    shown = ", ".join(ids[:8]) + (f" and {len(ids) - 8} more" if len(ids) > 8 else "")
    status = f"`beseg compare {shlex.quote(str(results.root))} --status`"
    if not ids:
        kept = "no job was submitted"
    else:
        kept = (f"the {len(ids)} SLURM job(s) submitted ({shown}) keep running (none was cancelled); follow them with "
                f"{status}")
    if not isinstance(err, SlurmUnreachable):
        return f"{err}; {kept}; fix the cause and run the same command again to submit the rest."
    again = "run the same command again to submit the rest" if submitting else \
        "run the same command again to collect their results (it submits nothing twice)"
    return f"SLURM does not answer: {err}; {kept}; {again} once SLURM answers."

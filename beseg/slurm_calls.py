"""Calls to SLURM's commands (``sbatch``, ``squeue``, ``scontrol``) that outlast a busy or restarting controller.

On a shared cluster ``slurmctld`` is sometimes slow to answer (hundreds of users polling it, a
backfill pass) or briefly unreachable (a restart, a fail-over), and its commands then hang or exit
non-zero with ``Socket timed out on send/recv operation`` or ``Unable to contact slurm controller``.
Such a moment must neither crash a comparison that waits for its jobs nor abort the wait. So every
call here:

* is stopped after :attr:`SlurmRetry.timeout_s` (the whole process group, so nothing it started
  lingers);
* is tried again after a pause that doubles each time (:attr:`SlurmRetry.backoff_s`, then twice
  that, ..., at most :attr:`SlurmRetry.max_backoff_s`), at most :attr:`SlurmRetry.attempts` times
  in all, when it timed out or failed with anything but a refusal;
* is not retried when SLURM refused the request (an invalid partition, account, option or job id:
  asking again gives the same answer), so the caller can read the refusal at once;
* raises :class:`SlurmUnreachable`, naming the command, the attempts and the last error, when
  every attempt failed.

The limits come from the environment (:meth:`SlurmRetry.from_env`), so a user on a slow cluster
can widen them without a new option on every command:

* ``BESEG_SLURM_ATTEMPTS`` (default 5): tries of one call;
* ``BESEG_SLURM_TIMEOUT_S`` (default 60): seconds one try may take;
* ``BESEG_SLURM_BACKOFF_S`` (default 2): the first pause; it doubles up to 60 s.

With the defaults a call gives up after about 5 min 30 s without an answer.

This module sits below the engine and the experiment layer: run claims
(:mod:`beseg.engine.claim`, "has this job ended?") and the SLURM launcher
(:mod:`beseg.experiment.slurm`) ask SLURM through it.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from beseg.errors import BesegError, ConfigError

__all__ = ["SlurmError", "SlurmUnreachable", "SlurmRetry", "call", "job_listed", "ENV_ATTEMPTS", "ENV_TIMEOUT",
           "ENV_BACKOFF"]

ENV_ATTEMPTS = "BESEG_SLURM_ATTEMPTS"
ENV_TIMEOUT = "BESEG_SLURM_TIMEOUT_S"
ENV_BACKOFF = "BESEG_SLURM_BACKOFF_S"

#: Answers that asking again cannot change: SLURM understood the request and refused it.
_REFUSAL = re.compile(
    r"invalid|not available|unrecognized option|unrecognised option|unknown option|access denied|permission denied"
    r"|not permitted|requested node configuration|violates|usage:", re.I)


class SlurmError(BesegError):
    """SLURM refused a request or cannot be reached."""


class SlurmUnreachable(SlurmError):
    """Every attempt of a SLURM command timed out or failed without a refusal.

    Attributes:
        command: the command's first two words (``squeue -h``), for messages.
    """

    def __init__(self, message: str, command: str) -> None:
        super().__init__(message)
        self.command = command


@dataclass(frozen=True)
class SlurmRetry:
    """How long a SLURM command may take and how often it is tried.

    Attributes:
        attempts: tries in all (>= 1).
        timeout_s: seconds one try may take before it is stopped.
        backoff_s: the pause before the second try; each further pause doubles it.
        max_backoff_s: the longest pause.

    Raises:
        ConfigError: a value out of range.
    """

    attempts: int = 5
    timeout_s: float = 60.0
    backoff_s: float = 2.0
    max_backoff_s: float = 60.0

    def __post_init__(self) -> None:
        if isinstance(self.attempts, bool) or not isinstance(self.attempts, int) or self.attempts < 1:
            raise ConfigError(f"SLURM calls need at least 1 attempt, got {self.attempts!r} ({ENV_ATTEMPTS}).")
        if not self.timeout_s > 0:
            raise ConfigError(f"the SLURM call timeout must be > 0 s, got {self.timeout_s!r} ({ENV_TIMEOUT}).")
        if not 0 <= self.backoff_s <= self.max_backoff_s:
            raise ConfigError(f"the SLURM retry pause must be between 0 and {self.max_backoff_s} s, got "
                              f"{self.backoff_s!r} ({ENV_BACKOFF}).")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> SlurmRetry:
        """The policy set by ``BESEG_SLURM_ATTEMPTS``, ``BESEG_SLURM_TIMEOUT_S`` and ``BESEG_SLURM_BACKOFF_S``.

        Raises:
            ConfigError: a variable that is not a number in range, naming it.
        """
        environ = os.environ if environ is None else environ
        values: dict[str, float | int] = {}
        for key, name, kind in ((ENV_ATTEMPTS, "attempts", int), (ENV_TIMEOUT, "timeout_s", float),
                                (ENV_BACKOFF, "backoff_s", float)):
            text = environ.get(key, "").strip()
            if not text:
                continue
            try:
                values[name] = kind(text)
            except ValueError:
                raise ConfigError(f"{key}={text!r}: expected a{'n integer' if kind is int else ' number'}.") from None
        return cls(**values)

    def delays(self) -> list[float]:
        """The pauses between the tries: ``backoff_s * 2**k``, at most ``max_backoff_s`` (``attempts - 1`` of them)."""
        return [min(self.backoff_s * 2 ** k, self.max_backoff_s) for k in range(self.attempts - 1)]


def _run_once(cmd: Sequence[str], timeout_s: float) -> subprocess.CompletedProcess:
    """Run ``cmd`` in its own process group; on timeout kill the whole group (a hung command may have children).

    Raises:
        subprocess.TimeoutExpired: it did not end within ``timeout_s``.
        OSError: it could not be started (FileNotFoundError: not on PATH).
    """
    proc = subprocess.Popen(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.communicate()
        raise
    return subprocess.CompletedProcess(list(cmd), proc.returncode, out, err)


def _duration(seconds: float) -> str:
    return f"{seconds:.3g} s" if seconds < 120 else f"{seconds / 60:.0f} min"


def call(cmd: Sequence[str], retry: SlurmRetry | None = None, log: Callable[[str], None] | None = None,
         before_retry: Callable[[], subprocess.CompletedProcess | None] | None = None,
         sleep: Callable[[float], None] = time.sleep) -> subprocess.CompletedProcess:
    """Run a SLURM command, retrying it with a doubling pause while it hangs or fails without a refusal.

    Args:
        cmd: the command line (``["squeue", "-h", "-j", "17"]``).
        retry: the policy (default :meth:`SlurmRetry.from_env`).
        log: receives one line per retry (``squeue -h: no answer in 60 s; trying again in 2 s (attempt 2 of 5)``).
        before_retry: called before each retry; a result it returns is taken as the command's (e.g. a job that
            a timed-out ``sbatch`` did submit, so that it is not submitted twice).
        sleep: the pause (tests pass a recorder).

    Returns:
        The finished process: exit code 0, or non-zero with a refusal in its output (the caller reads it).

    Raises:
        SlurmError: the command is not on PATH.
        SlurmUnreachable: every attempt timed out or failed without a refusal.
    """
    retry = retry or SlurmRetry.from_env()
    what = " ".join(cmd[:2])
    delays = retry.delays()
    start = time.monotonic()
    last = ""
    for attempt in range(1, retry.attempts + 1):
        try:
            out = _run_once(cmd, retry.timeout_s)
        except FileNotFoundError:
            raise SlurmError(f"{cmd[0]} not found: SLURM's commands (sbatch, squeue, scontrol) must be on PATH; run "
                             "beseg on the cluster's login node.") from None
        except subprocess.TimeoutExpired:
            last = f"no answer in {_duration(retry.timeout_s)}"
        except OSError as err:
            last = f"could not be started ({err})"
        else:
            message = (out.stderr.strip() or out.stdout.strip()).replace("\n", " ")
            if out.returncode == 0 or _REFUSAL.search(message):
                return out
            last = f"exit code {out.returncode}" + (f": {message[:300]}" if message else "")
        if attempt == retry.attempts:
            break
        delay = delays[attempt - 1]
        if log is not None:
            log(f"{what}: {last}; trying again in {_duration(delay)} (attempt {attempt + 1} of {retry.attempts})")
        sleep(delay)
        if before_retry is not None:
            found = before_retry()
            if found is not None:
                return found
    raise SlurmUnreachable(f"{what} failed {retry.attempts} time(s) over {_duration(time.monotonic() - start)} "
                           f"(last: {last})", what)


def job_listed(job_id: str, retry: SlurmRetry | None = None) -> bool | None:
    """Whether SLURM still lists a job (pending, running, requeued, completing): False once it has ended and
    been forgotten; None when SLURM cannot be asked (no ``squeue``, or it does not answer).

    Args:
        job_id: the job id.
        retry: the policy (default: one try of 30 s: callers such as a claim's staleness check would rather
            decide "unknown" now and ask again later than wait).
    """
    try:
        out = call(["squeue", "-h", "-j", str(job_id), "-o", "%T"], retry or SlurmRetry(attempts=1, timeout_s=30.0))
    except SlurmError:
        return None
    if out.returncode != 0:
        # squeue exits non-zero for a job id it no longer knows ("Invalid job id specified").
        return False if "invalid job id" in out.stderr.lower() else None
    return bool(out.stdout.strip())

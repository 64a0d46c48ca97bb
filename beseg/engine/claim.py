"""A run folder's claim: which process works on it, safe on a filesystem shared by several hosts.

The claim is ``RUN_DIR/.claim``, a :class:`beseg.fileio.FileLock` (the one lock primitive; the
store's case locks are the same): created atomically, so of two processes (or two hosts) claiming
one run exactly one succeeds; its record names the holder in a form that survives pid reuse (host,
pid, process start time, boot id, SLURM job, step, task and restart count, a random token), and the
holder refreshes its own heartbeat file ``RUN_DIR/.claim.<token>`` every ``heartbeat_s``. Another
process takes a claim over, with a warning, only when its holder is provably gone: a dead (or
reused) pid on this machine, a heartbeat silent for ``stale_after_s``, an earlier start of a
requeued SLURM job, or a SLURM job that has ended. Otherwise :class:`RunLockedError` names the
holder.

A holder that was taken over (stopped past the limit, then continued) learns it at its next write:
every write to the run folder calls :meth:`Claim.check` first (:class:`beseg.engine.rundir.RunDir`
does), which raises :class:`~beseg.fileio.LockLostError` (``RUN: claim lost to HOST/PID; stopping
without writing``). Processes exit with :data:`~beseg.fileio.EXIT_LOCK_LOST` then, which the
launchers read as "another process has the run".

Timings: :data:`HEARTBEAT_S` and :data:`STALE_AFTER_S`, or ``BESEG_CLAIM_HEARTBEAT_S`` and
``BESEG_CLAIM_STALE_S``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from beseg.fileio import FileLock, LockBusyError, LockLostError, LockTimings

__all__ = ["Claim", "RunLockedError", "LockLostError", "HEARTBEAT_S", "STALE_AFTER_S", "slurm_job_id"]

#: How often the holder refreshes its heartbeat (seconds).
HEARTBEAT_S = 30.0
#: A heartbeat unchanged this long (seconds) marks the holder as gone, whatever its host.
STALE_AFTER_S = 300.0


class RunLockedError(LockBusyError):
    """Another live process works on the same run folder."""


def slurm_job_id() -> str | None:
    """This process's SLURM job id (``SLURM_JOB_ID``; an array task's own id), or None outside SLURM."""
    return os.environ.get("SLURM_JOB_ID") or None


class Claim(FileLock):
    """The claim file of one run folder (or of another folder one process works on at a time).

    A claim of this very process counts as held by the caller (a compare's worker holds the run while
    the trainer in the same process claims it again), as does one whose token a parent handed down
    in ``BESEG_CLAIM_TOKEN`` (a job's worker starting the ranks of a DDP run).

    Args:
        path: the claim file (``RUN_DIR/.claim``).
        heartbeat_s: how often a held claim's heartbeat is refreshed (default: :data:`HEARTBEAT_S`,
            or ``BESEG_CLAIM_HEARTBEAT_S``).
        stale_after_s: how long a heartbeat may stay unchanged before its holder counts as gone
            (default: :data:`STALE_AFTER_S`, or ``BESEG_CLAIM_STALE_S``).

    Raises:
        ValueError: unless ``0 < heartbeat_s < stale_after_s``.
        ConfigError: an environment variable that is not a number.
    """

    def __init__(self, path: str | Path, heartbeat_s: float | None = None, stale_after_s: float | None = None) -> None:
        timings = LockTimings.from_env("CLAIM", HEARTBEAT_S, STALE_AFTER_S)
        timings = LockTimings(heartbeat_s if heartbeat_s is not None else timings.heartbeat_s,
                              stale_after_s if stale_after_s is not None else timings.stale_after_s, timings.skew_s)
        path = Path(path)
        super().__init__(path, timings, noun="claim", label=str(path.parent), reentrant=True,
                         inherited_token=os.environ.get("BESEG_CLAIM_TOKEN"))

    def holder(self) -> dict[str, Any] | None:
        """The claim's record with its latest heartbeat, or None when there is none (a torn or foreign file
        reads as ``{}``)."""
        return self.read()

    def stale_reason(self, record: dict[str, Any], now: float | None = None) -> str | None:
        """Why the holder of ``record`` is gone, or None when it may be alive (see :meth:`FileLock.gone_reason`)."""
        return self.gone_reason(record, now)

    def busy_error(self, record: dict[str, Any]) -> RunLockedError:
        if not record:
            return RunLockedError(f"run folder {self.path.parent}: its claim file {self.path} is unreadable (being "
                                  "written, or not beseg's); it is taken over once it has not changed for "
                                  f"{self.timings.stale_after_s:.0f} s.", record)
        beat = record.get("heartbeat")
        ago = f", heartbeat {max(0.0, time.time() - beat):.0f} s ago" if isinstance(beat, (int, float)) else ""
        return RunLockedError(
            f"run folder {self.path.parent} is in use by {self.describe(record)}{ago} (claim file {self.path}); "
            "wait for it to finish or stop it, or pick another --out folder.", record)

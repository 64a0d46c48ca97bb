"""A run folder's claim: which process works on it, safe on a filesystem shared by several hosts.

The claim is a file (``RUN_DIR/.claim``) created atomically (a hard link, or ``O_CREAT |
O_EXCL``), so of two processes (or two hosts) claiming one run, exactly one succeeds. It records::

    {"host": "node12", "pid": 4242, "job_id": "5120" or null, "token": "...",
     "started": 1764512345.1, "heartbeat": 1764512399.8}

and the holder refreshes ``heartbeat`` (Unix seconds) every ``heartbeat_s`` from a background
thread while it works. Another process takes a claim over, with a warning, when its holder is
known to be gone:

* same host, and the pid no longer exists;
* any host, and the heartbeat is older than ``stale_after_s`` (the holder was killed, its node
  lost, or it hangs);
* a SLURM job id that SLURM no longer runs (``squeue`` does not list it), or this process's own
  job id (an earlier incarnation of this job, before a requeue).

Otherwise the claim is live and :class:`RunLockedError` names its holder. The record is written
aside and hard-linked into place, so a reader never sees half of one; a takeover happens under a
guard file (``.claim.takeover``) and only removes the very record that was judged stale, so of
several processes that find one stale claim, exactly one ends up holding the run.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
import warnings
from pathlib import Path
from typing import Any

from beseg.errors import BesegError
from beseg.fileio import atomic_write_text
from beseg.slurm_calls import job_listed

__all__ = ["Claim", "RunLockedError", "HEARTBEAT_S", "STALE_AFTER_S", "slurm_job_id"]

#: How often the holder refreshes its heartbeat (seconds).
HEARTBEAT_S = 30.0
#: A heartbeat older than this (seconds) marks the holder as gone, whatever its host.
STALE_AFTER_S = 300.0


class RunLockedError(BesegError):
    """Another live process works on the same run folder."""


def slurm_job_id() -> str | None:
    """This process's SLURM job id (``SLURM_JOB_ID``; an array task's own id), or None outside SLURM."""
    return os.environ.get("SLURM_JOB_ID") or None


def _slurm_job_running(job_id: str) -> bool | None:
    """Whether SLURM still lists the job (pending, running, requeued...); None when it cannot be asked."""
    return job_listed(job_id)  # one try with a timeout: "unknown" now, asked again at the next check


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


class Claim:
    """The claim file of one run folder.

    Args:
        path: the claim file (``RUN_DIR/.claim``).
        heartbeat_s: how often a held claim's heartbeat is refreshed.
        stale_after_s: age of a heartbeat after which its holder counts as gone.
    """

    def __init__(self, path: str | Path, heartbeat_s: float = HEARTBEAT_S,
                 stale_after_s: float = STALE_AFTER_S) -> None:
        if not 0 < heartbeat_s < stale_after_s:
            raise ValueError(f"need 0 < heartbeat_s < stale_after_s, got {heartbeat_s} and {stale_after_s}.")
        self.path = Path(path)
        self.heartbeat_s = heartbeat_s
        self.stale_after_s = stale_after_s
        self.token: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- reading ------------------------------------------------------------------------------

    def holder(self) -> dict[str, Any] | None:
        """The claim file's record, or None when there is none (a torn or foreign file reads as {})."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except OSError:
            return {}
        try:
            record = json.loads(text)
        except json.JSONDecodeError:
            return {}
        return record if isinstance(record, dict) else {}

    def is_mine(self, record: dict[str, Any] | None) -> bool:
        """The record is this process's (same host and pid), or its parent's that handed it down
        (``BESEG_CLAIM_TOKEN``: a job's worker starting the ranks of a DDP run)."""
        if not record:
            return False
        inherited = os.environ.get("BESEG_CLAIM_TOKEN")
        return (record.get("host") == socket.gethostname() and record.get("pid") == os.getpid()) or (
            bool(inherited) and record.get("token") == inherited)

    def stale_reason(self, record: dict[str, Any], now: float | None = None) -> str | None:
        """Why the holder of ``record`` is gone, or None when it may be alive.

        Args:
            record: a claim record (:meth:`holder`).
            now: the current time (Unix seconds); default ``time.time()``.
        """
        now = time.time() if now is None else now
        beat = record.get("heartbeat")
        if not isinstance(beat, (int, float)):
            return "the claim file is unreadable or has no heartbeat"
        host, pid, job = record.get("host"), record.get("pid"), record.get("job_id")
        if job is not None and job == slurm_job_id() and not self.is_mine(record):
            return f"it was made by an earlier start of this SLURM job ({job}), which was requeued"
        if host == socket.gethostname() and isinstance(pid, int) and not _pid_alive(pid):
            return f"process {pid} on {host} no longer exists"
        if now - beat > self.stale_after_s:
            return f"its heartbeat is {now - beat:.0f} s old (more than {self.stale_after_s:.0f} s)"
        if job is not None and _slurm_job_running(str(job)) is False:
            return f"SLURM job {job} has ended"
        return None

    def describe(self, record: dict[str, Any]) -> str:
        """``process 42 on node3 (SLURM job 17)``."""
        where = f"process {record.get('pid', '?')} on {record.get('host', '?')}"
        return where + (f" (SLURM job {record['job_id']})" if record.get("job_id") else "")

    # -- holding ------------------------------------------------------------------------------

    def _record(self, started: float | None = None) -> dict[str, Any]:
        now = time.time()
        return {"host": socket.gethostname(), "pid": os.getpid(), "job_id": slurm_job_id(), "token": self.token,
                "started": started if started is not None else now, "heartbeat": now}

    def acquire(self) -> bool:
        """Claim the run, taking a stale claim over with a warning.

        Returns:
            True when this call took the claim (release it with :meth:`release`); False when this
            process holds it already (an outer caller does; nothing to release).

        Raises:
            RunLockedError: a live process holds it.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(50):
            self.token = uuid.uuid4().hex
            record = self._record()
            if self._create(record):
                self._start_heartbeat(record["started"])
                return True
            held = self.holder()
            if held is None:
                continue  # released meanwhile: try again
            if self.is_mine(held):
                return False
            reason = self.stale_reason(held) if held else self._unreadable_reason()
            if reason is None:
                if not held:
                    time.sleep(0.05)  # being written, or a foreign file: look again
                    continue
                raise RunLockedError(
                    f"run folder {self.path.parent} is in use by {self.describe(held)}, heartbeat "
                    f"{time.time() - held['heartbeat']:.0f} s ago (claim file {self.path}); wait for it to "
                    "finish or stop it, or pick another --out folder."
                ) from None
            self._take_over(held, reason)
        raise RunLockedError(f"could not claim {self.path.parent}: other processes keep racing for {self.path}.")

    def _create(self, record: dict[str, Any]) -> bool:
        """Make the claim file, complete, if there is none: written aside, then hard-linked into place
        (a link, like ``O_EXCL``, fails when the name exists, and a reader never sees half a record);
        ``O_CREAT | O_EXCL`` where the filesystem has no hard links."""
        aside = self.path.with_name(f"{self.path.name}.{self.token}")
        aside.write_text(json.dumps(record), encoding="utf-8")
        try:
            os.link(aside, self.path)
            return True
        except FileExistsError:
            return False
        except OSError:  # no hard links here
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(record, f)
            return True
        finally:
            aside.unlink(missing_ok=True)

    def _unreadable_reason(self) -> str | None:
        """Why an unreadable claim file counts as stale: only once it is older than ``stale_after_s``."""
        try:
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return None
        return f"the claim file is unreadable and {age:.0f} s old" if age > self.stale_after_s else None

    def _take_over(self, held: dict[str, Any], reason: str) -> None:
        """Remove a stale claim. Takers hold a guard file while they look again and remove it, so that
        of several processes that found the same stale claim, none removes a claim made meanwhile."""
        guard = self.path.with_name(f"{self.path.name}.takeover")
        try:
            os.close(os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        except FileExistsError:
            try:  # a taker that died while holding the guard (a window of microseconds) leaves it
                if time.time() - guard.stat().st_mtime > 60:
                    guard.unlink(missing_ok=True)
            except FileNotFoundError:
                pass
            time.sleep(0.05)
            return
        try:
            now = self.holder()
            if now is None or now != held:
                return  # gone or changed since we judged it: decide again
            self.path.unlink(missing_ok=True)
        finally:
            guard.unlink(missing_ok=True)
        warnings.warn(f"{self.path.parent}: taking over the claim of {self.describe(held)}: {reason}.",
                      RuntimeWarning, stacklevel=3)

    def refresh(self) -> bool:
        """Write a new heartbeat if the claim is still ours; False when it is not (taken over)."""
        held = self.holder()
        if not held or held.get("token") != self.token:
            return False
        atomic_write_text(self.path, json.dumps(self._record(held.get("started"))))
        return True

    def _start_heartbeat(self, started: float) -> None:
        self._stop.clear()

        def beat() -> None:
            while not self._stop.wait(self.heartbeat_s):
                try:
                    if not self.refresh():
                        return
                except OSError:
                    continue  # a hiccup of a network filesystem: try at the next beat

        self._thread = threading.Thread(target=beat, name=f"beseg-claim-{self.path.parent.name}", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Stop the heartbeat and remove the claim file if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        held = self.holder()
        if held and held.get("token") == self.token:
            self.path.unlink(missing_ok=True)
        self.token = None


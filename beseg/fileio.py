"""Files that several processes, on one machine or many, share: atomic output and the one lock primitive.

**Atomic output** (:func:`atomic_output`): write to a temporary file beside the target, then
rename it over. A reader sees the old file or the new one, never half of one, even after SIGKILL
or a full disk; on failure the temporary file is removed, the previous file is left as it was, and
the error names the target.

**Locks** (:class:`FileLock`): the store's case locks and the run folders' claims are both this
one primitive, safe on a filesystem that several hosts share (NFS)::

    LOCK                 the holder's record (JSON), created whole by a hard link (like O_EXCL,
                         atomic on NFS v3+) and never rewritten while held
    LOCK.<token>         the holder's own heartbeat file, replaced every ``heartbeat_s``
    LOCK.takeover        a short-lived guard held while a stale lock is replaced or a lock released

The record says who holds the lock in a form that survives pid reuse: host, pid, the process's
start time (``/proc/<pid>/stat`` field 22), the boot id and pid namespace, the SLURM job, step,
task and restart count, and a random token. Another process takes the lock over (with a warning
naming the holder and the reason) only when the holder is provably gone:

* on the same machine (same host name, boot id and pid namespace): its pid no longer exists, is a
  zombie, or belongs to another process (a different start time: the pid was reused);
* on any machine: its heartbeat has not changed for ``stale_after_s``, judged by the waiter's own
  monotonic clock while it watches, or at first sight by the *filesystem's* clock (the age of the
  heartbeat file against a file the waiter just created there, less a margin ``skew_s``), never by
  comparing the clocks of two hosts;
* under SLURM: an earlier start of the same job (``SLURM_RESTART_COUNT`` is higher now: SLURM
  kills every process of a job before it requeues it), or ``squeue`` no longer lists the holder's
  job. A job id alone proves nothing: every step and task of an allocation shares it.

An unreadable record (not beseg's, or on a filesystem without hard links, being written) is stale
only once it has been seen unchanged for ``stale_after_s``.

**Fencing.** A holder that was stopped longer than the limit (SIGSTOP, a suspended job, a long NFS
stall) may have been taken over. It never writes the lock file after creating it, only its own
heartbeat file, so it cannot overwrite the new holder's record. Its heartbeat thread notices the
loss, and :meth:`FileLock.check`, which every write to the guarded folder calls first (and
:func:`atomic_output` calls just before its rename), raises :class:`LockLostError`: ``claim lost
to HOST/PID; stopping without writing``; its exit code is :data:`EXIT_LOCK_LOST`.

Timings come from :class:`LockTimings` (``BESEG_<KIND>_HEARTBEAT_S``, ``BESEG_<KIND>_STALE_S``,
``BESEG_LOCK_SKEW_S``). Keep the stale limit well above the NFS attribute cache time (``acregmax``,
60 s by default), during which a client may still see an older heartbeat.
"""

from __future__ import annotations

import json
import os
import re
import socket
import tempfile
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from beseg.errors import BesegError, ConfigError
from beseg.slurm_calls import job_listed

__all__ = [
    "EXIT_LOCK_LOST", "FileLock", "LockBusyError", "LockLostError", "LockTimings", "atomic_output",
    "atomic_write_text", "process_identity", "process_start_time", "slurm_job_running",
]

#: Exit code of a process that stopped because another process took its lock (its claim) over.
#: Launchers read it as "someone else has the run", not as a failure (75, busy, is sysexits' EX_TEMPFAIL).
EXIT_LOCK_LOST = 76
#: Default margin (seconds) for first-sight judgements by the filesystem's clock.
SKEW_S = 30.0
_TOKEN = re.compile(r"^[0-9a-f]{32}$")


@contextmanager
def atomic_output(path: str | Path, suffix: str = ".tmp", fence: Callable[[], None] | None = None) -> Iterator[Path]:
    """Yield a fresh temporary path in ``path``'s folder; rename it to ``path`` if the block succeeds.

    Args:
        path: the file to (re)place; its folder is created if needed.
        suffix: ending of the temporary name (writers that infer the format from it, such as
            ``nibabel.save``, need ``.nii.gz``). The temporary name starts with ``.<name>.``, so
            it is hidden and never mistaken for the target.
        fence: called after the block and just before the rename (e.g. :meth:`FileLock.check`); if
            it raises, nothing is renamed.

    Raises:
        OSError: the block or the rename failed (a full disk...); the error names ``path``. Anything
            else the block or ``fence`` raises. The temporary file is removed first.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        if fence is not None:
            fence()
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError) and err.errno is not None and err.filename in (None, tmp):
            # "No space left on device" alone does not say which of many files failed.
            raise OSError(err.errno, err.strerror, str(path)) from err
        raise


def atomic_write_text(path: str | Path, text: str, fence: Callable[[], None] | None = None) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (see :func:`atomic_output`); returns ``path``."""
    with atomic_output(path, fence=fence) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


# ----------------------------------------------------------------------------------------------
# who a process is


def _stat_fields(pid: int) -> list[str] | None:
    """``/proc/<pid>/stat`` from field 3 (state) on, or None where there is no such process (or no /proc)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, ValueError):
        return None
    # "pid (comm) state ppid ...": comm may hold spaces and parentheses, so split after the last ")".
    return text[text.rfind(")") + 2:].split()


def process_start_time(pid: int) -> int | None:
    """When process ``pid`` started, in clock ticks since boot (field 22 of ``/proc/<pid>/stat``); None if unknown.

    A pid is reused once its process is gone; a start time with it names one process for the whole
    life of the machine (with the boot id).
    """
    fields = _stat_fields(pid)
    try:
        return int(fields[19]) if fields else None
    except (IndexError, ValueError):
        return None


def _read_first_line(path: str) -> str | None:
    try:
        return Path(path).read_text().strip() or None
    except OSError:
        return None


def _pid_namespace() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def process_identity() -> dict[str, Any]:
    """This process, as a lock record names it: ``host``, ``pid``, ``start`` (:func:`process_start_time`),
    ``boot`` (the kernel's boot id), ``pidns`` (pid namespace), and SLURM's ``job_id``, ``step_id``,
    ``procid`` and ``restart`` (``SLURM_RESTART_COUNT``, 0 before any requeue)."""
    env = os.environ
    try:
        restart = int(env.get("SLURM_RESTART_COUNT") or 0)
    except ValueError:
        restart = 0
    return {"host": socket.gethostname(), "pid": os.getpid(), "start": process_start_time(os.getpid()),
            "boot": _read_first_line("/proc/sys/kernel/random/boot_id"), "pidns": _pid_namespace(),
            "job_id": env.get("SLURM_JOB_ID") or None, "step_id": env.get("SLURM_STEP_ID") or None,
            "procid": env.get("SLURM_PROCID") or None, "restart": restart}


def _same_machine(record: dict[str, Any], me: dict[str, Any]) -> bool:
    """The record was made on this kernel, in this pid namespace, so its pid can be checked here.

    One host name with another boot id is another machine of that name, or this one rebooted: judged
    by the heartbeat, as any other host."""
    if record.get("host") != me["host"]:
        return False
    return all(not (record.get(k) and me[k]) or record[k] == me[k] for k in ("boot", "pidns"))


def _process_gone(record: dict[str, Any]) -> str | None:
    """Why the record's process (on this machine) is gone, or None if it runs."""
    pid, host = record["pid"], record.get("host")
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return f"process {pid} on {host} no longer exists"
    except PermissionError:
        pass  # exists, owned by someone else
    except (OverflowError, ValueError):
        return f"the record names no valid process ({pid!r})"
    fields = _stat_fields(pid)
    if fields and fields[0] == "Z":
        return f"process {pid} on {host} has ended (it is a zombie)"
    start = record.get("start")
    if isinstance(start, int):
        now = process_start_time(pid)
        if now is not None and now != start:
            return (f"process {pid} on {host} no longer exists (pid {pid} now belongs to another process, "
                    "started later)")
    return None


# ----------------------------------------------------------------------------------------------
# the lock


class LockBusyError(BesegError):
    """A live process holds the lock.

    Attributes:
        holder: the holder's record (``{}`` when the lock file is unreadable).
    """

    def __init__(self, message: str, holder: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.holder = holder or {}


class LockLostError(BesegError):
    """Another process took this process's lock over (it judged the holder gone); stop without writing."""

    exit_code = EXIT_LOCK_LOST


@dataclass(frozen=True)
class LockTimings:
    """How often a holder beats, and how long a silent heartbeat takes to mark the holder gone.

    Attributes:
        heartbeat_s: seconds between a holder's heartbeats.
        stale_after_s: a heartbeat unchanged this long (seconds) marks its holder as gone.
        skew_s: margin (seconds) for first-sight judgements by the filesystem's clock (timestamp
            granularity, attribute caches).

    Raises:
        ValueError: unless ``0 < heartbeat_s < stale_after_s`` and ``skew_s >= 0``.
    """

    heartbeat_s: float
    stale_after_s: float
    skew_s: float = SKEW_S

    def __post_init__(self) -> None:
        if not 0 < self.heartbeat_s < self.stale_after_s or self.skew_s < 0:
            raise ValueError(f"need 0 < heartbeat_s < stale_after_s and skew_s >= 0, got {self.heartbeat_s}, "
                             f"{self.stale_after_s} and {self.skew_s}.")

    @classmethod
    def from_env(cls, kind: str, heartbeat_s: float, stale_after_s: float) -> "LockTimings":
        """The defaults given, replaced by ``BESEG_<KIND>_HEARTBEAT_S``, ``BESEG_<KIND>_STALE_S`` and
        ``BESEG_LOCK_SKEW_S`` where set (tests make them seconds instead of minutes).

        Raises:
            ConfigError: a variable that is not a number, or timings that do not fit together.
        """
        values = {}
        for name, default in ((f"BESEG_{kind}_HEARTBEAT_S", heartbeat_s), (f"BESEG_{kind}_STALE_S", stale_after_s),
                              ("BESEG_LOCK_SKEW_S", SKEW_S)):
            text = os.environ.get(name, "").strip()
            try:
                values[name] = float(text) if text else default
            except ValueError:
                raise ConfigError(f"{name}={text!r}: expected a number of seconds.") from None
        try:
            return cls(*values.values())
        except ValueError as err:
            raise ConfigError(f"{', '.join(f'{k}={v:g}' for k, v in values.items())}: {err}") from None


def _read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object file: None when it does not exist, ``{}`` when it is unreadable, torn or not an object."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError:
        return {}
    try:
        record = json.loads(text)
    except ValueError:
        return {}
    return record if isinstance(record, dict) else {}


def _write_new(path: Path, record: dict[str, Any]) -> None:
    """Create ``path`` (a name nobody else uses) holding ``record``.

    Raises:
        OSError: naming ``path`` (a full disk); nothing is left.
    """
    try:
        with open(path, "x", encoding="utf-8") as f:
            json.dump(record, f)
    except OSError as err:
        path.unlink(missing_ok=True)
        raise OSError(err.errno, err.strerror, str(path)) from err


class FileLock:
    """A lock file shared by processes and hosts (see the module docstring).

    Args:
        path: the lock file.
        timings: heartbeat and stale limit.
        noun: what the lock is called in messages (``lock``, ``claim``).
        label: what it guards, for messages (default: the lock file).
        reentrant: a record of this very process counts as held by the caller (:meth:`acquire`
            returns False and adopts its token); otherwise it is busy, like any live holder (two
            threads of one process never both hold a case lock).
        inherited_token: a token handed down by a parent that holds the lock (a job's worker starting
            the ranks of a DDP run); a record with it counts as this process's.
        on_takeover: receives the takeover message (default: a ``RuntimeWarning``).
    """

    def __init__(self, path: str | Path, timings: LockTimings, noun: str = "lock", label: str | None = None,
                 reentrant: bool = False, inherited_token: str | None = None,
                 on_takeover: Callable[[str], None] | None = None) -> None:
        self.path = Path(path)
        self.timings = timings
        self.noun = noun
        self.label = label or str(self.path)
        self.reentrant = reentrant
        self.inherited_token = inherited_token or None
        self.on_takeover = on_takeover
        self.token: str | None = None
        self.owned = False
        #: Set when this holder finds its lock taken over: the message :meth:`check` raises.
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._beats = 0
        self._beat_error: BaseException | None = None
        self._watch: dict[str, tuple[Any, float, float | None]] = {}
        self._slurm: dict[str, tuple[float, bool | None]] = {}

    # -- files ----------------------------------------------------------------------------------

    def beat_path(self, token: str) -> Path:
        """The heartbeat file of the holder with ``token``."""
        return self.path.with_name(f"{self.path.name}.{token}")

    @property
    def guard_path(self) -> Path:
        return self.path.with_name(f"{self.path.name}.takeover")

    def read(self) -> dict[str, Any] | None:
        """The holder's record with its latest heartbeat (``heartbeat``, ``beat``); None when nobody holds
        the lock, ``{}`` when the lock file is unreadable."""
        record = _read_json(self.path)
        if not record:
            return record
        token = record.get("token")
        if isinstance(token, str) and _TOKEN.match(token):
            beat = _read_json(self.beat_path(token))
            if beat and beat.get("token") == token:
                record = {**record, "heartbeat": beat.get("heartbeat"), "beat": beat.get("beat")}
        return record

    def _new_record(self, token: str) -> dict[str, Any]:
        now = time.time()
        return {**process_identity(), "token": token, "started": now, "heartbeat": now, "beat": 0}

    # -- judging a holder -----------------------------------------------------------------------

    def is_mine(self, record: dict[str, Any] | None) -> bool:
        """The record is this process's own (a reentrant lock), or carries the inherited token."""
        if not record:
            return False
        if self.inherited_token and record.get("token") == self.inherited_token:
            return True
        if not self.reentrant:
            return False
        me = process_identity()
        start = record.get("start")
        return (_same_machine(record, me) and record.get("pid") == me["pid"]
                and (start is None or me["start"] is None or start == me["start"]))

    def gone_reason(self, record: dict[str, Any], now: float | None = None) -> str | None:
        """Why the holder of ``record`` is provably gone, or None when it may be alive.

        Calls on one object remember what they saw: a heartbeat is stale once this object has seen it
        unchanged for ``stale_after_s`` (or the filesystem's clock says it was that old when first seen).

        Args:
            record: a record from :meth:`read` (``{}``: the lock file is unreadable).
            now: unused (kept for callers that pass the time of a status listing).
        """
        return self._judge(record, "lock", self.path)

    def _judge(self, record: dict[str, Any], slot: str, carrier: Path) -> str | None:
        stale = self.timings.stale_after_s
        if not record:
            try:
                st = carrier.stat()
            except OSError:
                return None  # gone meanwhile: look again
            silent = self._silent_for(slot, ("unreadable", st.st_size, st.st_mtime_ns, st.st_ino), carrier)
            return (f"the {self.noun} file {carrier} is unreadable and has not changed for {silent:.0f} s"
                    if silent > stale else None)
        me = process_identity()
        local = _same_machine(record, me) and isinstance(record.get("pid"), int)
        if local:
            reason = _process_gone(record)
            if reason:
                return reason
        job = record.get("job_id")
        restart = record.get("restart")
        if job and job == me["job_id"] and isinstance(restart, int) and restart < me["restart"]:
            return (f"it was made by an earlier start of SLURM job {job} (start {restart + 1}; this is start "
                    f"{me['restart'] + 1}), which SLURM ended before requeueing the job")
        token = record.get("token")
        if slot == "lock" and isinstance(token, str) and _TOKEN.match(token) and self.beat_path(token).exists():
            carrier = self.beat_path(token)
        silent = self._silent_for(slot, (token, record.get("beat"), record.get("heartbeat")), carrier)
        if silent > stale:
            return f"its heartbeat has not changed for {silent:.0f} s (the limit is {stale:.0f} s)"
        if job and not local and self._slurm_ended(str(job)):
            return f"SLURM job {job} has ended"
        return None

    def _silent_for(self, slot: str, key: Any, carrier: Path) -> float:
        """Seconds the heartbeat ``key`` has not changed: watched on this process's monotonic clock, or at
        first sight the filesystem's age of ``carrier`` less the skew margin, whichever is longer."""
        now = time.monotonic()
        seen = self._watch.get(slot)
        if seen is None or seen[0] != key:
            seen = (key, now, self._fs_age(carrier))
            self._watch[slot] = seen
        watched = now - seen[1]
        first = seen[2]
        return max(watched, first - self.timings.skew_s + watched if first is not None else 0.0)

    def _fs_age(self, carrier: Path) -> float | None:
        """How long ago ``carrier`` was last written, by the clock of the filesystem that holds it: its
        modification time against that of a file created beside it now (on NFS both are the server's).
        Where nothing can be created there, this host's clock stands in (the skew margin covers it)."""
        try:
            written = carrier.stat().st_mtime
        except OSError:
            return None
        try:
            fd, probe = tempfile.mkstemp(prefix=f".{self.path.name}.probe.", suffix=".tmp", dir=self.path.parent)
            try:
                now = os.fstat(fd).st_mtime
            finally:
                os.close(fd)
                os.unlink(probe)
        except OSError:
            now = time.time()
        return now - written

    def _slurm_ended(self, job: str) -> bool:
        """squeue no longer lists ``job`` (asked at most once per heartbeat period)."""
        asked = self._slurm.get(job)
        if asked is None or time.monotonic() - asked[0] > self.timings.heartbeat_s:
            asked = (time.monotonic(), job_listed(job))
            self._slurm[job] = asked
        return asked[1] is False

    def describe(self, record: dict[str, Any]) -> str:
        """``process 42 on node3 (SLURM job 17)``."""
        where = f"process {record.get('pid', '?')} on {record.get('host', '?')}"
        return where + (f" (SLURM job {record['job_id']})" if record.get("job_id") else "")

    def busy_error(self, record: dict[str, Any]) -> LockBusyError:
        """The error :meth:`acquire` raises for a live holder (subclasses word it for what they guard)."""
        if not record:
            return LockBusyError(f"{self.path} is unreadable (being written, or not beseg's); it is taken over once "
                                 f"it has not changed for {self.timings.stale_after_s:.0f} s.", record)
        return LockBusyError(f"{self.label} is locked by {self.describe(record)} ({self.noun} file {self.path}).",
                             record)

    # -- holding --------------------------------------------------------------------------------

    def acquire(self) -> bool:
        """Take the lock, taking over a gone holder's with a message.

        Returns:
            True when this call took it (:meth:`release` it); False when this process holds it already
            (a reentrant lock, or an inherited token): the caller adopts that token for :meth:`check`
            and has nothing to release.

        Raises:
            LockBusyError: (:meth:`busy_error`) a live process holds it; call again later, on the same
                object, which remembers how long the holder's heartbeat has been silent.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(100):
            record = self._new_record(uuid.uuid4().hex)
            if self._create(record):
                self._hold(record["token"], owned=True)
                return True
            held = self.read()
            if held is None:
                continue  # released meanwhile: try again
            if self.is_mine(held):
                self._hold(held["token"], owned=False)
                return False
            reason = self.gone_reason(held)
            if reason is None:
                raise self.busy_error(held)
            if self._take_over(held, record):
                self._hold(record["token"], owned=True)
                who = self.describe(held) if held else "an unreadable record"
                message = f"{self.label}: taking over the {self.noun} of {who}: {reason}."
                if self.on_takeover is not None:
                    self.on_takeover(message)
                else:
                    warnings.warn(message, RuntimeWarning, stacklevel=2)
                return True
            time.sleep(0.01)
        raise LockBusyError(f"could not take {self.path}: other processes keep racing for it.")

    def _create(self, record: dict[str, Any]) -> bool:
        """Make the lock file, complete, if there is none: the record is written to the holder's heartbeat
        file and hard-linked to the lock's name (a link fails when the name exists, and a reader never sees
        half a record); ``O_CREAT | O_EXCL`` where the filesystem has no hard links."""
        beat = self.beat_path(record["token"])
        _write_new(beat, record)
        try:
            os.link(beat, self.path)
            return True
        except FileExistsError:
            try:  # NFS: a link whose reply was lost is retried and fails, but it was made
                if os.stat(beat).st_nlink == 2 and (_read_json(self.path) or {}).get("token") == record["token"]:
                    return True
            except OSError:
                pass
        except OSError:  # no hard links here
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                pass
            else:
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    json.dump(record, f)
                return True
        beat.unlink(missing_ok=True)
        return False

    def _take_over(self, judged: dict[str, Any], record: dict[str, Any]) -> bool:
        """Replace the stale record ``judged`` with ``record``, under the guard, only if it is still the
        record (and heartbeat) that was judged: of several processes that found it stale, one replaces it,
        and the others then find a live holder."""
        with self._guard() as have:
            if not have or self.read() != judged:
                return False
            _write_new(self.beat_path(record["token"]), record)
            with atomic_output(self.path) as tmp:
                tmp.write_text(json.dumps(record), encoding="utf-8")
            old = judged.get("token")
            if isinstance(old, str) and _TOKEN.match(old):
                self.beat_path(old).unlink(missing_ok=True)
        return True

    @contextmanager
    def _guard(self, wait_s: float = 0.0) -> Iterator[bool]:
        """Hold ``LOCK.takeover`` for the block (yields False if it could not be had within ``wait_s``).
        A guard left by a gone process (the same rules as the lock) is removed."""
        guard = self.guard_path
        deadline = time.monotonic() + wait_s
        token = uuid.uuid4().hex
        have = False
        while True:
            try:
                fd = os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                held = _read_json(guard)
                if held is not None and self._judge(held, "guard", guard) is not None:
                    if _read_json(guard) == held:
                        guard.unlink(missing_ok=True)
                    continue
                if time.monotonic() >= deadline:
                    break
                time.sleep(0.02)
                continue
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    json.dump(self._new_record(token), f)
            except OSError:
                pass  # a full disk: the guard is held all the same (empty, it is judged as unreadable)
            have = True
            break
        try:
            yield have
        finally:
            if have and (_read_json(guard) or {}).get("token") in (token, None):
                guard.unlink(missing_ok=True)

    def _hold(self, token: str, owned: bool) -> None:
        self.token, self.owned, self.lost, self._beats = token, owned, None, 0
        if owned:
            self._stop.clear()
            self._thread = threading.Thread(target=self._beat_loop, name=f"beseg-{self.noun}-{self.path.name}",
                                            daemon=True)
            self._thread.start()

    def _beat_loop(self) -> None:
        while not self._stop.wait(self.timings.heartbeat_s):
            try:
                if not self.refresh():
                    return  # taken over: self.lost says by whom; the next check() raises it
            except Exception as err:  # noqa: BLE001 - a network filesystem's hiccup: beat again next time
                self._beat_error = err

    def refresh(self) -> bool:
        """Write a new heartbeat if the lock is still this holder's; False (and :attr:`lost` set) when it
        was taken over. Only the holder's own heartbeat file is written, never the lock file, so a
        takeover in between cannot be overwritten."""
        if self.token is None or self.lost is not None:
            return False
        held = _read_json(self.path)
        if not held or held.get("token") != self.token:
            self._mark_lost(held)
            return False
        self._beats += 1
        beat = self.beat_path(self.token)
        atomic_write_text(beat, json.dumps({**held, "heartbeat": time.time(), "beat": self._beats}))
        held = _read_json(self.path)
        if not held or held.get("token") != self.token:  # taken over while we wrote: leave no file behind
            beat.unlink(missing_ok=True)
            self._mark_lost(held)
            return False
        return True

    def _mark_lost(self, held: dict[str, Any] | None) -> None:
        if self.lost is None:
            if held:
                to = f"to {held.get('host', '?')}/{held.get('pid', '?')}"
            else:
                to = f"(its file {self.path} was taken over and has been released since)"
            self.lost = f"{self.label}: {self.noun} lost {to}; stopping without writing"
        if self.owned and self.token:
            self.beat_path(self.token).unlink(missing_ok=True)

    def check(self) -> None:
        """The fence: call before every write to what the lock guards.

        Raises:
            LockLostError: the lock is no longer this holder's (``<label>: claim lost to HOST/PID; stopping
                without writing``). Nothing happens when no lock is held by this object.
        """
        if self.token is None:
            return
        held = _read_json(self.path)
        if self.lost is None and held and held.get("token") == self.token:
            return
        self._mark_lost(held)
        raise LockLostError(self.lost)

    def release(self) -> None:
        """Stop the heartbeat and remove the lock file if it is still this holder's (under the guard, so a
        takeover in between is never removed). Never raises: it runs while another error may be on its way
        (a full disk); a lock it could not remove is judged by the usual rules (this process is gone)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        if self.owned and self.token:
            try:
                with self._guard(wait_s=5.0) as have:
                    held = _read_json(self.path)
                    if have and held and held.get("token") == self.token:
                        self.path.unlink(missing_ok=True)
                self.beat_path(self.token).unlink(missing_ok=True)
            except OSError:
                pass
        self.token, self.owned = None, False

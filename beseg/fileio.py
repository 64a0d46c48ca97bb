"""Atomic file output: write to a temporary file beside the target, then rename it over.

A reader sees the old file or the new one, never half of one, even after SIGKILL or a full disk;
on failure the temporary file is removed and the previous file is left as it was.
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_output", "atomic_write_text", "lock_holder", "release_lock", "touch_lock", "try_lock"]


@contextmanager
def atomic_output(path: str | Path, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a fresh temporary path in ``path``'s folder; rename it to ``path`` if the block succeeds.

    Args:
        path: the file to (re)place; its folder is created if needed.
        suffix: ending of the temporary name (writers that infer the format from it, such as
            ``nibabel.save``, need ``.nii.gz``). The temporary name starts with ``.<name>.``, so
            it is hidden and never mistaken for the target.

    Raises:
        Whatever the block or the rename raises, after the temporary file is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns ``path``."""
    with atomic_output(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


# ----------------------------------------------------------------------------------------------
# lock files (safe across processes and machines: O_CREAT | O_EXCL works on NFS v3+)


def try_lock(path: str | Path) -> bool:
    """Create the lock file ``path`` holding ``"<pid> <host>"``; ``False`` if it exists already.

    ``O_CREAT | O_EXCL`` makes creation atomic, also on NFS (v3 and later), so of two processes
    racing for the same lock exactly one gets it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(f"{os.getpid()} {socket.gethostname()}\n")
    return True


def lock_holder(path: str | Path, stale_after_s: float | None = None) -> tuple[int, str] | None:
    """``(pid, host)`` of the live process holding the lock file ``path``, ``None`` if nobody does.

    A lock of this machine is stale when its process is gone. A lock of another machine cannot be
    checked that way: it is taken as live, unless ``stale_after_s`` is given and the file was not
    touched for that long (holders that may run long refresh it, see :func:`touch_lock`). An
    unreadable or half-written lock file counts as stale too, unless it is younger than a second
    (its writer may be between creating and writing it).
    """
    path = Path(path)
    try:
        text = path.read_text()
        age = time.time() - path.stat().st_mtime
    except OSError:
        return None
    pid_text, _, host = text.strip().partition(" ")
    try:
        pid = int(pid_text)
    except ValueError:
        return (-1, "?") if age < 1.0 else None
    if host and host != socket.gethostname():
        if stale_after_s is not None and age > stale_after_s:
            return None
        return pid, host  # another machine's process: assume it is alive
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return pid, host or socket.gethostname()


def touch_lock(path: str | Path) -> None:
    """Refresh a held lock's modification time (a heartbeat for :func:`lock_holder`'s ``stale_after_s``)."""
    try:
        os.utime(path)
    except OSError:
        pass


def release_lock(path: str | Path) -> None:
    """Remove the lock file ``path`` if this process holds it."""
    path = Path(path)
    try:
        holder = path.read_text().split()[0]
    except (OSError, IndexError):
        return
    if holder == str(os.getpid()):
        path.unlink(missing_ok=True)

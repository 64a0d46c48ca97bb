"""What every launcher reports: the outcome of a launch and its progress line.

Its own module, below both launchers (:mod:`beseg.experiment.launch` and :mod:`beseg.experiment.slurm`), so
that neither imports the other for these: the local launcher module chooses the SLURM launcher, and the
SLURM launcher reports as the local one does.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["LaunchOutcome", "Progress", "duration_text"]


@dataclass
class LaunchOutcome:
    """What a launcher did with the runs it was given.

    Attributes:
        done: ids of the runs it finished.
        failed: ``{run id: (error, log file or None)}``.
        busy: ids of runs another live process holds.
        jobs: ``{run id: SLURM job id}`` (SLURM launcher).
    """

    done: list[str] = field(default_factory=list)
    failed: dict[str, tuple[str, Path | None]] = field(default_factory=dict)
    busy: list[str] = field(default_factory=list)
    jobs: dict[str, str] = field(default_factory=dict)


class Progress:
    """One progress line: runs done out of the total, running, failed, and an ETA from the finished runs' pace.

    Args:
        total: runs to execute.
        log: receives the line whenever it changes.
        parallel: runs executed at a time (for the ETA).
    """

    def __init__(self, total: int, log: Callable[[str], None], parallel: int = 1) -> None:
        self.total, self.log, self.parallel = total, log, max(1, parallel)
        self.start = time.monotonic()
        self.last = ""

    def line(self, done: int, running: int, failed: int) -> str:
        elapsed = time.monotonic() - self.start
        left = self.total - done - failed
        if done and left:
            eta = f", ETA {duration_text(elapsed / (done + failed) * left)}"
        else:
            eta = ""
        return (f"progress: {done}/{self.total} runs done" + (f", {running} running" if running else "")
                + (f", {failed} failed" if failed else "") + f", {duration_text(elapsed)} elapsed{eta}")

    def update(self, done: int, running: int, failed: int) -> None:
        text = self.line(done, running, failed)
        key = text.split(", ETA")[0].rsplit(",", 1)[0]  # a new line when the counts change, not every second
        if key != self.last:
            self.last = key
            self.log(text)


def duration_text(seconds: float | None) -> str:
    """``42 s``, ``3 min 05 s``, ``2 h 05 min``, ``3 d 04 h``; ``unlimited`` for None."""
    if seconds is None:
        return "unlimited"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    if seconds < 2 * 86400:
        return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
    return f"{seconds // 86400} d {seconds % 86400 // 3600:02d} h"

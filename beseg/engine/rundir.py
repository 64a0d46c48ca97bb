"""The run folder: its layout, its lock, and its metric log.

::

    RUN_DIR/
      config.yaml            the resolved config (data.split_file: the split file it used)
      split.json             the cases it trained on, validated on (chose best.pt) and is tested on
      metrics.jsonl          one JSON object per line: {"kind": "train"|"val", "epoch", "step", ...}
      checkpoints/last.pt    written every ``train.checkpoint_every`` epochs (atomically)
      checkpoints/best.pt    best mean validation Dice so far
      tensorboard/           the same metrics for TensorBoard
      eval/                  written by ``beseg evaluate``
      .lock                  held by the training process that owns the folder
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import yaml

from beseg.errors import BesegError
from beseg.fileio import atomic_write_text, lock_holder, release_lock, try_lock

__all__ = ["RunDir", "RunLockedError", "read_metrics"]


class RunLockedError(BesegError):
    """Another live process is training into the same run folder."""


class RunDir:
    """Paths of one run folder, created on demand."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def split(self) -> Path:
        return self.root / "split.json"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def last(self) -> Path:
        return self.checkpoints / "last.pt"

    @property
    def best(self) -> Path:
        return self.checkpoints / "best.pt"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    @property
    def eval(self) -> Path:
        return self.root / "eval"

    @property
    def lock(self) -> Path:
        return self.root / ".lock"

    def write_config(self, config: dict) -> None:
        atomic_write_text(self.config, yaml.safe_dump(config, sort_keys=False))

    # -- lock ---------------------------------------------------------------------------------

    def acquire(self) -> None:
        """Take the folder's lock, or raise if a live process holds it (a dead holder's is taken over).

        Raises:
            RunLockedError: another running process holds the lock.
        """
        for _ in range(2):
            if try_lock(self.lock):
                return
            holder = lock_holder(self.lock)
            if holder is not None:
                pid, host = holder
                raise RunLockedError(
                    f"run folder {self.root} is in use by process {pid} on {host} (lock file {self.lock}); "
                    "wait for it to finish or stop it, or pick another --out folder."
                ) from None
            self.lock.unlink(missing_ok=True)  # stale: its process is gone
        raise RunLockedError(f"could not take the lock {self.lock}; another process is racing for it.")

    def release(self) -> None:
        release_lock(self.lock)

    # -- metrics ------------------------------------------------------------------------------

    def log(self, record: dict[str, Any]) -> None:
        """Append one JSON line (NaN/Inf written as null, so every line stays valid JSON)."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.metrics, "a") as f:
            f.write(json.dumps(_finite(record)) + "\n")

    def truncate_metrics(self, after_epoch: int) -> None:
        """Drop records of epochs after ``after_epoch`` (logged before a crash, redone on resume)."""
        records = [r for r in read_metrics(self.metrics) if r.get("epoch", 0) <= after_epoch]
        atomic_write_text(self.metrics, "".join(json.dumps(r) + "\n" for r in records))


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Records of a ``metrics.jsonl``; a torn last line (from a crash) is ignored."""
    path = Path(path)
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out

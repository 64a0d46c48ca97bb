"""The run folder: its layout, its claim, and its metric log.

::

    RUN_DIR/
      config.yaml            the resolved config (data.split_file: the split file it used)
      split.json             the cases it trained on, validated on (chose best.pt) and is tested on
      metrics.jsonl          one JSON object per line: {"kind": "train"|"val", "epoch", "step", ...}
      checkpoints/last.pt    written every ``train.checkpoint_every`` epochs (atomically)
      checkpoints/best.pt    best mean validation Dice so far
      tensorboard/           the same metrics for TensorBoard
      eval/                  written by ``beseg evaluate``
      .claim                 the claim of the process working on the folder (host, pid, SLURM job, token)
      .claim.<token>         its holder's heartbeat

Every write to the folder by a holder of the claim is fenced: :meth:`RunDir.check` first makes sure
the claim is still this process's (a process stopped past the stale limit may have been taken over),
and raises :class:`~beseg.fileio.LockLostError` otherwise.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import yaml

from beseg.engine.claim import Claim, RunLockedError
from beseg.fileio import atomic_write_text

__all__ = ["RunDir", "RunLockedError", "read_metrics"]


class RunDir:
    """Paths of one run folder, created on demand."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self._claim: Claim | None = None

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
        """The claim file (see :mod:`beseg.engine.claim`)."""
        return self.root / ".claim"

    def write_config(self, config: dict) -> None:
        atomic_write_text(self.config, yaml.safe_dump(config, sort_keys=False), fence=self.check)

    # -- claim ---------------------------------------------------------------------------------

    def acquire(self) -> None:
        """Claim the folder (:class:`beseg.engine.claim.Claim`): a gone holder's claim is taken over with a
        warning; when this process holds it already (e.g. ``beseg compare``'s worker), its claim is adopted
        for :meth:`check`.

        Raises:
            RunLockedError: a live process (on any host) holds it.
        """
        claim = Claim(self.lock)
        claim.acquire()
        self._claim = claim
        if claim.owned:
            self.remove_leftovers()

    def remove_leftovers(self) -> list[Path]:
        """Remove the temporary files a killed (or taken over) holder left: ``.<name>.<random>.tmp`` of
        checkpoints, metrics, config and evaluation files. Call it holding the claim.

        Returns:
            The files removed.
        """
        removed = []
        for folder in (self.root, self.checkpoints, self.eval, self.eval / "predictions"):
            try:
                names = os.listdir(folder)
            except (FileNotFoundError, NotADirectoryError):
                continue
            for name in names:
                if name.startswith(".") and (name.endswith(".tmp") or ".tmp." in name) \
                        and not name.startswith(f".{self.lock.name}."):  # the claim's own (heartbeat) files
                    (folder / name).unlink(missing_ok=True)
                    removed.append(folder / name)
        return removed

    def release(self) -> None:
        """Release the claim if :meth:`acquire` took it (an adopted claim stays with its holder)."""
        if self._claim is not None:
            self._claim.release()
            self._claim = None

    def check(self) -> None:
        """The fence before a write: nothing when this object holds no claim, else the claim must still be ours.

        Raises:
            LockLostError: another process took the claim over; stop without writing.
        """
        if self._claim is not None:
            self._claim.check()

    # -- metrics ------------------------------------------------------------------------------

    def log(self, record: dict[str, Any]) -> None:
        """Append one JSON line (NaN/Inf written as null, so every line stays valid JSON), fenced by :meth:`check`."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.check()
        with open(self.metrics, "a") as f:
            f.write(json.dumps(_finite(record)) + "\n")

    def truncate_metrics(self, after_epoch: int) -> None:
        """Drop records of epochs after ``after_epoch`` (logged before a crash, redone on resume)."""
        records = [r for r in read_metrics(self.metrics) if r.get("epoch", 0) <= after_epoch]
        atomic_write_text(self.metrics, "".join(json.dumps(r) + "\n" for r in records), fence=self.check)


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

"""Checkpoints: written atomically, read with ``weights_only=True``.

A checkpoint holds the model, optimiser, scheduler and gradient-scaler states, the epoch and step
counters, the best validation score, every RNG state and the resolved config (plain dicts), so
that ``beseg train --resume`` continues exactly where it stopped and ``beseg evaluate``/``predict``
need nothing but the file.

Writes go to a temporary file in the same folder, are flushed to disk, then renamed over the
target: a reader sees the old file or the new one, never a partial one, even after SIGKILL or a
full disk. Reads use ``torch.load(weights_only=True)``, which refuses pickled code.

Each checkpoint records its ``format`` (:data:`FORMAT_VERSION`); a file of a newer format is
refused with a message naming both formats rather than misread. Resuming on another machine
restores what fits there: a checkpoint written with CUDA restores the CPU generators everywhere,
the CUDA generators of the devices that exist, and :func:`restore_rng_state` says what it could not
restore.
"""

from __future__ import annotations

import os
import pickle
import random
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from beseg.errors import BesegError
from beseg.fileio import atomic_output

__all__ = ["CheckpointError", "FORMAT_VERSION", "atomic_save", "load_checkpoint", "capture_rng_state",
           "restore_rng_state"]

#: The checkpoint layout this version writes and the newest it reads (older files carry 1 or nothing).
FORMAT_VERSION = 1


class CheckpointError(BesegError):
    """A checkpoint is missing, unreadable, unsafe, or does not fit the model."""


def atomic_save(obj: dict[str, Any], path: str | Path, fence: Callable[[], None] | None = None) -> Path:
    """``torch.save`` to ``path`` atomically (temporary file, fsync, rename).

    Args:
        obj: the checkpoint.
        path: where it goes.
        fence: called just before the rename (the run folder's claim check); if it raises, the
            previous file stays and the temporary one is removed.

    Raises:
        CheckpointError: the file cannot be written (e.g. the disk is full); the previous file at
            ``path``, if any, is left intact and no temporary file remains.
        LockLostError: from ``fence``.
    """
    path = Path(path)
    try:
        with atomic_output(path, fence=fence) as tmp:
            with open(tmp, "wb") as f:
                torch.save(obj, f)
                f.flush()
                os.fsync(f.fileno())
    except OSError as err:
        raise CheckpointError(f"could not write checkpoint {path}: {err.strerror or err}; the previous file is intact.") from None
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`atomic_save`, refusing anything but tensors and plain data.

    Raises:
        CheckpointError: the file is missing, truncated, not a checkpoint, or carries code.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist.")
    try:
        with warnings.catch_warnings():  # torch warns about a foreign pickle protocol before refusing it
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        lines = [line for line in str(err).splitlines() if line.strip()]
        reason = next((line for line in lines if "nsupported" in line), lines[0] if lines else "")
        raise CheckpointError(
            f"refusing to load {path}: it holds more than weights and plain data (weights-only loading "
            f"rejected it: {reason.strip()[:200]}). Only load checkpoints you trust, and never with "
            "weights_only=False."
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise CheckpointError(f"checkpoint {path} is unreadable or truncated: {str(err).splitlines()[0][:200]}") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise CheckpointError(f"{path} is not a beseg checkpoint (no model weights and config in it).")
    fmt = ckpt.get("format", 1)
    if isinstance(fmt, bool) or not isinstance(fmt, int) or fmt < 1:
        raise CheckpointError(f"{path} has an invalid checkpoint format {fmt!r}; expected an integer from 1 to {FORMAT_VERSION}.")
    if fmt > FORMAT_VERSION:
        from beseg import __version__

        raise CheckpointError(
            f"{path} has checkpoint format {fmt}, newer than the format {FORMAT_VERSION} that beseg {__version__} "
            "reads; it was written by a newer beseg, so update beseg to use it."
        )
    return ckpt


def capture_rng_state() -> dict[str, Any]:
    """Python, NumPy and torch (CPU and CUDA) RNG states as tensors and plain data."""
    np_state = np.random.get_state()
    state = {
        "python": _python_state_to_plain(random.getstate()),
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> list[str]:
    """Inverse of :func:`capture_rng_state`, restoring what fits this machine.

    Python, NumPy and the torch CPU generator are always restored. CUDA generators are restored
    for the devices that exist in both the checkpoint and this machine: a checkpoint of 8 GPUs
    resumed on 2 restores devices 0 and 1; resumed on a machine without CUDA it restores none. The
    others keep the state ``torch.manual_seed`` gave them.

    Args:
        state: the ``"rng"`` entry of a checkpoint.

    Returns:
        One sentence per thing not restored (empty when everything was); the caller shows them.
    """
    random.setstate(_plain_to_python_state(state["python"]))
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["key"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    saved = list(state.get("cuda") or [])
    here = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for index in range(min(len(saved), here)):
        torch.cuda.set_rng_state(saved[index], device=index)
    notes = []
    if len(saved) > here:
        where = f"this machine has {here}" if here else "this machine has no CUDA"
        notes.append(f"the CUDA random generators of devices {here} to {len(saved) - 1} were not restored "
                     f"(the checkpoint has {len(saved)}, {where}); CPU generators were restored.")
    elif here > len(saved):
        notes.append(f"CUDA devices {len(saved)} to {here - 1} have no saved random state (the checkpoint has "
                     f"{len(saved)}); they keep the state that train.seed gave them.")
    return notes


def _python_state_to_plain(state: tuple) -> dict[str, Any]:
    version, internal, gauss = state
    return {"version": version, "internal": torch.tensor(internal, dtype=torch.int64), "gauss": gauss}


def _plain_to_python_state(plain: dict[str, Any]) -> tuple:
    return plain["version"], tuple(int(v) for v in plain["internal"].tolist()), plain["gauss"]

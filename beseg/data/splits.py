"""Reproducible train/validation splits, stored as JSON so every loss is compared on the same cases.

The split file looks like::

    {"seed": 0, "val_frac": 0.2, "train": ["spleen_2", ...], "val": ["spleen_9", ...]}
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from beseg.errors import DataError

__all__ = ["Split", "make_split", "save_split", "load_split", "load_or_make_split"]


@dataclass(frozen=True)
class Split:
    """A train/validation partition of case ids.

    Attributes:
        train: training case ids, sorted.
        val: validation case ids, sorted.
        seed: the seed that produced it.
        val_frac: the requested validation fraction (informative when ``n_val`` was given).
    """

    train: list[str]
    val: list[str]
    seed: int
    val_frac: float


def make_split(case_ids: Sequence[str], val_frac: float = 0.2, seed: int = 0,
               n_val: int | None = None) -> Split:
    """Shuffle ``case_ids`` with ``seed`` and hold out a validation set.

    The paper's sizes are not one rounding rule of 0.2 (Task01: 96 of 484 is floor, Task09: 9 of 41
    is ceil), so presets pass ``n_val`` explicitly; otherwise ``floor(val_frac * n)``, at least 1.

    Args:
        case_ids: all labelled case ids; order does not matter (they are sorted first).
        val_frac: validation fraction in [0, 1).
        seed: numpy Generator seed.
        n_val: exact number of validation cases; overrides ``val_frac``.

    Returns:
        The :class:`Split`.

    Raises:
        ValueError: bad fraction/count, duplicate ids, or fewer than 2 cases.
    """
    ids = sorted(case_ids)
    if len(set(ids)) != len(ids):
        raise ValueError("make_split: case ids must be unique")
    if len(ids) < 2:
        raise ValueError(f"make_split: need at least 2 cases to split, got {len(ids)}")
    if not 0.0 <= val_frac < 1.0:
        raise ValueError(f"make_split: val_frac must be in [0, 1), got {val_frac}")
    if n_val is None:
        n_val = max(1, math.floor(val_frac * len(ids))) if val_frac > 0 else 0
    if not 0 <= n_val < len(ids):
        raise ValueError(f"make_split: n_val must be in [0, {len(ids) - 1}], got {n_val}")
    order = np.random.default_rng(seed).permutation(len(ids))
    val = sorted(ids[i] for i in order[:n_val])
    train = sorted(ids[i] for i in order[n_val:])
    return Split(train, val, seed, val_frac)


def save_split(split: Split, path: str | Path) -> Path:
    """Write ``split`` as JSON to ``path`` (parent folders are created). Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(asdict(split), indent=2) + "\n", encoding="utf-8")
    return path


def load_split(path: str | Path, known_ids: Sequence[str] | None = None) -> Split:
    """Read a split file written by :func:`save_split`.

    Args:
        path: the JSON file.
        known_ids: if given, every id in the split must be one of these (the task's cases).

    Returns:
        The :class:`Split`.

    Raises:
        DataError: unreadable or malformed file, overlapping train/val, or unknown case ids.
    """
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: split file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{path}: cannot read split file ({err})") from None
    if not isinstance(raw, dict):
        raise DataError(f"{path}: split file must be a JSON object with 'train' and 'val'")
    lists = {}
    for key in ("train", "val"):
        value = raw.get(key)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise DataError(f"{path}: {key!r} must be a list of case id strings")
        lists[key] = value
    overlap = sorted(set(lists["train"]) & set(lists["val"]))
    if overlap:
        raise DataError(f"{path}: cases in both train and val: {', '.join(overlap)}")
    if known_ids is not None:
        unknown = sorted(set(lists["train"] + lists["val"]) - set(known_ids))
        if unknown:
            raise DataError(f"{path}: case ids not in the task's dataset.json: {', '.join(unknown)}")
    seed, frac = raw.get("seed", 0), raw.get("val_frac", 0.2)
    if not isinstance(seed, int) or not isinstance(frac, (int, float)):
        raise DataError(f"{path}: 'seed' must be an integer and 'val_frac' a number")
    return Split(lists["train"], lists["val"], seed, float(frac))


def load_or_make_split(path: str | Path, case_ids: Sequence[str], val_frac: float = 0.2, seed: int = 0,
                       n_val: int | None = None) -> Split:
    """Read the split at ``path`` if it exists, else make one with :func:`make_split` and save it there.

    An existing file always wins, so a later run with different arguments still uses the same
    cases; delete the file to re-split.

    Raises:
        DataError: the existing file is invalid or names cases not in ``case_ids``.
    """
    path = Path(path)
    if path.exists():
        return load_split(path, known_ids=case_ids)
    split = make_split(case_ids, val_frac=val_frac, seed=seed, n_val=n_val)
    save_split(split, path)
    return split

"""Reproducible train/validation/test splits, stored as JSON so every loss is compared on the same cases.

Three roles, never mixed:

* ``train``: the cases the network is fitted on (and the intensity statistics come from);
* ``val``: the cases that choose the checkpoint (``best.pt`` is the epoch of best validation Dice);
* ``test``: held-out cases that no training or selection decision saw; reports are computed on them.

A split file looks like::

    {"train": ["spleen_2", ...], "val": ["spleen_9", ...], "test": ["spleen_13", ...],
     "seed": 0, "val_frac": 0.1, "test_frac": 0.2, "fold": null, "folds": null}

Protocols, as :attr:`Split.protocol` names them:

* ``heldout`` -- a three-way split (:func:`make_split`, default 20 % test and 10 % validation).
* ``cv`` -- fold ``f`` of ``K`` (:func:`make_folds`): the ``f``-th of K disjoint parts is the test
  set and the rest is split into train/val, so over the K folds every case is tested exactly once.
* ``paper`` -- a two-way train/val split with no test cases (``make_split(..., test_frac=0)``): the
  paper's protocol, where the cases that chose ``best.pt`` are the ones reported (optimistic).

A split file written before test sets existed has no ``"test"`` key; it is read as a two-way split
(``paper``), never as a held-out one: :func:`load_or_make_split` refuses to train a held-out
protocol on it and ``beseg evaluate --split test`` refuses to score it.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from beseg.errors import DataError
from beseg.fileio import atomic_write_text
# The protocols live in their own dependency-free module, so that the CLI's parsers can list them
# without importing the data layer; they are re-exported here, where splits are made.
from beseg.protocols import PROTOCOLS, Protocol, ProtocolSpec, get_protocol

__all__ = [
    "DEFAULT_TEST_FRAC", "DEFAULT_VAL_FRAC", "PROTOCOLS", "Protocol", "ProtocolSpec", "Split", "get_protocol", "fraction_count", "make_split", "make_folds",
    "save_split", "load_split", "load_or_make_split",
]

#: Default share of all cases held out for testing.
DEFAULT_TEST_FRAC = 0.2
#: Default share of all cases used to choose the checkpoint.
DEFAULT_VAL_FRAC = 0.1

# float rounding: 0.29 * 100 is 28.999999999999996, which is 29 cases, not 28
_EPS = 1e-9


@dataclass(frozen=True)
class Split:
    """A train/validation/test partition of case ids.

    Attributes:
        train: training case ids, sorted.
        val: validation case ids (checkpoint selection), sorted.
        test: held-out test case ids, sorted; empty for a two-way split (the paper's protocol).
        seed: the seed that produced it.
        val_frac: the requested validation fraction of all cases (informative when a count was given).
        test_frac: the requested test fraction of all cases (``1 / folds`` for a fold).
        fold: this split's fold (0-based) in k-fold cross-validation, else ``None``.
        folds: the number of folds K, else ``None``.
    """

    train: list[str]
    val: list[str]
    test: list[str] = field(default_factory=list)
    seed: int = 0
    val_frac: float = DEFAULT_VAL_FRAC
    test_frac: float = DEFAULT_TEST_FRAC
    fold: int | None = None
    folds: int | None = None

    @property
    def protocol(self) -> Protocol:
        """``cv`` for a fold, ``heldout`` with test cases, ``paper`` for a two-way split."""
        if self.folds is not None:
            return "cv"
        return "heldout" if self.test else "paper"

    def cases(self, part: str) -> list[str]:
        """The ids of ``part``: ``train``, ``val``, ``test`` or ``all`` (every case of the split, sorted).

        Raises:
            ValueError: unknown part.
        """
        if part == "all":
            return sorted([*self.train, *self.val, *self.test])
        if part not in ("train", "val", "test"):
            raise ValueError(f"split part must be train, val, test or all, got {part!r}")
        return list(getattr(self, part))


def fraction_count(frac: float, n: int, name: str = "fraction") -> int:
    """``floor(frac * n)`` cases, at least 1 when ``frac > 0``; 0 when ``frac == 0``.

    Raises:
        ValueError: ``frac`` outside [0, 1).
    """
    if not 0.0 <= frac < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {frac}")
    return max(1, math.floor(frac * n + _EPS)) if frac > 0 else 0


def _check_ids(case_ids: Sequence[str], minimum: int, what: str) -> list[str]:
    ids = sorted(case_ids)
    if len(set(ids)) != len(ids):
        raise ValueError(f"{what}: case ids must be unique")
    if len(ids) < minimum:
        raise ValueError(f"{what}: need at least {minimum} cases, got {len(ids)}")
    return ids


def make_split(case_ids: Sequence[str], val_frac: float = DEFAULT_VAL_FRAC, seed: int = 0,
               n_val: int | None = None, test_frac: float = DEFAULT_TEST_FRAC,
               n_test: int | None = None) -> Split:
    """Shuffle ``case_ids`` with ``seed`` and hold out test and validation cases.

    The permutation's first ``n_test`` cases are the test set, the next ``n_val`` the validation
    set, the rest the training set; with ``test_frac=0`` the validation cases are the ones a
    two-way split of the same seed picks. Counts are ``floor(frac * n)``, at least 1 for a
    non-zero fraction. The paper's sizes are not one rounding rule of 0.2 (Task01: 96 of 484 is
    floor, Task09: 9 of 41 is ceil), so presets pass ``n_val`` explicitly for the paper protocol.

    Args:
        case_ids: all labelled case ids; order does not matter (they are sorted first).
        val_frac: validation fraction of all cases, in [0, 1).
        seed: numpy Generator seed.
        n_val: exact number of validation cases; overrides ``val_frac``.
        test_frac: test fraction of all cases, in [0, 1); 0 makes a two-way (paper) split.
        n_test: exact number of test cases; overrides ``test_frac``.

    Returns:
        The :class:`Split`.

    Raises:
        ValueError: a bad fraction or count, duplicate ids, fewer than 2 cases, or no training
            case left.
    """
    for name, frac in (("val_frac", val_frac), ("test_frac", test_frac)):
        if not 0.0 <= frac < 1.0:
            raise ValueError(f"make_split: {name} must be in [0, 1), got {frac}")
    ids = _check_ids(case_ids, 2, "make_split")
    n = len(ids)
    n_val = fraction_count(val_frac, n, "make_split: val_frac") if n_val is None else n_val
    n_test = fraction_count(test_frac, n, "make_split: test_frac") if n_test is None else n_test
    if n_val < 0 or n_test < 0 or n_val + n_test > n - 1:
        raise ValueError(f"make_split: {n_test} test + {n_val} validation cases leave no training case of {n}; "
                         "lower test_frac/val_frac (or n_test/n_val)")
    order = np.random.default_rng(seed).permutation(n)
    test = sorted(ids[i] for i in order[:n_test])
    val = sorted(ids[i] for i in order[n_test:n_test + n_val])
    train = sorted(ids[i] for i in order[n_test + n_val:])
    return Split(train, val, test, seed, float(val_frac), float(test_frac))


def make_folds(case_ids: Sequence[str], folds: int, seed: int = 0, val_frac: float = DEFAULT_VAL_FRAC,
               n_val: int | None = None) -> list[Split]:
    """K-fold cross-validation splits: fold ``f``'s test set is the ``f``-th of K disjoint parts.

    The cases are shuffled with ``seed`` and cut into K parts whose sizes differ by at most one
    (nnU-Net's 5-fold scheme). Each fold's remaining cases are shuffled again (seed ``[seed, f]``)
    and split into validation (``n_val``, default ``floor(val_frac * n)`` of *all* cases, at least
    1) and training cases, so every case is tested exactly once and never chooses its own
    checkpoint.

    Args:
        case_ids: all labelled case ids.
        folds: K, at least 2.
        seed: numpy Generator seed.
        val_frac: validation fraction of all cases, in (0, 1).
        n_val: exact number of validation cases per fold; overrides ``val_frac``.

    Returns:
        K :class:`Split` objects (``fold`` 0..K-1, ``folds`` K).

    Raises:
        ValueError: ``folds`` < 2, too few cases for K folds with a validation and a training
            case each, or a bad fraction.
    """
    if isinstance(folds, bool) or not isinstance(folds, int) or folds < 2:
        raise ValueError(f"make_folds: folds must be an integer >= 2, got {folds!r}")
    ids = _check_ids(case_ids, folds, f"make_folds: {folds} folds")
    n = len(ids)
    n_val = fraction_count(val_frac, n, "make_folds: val_frac") if n_val is None else n_val
    largest_test = math.ceil(n / folds)
    if n_val < 1 or n - largest_test - n_val < 1:
        raise ValueError(f"make_folds: {n} cases are too few for {folds} folds of up to {largest_test} test and "
                         f"{n_val} validation case(s) with a training case left")
    order = np.random.default_rng(seed).permutation(n)
    out = []
    for f, part in enumerate(np.array_split(order, folds)):
        test = sorted(ids[i] for i in part)
        rest = sorted(set(ids) - set(test))
        pick = np.random.default_rng([seed, f]).permutation(len(rest))
        val = sorted(rest[i] for i in pick[:n_val])
        train = sorted(rest[i] for i in pick[n_val:])
        out.append(Split(train, val, test, seed, float(val_frac), 1.0 / folds, f, folds))
    return out


def save_split(split: Split, path: str | Path) -> Path:
    """Write ``split`` as JSON to ``path`` atomically (parent folders are created). Returns the path.

    Atomic because several processes (DDP ranks, concurrent runs sharing a cache) may read the
    file while it is written: a reader sees no file or the whole file, never half of one.
    """
    return atomic_write_text(Path(path), json.dumps(asdict(split), indent=2) + "\n")


def _id_list(raw: dict, key: str, path: Path, required: bool) -> list[str]:
    if key not in raw and not required:
        return []
    value = raw.get(key)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise DataError(f"{path}: {key!r} must be a list of case id strings")
    if len(set(value)) != len(value):
        raise DataError(f"{path}: {key!r} lists a case more than once")
    return value


def _optional_int(raw: dict, key: str, path: Path) -> int | None:
    value = raw.get(key)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise DataError(f"{path}: {key!r} must be an integer or null, got {value!r}")
    return value


def load_split(path: str | Path, known_ids: Sequence[str] | None = None) -> Split:
    """Read a split file written by :func:`save_split`.

    A file without ``"test"`` (written before test sets existed) is a two-way split: its
    :attr:`Split.protocol` is ``paper``.

    Args:
        path: the JSON file.
        known_ids: if given, every id in the split must be one of these (the task's cases).

    Returns:
        The :class:`Split`.

    Raises:
        DataError: unreadable or malformed file, a case in two parts, or unknown case ids.
    """
    path = Path(path)
    try:
        raw: Any = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: split file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{path}: cannot read split file ({err})") from None
    if not isinstance(raw, dict):
        raise DataError(f"{path}: split file must be a JSON object with 'train', 'val' and 'test'")
    parts = {key: _id_list(raw, key, path, required=key != "test") for key in ("train", "val", "test")}
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        overlap = sorted(set(parts[a]) & set(parts[b]))
        if overlap:
            raise DataError(f"{path}: cases in both {a} and {b}: {', '.join(overlap)}")
    if known_ids is not None:
        unknown = sorted(set().union(*parts.values()) - set(known_ids))
        if unknown:
            raise DataError(f"{path}: case ids not in the task's dataset.json: {', '.join(unknown)}")
    seed = raw.get("seed", 0)
    fracs = {k: raw.get(k, d) for k, d in (("val_frac", 0.2), ("test_frac", 0.0 if "test" not in raw else 0.2))}
    if isinstance(seed, bool) or not isinstance(seed, int) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in fracs.values()):
        raise DataError(f"{path}: 'seed' must be an integer and 'val_frac', 'test_frac' numbers")
    fold, folds = _optional_int(raw, "fold", path), _optional_int(raw, "folds", path)
    if (fold is None) != (folds is None) or (folds is not None and not 0 <= fold < folds):
        raise DataError(f"{path}: 'fold' and 'folds' must both be null, or 0 <= fold < folds; "
                        f"got {fold!r} and {folds!r}")
    return Split(parts["train"], parts["val"], parts["test"], seed, float(fracs["val_frac"]),
                 float(fracs["test_frac"]), fold, folds)


def load_or_make_split(path: str | Path, case_ids: Sequence[str], val_frac: float = DEFAULT_VAL_FRAC,
                       seed: int = 0, n_val: int | None = None, test_frac: float = DEFAULT_TEST_FRAC,
                       n_test: int | None = None) -> Split:
    """Read the split at ``path`` if it exists, else make one with :func:`make_split` and save it there.

    An existing file wins over the arguments, so a later run with different fractions still uses
    the same cases; delete the file to re-split. One exception: asking for test cases
    (``test_frac > 0`` or ``n_test > 0``) while the file is a two-way split is refused, because
    its validation cases would then be taken for a held-out test set.

    Raises:
        DataError: the existing file is invalid, names cases not in ``case_ids``, or is a two-way
            split while test cases are asked for.
        ValueError: no file, and the fractions or counts are invalid (see :func:`make_split`).
    """
    path = Path(path)
    if path.exists():
        split = load_split(path, known_ids=case_ids)
        wants_test = (n_test if n_test is not None else test_frac) > 0
        if wants_test and split.protocol == "paper":
            raise DataError(
                f"{path}: a two-way train/val split with no 'test' cases (the paper's protocol, or a file from "
                f"before held-out test sets), but data.test_frac is {test_frac:g}: nothing would be held out. "
                "Delete the file to make a train/val/test split, or set data.test_frac=0 to train with the paper's "
                "two-way protocol (its validation numbers are optimistic)."
            )
        return split
    split = make_split(case_ids, val_frac=val_frac, seed=seed, n_val=n_val, test_frac=test_frac, n_test=n_test)
    save_split(split, path)
    return split

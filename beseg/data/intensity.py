"""Dataset-level intensity statistics (the paper's Task09 normalisation) and where they are cached.

Task09 maps CT intensities to [0, 1] by the 5th and 95th percentiles of the *foreground* (spleen)
voxels pooled over the training cases. Those two numbers need one pass over the training images
and labels, so they are computed once and cached as JSON in a cache folder outside the task folder
(the task folder may be read-only). The cache is keyed by the case ids and the files' sizes and
modification times, so editing or re-splitting the data recomputes it.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm.auto import tqdm

from beseg.data.msd import Case
from beseg.data.nifti import read_array
from beseg.errors import DataError
from beseg.fileio import atomic_write_text

__all__ = ["IntensityRange", "cache_base", "default_cache_dir", "foreground_percentiles"]

STATS_FILE = "intensity_stats.json"


@dataclass(frozen=True)
class IntensityRange:
    """Input intensities that map to 0 and 1.

    Attributes:
        low: intensity mapped to 0 (e.g. the 5th foreground percentile, in HU for CT).
        high: intensity mapped to 1 (e.g. the 95th foreground percentile).
        percentiles: the ``(low, high)`` percentiles these came from.
        num_voxels: number of foreground voxels pooled.
    """

    low: float
    high: float
    percentiles: tuple[float, float] = (5.0, 95.0)
    num_voxels: int = 0


def cache_base() -> Path:
    """Folder holding beseg's per-dataset caches: ``$BESEG_CACHE``, else ``$BESEG_CACHE_DIR`` (its older
    name), else ``$XDG_CACHE_HOME/beseg`` (``~/.cache/beseg``).

    On a cluster point ``BESEG_CACHE`` at a project or scratch filesystem every node sees, not the
    home folder: the preprocessed store (:mod:`beseg.data.store`) is about the size of the
    uncompressed dataset.
    """
    base = os.environ.get("BESEG_CACHE") or os.environ.get("BESEG_CACHE_DIR") \
        or Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")) / "beseg"
    return Path(base).expanduser()


def default_cache_dir(task_root: str | Path) -> Path:
    """Per-task cache folder: :func:`cache_base` / ``<folder name>-<hash of its absolute path>``, so two
    copies of a task never share a cache (``data.cache_dir`` replaces this whole path)."""
    root = Path(task_root).expanduser().resolve()
    digest = hashlib.sha1(str(root).encode()).hexdigest()[:12]
    return cache_base() / f"{root.name}-{digest}"


def _fingerprint(cases: Sequence[Case], percentiles: tuple[float, float]) -> str:
    h = hashlib.sha1(repr(percentiles).encode())
    for c in sorted(cases, key=lambda c: c.id):
        for p in (c.image, c.label):
            st = p.stat()
            h.update(f"{c.id}|{p}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _compute(cases: Sequence[Case], percentiles: tuple[float, float], progress: bool) -> IntensityRange:
    pooled = []
    for case in tqdm(cases, desc="foreground percentiles", unit="case", disable=not progress):
        image, ih = read_array(case.image)
        label, lh = read_array(case.label)
        if ih.channels != 1:
            raise DataError(f"{case.image}: percentile normalisation needs a single-channel image, "
                            f"got {ih.channels} channels")
        if label.shape[:3] != image.shape[:3]:
            raise DataError(f"{case.label}: label shape {label.shape} does not match image shape {image.shape}")
        image = image.reshape(image.shape[:3])
        pooled.append(np.asarray(image[np.asarray(label).reshape(label.shape[:3]) > 0], dtype=np.float64))
    values = np.concatenate(pooled) if pooled else np.empty(0)
    if values.size == 0:
        raise DataError(f"{cases[0].label.parent if cases else 'training set'}: no foreground voxels in the "
                        "training labels; cannot compute the foreground intensity percentiles")
    if not np.all(np.isfinite(values)):
        raise DataError("training images contain NaN or Inf inside the foreground; run `beseg data check`")
    lo, hi = np.percentile(values, percentiles)
    if hi <= lo:
        hi = lo + 1.0  # a constant foreground would divide by zero; keep the map defined
    return IntensityRange(float(lo), float(hi), percentiles, int(values.size))


def foreground_percentiles(cases: Sequence[Case], cache_dir: str | Path | None,
                           percentiles: tuple[float, float] = (5.0, 95.0),
                           progress: bool = False) -> IntensityRange:
    """Percentiles of the image intensities inside the label (label > 0), pooled over ``cases``.

    Pass the *training* cases only, so validation data never influences preprocessing.

    Args:
        cases: training cases (single-channel images).
        cache_dir: folder for ``intensity_stats.json``; ``None`` disables caching.
        percentiles: the low and high percentile, in [0, 100].
        progress: show a tqdm bar while reading.

    Returns:
        The :class:`IntensityRange`, read from the cache when the cases and files are unchanged.

    Raises:
        DataError: an image or label cannot be read, shapes disagree, or there is no foreground.
    """
    if not cases:
        raise DataError("foreground_percentiles: no training cases given")
    key = _fingerprint(cases, percentiles)
    cache_file = Path(cache_dir) / STATS_FILE if cache_dir is not None else None
    if cache_file is not None and cache_file.is_file():
        try:
            cached = json.loads(cache_file.read_text(encoding="utf-8"))
            if cached.get("key") == key:
                s = cached["stats"]
                return IntensityRange(float(s["low"]), float(s["high"]), tuple(s["percentiles"]),
                                      int(s["num_voxels"]))
        except (OSError, ValueError, KeyError, TypeError):
            pass  # a damaged cache is recomputed, never trusted
    stats = _compute(cases, percentiles, progress)
    if cache_file is not None:
        # Atomic, with a private temporary name: concurrent runs never read or write half a file.
        atomic_write_text(cache_file, json.dumps({"key": key, "stats": asdict(stats)}, indent=2))
    return stats

"""Intensity normalisation as ``pipeline.json`` records it (numpy only), and the rule that keeps its
non-zero mask independent of the resampler.

The presets' MONAI chain (:meth:`beseg.data.TaskPreset._normalize`) applies the same rule,
:data:`NOISE_FLOOR`, before MONAI's ``NormalizeIntensityd(nonzero=True)``, so training, the store,
``beseg evaluate``, ``beseg predict`` and ``beseg-predict`` all count the same voxels as "non-zero".
"""

from __future__ import annotations

from typing import Any

import numpy as np

from beseg_runtime.pipeline import DeployError

__all__ = ["NOISE_FLOOR", "clear_resampling_noise", "normalize"]

#: A voxel whose magnitude is at most this fraction of its channel's largest counts as exactly 0
#: before the non-zero z-score.
NOISE_FLOOR = 1e-6


def clear_resampling_noise(volume: np.ndarray) -> np.ndarray:
    """Set to exactly 0, in place, the voxels of a (C, X, Y, Z) volume whose magnitude is at most
    :data:`NOISE_FLOOR` of their channel's largest.

    Linear resampling of an image with an exactly-zero background (skull-stripped MRI) leaves values
    like 1e-14 beside it wherever a voxel centre lands a rounding error away from an input voxel;
    which voxels get them depends on the arithmetic (MONAI's float64 grid, scipy's), not on the
    image. The non-zero z-score counts every non-zero voxel, so without this rule the statistics of a
    small scan moved by whole percents between two resamplers.

    Returns:
        ``volume``.
    """
    for channel in volume:
        if channel.size:
            magnitude = np.abs(channel)
            channel[magnitude <= NOISE_FLOOR * magnitude.max()] = 0
    return volume


def normalize(image: np.ndarray, spec: dict[str, Any]) -> np.ndarray:
    """Intensity normalisation of a (C, X, Y, Z) float32 volume as ``spec`` says (a new array).

    ``zscore_nonzero``: per channel, zero mean and unit variance over the non-zero voxels (zeros stay
    zero; a constant channel is only shifted), after :func:`clear_resampling_noise`. ``scale_range``:
    ``low`` -> 0, ``high`` -> 1, clipped.

    Raises:
        DeployError: an unknown ``kind`` (the pipeline is from a newer beseg).
    """
    kind = spec.get("kind")
    out = image.astype(np.float32, copy=True)
    if kind == "zscore_nonzero":
        for c in clear_resampling_noise(out):
            mask = c != 0
            if mask.any():
                values = c[mask]
                std = float(values.std())
                c[mask] = (values - np.float32(values.mean())) / np.float32(std if std != 0 else 1.0)
        return out
    if kind == "scale_range":
        low, high = float(spec["low"]), float(spec["high"])
        return np.clip((out - np.float32(low)) / np.float32(high - low), 0.0, 1.0).astype(np.float32)
    raise DeployError(f"unknown normalization kind {kind!r} in pipeline.json; update beseg-runtime.")

"""Sliding-window inference in numpy, placed and blended as MONAI's ``sliding_window_inference``.

Window positions: along each axis the step is ``int(window * (1 - overlap))`` (at least 1; a whole
window when the volume is exactly one window long), and the last window is moved back so that it
ends at the volume's edge. Blending: each window's logits are weighted by an importance map,
constant or a Gaussian with sigma = ``sigma_scale * window`` per axis (clamped below at its smallest
value, at least 1e-3), summed, and divided by the summed weights. These are the rules MONAI 1.6
follows, so the exported pipeline and ``beseg predict`` place and weight the same windows.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence

import numpy as np

__all__ = ["importance_map", "mirror_flips", "sliding_window", "window_starts"]


def mirror_flips(axes: Sequence[int]) -> list[tuple[int, ...]]:
    """Every subset of ``axes`` (the identity first): the flips test-time mirroring averages over.

    ``(0, 1, 2)`` gives the 8 flips nnU-Net uses; ``()`` gives only the identity.
    """
    axes = tuple(sorted(set(int(a) for a in axes)))
    return [combo for k in range(len(axes) + 1) for combo in itertools.combinations(axes, k)]


def window_starts(size: int, window: int, overlap: float) -> list[int]:
    """First voxel of each window along one axis of ``size`` voxels (``size >= window``)."""
    step = window if window == size else max(int(window * (1 - overlap)), 1)
    count = next((i for i in range(math.ceil(size / step)) if i * step + window >= size), 0) + 1
    return sorted({min(i * step, size - window) for i in range(count)})


def importance_map(window: Sequence[int], mode: str = "gaussian", sigma_scale: float = 0.125) -> np.ndarray:
    """Per-voxel weight of a window's output: ones, or a separable Gaussian centred in the window.

    Returns:
        float32 array of shape ``window``.
    """
    if mode == "constant":
        return np.ones(tuple(window), dtype=np.float32)
    if mode != "gaussian":
        raise ValueError(f"blending must be 'gaussian' or 'constant', got {mode!r}")
    weights = np.ones((), dtype=np.float32)
    for n in window:
        x = np.arange(n, dtype=np.float32) - np.float32((n - 1) / 2.0)
        g = np.exp(x**2 / np.float32(-2 * (sigma_scale * n) ** 2)).astype(np.float32)
        weights = np.multiply.outer(weights, g)
    return np.maximum(weights, max(float(weights.min()), 1e-3)).astype(np.float32)


def sliding_window(image: np.ndarray, window: Sequence[int], run: Callable[[np.ndarray], np.ndarray],
                   overlap: float = 0.25, mode: str = "gaussian", sigma_scale: float = 0.125,
                   batch_size: int = 1) -> np.ndarray:
    """Blended network outputs of a whole volume.

    Args:
        image: (C, X, Y, Z) float32 volume, at least one window along each axis.
        window: window (voxels), the network's fixed input size.
        run: (B, C, *window) float32 -> (B, K, *window) float32 logits.
        overlap: fraction of a window that neighbouring windows share.
        mode: ``"gaussian"`` or ``"constant"`` blending.
        sigma_scale: Gaussian sigma as a fraction of the window.
        batch_size: windows per call of ``run``.

    Returns:
        (K, X, Y, Z) float32 blended logits.

    Raises:
        ValueError: the volume is smaller than the window along some axis.
    """
    size = image.shape[1:]
    if any(s < w for s, w in zip(size, window)):
        raise ValueError(f"volume {tuple(size)} is smaller than the window {tuple(window)}")
    weights = importance_map(window, mode, sigma_scale)
    corners = list(itertools.product(*(window_starts(s, w, overlap) for s, w in zip(size, window))))
    out: np.ndarray | None = None
    count = np.zeros(size, dtype=np.float32)
    for first in range(0, len(corners), batch_size):
        batch = corners[first:first + batch_size]
        slices = [tuple(slice(c, c + w) for c, w in zip(corner, window)) for corner in batch]
        logits = np.asarray(run(np.stack([image[(slice(None), *s)] for s in slices])), dtype=np.float32)
        if out is None:
            out = np.zeros((logits.shape[1], *size), dtype=np.float32)
        for s, pred in zip(slices, logits):
            out[(slice(None), *s)] += pred * weights
            count[s] += weights
    assert out is not None
    return out / count

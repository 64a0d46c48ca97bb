"""Sliding-window inference in numpy, placed and blended as MONAI's ``sliding_window_inference``.

Padding: a volume smaller than the window along an axis is padded along it to one window, with a
constant (0: the normalised intensity ``beseg predict`` pads with too), ``(window - size) // 2``
voxels before and the rest after; the blended output is cropped back to the volume. Window
positions: along each axis the step is ``int(window * (1 - overlap))`` (at least 1; a whole window
when the volume is exactly one window long), and the last window is moved back so that it ends at
the volume's edge. Blending: each window's logits are weighted by an importance map, constant or a
Gaussian with sigma = ``sigma_scale * window`` per axis (clamped below at its smallest value, at
least 1e-3), summed, and divided by the summed weights. These are the rules MONAI 1.6's
``sliding_window_inference`` follows (``padding_mode="constant"``, ``cval=0``), so the exported
pipeline and ``beseg predict`` pad, place and weight the same windows.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence

import numpy as np

__all__ = ["DEFAULT_WARN_BELOW", "PADDING_MODES", "importance_map", "mirror_flips", "pad_widths", "sliding_window",
           "small_scan_warning", "window_starts"]

#: Padding modes the runtime implements (``pipeline.json``: ``members[i].padding.mode``).
PADDING_MODES = ("constant",)
#: A scan under this fraction of the window along some axis (on the model grid) is predicted with a warning.
DEFAULT_WARN_BELOW = 0.25


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


def pad_widths(size: Sequence[int], window: Sequence[int]) -> list[tuple[int, int]]:
    """``(before, after)`` voxels of padding per axis that make ``size`` at least one ``window``:
    ``(window - size) // 2`` before and the rest after (MONAI's ``sliding_window_inference``), 0 where
    the volume is large enough."""
    widths = []
    for s, w in zip(size, window):
        diff = max(int(w) - int(s), 0)
        widths.append((diff // 2, diff - diff // 2))
    return widths


def small_scan_warning(path: object, shape: Sequence[int], windows: Sequence[Sequence[int]],
                       spacing: Sequence[float], warn_below: float = DEFAULT_WARN_BELOW) -> str | None:
    """A one-line warning when a scan on the model grid is much smaller than a window, else None.

    Such a scan is still predicted (padded to one window), but the network sees mostly padding
    along that axis, so the result deserves a look: is it the intended series?

    Args:
        path: the input file, named in the message.
        shape: the scan's spatial shape on the model grid (voxels).
        windows: each ensemble member's window (voxels).
        spacing: the model grid's voxel size (mm), for the message.
        warn_below: fraction of the window under which an axis is "much smaller"; 0 never warns.

    Returns:
        The message, or None when every axis is at least ``warn_below`` of every window.
    """
    window = [max(int(w[a]) for w in windows) for a in range(len(shape))]
    axes = [a for a, (s, w) in enumerate(zip(shape, window)) if s < warn_below * w]
    if not axes:
        return None
    return (f"{path}: only {'x'.join(map(str, shape))} voxels on the model's "
            f"{'x'.join(f'{s:g}' for s in spacing)} mm grid, under {warn_below:.0%} of the window "
            f"{'x'.join(map(str, window))} along axis {', '.join(map(str, axes))}; predicted with padding, but check "
            "that this is the intended series.")


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
                   batch_size: int = 1, padding: str = "constant", pad_value: float = 0.0) -> np.ndarray:
    """Blended network outputs of a whole volume.

    Args:
        image: (C, X, Y, Z) float32 volume; an axis shorter than the window is padded (see :func:`pad_widths`).
        window: window (voxels), the network's fixed input size.
        run: (B, C, *window) float32 -> (B, K, *window) float32 logits.
        overlap: fraction of a window that neighbouring windows share.
        mode: ``"gaussian"`` or ``"constant"`` blending.
        sigma_scale: Gaussian sigma as a fraction of the window.
        batch_size: windows per call of ``run``.
        padding: ``"constant"``, the only mode (MONAI's default, what ``beseg predict`` uses).
        pad_value: the constant padded voxels get (in the network's input units, i.e. normalised).

    Returns:
        (K, X, Y, Z) float32 blended logits, the shape of ``image`` (padding cropped off).

    Raises:
        ValueError: an unknown padding mode, or a volume with a zero-size axis.
    """
    if padding not in PADDING_MODES:
        raise ValueError(f"padding must be one of {PADDING_MODES}, got {padding!r}")
    if min(image.shape[1:]) < 1:
        raise ValueError(f"volume {tuple(image.shape[1:])} has a zero-size axis")
    widths = pad_widths(image.shape[1:], window)
    if any(before or after for before, after in widths):
        image = np.pad(image, [(0, 0), *widths], mode="constant", constant_values=np.float32(pad_value))
    size = image.shape[1:]
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
    out /= count
    crop = tuple(slice(before, n - after) for (before, after), n in zip(widths, size))
    return np.ascontiguousarray(out[(slice(None), *crop)])

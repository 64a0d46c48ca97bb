"""Per-case, per-class segmentation metrics in millimetres: Dice, HD95, ASD and NSD.

The distances come from MONAI's metrics, given the voxel spacing, so every distance is in mm:

* ``dice``: :class:`monai.metrics.DiceMetric`.
* ``hd95_mm``: :class:`monai.metrics.HausdorffDistanceMetric` with ``percentile=95``. MONAI takes the
  95th percentile (linear interpolation) of each directed set of boundary distances, prediction to
  label and label to prediction, and reports the larger of the two.
* ``asd_mm``: :class:`monai.metrics.SurfaceDistanceMetric` with ``symmetric=True``: the mean of the
  two directed distance sets pooled together.
* ``nsd``: :class:`monai.metrics.SurfaceDiceMetric` (normalised surface Dice): the share of boundary
  voxels of both masks that lie within the tolerance (mm) of the other mask's boundary.

MONAI 1.6.1 takes the spacing as a call argument (``metric(y_pred, y, spacing=...)``); a sequence
of one number per spatial axis applies to every batch item, in the array's axis order.

Empty masks, which MONAI leaves as NaN/inf with a warning, are defined here instead:

============================  =====  ==================  =====
case                          dice   hd95_mm, asd_mm     nsd
============================  =====  ==================  =====
label and prediction empty    1.0    0.0                 1.0
exactly one of them empty     0.0    NaN                 0.0
============================  =====  ==================  =====

Why: when both are empty the prediction is perfect, so every score takes its best value. When only
one is empty there is no boundary to measure a distance to; any finite number (the image diagonal,
say) would depend on the field of view, so the distance is NaN (undefined) and the overlap scores,
which are well defined, are 0. Aggregates must therefore say how many NaN distances they skipped.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch
from monai.metrics import DiceMetric, HausdorffDistanceMetric, SurfaceDiceMetric, SurfaceDistanceMetric
from torch import Tensor

__all__ = ["METRIC_NAMES", "HIGHER_IS_BETTER", "case_metrics"]

#: The metric keys of every row that :func:`case_metrics` returns, in column order.
METRIC_NAMES: tuple[str, ...] = ("dice", "hd95_mm", "asd_mm", "nsd")

#: Direction of each metric: True when a larger value is better.
HIGHER_IS_BETTER: dict[str, bool] = {"dice": True, "hd95_mm": False, "asd_mm": False, "nsd": True}


def _as_bool_tensor(x: Tensor | np.ndarray, name: str) -> Tensor:
    """``x`` as a CPU bool tensor, checking that it holds only 0 and 1."""
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, Tensor) else x).detach().cpu()
    if t.dtype != torch.bool:
        if not bool(((t == 0) | (t == 1)).all()):
            raise ValueError(f"{name} must be binary (0/1 or bool) one-hot masks.")
        t = t != 0
    return t


def _per_class(value: float | Sequence[float], n: int, name: str) -> list[float]:
    """Broadcast one number, or check one number per class; every value finite and >= 0."""
    values = [float(value)] * n if np.isscalar(value) else [float(v) for v in value]  # type: ignore[union-attr]
    if len(values) != n:
        raise ValueError(f"{name} needs one value per scored class ({n}), got {len(values)}.")
    if not all(np.isfinite(v) and v >= 0 for v in values):
        raise ValueError(f"{name} values must be finite and >= 0 mm, got {values}.")
    return values


def _monai_scores(pred: Tensor, label: Tensor, spacing: list[float], tolerances: list[float]) -> dict[str, Tensor]:
    """MONAI's four metrics for (1, C, *spatial) masks where every channel is non-empty in both."""
    y_pred, y = pred.float(), label.float()
    kw = {"include_background": True, "reduction": "none"}
    return {
        "dice": DiceMetric(**kw)(y_pred, y)[0],
        "hd95_mm": HausdorffDistanceMetric(percentile=95, **kw)(y_pred, y, spacing=spacing)[0],
        "asd_mm": SurfaceDistanceMetric(symmetric=True, **kw)(y_pred, y, spacing=spacing)[0],
        "nsd": SurfaceDiceMetric(class_thresholds=tolerances, **kw)(y_pred, y, spacing=spacing)[0],
    }


def case_metrics(
    pred: Tensor | np.ndarray,
    label: Tensor | np.ndarray,
    spacing_mm: Sequence[float],
    class_names: Sequence[str],
    nsd_tolerance_mm: float | Sequence[float] = 1.0,
    include_background: bool = False,
) -> list[dict[str, float | str]]:
    """Dice, HD95, ASD and NSD of one case, one dict per class, distances in mm.

    Args:
        pred: (C, H, W[, D]) one-hot binary prediction (bool or 0/1 numbers), tensor or array.
        label: ground truth of the same shape and encoding.
        spacing_mm: voxel size in mm, one number per spatial axis, in the arrays' axis order.
        class_names: one name per *scored* channel: ``C - 1`` names when ``include_background`` is
            False (channel 0 is the background and is dropped), ``C`` names when it is True.
        nsd_tolerance_mm: boundary tolerance of the normalised surface Dice in mm, one number for
            every class or one per scored class.
        include_background: score channel 0 as well. Default False: channel 0 is background.

    Returns:
        One dict per scored class, in channel order:
        ``{"class": name, "dice": float, "hd95_mm": float, "asd_mm": float, "nsd": float}``.
        Empty masks follow the module's table: both empty gives dice 1, distances 0, nsd 1; one
        empty gives dice 0, distances NaN, nsd 0.

    Raises:
        ValueError: the shapes differ, are not (C, H, W) or (C, H, W, D), the masks are not
            binary, or the spacing, class names or tolerances do not match the channels.
    """
    p = _as_bool_tensor(pred, "pred")
    y = _as_bool_tensor(label, "label")
    if p.shape != y.shape:
        raise ValueError(f"pred and label shapes differ: {tuple(p.shape)} vs {tuple(y.shape)}.")
    if p.ndim not in (3, 4):
        raise ValueError(f"pred must be (C, H, W) or (C, H, W, D) one-hot, got shape {tuple(p.shape)}.")
    if not include_background:
        p, y = p[1:], y[1:]
    n = p.shape[0]
    if len(class_names) != n:
        raise ValueError(
            f"class_names has {len(class_names)} names but {n} channels are scored "
            f"(include_background={include_background})."
        )
    spacing = [float(s) for s in spacing_mm]
    if len(spacing) != p.ndim - 1 or not all(np.isfinite(s) and s > 0 for s in spacing):
        raise ValueError(f"spacing_mm must be {p.ndim - 1} positive numbers (mm), got {list(spacing_mm)}.")
    tolerances = _per_class(nsd_tolerance_mm, n, "nsd_tolerance_mm")

    p_any = p.flatten(1).any(1).tolist()
    y_any = y.flatten(1).any(1).tolist()
    both = [i for i in range(n) if p_any[i] and y_any[i]]
    scores: dict[str, Tensor] = {}
    if both:
        with warnings.catch_warnings():
            # Channels reaching MONAI are non-empty; silence its generic empty-mask warnings anyway.
            warnings.simplefilter("ignore", UserWarning)
            # MONAI 1.6 passes a deprecated argument to itself; not actionable here.
            warnings.filterwarnings("ignore", message=".*always_return_as_numpy", category=FutureWarning)
            scores = _monai_scores(p[both][None], y[both][None], spacing, [tolerances[i] for i in both])

    rows: list[dict[str, float | str]] = []
    for i, name in enumerate(class_names):
        if i in both:
            k = both.index(i)
            row = {m: float(scores[m][k]) for m in METRIC_NAMES}
        elif not p_any[i] and not y_any[i]:
            row = {"dice": 1.0, "hd95_mm": 0.0, "asd_mm": 0.0, "nsd": 1.0}
        else:
            row = {"dice": 0.0, "hd95_mm": float("nan"), "asd_mm": float("nan"), "nsd": 0.0}
        rows.append({"class": str(name), **row})
    return rows

"""Per-case, per-class segmentation metrics in millimetres: Dice, HD95, ASD and NSD.

* ``dice``: ``2 |P & Y| / (|P| + |Y|)``, counted on the masks.
* ``hd95_mm``: the 95th percentile (linear interpolation) of each directed set of boundary
  distances, prediction to label and label to prediction, and the larger of the two, as
  :class:`monai.metrics.HausdorffDistanceMetric` with ``percentile=95`` reports it.
* ``asd_mm``: the mean of the two directed distance sets pooled together, as
  :class:`monai.metrics.SurfaceDistanceMetric` with ``symmetric=True``.
* ``nsd``: normalised surface Dice, the share of boundary voxels of both masks that lie within the
  tolerance (mm) of the other mask's boundary, as :class:`monai.metrics.SurfaceDiceMetric`.

The three distance metrics all start from the same boundary voxels and distances, which MONAI's
:func:`monai.metrics.utils.get_edge_surface_distance` gives (its three metric classes call it
once each); here it is called once per class and the three numbers are read off the same
distances, so a case costs one distance computation per class instead of three. Distances use
the voxel spacing, in the arrays' axis order, so every distance is in mm.

A class that is empty in the prediction, the label or both is scored by convention, because
MONAI leaves it as NaN/inf:

============================  =====  =============================  =====  ==============
case                          dice   hd95_mm, asd_mm                nsd    ``empty_in``
============================  =====  =============================  =====  ==============
both non-empty                MONAI  MONAI                          MONAI  ``none``
label and prediction empty    1.0    0.0                            1.0    ``both``
exactly one of them empty     0.0    ``distance_penalty_mm``        0.0    ``prediction``
                                     (default 373.13 mm, BraTS's)          or ``label``
============================  =====  =============================  =====  ==============

Why: when both are empty the prediction is perfect, so every score takes its best value. When
exactly one is empty there is no boundary to measure a distance to. Leaving the distance out
(NaN) would make a model that misses a structure entirely look *better* on HD95 than one that
finds it roughly, so the default is the fixed penalty the BraTS challenge assigns to HD95 in
that case (373.13 mm, the diagonal of its 240 x 240 x 155 mm volume), used for ASD as well so
that both distance columns treat a missed structure alike. ``distance_penalty_mm=None`` keeps
the distances undefined (NaN) instead. Either way the row's ``empty_in`` says which mask was
empty, so aggregates can (and :mod:`beseg.score` does) count how many distances were penalised
or undefined. Dice and NSD are well defined (0) and never penalised.

:func:`label_map_metrics` scores two label maps the way ``beseg evaluate`` and ``beseg score``
both do, adding two conventions on top of :func:`case_metrics`:

* **Ignore label** (nnU-Net v2's ``"ignore"`` label): voxels where the *label* holds it count in no
  metric. They are set to background in both the prediction and the label before any mask is
  made, so they add nothing to Dice's overlap or sizes (as nnU-Net's ``evaluate_predictions.py``
  excludes ``seg_ref == ignore_label``), and a prediction cut off where the annotation stops has
  its boundary where the label's is.
* **2D cases**: a 2D label map, or a single-slice volume (exactly one spatial axis of size 1, e.g.
  ``(X, Y, 1)``), is scored in its plane: boundaries by 2D erosion and distances in the plane. A
  3D erosion would make every foreground voxel of a one-voxel-thick slab a boundary voxel. Each
  row's ``dim`` says which was used (2 or 3).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from monai.metrics.utils import get_edge_surface_distance
from torch import Tensor

from beseg.data.classes import ClassSpec, class_masks

__all__ = [
    "METRIC_NAMES", "DISTANCE_METRICS", "HIGHER_IS_BETTER", "BRATS_DISTANCE_PENALTY_MM", "EMPTY_IN",
    "case_metrics", "label_map_metrics",
]

#: The metric keys of every row that :func:`case_metrics` returns, in column order.
METRIC_NAMES: tuple[str, ...] = ("dice", "hd95_mm", "asd_mm", "nsd")

#: The metrics that are boundary distances (mm): undefined, or penalised, when exactly one mask is empty.
DISTANCE_METRICS: tuple[str, ...] = ("hd95_mm", "asd_mm")

#: Direction of each metric: True when a larger value is better.
HIGHER_IS_BETTER: dict[str, bool] = {"dice": True, "hd95_mm": False, "asd_mm": False, "nsd": True}

#: HD95 (mm) the BraTS challenge assigns when a structure is empty in exactly one of prediction
#: and label; beseg's default for HD95 and ASD in that case.
BRATS_DISTANCE_PENALTY_MM: float = 373.13

#: Values of a row's ``empty_in`` field: where the class is empty.
EMPTY_IN: tuple[str, ...] = ("none", "prediction", "label", "both")


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


def _penalty(value: float | None) -> float:
    """The distance given to a class empty in exactly one mask: a finite number >= 0, or NaN for None/NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return math.nan
    value = float(value)
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"distance_penalty_mm must be a finite number >= 0 (mm) or None, got {value}.")
    return value


def _boundary_scores(pred: Tensor, label: Tensor, spacing: list[float], tolerance: float) -> dict[str, float]:
    """HD95, ASD and NSD of one (H, W[, D]) class where both masks are non-empty, from one distance computation."""
    with warnings.catch_warnings():
        # Both masks are non-empty here; MONAI 1.6 also passes a deprecated argument to itself.
        warnings.simplefilter("ignore", UserWarning)
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy", category=FutureWarning)
        _, (to_label, to_pred), _ = get_edge_surface_distance(pred, label, spacing=spacing, symmetric=True)
    d_pl = to_label.double().numpy()
    d_lp = to_pred.double().numpy()
    both = np.concatenate([d_pl, d_lp])
    return {
        "hd95_mm": float(max(np.percentile(d_pl, 95), np.percentile(d_lp, 95))),
        "asd_mm": float(both.mean()),
        "nsd": float((both <= tolerance).sum() / both.size),
    }


def case_metrics(
    pred: Tensor | np.ndarray,
    label: Tensor | np.ndarray,
    spacing_mm: Sequence[float],
    class_names: Sequence[str],
    nsd_tolerance_mm: float | Sequence[float] = 1.0,
    include_background: bool = False,
    distance_penalty_mm: float | None = BRATS_DISTANCE_PENALTY_MM,
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
        distance_penalty_mm: HD95 and ASD (mm) of a class that is empty in exactly one of
            prediction and label. Default :data:`BRATS_DISTANCE_PENALTY_MM` (373.13 mm, the BraTS
            convention); ``None`` (or NaN) leaves them undefined (NaN).

    Returns:
        One dict per scored class, in channel order: ``{"class": name, "dice": float,
        "hd95_mm": float, "asd_mm": float, "nsd": float, "empty_in": str}``, where ``empty_in``
        is one of :data:`EMPTY_IN`. Empty masks follow the module's table.

    Raises:
        ValueError: the shapes differ, are not (C, H, W) or (C, H, W, D), the masks are not
            binary, or the spacing, class names, tolerances or penalty are invalid.
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
    penalty = _penalty(distance_penalty_mm)

    rows: list[dict[str, float | str]] = []
    for i, name in enumerate(class_names):
        pi, yi = p[i], y[i]
        n_pred, n_label = int(pi.sum()), int(yi.sum())
        if n_pred and n_label:
            dice = 2.0 * int((pi & yi).sum()) / (n_pred + n_label)
            row = {"dice": dice, **_boundary_scores(pi, yi, spacing, tolerances[i]), "empty_in": "none"}
        elif not n_pred and not n_label:
            row = {"dice": 1.0, "hd95_mm": 0.0, "asd_mm": 0.0, "nsd": 1.0, "empty_in": "both"}
        else:
            row = {"dice": 0.0, "hd95_mm": penalty, "asd_mm": penalty, "nsd": 0.0,
                   "empty_in": "prediction" if not n_pred else "label"}
        rows.append({"class": str(name), **{m: row[m] for m in METRIC_NAMES}, "empty_in": row["empty_in"]})
    return rows


def label_map_metrics(
    pred: np.ndarray,
    label: np.ndarray,
    classes: ClassSpec,
    spacing_mm: Sequence[float],
    nsd_tolerance_mm: float | Sequence[float] = 1.0,
    ignore_label: int | None = None,
    distance_penalty_mm: float | None = BRATS_DISTANCE_PENALTY_MM,
) -> list[dict[str, float | str | int]]:
    """Dice, HD95, ASD and NSD of one case from two integer label maps, one dict per class.

    Args:
        pred: (X, Y, Z) or (X, Y) integer label map, prediction.
        label: the ground truth on the same grid.
        classes: the scored classes (each a set of label values, see :mod:`beseg.data.classes`).
        spacing_mm: voxel size (mm) per axis of the arrays, in their axis order (extra values,
            e.g. the third of a 2D file's header, are not used).
        nsd_tolerance_mm: NSD tolerance (mm), one for all classes or one per class.
        ignore_label: label value whose voxels (where ``label`` holds it) count in no metric, or
            ``None``. It must not be one of the classes' values.
        distance_penalty_mm: as in :func:`case_metrics`.

    Returns:
        :func:`case_metrics`' rows (``include_background=True``: every class of ``classes``), each
        with ``dim``: 2 for a 2D case (a 2D map, or exactly one spatial axis of size 1, which is
        dropped with its spacing), else 3.

    Raises:
        ValueError: the shapes differ or are not 2D/3D, the spacing is too short, a class holds
            the ignore label, or as :func:`case_metrics`.
    """
    pred, label = np.asarray(pred), np.asarray(label)
    if pred.shape != label.shape:
        raise ValueError(f"pred and label shapes differ: {pred.shape} vs {label.shape}.")
    if pred.ndim not in (2, 3):
        raise ValueError(f"label maps must be 2D or 3D, got shape {pred.shape}.")
    spacing = [float(s) for s in spacing_mm]
    if len(spacing) < pred.ndim:
        raise ValueError(f"spacing_mm needs one value per axis of shape {pred.shape}, got {spacing}.")
    spacing = spacing[: pred.ndim]
    if ignore_label is not None and any(int(ignore_label) in values for _, values in classes):
        raise ValueError(f"the ignore label {ignore_label} is one of the scored classes' values "
                         f"({', '.join(n for n, v in classes if int(ignore_label) in v)}); it is not a class.")
    singleton = [axis for axis, size in enumerate(pred.shape) if size == 1]
    if pred.ndim == 3 and len(singleton) == 1:  # a single-slice volume: a 2D case in the other two axes
        axis = singleton[0]
        pred, label = pred.squeeze(axis), label.squeeze(axis)
        del spacing[axis]
    p, y = class_masks(pred, classes), class_masks(label, classes)
    if ignore_label is not None:
        counted = label != ignore_label
        p &= counted  # the label's masks hold no ignored voxel already: the ignore label is no class's value
    rows = case_metrics(p, y, spacing, [name for name, _ in classes], nsd_tolerance_mm,
                        include_background=True, distance_penalty_mm=distance_penalty_mm)
    return [{**row, "dim": pred.ndim} for row in rows]

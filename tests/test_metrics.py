"""Tests of beseg.metrics: known geometry at anisotropic spacing, empty masks, several classes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from beseg.metrics import METRIC_NAMES, case_metrics


def _plates(shape, thickness: int, shift: int, axis: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A plate ``thickness`` voxels thick across ``axis``, and the same plate moved by ``shift``."""
    gt = np.zeros(shape, bool)
    sl = [slice(2, s - 2) for s in shape]
    sl[axis] = slice(3, 3 + thickness)
    gt[tuple(sl)] = True
    return gt, np.roll(gt, shift, axis=axis)


def _one(pred: np.ndarray, gt: np.ndarray, spacing, tol=1.0) -> dict:
    return case_metrics(pred[None], gt[None], spacing, ["fg"], nsd_tolerance_mm=tol, include_background=True)[0]


def _reference_distances(pred: np.ndarray, gt: np.ndarray, spacing) -> tuple[np.ndarray, np.ndarray]:
    """Directed boundary distances (mm) by erosion and scipy's EDT, independent of MONAI."""
    def edges(m):
        return m & ~ndimage.binary_erosion(m)

    ep, eg = edges(pred), edges(gt)
    to_gt = ndimage.distance_transform_edt(~eg, sampling=spacing)
    to_pred = ndimage.distance_transform_edt(~ep, sampling=spacing)
    return to_gt[ep], to_pred[eg]


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_plate_shifted_two_voxels_at_2_5mm(axis):
    # Every boundary voxel is 2 voxels * 2.5 mm from the other plate: all distances are 5 mm.
    gt, pred = _plates((14, 14, 14), thickness=1, shift=2, axis=axis)
    spacing = [1.0, 1.0, 1.0]
    spacing[axis] = 2.5
    m = _one(pred, gt, spacing, tol=4.9)
    assert m["dice"] == 0.0
    assert m["hd95_mm"] == pytest.approx(5.0)
    assert m["asd_mm"] == pytest.approx(5.0)
    assert m["nsd"] == 0.0
    assert _one(pred, gt, spacing, tol=5.0)["nsd"] == pytest.approx(1.0)


def test_spacing_follows_axis_order():
    # The same shift along axis 0 measured with the 2.5 mm on another axis gives 2 voxels * 1 mm.
    gt, pred = _plates((14, 14, 14), thickness=1, shift=2, axis=0)
    assert _one(pred, gt, (1.0, 1.0, 2.5))["hd95_mm"] == pytest.approx(2.0)


def test_half_overlapping_plates():
    # 2-voxel plates moved by 1 voxel: half of the voxels overlap (Dice 0.5); half of the boundary
    # voxels sit on the other boundary (0 mm), the rest one voxel = 2.5 mm away.
    gt, pred = _plates((14, 14, 14), thickness=2, shift=1, axis=0)
    m = _one(pred, gt, (2.5, 0.8, 0.8), tol=2.4)
    assert m["dice"] == pytest.approx(0.5)
    assert m["hd95_mm"] == pytest.approx(2.5)
    assert m["asd_mm"] == pytest.approx(1.25)
    assert m["nsd"] == pytest.approx(0.5)


def test_spheres_match_independent_reference():
    z, y, x = np.mgrid[:40, :40, :24]
    spacing = (0.8, 1.2, 2.5)
    gt = ((z - 20) * 0.8) ** 2 + ((y - 20) * 1.2) ** 2 + ((x - 12) * 2.5) ** 2 <= 12.0**2
    pred = ((z - 22) * 0.8) ** 2 + ((y - 19) * 1.2) ** 2 + ((x - 12) * 2.5) ** 2 <= 10.0**2
    m = _one(pred, gt, spacing, tol=2.0)
    d_pg, d_gp = _reference_distances(pred, gt, spacing)
    assert m["dice"] == pytest.approx(2 * (pred & gt).sum() / (pred.sum() + gt.sum()))
    assert m["hd95_mm"] == pytest.approx(max(np.percentile(d_pg, 95), np.percentile(d_gp, 95)), rel=1e-5)
    both = np.concatenate([d_pg, d_gp])
    assert m["asd_mm"] == pytest.approx(both.mean(), rel=1e-5)
    assert m["nsd"] == pytest.approx((both <= 2.0).mean(), rel=1e-5)


def test_empty_cases():
    empty = np.zeros((10, 10, 10), bool)
    box = empty.copy()
    box[3:6, 3:6, 3:6] = True
    assert _one(empty, empty, (1, 1, 1)) == {"class": "fg", "dice": 1.0, "hd95_mm": 0.0, "asd_mm": 0.0, "nsd": 1.0}
    for pred, gt in [(empty, box), (box, empty)]:
        m = _one(pred, gt, (1, 1, 1))
        assert m["dice"] == 0.0 and m["nsd"] == 0.0
        assert math.isnan(m["hd95_mm"]) and math.isnan(m["asd_mm"])


def test_multiclass_background_dropped_and_tensor_input():
    labels = torch.zeros(12, 12, 12, dtype=torch.long)
    labels[2:6, 2:10, 2:10] = 1
    labels[7:9, 2:10, 2:10] = 2
    pred_labels = labels.clone()
    pred_labels[7:9] = 0  # class 2 missed entirely
    onehot = torch.nn.functional.one_hot(labels, 4).permute(3, 0, 1, 2)
    pred = torch.nn.functional.one_hot(pred_labels, 4).permute(3, 0, 1, 2)
    rows = case_metrics(pred, onehot, (1.0, 1.0, 1.0), ["a", "b", "c"], nsd_tolerance_mm=[1.0, 2.0, 3.0])
    assert [r["class"] for r in rows] == ["a", "b", "c"]
    assert set(rows[0]) == {"class", *METRIC_NAMES}
    assert rows[0]["dice"] == 1.0 and rows[0]["hd95_mm"] == 0.0 and rows[0]["nsd"] == 1.0
    assert rows[1]["dice"] == 0.0 and math.isnan(rows[1]["hd95_mm"])
    assert rows[2] == {"class": "c", "dice": 1.0, "hd95_mm": 0.0, "asd_mm": 0.0, "nsd": 1.0}  # both empty


def test_two_dimensional_input():
    gt = np.zeros((1, 10, 10), bool)
    gt[0, 2:4, 2:8] = True
    pred = np.roll(gt, 1, axis=1)
    m = case_metrics(pred, gt, (2.0, 1.0), ["fg"], include_background=True)[0]
    assert m["dice"] == pytest.approx(0.5) and m["hd95_mm"] == pytest.approx(2.0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"spacing_mm": (1.0, 1.0)}, "spacing_mm"),
        ({"spacing_mm": (1.0, 0.0, 1.0)}, "spacing_mm"),
        ({"class_names": ["a", "b"]}, "class_names"),
        ({"nsd_tolerance_mm": [1.0, 2.0]}, "nsd_tolerance_mm"),
        ({"nsd_tolerance_mm": -1.0}, "nsd_tolerance_mm"),
    ],
)
def test_argument_errors(kwargs, match):
    x = np.zeros((2, 6, 6, 6), np.uint8)
    args = {"spacing_mm": (1.0, 1.0, 1.0), "class_names": ["a"], **kwargs}
    with pytest.raises(ValueError, match=match):
        case_metrics(x, x, **args)


def test_shape_and_binary_errors():
    x = np.zeros((2, 6, 6, 6), np.uint8)
    with pytest.raises(ValueError, match="shapes differ"):
        case_metrics(x, x[:, :5], (1, 1, 1), ["a"])
    with pytest.raises(ValueError, match="binary"):
        case_metrics(x + 2, x, (1, 1, 1), ["a"])

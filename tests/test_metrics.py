"""Tests of beseg.metrics: known geometry at anisotropic spacing, empty masks, several classes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from monai.metrics import DiceMetric, HausdorffDistanceMetric, SurfaceDiceMetric, SurfaceDistanceMetric

from beseg.metrics import METRIC_NAMES, case_metrics, label_map_metrics


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
    assert _one(empty, empty, (1, 1, 1)) == {"class": "fg", "dice": 1.0, "hd95_mm": 0.0, "asd_mm": 0.0, "nsd": 1.0,
                                             "empty_in": "both"}
    for pred, gt, where in [(empty, box, "prediction"), (box, empty, "label")]:
        m = _one(pred, gt, (1, 1, 1))
        # BraTS's fixed HD95 for a structure empty in exactly one mask, typed here, not read from the code.
        assert m == {"class": "fg", "dice": 0.0, "hd95_mm": 373.13, "asd_mm": 373.13, "nsd": 0.0, "empty_in": where}


def test_missed_structure_scores_worse_than_a_rough_one():
    # The reason for the penalty: a prediction that misses the structure must not beat one that finds it roughly.
    gt = np.zeros((20, 20, 20), bool)
    gt[5:12, 5:12, 5:12] = True
    rough = np.roll(gt, 3, axis=0)
    missed = np.zeros_like(gt)
    found, lost = _one(rough, gt, (1, 1, 1)), _one(missed, gt, (1, 1, 1))
    for metric in ("hd95_mm", "asd_mm"):
        assert lost[metric] > found[metric]
    assert lost["dice"] < found["dice"] and lost["nsd"] < found["nsd"]


def test_distance_penalty_is_overridable():
    empty = np.zeros((1, 8, 8, 8), bool)
    box = empty.copy()
    box[0, 2:5, 2:5, 2:5] = True
    m = case_metrics(empty, box, (1, 1, 1), ["fg"], include_background=True, distance_penalty_mm=100.0)[0]
    assert (m["hd95_mm"], m["asd_mm"], m["empty_in"]) == (100.0, 100.0, "prediction")
    for undefined in (None, math.nan):
        m = case_metrics(empty, box, (1, 1, 1), ["fg"], include_background=True, distance_penalty_mm=undefined)[0]
        assert math.isnan(m["hd95_mm"]) and math.isnan(m["asd_mm"]) and m["dice"] == 0.0
    for bad in (-1.0, math.inf):
        with pytest.raises(ValueError, match="distance_penalty_mm"):
            case_metrics(empty, box, (1, 1, 1), ["fg"], include_background=True, distance_penalty_mm=bad)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # MONAI 1.6 passes a deprecated argument to itself
def test_equals_monai_metric_classes_on_random_blobs():
    # beseg computes the boundary distances once per class and reads HD95, ASD and NSD off them; MONAI's
    # three metric classes each compute them anew. Both must give the same numbers.
    rng = np.random.default_rng(5)
    spacing = (0.7, 1.1, 2.5)
    smooth = lambda: ndimage.gaussian_filter(rng.normal(size=(2, 30, 26, 14)), (0, 2, 2, 1)) > 0.15  # noqa: E731
    pred, gt = smooth(), smooth()
    assert pred.reshape(2, -1).any(1).all() and gt.reshape(2, -1).any(1).all()
    rows = case_metrics(pred, gt, spacing, ["a", "b"], nsd_tolerance_mm=1.5, include_background=True)
    p, y = torch.as_tensor(pred[None]).float(), torch.as_tensor(gt[None]).float()
    kw = {"include_background": True, "reduction": "none"}
    reference = {
        "dice": DiceMetric(**kw)(p, y)[0],
        "hd95_mm": HausdorffDistanceMetric(percentile=95, **kw)(p, y, spacing=spacing)[0],
        "asd_mm": SurfaceDistanceMetric(symmetric=True, **kw)(p, y, spacing=spacing)[0],
        "nsd": SurfaceDiceMetric(class_thresholds=[1.5, 1.5], **kw)(p, y, spacing=spacing)[0],
    }
    for k, row in enumerate(rows):
        for metric in METRIC_NAMES:
            assert row[metric] == pytest.approx(float(reference[metric][k]), rel=1e-5), (row["class"], metric)


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
    assert set(rows[0]) == {"class", *METRIC_NAMES, "empty_in"}
    assert rows[0]["dice"] == 1.0 and rows[0]["hd95_mm"] == 0.0 and rows[0]["nsd"] == 1.0
    assert rows[0]["empty_in"] == "none"
    assert rows[1]["dice"] == 0.0 and rows[1]["hd95_mm"] == 373.13 and rows[1]["empty_in"] == "prediction"
    assert rows[2] == {"class": "c", "dice": 1.0, "hd95_mm": 0.0, "asd_mm": 0.0, "nsd": 1.0,
                       "empty_in": "both"}


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


# --------------------------------------------------------------------------- label maps: 2D cases, ignore label


def _reference_scores(pred: np.ndarray, gt: np.ndarray, spacing, tol: float) -> dict:
    """HD95, ASD and NSD from erosion boundaries and scipy's EDT in the arrays' own dimension (independent of MONAI)."""
    d_pg, d_gp = _reference_distances(pred, gt, spacing)
    both = np.concatenate([d_pg, d_gp])
    return {"hd95_mm": max(np.percentile(d_pg, 95), np.percentile(d_gp, 95)), "asd_mm": both.mean(),
            "nsd": (both <= tol).mean()}


def _ellipses() -> tuple[np.ndarray, np.ndarray]:
    """Two overlapping 2D ellipses on a 40 x 36 grid: a label and a smaller, shifted prediction."""
    y, x = np.mgrid[:40, :36]
    gt = ((y - 20) / 12.0) ** 2 + ((x - 18) / 9.0) ** 2 <= 1
    pred = ((y - 22) / 10.0) ** 2 + ((x - 17) / 9.5) ** 2 <= 1
    return pred, gt


@pytest.mark.parametrize("layout", ["2d", "xy1", "x1z"])
def test_single_slice_and_2d_label_maps_get_2d_boundaries(layout):
    pred, gt = _ellipses()
    spacing2d = (0.7, 1.3)
    want = _reference_scores(pred, gt, spacing2d, tol=1.0)  # boundaries by 2D erosion, distances in the plane
    if layout == "2d":
        p, y, spacing = pred, gt, spacing2d
    elif layout == "xy1":  # a 2D dataset stored as (X, Y, 1) NIfTI
        p, y, spacing = pred[..., None], gt[..., None], (*spacing2d, 5.0)
    else:  # a single slice along another axis
        p, y, spacing = pred[:, None, :], gt[:, None, :], (0.7, 5.0, 1.3)
    row = label_map_metrics(p.astype(np.uint8), y.astype(np.uint8), (("fg", (1,)),), spacing, 1.0)[0]
    assert row["dim"] == 2
    for metric, value in want.items():
        assert row[metric] == pytest.approx(value, rel=1e-6), metric
    # What 3D erosion gave: every foreground voxel a boundary voxel, so a different (wrong) set of distances.
    flat = case_metrics(pred[None, ..., None], gt[None, ..., None], (*spacing2d, 5.0), ["fg"], 1.0,
                        include_background=True)[0]
    assert flat["asd_mm"] < 0.5 * want["asd_mm"]


def test_3d_label_maps_stay_3d():
    gt, pred = _plates((14, 14, 14), thickness=2, shift=1, axis=0)
    row = label_map_metrics(pred.astype(np.uint8), gt.astype(np.uint8), (("fg", (1,)),), (2.5, 0.8, 0.8), 2.4)[0]
    assert row["dim"] == 3 and row["hd95_mm"] == pytest.approx(2.5) and row["nsd"] == pytest.approx(0.5)


def test_ignored_voxels_count_in_no_metric():
    """nnU-Net's rule: voxels where the label holds the ignore label are in neither mask."""
    label = np.zeros((24, 24, 10), np.uint8)
    label[4:12, 5:13, 2:7] = 1
    label[14:, :, :] = 2  # unannotated: the ignore label
    pred = (label == 1).astype(np.uint8)
    pred[16:22, 3:20, 1:8] = 1  # "organ" predicted where nothing was annotated
    classes = (("organ", (1,)),)
    row = label_map_metrics(pred, label, classes, (1.0, 1.0, 2.0), 1.0, ignore_label=2)[0]
    assert (row["dice"], row["hd95_mm"], row["asd_mm"], row["nsd"]) == (1.0, 0.0, 0.0, 1.0)
    assert label_map_metrics(pred, label, classes, (1.0, 1.0, 2.0), 1.0)[0]["dice"] < 0.6  # without the rule
    # An imperfect prediction: Dice counted on the annotated voxels only, as nnU-Net counts tp, fp, fn.
    pred[4:6, 5:13, 2:7] = 0
    pred[12:14, 5:13, 2:7] = 1
    counted = label != 2
    p, y = (pred == 1) & counted, label == 1
    tp, fp, fn = (p & y).sum(), (p & ~y).sum(), (~p & y).sum()
    row = label_map_metrics(pred, label, classes, (1.0, 1.0, 2.0), 1.0, ignore_label=2)[0]
    assert row["dice"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    ref = _reference_scores(p, y, (1.0, 1.0, 2.0), 1.0)
    assert row["hd95_mm"] == pytest.approx(ref["hd95_mm"]) and row["asd_mm"] == pytest.approx(ref["asd_mm"])
    with pytest.raises(ValueError, match="ignore label 2 is one of the scored classes"):
        label_map_metrics(pred, label, (("organ", (1, 2)),), (1.0, 1.0, 2.0), ignore_label=2)

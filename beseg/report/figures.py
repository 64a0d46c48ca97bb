"""The report's PNG figures, drawn with matplotlib's Agg canvas (no display, no global pyplot state).

* :func:`filter_figure`: the paper's Figure 1 (a-c) from a real label: a 1D profile of the mask and
  of its filtered version, and a 2D slice of each (:func:`beseg.log_filter`).
* :func:`contour_figure`: the paper's Figure 1 (d): ground-truth and predicted contours on image slices.
* :func:`learning_curve_figure`: training loss and validation Dice against the step, per system.
* :func:`paired_difference_figure`: one dot per case, its difference to the baseline, and the interval.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import matplotlib
import torch
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from scipy import ndimage

from beseg.data.nifti import read_array
from beseg.losses import log_filter
from beseg.report.collect import Results

__all__ = ["OverlayCase", "PairedPanel", "filter_figure", "contour_figure", "learning_curve_figure",
           "paired_difference_figure", "CONTOUR_COLORS"]

#: Contour colours of the overlays, chosen to stay distinct on a grey image and for red-green blindness.
CONTOUR_COLORS = ("#00e000", "#ff3030", "#30b0ff", "#ffd000", "#ff60ff")
_DPI = 110


@dataclass(frozen=True)
class OverlayCase:
    """One row of the contour figure.

    Attributes:
        title: row title (case id and why it was chosen).
        image: image path (3D, or 4D channel-last: the first channel is shown); None draws the
            contours on a black background.
        label: ground-truth label map path.
        predictions: ``{legend name: predicted label map path}``, drawn in this order.
    """

    title: str
    image: Path | None
    label: Path
    predictions: Mapping[str, Path]


def _load(path: Path) -> tuple[np.ndarray, tuple[float, ...]]:
    """Array and voxel size (mm) of a NIfTI file; 4D channel-last images keep only channel 0."""
    data, header = read_array(path, allow_2d=True)  # the voxel size from the affine, in mm (as scoring uses)
    if data.ndim == 4:
        data = data[..., 0]
    return np.asarray(data), header.spacing


def _bbox(mask: np.ndarray, margin: Sequence[int]) -> tuple[slice, ...]:
    """Bounding box of ``mask`` grown by ``margin`` voxels per axis, clipped to the array."""
    idx = np.nonzero(mask)
    return tuple(slice(max(int(i.min()) - m, 0), min(int(i.max()) + m + 1, s))
                 for i, m, s in zip(idx, margin, mask.shape))


def _save(fig: Figure, out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=_DPI, bbox_inches="tight")
    return out


def filter_figure(label_path: str | Path, out: str | Path, smoothing_passes: int = 3) -> Path:
    """Draw Figure 1 (a-c): the BE filter's response to a real foreground mask.

    The foreground (label > 0) is cropped to its bounding box plus 10 mm and resampled to 1 mm
    voxels (nearest neighbour), as the paper resamples its data before training, so the filter's
    voxel-unit stencil spans the same millimetres on every axis.

    Args:
        label_path: label map (NIfTI) with some foreground.
        out: PNG path to write.
        smoothing_passes: box filters before the Laplacian (the paper: 3).

    Returns:
        ``out``.

    Raises:
        ValueError: the label has no foreground.
    """
    label, spacing = _load(Path(label_path))
    mask = label > 0
    if not mask.any():
        raise ValueError(f"{label_path}: no foreground to draw")
    crop = mask[_bbox(mask, [int(np.ceil(10 / s)) for s in spacing])]
    iso = ndimage.zoom(crop.astype(np.float32), spacing, order=0)
    filtered = log_filter(torch.from_numpy(iso)[None, None], smoothing_passes=smoothing_passes)[0, 0].numpy()

    z = int(np.argmax(iso.sum(axis=(0, 1))))  # the axial slice with the most foreground
    row = int(round(float(np.nonzero(iso[:, :, z])[1].mean())))  # profile through the slice's centroid
    m2, f2 = iso[:, :, z], filtered[:, :, z]

    fig = Figure(figsize=(13, 4.0), layout="constrained")
    ax_a, ax_b, ax_c = fig.subplots(1, 3, gridspec_kw={"width_ratios": [1.4, 1, 1.15]})
    x = np.arange(m2.shape[0])
    ax_a.step(x, m2[:, row], where="mid", color="black", label="mask")
    ax_a.set_xlabel("position along the profile (mm)")
    ax_a.set_ylabel("mask")
    ax_a.set_ylim(-0.1, 1.1)
    ax_f = ax_a.twinx()
    ax_f.plot(x, f2[:, row], color="#d62728", label="filtered")
    ax_f.axhline(0, color="#d62728", lw=0.5, ls=":")
    ax_f.set_ylabel("filtered mask", color="#d62728")
    ax_a.legend(handles=[Line2D([], [], color="black", label="mask"),
                         Line2D([], [], color="#d62728", label="filtered")], loc="upper right", fontsize=8)
    ax_a.set_title("(a) 1D profile")
    ax_b.imshow(m2.T, cmap="gray", origin="lower", interpolation="nearest")
    ax_b.set_title("(b) mask, axial slice")
    vmax = float(np.abs(f2).max()) or 1.0
    im = ax_c.imshow(f2.T, cmap="RdBu_r", vmin=-vmax, vmax=vmax, origin="lower", interpolation="nearest")
    ax_c.set_title("(c) filtered mask")
    fig.colorbar(im, ax=ax_c, fraction=0.046, pad=0.04)
    for ax in (ax_b, ax_c):
        ax.axhline(row, color="#ffb000", lw=1, ls="--")
        ax.set_xlabel("mm")
        ax.set_ylabel("mm")
    return _save(fig, Path(out))


def _contours(ax, mask_map: np.ndarray, color: str, width: float) -> None:
    """Outline every non-zero label value of a 2D label map."""
    for value in np.unique(mask_map):
        if value != 0 and (mask_map == value).any():
            ax.contour((mask_map == value).T.astype(float), levels=[0.5], colors=[color], linewidths=width)


def contour_figure(cases: Sequence[OverlayCase], out: str | Path) -> Path:
    """Draw Figure 1 (d): ground truth and each prediction outlined on one axial slice per case.

    The slice is the one with the most ground-truth foreground; the view is cropped to the
    foreground of all masks plus 15 voxels. Aspect follows the voxel size (the label's).

    Args:
        cases: the rows to draw; prediction arrays must have the label's shape, and so must the
            image where one is given.
        out: PNG path to write.

    Returns:
        ``out``.

    Raises:
        ValueError: no case, or a prediction's or image's shape differs from its label's.
    """
    if not cases:
        raise ValueError("no case to draw")
    fig = Figure(figsize=(4.2 * len(cases), 5.2), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(cases)))
    names = ["ground truth", *cases[0].predictions]
    for ax, case in zip(axes, cases):
        label, spacing = _load(case.label)
        image = _load(case.image)[0] if case.image is not None else np.zeros(label.shape, np.float32)
        if image.shape != label.shape:
            raise ValueError(f"{case.image}: shape {image.shape} differs from the label's {label.shape}")
        preds = {}
        for name, path in case.predictions.items():
            preds[name] = _load(path)[0]
            if preds[name].shape != label.shape:
                raise ValueError(f"{path}: shape {preds[name].shape} differs from the label's {label.shape}")
        fg = (label > 0).sum(axis=(0, 1))
        z = int(np.argmax(fg)) if fg.any() else label.shape[2] // 2
        union = np.zeros(label.shape[:2], bool)
        for m in [label, *preds.values()]:
            union |= m[:, :, z] > 0
        box = _bbox(union, (15, 15)) if union.any() else (slice(None), slice(None))
        img = image[:, :, z][box].astype(float)
        lo, hi = np.percentile(img, [1, 99])
        ax.imshow(img.T, cmap="gray", vmin=lo, vmax=max(hi, lo + 1e-6), origin="lower", aspect=spacing[1] / spacing[0])
        # Ground truth first and wider, so it stays visible where a prediction follows it exactly.
        for color, width, m in zip(CONTOUR_COLORS, [3.5] + [1.4] * len(preds), [label, *preds.values()]):
            _contours(ax, m[:, :, z][box], color, width)
        ax.set_title(f"{case.title}\nslice {z}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    handles = [Line2D([], [], color=c, lw=2, label=n) for c, n in zip(CONTOUR_COLORS, names)]
    fig.legend(handles=handles, loc="outside lower center", ncol=len(names), frameon=False)
    return _save(fig, Path(out))


def _smooth(y: np.ndarray, width: int) -> np.ndarray:
    """Moving average (valid part) so that a noisy per-step loss shows its trend."""
    return np.convolve(y, np.ones(width) / width, mode="valid")


def learning_curve_figure(results: Results, out: str | Path) -> Path:
    """Training loss and validation mean Dice against the training step, one colour per system.

    Each seed is its own line; the training loss is a moving average over 1/20 of the steps.

    Args:
        results: the collected runs (their ``metrics.jsonl`` entries).
        out: PNG path to write.

    Returns:
        ``out``.
    """
    fig = Figure(figsize=(12, 4.4), layout="constrained")
    ax_l, ax_v = fig.subplots(1, 2)
    cycle = [c["color"] for c in matplotlib.rcParams["axes.prop_cycle"]]
    handles = []
    for i, system in enumerate(results.systems):
        color = cycle[i % len(cycle)]
        for run in results.runs_of(system):
            tr = [(e["step"], e["loss"]) for e in run.train if isinstance(e.get("loss"), (int, float)) and "step" in e]
            if tr:
                steps, losses = map(np.asarray, zip(*tr))
                w = max(1, len(losses) // 20)
                ax_l.plot(steps[w - 1:], _smooth(losses, w), color=color, lw=1, alpha=0.8)
            va = [(e["step"], e["dice_mean"]) for e in run.val
                  if isinstance(e.get("dice_mean"), (int, float)) and "step" in e]
            if va:
                ax_v.plot(*zip(*va), color=color, marker="o", ms=3, lw=1, alpha=0.8)
        handles.append(Line2D([], [], color=color, lw=2, label=system))
    ax_l.set_title("training loss (moving average)")
    ax_l.set_xlabel("step")
    ax_l.set_ylabel("loss")
    ax_v.set_title("validation mean Dice")
    ax_v.set_xlabel("step")
    ax_v.set_ylabel("Dice")
    for ax in (ax_l, ax_v):
        ax.grid(alpha=0.3)
        if not ax.lines:
            ax.text(0.5, 0.5, "no entries in metrics.jsonl", ha="center", va="center", transform=ax.transAxes)
    fig.legend(handles=handles, loc="outside lower center", ncol=max(1, len(handles)), frameon=False)
    return _save(fig, Path(out))


@dataclass(frozen=True)
class PairedPanel:
    """One row of the paired-difference figure: a system against the baseline on one class.

    Attributes:
        label: row label (``system`` or ``system, class``).
        differences: ``{case: system - baseline}`` in the metric's unit.
        mean: mean difference; ``ci``: its 95% interval (NaN ends when undefined).
    """

    label: str
    differences: Mapping[str, float]
    mean: float
    ci: tuple[float, float]


def paired_difference_figure(panels: Sequence[PairedPanel], metric_label: str, out: str | Path,
                             n_named: int = 2) -> Path:
    """Per-case differences to the baseline: one dot per case, the mean and its interval per row.

    The cases that moved most in each direction are named, so a reader sees which cases changed.

    Args:
        panels: one row each, drawn top to bottom.
        metric_label: the x axis, e.g. ``"Dice difference (system − segresnet_dice)"``.
        out: PNG path to write.
        n_named: how many of the largest gains and losses per row are labelled with their case id.

    Returns:
        ``out``.
    """
    fig = Figure(figsize=(8, 0.9 + 0.75 * max(1, len(panels))), layout="constrained")
    ax = fig.subplots()
    rng = np.random.default_rng(0)  # vertical jitter only, so that equal differences stay visible
    for row, panel in enumerate(panels):
        y = len(panels) - 1 - row
        cases = list(panel.differences)
        x = np.array([panel.differences[c] for c in cases], dtype=float)
        ax.scatter(x, y + rng.uniform(-0.18, 0.18, len(x)), s=14, color="#3070b0", alpha=0.75, zorder=3)
        lo, hi = panel.ci
        if np.isfinite(lo) and np.isfinite(hi):
            ax.plot([lo, hi], [y - 0.32, y - 0.32], color="black", lw=2.5, solid_capstyle="butt", zorder=4)
        if np.isfinite(panel.mean):
            ax.plot([panel.mean], [y - 0.32], marker="|", ms=14, mew=2.5, color="#d03030", zorder=5)
        order = np.argsort(x)
        named = list(dict.fromkeys([*order[:n_named], *order[::-1][:n_named]]))
        for k, i in enumerate(sorted(named, key=lambda i: x[i])):  # staggered so that close labels stay legible
            if x[i] != 0:
                ax.annotate(cases[i], (x[i], y + 0.15), xytext=(0, 2 + 9 * (k % 2)), textcoords="offset points",
                            fontsize=7, ha="center", va="bottom", color="#444444")
    ax.axvline(0.0, color="grey", lw=1, ls="--", zorder=1)
    ax.set_yticks(range(len(panels)), [p.label for p in reversed(panels)])
    ax.set_ylim(-0.7, len(panels) - 0.3)
    ax.set_xlabel(metric_label)
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, Path(out))

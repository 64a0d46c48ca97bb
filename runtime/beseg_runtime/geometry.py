"""Reorientation and resampling in numpy/scipy, with the grid rules of MONAI's Orientation and Spacing.

Forward: the image is reordered to the target axis codes (exact: transposes and flips), then
resampled linearly (values outside the input repeat its border) onto a grid with the target
spacing that keeps the image's direction cosines. The new grid's shape is the extent of the
input's voxel centres in the new voxel units plus one, rounded, and its origin is the input's
"smallest" corner (the grid is centred on the input when no corner is smallest). An axis already
within 1e-3 mm of the target spacing keeps its spacing. Inverse: nearest-neighbour lookup from the
label grid back to the input grid, then the inverse reordering. An input voxel halfway between two
model voxels (every other slice of a 2.5 mm scan on a 1 mm grid) takes the even one: coordinates
are rounded to :data:`TIE_DECIMALS` decimals first, so that float noise in the affines (float32
headers, a grid computed by MONAI or by this module) never decides it. ``beseg predict``,
``beseg evaluate`` and ``beseg-predict`` all map labels back with :func:`to_input_grid`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import nibabel as nib
import numpy as np
from scipy import ndimage

__all__ = ["Grid", "grid_of", "to_model_grid", "to_input_grid"]

AFFINE_TOL = 1e-3
#: Model-grid coordinates are rounded to this many decimals (voxels) before the nearest voxel is taken.
TIE_DECIMALS = 4


@dataclass(frozen=True)
class Grid:
    """How an input image was moved onto the model's grid, to move a label map back.

    Attributes:
        input_shape: spatial shape of the input image (voxels).
        ornt: nibabel orientation transform from the input axes to the target axis codes.
        oriented_affine: 4x4 affine of the reoriented input (mm).
        oriented_shape: its spatial shape.
        model_affine: 4x4 affine of the resampled grid (mm).
        model_shape: its spatial shape.
    """

    input_shape: tuple[int, int, int]
    ornt: np.ndarray
    oriented_affine: np.ndarray
    oriented_shape: tuple[int, int, int]
    model_affine: np.ndarray
    model_shape: tuple[int, int, int]


def _target_affine(affine: np.ndarray, shape: Sequence[int], spacing: Sequence[float]) -> tuple[np.ndarray, tuple[int, ...]]:
    """Affine and shape of the grid with ``spacing`` (mm) covering ``shape`` voxels of ``affine``."""
    rzs = affine[:3, :3]
    current = np.sqrt((rzs**2).sum(axis=0))
    spacing = np.where(np.abs(current - np.asarray(spacing, float)) <= AFFINE_TOL, current, np.asarray(spacing, float))
    zs = np.linalg.cholesky(rzs.T @ rzs).T  # rzs = rotation @ zs, zs upper triangular
    rotation = rzs @ np.linalg.inv(zs)
    new = np.eye(4)
    new[:3, :3] = rotation @ np.diag(np.sign(np.diag(zs)) * spacing)
    corners = np.array(np.meshgrid(*[(0.0, n - 1.0) for n in shape], indexing="ij")).reshape(3, -1)
    corners = np.vstack([corners, np.ones((1, corners.shape[1]))])
    in_new = np.linalg.solve(new, affine) @ corners
    world = affine @ corners
    out_shape = np.round(np.ptp(in_new[:3], axis=1) + 1.0)
    offset = None
    for i in range(corners.shape[1]):
        if np.allclose(np.min(in_new[:3] - in_new[:3, i:i + 1], axis=1), 0.0, rtol=AFFINE_TOL):
            offset = world[:3, i]
            break
    if offset is None:  # no corner is smallest along every axis: centre the new grid on the input
        offset = rzs @ (np.asarray(shape, float) / 2.0) + affine[:3, 3] - new[:3, :3] @ (out_shape / 2.0)
    new[:3, 3] = offset
    return new, tuple(int(n) for n in out_shape)


def to_model_grid(image: np.ndarray, affine: np.ndarray, axcodes: str, spacing: Sequence[float]) -> tuple[np.ndarray, Grid]:
    """Reorient ``image`` to ``axcodes`` and resample it linearly to ``spacing``.

    Args:
        image: (C, X, Y, Z) float32 voxels.
        affine: the image's 4x4 voxel-to-world matrix (mm).
        axcodes: target orientation, e.g. ``"RAS"``.
        spacing: target voxel size (mm).

    Returns:
        ``(resampled, grid)``: (C, X', Y', Z') float32 voxels and the :class:`Grid` for the way back.
    """
    shape = tuple(int(n) for n in image.shape[1:])
    ornt, oriented_affine, oriented_shape = _orient(affine, shape, axcodes)
    oriented = np.stack([nib.orientations.apply_orientation(c, ornt) for c in image])
    model_affine, model_shape = _target_affine(oriented_affine, oriented_shape, spacing)
    xform = np.linalg.solve(oriented_affine, model_affine)  # model voxel -> oriented input voxel
    if np.allclose(xform, np.eye(4), atol=AFFINE_TOL) and model_shape == oriented_shape:
        resampled = oriented.astype(np.float32)
    else:
        resampled = np.stack([
            ndimage.affine_transform(c.astype(np.float64), xform[:3, :3], xform[:3, 3], output_shape=model_shape,
                                     order=1, mode="nearest").astype(np.float32)
            for c in oriented
        ])
    return resampled, Grid(shape, ornt, oriented_affine, oriented_shape, model_affine, model_shape)  # type: ignore[arg-type]


def grid_of(input_affine: np.ndarray, input_shape: Sequence[int], axcodes: str, model_affine: np.ndarray,
            model_shape: Sequence[int]) -> Grid:
    """The :class:`Grid` of an image that was reoriented to ``axcodes`` and resampled elsewhere (MONAI's
    Orientation and Spacing, e.g. into beseg's preprocessed store), to map a label map back with
    :func:`to_input_grid`.

    Args:
        input_affine: 4x4 affine of the original image (mm).
        input_shape: its spatial shape (voxels).
        axcodes: the orientation it was reoriented to, e.g. ``"RAS"``.
        model_affine: 4x4 affine of the resampled grid (mm).
        model_shape: its spatial shape (voxels).
    """
    shape = tuple(int(n) for n in input_shape)
    ornt, oriented_affine, oriented_shape = _orient(np.asarray(input_affine, float), shape, axcodes)
    return Grid(shape, ornt, oriented_affine, oriented_shape, np.asarray(model_affine, float),  # type: ignore[arg-type]
                tuple(int(n) for n in model_shape))  # type: ignore[arg-type]


def _orient(affine: np.ndarray, shape: tuple[int, ...], axcodes: str) -> tuple[np.ndarray, np.ndarray, tuple[int, ...]]:
    """``(ornt, oriented affine, oriented shape)`` of reordering an image of ``shape`` voxels to ``axcodes``."""
    ornt = nib.orientations.ornt_transform(nib.io_orientation(affine), nib.orientations.axcodes2ornt(axcodes))
    oriented_shape = [0] * len(shape)
    for axis, (target, _) in enumerate(ornt):  # input axis ``axis`` becomes axis ``target``
        oriented_shape[int(target)] = shape[axis]
    return ornt, affine @ nib.orientations.inv_ornt_aff(ornt, shape), tuple(oriented_shape)


def to_input_grid(labels: np.ndarray, grid: Grid) -> np.ndarray:
    """Nearest-neighbour map of a (X', Y', Z') label map on the model grid back to the input's voxel grid."""
    xform = np.linalg.solve(grid.model_affine, grid.oriented_affine)  # oriented input voxel -> model voxel
    if np.allclose(xform, np.eye(4), atol=AFFINE_TOL) and grid.model_shape == grid.oriented_shape:
        oriented = labels
    else:
        oriented = np.empty(grid.oriented_shape, dtype=labels.dtype)
        j, k = np.meshgrid(np.arange(grid.oriented_shape[1]), np.arange(grid.oriented_shape[2]), indexing="ij")
        for i in range(grid.oriented_shape[0]):  # one slab at a time: coordinates of a whole volume are large
            points = np.stack([np.full(j.shape, i, float), j, k, np.ones(j.shape)]).reshape(4, -1)
            src = np.rint(np.round(xform[:3] @ points, TIE_DECIMALS)).astype(np.int64)
            for axis in range(3):
                np.clip(src[axis], 0, grid.model_shape[axis] - 1, out=src[axis])
            oriented[i] = labels[src[0], src[1], src[2]].reshape(j.shape)
    return np.ascontiguousarray(nib.orientations.apply_orientation(oriented, _inverse_ornt(grid.ornt)))


def _inverse_ornt(ornt: np.ndarray) -> np.ndarray:
    """The orientation transform undoing ``ornt`` (nibabel: axis i goes to ornt[i, 0], flipped if -1)."""
    inverse = np.zeros_like(ornt)
    for axis, (target, flip) in enumerate(ornt):
        inverse[int(target)] = (axis, flip)
    return inverse

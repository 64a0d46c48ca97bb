"""Reading and writing single NIfTI files, with every failure turned into a :class:`DataError`.

nibabel raises a zoo of exceptions for bad files (``ImageFileError``, ``EOFError``, ``zlib.error``,
``OSError``, ``ValueError`` ...); callers of this module only ever see ``DataError`` naming the file.

Geometry comes from one place, :func:`read_header`: the voxel-to-world matrix is the one nibabel
resolves (``img.affine``: the sform, else the qform, else pixdim alone), converted to mm from the
header's length unit (``xyzt_units``: metres and micrometres are scaled; mm and "unknown" are taken
as mm, as ITK and nnU-Net do), and the voxel size is the length of its columns, so an oblique or
sheared grid and a header whose ``pixdim`` disagrees with its sform both give the spacing of the
grid the affine describes. A ``pixdim`` that disagrees with the affine is warned about.

The input checks of ``beseg evaluate``, ``beseg score`` and ``beseg predict`` are here too, so
the three commands accept and refuse the same files with the same messages:
:func:`read_label_map` (an integer label map), :func:`check_same_grid` (a prediction or label on
its reference's grid: same shape, affines equal within :data:`AFFINE_TOL_MM`) and
:func:`read_image_header` (an image with the expected channels).
"""

from __future__ import annotations

import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from beseg.errors import DataError

__all__ = [
    "AFFINE_TOL_MM", "PIXDIM_RTOL", "NiftiHeader", "read_header", "read_array", "write_nifti", "read_label_map",
    "check_same_grid", "read_image_header",
]

#: Largest difference between two affines' entries (mm) for which they are the same grid.
AFFINE_TOL_MM: float = 1e-3

#: Relative difference between ``pixdim`` and the affine's voxel size above which a file is warned about.
PIXDIM_RTOL: float = 1e-3

#: mm per NIfTI length unit (nibabel's names of ``xyzt_units``); "unknown" is taken as mm.
_MM_PER_UNIT = {"meter": 1000.0, "mm": 1.0, "micron": 1e-3, "unknown": 1.0}

_READ_ERRORS = (nib.filebasedimages.ImageFileError, EOFError, zlib.error, OSError, ValueError, MemoryError)


@dataclass(frozen=True)
class NiftiHeader:
    """Geometry of one NIfTI file, read without loading the voxel data.

    Attributes:
        path: the file.
        shape: the full array shape, e.g. ``(X, Y, Z)`` or ``(X, Y, Z, C)`` (voxels); ``(X, Y)``
            for a 2D file read with ``allow_2d``.
        affine: the 4x4 voxel-to-world (RAS+) matrix, in mm (the file's length unit converted).
        spacing: voxel size along the first three voxel axes (mm): the lengths of the affine's
            first three columns.
        dtype: the on-disk data type.
    """

    path: Path
    shape: tuple[int, ...]
    affine: np.ndarray
    spacing: tuple[float, float, float]
    dtype: np.dtype

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        """The first three dimensions (voxels)."""
        return self.shape[:3]

    @property
    def channels(self) -> int:
        """Number of channels: the 4th dimension of a 4D file (MSD Task01 layout), else 1."""
        return int(self.shape[3]) if len(self.shape) == 4 else 1


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


def _load(path: Path) -> nib.Nifti1Image:
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: file is empty")
    try:
        img = nib.load(str(path))
    except _READ_ERRORS as err:
        raise DataError(f"{path}: not a readable NIfTI file ({type(err).__name__}: {_one_line(err)})") from err
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise DataError(f"{path}: not a NIfTI image (nibabel read it as {type(img).__name__})")
    return img


def _geometry(img: nib.Nifti1Image, path: Path, n_spatial: int) -> tuple[np.ndarray, tuple[float, float, float]]:
    """The affine in mm and the voxel size (mm) it implies; warns when ``pixdim`` disagrees with it."""
    unit = img.header.get_xyzt_units()[0]
    factor = _MM_PER_UNIT.get(unit, 1.0)
    affine = np.asarray(img.affine, dtype=np.float64).copy()
    # Only the length rows scale; the last row stays (0, 0, 0, 1).
    affine[:3, :] *= factor
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    zooms = np.asarray(img.header.get_zooms()[:n_spatial], dtype=np.float64) * factor
    tol = PIXDIM_RTOL * np.maximum(spacing[:n_spatial], 1e-12)
    if not np.all(np.abs(zooms - spacing[:n_spatial]) <= tol):
        warnings.warn(
            f"{path}: pixdim says {' x '.join(f'{z:g}' for z in zooms)} mm but the affine "
            f"({'sform' if int(img.header['sform_code']) > 0 else 'qform'}) gives voxels of "
            f"{' x '.join(f'{s:g}' for s in spacing[:n_spatial])} mm; using the affine's.",
            UserWarning, stacklevel=3,
        )
    return affine, (float(spacing[0]), float(spacing[1]), float(spacing[2]))


def read_header(path: str | Path, allow_2d: bool = False) -> NiftiHeader:
    """Read the geometry of a NIfTI file (see the module docstring for where it comes from).

    Args:
        path: a ``.nii`` or ``.nii.gz`` file.
        allow_2d: accept a 2D file ``(X, Y)`` too (a 2D label map); images are 3D or 4D.

    Returns:
        The file's :class:`NiftiHeader`, affine and spacing in mm.

    Raises:
        DataError: the file is missing, empty, not NIfTI, or has a zero-size or non-3D/4D shape
            (non-2D/3D/4D with ``allow_2d``).

    Warns:
        UserWarning: the header's ``pixdim`` disagrees with the affine's voxel size by more than
            :data:`PIXDIM_RTOL` (relative); the message names the file.
    """
    path = Path(path)
    img = _load(path)
    shape = tuple(int(s) for s in img.shape)
    if len(shape) not in ((2, 3, 4) if allow_2d else (3, 4)):
        raise DataError(f"{path}: expected a {'2D, ' if allow_2d else ''}3D or 4D image, got {len(shape)}D with "
                        f"shape {shape}")
    if 0 in shape:
        raise DataError(f"{path}: zero-size dimension in shape {shape}")
    affine, spacing = _geometry(img, path, min(len(shape), 3))
    return NiftiHeader(path, shape, affine, spacing, np.dtype(img.get_data_dtype()))


def read_array(path: str | Path, allow_2d: bool = False) -> tuple[np.ndarray, NiftiHeader]:
    """Read a NIfTI file's voxels in their stored dtype (scaling applied when the header asks for it).

    Args:
        path: a ``.nii`` or ``.nii.gz`` file.
        allow_2d: as in :func:`read_header`.

    Returns:
        ``(array, header)``; ``array`` has the file's shape, ``(X, Y, Z)`` or ``(X, Y, Z, C)``.

    Raises:
        DataError: as :func:`read_header`, or the data is truncated/corrupt.
    """
    header = read_header(path, allow_2d)
    img = _load(header.path)
    try:
        array = np.asanyarray(img.dataobj)
    except _READ_ERRORS as err:
        raise DataError(f"{header.path}: cannot read voxel data, the file is truncated or corrupt "
                        f"({type(err).__name__}: {_one_line(err)})") from err
    return array, header


def write_nifti(path: str | Path, array: np.ndarray, affine: np.ndarray) -> None:
    """Write ``array`` to ``path`` (``.nii.gz``) with ``affine`` as both qform and sform.

    Args:
        path: output file; parent folders must exist.
        array: ``(X, Y, Z)`` or ``(X, Y, Z, C)`` voxels; the dtype is kept.
        affine: 4x4 voxel-to-world matrix (mm).
    """
    img = nib.Nifti1Image(array, affine)
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, str(path))


# --------------------------------------------------------------------------- the shared input checks


def read_label_map(path: str | Path, what: str = "label") -> tuple[np.ndarray, NiftiHeader]:
    """An integer label map: a 3D file, or a 2D one (a 2D dataset), and its header.

    Args:
        path: a ``.nii`` or ``.nii.gz`` label map.
        what: what the file is (``"label"``, ``"prediction"``), for the messages.

    Returns:
        ``(labels, header)``: the voxels as stored when they are integers (or bool), else rounded
        exactly to int32; ``(X, Y, Z)`` or ``(X, Y)``.

    Raises:
        DataError: the file is unreadable, not 2D or 3D, or holds NaN/Inf or non-integer values
            (probabilities); the message names the file.
    """
    array, header = read_array(path, allow_2d=True)
    if array.ndim not in (2, 3):
        raise DataError(f"{header.path}: a {what} must be a 2D or 3D label map, got shape {tuple(array.shape)}.")
    if array.dtype.kind in "iub":
        return np.asarray(array), header
    array = np.asarray(array)
    if not np.isfinite(array).all():
        raise DataError(f"{header.path}: {what} holds NaN or Inf values.")
    rounded = np.rint(array)
    if not np.array_equal(rounded, array):
        raise DataError(f"{header.path}: {what} holds non-integer values (probabilities?); give label maps.")
    return rounded.astype(np.int32), header


def check_same_grid(header: NiftiHeader, reference: NiftiHeader, affine_tol_mm: float = AFFINE_TOL_MM,
                    what: str = "prediction", reference_what: str = "label") -> None:
    """Check that ``header`` describes the same voxel grid as ``reference``.

    Args:
        header: the file checked (a prediction, or a label against its image).
        reference: the file it must fit.
        affine_tol_mm: largest allowed difference between the affines' entries (mm).
        what, reference_what: what the two files are, for the message.

    Raises:
        DataError: the spatial shapes differ, or an affine entry differs by more than
            ``affine_tol_mm``; the message names both files.
    """
    if header.spatial_shape != reference.spatial_shape:
        raise DataError(f"{header.path}: {what} has shape {header.spatial_shape}, its {reference_what} "
                        f"{reference.path} {reference.spatial_shape}; they must be on the same grid.")
    gap = float(np.abs(header.affine - reference.affine).max())
    if not gap <= affine_tol_mm:
        raise DataError(f"{header.path}: {what} and its {reference_what} {reference.path} have different affines "
                        f"(largest difference {gap:.3g} mm, tolerance {affine_tol_mm:g} mm); they must be on the "
                        "same grid.")


def read_image_header(path: str | Path, channels: int, task: str = "the task") -> NiftiHeader:
    """The header of an image to segment: 3D, or 4D with ``channels`` channels last.

    Raises:
        DataError: unreadable, not 3D/4D, or another number of channels; the message names the file.
    """
    header = read_header(path, allow_2d=True)  # a 2D file gets the same "does not fit" message
    if len(header.shape) not in (3, 4) or header.channels != channels:
        raise DataError(f"{header.path}: shape {header.shape} does not fit {task} ({channels} channel(s), "
                        "3 spatial dimensions).")
    return header

"""Reading and writing single NIfTI files, with every failure turned into a :class:`DataError`.

nibabel raises a zoo of exceptions for bad files (``ImageFileError``, ``EOFError``, ``zlib.error``,
``OSError``, ``ValueError`` ...); callers of this module only ever see ``DataError`` naming the file.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from beseg.errors import DataError

__all__ = ["NiftiHeader", "read_header", "read_array", "write_nifti"]

_READ_ERRORS = (nib.filebasedimages.ImageFileError, EOFError, zlib.error, OSError, ValueError, MemoryError)


@dataclass(frozen=True)
class NiftiHeader:
    """Geometry of one NIfTI file, read without loading the voxel data.

    Attributes:
        path: the file.
        shape: the full array shape, e.g. ``(X, Y, Z)`` or ``(X, Y, Z, C)`` (voxels).
        affine: the 4x4 voxel-to-world (RAS+, mm) matrix.
        spacing: voxel size along the first three axes (mm).
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


def read_header(path: str | Path) -> NiftiHeader:
    """Read the geometry of a NIfTI file.

    Args:
        path: a ``.nii`` or ``.nii.gz`` file.

    Returns:
        The file's :class:`NiftiHeader`.

    Raises:
        DataError: the file is missing, empty, not NIfTI, or has a zero-size or non-3D/4D shape.
    """
    path = Path(path)
    img = _load(path)
    shape = tuple(int(s) for s in img.shape)
    if len(shape) not in (3, 4):
        raise DataError(f"{path}: expected a 3D or 4D image, got {len(shape)}D with shape {shape}")
    if 0 in shape:
        raise DataError(f"{path}: zero-size dimension in shape {shape}")
    zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
    return NiftiHeader(path, shape, np.asarray(img.affine, dtype=np.float64), zooms,
                       np.dtype(img.get_data_dtype()))


def read_array(path: str | Path) -> tuple[np.ndarray, NiftiHeader]:
    """Read a NIfTI file's voxels in their stored dtype (scaling applied when the header asks for it).

    Args:
        path: a ``.nii`` or ``.nii.gz`` file.

    Returns:
        ``(array, header)``; ``array`` has the file's shape, ``(X, Y, Z)`` or ``(X, Y, Z, C)``.

    Raises:
        DataError: as :func:`read_header`, or the data is truncated/corrupt.
    """
    header = read_header(path)
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

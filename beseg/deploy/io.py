"""NIfTI input and output for prediction (numpy and nibabel only)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from beseg.errors import BesegError, DataError
from beseg.fileio import atomic_output

__all__ = ["list_images", "output_name", "read_image", "write_label"]

NIFTI_SUFFIXES = (".nii.gz", ".nii")


def list_images(paths: list[str | Path]) -> list[Path]:
    """Files as given, folders expanded to their NIfTI files (sorted, macOS ``._`` files left out)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out.extend(sorted(f for f in p.iterdir() if f.is_file() and f.name.endswith(NIFTI_SUFFIXES)
                              and not f.name.startswith("._")))
        else:
            out.append(p)
    return out


def output_name(path: str | Path) -> str:
    """``case.nii.gz`` or ``case.nii`` -> ``case.nii.gz`` (the name a label map is written under)."""
    name = Path(path).name
    stem = next((name[: -len(s)] for s in NIFTI_SUFFIXES if name.endswith(s)), name)
    return f"{stem}.nii.gz"


def read_image(path: str | Path, channels: int) -> tuple[np.ndarray, Any]:
    """A NIfTI image as (C, X, Y, Z) float32 voxels, and the nibabel image (for its affine and header).

    Args:
        path: a 3D image, or 4D with the channels last (the MSD layout).
        channels: the number of channels the model expects.

    Raises:
        DataError: unreadable, wrong number of dimensions or channels, or NaN/Inf voxels.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found.")
    try:
        img = nib.load(str(path))
        shape = tuple(int(s) for s in img.shape)
    except Exception as err:  # nibabel raises many types for non-NIfTI input
        raise DataError(f"{path}: not a readable NIfTI image ({type(err).__name__}: {' '.join(str(err).split())}).") from None
    got = shape[3] if len(shape) == 4 else 1
    if len(shape) not in (3, 4) or 0 in shape:
        raise DataError(f"{path}: shape {shape} is not a 3D image or a 4D image with channels last.")
    if got != channels:
        raise DataError(f"{path}: has {got} channel(s) (shape {shape}), the model expects {channels}.")
    try:
        data = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as err:
        raise DataError(f"{path}: cannot read the voxels, the file is truncated or corrupt ({type(err).__name__}).") from None
    data = data[None] if data.ndim == 3 else np.moveaxis(data, -1, 0)
    if not np.isfinite(data).all():
        raise DataError(f"{path}: contains NaN or Inf values.")
    return np.ascontiguousarray(data), img


def write_label(labels: np.ndarray, reference: Any, path: str | Path) -> Path:
    """Write a uint8 label map with ``reference``'s affine and header, atomically (temporary file, rename).

    Raises:
        BesegError: the file cannot be written (e.g. the disk is full); nothing partial is left.
    """
    path = Path(path)
    header = reference.header.copy()
    header.set_data_dtype(np.uint8)
    header.set_data_shape(labels.shape)
    img = nib.Nifti1Image(labels.astype(np.uint8), reference.affine, header=header)
    img.set_qform(reference.affine, code=int(reference.header["qform_code"]) or 1)
    img.set_sform(reference.affine, code=int(reference.header["sform_code"]) or 1)
    try:
        with atomic_output(path, suffix=".tmp.nii.gz") as tmp:  # nibabel picks the format by ending
            nib.save(img, tmp)
    except OSError as err:
        raise BesegError(f"could not write {path}: {err.strerror or err}.") from None
    return path

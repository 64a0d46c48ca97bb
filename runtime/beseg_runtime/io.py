"""NIfTI input and output for prediction (numpy and nibabel only), shared by ``beseg predict`` and ``beseg-predict``.

Inputs: :func:`read_image` reads an image and :func:`check_scan` refuses what cannot be a 3D scan
(an axis of 0 or 1 voxel, a degenerate affine). Outputs: :func:`plan_outputs` maps every input to
``OUT/<name>.nii.gz`` and refuses, before anything runs, an output that would be written over an
input (``--out`` is an input's folder, or a link leads from the output to an input), two inputs
with one output name, and an existing file (unless ``--overwrite``, which replaces only label maps
beseg wrote: :func:`is_beseg_label`). :func:`write_label` writes atomically (temporary file, then
rename) and marks its files as beseg's (NIfTI intent ``label``, intent name ``beseg``).
"""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from beseg_runtime.errors import BesegError, DataError

__all__ = ["LABEL_INTENT_NAME", "OutputError", "check_scan", "is_beseg_label", "list_images", "output_name",
           "plan_outputs", "read_image", "write_label"]

NIFTI_SUFFIXES = (".nii.gz", ".nii")
#: NIfTI ``intent_name`` of the label maps beseg writes (with ``intent_code`` NIFTI_INTENT_LABEL):
#: how ``--overwrite`` tells beseg's own outputs from other files.
LABEL_INTENT_NAME = "beseg"


class OutputError(BesegError):
    """An output would be written over an input, over another input's output, or over a file beseg did not write."""


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


def check_scan(path: str | Path, shape: tuple[int, ...], affine: Any) -> None:
    """Refuse what cannot be a 3D scan: an axis of 0 or 1 voxel, or an affine that maps the voxel
    grid onto less than a 3D volume (zero-length or dependent axes, NaN/Inf).

    Both prediction paths call this, so they refuse the same images with the same messages; any
    other size is predicted (padded where it is smaller than the window).

    Args:
        path: the image, named in the message.
        shape: its shape; the first three entries are the spatial axes (voxels).
        affine: its 4x4 voxel-to-world matrix (mm).

    Raises:
        DataError: naming the file and what is wrong.
    """
    spatial = tuple(int(n) for n in shape[:3])
    for axis, n in enumerate(spatial):
        if n <= 1:
            raise DataError(f"{path}: {n} voxel(s) along axis {axis} (shape {tuple(shape)}); a 3D model needs a 3D "
                            "scan, at least 2 voxels along each axis.")
    matrix = np.asarray(affine, dtype=np.float64)
    if matrix.shape != (4, 4) or not np.isfinite(matrix).all():
        raise DataError(f"{path}: its affine (voxel-to-world matrix) holds NaN or Inf; the header's sform/qform is "
                        "broken.")
    sizes = np.linalg.norm(matrix[:3, :3], axis=0)
    if sizes.min() <= 1e-6 or abs(np.linalg.det(matrix[:3, :3])) <= 1e-6 * float(np.prod(sizes)):
        raise DataError(f"{path}: degenerate affine: voxel axes of {' x '.join(f'{v:.3g}' for v in sizes)} mm that "
                        "do not span 3D space; the header's sform/qform is broken.")


def read_image(path: str | Path, channels: int) -> tuple[np.ndarray, Any]:
    """A NIfTI image as (C, X, Y, Z) float32 voxels, and the nibabel image (for its affine and header).

    Args:
        path: a 3D image, or 4D with the channels last (the MSD layout).
        channels: the number of channels the model expects.

    Raises:
        DataError: unreadable, wrong number of dimensions or channels, not a 3D scan
            (:func:`check_scan`), or NaN/Inf voxels.
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
    check_scan(path, shape, img.affine)
    try:
        data = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as err:
        raise DataError(f"{path}: cannot read the voxels, the file is truncated or corrupt ({type(err).__name__}).") from None
    data = data[None] if data.ndim == 3 else np.moveaxis(data, -1, 0)
    if not np.isfinite(data).all():
        raise DataError(f"{path}: contains NaN or Inf values.")
    return np.ascontiguousarray(data), img


def write_label(labels: np.ndarray, reference: Any, path: str | Path, replace: bool = True) -> Path:
    """Write a uint8 label map with ``reference``'s affine and header, atomically (temporary file, rename).

    The file is marked as beseg's (NIfTI intent ``label``, intent name :data:`LABEL_INTENT_NAME`).

    Args:
        labels: (X, Y, Z) label values.
        reference: the input's nibabel image (affine, header).
        path: the output file.
        replace: replace an existing file (the caller decided it may: see :func:`plan_outputs`);
            False refuses, also when another process created it in the meantime.

    Raises:
        OutputError: ``replace`` is False and ``path`` exists.
        BesegError: the file cannot be written (e.g. the disk is full); nothing partial is left.
    """
    path = Path(path)
    header = reference.header.copy()
    header.set_data_dtype(np.uint8)
    header.set_data_shape(labels.shape)
    header.set_intent("label", (), name=LABEL_INTENT_NAME)
    header["descrip"] = b"beseg label map"
    img = nib.Nifti1Image(labels.astype(np.uint8), reference.affine, header=header)
    img.set_qform(reference.affine, code=int(reference.header["qform_code"]) or 1)
    img.set_sform(reference.affine, code=int(reference.header["sform_code"]) or 1)
    try:
        _save_atomically(img, path, replace)
    except FileExistsError:
        raise OutputError(f"{path} appeared while predicting; not replacing it.") from None
    except OSError as err:
        raise BesegError(f"could not write {path}: {err.strerror or err}.") from None
    return path


def _save_atomically(img: Any, path: Path, replace: bool) -> None:
    """Save ``img`` to a hidden temporary file beside ``path``, then rename it into place.

    A reader sees no file or the whole one, never half of one, even after SIGKILL or a full disk; the
    temporary file is removed whatever happens. With ``replace`` False the file is put in place only if
    ``path`` does not exist at that moment: a hard link fails if it does, atomically also on NFS; on
    file systems without hard links, a check just before the rename.

    Raises:
        FileExistsError: ``replace`` is False and ``path`` exists (nothing is changed).
        OSError: the file cannot be written or renamed.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp.nii.gz", dir=path.parent)  # nibabel: by ending
    os.close(fd)
    tmp = Path(name)
    try:
        nib.save(img, tmp)
        if replace:
            os.replace(tmp, path)
            return
        try:
            os.link(tmp, path)  # fails with EEXIST if path exists, whoever created it in the meantime
        except FileExistsError:
            raise FileExistsError(errno.EEXIST, "File exists", str(path)) from None
        except OSError as err:
            if err.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
                raise
            if path.exists() or path.is_symlink():  # no hard links here: check, then rename
                raise FileExistsError(errno.EEXIST, "File exists", str(path)) from None
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # after a link or a failure; after a rename it is gone already


def is_beseg_label(path: str | Path) -> bool:
    """Whether ``path`` is a label map that beseg wrote (:func:`write_label`'s NIfTI intent), judged by its header."""
    try:
        name, _, intent_name = nib.load(str(path)).header.get_intent()
    except Exception:  # noqa: BLE001 - unreadable, not NIfTI, a folder...: not ours
        return False
    return name == "label" and intent_name == LABEL_INTENT_NAME


def plan_outputs(images: list[str | Path], out_dir: str | Path, overwrite: bool = False) -> list[tuple[Path, Path]]:
    """Every input image (folders expanded) and the label map it will be written to, ``out_dir/<name>.nii.gz``.

    Checked before anything runs, so that nothing the user gave is written over: ``out_dir`` must not
    be the folder of an input (label maps would land among, and over, the images, and a rerun would
    take them for images); no output may be an input (through a link); two inputs with one output
    name (``A/case.nii.gz``, ``B/case.nii``) are an error naming both; and an existing output is
    replaced only with ``overwrite`` and only if beseg wrote it (:func:`is_beseg_label`). The same
    file given twice (a folder and a file in it) is predicted once.

    Args:
        images: NIfTI files, or folders of them.
        out_dir: the output folder (created when the first label map is written).
        overwrite: replace existing label maps that beseg wrote.

    Returns:
        ``[(image, output), ...]`` in the order of :func:`list_images`.

    Raises:
        OutputError: naming the output and the input(s) concerned.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"--out {out_dir} exists and is not a folder.")
    out_real = os.path.realpath(out_dir)
    plan: list[tuple[Path, Path]] = []
    by_output: dict[Path, Path] = {}
    seen: set[str] = set()
    for image in list_images(images):
        real = os.path.realpath(image)
        if real in seen:
            continue
        seen.add(real)
        if os.path.realpath(image.parent) == out_real:
            raise OutputError(f"--out {out_dir} is the folder of the input {image}: label maps would be written among "
                              "(and over) the images; choose another output folder.")
        output = out_dir / output_name(image)
        if output in by_output:
            raise OutputError(f"inputs {by_output[output]} and {image} would both be written to {output}; predict them "
                              "into separate --out folders, or rename one.")
        by_output[output] = image
        plan.append((image, output))
    inputs = {os.path.realpath(image): image for image, _ in plan}
    files = {(st.st_dev, st.st_ino): image for image, _ in plan if (st := _stat(image)) is not None}
    existing = []
    for image, output in plan:
        st = _stat(output)
        source = inputs.get(os.path.realpath(output)) or (files.get((st.st_dev, st.st_ino)) if st else None)
        if source is not None:
            raise OutputError(f"{output} is the input {source} (through a link); refusing to write over an input.")
        if st is None and not output.is_symlink():
            continue
        if not overwrite:
            existing.append(output)
        elif not is_beseg_label(output):
            raise OutputError(f"{output} exists and is not a label map written by beseg; --overwrite replaces only "
                              "beseg's own label maps: move it away or choose another --out.")
    if existing:
        more = f" (and {len(existing) - 1} more output(s))" if len(existing) > 1 else ""
        raise OutputError(f"{existing[0]} exists already{more}; pass --overwrite to replace label maps beseg wrote, or "
                          "choose another --out.")
    return plan


def _stat(path: Path) -> os.stat_result | None:
    try:
        return path.stat()
    except OSError:
        return None

"""Where a case's image and label live in an MSD-layout dataset folder, for the report's figures."""

from __future__ import annotations

from pathlib import Path

from beseg.data.msd import load_task

__all__ = ["case_files"]


def case_files(data_dir: str | Path) -> dict[str, tuple[Path, Path]]:
    """Map each training case id to its (image, label) paths, read by the data layer.

    The case id is the image file name without ``.nii.gz``, as in the runs' ``per_case.csv``.
    Paths are checked as for training (nothing outside the task folder is ever opened), but the
    files are not required to exist: a missing one only costs its figure.

    Args:
        data_dir: MSD task folder holding ``dataset.json``.

    Returns:
        ``{case_id: (image_path, label_path)}`` with absolute paths.

    Raises:
        DataError: ``dataset.json`` is missing or invalid (see :func:`beseg.data.load_task`).
    """
    return {c.id: (c.image, c.label) for c in load_task(data_dir, check_files=False).training}

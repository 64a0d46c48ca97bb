"""Where a case's image and label live in the comparison's dataset, for the report's figures."""

from __future__ import annotations

from pathlib import Path

from beseg.data.msd import MSDTask

__all__ = ["case_files"]


def case_files(task: MSDTask) -> dict[str, tuple[Path, Path]]:
    """Map each training case id to its (image, label) paths, as the task lists them.

    The case id is the image file name without ``.nii.gz``, as in the runs' ``per_case.csv``.
    The paths were checked when the task was loaded (nothing outside the task folder is ever opened),
    but the files are not required to exist: a missing one only costs its figure.

    Args:
        task: the dataset the runs used (:func:`beseg.data.load_task`, by the command).

    Returns:
        ``{case_id: (image_path, label_path)}`` with absolute paths.
    """
    return {c.id: (c.image, c.label) for c in task.training}

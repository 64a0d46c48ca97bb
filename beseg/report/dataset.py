"""Where a case's image and label live in an MSD-layout dataset folder.

This is the report's only contact with the dataset layout, kept in one function so that it can be
swapped for the data layer's reader (``beseg.data.msd``) without touching the figures.
"""

from __future__ import annotations

import json
from pathlib import Path

from beseg.errors import DataError

__all__ = ["case_files"]


def _case_name(path: str) -> str:
    name = Path(path).name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def case_files(data_dir: str | Path) -> dict[str, tuple[Path, Path]]:
    """Map each training case id to its (image, label) paths, from ``dataset.json``'s ``training`` list.

    The case id is the image file name without ``.nii.gz``, as in the runs' ``per_case.csv``.

    Args:
        data_dir: MSD task folder holding ``dataset.json``.

    Returns:
        ``{case_id: (image_path, label_path)}`` with absolute paths (files not checked to exist).

    Raises:
        DataError: ``dataset.json`` is missing, not JSON, or has no usable ``training`` list.
    """
    root = Path(data_dir).resolve()
    meta_path = root / "dataset.json"
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise DataError(f"{meta_path}: cannot read ({exc.strerror or exc})") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{meta_path}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
    training = meta.get("training") if isinstance(meta, dict) else None
    if not isinstance(training, list):
        raise DataError(f"{meta_path}: no 'training' list")
    out: dict[str, tuple[Path, Path]] = {}
    for entry in training:
        if isinstance(entry, dict) and isinstance(entry.get("image"), str) and isinstance(entry.get("label"), str):
            out[_case_name(entry["image"])] = (root / entry["image"], root / entry["label"])
    return out

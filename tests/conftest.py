"""Shared test helpers: a tiny phantom task, tiny training configs, and file-tree snapshots."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from beseg.data import make_phantom


@pytest.fixture(scope="session")
def tiny_phantom(tmp_path_factory) -> Path:
    """A 6-case (+2 test images) 32x32x12 phantom spleen task; read-only, copy it before changing it."""
    return make_phantom(tmp_path_factory.mktemp("tiny") / "ph", cases=6, test_cases=2, size=(32, 32, 12),
                        progress=False)


def tiny_train_config(folder: Path, name: str = "tiny", **sections: dict) -> Path:
    """A YAML config for a few seconds of 1-thread CPU training on :func:`tiny_phantom` (SegResNet, Dice+BE).

    ``sections`` update the config's sections, e.g. ``train={"epochs": 3}``.
    """
    raw = {
        "base": "phantom_spleen_segresnet_be",
        "system": name,
        "data": {"patch_size": [16, 16, 16], "batch_size": 1, "num_workers": 0, "cache_dir": str(folder / "cache")},
        "model": {"init_filters": 8},
        "train": {"epochs": 2, "steps_per_epoch": 2, "val_every": 1, "threads": 1, "sw_batch_size": 1},
    }
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def tree_state(*roots: Path) -> dict[str, tuple[int, int]]:
    """``{path: (size, mtime_ns)}`` of every file and link under ``roots`` (a root may be a file or absent).

    Compare two snapshots to show that nothing under the roots was written, changed or removed.
    """
    state: dict[str, tuple[int, int]] = {}
    for root in map(Path, roots):
        paths = [root] if not root.is_dir() else [Path(d) / f for d, _, files in os.walk(root) for f in files]
        for path in paths:
            if path.exists() or path.is_symlink():
                st = path.lstat()
                state[str(path)] = (st.st_size, st.st_mtime_ns)
    return state

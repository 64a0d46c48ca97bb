"""Shared test helpers: a tiny phantom task, tiny training configs and comparisons, and file-tree snapshots."""

from __future__ import annotations

import csv
import os
import re
from pathlib import Path

import pytest
import yaml

from beseg.data import make_phantom


#: Test files that submit jobs to the one-node SLURM cluster: one pytest-xdist worker runs them all, one after
#: another, so that no test waits behind another test's jobs (their timeouts assume an idle cluster).
SLURM_FILES = {"test_slurm.py", "test_slurm_calls.py", "test_faults_slurm_commands.py"}


#: The longest groups (about 7 and 8 minutes of CI's 2 cores), started first: a worker left alone with one of them
#: at the end would leave the other core idle for minutes.
LONGEST_FIRST = ("slurm", "tests/test_nnunet.py")


def _xdist_group(item: pytest.Item, root: Path) -> str:
    """The worker group of a test: ``slurm`` for :data:`SLURM_FILES`, else its file's path."""
    return "slurm" if item.path.name in SLURM_FILES else item.path.relative_to(root).as_posix()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Group tests by file for ``pytest -n 2 --dist loadgroup`` (pyproject.toml's addopts), longest groups first.

    A file's tests share module-scoped fixtures (a measured dry run, a trained run), which a worker
    builds once when it runs the whole file; the SLURM files share one worker (:data:`SLURM_FILES`).
    """
    for item in items:
        item.add_marker(pytest.mark.xdist_group(_xdist_group(item, config.rootpath)))
    rank = {group: i for i, group in enumerate(LONGEST_FIRST)}
    # Stable: file order otherwise.
    items.sort(key=lambda item: rank.get(_xdist_group(item, config.rootpath), len(rank)))


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


#: Tiny comparison runs: 16^3 patches, 8 filters, 1 epoch of 2 steps of batch 1, one thread, no worker processes.
TINY_COMPARE = ["train.epochs=1", "train.steps_per_epoch=2", "data.patch_size=[16,16,16]", "data.batch_size=1",
                "model.init_filters=8", "data.num_workers=0", "train.threads=1", "train.sw_batch_size=4"]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    """A 10-case phantom spleen (6 train, 2 validation, 2 test cases with the phantom presets' shares) of 32x32x12 voxels."""
    return make_phantom(tmp_path_factory.mktemp("data") / "phantom", cases=10, test_cases=0, size=(32, 32, 12),
                        progress=False)


def tiny_compare(tmp: Path) -> list[str]:
    """:data:`TINY_COMPARE` with the dataset cache under ``tmp``."""
    return [*TINY_COMPARE, f"data.cache_dir={tmp / 'cache'}"]


def per_case_rows(results: Path) -> dict[str, list[dict[str, str]]]:
    """Every run's ``eval/per_case.csv`` rows in a results folder, by run id (``<system>/seed<k>``, ``<system>/repeat<k>``)."""
    out = {}
    for path in sorted(results.glob("*/*/eval/per_case.csv")):
        if not re.fullmatch(r"(seed|repeat)\d+", path.parent.parent.name):
            continue
        with open(path, newline="") as f:
            out[str(path.parent.parent.relative_to(results))] = list(csv.DictReader(f))
    return out


def nnunet_python() -> Path:
    """The interpreter of the virtual environment with nnunetv2 (``BESEG_NNUNET_PYTHON``, which .ci/run sets).

    nnunetv2's torchvision must match its torch, which this environment's CPU wheel of torch does not
    guarantee, so nnU-Net runs in its own environment. Skips (fails in CI) with the commands that create it.
    """
    value = os.environ.get("BESEG_NNUNET_PYTHON")
    if value:
        if not Path(value).is_file():
            pytest.fail(f"BESEG_NNUNET_PYTHON={value}: no such interpreter")
        return Path(value)
    how = ("the nnU-Net tests need a virtual environment with nnunetv2: python -m venv .venv-nnunet && "
           ".venv-nnunet/bin/pip install --isolated torch==2.13.0 torchvision==0.28.0 -e ./runtime -e '.[nnunet,test]', then "
           "export BESEG_NNUNET_PYTHON=$PWD/.venv-nnunet/bin/python (.ci/run does this)")
    if os.environ.get("CI"):
        pytest.fail(f"BESEG_NNUNET_PYTHON is not set in CI; {how}")
    pytest.skip(how)


def nnunet_compare_env(monkeypatch: pytest.MonkeyPatch, python: Path) -> None:
    """nnU-Net's settings for CPU tests of ``beseg compare``, with CI's short trainers as the user's own
    ``nnUNet_extTrainer`` folder (tests/nnunet/trainers: ``nnUNetTrainer_ci``, ``nnUNetTrainerBE_ci``...)."""
    settings = {"nnUNet_extTrainer": str(Path(__file__).resolve().parent / "nnunet" / "trainers"),
                "nnUNet_compile": "f", "nnUNet_n_proc_DA": "0", "nnUNet_def_n_proc": "1",
                "BESEG_NNUNET_PYTHON": str(python)}
    for key, value in settings.items():
        monkeypatch.setenv(key, value)

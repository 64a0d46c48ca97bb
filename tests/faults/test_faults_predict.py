"""Fault: the disk fills up while a prediction is written, for `beseg predict` and `beseg-predict`.

The output folder is a real file system that is full: a small tmpfs (as root) filled up to its last
byte by a filler file. Where mounting is not possible, the child process gets a file-size limit
(RLIMIT_FSIZE, SIGXFSZ ignored) instead, so every write of a label map fails with EFBIG; both are
errors of the kernel, not of a patched Python function (BESEG_TEST_NO_MOUNT=1 forces the second way). Each path must name the file in one line,
leave no half-written NIfTI (no temporary file either), exit 1, and succeed when the same command
runs again once space is back.

The helpers are in this file (tests/faults/conftest.py belongs to the fault suite's shared fixtures).
"""

from __future__ import annotations

import contextlib
import errno
import os
import resource
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

pytestmark = pytest.mark.slow

def run_cli(args: list[str], limit_file_size: int | None = None) -> subprocess.CompletedProcess:
    """``python -m MODULE args`` (beseg from the working directory or PYTHONPATH), optionally under RLIMIT_FSIZE."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_file_size, limit_file_size))

    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=600, env=env,
                          preexec_fn=limit if limit_file_size is not None else None)


@contextlib.contextmanager
def full_disk(folder: Path) -> Iterator[tuple[Path, int | None]]:
    """A full file system at ``folder``: ``(folder, None)`` for a filled tmpfs, or ``(folder, limit)``
    when mounting is not possible here and the child must run under a file-size limit instead.
    Leaving the block frees the space (the filler is removed; then the tmpfs is unmounted)."""
    folder.mkdir(parents=True, exist_ok=True)
    mounted = os.geteuid() == 0 and not os.environ.get("BESEG_TEST_NO_MOUNT") and subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)],
                                                   capture_output=True).returncode == 0
    if not mounted:
        yield folder, 64  # bytes: less than any label map, more than nothing
        return
    filler = folder / "filler"
    try:
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            while True:
                os.write(fd, b"\0" * 4096)
        except OSError as err:
            assert err.errno == errno.ENOSPC
        finally:
            os.close(fd)
        yield folder, None
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def free_space(folder: Path) -> None:
    (folder / "filler").unlink(missing_ok=True)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> dict[str, Path]:
    """A tiny trained spleen run, its exported model folder, and two test images."""
    from beseg.cli import main
    from beseg.data import make_phantom

    root = tmp_path_factory.mktemp("predict_faults")
    data = make_phantom(root / "data", cases=4, test_cases=2, size=(32, 32, 12), progress=False)
    config = root / "tiny.yaml"
    config.write_text(yaml.safe_dump({
        "base": "phantom_spleen_segresnet_be", "system": "tiny",
        "data": {"patch_size": [16, 16, 16], "batch_size": 1, "num_workers": 0, "cache_dir": str(root / "cache")},
        "model": {"init_filters": 8},
        "train": {"epochs": 1, "steps_per_epoch": 1, "val_every": 1, "threads": 1, "sw_batch_size": 4},
    }))
    assert main(["train", str(config), "--data", str(data), "--out", str(root / "run"), "--no-progress"]) == 0
    assert main(["export", str(root / "run"), "--out", str(root / "model")]) == 0
    return {"run": root / "run", "model": root / "model", "images": data / "imagesTs"}


@pytest.mark.parametrize("path", ["beseg predict", "beseg-predict"])
def test_a_full_disk_while_predicting_names_the_file_leaves_nothing_and_a_rerun_succeeds(path, model, tmp_path):
    def command(out: Path) -> list[str]:
        if path == "beseg predict":
            return ["beseg.cli", "predict", str(model["run"]), str(model["images"]), "--out", str(out)]
        return ["beseg_runtime.cli", str(model["model"]), str(model["images"]), "--out", str(out), "--quiet"]

    from beseg.cli import main
    from beseg_runtime.cli import main as deploy_main

    reference = tmp_path / "reference"
    assert (main if path == "beseg predict" else deploy_main)(command(reference)[1:]) == 0  # in this process
    names = sorted(p.name for p in reference.iterdir())
    assert len(names) == 2
    with full_disk(tmp_path / "disk") as (disk, limit):
        out = disk / "pred"
        result = run_cli(command(out), limit_file_size=limit)
        assert result.returncode == 1, result.stderr
        assert "Traceback" not in result.stderr
        lines = [line for line in result.stderr.splitlines() if line.startswith("  - ")]
        why = "No space left on device" if limit is None else "File too large"
        assert len(lines) == len(names) and result.stderr.splitlines()[-3] == f"{len(names)} input(s) failed:"
        for name in names:
            assert sum(f"could not write {out / name}: {why}" in line for line in lines) == 1, result.stderr
        # nothing half-written: no label map, no temporary file
        assert not out.exists() or list(out.iterdir()) == []
        free_space(disk)
        again = run_cli(command(out))  # the same command, once space is back
        assert again.returncode == 0, again.stderr
        assert sorted(p.name for p in out.iterdir()) == names
        for name in names:
            written, expected = nib.load(str(out / name)), nib.load(str(reference / name))
            np.testing.assert_array_equal(np.asarray(written.dataobj), np.asarray(expected.dataobj))
            np.testing.assert_allclose(written.affine, expected.affine)

"""Fault suite: corrupt and hostile inputs, crashes, non-finite losses, full disks and concurrent runs.

Every CLI case checks the exit code, that stderr holds a clear message naming the file and the
problem and no traceback, and that nothing outside the run (or output) folder was written or
changed. docs/reliability.md maps each fault class to its promise and to the test here.
"""

from __future__ import annotations

import errno
import gzip
import io
import json
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from beseg.cli import main
from beseg.engine import checkpoint as checkpoint_mod
from beseg.engine import trainer as trainer_mod
from beseg.engine.checkpoint import CheckpointError, atomic_save, load_checkpoint
from beseg.engine.config import load_config
from beseg.engine.predict import resolve_checkpoint
from beseg.engine.rundir import read_metrics
from beseg.errors import ConfigError
from conftest import tiny_train_config, tree_state

CASE = "phantom_spleen_000.nii.gz"


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("BESEG_CACHE_DIR", str(tmp_path / "beseg-cache"))


@pytest.fixture(scope="module")
def trained_run(tiny_phantom, tmp_path_factory) -> Path:
    """A finished 1-epoch run (read-only: copy it before changing it)."""
    root = tmp_path_factory.mktemp("trained")
    cfg = tiny_train_config(root, train={"epochs": 1})
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BESEG_CACHE_DIR", str(root / "beseg-cache"))
        assert main(["train", str(cfg), "--data", str(tiny_phantom), "--out", str(root / "run"), "--no-progress"]) == 0
    return root / "run"


def run_main(capsys, *args: str) -> tuple[int, str, str]:
    """``beseg ARGS`` in this process: (exit code, stdout, stderr)."""
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_clear_error(rc: int, err: str, *needles: str, one_line: bool = True) -> None:
    assert rc != 0
    assert "Traceback" not in err, err
    for needle in needles:
        assert needle in err, (needle, err)
    if one_line:  # progress bars (tqdm, also on stderr) aside
        assert len([line for line in err.strip().splitlines() if "%|" not in line]) == 1, err


def no_temp_files(folder: Path) -> bool:
    return not [p for p in folder.rglob("*") if p.name.endswith(".tmp") or ".tmp." in p.name]


def finite_weights(ckpt: dict) -> bool:
    return all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


# ---------------------------------------------------------------------------------------------
# corrupt and hostile task folders: `beseg data check` and `beseg train` name the file and problem


def _rewrite(path: Path, array: np.ndarray, affine: np.ndarray | None = None) -> None:
    nib.save(nib.Nifti1Image(array, nib.load(str(path)).affine if affine is None else affine), str(path))


def _voxels(path: Path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).dataobj)


def _truncate_gzip(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _truncate_payload(path: Path) -> None:  # a valid gzip stream whose NIfTI voxel data stops early
    path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes())[:352 + 100]))


def _nan_inf(path: Path) -> None:
    data = _voxels(path).astype(np.float32)
    data[0, 0, 0], data[1, 0, 0] = np.nan, np.inf
    _rewrite(path, data)


def _shifted_affine(path: Path) -> None:
    affine = nib.load(str(path)).affine.copy()
    affine[0, 3] += 2.5
    _rewrite(path, _voxels(path), affine)


def _half_label(path: Path) -> None:
    data = _voxels(path).astype(np.float32)
    data[data > 0] = 0.5
    _rewrite(path, data)


def _edit_json(root: Path, fn) -> None:
    meta = json.loads((root / "dataset.json").read_text())
    fn(meta)
    (root / "dataset.json").write_text(json.dumps(meta))


def _symlink_out(root: Path) -> None:
    outside = root.parent / "outside.nii.gz"
    shutil.copy(root / "imagesTr" / CASE, outside)
    (root / "imagesTr" / CASE).unlink()
    os.symlink(outside, root / "imagesTr" / CASE)


def _symlink_loop(root: Path) -> None:
    (root / "imagesTr" / CASE).unlink()
    os.symlink(CASE, root / "imagesTr" / CASE)


IMG, LAB, JSON = "imagesTr/" + CASE, "labelsTr/" + CASE, "dataset.json"

# id -> (file to break, how, what the message must say about it)
CORRUPT = {
    "truncated-gzip": (IMG, _truncate_gzip, "truncated or corrupt"),
    "truncated-voxels": (IMG, _truncate_payload, "truncated or corrupt"),
    "not-nifti": (IMG, lambda p: p.write_bytes(b"GIF89a not a medical image" * 40), "not a readable NIfTI file"),
    "empty-file": (IMG, lambda p: p.write_bytes(b""), "file is empty"),
    "zero-size-dim": (IMG, lambda p: _rewrite(p, np.zeros((32, 0, 12), np.float32)), "zero-size dimension"),
    "2d-image": (IMG, lambda p: _rewrite(p, np.zeros((32, 32), np.float32)), "expected a 3D or 4D image, got 2D"),
    "label-affine": (LAB, _shifted_affine, "affine differs from the image's by up to 2.5"),
    "label-0.5": (LAB, _half_label, "non-integer label values, e.g. 0.5"),
    "image-nan-inf": (IMG, _nan_inf, "1 NaN and 1 Inf voxel(s)"),
    "json-invalid": (JSON, lambda p: p.write_text('{"name": "Spleen",'), "invalid JSON at line 1"),
    "json-missing-key": (JSON, lambda p: _edit_json(p.parent, lambda m: m.pop("labels")), "missing required key 'labels'"),
    "json-wrong-type": (JSON, lambda p: _edit_json(p.parent, lambda m: m.update(training={"a": 1})),
                        "key 'training' must be list, got dict"),
    "json-duplicate": (JSON, lambda p: _edit_json(p.parent, lambda m: m["training"].append(m["training"][0])),
                       "is listed twice"),
    # hostile: paths that lead out of the task folder
    "json-dotdot": (JSON, lambda p: _edit_json(p.parent, lambda m: m["training"][0].update(label="../../etc/passwd")),
                    "outside the task folder"),
    "json-absolute": (JSON, lambda p: _edit_json(p.parent, lambda m: m["training"][0].update(image="/etc/passwd")),
                      "absolute path '/etc/passwd' is not allowed"),
    "symlink-out": (JSON, lambda p: _symlink_out(p.parent), "outside the task folder"),
    "symlink-loop": (JSON, lambda p: _symlink_loop(p.parent), "cannot be resolved (Symlink loop"),
}


@pytest.mark.parametrize("case", list(CORRUPT))
def test_bad_task_folder_is_named_by_check_and_by_train_before_training(case, tiny_phantom, tmp_path, capsys):
    root = shutil.copytree(tiny_phantom, tmp_path / "task", symlinks=True)
    rel, breaker, problem = CORRUPT[case]
    breaker(root / rel)
    cfg = tiny_train_config(tmp_path / "cfg")
    before = tree_state(root, cfg, tmp_path / "outside.nii.gz")

    rc, out, err = run_main(capsys, "data", "check", root)
    assert rc == 1 and "Traceback" not in out + err
    line = next((p for p in out.splitlines() if problem in p), None)
    assert line is not None and str(root / rel) in line, out

    run = tmp_path / "run"
    rc, out, err = run_main(capsys, "train", cfg, "--data", root, "--out", run, "--no-progress")
    assert_clear_error(rc, err, str(root / rel), problem)
    assert not (run / "checkpoints").exists() and not (run / ".claim").exists()
    assert not (tmp_path / "cfg" / "cache").exists() and not (tmp_path / "beseg-cache").exists()
    assert tree_state(root, cfg, tmp_path / "outside.nii.gz") == before


# ---------------------------------------------------------------------------------------------
# hostile checkpoints and configs: never executed


class _RunsCode:
    """Unpickling this object would run a shell command (creating ``marker``)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
def test_checkpoint_carrying_code_is_refused_by_predict_evaluate_and_resume(writer, tiny_phantom, tmp_path, capsys):
    marker = tmp_path / "PWNED"
    payload = {"model": _RunsCode(marker), "config": {}}
    evil = tmp_path / "run" / "checkpoints" / "last.pt"
    evil.parent.mkdir(parents=True)
    if writer == "pickle":
        evil.write_bytes(pickle.dumps(payload))
    else:
        torch.save(payload, evil)
    image = tiny_phantom / "imagesTs" / "phantom_spleen_006.nii.gz"
    before = tree_state(tiny_phantom, evil)
    for args in (["predict", evil, image, "--out", tmp_path / "pred"],
                 ["evaluate", tmp_path / "run", "--data", tiny_phantom, "--out", tmp_path / "ev"],
                 ["train", "--resume", tmp_path / "run", "--data", tiny_phantom, "--no-progress"]):
        rc, out, err = run_main(capsys, *args)
        assert_clear_error(rc, err, f"refusing to load {evil}", "weights-only loading rejected it")
        assert not marker.exists()
    with pytest.raises(CheckpointError, match="refusing to load"):
        load_checkpoint(evil)
    assert not marker.exists() and not (tmp_path / "pred").exists() and not (tmp_path / "ev").exists()
    assert tree_state(tiny_phantom, evil) == before


@pytest.mark.parametrize("text", [
    "base: phantom_spleen_segresnet_be\nsystem: !!python/object/apply:os.system ['touch {marker}']\n",
    "!!python/object/apply:os.system ['touch {marker}']\n",
    "base: phantom_spleen_segresnet_be\ntrain: !!python/object/new:subprocess.Popen [['touch', '{marker}']]\n",
], ids=["apply-in-a-value", "apply-at-top-level", "new-popen"])
def test_yaml_config_with_python_tags_is_refused(text, tiny_phantom, tmp_path, capsys):
    marker = tmp_path / "PWNED"
    cfg = tmp_path / "evil.yaml"
    cfg.write_text(text.format(marker=marker))
    with pytest.raises(ConfigError, match="refusing a Python object tag"):
        load_config(cfg)
    rc, out, err = run_main(capsys, "train", cfg, "--data", tiny_phantom, "--out", tmp_path / "run")
    assert_clear_error(rc, err, str(cfg), "refusing a Python object tag (!!python/...) (line ")
    assert not marker.exists() and not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------
# crashes: SIGKILL during training and during a checkpoint write; the lock


# Runs `beseg ARGS` with torch.save stalled at its K-th call (``STALL_AT``): the first
# ``STALL_FRACTION`` of the checkpoint's bytes are written and flushed, then the process waits
# to be killed -- a SIGKILL in the middle of a checkpoint write, made deterministic.
STALLING_CLI = """
import io, os, sys, time, torch
real_save, calls = torch.save, [0]
def save(obj, f, *args, **kwargs):
    calls[0] += 1
    if calls[0] != int(os.environ["STALL_AT"]):
        return real_save(obj, f, *args, **kwargs)
    buf = io.BytesIO()
    real_save(obj, buf, *args, **kwargs)
    data = buf.getvalue()
    f.write(data[: int(len(data) * float(os.environ["STALL_FRACTION"]))])
    f.flush()
    open(os.environ["STALL_MARKER"], "w").close()
    time.sleep(600)
torch.save = save
from beseg.cli import main
sys.exit(main(sys.argv[1:]))
"""


def start_stalling_train(cfg: Path, data: Path, run: Path, stall_at: int, fraction: float, marker: Path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "STALL_AT": str(stall_at), "STALL_FRACTION": str(fraction),
           "STALL_MARKER": str(marker)}
    proc = subprocess.Popen([sys.executable, "-c", STALLING_CLI, "train", str(cfg), "--data", str(data), "--out",
                             str(run), "--no-progress"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 240
    while not marker.exists():
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            out, err = proc.communicate()
            pytest.fail(f"training never reached checkpoint write {stall_at}: rc={proc.returncode}\n{err[-3000:]}")
        time.sleep(0.05)
    return proc


def assert_resume_after_kill(run: Path, data: Path, epochs: int, capsys) -> bool:
    """After a SIGKILL: only complete checkpoints are used, and ``--resume`` finishes the run or, with no
    ``last.pt`` yet, refuses clearly. True when it resumed."""
    last = run / "checkpoints" / "last.pt"
    if (run / "checkpoints").is_dir() and any(p.suffix == ".pt" for p in (run / "checkpoints").iterdir()):
        assert resolve_checkpoint(run).name in ("best.pt", "last.pt")  # never a partial temporary file
    if not last.exists():  # killed before the first last.pt was complete: nothing to resume
        rc, out, err = run_main(capsys, "train", "--resume", run, "--data", data, "--no-progress")
        assert_clear_error(rc, err, f"cannot resume: {last} does not exist")
        return False
    assert finite_weights(load_checkpoint(last))
    rc, out, err = run_main(capsys, "train", "--resume", run, "--data", data, "--no-progress")
    assert rc == 0, err
    final = load_checkpoint(last)
    assert final["epoch"] == epochs and finite_weights(final)
    assert [r["epoch"] for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "train"] == list(range(1, epochs + 1))
    assert not (run / ".claim").exists()  # the dead process's claim was taken over, then released
    return True


# Checkpoint writes of a 3-epoch run: 1 best.pt (epoch 1), 2 last.pt (epoch 1), then epoch 2's.
@pytest.mark.slow
@pytest.mark.parametrize("stall_at,seed", [(2, 0), (3, 1), (4, 2)],
                         ids=["first-last.pt-write", "epoch-2-first-write", "epoch-2-second-write"])
def test_sigkill_during_a_checkpoint_write_keeps_a_loadable_checkpoint_and_resume_finishes(
        stall_at, seed, tiny_phantom, tmp_path, capsys):
    fraction = random.Random(seed).uniform(0.05, 1.0)  # how much of the file was on disk at the kill
    cfg = tiny_train_config(tmp_path, train={"epochs": 3})
    run = tmp_path / "run"
    before = tree_state(tiny_phantom, cfg)
    proc = start_stalling_train(cfg, tiny_phantom, run, stall_at, fraction, tmp_path / "stalled")

    # While the first run holds the folder, a second `beseg train` into it is refused.
    last = run / "checkpoints" / "last.pt"
    second = ["--resume", run] if last.exists() else [cfg, "--out", run]
    rc, out, err = run_main(capsys, "train", *second, "--data", tiny_phantom, "--no-progress")
    assert_clear_error(rc, err, f"run folder {run} is in use by process {proc.pid}", f"claim file {run / '.claim'}")

    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = [p for p in (run / "checkpoints").iterdir() if p.name.endswith(".tmp")]
    assert len(partial) == 1 and partial[0].name.startswith((".last.pt.", ".best.pt."))  # killed mid-write
    assert json.loads((run / ".claim").read_text())["pid"] == proc.pid  # stale claim of a dead process
    if stall_at > 2:
        assert load_checkpoint(last)["epoch"] == 1
    assert assert_resume_after_kill(run, tiny_phantom, 3, capsys) == (stall_at > 2)
    assert tree_state(tiny_phantom, cfg) == before


@pytest.mark.slow
def test_sigkill_at_a_random_point_of_training_keeps_a_loadable_checkpoint_and_resume_finishes(tiny_phantom, tmp_path, capsys):
    # A random point in progress (not in wall time, which depends on the machine): right after the
    # k-th metrics line (train and val lines alternate, two per epoch), anywhere up to mid-epoch 3.
    k = random.Random(7).randint(1, 5)
    cfg = tiny_train_config(tmp_path, train={"epochs": 4})
    run = tmp_path / "run"
    before = tree_state(tiny_phantom, cfg)
    proc = subprocess.Popen([sys.executable, "-m", "beseg.cli", "train", str(cfg), "--data", str(tiny_phantom),
                             "--out", str(run), "--no-progress"], env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while proc.poll() is None and time.time() < deadline and len(read_metrics(run / "metrics.jsonl")) < k:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run ended before it was killed"
    assert_resume_after_kill(run, tiny_phantom, 4, capsys)
    assert tree_state(tiny_phantom, cfg) == before


# ---------------------------------------------------------------------------------------------
# numerical faults


def _loss_turning_nonfinite(at_step: int, value: float):
    """A build_loss replacement: the real loss, times ``value`` at training step ``at_step`` (1-based)."""
    real_build = trainer_mod.build_loss
    steps = [0]

    def build(*args, **kwargs):
        real = real_build(*args, **kwargs)

        def loss(logits, label):
            out = real(logits, label)
            if logits.grad_fn is not None:  # a training step (the loss timing runs on a detached leaf)
                steps[0] += 1
                if steps[0] == at_step:
                    return out * value
            return out
        return loss
    return build


def test_nonfinite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tiny_phantom, tmp_path, capsys,
                                                                                 monkeypatch):
    monkeypatch.setattr(trainer_mod, "build_loss", _loss_turning_nonfinite(3, float("nan")))
    cfg = tiny_train_config(tmp_path, train={"epochs": 2})
    run = tmp_path / "run"
    before = tree_state(tiny_phantom, cfg)
    rc, out, err = run_main(capsys, "train", cfg, "--data", tiny_phantom, "--out", run, "--no-progress")
    last = run / "checkpoints" / "last.pt"
    assert_clear_error(rc, err, "non-finite loss nan at epoch 2, step 3", f"last good checkpoint is {last}")
    ckpt = load_checkpoint(last)
    assert ckpt["epoch"] == 1 and ckpt["step"] == 2 and finite_weights(ckpt)
    assert finite_weights(load_checkpoint(run / "checkpoints" / "best.pt"))
    assert no_temp_files(run) and not (run / ".claim").exists()
    assert tree_state(tiny_phantom, cfg) == before


def test_nonfinite_loss_is_skipped_when_configured(tiny_phantom, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(trainer_mod, "build_loss", _loss_turning_nonfinite(2, float("inf")))
    cfg = tiny_train_config(tmp_path, train={"epochs": 2, "on_nonfinite": "skip"})
    run = tmp_path / "run"
    rc, out, err = run_main(capsys, "train", cfg, "--data", tiny_phantom, "--out", run, "--no-progress")
    assert rc == 0, err
    ckpt = load_checkpoint(run / "checkpoints" / "last.pt")
    assert ckpt["epoch"] == 2 and ckpt["step"] == 4 and finite_weights(ckpt)
    skipped = [r["skipped_steps"] for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "train"]
    assert skipped == [1, 0]


# ---------------------------------------------------------------------------------------------
# resource faults: a full disk


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def _save_then_fill_disk(real_save, fail_when):
    """A torch.save replacement that writes part of the file and then runs out of space when ``fail_when(f)``."""
    def save(obj, f, *args, **kwargs):
        if not fail_when(f):
            return real_save(obj, f, *args, **kwargs)
        buf = io.BytesIO()
        real_save(obj, buf)
        f.write(buf.getvalue()[:1000])
        _enospc()
    return save


def test_disk_full_during_a_checkpoint_write_keeps_the_previous_file(trained_run, tmp_path, monkeypatch):
    target = tmp_path / "ckpt" / "last.pt"
    target.parent.mkdir()
    shutil.copy(trained_run / "checkpoints" / "last.pt", target)
    previous = target.read_bytes()
    state = load_checkpoint(target)
    monkeypatch.setattr(checkpoint_mod.torch, "save", _save_then_fill_disk(torch.save, lambda f: True))
    with pytest.raises(CheckpointError, match=f"could not write checkpoint {target}: No space left on device; "
                                              "the previous file is intact"):
        atomic_save(state, target)
    monkeypatch.undo()
    monkeypatch.setattr(checkpoint_mod.os, "replace", _enospc)  # the disk fills at the rename
    with pytest.raises(CheckpointError, match="No space left on device"):
        atomic_save(state, target)
    assert target.read_bytes() == previous and sorted(p.name for p in target.parent.iterdir()) == ["last.pt"]


def test_disk_full_while_training_stops_with_one_line_and_keeps_the_last_checkpoint(tiny_phantom, tmp_path, capsys,
                                                                                    monkeypatch):
    writes = [0]

    def after_epoch_1(f) -> bool:  # epoch 1 writes best.pt and last.pt; the disk is full from then on
        writes[0] += 1
        return writes[0] > 2

    monkeypatch.setattr(checkpoint_mod.torch, "save", _save_then_fill_disk(torch.save, after_epoch_1))
    cfg = tiny_train_config(tmp_path, train={"epochs": 2})
    run = tmp_path / "run"
    before = tree_state(tiny_phantom, cfg)
    rc, out, err = run_main(capsys, "train", cfg, "--data", tiny_phantom, "--out", run, "--no-progress")
    last = run / "checkpoints" / "last.pt"
    assert_clear_error(rc, err, f"could not write checkpoint {run / 'checkpoints'}/", ": No space left on device; "
                       "the previous file is intact")
    ckpt = load_checkpoint(last)
    assert ckpt["epoch"] == 1 and finite_weights(ckpt)
    assert no_temp_files(run) and not (run / ".claim").exists()
    assert tree_state(tiny_phantom, cfg) == before


def test_disk_full_while_writing_a_prediction_keeps_the_previous_file(trained_run, tiny_phantom, tmp_path, capsys,
                                                                      monkeypatch):
    image = tiny_phantom / "imagesTs" / "phantom_spleen_006.nii.gz"
    out_dir = tmp_path / "pred"
    rc, out, err = run_main(capsys, "predict", trained_run, image, "--out", out_dir)
    assert rc == 0, err
    written = out_dir / "phantom_spleen_006.nii.gz"
    previous = written.read_bytes()
    before = tree_state(tiny_phantom, trained_run)

    def save_then_fill_disk(img, filename):
        Path(filename).write_bytes(b"\x1f\x8b partial")
        _enospc()
    monkeypatch.setattr(nib, "save", save_then_fill_disk)
    rc, out, err = run_main(capsys, "predict", trained_run, image, "--out", out_dir, "--overwrite")
    assert_clear_error(rc, err, "1 input(s) failed", f"could not write {written}: No space left on device",
                       one_line=False)
    assert written.read_bytes() == previous
    assert sorted(p.name for p in out_dir.iterdir()) == [written.name]
    assert tree_state(tiny_phantom, trained_run) == before


def test_disk_full_while_evaluate_writes_its_results_is_one_line(trained_run, tiny_phantom, tmp_path, capsys,
                                                                   monkeypatch):
    out_dir = tmp_path / "ev"
    rc, out, err = run_main(capsys, "evaluate", trained_run, "--data", tiny_phantom, "--out", out_dir)
    assert rc == 0, err
    previous = (out_dir / "summary.json").read_bytes()
    before = tree_state(tiny_phantom, trained_run)
    monkeypatch.setattr(Path, "write_text", lambda self, *a, **k: _enospc())  # summary.json's temporary file
    rc, out, err = run_main(capsys, "evaluate", trained_run, "--data", tiny_phantom, "--out", out_dir)
    monkeypatch.undo()
    assert_clear_error(rc, err, "beseg evaluate: error: [Errno 28] No space left on device")
    assert (out_dir / "summary.json").read_bytes() == previous
    assert tree_state(tiny_phantom, trained_run) == before


# ---------------------------------------------------------------------------------------------
# predict and evaluate on folders with some bad cases


def test_predict_writes_the_good_images_and_lists_the_bad_ones(trained_run, tiny_phantom, tmp_path, capsys):
    good = tiny_phantom / "imagesTs" / "phantom_spleen_006.nii.gz"
    bad_dir = tmp_path / "inputs"
    bad_dir.mkdir()
    bad = {
        "empty.nii.gz": (lambda p: p.write_bytes(b""), "file is empty"),
        "junk.nii.gz": (lambda p: p.write_bytes(b"junk" * 100), "not a readable NIfTI"),
        "truncated.nii.gz": (lambda p: p.write_bytes(good.read_bytes()[:3000]), "EOFError"),
        "flat.nii.gz": (lambda p: nib.save(nib.Nifti1Image(np.zeros((16, 16), np.float32), np.eye(4)), p),
                        "shape (16, 16) does not fit task phantom_spleen"),
        "two-channel.nii.gz": (lambda p: nib.save(nib.Nifti1Image(np.zeros((16, 16, 8, 2), np.float32), np.eye(4)), p),
                               "shape (16, 16, 8, 2) does not fit task phantom_spleen"),
        "nan.nii.gz": (lambda p: nib.save(nib.Nifti1Image(np.full((16, 16, 8), np.nan, np.float32), np.eye(4)), p),
                       "contains NaN or Inf values"),
    }
    for name, (make, _) in bad.items():
        make(bad_dir / name)
    missing = bad_dir / "missing.nii.gz"
    inputs = [bad_dir / "empty.nii.gz", good, *[bad_dir / n for n in bad if n != "empty.nii.gz"], missing]
    before = tree_state(tiny_phantom, trained_run, bad_dir)
    out_dir = tmp_path / "pred"
    rc, out, err = run_main(capsys, "predict", trained_run, *inputs, "--out", out_dir)
    assert_clear_error(rc, err, f"{len(bad) + 1} input(s) failed:", one_line=False)
    assert f"wrote {out_dir / good.name}" in out
    listed = err.splitlines()[1:]
    for name, (_, reason) in bad.items():
        assert any(line.startswith(f"  - {bad_dir / name}: ") and reason in line for line in listed), (name, err)
    assert any(line.startswith(f"  - {missing}: ") and "file not found" in line for line in listed), err
    assert sorted(p.name for p in out_dir.iterdir()) == [good.name]
    assert tree_state(tiny_phantom, trained_run, bad_dir) == before


def test_evaluate_checks_labels_as_score_does(trained_run, tiny_phantom, tmp_path, capsys):
    """A label with non-integer values, or of the image's shape on another grid, fails its case with the
    reason (as in ``beseg score``), rather than being rounded or scored misaligned."""
    root = shutil.copytree(tiny_phantom, tmp_path / "task")
    name = lambda i: f"phantom_spleen_{i:03d}.nii.gz"  # noqa: E731
    soft = _voxels(root / "labelsTr" / name(0)).astype(np.float32)
    soft[soft > 0] = 0.6  # probabilities, not labels: rounding them would score a made-up label map
    _rewrite(root / "labelsTr" / name(0), soft)
    shifted = nib.load(str(root / "labelsTr" / name(1))).affine.copy()
    shifted[:3, 3] += [3.0, 0.0, 0.0]  # same shape, 3 mm away
    _rewrite(root / "labelsTr" / name(1), _voxels(root / "labelsTr" / name(1)), shifted)
    out_dir = tmp_path / "ev"
    rc, out, err = run_main(capsys, "evaluate", trained_run, "--data", root, "--split", "all", "--out", out_dir)
    assert_clear_error(rc, err, "2 input(s) failed:", one_line=False)
    assert any(line.startswith(f"  - phantom_spleen_000: {root / 'labelsTr' / name(0)}: label holds non-integer")
               for line in err.splitlines()), err
    assert any(line.startswith(f"  - phantom_spleen_001: {root / 'labelsTr' / name(1)}: label and its image")
               and "different affines (largest difference 3 mm" in line for line in err.splitlines()), err
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["cases"] == 4 and [f["case"] for f in summary["failed"]] == ["phantom_spleen_000", "phantom_spleen_001"]
    assert summary["dim"] == 3 and summary["ignore_label"] is None
    # A looser --affine-tol accepts the shifted label (then scored where it lies).
    rc, out, err = run_main(capsys, "evaluate", trained_run, "--data", root, "--split", "all", "--out", out_dir,
                            "--affine-tol", "5")
    assert "1 input(s) failed:" in err and "phantom_spleen_001" not in err


def test_evaluate_scores_the_good_cases_and_lists_the_bad_ones(trained_run, tiny_phantom, tmp_path, capsys):
    root = shutil.copytree(tiny_phantom, tmp_path / "task")
    name = lambda i: f"phantom_spleen_{i:03d}.nii.gz"  # noqa: E731
    _truncate_gzip(root / "labelsTr" / name(0))
    (root / "imagesTr" / name(1)).write_bytes(b"junk" * 100)
    _rewrite(root / "labelsTr" / name(2), np.zeros((8, 8, 8), np.uint8))
    (root / "imagesTr" / name(3)).unlink()
    before = tree_state(root, trained_run)
    out_dir = tmp_path / "ev"
    rc, out, err = run_main(capsys, "evaluate", trained_run, "--data", root, "--split", "all", "--out", out_dir)
    assert_clear_error(rc, err, "4 input(s) failed:", one_line=False)
    expected = [
        (0, root / "labelsTr" / name(0), "truncated or corrupt"),
        (1, root / "imagesTr" / name(1), "not a readable NIfTI"),
        (2, root / "labelsTr" / name(2), "label has shape (8, 8, 8), its image"),
        (3, root / "imagesTr" / name(3), "file not found"),
    ]
    for i, path, reason in expected:
        assert any(line.startswith(f"  - phantom_spleen_{i:03d}: {path}") and reason in line
                   for line in err.splitlines()), (i, err)
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["cases"] == 2 and [f["case"] for f in summary["failed"]] == [f"phantom_spleen_{i:03d}" for i in range(4)]
    rows = (out_dir / "per_case.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["phantom_spleen_004", "phantom_spleen_005"]
    assert "2 case(s)" in out and no_temp_files(out_dir)
    assert tree_state(root, trained_run) == before

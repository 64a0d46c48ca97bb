"""Checkpoints across versions and machines: a newer format is refused clearly; RNG states are restored
as far as the machine allows, and what was not restored is said (no GPU needed: CUDA is faked)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from beseg.cli import main
from beseg.engine.checkpoint import (
    FORMAT_VERSION,
    CheckpointError,
    atomic_save,
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
)
from beseg.engine.rundir import read_metrics
from conftest import tiny_train_config


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("BESEG_CACHE_DIR", str(tmp_path / "beseg-cache"))


def _cuda_states(n: int) -> list[torch.Tensor]:
    """``n`` distinct stand-ins for ``torch.cuda.get_rng_state()`` (philox seed and offset bytes)."""
    return [torch.full((16,), i, dtype=torch.uint8) for i in range(n)]


@pytest.fixture
def fake_cuda(monkeypatch):
    """Pretend this machine has CUDA with ``devices[0]`` GPUs; records ``set_rng_state`` calls."""
    devices, calls = [2], []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: devices[0] > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: devices[0])
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": calls.append((device, state.clone())))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: pytest.fail("must restore per device"))
    return devices, calls


def _state_with_cuda(n: int) -> dict:
    state = capture_rng_state()
    state["cuda"] = _cuda_states(n)
    return state


def test_cpu_generators_round_trip():
    state = capture_rng_state()
    expected = (random.random(), np.random.rand(), torch.rand(3))
    random.random(), np.random.rand(), torch.rand(7)  # move every generator on
    assert restore_rng_state(state) == []
    got = (random.random(), np.random.rand(), torch.rand(3))
    assert got[:2] == expected[:2] and torch.equal(got[2], expected[2])


def test_cuda_checkpoint_on_fewer_gpus_restores_the_devices_that_exist(fake_cuda):
    _, calls = fake_cuda
    notes = restore_rng_state(_state_with_cuda(8))
    assert [d for d, _ in calls] == [0, 1]
    assert all(torch.equal(s, _cuda_states(8)[d]) for d, s in calls)  # device i gets the saved state i
    assert len(notes) == 1 and "CUDA random generators of devices 2 to 7 were not restored" in notes[0]
    assert "the checkpoint has 8, this machine has 2" in notes[0]


def test_cuda_checkpoint_on_a_machine_without_cuda_restores_the_cpu_state(fake_cuda):
    devices, calls = fake_cuda
    devices[0] = 0
    state = _state_with_cuda(8)
    expected = torch.rand(4)  # the draw right after capture
    torch.rand(9)
    notes = restore_rng_state(state)
    assert torch.equal(torch.rand(4), expected) and calls == []
    assert len(notes) == 1 and "devices 0 to 7 were not restored" in notes[0] and "no CUDA" in notes[0]


def test_cpu_checkpoint_on_a_gpu_machine_says_the_gpus_keep_their_seed(fake_cuda):
    _, calls = fake_cuda
    state = capture_rng_state()
    state.pop("cuda", None)
    notes = restore_rng_state(state)
    assert calls == [] and len(notes) == 1 and "CUDA devices 0 to 1 have no saved random state" in notes[0]


def test_a_newer_checkpoint_format_is_refused_naming_the_file_and_both_formats(tmp_path, capsys):
    newer = FORMAT_VERSION + 1
    path = atomic_save({"format": newer, "model": {}, "config": {}}, tmp_path / "run" / "checkpoints" / "last.pt")
    with pytest.raises(CheckpointError, match=f"{path} has checkpoint format {newer}, newer than the format "
                                              f"{FORMAT_VERSION} that beseg"):
        load_checkpoint(path)
    for args in (["predict", str(path), "x.nii.gz", "--out", str(tmp_path / "p")],
                 ["train", "--resume", str(tmp_path / "run"), "--data", str(tmp_path)]):
        assert main(args) == 1
        err = capsys.readouterr().err
        assert f"checkpoint format {newer}" in err and "update beseg" in err and "Traceback" not in err


@pytest.mark.parametrize("fmt", ["1", 0, True])
def test_an_invalid_checkpoint_format_is_refused(fmt, tmp_path):
    path = atomic_save({"format": fmt, "model": {}, "config": {}}, tmp_path / "c.pt")
    with pytest.raises(CheckpointError, match="invalid checkpoint format"):
        load_checkpoint(path)


def test_resuming_a_multi_gpu_amp_checkpoint_on_cpu_finishes_and_says_what_was_not_restored(tiny_phantom, tmp_path):
    cfg = tiny_train_config(tmp_path, train={"epochs": 1, "steps_per_epoch": 1})
    run = tmp_path / "run"
    assert main(["train", str(cfg), "--data", str(tiny_phantom), "--out", str(run), "--no-progress"]) == 0
    # What an 8-GPU AMP run would have saved: 8 CUDA generator states, an AMP scaler, 8 processes.
    ckpt = load_checkpoint(run / "checkpoints" / "last.pt")
    ckpt["rng"]["cuda"] = _cuda_states(8)
    ckpt["scaler"] = {"scale": 32768.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000,
                      "_growth_tracker": 11}
    ckpt["world_size"] = 8
    ckpt["config"]["train"]["epochs"] = 2
    atomic_save(ckpt, run / "checkpoints" / "last.pt")
    with pytest.warns(RuntimeWarning) as caught:
        assert main(["train", "--resume", str(run), "--data", str(tiny_phantom), "--no-progress"]) == 0
    said = " ".join(str(w.message) for w in caught)
    assert "devices 0 to 7 were not restored (the checkpoint has 8, this machine has no CUDA)" in said
    assert "written by 8 process(es), this run has 1: the global batch is now 1 instead of 8" in said
    assert load_checkpoint(run / "checkpoints" / "last.pt")["epoch"] == 2
    assert [r["epoch"] for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "train"] == [1, 2]

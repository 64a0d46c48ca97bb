"""beseg.engine.measure: the engine's own step, checkpoint, validation, store build and evaluation, timed on one case."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from beseg.data import get_preset, load_task
from beseg.data.intensity import foreground_percentiles
from beseg.engine.config import load_config
from beseg.engine.measure import (
    PeakMemory, device_info, measure_evaluation_case, measure_store_case, measure_training,
)
from beseg.engine.trainer import Trainer
from conftest import tiny_train_config, tree_state


def _vm_hwm_works() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def measured(tiny_phantom, tmp_path_factory):
    """The store build, a 1 + 2 step training measurement and an evaluation case of the tiny config, in a scratch folder."""
    tmp = tmp_path_factory.mktemp("measure")
    config, _ = load_config(tiny_train_config(tmp, train={"threads": 1}))
    task = load_task(tiny_phantom)
    preset = get_preset(config.data.task)
    case = task.case(task.training[2].id)
    before = tree_state(tiny_phantom)
    store_cost, store = measure_store_case(task, preset, case, tmp / "scratch" / "store")
    stats = foreground_percentiles([case], None) if preset.needs_intensity_stats else None
    training = measure_training(config, store, case, task, preset, stats, torch.device("cpu"), tmp / "scratch",
                                warmup=1, steps=2)
    eval_s = measure_evaluation_case(store, case, preset, tmp / "scratch")
    return {"tmp": tmp, "task": task, "case": case, "store": store, "store_cost": store_cost, "training": training,
            "eval_s": eval_s, "before": before, "config": config, "phantom": tiny_phantom, "stats": stats,
            "preset": preset}


def test_the_store_case_is_built_into_the_scratch_store_only(measured):
    cost, store, case = measured["store_cost"], measured["store"], measured["case"]
    info = json.loads(store.path(case.id, "json").read_text())
    assert store.root.is_relative_to(measured["tmp"] / "scratch") and store.ready(case)
    assert cost.case == case.id and cost.seconds > 0
    assert cost.bytes == sum(info["files"].values())
    assert cost.voxels == math.prod(info["properties"]["shape"])
    assert cost.original_voxels == 32 * 32 * 12  # the tiny phantom's grid
    assert tree_state(measured["phantom"]) == measured["before"]  # the dataset is only read
    assert not list((measured["tmp"] / "cache").glob("store-*/*.json"))  # the config's own store: untouched


def test_the_training_measurement_times_the_real_step_and_validation(measured):
    cost = measured["training"]
    assert cost.error is None
    assert len(cost.step_samples) == 2 and cost.step_s == pytest.approx(float(np.median(cost.step_samples)))
    assert cost.warmup_steps == 1 and cost.patch == (16, 16, 16) and cost.patches == 1  # batch 1 x 1 sample
    assert cost.loss_s is not None and 0 < cost.loss_s < cost.step_s  # the loss is part of the step
    assert 0 < cost.batch_s and 0 < cost.setup_s and cost.threads == torch.get_num_threads()
    assert cost.checkpoint_s > 0 and cost.checkpoint_bytes == (measured["tmp"] / "scratch" / "run" / "checkpoints"
                                                               / "last.pt").stat().st_size
    assert cost.validation_s > 0 and cost.validation_voxels == measured["store_cost"].voxels
    assert cost.peak_bytes > 0 and cost.host_peak_bytes == cost.peak_bytes  # on the CPU the device is the host
    assert cost.validation_peak_bytes > 0


def test_evaluating_a_case_writes_its_prediction_into_the_scratch_folder(measured):
    assert measured["eval_s"] > 0
    assert (measured["tmp"] / "scratch" / f"{measured['case'].id}.nii.gz").is_file()


def test_a_measurement_that_runs_out_of_memory_says_where(measured, monkeypatch):
    def oom(self, batch):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(Trainer, "train_step", oom)
    cost = measure_training(measured["config"], measured["store"], measured["case"], measured["task"],
                            measured["preset"], measured["stats"], torch.device("cpu"), measured["tmp"] / "oom")
    assert cost.error.startswith("out of memory while training steps (CUDA out of memory.")
    assert math.isnan(cost.step_s) and cost.setup_s > 0  # what was measured before stays


def test_a_step_that_fails_is_recorded_with_its_reason(measured, monkeypatch):
    def broken(self, batch):
        raise ValueError("Expected more than 1 spatial element when training")

    monkeypatch.setattr(Trainer, "train_step", broken)
    cost = measure_training(measured["config"], measured["store"], measured["case"], measured["task"],
                            measured["preset"], measured["stats"], torch.device("cpu"), measured["tmp"] / "broken")
    assert cost.error == "training steps failed: ValueError: Expected more than 1 spatial element when training"


def test_a_validation_shared_with_another_system_is_not_repeated(measured):
    cost = measure_training(measured["config"], measured["store"], measured["case"], measured["task"],
                            measured["preset"], measured["stats"], torch.device("cpu"), measured["tmp"] / "noval",
                            warmup=0, steps=1, validate=False)
    assert cost.error is None and cost.step_samples and math.isnan(cost.validation_s)


@pytest.mark.skipif(not _vm_hwm_works(), reason="needs /proc/self/clear_refs (Linux)")
def test_peak_memory_is_that_of_the_block_not_of_the_process_before_it():
    big = np.ones(300 * 2**20 // 8)  # 300 MiB resident before the block
    del big
    with PeakMemory(torch.device("cpu")) as quiet:
        small = np.ones(2**20 // 8)
    with PeakMemory(torch.device("cpu")) as busy:
        block = np.ones(200 * 2**20 // 8)
        block[::512] = 2.0
    del small, block
    assert busy.bytes - quiet.bytes > 150 * 2**20  # the 200 MiB block shows; the earlier 300 MiB does not
    assert "VmHWM" in busy.kind and busy.host_bytes == busy.bytes


def test_device_info_of_the_cpu():
    info = device_info("cpu")
    assert info.kind == "cpu" and info.count >= 1 and info.memory_bytes > 2**28
    assert info.slug.startswith("cpu-") and info.slug.endswith(f"-{info.count}-cores")
    assert " " not in info.slug and info.describe().startswith("CPU ")

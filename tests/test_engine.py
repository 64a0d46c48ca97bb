"""Engine tests: configs, every Table 1 row trains, exact resume after SIGKILL, DDP equals one
process, predictions keep the input geometry, and CLI errors are one clear line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

from beseg.cli import main
from beseg.data import make_phantom
from beseg.engine.checkpoint import CheckpointError, atomic_save, load_checkpoint
from beseg.engine.config import Config, config_from_dict, list_presets, load_config, parse_overrides
from beseg.engine.predict import load_model
from beseg.engine import trainer as trainer_mod
from beseg.engine.trainer import EpochSampler, LossTimer, Trainer
from beseg.errors import ConfigError

TABLE1 = ("unet", "ahnet", "segresnet_dice", "segresnet_boundary", "segresnet_focal", "segresnet_be")


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> Path:
    return make_phantom(tmp_path_factory.mktemp("data") / "ph", cases=6, test_cases=1, size=(32, 32, 12), progress=False)


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("BESEG_CACHE_DIR", str(tmp_path / "cache"))


def tiny_config(tmp_path: Path, system: str = "segresnet_be", **sections) -> Path:
    """A YAML file for a few seconds of CPU training on the tiny phantom."""
    raw = {
        "base": f"phantom_spleen_{system}",
        "data": {"patch_size": [16, 16, 16], "batch_size": 2, "num_workers": 0, "cache_dir": str(tmp_path / "cache")},
        "model": {"init_filters": 8, "unet_channels": [4, 8, 16, 32, 64]},
        "train": {"epochs": 2, "steps_per_epoch": 2, "val_every": 1, "threads": 1, "sw_batch_size": 1},
    }
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    path = tmp_path / f"{system}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "beseg.cli", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


# ---------------------------------------------------------------------------------------------
# configs


def test_every_table1_row_is_a_preset_for_each_task():
    names = set(list_presets())
    for prefix in ("task01", "task09", "phantom_spleen", "phantom_brain"):
        for system in TABLE1:
            config, _ = load_config(f"{prefix}_{system}")
            assert f"{prefix}_{system}" in names and config.system == system
    be, _ = load_config("task09_segresnet_be")
    assert (be.loss.name, be.loss.lambda_dice, be.loss.lambda_be, be.loss.smoothing_passes) == ("dice_be", 1.0, 1000.0, 3)
    assert be.data.patch_size == (96, 96, 96) and load_config("task01_unet")[0].data.patch_size == (224, 224, 128)


def test_overrides_and_yaml_files(tmp_path):
    config, _ = load_config("phantom_spleen_segresnet_dice", ["train.epochs=3", "data.patch_size=[32,32,32]", "loss.name=dice_be"])
    assert config.train.epochs == 3 and config.data.patch_size == (32, 32, 32) and config.loss.name == "dice_be"
    assert parse_overrides(["a.b=1", "a.c=x"]) == {"a": {"b": 1, "c": "x"}}
    path = tiny_config(tmp_path)
    assert load_config(path)[0].model.init_filters == 8


@pytest.mark.parametrize(
    "raw,match",
    [
        ({"data": {"task": "phantom-spleen"}, "model": {"network": "segresnet"}}, "missing the required key 'loss.name'"),
        ({"data": {"task": "phantom-spleen"}, "model": {"network": "vnet"}, "loss": {"name": "dice"}}, "model.network must be one of"),
        ({"data": {"task": "phantom-spleen"}, "model": {"network": "unet"}, "loss": {"name": "dice_xx"}}, "unknown loss.name 'dice_xx'"),
        ({"data": {"task": "phantom-spleen"}, "model": {"network": "unet"}, "loss": {"name": "dice"}, "train": {"epoch": 3}},
         "did you mean 'train.epochs'"),
        ({"data": {"task": "phantom-spleen", "batch_size": "two"}, "model": {"network": "unet"}, "loss": {"name": "dice"}},
         "data.batch_size must be an integer"),
        ({"data": {"task": "liver"}, "model": {"network": "unet"}, "loss": {"name": "dice"}}, "unknown data.task 'liver'"),
        ({"data": {"task": "phantom-spleen"}, "model": {"network": "unet"}, "loss": {"name": "dice"}, "optim": {"lr": -1}},
         "optim.lr must be > 0"),
    ],
)
def test_bad_configs_get_clear_errors(raw, match):
    with pytest.raises(ConfigError, match=match):
        config_from_dict(raw)


def test_unknown_preset_suggests_a_name():
    with pytest.raises(ConfigError, match="did you mean 'phantom_spleen_segresnet_be'"):
        load_config("phantom_spleen_segresnet_bee")


# ---------------------------------------------------------------------------------------------
# sampling


def test_epoch_sampler_global_batches_do_not_depend_on_process_count():
    single = list(EpochSampler(7, steps=3, batch_size=2, seed=5))
    ranks = [list(EpochSampler(7, steps=3, batch_size=1, seed=5, rank=r, world_size=2)) for r in range(2)]
    for step in range(3):
        assert sorted(single[2 * step : 2 * step + 2]) == sorted([ranks[0][step], ranks[1][step]])
    other_epoch = EpochSampler(7, steps=3, batch_size=2, seed=5)
    other_epoch.set_epoch(1)
    assert list(other_epoch) != single


# ---------------------------------------------------------------------------------------------
# training


@pytest.mark.slow
@pytest.mark.parametrize("system", TABLE1)
def test_every_table1_row_trains(system, phantom, tmp_path):
    extra = {
        "ahnet": {"data": {"patch_size": [32, 32, 32]}, "model": {"ahnet_psp_blocks": 0, "ahnet_layers": [1, 1, 1, 1]}},
        "unet": {"data": {"patch_size": [32, 32, 32]}},  # four stride-2 levels need 2 voxels at the bottom
    }.get(system, {})
    cfg = tiny_config(tmp_path, system, **extra)
    run = tmp_path / "run"
    assert main(["train", str(cfg), "--data", str(phantom), "--out", str(run), "--no-progress"]) == 0
    ckpt = load_checkpoint(run / "checkpoints" / "last.pt")
    assert ckpt["epoch"] == 2 and ckpt["config"]["system"] == system
    records = [yaml.safe_load(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_losses = [r["loss"] for r in records if r["kind"] == "train"]
    assert len(train_losses) == 2 and all(np.isfinite(train_losses))
    assert [r["epoch"] for r in records if r["kind"] == "val"] == [1, 2]
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    assert (run / "config.yaml").is_file() and any((run / "tensorboard").iterdir())


@pytest.mark.slow
def test_resume_after_sigkill_matches_uninterrupted_run(phantom, tmp_path):
    cfg = tiny_config(tmp_path, train={"epochs": 4, "steps_per_epoch": 3, "val_every": 2})
    straight = tmp_path / "straight"
    done = run_cli("train", str(cfg), "--data", str(phantom), "--out", str(straight), "--no-progress")
    assert done.returncode == 0, done.stderr

    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "beseg.cli", "train", str(cfg), "--data", str(phantom), "--out",
                             str(killed), "--no-progress"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    last = killed / "checkpoints" / "last.pt"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if last.exists() and load_checkpoint(last)["epoch"] >= 1:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    epoch_at_kill = load_checkpoint(last)["epoch"]
    assert 1 <= epoch_at_kill < 4, "the run must be killed mid-training for this test to mean anything"

    resumed = run_cli("train", "--resume", str(killed), "--data", str(phantom), "--no-progress")
    assert resumed.returncode == 0, resumed.stderr
    a, b = load_checkpoint(straight / "checkpoints" / "last.pt"), load_checkpoint(last)
    assert b["epoch"] == 4 and b["step"] == a["step"]
    for key, value in a["model"].items():
        torch.testing.assert_close(b["model"][key], value, rtol=0, atol=0, msg=f"weights differ at {key}")
    epochs = [r["epoch"] for r in map(yaml.safe_load, (killed / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"]
    assert epochs == [1, 2, 3, 4]  # no epoch logged twice after the resume


@pytest.mark.slow
def test_two_gloo_processes_match_one_process_with_the_same_global_batch(phantom, tmp_path):
    # SGD: its update is linear in the gradient. Adam divides by sqrt(v) + 1e-8, which turns rounding
    # differences in near-zero gradients into differences of order lr, so it cannot be compared tightly.
    common = {"train": {"epochs": 1, "steps_per_epoch": 2, "val_every": 1, "device": "cpu"},
              "optim": {"name": "sgd", "lr": 0.003}}
    single_cfg = tiny_config(tmp_path, **common)
    one = tmp_path / "one"
    assert run_cli("train", str(single_cfg), "--data", str(phantom), "--out", str(one), "--no-progress").returncode == 0
    ddp_dir = tmp_path / "ddp"
    ddp_dir.mkdir()
    ddp_cfg = tiny_config(ddp_dir, data={"batch_size": 1}, **common)
    out = tmp_path / "two"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
         "-m", "beseg.cli", "train", str(ddp_cfg), "--data", str(phantom), "--out", str(out), "--no-progress"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = load_checkpoint(one / "checkpoints" / "last.pt"), load_checkpoint(out / "checkpoints" / "last.pt")
    for key, value in a["model"].items():
        torch.testing.assert_close(b["model"][key], value, rtol=1e-4, atol=1e-5, msg=f"weights differ at {key}")
    # only rank 0 writes: one config, one set of metric lines
    assert len([r for r in (out / "metrics.jsonl").read_text().splitlines() if '"train"' in r]) == 1


# ---------------------------------------------------------------------------------------------
# predict and evaluate


@pytest.fixture(scope="module")
def trained(phantom, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("trained")
    os.environ["BESEG_CACHE_DIR"] = str(root / "cache")
    cfg = tiny_config(root, "segresnet_dice", train={"epochs": 1})
    assert main(["train", str(cfg), "--data", str(phantom), "--out", str(root / "run"), "--no-progress"]) == 0
    return root / "run"


def oblique_affine(spacing=(0.7, 1.1, 3.0), angle=0.3) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    rot = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ np.array([[1, 0, 0], [0, np.cos(0.2), -np.sin(0.2)], [0, np.sin(0.2), np.cos(0.2)]])
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag(spacing)
    affine[:3, 3] = [-20.0, 13.5, 7.25]
    return affine


@pytest.mark.slow
def test_predict_keeps_shape_and_oblique_anisotropic_affine(trained, tmp_path, capsys):
    affine = oblique_affine()
    image = np.random.default_rng(0).normal(100, 30, size=(27, 31, 9)).astype(np.float32)
    src = tmp_path / "in" / "oblique.nii.gz"
    src.parent.mkdir()
    nib.save(nib.Nifti1Image(image, affine), src)
    assert main(["predict", str(trained), str(src), "--out", str(tmp_path / "out")]) == 0
    out = nib.load(str(tmp_path / "out" / "oblique.nii.gz"))
    assert out.shape == image.shape
    np.testing.assert_allclose(out.affine, affine, atol=1e-5)
    assert out.get_data_dtype() == np.uint8 and set(np.unique(np.asarray(out.dataobj))) <= {0, 1}
    assert "wrote" in capsys.readouterr().out


def test_an_epoch_has_the_same_steps_on_any_number_of_processes():
    # 29 training cases, batch 2: 14 steps per epoch on 1 GPU and on 16 (it was 29 // 32 -> 1 on 16 GPUs)
    assert trainer_mod.steps_per_epoch(None, 29, 2) == 14
    assert trainer_mod.steps_per_epoch(250, 29, 2) == 250 and trainer_mod.steps_per_epoch(None, 1, 2) == 1
    sampler = EpochSampler(29, 14, 2, seed=0, rank=3, world_size=16)
    assert len(sampler) == 28 and len(sampler.global_sequence()) == 14 * 2 * 16


@pytest.mark.slow
def test_the_run_folder_records_its_split_and_evaluate_reads_it(trained, phantom, tmp_path):
    from beseg.data import load_split

    recorded = load_split(trained / "split.json")
    config = yaml.safe_load((trained / "config.yaml").read_text())
    assert config["data"]["split_file"] is not None
    used = Path(config["data"]["split_file"])
    assert load_split(used) == recorded and len(recorded.test) == 1
    assert load_checkpoint(trained / "checkpoints" / "last.pt")["config"]["data"]["split_file"] == str(used)
    backup = used.read_text()
    used.unlink()  # the shared cache's split is gone: the run still knows its cases
    try:
        assert main(["evaluate", str(trained), "--data", str(phantom), "--out", str(tmp_path / "ev")]) == 0
        summary = yaml.safe_load((tmp_path / "ev" / "summary.json").read_text())
        assert summary["case_ids"] == recorded.test
    finally:
        used.write_text(backup)  # the module's other tests share this run


@pytest.mark.slow
def test_evaluate_writes_per_case_metrics_in_mm(trained, phantom, tmp_path):
    assert main(["evaluate", str(trained), "--data", str(phantom), "--out", str(tmp_path / "ev")]) == 0
    rows = (tmp_path / "ev" / "per_case.csv").read_text().splitlines()
    # 1 held-out case, 1 class; the metric columns first (later columns belong to the per-case CSV's writer)
    assert rows[0].split(",")[:6] == ["case", "class", "dice", "hd95_mm", "asd_mm", "nsd"] and len(rows) == 2
    summary = yaml.safe_load((tmp_path / "ev" / "summary.json").read_text())
    assert summary["classes"] == ["spleen"] and summary["cases"] == 1
    assert (tmp_path / "ev" / "predictions").is_dir()


def _evaluate_store_and_nifti(run: Path, data: Path, tmp_path: Path, monkeypatch) -> None:
    """Evaluate every case of ``data`` through the NIfTI images and through the run's store, then again with
    every image NIfTI made unreadable: the same label maps, per-case Dice within 1e-6 and HD95 alike."""
    from beseg.engine.evaluate import evaluate

    def scored(result):
        assert not result.failed, result.failed
        return {(r["case"], r["class"]): (r["dice"], r["hd95_mm"]) for r in result.rows}

    nifti = evaluate(run, data, split="all", out=tmp_path / "nifti", progress=False, from_store=False)
    stored = evaluate(run, data, split="all", out=tmp_path / "store", progress=False)  # stores the test cases too
    images = {str(p) for p in (data / "imagesTr").glob("*.nii.gz")}
    real_load = nib.load

    def load(path, *args, **kwargs):
        if str(path) in images:
            raise OSError(f"{path}: an image NIfTI was opened")
        return real_load(path, *args, **kwargs)

    monkeypatch.setattr(nib, "load", load)
    unread = evaluate(run, data, split="all", out=tmp_path / "unread", progress=False)
    refused = evaluate(run, data, split="all", out=tmp_path / "refused", progress=False, from_store=False)
    monkeypatch.undo()
    assert len(refused.failed) == len(images) and "an image NIfTI was opened" in refused.failed[0][1]  # the guard bites
    want = scored(nifti)
    assert len({case for case, _ in want}) == len(images)
    for result in (stored, unread):
        got = scored(result)
        assert got.keys() == want.keys()
        for key, (dice, hd95) in want.items():
            assert abs(got[key][0] - dice) <= 1e-6 and np.isclose(got[key][1], hd95, equal_nan=True), (key, got[key], dice, hd95)
    labels = set()
    for path in sorted((tmp_path / "nifti" / "predictions").glob("*.nii.gz")):
        a = np.asarray(real_load(str(path)).dataobj)
        b = np.asarray(real_load(str(tmp_path / "unread" / "predictions" / path.name)).dataobj)
        assert np.array_equal(a, b), path.name
        labels |= set(np.unique(a).tolist())
    assert len(labels) > 1  # the model paints something: the comparison is not one of empty maps


def test_evaluate_reads_the_store_with_the_nifti_numbers_softmax(trained, phantom, tmp_path, monkeypatch):
    """Spleen phantom (softmax, raw intensities stored, scaled with the run's percentiles at reading)."""
    _evaluate_store_and_nifti(trained, phantom, tmp_path, monkeypatch)


@pytest.mark.slow
def test_evaluate_reads_the_store_with_the_nifti_numbers_brain_regions(tmp_path, monkeypatch):
    """Brain phantom (sigmoid nested regions; z-scored, cropped store)."""
    brain = make_phantom(tmp_path / "brain", task="brain", cases=4, test_cases=0, size=(32, 32, 16), progress=False)
    raw = yaml.safe_load(tiny_config(tmp_path, "segresnet_dice").read_text())
    raw["base"] = "phantom_brain_segresnet_dice"
    raw["train"].update(epochs=1, steps_per_epoch=2)
    cfg = tmp_path / "brain.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    assert main(["train", str(cfg), "--data", str(brain), "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    store = next((tmp_path / "cache").glob("store-*"))
    props = [json.loads(p.read_text())["properties"] for p in store.glob("*.json") if p.name != "settings.json"]
    assert any(p["bbox"] != [[0, n] for n in p["shape"]] for p in props)  # the store really is cropped
    _evaluate_store_and_nifti(tmp_path / "run", brain, tmp_path, monkeypatch)


def test_checkpoint_from_another_network_is_refused(trained, tmp_path, capsys):
    ckpt = load_checkpoint(trained / "checkpoints" / "last.pt")
    ckpt["config"]["model"]["network"] = "unet"  # weights are SegResNet's
    bad = atomic_save(ckpt, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="do not fit model.network=unet"):
        load_model(bad)
    assert main(["predict", str(bad), "x.nii.gz", "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "do not fit" in err and "Traceback" not in err


# ---------------------------------------------------------------------------------------------
# CLI errors


@pytest.mark.parametrize(
    "args,match",
    [
        (["train", "no_such_preset"], "no config file or preset named 'no_such_preset'"),
        (["train", "phantom_spleen_segresnet_be", "model.network=vnet"], "model.network must be one of"),
        (["train", "phantom_spleen_segresnet_be", "loss.name=dice_xyz"], "unknown loss.name 'dice_xyz'"),
        (["train", "task09_segresnet_be"], "--data DIR is required for task 'task09'"),
        (["train"], "give a CONFIG"),
        (["train", "--resume", "/nonexistent/run"], "cannot resume"),
        (["evaluate", "/nonexistent/run", "--data", "."], "does not exist"),
    ],
)
def test_cli_errors_are_one_clear_line(args, match, capsys):
    assert main(args) == 1
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_train_on_a_folder_that_fails_the_data_check(tmp_path, capsys):
    bad = make_phantom(tmp_path / "bad", cases=3, test_cases=0, size=(16, 16, 8), progress=False)
    img = nib.load(str(bad / "imagesTr" / "phantom_spleen_000.nii.gz"))
    data = np.asarray(img.dataobj).astype(np.float32)
    data[0, 0, 0] = np.nan
    nib.save(nib.Nifti1Image(data, img.affine), bad / "imagesTr" / "phantom_spleen_000.nii.gz")
    assert main(["train", "phantom_spleen_segresnet_dice", "--data", str(bad), "--out", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    assert "phantom_spleen_000.nii.gz" in err and "NaN" in err and "Traceback" not in err
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow
def test_brain_phantom_trains_evaluates_and_predicts_sigmoid_regions(tmp_path):
    """The Task01 path: 4 channels in, overlapping TC/WT/ET sigmoid regions out, MSD labels back."""
    brain = make_phantom(tmp_path / "brain", task="brain", cases=5, test_cases=1, size=(32, 32, 16), progress=False)
    raw = yaml.safe_load(tiny_config(tmp_path, "segresnet_be").read_text())
    raw["base"] = "phantom_brain_segresnet_be"
    cfg = tmp_path / "brain.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    run = tmp_path / "run"
    assert main(["train", str(cfg), "--data", str(brain), "--out", str(run), "--no-progress"]) == 0
    val = [yaml.safe_load(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"val"' in line]
    assert set(val[-1]["dice"]) == {"TC", "WT", "ET"}
    assert main(["evaluate", str(run), "--data", str(brain), "--out", str(tmp_path / "ev")]) == 0
    classes = {line.split(",")[1] for line in (tmp_path / "ev" / "per_case.csv").read_text().splitlines()[1:]}
    assert classes == {"TC", "WT", "ET"}
    test_image = next((brain / "imagesTs").glob("*.nii.gz"))
    assert main(["predict", str(run), str(test_image), "--out", str(tmp_path / "pred")]) == 0
    out = nib.load(str(tmp_path / "pred" / test_image.name))
    src = nib.load(str(test_image))
    assert out.shape == src.shape[:3] and np.allclose(out.affine, src.affine)
    assert set(np.unique(np.asarray(out.dataobj))) <= {0, 1, 2, 3}  # MSD labels, not region channels


@pytest.mark.slow
def test_validation_dice_equals_evaluate_dice_per_class_on_the_brain_phantom(tmp_path):
    """Validation scores what `beseg evaluate` scores: nested labels from the sigmoid regions, then class masks.

    Both score the same checkpoint on the same validation cases; validation on the 1 mm training grid,
    evaluate on each image's original 0.8 x 0.8 x 2.5 mm grid after nearest-neighbour resampling back.
    That resampling moves boundary voxels only, so per-class Dice agree to TOL; scoring independently
    thresholded region channels in one and nested labels in the other (issue 10) differs by far more.
    """
    from beseg.engine.evaluate import evaluate

    TOL = 0.05
    brain = make_phantom(tmp_path / "brain", task="brain", cases=8, test_cases=0, size=(32, 32, 16), progress=False)
    raw = yaml.safe_load(tiny_config(tmp_path, "segresnet_dice").read_text())
    raw["base"] = "phantom_brain_segresnet_dice"
    raw["data"].update(val_frac=0.3, test_frac=0.1)
    raw["train"].update(epochs=1, steps_per_epoch=3)
    cfg = tmp_path / "brain.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    run = tmp_path / "run"
    assert main(["train", str(cfg), "--data", str(brain), "--out", str(run), "--no-progress"]) == 0
    logged = [r for r in map(yaml.safe_load, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "val"][-1]
    result = evaluate(run / "checkpoints" / "last.pt", brain, split="val", out=tmp_path / "ev", progress=False)
    assert result.summary["cases"] >= 2 and not result.failed
    for name in ("TC", "WT", "ET"):
        scored = np.mean([row["dice"] for row in result.rows if row["class"] == name])
        assert abs(logged["dice"][name] - scored) <= TOL, (name, logged["dice"][name], scored)


class CountingTrainer(Trainer):
    """A variant overriding one step (the loss): records every loss call's label dtype."""

    def build_loss(self):
        real, self.label_dtypes = super().build_loss(), []

        def loss(logits, label):
            self.label_dtypes.append(label.dtype)
            return real(logits, label)
        return loss


@pytest.mark.slow
def test_a_trainer_variant_overrides_one_step_and_the_loss_runs_once_per_step(phantom, tmp_path):
    cfg = tiny_config(tmp_path, "segresnet_be", train={"epochs": 2, "steps_per_epoch": 2})
    trainer = CountingTrainer(load_config(cfg)[0], phantom, tmp_path / "run", progress=False)
    result = trainer.run()
    assert result.epochs == 2 and (tmp_path / "run" / "checkpoints" / "last.pt").is_file()
    # 2 epochs x 2 steps, and no extra passes to time the loss; softmax labels arrive as class indices
    assert trainer.label_dtypes == [torch.int64] * 4
    train_lines = [r for r in map(yaml.safe_load, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
                   if r["kind"] == "train"]
    assert all(r["loss_time_s"] > 0 and r["step_time_s"] > 0 for r in train_lines)


class DeepSupervisionTrainer(Trainer):
    """Overrides forward and compute_loss only (two outputs, as deep supervision), and after_backward."""

    def forward(self, batch):
        logits, label = super().forward(batch)
        return [logits, logits * 0.5], label

    def compute_loss(self, outputs, label):
        return self.loss_fn(outputs[0], label) + 0.5 * self.loss_fn(outputs[1], label)

    def setup_model(self):
        super().setup_model()
        self.initial = [p.detach().clone() for p in self.model.parameters()]
        self.grad_norms = []

    def after_backward(self):
        self.grad_norms.append(float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), float("inf"))))
        for p in self.model.parameters():  # a step of SGD without decay then changes nothing
            p.grad.zero_()


@pytest.mark.slow
def test_step_hooks_keep_the_loss_timing_and_run_before_the_optimiser_step(phantom, tmp_path):
    cfg = tiny_config(tmp_path, "segresnet_be", train={"epochs": 1, "steps_per_epoch": 2},
                      optim={"name": "sgd", "weight_decay": 0.0, "lr": 0.1})
    trainer = DeepSupervisionTrainer(load_config(cfg)[0], phantom, tmp_path / "run", progress=False)
    trainer.run()
    assert len(trainer.grad_norms) == 2 and all(n > 0 for n in trainer.grad_norms)
    assert all(torch.equal(a, b) for a, b in zip(trainer.initial, trainer.model.parameters()))
    train_lines = [r for r in map(yaml.safe_load, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
                   if r["kind"] == "train"]
    assert train_lines and all(r["loss_time_s"] > 0 for r in train_lines)  # timed without code of its own


def test_train_step_is_fixed_and_the_error_names_the_hooks():
    with pytest.raises(TypeError, match="overrides Trainer.train_step.*forward, compute_loss, after_backward, on_nonfinite"):
        class Overriding(Trainer):
            def train_step(self, batch):
                return 0.0


def test_on_nonfinite_must_return_a_decision(tmp_path, phantom):
    class Undecided(Trainer):
        def on_nonfinite(self, what, rank):
            return None

    trainer = Undecided(load_config(tiny_config(tmp_path))[0], phantom, tmp_path / "run", progress=False)
    with pytest.raises(TypeError, match="on_nonfinite must return 'skip' or 'stop', got None"):
        trainer._act_on_nonfinite("loss nan", None)
    default = Trainer(load_config(tiny_config(tmp_path, train={"on_nonfinite": "skip"}))[0], phantom, tmp_path / "run")
    assert default.on_nonfinite("loss nan", None) == "skip" and default._act_on_nonfinite("loss nan", None) is None


def test_an_unknown_schedule_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown optim.schedule 'cosin'; choose one of: cosine, constant, poly"):
        trainer_mod._lr_lambda("cosin", 10)
    assert trainer_mod._lr_lambda("cosine", 10)(10) == pytest.approx(0.0)


def test_loss_time_is_the_loss_forward_and_backward_of_the_real_step(monkeypatch):
    """A fake clock advances 2 s in the loss's forward, 3 s in its backward and 100 s in the network's
    backward; the timer must report 5 s per step, and ignore a step that never ran backward."""
    clock = [0.0]
    monkeypatch.setattr(trainer_mod.time, "perf_counter", lambda: clock[0])

    class Tick(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, seconds):
            ctx.seconds = seconds
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            clock[0] += ctx.seconds
            return grad, None

    def loss_fn(logits, label):
        clock[0] += 2.0
        return (Tick.apply(logits, 3.0) - label).square().mean()

    timer = LossTimer(torch.device("cpu"))
    weights = torch.ones(4, requires_grad=True)
    for step in range(3):
        logits = Tick.apply(weights * 2, 100.0)  # the network: its backward is not the loss's
        loss = timer.measure(loss_fn, logits, torch.zeros(4))
        if step == 1:
            continue  # a skipped step: no backward
        timer.backward_starts()
        loss.backward()
    assert timer.epoch_seconds() == 5.0
    assert np.isnan(timer.epoch_seconds())  # read once per epoch: the next epoch starts empty


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_two_amp_steps_on_cuda(phantom, tmp_path):
    cfg = tiny_config(tmp_path, "segresnet_be", train={"epochs": 1, "steps_per_epoch": 2, "device": "cuda", "amp": True})
    trainer = CountingTrainer(load_config(cfg)[0], phantom, tmp_path / "run", progress=False)
    trainer.run()
    assert trainer.use_amp and trainer.scaler.is_enabled() and trainer.label_dtypes == [torch.int64] * 2
    assert next(trainer.model.parameters()).is_cuda
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert ckpt["step"] == 2 and ckpt["scaler"]["scale"] > 0 and len(ckpt["rng"]["cuda"]) == torch.cuda.device_count()
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    line = [r for r in map(yaml.safe_load, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
            if r["kind"] == "train"][0]
    assert line["loss_time_s"] > 0 and np.isfinite(line["loss"])

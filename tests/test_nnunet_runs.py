"""nnU-Net trainers as systems of a comparison (beseg.experiment.nnunet_runs), without nnU-Net itself.

What needs nnU-Net (conversion, training, prediction, the trainer lookup) is in tests/test_nnunet.py,
run in the nnU-Net virtual environment.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import beseg.experiment.nnunet_runs as nnunet_runs
from beseg.cli import main
from beseg.data import load_task, make_folds, make_split
from beseg.engine.config import config_from_dict
from beseg.errors import ConfigError
from beseg.experiment.primary import be_counterpart, default_baseline
from beseg.experiment.layout import ResultsLayout
from beseg.experiment.nnunet_runs import NNUNetError, NNUNetSystem, nnunet_env, read_progress, run_state
from beseg.experiment.plan import plan_runs, read_plan_json, resolve_system, write_plan_json
from beseg.nnunet import trainer_dir

BESEG_ROOT = str(Path(nnunet_runs.__file__).resolve().parents[2])


@pytest.mark.parametrize("text, trainer, configuration, name", [
    ("nnunet:nnUNetTrainerBE", "nnUNetTrainerBE", "3d_fullres", "nnUNetTrainerBE"),
    (" nnunet:nnUNetTrainer@2d ", "nnUNetTrainer", "2d", "nnUNetTrainer-2d"),
    ("nnunet:MyTrainer_5epochs@3d_fullres", "MyTrainer_5epochs", "3d_fullres", "MyTrainer_5epochs"),
])
def test_systems_name_an_nnunet_trainer_and_configuration(text, trainer, configuration, name):
    system = NNUNetSystem.parse(text)
    assert (system.trainer, system.configuration, system.plans, system.name) == (trainer, configuration,
                                                                                  "nnUNetPlans", name)
    assert NNUNetSystem.parse(system.spec) == system


@pytest.mark.parametrize("text, message", [
    ("nnunet:", "expected nnunet:TRAINER"), ("nnunet:my trainer", "expected nnunet:TRAINER"),
    ("nnunet:nnUNetTrainer@3d_cascade_fullres", "cascade is not supported"),
    ("nnunet:nnUNetTrainer@4d", "'4d' is not one of 2d, 3d_fullres, 3d_lowres"),
])
def test_malformed_nnunet_systems_are_named(text, message):
    with pytest.raises(ConfigError, match=message) as info:
        NNUNetSystem.parse(text)
    assert repr(text.strip()) in str(info.value)


def test_entries_without_the_prefix_are_not_nnunet_systems():
    assert NNUNetSystem.parse("segresnet_be") is None
    assert resolve_system("segresnet_be", "phantom_spleen").nnunet is None


def test_nnunet_env_adds_besegs_trainer_folder_to_the_users_and_points_at_the_results_folder(tmp_path):
    base = {"nnUNet_extTrainer": f"/lab/trainers{os.pathsep}/more", "PYTHONPATH": f"{BESEG_ROOT}{os.pathsep}/x",
            "HOME": "/home/u"}
    env = nnunet_env(tmp_path / "nnunet", tmp_path / "run" / "nnUNet_results", base=base)
    assert env["nnUNet_extTrainer"].split(os.pathsep) == ["/lab/trainers", "/more", str(trainer_dir())]
    assert env["nnUNet_raw"] == str(tmp_path / "nnunet" / "raw")
    assert env["nnUNet_preprocessed"] == str(tmp_path / "nnunet" / "preprocessed")
    assert env["nnUNet_results"] == str(tmp_path / "run" / "nnUNet_results")
    # beseg's own import root (a launcher's addition) is not forced on the nnU-Net environment; the rest stays.
    assert env["PYTHONPATH"] == "/x" and env["HOME"] == "/home/u"
    again = nnunet_env(tmp_path / "nnunet", base=env)
    assert again["nnUNet_extTrainer"] == env["nnUNet_extTrainer"]  # not added twice
    alone = nnunet_env(tmp_path / "nnunet", base={"PYTHONPATH": BESEG_ROOT})
    assert alone["nnUNet_extTrainer"] == str(trainer_dir()) and "PYTHONPATH" not in alone


def test_the_nnunet_interpreter_is_named_or_found(tmp_path, monkeypatch):
    monkeypatch.delenv(nnunet_runs.PYTHON_ENV, raising=False)
    with pytest.raises(NNUNetError, match=r"--nnunet-python .*nope/python: no such Python interpreter"):
        nnunet_runs.resolve_python(str(tmp_path / "nope" / "python"))
    monkeypatch.setenv(nnunet_runs.PYTHON_ENV, str(tmp_path / "gone"))
    with pytest.raises(NNUNetError, match=f"{nnunet_runs.PYTHON_ENV} .*gone: no such Python interpreter"):
        nnunet_runs.resolve_python()
    assert nnunet_runs.resolve_python(sys.executable) == str(Path(sys.executable).absolute())
    monkeypatch.delenv(nnunet_runs.PYTHON_ENV)
    monkeypatch.setattr(nnunet_runs, "nnunet_version", lambda: None)
    with pytest.raises(NNUNetError, match="give --nnunet-python"):
        nnunet_runs.resolve_python()
    monkeypatch.setattr(nnunet_runs, "nnunet_version", lambda: "2.8.1")
    assert nnunet_runs.resolve_python() == sys.executable


def test_compare_without_nnunet_in_the_named_environment_is_one_line_before_anything_trains(tiny_data, tmp_path,
                                                                                            capsys):
    if nnunet_runs.nnunet_version() is not None:
        pytest.skip("this environment has nnunetv2")
    out = tmp_path / "results"
    code = main(["compare", "--data", str(tiny_data), "--systems", "nnunet:nnUNetTrainer,segresnet_dice", "--seeds",
                 "1", "--out", str(out), "--nnunet-python", sys.executable, "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1, err
    assert err[0].startswith("beseg compare: error: ") and f"{sys.executable} has no nnunetv2" in err[0]
    assert not (out / "segresnet_dice").exists() and not (out / "nnUNetTrainer").exists()


def test_nnunet_runs_are_planned_as_repeats_with_the_tasks_data_settings(tiny_data, tmp_path):
    out = tmp_path / "results"
    specs = [resolve_system("nnunet:nnUNetTrainerBE", "phantom_spleen"), resolve_system("dice", "phantom_spleen")]
    runs = plan_runs(specs, [0, 1], out, overrides=["train.epochs=2", "data.val_frac=0.3"])
    nn = [r for r in runs if r.nnunet is not None]
    assert [r.id for r in nn] == ["nnUNetTrainerBE/repeat0", "nnUNetTrainerBE/repeat1"]
    assert all(r.kind == "nnunet" and r.state == "fresh" and r.run_dir == out.resolve() / r.id for r in nn)
    assert [r.name for r in nn] == ["nnUNetTrainerBE repeat 0", "nnUNetTrainerBE repeat 1"]
    # Only data settings reach an nnU-Net run (they make the split); its trainer decides the schedule.
    assert nn[0].config.data.val_frac == 0.3 and nn[0].config.train.epochs != 2
    beseg_run = next(r for r in runs if r.nnunet is None)
    assert beseg_run.id == "segresnet_dice/seed0" and beseg_run.config.train.epochs == 2
    write_plan_json(out, runs, "heldout", None, load_task(tiny_data).identity,
                    nnunet={"python": "/env/bin/python", "version": "2.8.1"})
    plan = read_plan_json(out)
    entry = next(e for e in plan["runs"] if e["id"] == "nnUNetTrainerBE/repeat1")
    assert entry["kind"] == "nnunet" and entry["seed"] == 1
    assert entry["nnunet"] == {"trainer": "nnUNetTrainerBE", "configuration": "3d_fullres", "plans": "nnUNetPlans"}
    assert plan["nnunet"] == {"python": "/env/bin/python", "version": "2.8.1"}


def _fold_dir(run_dir: Path, system: NNUNetSystem, fold: int = 0) -> Path:
    path = (run_dir / "nnUNet_results" / "Dataset500_Phantom" / f"{system.trainer}__nnUNetPlans__3d_fullres"
            / f"fold_{fold}")
    path.mkdir(parents=True)
    return path


def test_run_state_follows_nnunets_checkpoints_and_the_evaluation(tmp_path):
    system = NNUNetSystem("nnUNetTrainerBE")
    run_dir = tmp_path / "nnUNetTrainerBE" / "repeat0"
    assert run_state(run_dir, system, 0) == ("fresh", 0)
    fold = _fold_dir(run_dir, system)
    (fold / "training_log_2026_1_1_00_00_00.txt").write_text(
        "Epoch 0\nCurrent learning rate: 0.01\ntrain_loss -0.1\nEpoch time: 3.2 s\nYayy! New best EMA pseudo Dice: "
        "0.4123\n\nEpoch 1\ntrain_loss -0.3\nEpoch time: 3.1 s\nYayy! New best EMA pseudo Dice: 0.6021\n\nEpoch 2\n")
    (fold / "debug.json").write_text(json.dumps({"num_epochs": "5", "num_iterations_per_epoch": "250"}))
    assert run_state(run_dir, system, 0) == ("fresh", 0)
    (fold / "checkpoint_latest.pth").write_bytes(b"x")
    assert run_state(run_dir, system, 0) == ("resume", 2)
    assert read_progress(fold) == (2, 5, 0.6021)
    (fold / "checkpoint_final.pth").write_bytes(b"x")
    assert run_state(run_dir, system, 0)[0] == "evaluate"
    (run_dir / "eval").mkdir()
    (run_dir / "eval" / "summary.json").write_text("{}")
    assert run_state(run_dir, system, 0)[0] == "done"
    assert run_state(run_dir, system, 1) == ("fresh", 0)  # another fold's folder
    (run_dir / "nnunet.json").write_text(json.dumps({"system": NNUNetSystem("nnUNetTrainerBE", plans="Other").to_dict()}))
    with pytest.raises(ConfigError, match="holds an nnU-Net run of"):
        run_state(run_dir, system, 0)


def test_read_progress_without_a_log_knows_nothing(tmp_path):
    assert read_progress(None) == (0, None, None)
    assert read_progress(tmp_path) == (0, None, None)


def test_splits_final_holds_besegs_training_and_validation_cases_fold_by_fold():
    ids = [f"case_{i:02d}" for i in range(12)]
    split = make_split(ids, val_frac=0.2, test_frac=0.2, seed=0)
    assert nnunet_runs._splits_final({None: split}) == [{"train": sorted(split.train), "val": sorted(split.val)}]
    folds = make_folds(ids, 3, seed=0, val_frac=0.2)
    final = nnunet_runs._splits_final({2: folds[2], 0: folds[0], 1: folds[1]})
    assert final == [{"train": sorted(folds[f].train), "val": sorted(folds[f].val)} for f in range(3)]
    for f, entry in enumerate(final):  # fold f's test cases are in neither list
        assert not set(folds[f].test) & (set(entry["train"]) | set(entry["val"]))


@pytest.mark.parametrize("name, number, dataset", [("Task09_Spleen", 9, "Spleen"), ("phantom", 500, "Phantom"),
                                                   ("Task01_BrainTumour", 1, "BrainTumour")])
def test_the_nnunet_dataset_takes_the_msd_number_and_a_name_nnunets_converter_accepts(tmp_path, name, number,
                                                                                      dataset):
    folder = tmp_path / name
    folder.mkdir()
    (folder / "dataset.json").write_text(json.dumps({"name": name.partition("_")[2] or name, "modality": {"0": "CT"},
                                                      "labels": {"0": "background"}, "training": [], "test": []}))
    assert nnunet_runs._nnunet_number_and_name(load_task(folder, check_files=False)) == (number, dataset)


@pytest.mark.parametrize("names, expected", [
    (["segresnet_be", "nnUNetTrainerBE", "nnUNetTrainer"], "nnUNetTrainer"),
    (["segresnet_be", "segresnet_dice", "unet"], "segresnet_dice"),
    (["segresnet_be", "segresnet_focal"], "segresnet_be"),
])
def test_the_default_baseline_answers_does_be_improve_nnunet_when_nnunet_is_compared(names, expected):
    assert default_baseline(names) == expected


def test_nnunet_runs_on_a_dataset_without_a_preset_carry_only_its_data_settings(tiny_data, tmp_path):
    out = tmp_path / "results"
    specs = [resolve_system("nnunet:nnUNetTrainer", None), resolve_system("nnunet:nnUNetTrainerBE", None)]
    assert [s.config for s in specs] == ["", ""]
    with pytest.raises(ConfigError, match="'dice' needs one of beseg's task presets"):
        resolve_system("dice", None)
    runs = plan_runs(specs, [0], out, overrides=["data.val_frac=0.3", "train.epochs=7"], task_id="sparse_organs")
    assert [r.config.data.task for r in runs] == ["sparse_organs", "sparse_organs"]
    assert runs[0].config.data.val_frac == 0.3 and runs[0].config.data.split_file == str(out.resolve() / "split.json")
    write_plan_json(out, runs, "heldout", None, load_task(tiny_data).identity)
    resolved = [e["resolved"] for e in read_plan_json(out)["runs"]]
    assert [c.data.task for c in resolved] == ["sparse_organs", "sparse_organs"] and resolved[0].data.val_frac == 0.3
    with pytest.raises(ConfigError, match="unknown data.task 'sparse_organs'"):  # beseg's own configs still need one
        config_from_dict({"data": {"task": "sparse_organs"}, "model": {"network": "segresnet"}, "loss": {"name": "dice"}})


def test_a_dataset_without_a_preset_is_named_by_its_dataset_json(tmp_path):
    data = tmp_path / "Task501_Lab"
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (data / sub).mkdir(parents=True)
    (data / "dataset.json").write_text(json.dumps({"name": "Sparse Organs (v2)", "modality": {"0": "CT"},
                                                    "labels": {"0": "background", "1": "organ"}, "training": [],
                                                    "test": []}))
    assert nnunet_runs.dataset_task_id(load_task(data, check_files=False)) == "sparse_organs_v2"


def test_uncompressed_nifti_is_named_before_nnunets_converter_runs(tmp_path):
    data = tmp_path / "Task502_Plain"
    ids = [f"c{i}" for i in range(5)]
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (data / sub).mkdir(parents=True)
    for case in ids:
        nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)), data / "imagesTr" / f"{case}.nii")
        nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.uint8), np.eye(4)), data / "labelsTr" / f"{case}.nii")
    (data / "dataset.json").write_text(json.dumps({
        "name": "Plain", "modality": {"0": "CT"}, "labels": {"0": "background", "1": "organ"}, "test": [],
        "training": [{"image": f"./imagesTr/{c}.nii", "label": f"./labelsTr/{c}.nii"} for c in ids]}))
    split = make_split(ids, val_frac=0.2, test_frac=0.2, seed=0)
    with pytest.raises(NNUNetError, match=r"c0\.nii: nnU-Net's MSD converter reads \.nii\.gz files only"):
        nnunet_runs.prepare_dataset(ResultsLayout(tmp_path / "results"), load_task(data), {None: split}, "heldout",
                                    ["3d_fullres"], str(tmp_path / "no-python"), log=lambda _: None)


@pytest.mark.parametrize("baseline, names, expected", [
    ("nnUNetTrainer", ["nnUNetTrainer", "segresnet_be", "nnUNetTrainerBE"], "nnUNetTrainerBE"),
    ("nnUNetTrainer_ci", ["nnUNetTrainer_ci", "nnUNetTrainerBE_ci", "segresnet_dice"], "nnUNetTrainerBE_ci"),
    ("segresnet_dice", ["segresnet_dice", "nnUNetTrainerBE", "segresnet_be"], "segresnet_be"),
    ("unet", ["unet", "ahnet"], "ahnet"),
])
def test_the_contour_figure_shows_the_baselines_own_be_version(baseline, names, expected):
    assert be_counterpart(baseline, names) == expected

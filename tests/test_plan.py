"""Names that become paths, checked where they enter (:mod:`beseg.experiment.plan`, :mod:`beseg.experiment.layout`),
and the one split every system of a comparison shares (:func:`beseg.experiment.compare.split_config`).

A system's name is a folder of the results folder and ``plan.json``'s ``run_dir`` is a path inside
it: ``../x``, ``a/b``, an absolute path or the folder's own ``report``/``logs``/``slurm``/``nnunet``
would put runs outside the results folder, or where the report never looks.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest

from beseg.cli import main
from beseg.data import DatasetIdentity, load_task
from beseg.errors import ConfigError
from beseg.experiment import worker
from beseg.experiment.compare import run_compare, split_config
from beseg.experiment.layout import RESERVED_NAMES, run_id_problem, system_name_problem
from beseg.experiment.plan import planned_task, plan_runs, read_plan_json, resolve_system, write_plan_json
from conftest import tiny_compare

BAD_NAMES = ["../escaped", "a/b", "/tmp/absolute", "report", "logs", "slurm", "nnunet", "Report", "two words", "",
             ".hidden", "v1.2"]


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("BESEG_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "beseg-cache"))


def _system_yaml(folder: Path, name: str, **data: float) -> Path:
    path = folder / f"system_{re.sub(r'[^A-Za-z0-9]', '_', name)}.yaml"
    lines = ["base: phantom_spleen_segresnet_dice", f"system: {json.dumps(name)}"]
    if data:
        lines += ["data:", *(f"  {key}: {value}" for key, value in data.items())]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("name", BAD_NAMES)
def test_a_yaml_system_name_that_is_not_a_plain_folder_name_is_refused_naming_the_file(tmp_path, name):
    path = _system_yaml(tmp_path, name)
    with pytest.raises(ConfigError) as info:
        resolve_system(str(path), "phantom_spleen")
    assert str(info.value).startswith(f"{path}: system {name!r}: ")


def test_the_rule_accepts_every_shipped_and_nnunet_name_and_refuses_the_reserved_folders():
    from beseg.experiment.plan import ALIASES, TABLE1_SYSTEMS

    for name in [*TABLE1_SYSTEMS, *ALIASES.values(), "nnUNetTrainerBE", "nnUNetTrainer-3d_lowres", "be_lambda10"]:
        assert system_name_problem(name) is None, name
    assert all("reserved" in system_name_problem(name) for name in RESERVED_NAMES)
    with pytest.raises(ConfigError, match=r"--systems 'nnunet:report' 'report': .* own report/ folder"):
        resolve_system("nnunet:report", "phantom_spleen")
    assert run_id_problem("segresnet_be/seed0/fold2") is None and run_id_problem("nnUNetTrainer/repeat1") is None


def test_compare_refuses_an_escaping_system_name_in_one_line_and_writes_nothing(tiny_data, tmp_path, capsys):
    path = _system_yaml(tmp_path, "../escaped")
    out = tmp_path / "results"
    code = main(["compare", "--data", str(tiny_data), "--systems", f"dice,{path}", "--seeds", "1", "--out", str(out),
                 "--no-progress", *tiny_compare(tmp_path / "cache")])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "Traceback" not in err
    assert f"{path}: system '../escaped': a system name is a folder of the results folder" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no results folder, nothing beside it


def _plan(tmp_path: Path) -> Path:
    """A results folder with a plan.json of one pending run (nothing trained)."""
    out = tmp_path / "results"
    out.mkdir()
    runs = plan_runs([resolve_system("dice", "phantom_spleen")], [0], out, overrides=tiny_compare(tmp_path))
    write_plan_json(out, runs, "heldout", None, DatasetIdentity(tmp_path / "data", "0" * 64, ("a", "b"), ()))
    return out


@pytest.mark.parametrize("run_dir", ["../outside/seed0", "/tmp/elsewhere/seed0", "a/b/seed0", "report/seed0",
                                     "logs/seed0", "segresnet_dice/seed0/../../.."])
def test_a_plan_json_whose_run_dir_leaves_the_results_folder_is_refused(tmp_path, capsys, run_dir):
    out = _plan(tmp_path)
    plan = json.loads((out / "plan.json").read_text())
    run_id = plan["runs"][0]["id"]
    plan["runs"][0]["run_dir"] = run_dir
    (out / "plan.json").write_text(json.dumps(plan))
    with pytest.raises(ConfigError) as info:
        read_plan_json(out)
    assert str(info.value).startswith(f"{out / 'plan.json'}: run {run_id!r} has run_dir {run_dir!r}, which is not a "
                                      f"run folder inside {out}")
    # Neither the status nor a worker (what a launcher starts) goes there.
    assert main(["compare", str(out), "--status"]) == 1
    assert capsys.readouterr().err.count("\n") == 1
    assert worker.main([str(out), run_id, "--no-progress"]) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results"]
    assert sorted(p.name for p in out.iterdir()) == ["plan.json"]


def test_a_plan_json_whose_split_file_leaves_the_results_folder_is_refused(tmp_path):
    out = _plan(tmp_path)
    plan = json.loads((out / "plan.json").read_text())
    plan["runs"][0]["config"]["data"]["split_file"] = "../other/split.json"
    (out / "plan.json").write_text(json.dumps(plan))
    with pytest.raises(ConfigError, match=r"has data.split_file '../other/split.json', which is not the results "):
        read_plan_json(out)


def test_systems_that_disagree_on_the_split_are_refused_naming_both(tiny_data, tmp_path):
    """The split was made from the first system's fractions alone; now the systems must agree."""
    from beseg.engine.config import load_config

    preset = load_config("phantom_spleen_segresnet_dice")[0].data.val_frac
    mine = _system_yaml(tmp_path, "wider_val", val_frac=preset + 0.1)
    out = tmp_path / "results"
    with pytest.raises(ConfigError) as info:
        run_compare(tiny_data, ["dice", str(mine)], 1, out, overrides=tiny_compare(tmp_path), log=lambda _: None)
    assert str(info.value).startswith(f"systems segresnet_dice and wider_val disagree on data.val_frac ({preset} in "
                                      f"segresnet_dice, {preset + 0.1} in wider_val): a comparison has one split")
    assert not out.exists()
    seeded = _system_yaml(tmp_path, "other_seed", split_seed=7)
    with pytest.raises(ConfigError, match=r"segresnet_dice and other_seed disagree on data.split_seed \(0 in"):
        run_compare(tiny_data, ["dice", str(seeded)], 1, out, overrides=tiny_compare(tmp_path), log=lambda _: None)
    # Given to every system, the setting is one: no disagreement.
    runs = plan_runs([resolve_system("dice", "phantom_spleen"), resolve_system(str(mine), "phantom_spleen")], [0], out,
                     overrides=["data.val_frac=0.3"])
    assert split_config(runs).data.val_frac == 0.3 and not out.exists()


# ----------------------------------------------------------------------------------------------
# the dataset's identity in plan.json


def _planned_on_a_copy(tiny_data: Path, tmp_path: Path) -> tuple[Path, Path]:
    """(results folder, dataset folder): a plan.json of one run on a copy of the tiny dataset."""
    data = tmp_path / "Task09_Spleen"
    shutil.copytree(tiny_data, data)
    out = tmp_path / "results"
    out.mkdir()
    runs = plan_runs([resolve_system("dice", "phantom_spleen")], [0], out, overrides=tiny_compare(tmp_path))
    write_plan_json(out, runs, "heldout", None, load_task(data).identity)
    return out, data


def _add_a_case(data: Path) -> None:
    """dataset.json lists one more training case (a copy of the first case's files)."""
    meta = json.loads((data / "dataset.json").read_text())
    first = meta["training"][0]
    for key in ("image", "label"):
        shutil.copy(data / first[key], data / first[key].replace(".nii.gz", "_copy.nii.gz"))
    meta["training"].append({k: v.replace(".nii.gz", "_copy.nii.gz") for k, v in first.items()})
    meta["numTraining"] = len(meta["training"])
    (data / "dataset.json").write_text(json.dumps(meta, indent=2))


def test_plan_json_records_the_folder_the_dataset_json_sha256_and_the_case_list(tiny_data, tmp_path):
    out, data = _planned_on_a_copy(tiny_data, tmp_path)
    meta = json.loads((data / "dataset.json").read_text())
    recorded = json.loads((out / "plan.json").read_text())["data"]
    assert recorded == {
        "folder": str(data.resolve()),
        "dataset_json_sha256": hashlib.sha256((data / "dataset.json").read_bytes()).hexdigest(),
        "training": [Path(e["image"]).name.removesuffix(".nii.gz") for e in meta["training"]],
        "test": [str(Path(p)) for p in meta.get("test", [])],
    }
    assert planned_task(read_plan_json(out)) == load_task(data)


def test_beseg_train_under_srun_stops_in_one_line_when_the_dataset_changed_since_planning(tiny_data, tmp_path, capsys):
    out, data = _planned_on_a_copy(tiny_data, tmp_path)
    before = hashlib.sha256((data / "dataset.json").read_bytes()).hexdigest()
    _add_a_case(data)
    after = hashlib.sha256((data / "dataset.json").read_bytes()).hexdigest()
    run = tmp_path / "run"
    # What each rank of a multi-rank run executes (worker._train_with_srun).
    code = main(["train", "--plan", str(out / "plan.json"), "phantom_spleen_segresnet_dice", "--out", str(run),
                 "--no-progress", *tiny_compare(tmp_path)])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "Traceback" not in err
    assert err.strip() == (
        f"beseg train: error: {out.resolve() / 'plan.json'}: the dataset changed since this comparison was planned "
        f"(Task09_Spleen/dataset.json: 10 -> 11 training cases (added phantom_spleen_000_copy), SHA-256 "
        f"{before[:12]}... -> {after[:12]}...); run the same beseg compare command again to plan it anew")
    assert not run.exists()


def test_a_plan_json_with_the_folder_alone_is_read_and_its_dataset_loaded_unchecked(tiny_data, tmp_path):
    out, data = _planned_on_a_copy(tiny_data, tmp_path)
    plan = json.loads((out / "plan.json").read_text())
    plan["data"] = str(data)  # as beseg wrote it before plan.json recorded the dataset's identity
    (out / "plan.json").write_text(json.dumps(plan))
    _add_a_case(data)
    read = read_plan_json(out)
    assert read["identity"] is None
    lines: list[str] = []
    task = planned_task(read, log=lines.append)
    assert len(task.training) == 11  # nothing to check it against: the folder as it is now
    assert lines == [f"{out.resolve() / 'plan.json'}: no identity of the dataset recorded (written by an older beseg); "
                     f"{data} is loaded unchecked. Run the compare command again to record it."]


def test_a_damaged_dataset_identity_in_plan_json_is_refused_in_one_line(tiny_data, tmp_path):
    out, _ = _planned_on_a_copy(tiny_data, tmp_path)
    plan = json.loads((out / "plan.json").read_text())
    del plan["data"]["dataset_json_sha256"]
    (out / "plan.json").write_text(json.dumps(plan))
    with pytest.raises(ConfigError, match=r"plan\.json: cannot read it \('data' must hold a folder, a "
                                          r"dataset_json_sha256 and the training and test lists\); run the compare"):
        read_plan_json(out)

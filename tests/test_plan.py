"""Names that become paths, checked where they enter (:mod:`beseg.experiment.plan`, :mod:`beseg.experiment.layout`),
and the one split every system of a comparison shares (:func:`beseg.experiment.compare.split_config`).

A system's name is a folder of the results folder and ``plan.json``'s ``run_dir`` is a path inside
it: ``../x``, ``a/b``, an absolute path or the folder's own ``report``/``logs``/``slurm``/``nnunet``
would put runs outside the results folder, or where the report never looks.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from beseg.cli import main
from beseg.data import DatasetIdentity
from beseg.errors import ConfigError
from beseg.experiment import worker
from beseg.experiment.compare import run_compare, split_config
from beseg.experiment.layout import RESERVED_NAMES, run_id_problem, system_name_problem
from beseg.experiment.plan import plan_runs, read_plan_json, resolve_system, write_plan_json
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

"""Tests of beseg.experiment.compare, demo and reproduce, and their CLI commands, on a tiny phantom.

The protocols: held-out (default; numbers on test cases only), paper (on the validation cases that
chose best.pt) and k-fold cross-validation (out-of-fold, every case once, merged per run).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import beseg.data.msd as msd_module
import beseg.engine.trainer as trainer_module
import beseg.experiment.worker as worker_module
from beseg.cli import main
from beseg.engine.checkpoint import load_checkpoint
from beseg.data import load_task, make_split
from beseg.engine.config import load_config
from beseg.engine.evaluate import evaluate
from beseg.errors import ConfigError, DataError
from beseg.report.collect import collect_results
from beseg.experiment.compare import resolve_system, run_compare
from beseg.experiment.launch import LocalLauncher
from conftest import TINY_COMPARE, per_case_rows, tiny_compare, tree_state
from beseg.experiment.demo import DEMO_OVERRIDES, DEMO_PHANTOM, DEMO_SPLIT, demo_overrides

@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    """Keep every cache (phantoms, intensity stats) out of ~/.cache."""
    monkeypatch.setenv("BESEG_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "beseg-cache"))


def _tiny(tmp: Path) -> list[str]:
    return tiny_compare(tmp)


class DatasetReads:
    """Every parse of a ``dataset.json`` by the data layer while installed, named by the function outside the
    loaders (beseg.data.msd, beseg.data.check) that asked for it."""

    def __init__(self, mp: pytest.MonkeyPatch) -> None:
        self.askers: list[str] = []
        real = msd_module._read_meta

        def counting(*args, **kwargs):
            frame = sys._getframe(1)
            while frame.f_globals.get("__name__") in ("beseg.data.msd", "beseg.data.check"):
                frame = frame.f_back
            self.askers.append(f"{frame.f_globals.get('__name__')}.{frame.f_code.co_qualname}")
            return real(*args, **kwargs)

        mp.setattr(msd_module, "_read_meta", counting)


@pytest.fixture(scope="module")
def compared_command(tiny_data, tmp_path_factory) -> tuple[Path, list[str]]:
    """A finished tiny comparison made by ``beseg compare`` (2 systems x 2 seeds, in this process), and who read
    ``dataset.json`` meanwhile (:class:`DatasetReads`)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("BESEG_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "beseg-cache"))
    reads = DatasetReads(mp)
    out = tmp_path_factory.mktemp("compare") / "results"
    try:
        code = main(["compare", "--data", str(tiny_data), "--systems", "dice,dice_be", "--seeds", "2", "--out",
                     str(out), "--no-progress", *TINY_COMPARE, "--set", f"data.cache_dir={out.parent / 'cache'}"])
    finally:
        mp.undo()
    assert code == 0
    return out, reads.askers


@pytest.fixture(scope="module")
def compared(compared_command) -> Path:
    """A finished tiny comparison: 2 systems x 2 seeds."""
    return compared_command[0]


@pytest.mark.slow
def test_one_compare_command_reads_dataset_json_once_and_hands_the_task_down(compared_command, tiny_data):
    """Planning, splits, data check, four trainings and evaluations and the report: one read, at the entry."""
    results, askers = compared_command
    assert askers == ["beseg.experiment.compare.run_compare"]
    recorded = json.loads((results / "plan.json").read_text())["data"]
    meta = json.loads((tiny_data / "dataset.json").read_text())
    assert recorded == {"folder": str(tiny_data.resolve()),
                        "dataset_json_sha256": hashlib.sha256((tiny_data / "dataset.json").read_bytes()).hexdigest(),
                        "training": [Path(e["image"]).name.removesuffix(".nii.gz") for e in meta["training"]],
                        "test": []}


def test_the_read_count_sees_a_layer_that_loads_the_dataset_again(tiny_data, tmp_path, monkeypatch):
    """The counter can fail: a step below the entry that loads the folder again (as the data check did) is seen,
    although its module imported load_task by name."""
    from beseg.experiment import compare

    monkeypatch.setenv("BESEG_CACHE_DIR", str(tmp_path / "cache"))
    reads = DatasetReads(monkeypatch)

    class Planted(Exception):
        pass

    def check_data_loading_again(task, *args, **kwargs):
        load_task(task.root, check_files=False)
        raise Planted  # stop before anything trains

    monkeypatch.setattr(compare, "_check_data", check_data_loading_again)
    with pytest.raises(Planted):
        run_compare(tiny_data, ["dice"], 1, tmp_path / "r", overrides=_tiny(tmp_path), log=lambda _: None)
    assert reads.askers == ["beseg.experiment.compare.run_compare",
                            f"{__name__}.test_the_read_count_sees_a_layer_that_loads_the_dataset_again.<locals>."
                            "check_data_loading_again"]


def _per_case_mean(run: Path, metric: str = "dice") -> float:
    with open(run / "eval" / "per_case.csv", newline="") as f:
        return float(np.mean([float(r[metric]) for r in csv.DictReader(f)]))


def _table_dice(report_md: str, system: str) -> tuple[float, float]:
    """``(mean, sd)`` of a system's row in the report's Table 1 (Dice)."""
    section = report_md.split("## Table 1", 1)[1]
    match = re.search(rf"^\| {system} \| [^|]+ \| ([0-9.]+) ± ([0-9.]+) \|", section, flags=re.M)
    assert match, f"no Table 1 row for {system}"
    return float(match.group(1)), float(match.group(2))


# ----------------------------------------------------------------------------------------------
# (a) the report's numbers come from the runs


@pytest.mark.slow
def test_table_dice_is_mean_over_seeds_of_per_case_csv(compared):
    report = compared / "report"
    assert (report / "report.md").is_file() and (report / "report.html").is_file()
    md = (report / "report.md").read_text()
    for system in ("segresnet_dice", "segresnet_be"):
        per_seed = [_per_case_mean(compared / system / f"seed{k}") for k in (0, 1)]
        mean, sd = _table_dice(md, system)
        assert mean == pytest.approx(np.mean(per_seed), abs=5e-4)
        assert sd == pytest.approx(np.std(per_seed, ddof=1), abs=5e-4)


def _csv_cases(path: Path) -> list[str]:
    with open(path, newline="") as f:
        return sorted({r["case"] for r in csv.DictReader(f)})


@pytest.mark.slow
def test_every_run_is_scored_on_the_held_out_test_cases_only(compared, tiny_data):
    split = json.loads((compared / "split.json").read_text())
    train, val, test = (set(split[k]) for k in ("train", "val", "test"))
    assert (len(train), len(val), len(test)) == (6, 2, 2)  # the phantom presets' shares: val 0.2, test 0.2
    assert not train & val and not train & test and not val & test
    assert train | val | test == {c.id for c in load_task(tiny_data).training}
    for system in ("segresnet_dice", "segresnet_be"):
        for k in (0, 1):
            run = compared / system / f"seed{k}"
            config = yaml.safe_load((run / "config.yaml").read_text())
            assert config["train"]["seed"] == k
            assert config["system"] == system
            assert Path(config["data"]["split_file"]) == (compared / "split.json").resolve()
            assert _csv_cases(run / "eval" / "per_case.csv") == sorted(test)
            summary = json.loads((run / "eval" / "summary.json").read_text())
            assert (summary["protocol"], summary["split"], summary["folds"]) == ("heldout", "test", None)
            assert summary["selection"] == "best.pt by val Dice" and sorted(summary["case_ids"]) == sorted(test)
            assert Path(summary["checkpoint"]).name == "best.pt"
    # What the report reads: per-case rows of test cases only.
    results = collect_results(compared)
    assert len(results.runs) == 4
    assert all({r["case"] for r in run.per_case} == test for run in results.runs)
    assert yaml.safe_load((compared / "compare.yaml").read_text())["protocol"] == "heldout"


# ----------------------------------------------------------------------------------------------
# (b) finished runs are never retrained; interrupted ones resume


class _Spy:
    def __init__(self, monkeypatch):
        self.train_calls: list[tuple[Path, bool]] = []
        self.eval_calls: list[Path] = []
        real_train, real_eval = worker_module.train, worker_module.evaluate

        def train(config, data_dir, run_dir, resume=False, progress=True):
            self.train_calls.append((Path(run_dir), resume))
            return real_train(config, data_dir, run_dir, resume=resume, progress=progress)

        def evaluate(run_dir, data_dir, **kwargs):
            self.eval_calls.append(Path(run_dir))
            return real_eval(run_dir, data_dir, **kwargs)

        monkeypatch.setattr(worker_module, "train", train)
        monkeypatch.setattr(worker_module, "evaluate", evaluate)


@pytest.mark.slow
def test_rerun_skips_finished_runs_and_reevaluates_only_what_is_missing(compared, tiny_data, monkeypatch):
    checkpoints = sorted(compared.glob("*/seed*/checkpoints/*.pt"))
    mtimes = [p.stat().st_mtime_ns for p in checkpoints]
    spy = _Spy(monkeypatch)
    lines: list[str] = []
    result = run_compare(tiny_data, ["dice", "dice_be"], 2, compared, overrides=_tiny(compared.parent),
                         progress=False, log=lines.append)
    assert spy.train_calls == [] and spy.eval_calls == []
    assert [p.stat().st_mtime_ns for p in checkpoints] == mtimes
    assert sum("skipped" in line for line in lines) == 4
    assert result.report is not None and result.report.is_file()

    # An evaluation lost (e.g. interrupted): only that run is evaluated again, nothing retrained.
    import shutil

    shutil.rmtree(compared / "segresnet_be" / "seed1" / "eval")
    run_compare(tiny_data, ["dice", "dice_be"], 2, compared, overrides=_tiny(compared.parent), progress=False,
                log=lines.append, report=False)
    assert spy.train_calls == []
    assert spy.eval_calls == [compared / "segresnet_be" / "seed1"]
    assert [p.stat().st_mtime_ns for p in checkpoints] == mtimes


@pytest.mark.slow
def test_interrupted_training_resumes_where_it_stopped(tiny_data, tmp_path, monkeypatch):
    out = tmp_path / "results"
    overrides = [*_tiny(tmp_path), "train.epochs=2"]
    real_save = trainer_module.atomic_save

    def save_then_interrupt(state, path, **kwargs):
        real_save(state, path, **kwargs)
        if Path(path).name == "last.pt" and state["epoch"] == 1:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C after epoch 1

    monkeypatch.setattr(trainer_module, "atomic_save", save_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        run_compare(tiny_data, ["dice"], 1, out, overrides=overrides, progress=False, log=lambda _: None)
    monkeypatch.setattr(trainer_module, "atomic_save", real_save)
    run = out / "segresnet_dice" / "seed0"
    assert load_checkpoint(run / "checkpoints" / "last.pt")["epoch"] == 1
    assert not (run / "eval").exists()

    spy = _Spy(monkeypatch)
    lines: list[str] = []
    run_compare(tiny_data, ["dice", "be"], 1, out, overrides=overrides, progress=False, log=lines.append,
                report=False)
    assert spy.train_calls == [(run, True), (out / "segresnet_be" / "seed0", False)]
    assert "resumes at epoch 2 of 2" in lines[2]  # after the comparison line and the protocol line
    assert load_checkpoint(run / "checkpoints" / "last.pt")["epoch"] == 2
    assert [json.loads(x)["epoch"] for x in (run / "metrics.jsonl").read_text().splitlines()
            if json.loads(x)["kind"] == "train"] == [1, 2]


@pytest.mark.slow
def test_changed_settings_are_refused_not_reused(compared, tiny_data):
    with pytest.raises(ConfigError, match=r"different settings \(train.epochs: 1 in the run, 3 now"):
        run_compare(tiny_data, ["dice"], 1, compared, overrides=[*_tiny(compared.parent), "train.epochs=3"],
                    progress=False, log=lambda _: None)


# ----------------------------------------------------------------------------------------------
# (c) the paper protocol and k-fold cross-validation


@pytest.mark.slow
def test_paper_protocol_scores_the_validation_cases_and_says_so(tiny_data, tmp_path):
    out = tmp_path / "paper"
    lines: list[str] = []
    run_compare(tiny_data, ["dice"], 1, out, overrides=_tiny(tmp_path), progress=False, report=False,
                protocol="paper", log=lines.append)
    split = json.loads((out / "split.json").read_text())
    assert split["test"] == [] and (len(split["train"]), len(split["val"])) == (8, 2)  # the paper's 80/20
    run = out / "segresnet_dice" / "seed0"
    assert _csv_cases(run / "eval" / "per_case.csv") == sorted(split["val"])
    summary = json.loads((run / "eval" / "summary.json").read_text())
    assert (summary["protocol"], summary["split"], summary["selection"]) == ("paper", "val", "best.pt by val Dice")
    assert any("protocol paper" in line and "optimistic" in line for line in lines)
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert (config["data"]["val_frac"], config["data"]["test_frac"]) == (0.2, 0.0)
    # Nothing was held out: a test evaluation is refused, and so is a held-out comparison in this folder.
    with pytest.raises(DataError, match="no test cases: a two-way train/val split"):
        evaluate(run, tiny_data, split="test", out=tmp_path / "ev", progress=False)
    with pytest.raises(ValueError, match="protocol 'heldout' does not fit split 'val'"):
        evaluate(run, tiny_data, split="val", out=tmp_path / "ev", progress=False, protocol="heldout")
    with pytest.raises(ConfigError, match="made with protocol paper, not protocol heldout"):
        run_compare(tiny_data, ["dice"], 1, out, overrides=_tiny(tmp_path), progress=False, log=lambda _: None)


@pytest.mark.slow
def test_cross_validation_scores_every_case_once_and_merges_the_folds(tiny_data, tmp_path, monkeypatch):
    out = tmp_path / "cv"
    run_compare(tiny_data, ["dice"], 1, out, overrides=_tiny(tmp_path), progress=False, report=False, folds=3,
                log=lambda _: None)
    ids = sorted(c.id for c in load_task(tiny_data).training)
    folds = [json.loads((out / f"split_fold{f}.json").read_text()) for f in range(3)]
    assert sorted(c for fold in folds for c in fold["test"]) == ids  # every case tested exactly once
    seed = out / "segresnet_dice" / "seed0"
    rows = []
    for f, fold in enumerate(folds):
        assert not (set(fold["train"]) | set(fold["val"])) & set(fold["test"])
        fold_eval = seed / f"fold{f}" / "eval"
        assert _csv_cases(fold_eval / "per_case.csv") == sorted(fold["test"])
        assert json.loads((fold_eval / "summary.json").read_text())["protocol"] == "cv"
        rows += list(csv.DictReader(open(fold_eval / "per_case.csv", newline="")))
    merged = list(csv.DictReader(open(seed / "eval" / "per_case.csv", newline="")))
    assert sorted(r["case"] for r in merged) == ids  # one class: one row per case
    by_case = {r["case"]: r for r in rows}
    for row in merged:  # the fold's own numbers, unchanged
        assert float(row["dice"]) == pytest.approx(float(by_case[row["case"]]["dice"]), abs=1e-12)
    summary = json.loads((seed / "eval" / "summary.json").read_text())
    assert (summary["protocol"], summary["split"], summary["folds"]) == ("cv", "oof", 3)
    assert sorted(summary["case_ids"]) == ids and summary["cases"] == len(ids)
    assert summary["mean"]["dice"] == pytest.approx(np.mean([float(r["dice"]) for r in rows]), abs=1e-9)
    assert sorted(p.name for p in (seed / "eval" / "predictions").iterdir()) == [f"{c}.nii.gz" for c in ids]
    # The report reads the K folds as one run.
    results = collect_results(out)
    assert [(r.system, r.seed) for r in results.runs] == [("segresnet_dice", 0)]
    assert sorted({r["case"] for r in results.runs[0].per_case}) == ids and results.runs[0].train

    # Rerun: nothing trains or evaluates, the merge is kept; a lost merge is redone from the folds alone.
    stamp = (seed / "eval" / "summary.json").stat().st_mtime_ns
    spy = _Spy(monkeypatch)
    run_compare(tiny_data, ["dice"], 1, out, overrides=_tiny(tmp_path), progress=False, report=False, folds=3,
                log=lambda _: None)
    assert spy.train_calls == [] and spy.eval_calls == []
    assert (seed / "eval" / "summary.json").stat().st_mtime_ns == stamp
    import shutil

    shutil.rmtree(seed / "eval")
    run_compare(tiny_data, ["dice"], 1, out, overrides=_tiny(tmp_path), progress=False, report=False, folds=3,
                log=lambda _: None)
    assert spy.train_calls == [] and spy.eval_calls == []
    assert list(csv.DictReader(open(seed / "eval" / "per_case.csv", newline=""))) == merged
    # A fold evaluated again after the merge (as after a crash between its new evaluation and the merge) makes the
    # same command merge again: the merge depends on the folds' files, not on what was unfinished at planning.
    from beseg.score import write_per_case

    again = list(csv.DictReader(open(seed / "fold1" / "eval" / "per_case.csv", newline="")))
    again[0]["dice"] = "0.125"
    write_per_case(again, seed / "fold1" / "eval" / "per_case.csv")
    run_compare(tiny_data, ["dice"], 1, out, overrides=_tiny(tmp_path), progress=False, report=False, folds=3,
                log=lambda _: None)
    assert spy.train_calls == [] and spy.eval_calls == []
    remerged = {r["case"]: r["dice"] for r in csv.DictReader(open(seed / "eval" / "per_case.csv", newline=""))}
    assert remerged[again[0]["case"]] == "0.125" and len(remerged) == len(ids)
    with pytest.raises(ConfigError, match="made with protocol cv with 3 folds, not protocol cv with 2 folds"):
        run_compare(tiny_data, ["dice"], 1, out, overrides=_tiny(tmp_path), folds=2, log=lambda _: None)


# ----------------------------------------------------------------------------------------------
# naming and errors (fast)


def test_protocol_arguments_and_a_two_way_split_are_refused_before_training(tiny_data, tmp_path):
    with pytest.raises(ConfigError, match="--protocol must be one of heldout, paper"):
        run_compare(tiny_data, ["dice"], 1, tmp_path / "r", protocol="optimistic", log=lambda _: None)
    with pytest.raises(ConfigError, match="--folds must be at least 2"):
        run_compare(tiny_data, ["dice"], 1, tmp_path / "r", folds=1, log=lambda _: None)
    with pytest.raises(ConfigError, match="the paper protocol has no test cases"):
        run_compare(tiny_data, ["dice"], 1, tmp_path / "r", protocol="paper", folds=5, log=lambda _: None)
    with pytest.raises(ConfigError, match="compare sets .*data.test_frac itself"):
        run_compare(tiny_data, ["dice"], 1, tmp_path / "r", protocol="paper", overrides=["data.test_frac=0.3"],
                    log=lambda _: None)
    assert not (tmp_path / "r").exists()
    # A results folder from before held-out test sets: a two-way split.json is never taken for a test set.
    old = tmp_path / "old"
    old.mkdir()
    ids = sorted(c.id for c in load_task(tiny_data).training)
    (old / "split.json").write_text(json.dumps({"seed": 0, "val_frac": 0.2, "train": ids[2:], "val": ids[:2]}))
    with pytest.raises(DataError, match=r"split.json is a two-way train/val split .* cannot be a held-out test set"):
        run_compare(tiny_data, ["dice"], 1, old, overrides=_tiny(tmp_path), log=lambda _: None)
    assert sorted(p.name for p in old.iterdir()) == ["split.json"]  # nothing trained


def test_system_names_aliases_and_yaml(tmp_path):
    assert resolve_system("dice", "task09").config == "task09_segresnet_dice"
    assert resolve_system("dice_be", "phantom_spleen").name == "segresnet_be"
    assert resolve_system("be", "task01").config == "task01_segresnet_be"
    assert resolve_system("unet", "task09").name == "unet"
    custom = tmp_path / "mine.yaml"
    custom.write_text("base: phantom_spleen_segresnet_be\nsystem: be_lambda10\nloss:\n  lambda_be: 10.0\n")
    spec = resolve_system(str(custom), "phantom_spleen")
    assert (spec.name, spec.config) == ("be_lambda10", str(custom))
    with pytest.raises(ConfigError, match="unknown system 'segresnet_xx'"):
        resolve_system("segresnet_xx", "task09")


def test_pinned_keys_and_bad_data_are_refused(tiny_data, tmp_path):
    with pytest.raises(ConfigError, match="compare sets train.seed"):
        run_compare(tiny_data, ["dice"], 1, tmp_path / "r", overrides=["train.seed=3"], log=lambda _: None)
    with pytest.raises(DataError, match="no dataset.json"):
        run_compare(tmp_path / "nowhere", ["dice"], 1, tmp_path / "r", log=lambda _: None)
    with pytest.raises(ConfigError, match="no Table 1 presets for task 'task99'"):
        run_compare(tiny_data, ["dice"], 1, tmp_path / "r", prefix="task99", log=lambda _: None)
    assert not (tmp_path / "r").exists()


def test_demo_runs_the_phantom_presets_own_schedule_on_16_test_cases():
    assert demo_overrides() == DEMO_OVERRIDES
    assert not [o for o in DEMO_OVERRIDES if not o.startswith(("data.test_frac=", "data.val_frac="))]
    preset, _ = load_config("phantom_spleen_segresnet_be", DEMO_OVERRIDES)
    shipped, _ = load_config("phantom_spleen_segresnet_be")
    assert (preset.data.patch_size, preset.train) == (shipped.data.patch_size, shipped.train)  # the same schedule
    # Enough paired test cases for the exact sign-flip test to reach p < 0.001 (2 / 2^n), and cases left to train on.
    ids = [f"case{i}" for i in range(DEMO_PHANTOM["cases"])]
    split = make_split(ids, val_frac=preset.data.val_frac, test_frac=preset.data.test_frac)
    assert len(split.test) >= 16 and 2 / 2 ** len(split.test) < 1e-3
    assert (len(split.train), len(split.val)) == (20, 4)
    assert DEMO_SPLIT == {"test_frac": preset.data.test_frac, "val_frac": preset.data.val_frac}
    tiny = demo_overrides(epochs=1, steps=2, patch=16, init_filters=8)
    assert "train.epochs=1" in tiny and "data.patch_size=[16,16,16]" in tiny and "train.val_every=1" in tiny


@pytest.mark.parametrize("argv, message", [
    (["compare", "--systems", "dice,nonsense", "--seeds", "1", "--out", "{tmp}/r", "--data", "{data}"],
     "unknown system 'nonsense'"),
    (["compare", "--systems", "dice", "--out", "{tmp}/r", "--task", "task09"], "--data DIR is required"),
    (["compare", "--systems", "dice", "--out", "{tmp}/r", "--data", "{tmp}/missing"], "no dataset.json"),
    (["reproduce", "--task", "task09"], "--data DIR is required: the MSD Task09_Spleen folder"),
])
def test_cli_errors_are_one_line_without_traceback(argv, message, tiny_data, tmp_path, capsys):
    argv = [a.format(tmp=tmp_path, data=tiny_data) for a in argv]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert err.startswith(f"beseg {argv[0]}: error: ")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU refusal")
def test_reproduce_refuses_without_gpu_unless_cpu_ok(tiny_data, capsys):
    assert main(["reproduce", "--task", "task09", "--data", str(tiny_data)]) == 1
    err = capsys.readouterr().err
    assert "meant for GPUs" in err and "--cpu-ok" in err and "Traceback" not in err


# ----------------------------------------------------------------------------------------------
# (c) the CLI end to end


@pytest.mark.slow
def test_cli_compare_reuses_finished_runs(compared, tiny_data, capsys):
    # Trailing KEY=VALUE and --set both reach every run; the settings match, so nothing retrains.
    argv = ["compare", "--data", str(tiny_data), "--systems", "dice,dice_be", "--seeds", "2", "--out", str(compared),
            "--no-progress", *TINY_COMPARE, "--set", f"data.cache_dir={compared.parent / 'cache'}"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.count("skipped") == 4 and "[4/4] segresnet_be seed 1" in out
    assert f"open it: {(compared / 'report' / 'report.html').resolve().as_uri()}" in out


@pytest.mark.slow
def test_cli_demo_tiny(tmp_path, capsys):
    out = tmp_path / "demo"
    argv = ["demo", "--out", str(out), "--no-progress", "--epochs", "1", "--steps", "2", "--patch", "16",
            "--init-filters", "8", "--phantom-cases", "10", "--phantom-size", "32", "32", "12",
            "--set", "data.num_workers=0", "--set", "train.threads=1"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "segresnet_dice seed 0" in text and "segresnet_be seed 0" in text
    assert f"open it: {(out / 'report' / 'report.html').resolve().as_uri()}" in text
    md = (out / "report" / "report.md").read_text()
    assert "segresnet_be" in md and "segresnet_dice" in md
    # The verdict opens with the primary comparison's sentence, then the corrected family.
    paragraphs = md.split("## Verdict", 1)[1].strip().split("\n\n")
    assert paragraphs[0].startswith("Primary comparison, segresnet_be vs segresnet_dice in Dice on 4 test cases, 1 seed: ")
    assert "declared in plan.json before any run had finished" in paragraphs[0]
    assert paragraphs[1].startswith("Secondary comparisons")
    assert "Holm's step-down procedure at 5% family-wise" in paragraphs[1]
    test = json.loads((out / "split.json").read_text())["test"]
    assert len(test) == 4  # 40 % of 10 phantom cases
    assert _csv_cases(out / "segresnet_be" / "seed0" / "eval" / "per_case.csv") == sorted(test)
    assert main(argv) == 0  # reuses the folder
    assert capsys.readouterr().out.count("skipped") == 2


@pytest.mark.slow
def test_compare_report_figures_load_in_headless_chromium(compared, tmp_path):
    from test_report import _load_in_chromium  # the report tests' headless-Chromium helper

    html = compared / "report" / "report.html"
    probe = ("<script>window.addEventListener('load', () => { document.body.setAttribute('data-images', "
             "JSON.stringify([...document.images].map(i => i.complete && i.naturalWidth > 0))); });</script>")
    page = html.with_name("probe.html")
    page.write_text(html.read_text().replace("</body>", probe + "</body>"))
    try:
        dom = _load_in_chromium(page, tmp_path)
    finally:
        page.unlink()
    match = re.search(r'data-images="([^"]*)"', dom)
    assert match, dom[-2000:]
    loaded = json.loads(match.group(1).replace("&quot;", '"'))
    assert len(loaded) >= 3 and all(loaded), loaded
    shot = tmp_path / "shot.png"
    _load_in_chromium(html, tmp_path, screenshot=shot)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------------------------
# (e) plan, launchers, status: the comparison as independent runs


_rows = per_case_rows


@pytest.mark.slow
def test_plan_json_lists_every_run_with_relative_paths(compared):
    plan = json.loads((compared / "plan.json").read_text())
    assert [(r["system"], r["seed"], r["fold"], r["state"]) for r in plan["runs"]] == [
        ("segresnet_dice", 0, None, "done"), ("segresnet_dice", 1, None, "done"),
        ("segresnet_be", 0, None, "done"), ("segresnet_be", 1, None, "done")]
    for run in plan["runs"]:
        assert run["id"] == run["run_dir"] == f"{run['system']}/seed{run['seed']}"
        assert run["config"]["train"]["seed"] == run["seed"] and run["config"]["data"]["split_file"] == "split.json"


@pytest.mark.slow
def test_plan_json_declares_the_primary_comparison_before_training(compared):
    primary = json.loads((compared / "plan.json").read_text())["primary"]
    assert {k: primary[k] for k in ("system", "baseline", "metric", "chosen", "runs_done", "runs_total")} == {
        "system": "segresnet_be", "baseline": "segresnet_dice", "metric": "dice", "chosen": "default", "runs_done": 0,
        "runs_total": 4}
    verdict = (compared / "report" / "report.md").read_text().split("## Verdict", 1)[1]
    assert verdict.strip().startswith("Primary comparison, segresnet_be vs segresnet_dice in Dice on 2 test cases, "
                                      "2 seeds: ")
    assert "It was declared in plan.json before any run had finished, by the default rule" in verdict


@pytest.mark.slow
def test_a_changed_primary_is_refused_in_one_line_and_replan_is_reported(compared, tiny_data, tmp_path, capsys):
    out = tmp_path / "results"
    shutil.copytree(compared, out)
    argv = ["compare", "--data", str(tiny_data), "--systems", "dice,dice_be", "--seeds", "2", "--out", str(out),
            "--no-progress", *TINY_COMPARE, "--set", f"data.cache_dir={compared.parent / 'cache'}"]
    before = tree_state(out)
    assert main([*argv, "--primary", "be:hd95"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "declares the primary comparison segresnet_be vs segresnet_dice in dice" in err and "--replan" in err
    assert tree_state(out) == before  # refused before anything was written
    assert main([*argv, "--primary", "be:hd95", "--replan"]) == 0
    primary = json.loads((out / "plan.json").read_text())["primary"]
    assert primary["metric"] == "hd95_mm" and [(p["metric"], p["runs_done"]) for p in primary["previous"]] == [("dice", 4)]
    verdict = (out / "report" / "report.md").read_text().split("## Verdict", 1)[1]
    assert verdict.strip().startswith("Primary comparison, segresnet_be vs segresnet_dice in HD95 on 2 test cases")
    assert (f"It was changed with --replan on {primary['declared_at'][:10]}, after 4 of 4 runs had finished (declared "
            "before: segresnet_be vs segresnet_dice in Dice") in verdict
    assert "a primary comparison changed after results were seen is not protected by its declaration" in verdict
    capsys.readouterr()
    assert main(argv) == 0  # the same command without --primary keeps the declaration it finds


def test_a_bad_primary_is_refused_before_anything_is_written(tiny_data, tmp_path, capsys):
    out = tmp_path / "results"
    argv = ["compare", "--data", str(tiny_data), "--systems", "dice,dice_be", "--seeds", "1", "--out", str(out)]
    assert main([*argv, "--primary", "focal:dice"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("beseg compare: error: --primary 'focal:dice': 'focal' is not one of the compared systems")
    assert len(err.strip().splitlines()) == 1 and not out.exists()


@pytest.mark.slow
def test_jobs_2_gives_the_numbers_of_a_sequential_compare(compared, tiny_data, tmp_path):
    out = tmp_path / "parallel"
    lines: list[str] = []
    result = run_compare(tiny_data, ["dice", "dice_be"], 2, out, overrides=_tiny(compared.parent), progress=False,
                         log=lines.append, launcher=LocalLauncher(jobs=2))
    assert not result.failed and result.report.is_file()
    assert _rows(out) == _rows(compared) and len(_rows(out)) == 4
    assert sorted(p.name for p in (out / "logs").iterdir()) == [
        "segresnet_be.seed0.log", "segresnet_be.seed1.log", "segresnet_dice.seed0.log", "segresnet_dice.seed1.log"]
    assert any(line.startswith("progress: 4/4 runs done") for line in lines)
    pids = {json.loads((out / run / "run.json").read_text())["pid"] for run in _rows(out)}
    assert len(pids) == 4 and os.getpid() not in pids  # each run in its own process


@pytest.mark.slow
def test_two_compare_processes_on_one_folder_train_every_run_exactly_once(tiny_data, tmp_path):
    out = tmp_path / "shared"
    argv = [sys.executable, "-m", "beseg.cli", "compare", "--data", str(tiny_data), "--systems", "dice,dice_be",
            "--seeds", "2", "--out", str(out), "--no-progress", "--no-report", *_tiny(tmp_path)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
             for _ in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    trained = [line for text in outputs for line in text.splitlines() if ": done in " in line]
    names = sorted(line.split("] ", 1)[1].split(":")[0] for line in trained)
    assert names == ["segresnet_be seed 0", "segresnet_be seed 1", "segresnet_dice seed 0", "segresnet_dice seed 1"]
    for run in ("segresnet_dice/seed0", "segresnet_dice/seed1", "segresnet_be/seed0", "segresnet_be/seed1"):
        epochs = [json.loads(x)["epoch"] for x in (out / run / "metrics.jsonl").read_text().splitlines()
                  if json.loads(x)["kind"] == "train"]
        assert epochs == [1]  # trained once, never restarted
        assert json.loads((out / run / "run.json").read_text())["pid"] in {p.pid for p in procs}
    assert not list(out.glob("*/seed*/.claim"))


@pytest.mark.slow
def test_a_failing_run_is_listed_with_its_log_while_the_others_finish(tiny_data, tmp_path, capsys):
    broken = tmp_path / "broken.yaml"
    broken.write_text("base: phantom_spleen_segresnet_dice\nsystem: broken\ntrain:\n  device: cuda:99\n")
    out = tmp_path / "results"
    code = main(["compare", "--data", str(tiny_data), "--systems", f"dice,{broken}", "--seeds", "1", "--out",
                 str(out), "--jobs", "2", "--no-progress", *_tiny(tmp_path)])
    err = capsys.readouterr().err
    assert code == 1
    assert "broken/seed0: train.device='cuda:99'" in err and f"(log: {out / 'logs' / 'broken.seed0.log'})" in err
    assert (out / "segresnet_dice" / "seed0" / "eval" / "summary.json").is_file()  # the other run finished
    assert not (out / "report").exists()  # no report from a partial comparison
    assert "Traceback" in (out / "logs" / "broken.seed0.log").read_text()  # the whole story is in the log
    main(["compare", str(out), "--status"])
    status = capsys.readouterr().out.splitlines()
    assert re.match(r"segresnet_dice/seed0\s+done\s", status[0]) and re.match(r"broken/seed0\s+failed\s", status[1])
    assert status[-1] == "1 done, 1 failed of 2 run(s)"


@pytest.mark.slow
def test_status_shows_a_live_claim_as_running(compared, capsys):
    from beseg.engine.claim import Claim

    claim = Claim(compared / "segresnet_be" / "seed1" / ".claim")
    claim.acquire()
    try:
        assert main(["compare", str(compared), "--status"]) == 0
    finally:
        claim.release()
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 5
    assert re.match(rf"segresnet_be/seed1\s+running\s+{re.escape(socket.gethostname())} pid {os.getpid()}\s+epoch 1/1",
                    lines[3])
    assert all(re.match(r"\S+\s+done\s.*epoch 1/1  best val Dice 0\.\d{4}", line) for line in lines[:3])


@pytest.mark.slow
def test_a_moved_results_folder_is_reused(compared, tiny_data, tmp_path, monkeypatch):
    import shutil

    moved = tmp_path / "elsewhere" / "results"
    shutil.copytree(compared, moved)
    spy = _Spy(monkeypatch)
    lines: list[str] = []
    result = run_compare(tiny_data, ["dice", "dice_be"], 2, moved, overrides=_tiny(compared.parent), progress=False,
                         log=lines.append)
    assert spy.train_calls == [] and spy.eval_calls == [] and result.report.is_file()
    assert sum("skipped" in line for line in lines) == 4

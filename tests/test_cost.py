"""beseg.experiment.cost and ``--dry-run``: the work of each run times the measured costs, projected per launcher.

The projections are checked against sums written out by hand from round figures placed in the cache, so
every term (steps, validations, checkpoints, test cases, store, process start, slots, SLURM limits and
requeues) is tested without timing anything.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from beseg.cli import main
from beseg.data import load_task
from beseg.errors import ConfigError
from beseg.experiment.compare import run_compare
from beseg.experiment.cost import auto_time_limit, format_cost_plan, plan_cost, requeues_needed
from beseg.experiment.launch import LocalLauncher
from beseg.experiment.plan import plan_runs, resolve_system
from beseg.experiment.slurm import PartitionLimits, SlurmLauncher, format_duration, signal_grace_s
from conftest import tiny_compare

QUIET = lambda _: None  # noqa: E731
#: Round figures for every system: a step of 9.5 s + 0.5 s to draw its batch, 1 s to build the model, 2 s per
#: validation case, 1 s more per evaluated case, 0.2 s per checkpoint, 0.3 s per stored case, 7 s per process start.
FIGURES = {"step_s": 9.5, "batch_s": 0.5, "setup_s": 1.0, "validation_s": 2.0, "checkpoint_s": 0.2,
           "peak_bytes": 2**30, "host_peak_bytes": 2**30, "validation_peak_bytes": 2**29}


def test_an_auto_time_limit_is_the_shortest_whole_minute_that_leaves_the_need_before_the_signal():
    for need in (1, 54, 55, 100, 130.5, 2699, 2701, 3000, 86_000):
        limit = auto_time_limit(need)
        assert limit % 60 == 0 and limit - signal_grace_s(limit) >= need
        shorter = limit - 60
        assert shorter < 60 or shorter - signal_grace_s(shorter) < need
    assert auto_time_limit(130.5) == 180 and auto_time_limit(3000) == 3300  # 5-minute grace from 50 minutes on


def test_requeues_are_counted_from_the_window_before_the_signal():
    # limit 60 s: signal 6 s before; the first start has 54 - 5 (lost) = 49 s, later ones 49 - 15 (restart) = 34 s
    assert requeues_needed(100, 60, restart_s=15, lost_s=5) == 2  # 49 + 34 + 34 >= 100
    assert requeues_needed(54, 60, 15, 5) == 0 and requeues_needed(10**6, None, 15, 5) == 0
    assert requeues_needed(100, 60, restart_s=40, lost_s=20) is None  # a restart never gets past one checkpoint


@pytest.fixture(scope="module")
def measured(tiny_data, tmp_path_factory):
    """A dry-run results folder of dice and dice_be (3 epochs x 2 steps, validation every 2), measured once."""
    tmp = tmp_path_factory.mktemp("cost")
    out = tmp / "results"
    overrides = [*tiny_compare(tmp), "train.epochs=3", "train.val_every=2"]
    result = run_compare(tiny_data, ["dice", "dice_be"], 1, out, overrides=overrides, progress=False, log=QUIET,
                         dry_run=True, launcher=LocalLauncher(jobs=2))
    assert result.dry_run and result.cost["figures"]["segresnet_be"]["source"] == "measured now"
    assert result.cost["startup"]["source"] == "measured now"  # --jobs starts a process per run
    return out, overrides


@pytest.fixture()
def results(tiny_data, measured, tmp_path, monkeypatch):
    """A copy of :func:`measured`'s folder, its timings replaced by :data:`FIGURES`."""
    monkeypatch.setenv("BESEG_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "results"
    shutil.copytree(measured[0], out)
    (path,) = (out / "cost").glob("cpu-*.json")
    doc = json.loads(path.read_text())
    for entry in doc["systems"].values():
        entry["figures"].update(FIGURES)
    (data,) = doc["data"].values()
    data["figures"].update(seconds=0.3, evaluation_case_s=1.0)
    doc["startup"]["figures"]["seconds"] = 7.0
    path.write_text(json.dumps(doc))
    runs = plan_runs([resolve_system(s, "phantom_spleen") for s in ("dice", "dice_be")], [0], out, measured[1])
    return {"data": tiny_data, "out": out, "overrides": list(measured[1]), "runs": runs}


def _dry(results, launcher=None, **kwargs):
    return run_compare(results["data"], ["dice", "dice_be"], 1, results["out"], overrides=results["overrides"],
                       progress=False, log=QUIET, dry_run=True, measure=False, launcher=launcher, **kwargs)


@pytest.mark.slow  # the module's dry run measures for ~20 s once
def test_the_projection_adds_up_every_part_of_every_run(results):
    cost = _dry(results).cost
    # 6 train / 2 validation / 2 test cases, all of one size (one volume scale); in this process (no start-up).
    # Per run: the model twice (training, evaluation) + 3 epochs x 2 steps x (9.5 + 0.5: no loader workers)
    # + 2 validations (epochs 2 and 3) x 2 cases x 2 s + 5 checkpoints (3 last.pt, at most 2 best.pt) x 0.2 s
    # + 2 test cases x (2 s sliding window + 1 s mapping, writing and scoring)
    per_run = 2 * 1.0 + 3 * 2 * 10.0 + 2 * 2 * 2.0 + 5 * 0.2 + 2 * (2.0 + 1.0)
    assert [r["total_s"] for r in cost["runs"]] == [pytest.approx(per_run)] * 2
    assert cost["store"] == {"cases": 10, "missing": 10, "seconds": pytest.approx(10 * 0.3)}  # nothing stored yet
    assert cost["projection"]["one_device_s"] == pytest.approx(3.0 + 2 * per_run, abs=0.1)
    assert cost["work"] == {"runs": 2, "to_run": 2, "steps": 12, "validations": 4, "validation_cases": 8,
                            "test_evaluations": 4}
    assert all(e["source"] == "cached" for e in cost["figures"].values()) and cost["queue_wait"] == "excluded"
    text = "\n".join(format_cost_plan(cost))
    assert "one device, runs one after another: 2 min 37 s" in text  # 3 + 2 x 77 s


@pytest.mark.slow  # the module's dry run measures for ~20 s once
def test_local_slots_run_in_plan_order_and_each_process_pays_its_start(results):
    cost = _dry(results, LocalLauncher(jobs=2)).cost
    per_run = 77.0 + 7.0
    assert cost["projection"]["launcher_s"] == pytest.approx(3.0 + per_run, abs=0.1)  # both at once
    assert cost["projection"]["one_device_s"] == pytest.approx(3.0 + 2 * per_run, abs=0.1)


@pytest.mark.slow  # the module's dry run measures for ~20 s once
def test_a_resumed_run_counts_only_what_is_left(results):
    first, second = results["runs"]
    first.state, first.epoch = "resume", 2  # epoch 3 left: 2 steps, the final validation, last.pt and best.pt
    second.state = "done"
    cost = plan_cost([first, second], load_task(results["data"]), results["out"], "heldout", measure=False, log=QUIET)
    left = 2 * 1.0 + 1 * 2 * 10.0 + 1 * 2 * 2.0 + 2 * 0.2 + 2 * 3.0
    assert [(r["state"], r["total_s"]) for r in cost.to_dict()["runs"]] == [("resume", pytest.approx(left)),
                                                                          ("done", 0.0)]
    assert cost.to_dict()["work"]["to_run"] == 1


@pytest.mark.slow
@pytest.mark.parametrize("max_time,limit,requeues", [
    (None, 180, 0),   # (77 + 7 + 3 store) x 1.5 = 130.5 s: 3 minutes leave 162 s before the 18 s signal
    (120, 120, 1),    # capped: 108 s before the signal, 24 s (an epoch: 2 steps, 2 validation cases) may be lost
    (60, 60, 5),      # 54 - 24 = 30 s the first time, 30 - 8 (start-up and model) = 22 s after each requeue
])
def test_slurm_time_auto_follows_the_plan_and_the_partitions_max_time(results, monkeypatch, max_time, limit,
                                                                      requeues):
    monkeypatch.setattr("beseg.experiment.slurm.partition_limits",
                        lambda partition=None, retry=None: PartitionLimits(partition or "debug", max_time, None))
    launcher = SlurmLauncher(partition="short", time_limit="auto")
    result = _dry(results, launcher)
    runs = result.cost["runs"]
    assert [r["slurm"] for r in runs] == [{"time_limit_s": limit, "requeues": requeues}] * 2
    assert result.cost["projection"]["slurm"]["requeues"] == 2 * requeues
    # --slurm-time auto in a real run puts the plan's limits into the job scripts, the signal a tenth before
    launcher.run_limits = {r["id"]: r["slurm"]["time_limit_s"] for r in runs}
    from beseg.experiment.layout import ResultsLayout

    script = launcher.script(ResultsLayout(results["out"]), runs[0]["id"])
    assert f"#SBATCH --time={format_duration(limit)}" in script
    assert f"#SBATCH --signal=B:USR1@{min(300, max(5, limit // 10))}" in script


@pytest.mark.slow  # the module's dry run measures for ~20 s once
def test_slurm_time_auto_refuses_a_max_time_too_short_for_one_checkpoint_interval(results, monkeypatch):
    monkeypatch.setattr("beseg.experiment.slurm.partition_limits",
                        lambda partition=None, retry=None: PartitionLimits("short", 60, None))
    results["overrides"] = [*results["overrides"], "train.checkpoint_every=3"]  # 72 s between checkpoints
    with pytest.raises(ConfigError, match=r"cannot finish one checkpoint interval .* longer MaxTime than 1 min"):
        _dry(results, SlurmLauncher(time_limit="auto"), time_margin=1.0)


@pytest.mark.slow  # the module's dry run measures for ~20 s once
def test_an_explicit_slurm_time_is_checked_against_the_plan(results, monkeypatch):
    monkeypatch.setattr("beseg.experiment.slurm.partition_limits",
                        lambda partition=None, retry=None: PartitionLimits("debug", 7200, None))
    cost = _dry(results, SlurmLauncher(time_limit="0:01:00")).cost
    assert [r["slurm"]["requeues"] for r in cost["runs"]] == [5, 5]  # as the 60 s case above
    cost = _dry(results, SlurmLauncher(time_limit="3:00:00")).cost
    assert any("exceeds partition debug's MaxTime (2 h 00 min)" in w for w in cost["warnings"])


@pytest.mark.slow  # the module's dry run measures for ~20 s once
def test_memory_beyond_the_device_or_mem_per_run_is_warned_about(results):
    path = next((results["out"] / "cost").glob("cpu-*.json"))
    doc = json.loads(path.read_text())
    memory = doc["device"]["memory_bytes"]
    for entry in doc["systems"].values():
        entry["figures"]["host_peak_bytes"] = entry["figures"]["peak_bytes"] = int(memory * 0.6)
    path.write_text(json.dumps(doc))
    warnings = _dry(results, LocalLauncher(jobs=2)).cost["warnings"]
    assert any(re.search(r"segresnet_be: 2 run\(s\) at a time need about .* more than this machine's", w)
               for w in warnings)
    assert not any("at a time" in w for w in _dry(results).cost["warnings"])  # one run fits
    warnings = _dry(results, SlurmLauncher(mem="1G")).cost["warnings"]
    assert any("exceeds --mem-per-run 1G: SLURM would kill its jobs" in w for w in warnings)


def test_no_measure_without_cached_timings_is_one_line(tiny_data, tmp_path, capsys):
    code = main(["compare", "--data", str(tiny_data), "--systems", "dice", "--seeds", "1", "--out",
                 str(tmp_path / "r"), "--dry-run", "--no-measure", *tiny_compare(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1
    assert f"no cached timings in {tmp_path / 'r' / 'cost'}" in err and "--no-measure was given" in err


@pytest.mark.slow
def test_dry_run_prints_the_plan_writes_plan_json_and_trains_nothing(tiny_data, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("BESEG_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "results"
    argv = ["compare", "--data", str(tiny_data), "--systems", "dice,dice_be", "--seeds", "2", "--out", str(out),
            "--no-progress", *tiny_compare(tmp_path)]
    assert main([*argv, "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "work: 4 of 4 run(s) to do: 8 training steps, 4 validations" in printed
    assert "dry run: nothing was trained or submitted" in printed
    plan = json.loads((out / "plan.json").read_text())
    assert [r["id"] for r in plan["cost"]["runs"]] == [r["id"] for r in plan["runs"]]
    assert plan["cost"]["projection"]["one_device_s"] > 0
    assert not list(tmp_path.rglob("*.pt")) and not list(tmp_path.rglob(".beseg-cost-*"))  # no checkpoint, no scratch
    assert not list(tmp_path.rglob("store-*/*.image.npy"))  # the store is not built either
    assert not any((out / r["id"]).exists() for r in plan["runs"])
    # --no-measure reads the cached figures back; then the same command without --dry-run trains and keeps the plan
    assert main([*argv, "--dry-run", "--no-measure"]) == 0
    again = json.loads((out / "plan.json").read_text())["cost"]
    assert {k: v["figures"] for k, v in again["figures"].items()} == \
        {k: v["figures"] for k, v in plan["cost"]["figures"].items()}
    assert main([*argv, "--no-report"]) == 0
    final = json.loads((out / "plan.json").read_text())
    assert final["cost"]["made_at"] == again["made_at"] and all(r["state"] == "done" for r in final["runs"])


@pytest.mark.slow
def test_reproduce_dry_run_needs_no_gpu(tiny_data, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    monkeypatch.setenv("BESEG_CACHE_DIR", str(tmp_path / "cache"))
    code = main(["reproduce", "--task", "task09", "--data", str(tiny_data), "--systems", "dice_be", "--seeds", "1",
                 "--out", str(tmp_path / "r"), "--dry-run", "--no-progress", *tiny_compare(tmp_path)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "dry run: nothing was trained" in captured.out and "segresnet_be" in captured.out
    assert not list(tmp_path.rglob("*.pt"))


@pytest.mark.parametrize("extra,message", [
    (["--slurm-time-margin", "2"], "--slurm-time-margin only applies with --launcher slurm --slurm-time auto"),
    (["--launcher", "slurm", "--slurm-time", "1:00:00", "--slurm-time-margin", "2"],
     "--slurm-time-margin only applies with --slurm-time auto"),
    (["--launcher", "slurm", "--dry-run", "--detach"], "--dry-run submits nothing, so --detach has nothing to do"),
    (["--no-measure"], "--no-measure applies only with --dry-run or --slurm-time auto"),
    (["--launcher", "slurm", "--slurm-time", "auto", "--slurm-time-margin", "0.5", "--dry-run"],
     "--slurm-time-margin must be at least 1"),
])
def test_cost_plan_options_are_checked(tiny_data, tmp_path, capsys, extra, message):
    code = main(["compare", "--data", str(tiny_data), "--systems", "dice", "--seeds", "1", "--out", str(tmp_path / "r"),
                 *extra, *tiny_compare(tmp_path)])
    err = capsys.readouterr().err
    assert code == 1 and message in err, err


@pytest.mark.slow
def test_a_system_that_cannot_train_is_named_and_the_dry_run_exits_1(tiny_data, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("BESEG_CACHE_DIR", str(tmp_path / "cache"))
    # U-Net's four stride-2 levels leave 1 voxel of a 16^3 patch: its training step fails, as the run would
    code = main(["compare", "--data", str(tiny_data), "--systems", "dice,unet", "--seeds", "1", "--out",
                 str(tmp_path / "r"), "--dry-run", "--no-progress", *tiny_compare(tmp_path),
                 "model.unet_channels=[8,16,32,64,128]"])
    captured = capsys.readouterr()
    assert code == 1 and "1 system(s) failed while being measured (unet)" in captured.err
    assert "warning: unet: training steps failed: ValueError: Expected more than 1 spatial element" in captured.out
    assert "not projected: unet/seed0" in captured.out
    cost = json.loads((tmp_path / "r" / "plan.json").read_text())["cost"]
    assert [r["id"] for r in cost["runs"]] == ["segresnet_dice/seed0"]  # the other system is still projected

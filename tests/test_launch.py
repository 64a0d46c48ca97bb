"""Tests of beseg.experiment.launch and beseg.experiment.slurm that need neither training nor a cluster."""

from __future__ import annotations

import re

import pytest
import torch

from beseg.errors import ConfigError
from beseg.experiment.launch import LocalLauncher, make_launcher, parse_devices
from beseg.experiment.outcome import Progress
from beseg.experiment.layout import ResultsLayout
from beseg.experiment.slurm import SlurmLauncher


def test_devices_are_gpu_indices():
    assert parse_devices("0, 1,cuda:3") == ["0", "1", "3"]
    for bad in ("0,0", "gpu1", ","):
        with pytest.raises(ConfigError, match="--devices must list distinct GPU indices"):
            parse_devices(bad)


def test_each_device_process_sees_only_its_gpu_and_cpu_jobs_share_the_cores():
    gpus = LocalLauncher(devices=["2", "5"])
    env = gpus._env("5")
    assert (env["CUDA_VISIBLE_DEVICES"], env["BESEG_RUN_DEVICE"]) == ("5", "cuda") and not gpus.in_process
    cpus = LocalLauncher(jobs=4, cpus=16)
    assert cpus._env(None)["OMP_NUM_THREADS"] == "4" and cpus.threads_per_run() == 4
    assert LocalLauncher(jobs=3, cpus=2).threads_per_run() == 1
    assert LocalLauncher().in_process


@pytest.mark.parametrize("kwargs,message", [
    ({"jobs": 0}, "--jobs must be at least 1"),
    ({"devices": "0,1", "jobs": 2}, "not both"),
    ({"partition": "gpu"}, "--slurm-partition only apply with --launcher slurm"),
    ({"kind": "slurm", "jobs": 2}, "--devices and --jobs are for --launcher local"),
    ({"kind": "slurm", "time_limit": "a day"}, "--slurm-time 'a day'"),
    ({"kind": "slurm", "mem": "lots"}, "--mem-per-run 'lots'"),
    ({"kind": "slurm", "extra": ["account"]}, "--slurm-arg 'account': give KEY=VALUE"),
    ({"kind": "kubernetes"}, "--launcher must be local or slurm"),
])
def test_launcher_options_are_checked(kwargs, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        make_launcher(**kwargs)


def test_a_slurm_job_script_asks_for_what_the_options_say(tmp_path):
    launcher = SlurmLauncher(partition="gpu", time_limit="12:00:00", gpus=4, cpus=32, mem="64G",
                             extra=["account=proj", "qos=long"], python="/env/bin/python")
    results = ResultsLayout(tmp_path / "results")
    script = launcher.script(results, "segresnet_be/seed1/fold2")
    head = [line for line in script.splitlines() if line.startswith("#SBATCH")]
    assert head == [
        "#SBATCH --requeue", "#SBATCH --job-name=beseg:segresnet_be/seed1/fold2",
        f"#SBATCH --output={tmp_path / 'results' / 'logs' / 'segresnet_be.seed1.fold2.log'}",
        "#SBATCH --open-mode=append", "#SBATCH --nodes=1", "#SBATCH --ntasks=4", "#SBATCH --cpus-per-task=8",
        "#SBATCH --signal=B:USR1@300", "#SBATCH --gres=gpu:4", "#SBATCH --partition=gpu", "#SBATCH --time=12:00:00",
        "#SBATCH --mem=64G", "#SBATCH --account=proj", "#SBATCH --qos=long"]
    assert (f"/env/bin/python -m beseg.experiment.worker {tmp_path / 'results'} segresnet_be/seed1/fold2 "
            "--no-progress --ranks 4 &") in script
    assert 'trap requeue USR1' in script and 'scontrol requeue "$SLURM_JOB_ID"' in script


def test_the_progress_line_counts_runs_and_estimates_the_rest(monkeypatch):
    clock = iter([0.0, 600.0])
    monkeypatch.setattr("beseg.experiment.outcome.time.monotonic", lambda: next(clock))
    lines: list[str] = []
    progress = Progress(4, lines.append)
    progress.update(1, 2, 0)  # one run done after 10 minutes: 3 left at that pace
    assert lines == ["progress: 1/4 runs done, 2 running, 10 min 00 s elapsed, ETA 30 min 00 s"]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_devices_0_trains_and_evaluates_on_the_gpu(tiny_data, tmp_path):
    import json

    from conftest import tiny_compare
    from beseg.experiment.compare import run_compare
    from beseg.engine.checkpoint import load_checkpoint

    out = tmp_path / "results"
    result = run_compare(tiny_data, ["dice"], 1, out, overrides=tiny_compare(tmp_path), progress=False,
                         log=lambda _: None, report=False, launcher=LocalLauncher(devices=["0"]))
    assert not result.failed
    run = out / "segresnet_dice" / "seed0"
    assert load_checkpoint(run / "checkpoints" / "last.pt")["config"]["train"]["device"] == "cuda"
    assert json.loads((run / "eval" / "summary.json").read_text())["cases"] == 2


def test_slurm_durations_are_read_and_written_in_slurms_forms():
    from beseg.experiment.slurm import format_duration, parse_duration, signal_grace_s

    cases = {"90": 5400, "5:30": 330, "12:00:00": 43200, "2-00": 172800, "2-06:30": 196200, "1-00:00:05": 86405,
             "UNLIMITED": None, "infinite": None}
    assert {text: parse_duration(text) for text in cases} == cases
    with pytest.raises(ConfigError, match="is not a SLURM time"):
        parse_duration("a day")
    # whole minutes, rounded up: SLURM counts minutes
    assert [format_duration(s) for s in (1, 60, 61, 3600, 86400, 90061)] == \
        ["0:01:00", "0:01:00", "0:02:00", "1:00:00", "1-00:00:00", "1-01:02:00"]
    assert [signal_grace_s(s) for s in (None, 30, 60, 600, 2999, 3000, 86400)] == [300, 5, 6, 60, 299, 300, 300]


def test_partition_limits_come_from_scontrol(tmp_path, monkeypatch):
    from beseg.experiment.slurm import PartitionLimits, SlurmError, partition_limits

    fake = tmp_path / "scontrol"
    fake.write_text("#!/bin/sh\ncat <<'EOF'\n"
                    "PartitionName=debug Default=YES DefaultTime=NONE MaxTime=UNLIMITED State=UP\n"
                    "PartitionName=gpu Default=NO DefaultTime=04:00:00 MaxTime=1-00:00:00 State=UP\n"
                    "EOF\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{__import__('os').environ['PATH']}")
    assert partition_limits() == PartitionLimits("debug", None, None)
    assert partition_limits("gpu") == PartitionLimits("gpu", 86400, 14400)
    with pytest.raises(SlurmError, match="no partition 'a100'"):
        partition_limits("a100")


def test_slurm_time_auto_takes_each_jobs_limit_from_the_plan(tmp_path):
    launcher = SlurmLauncher(time_limit="auto")
    results = ResultsLayout(tmp_path / "results")
    assert not any(line.startswith("#SBATCH --time") for line in launcher.script(results, "a/seed0").splitlines())
    launcher.run_limits = {"a/seed0": 5400}
    script = launcher.script(results, "a/seed0")
    assert "#SBATCH --time=1:30:00" in script and "#SBATCH --signal=B:USR1@300" in script
    short = SlurmLauncher(time_limit="2")  # an explicit short limit: the signal comes a tenth before it
    assert "#SBATCH --signal=B:USR1@12" in short.script(results, "a/seed0")


def test_local_slots_take_runs_in_order_by_the_first_free_slot():
    from beseg.experiment.cost import pool_wall

    assert pool_wall([3, 1, 1, 1], 2) == 3  # the 3 on one slot, the three 1s on the other
    assert pool_wall([1, 1, 1, 3], 2) == 4  # the 3 comes last, after a 1
    assert pool_wall([2, 2, 2], 1) == 6 and pool_wall([], 4) == 0


def test_a_slurm_job_whose_worker_lost_its_claim_or_found_the_run_busy_is_left_to_the_other_process(
        tmp_path, monkeypatch):
    """The worker's exit codes 75 (busy) and 76 (its claim was taken over) mean "another process has the run":
    not a failure of the run."""
    import beseg.experiment.slurm as slurm

    results = ResultsLayout(tmp_path / "results")
    exit_codes = {"a/seed0": "76:0", "b/seed0": "75:0", "c/seed0": "1:0"}
    jobs = {run: str(100 + i) for i, run in enumerate(exit_codes)}
    monkeypatch.setattr(slurm.shutil, "which", lambda tool: f"/usr/bin/{tool}")
    monkeypatch.setattr(SlurmLauncher, "queued_jobs", lambda self, log=None: {})
    monkeypatch.setattr(SlurmLauncher, "_recorded_job", lambda self, results, run, queued: None)
    monkeypatch.setattr(SlurmLauncher, "submit", lambda self, results, run, log=None: jobs[run])
    monkeypatch.setattr(slurm, "job_states", lambda ids, *args: {})  # every job has ended
    by_job = {job: exit_codes[run] for run, job in jobs.items()}
    monkeypatch.setattr(slurm, "_ended_job", lambda job, *args: ("COMPLETED", by_job[job]))
    lines: list[str] = []
    outcome = SlurmLauncher(poll_s=0).execute(results, list(exit_codes), lines.append)
    assert sorted(outcome.busy) == ["a/seed0", "b/seed0"] and list(outcome.failed) == ["c/seed0"]
    assert "a/seed0: another process took it over; left to that process" in lines
    assert "b/seed0: another process holds it; left to that process" in lines


def test_a_run_whose_claim_was_taken_over_in_this_process_is_left_to_the_other_process(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from beseg.experiment import compare, worker
    from beseg.fileio import LockLostError

    def taken_over(run_dir, *args, **kwargs):
        raise LockLostError(f"{run_dir}: claim lost to node3/42; stopping without writing")

    monkeypatch.setattr(worker, "execute_run", taken_over)
    run = SimpleNamespace(id="a/seed0", name="a seed 0", run_dir=tmp_path / "a" / "seed0", config=None, nnunet=None)
    lines: list[str] = []
    outcome = compare._launch(ResultsLayout(tmp_path), [run], LocalLauncher(), None, "heldout", False,
                              lines.append)
    assert outcome.busy == ["a/seed0"] and not outcome.failed and not outcome.done
    assert lines == [f"{run.run_dir}: claim lost to node3/42; stopping without writing; waiting for that process"]


def test_a_dataset_edited_between_planning_and_a_workers_start_fails_the_run_in_one_line(tiny_data, tmp_path,
                                                                                         monkeypatch):
    """``--jobs 2``: plan.json is written, then dataset.json gains a case before the worker process starts; the worker
    loads the dataset again from plan.json's identity, and the run fails with one line that the launcher lists."""
    import hashlib
    import json
    import shutil

    from conftest import tiny_compare
    from beseg.experiment import compare
    from beseg.experiment.worker import read_failure

    monkeypatch.setenv("BESEG_CACHE_DIR", str(tmp_path / "cache"))
    data = tmp_path / "Task09_Spleen"
    shutil.copytree(tiny_data, data)
    before = hashlib.sha256((data / "dataset.json").read_bytes()).hexdigest()
    execute = compare._execute

    def edit_then_execute(layout, *args, **kwargs):
        assert (layout.root / "plan.json").is_file()  # planned: the workers read it
        meta = json.loads((data / "dataset.json").read_text())
        for sub in ("imagesTr", "labelsTr"):
            shutil.copy(data / sub / "phantom_spleen_000.nii.gz", data / sub / "phantom_spleen_new.nii.gz")
        meta["training"].append({"image": "./imagesTr/phantom_spleen_new.nii.gz",
                                 "label": "./labelsTr/phantom_spleen_new.nii.gz"})
        meta["numTraining"] = len(meta["training"])
        (data / "dataset.json").write_text(json.dumps(meta))
        return execute(layout, *args, **kwargs)

    monkeypatch.setattr(compare, "_execute", edit_then_execute)
    out = tmp_path / "results"
    lines: list[str] = []
    result = compare.run_compare(data, ["dice"], 1, out, overrides=tiny_compare(tmp_path), progress=False,
                                 log=lines.append, launcher=LocalLauncher(jobs=2))
    after = hashlib.sha256((data / "dataset.json").read_bytes()).hexdigest()
    stop = (f"{out.resolve() / 'plan.json'}: the dataset changed since this comparison was planned (Task09_Spleen/"
            f"dataset.json: 10 -> 11 training cases (added phantom_spleen_new), SHA-256 {before[:12]}... -> "
            f"{after[:12]}...); run the same beseg compare command again to plan it anew")
    log = out.resolve() / "logs" / "segresnet_dice.seed0.log"
    assert result.failed == {"segresnet_dice/seed0": (stop, log)}
    assert f"  segresnet_dice/seed0: {stop} (log: {log})" in lines and result.report is None
    assert read_failure(out / "segresnet_dice" / "seed0")["error"] == stop
    assert f"worker: segresnet_dice/seed0 failed: {stop}" in log.read_text()
    assert not (out / "segresnet_dice" / "seed0" / "checkpoints").exists()  # nothing trained
    # What the line says to do: the same command plans anew on the dataset as it is now, and the run trains.
    monkeypatch.setattr(compare, "_execute", execute)
    lines.clear()
    again = compare.run_compare(data, ["dice"], 1, out, overrides=tiny_compare(tmp_path), progress=False,
                                log=lines.append, report=False)
    assert not again.failed, "\n".join(lines)
    assert (out / "segresnet_dice" / "seed0" / "eval" / "summary.json").is_file()
    assert any(line.startswith(f"note: the dataset changed since {out / 'plan.json'} was last written (Task09_Spleen/"
                               "dataset.json: 10 -> 11 training cases (added phantom_spleen_new)") for line in lines)
    assert json.loads((out / "plan.json").read_text())["data"]["dataset_json_sha256"] == after

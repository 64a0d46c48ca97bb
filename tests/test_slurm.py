"""``beseg compare --launcher slurm`` and ``srun beseg train`` on a real SLURM cluster.

CI starts a single-node cluster with ``scripts/slurm_cluster.sh start`` (Debian's slurm-wlm and
munge) and exports ``SLURM_CONF``; elsewhere these tests skip unless such a cluster answers. Every
run is tiny (16^3 patches, 8 filters, a few steps, one thread).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from beseg.cli import main
from conftest import nnunet_compare_env, nnunet_python, per_case_rows, tiny_compare
from beseg.data import load_split, make_phantom
from beseg.engine.checkpoint import load_checkpoint
from beseg.experiment.compare import run_compare
from beseg.experiment.slurm import SlurmLauncher, job_states

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def _unavailable(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; CI must run the SLURM tests (.ci/run installs slurm-wlm and munge and starts the "
                    "cluster with scripts/slurm_cluster.sh)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def jobcomp() -> Path:
    """The cluster's job-completion file (one line per finished job); skips (fails in CI) without a cluster."""
    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        _unavailable("SLURM is not installed (Debian: apt-get install -y slurm-wlm munge; then "
                     "scripts/slurm_cluster.sh start and export SLURM_CONF)")
    try:
        info = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        info = None
    if info is None or info.returncode != 0 or not info.stdout.strip():
        _unavailable("no SLURM cluster answers (start one: scripts/slurm_cluster.sh start; export SLURM_CONF="
                     "/tmp/beseg-slurm/slurm.conf)")
    config = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=30).stdout
    match = re.search(r"^JobCompLoc\s*=\s*(\S+)", config, flags=re.M)
    if "jobcomp/filetxt" not in config or not match:
        _unavailable("the cluster does not write jobcomp/filetxt records (scripts/slurm_cluster.sh configures it)")
    return Path(match.group(1))


def _records(jobcomp: Path) -> dict[str, dict[str, str]]:
    """``{job id: {field: value}}`` of the finished jobs."""
    out = {}
    for line in jobcomp.read_text().splitlines():
        fields = dict(m.groups() for m in re.finditer(r"(\w+)=(\S*)", line))
        if "JobId" in fields:
            out[fields["JobId"]] = fields
    return out


@pytest.fixture(autouse=True)
def _env(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("BESEG_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "beseg-cache"))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))


@pytest.fixture(scope="module")
def data(tiny_data) -> Path:
    return tiny_data


_tiny, _rows = tiny_compare, per_case_rows


def _wait_for_jobs_to_end(jobs: list[str], timeout: float = 300) -> None:
    end = time.monotonic() + timeout
    while job_states(jobs) and time.monotonic() < end:
        time.sleep(0.5)
    assert not job_states(jobs)


def test_compare_through_slurm_equals_a_sequential_compare_and_every_run_is_a_job(jobcomp, data, tmp_path):
    quiet = lambda _: None  # noqa: E731
    sequential = run_compare(data, ["dice", "dice_be"], 2, tmp_path / "seq", overrides=_tiny(tmp_path),
                             progress=False, log=quiet, report=False)
    assert not sequential.failed
    result = run_compare(data, ["dice", "dice_be"], 2, tmp_path / "slurm", overrides=_tiny(tmp_path), progress=False,
                         log=quiet, launcher=SlurmLauncher(poll_s=1))
    assert not result.failed and result.report.is_file()
    assert _rows(tmp_path / "slurm") == _rows(tmp_path / "seq") and len(_rows(tmp_path / "seq")) == 4
    records = _records(jobcomp)
    assert sorted(result.jobs) == sorted(_rows(tmp_path / "slurm"))
    for run_id, job in result.jobs.items():
        assert records[job]["JobState"] == "COMPLETED" and records[job]["Name"] == f"beseg:{run_id}"
        assert json.loads((tmp_path / "slurm" / run_id / "run.json").read_text())["job_id"] == job


def _training_job(data: Path, tmp_path: Path, capsys) -> tuple[list[str], Path, str]:
    """Submit a 20-epoch run with --detach and wait until its job has written a first ``last.pt``.

    Returns:
        The compare command's arguments (without --detach), the run folder, and the job id.
    """
    out = tmp_path / "results"
    argv = ["compare", "--data", str(data), "--systems", "dice", "--seeds", "1", "--out", str(out), "--launcher",
            "slurm", "--no-progress", "--no-report", *_tiny(tmp_path), "train.epochs=20", "train.val_every=20"]
    assert main([*argv, "--detach"]) == 0
    job = re.search(r"segresnet_dice/seed0: SLURM job (\d+)", capsys.readouterr().out).group(1)
    run = out / "segresnet_dice" / "seed0"
    end = time.monotonic() + 300
    while time.monotonic() < end and not (run / "checkpoints" / "last.pt").is_file():
        time.sleep(0.2)
    assert (run / "checkpoints" / "last.pt").is_file() and job_states([job]), "the job should be training"
    return argv, run, job


def _train_epochs(run: Path) -> list[int]:
    return [json.loads(x)["epoch"] for x in (run / "metrics.jsonl").read_text().splitlines()
            if json.loads(x)["kind"] == "train"]


def test_a_cancelled_job_resumes_its_run_when_the_command_is_repeated(jobcomp, data, tmp_path, capsys):
    argv, run, job = _training_job(data, tmp_path, capsys)
    subprocess.run(["scancel", job], check=True)
    _wait_for_jobs_to_end([job])
    last = run / "checkpoints" / "last.pt"
    assert 1 <= load_checkpoint(last)["epoch"] < 20 and _records(jobcomp)[job]["JobState"] == "CANCELLED"

    assert main(argv) == 0  # the same command: resubmits the run, which resumes from last.pt
    record = json.loads((run / "run.json").read_text())
    assert record["state"] == "resume" and record["job_id"] != job
    assert _train_epochs(run) == list(range(1, 21))  # no epoch lost or done twice
    assert load_checkpoint(last)["epoch"] == 20 and (run / "eval" / "summary.json").is_file()


def test_a_failing_run_is_reported_with_its_log_while_the_others_finish(jobcomp, data, tmp_path, capsys):
    broken = tmp_path / "broken.yaml"
    broken.write_text("base: phantom_spleen_segresnet_dice\nsystem: broken\ntrain:\n  device: cuda:99\n")
    out = tmp_path / "results"
    code = main(["compare", "--data", str(data), "--systems", f"dice,{broken}", "--seeds", "1", "--out", str(out),
                 "--launcher", "slurm", "--no-progress", *_tiny(tmp_path)])
    err = capsys.readouterr().err
    assert code == 1
    log = out / "logs" / "broken.seed0.log"
    assert "broken/seed0: train.device='cuda:99'" in err and f"(log: {log})" in err
    assert "Traceback" in log.read_text()
    assert (out / "segresnet_dice" / "seed0" / "eval" / "summary.json").is_file()
    job = (out / "slurm" / "broken.seed0.jobid").read_text().strip()
    assert _records(jobcomp)[job]["JobState"] == "FAILED"


def test_srun_n_2_beseg_train_is_one_two_rank_run(jobcomp, data, tmp_path):
    run = tmp_path / "run"
    proc = subprocess.run(["srun", "-n", "2", "--cpus-per-task=1", sys.executable, "-m", "beseg.cli", "train",
                           "phantom_spleen_segresnet_dice", "--data", str(data), "--out", str(run), "--no-progress",
                           *_tiny(tmp_path), "train.device=cpu"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("done: ") == 1  # rank 0 only
    checkpoint = load_checkpoint(run / "checkpoints" / "last.pt")
    assert checkpoint["world_size"] == 2 and checkpoint["epoch"] == 1


def test_a_run_with_two_ranks_per_job_trains_as_one_ddp_run(jobcomp, data, tmp_path):
    result = run_compare(data, ["dice"], 1, tmp_path / "results", overrides=[*_tiny(tmp_path), "train.device=cpu"],
                         progress=False, log=lambda _: None, report=False, launcher=SlurmLauncher(ranks=2, cpus=2,
                                                                                                  poll_s=1))
    assert not result.failed
    run = tmp_path / "results" / "segresnet_dice" / "seed0"
    assert load_checkpoint(run / "checkpoints" / "last.pt")["world_size"] == 2
    assert "#SBATCH --ntasks=2" in (tmp_path / "results" / "slurm" / "segresnet_dice.seed0.sbatch").read_text()
    assert (run / "eval" / "summary.json").is_file() and not (run / ".claim").exists()


def test_a_claim_of_an_ended_slurm_job_is_taken_over(jobcomp, tmp_path):
    from beseg.engine.claim import Claim

    job = subprocess.run(["sbatch", "--parsable", "--wrap", "true", "-o", "/dev/null"], capture_output=True, text=True,
                         check=True).stdout.strip()
    _wait_for_jobs_to_end([job])
    path = tmp_path / ".claim"
    path.write_text(json.dumps({"host": "node-elsewhere", "pid": 1, "job_id": job, "token": "t",
                                "started": time.time(), "heartbeat": time.time()}))  # a fresh heartbeat
    claim = Claim(path)
    with pytest.warns(RuntimeWarning, match=f"SLURM job {job} has ended"):
        assert claim.acquire() is True
    claim.release()


def test_a_job_told_its_time_is_up_requeues_itself_and_the_run_resumes(jobcomp, data, tmp_path, capsys):
    """SLURM sends USR1 to the job script before the time limit (``--signal=B:USR1@300``); here it is sent at once."""
    argv, run, job = _training_job(data, tmp_path, capsys)
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], check=True)
    _wait_for_jobs_to_end([job], timeout=400)  # requeued, started again (after cred_expire), finished
    log = (run.parents[1] / "logs" / "segresnet_dice.seed0.log").read_text()
    assert "requeueing the job" in log and f"SLURM job {job} (start 2)" in log
    record = json.loads((run / "run.json").read_text())
    assert (record["job_id"], record["state"]) == (job, "resume")  # the same job, resumed from last.pt
    assert _train_epochs(run) == list(range(1, 21)) and (run / "eval" / "summary.json").is_file()
    assert _records(jobcomp)[job]["JobState"] == "COMPLETED"
    assert main(argv) == 0  # the same command collects: nothing left to run


def test_slurm_time_auto_caps_jobs_at_max_time_and_requeued_runs_equal_an_uninterrupted_run(jobcomp, data, tmp_path):
    """``--slurm-time auto`` on the cluster's ``short`` partition (MaxTime 1 minute, scripts/slurm_cluster.sh): a run
    planned longer than that gets ``--time`` = MaxTime, is planned to requeue, requeues itself on the signal before
    the limit, resumes from ``last.pt`` and ends with the numbers of the same run trained without interruption."""
    from beseg.experiment.cost import auto_time_limit
    from beseg.experiment.slurm import SlurmError, format_duration, partition_limits

    try:
        short = partition_limits("short")
    except SlurmError as err:
        _unavailable(f"{err} (scripts/slurm_cluster.sh makes a 'short' partition with MaxTime 1 minute)")
    assert short.max_s == 60
    quiet = lambda _: None  # noqa: E731
    # The measured plan of one epoch sizes the run: about 50 s of training, more than a one-minute job has left
    # after its start-up and before its signal.
    probe = run_compare(data, ["dice"], 1, tmp_path / "probe", overrides=_tiny(tmp_path), progress=False, log=quiet,
                        dry_run=True, launcher=SlurmLauncher(partition="short", time_limit="auto"))
    epoch_s = probe.cost["runs"][0]["epoch_s"]
    epochs = max(10, min(400, round(50 / epoch_s)))
    overrides = [*_tiny(tmp_path), f"train.epochs={epochs}", f"train.val_every={epochs}"]
    # The same run without interruption, on the other core meanwhile.
    uninterrupted = subprocess.Popen(
        [sys.executable, "-m", "beseg.cli", "compare", "--data", str(data), "--systems", "dice", "--seeds", "1",
         "--out", str(tmp_path / "seq"), "--no-progress", "--no-report", *overrides], stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True)
    out = tmp_path / "slurm"
    launcher = SlurmLauncher(partition="short", time_limit="auto", poll_s=1)
    watchdog = threading.Timer(900, lambda: subprocess.run(["scancel", "--name=beseg:segresnet_dice/seed0"]))
    watchdog.start()  # a job that could never finish would otherwise keep this test waiting
    try:
        result = run_compare(data, ["dice"], 1, out, overrides=overrides, progress=False, log=quiet, report=False,
                             launcher=launcher)
    finally:
        watchdog.cancel()
    assert uninterrupted.wait(timeout=900) == 0, uninterrupted.stderr.read()[-2000:]
    assert not result.failed, result.failed
    (run,) = result.cost["runs"]
    need = (run["total_s"] + result.cost["store"]["seconds"]) * 1.5
    assert auto_time_limit(need) > 60 and run["slurm"] == {"time_limit_s": 60, "requeues": run["slurm"]["requeues"]}
    assert run["slurm"]["requeues"] >= 1 and result.cost["projection"]["slurm"]["max_time_s"] == 60
    script = (out / "slurm" / "segresnet_dice.seed0.sbatch").read_text()
    assert f"#SBATCH --time={format_duration(60)}" in script and "#SBATCH --signal=B:USR1@6" in script
    log = (out / "logs" / "segresnet_dice.seed0.log").read_text()
    job = result.jobs["segresnet_dice/seed0"]
    assert "requeueing the job" in log and f"SLURM job {job} (start 2)" in log, log[-3000:]
    assert _records(jobcomp)[job]["JobState"] == "COMPLETED"
    assert _train_epochs(out / "segresnet_dice" / "seed0") == list(range(1, epochs + 1))  # every epoch once
    assert _rows(out) == _rows(tmp_path / "seq") and len(_rows(out)["segresnet_dice/seed0"]) == 2


def test_nnunet_runs_go_through_slurm_fold_by_fold(jobcomp, tmp_path, monkeypatch):
    """An nnU-Net system in a 2-fold cross-validation through the SLURM launcher: one job per fold, nnU-Net's fold k
    is beseg's fold k, and the folds merge into one out-of-fold evaluation of every case."""
    nnunet_compare_env(monkeypatch, nnunet_python())
    data = make_phantom(tmp_path / "phantom", cases=10, test_cases=0, size=(48, 48, 20), progress=False)
    out = tmp_path / "results"
    result = run_compare(data, ["nnunet:nnUNetTrainer_ci"], 1, out, folds=2, progress=False, log=lambda _: None,
                         launcher=SlurmLauncher(poll_s=1), report=False)
    assert not result.failed, result.failed
    ids = ["nnUNetTrainer_ci/repeat0/fold0", "nnUNetTrainer_ci/repeat0/fold1"]
    assert sorted(result.jobs) == ids
    records = _records(jobcomp)
    assert all(records[result.jobs[i]]["JobState"] == "COMPLETED" for i in ids)
    folds = [load_split(out / f"split_fold{f}.json") for f in range(2)]
    (dataset,) = (out / "nnunet" / "preprocessed").iterdir()
    assert json.loads((dataset / "splits_final.json").read_text()) == [
        {"train": sorted(s.train), "val": sorted(s.val)} for s in folds]
    for f, split in enumerate(folds):  # each fold's model predicted its own test cases
        fold_summary = json.loads((out / ids[f] / "eval" / "summary.json").read_text())
        assert fold_summary["case_ids"] == sorted(split.test) and fold_summary["fold"] == f
        assert (out / ids[f] / "nnUNet_results" / dataset.name / "nnUNetTrainer_ci__nnUNetPlans__3d_fullres"
                / f"fold_{f}" / "checkpoint_final.pth").is_file()
    merged = json.loads((out / "nnUNetTrainer_ci" / "repeat0" / "eval" / "summary.json").read_text())
    assert merged["protocol"] == "cv" and merged["split"] == "oof" and merged["cases"] == 10
    rows = per_case_rows(out)
    assert sorted(rows) == ["nnUNetTrainer_ci/repeat0"]
    assert sorted({r["case"] for r in rows["nnUNetTrainer_ci/repeat0"]}) == sorted(c for s in folds for c in s.test)


def test_a_results_folder_with_a_space_and_a_percent_sign_is_submitted_and_logged_there(jobcomp, data, tmp_path):
    """sbatch splits an unquoted ``#SBATCH --output=`` at the space (and expands ``%`` patterns): the job
    script quotes it, so the job runs and writes its log into the results folder, nowhere else."""
    out = tmp_path / "my results 100%"
    result = run_compare(data, ["dice"], 1, out, overrides=_tiny(tmp_path), progress=False, log=lambda _: None,
                         report=False, launcher=SlurmLauncher(poll_s=1))
    assert not result.failed, result.failed
    script = (out / "slurm" / "segresnet_dice.seed0.sbatch").read_text()
    assert f'#SBATCH --output="{out}/logs/segresnet_dice.seed0.log"'.replace("%", "%%") in script
    log = (out / "logs" / "segresnet_dice.seed0.log").read_text()
    assert "worker: segresnet_dice/seed0 done" in log and _records(jobcomp)[result.jobs["segresnet_dice/seed0"]][
        "JobState"] == "COMPLETED"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("my")) == ["my results 100%"]


def test_a_path_sbatch_cannot_read_back_is_refused_before_submitting(tmp_path):
    from beseg.errors import ConfigError
    from beseg.experiment.layout import ResultsLayout

    with pytest.raises(ConfigError, match=r"sbatch option --output='.*a\"b/logs/x.seed0.log': a double quote"):
        SlurmLauncher().script(ResultsLayout(tmp_path / 'a"b'), "x/seed0")
    script = SlurmLauncher(extra=["comment=two words"]).script(ResultsLayout(tmp_path / "r"), "x/seed0")
    assert '#SBATCH --comment="two words"' in script and "#SBATCH --nodes=1" in script

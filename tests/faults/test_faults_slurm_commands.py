"""Faults of SLURM's commands: an ``squeue`` or ``sbatch`` that hangs or fails for a while, or for good.

Fake ``squeue``/``sbatch``/``scancel`` binaries go first on PATH. Each counts its calls in a file
(under ``flock``, since several processes call them) and behaves as its plan says for that call:
``fail`` (exit 1 with the message of a controller that does not answer), ``hang`` (sleeps far past
the call timeout), ``refuse`` (exit 1 with a refusal: an invalid partition), ``answer:TEXT`` (prints TEXT), ``submit-hang`` (submits
through the real ``sbatch``, then hangs, as a ``sbatch`` whose answer is lost) or ``real`` (the real
command); the last entry holds for every later call. The real binaries run a real job on the
test cluster (``scripts/slurm_cluster.sh``; ``SLURM_CONF``) wherever a job is needed: calls made
inside a job (the worker's claim) and calls that the plan's filter does not select go to the real
command.

What is promised (docs/reliability.md, "Comparisons and the cluster"):

* a hanging command is stopped after its timeout, and a failing one is tried again, with pauses
  that double, a bounded number of times, each retry said in one line;
* a refusal is not retried;
* a ``sbatch`` whose answer is lost does not submit the run twice;
* when SLURM stays unreachable, ``beseg compare`` ends with one line naming the command and
  ``beseg compare RESULTS --status``, and its jobs keep running (nothing is cancelled); the same
  command collects them later.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from beseg.cli import main
from beseg.experiment.layout import ResultsLayout
from beseg.experiment.slurm import SlurmLauncher, job_states

ROOT = Path(__file__).resolve().parents[2]
#: One epoch of two 16^3 steps on one thread: a real job of a few seconds.
TINY = ["train.epochs=1", "train.steps_per_epoch=2", "data.patch_size=[16,16,16]", "data.batch_size=1",
        "model.init_filters=8", "data.num_workers=0", "train.threads=1", "train.sw_batch_size=4"]
_FAKE = r"""#!/bin/bash
# fake {name}: the plan's entry for this call; calls inside a job, or without "{match}" in them, are real.
name={name}; real={real}; state={state}
if [ -n "$SLURM_JOB_ID" ] || [[ " $* " != *"{match}"* ]]; then exec "$real" "$@"; fi
exec 9>"$state.lock"; flock 9
n=$(( $(cat "$state.calls" 2>/dev/null || echo 0) + 1 )); echo "$n" > "$state.calls"
echo "$*" >> "$state.args"
exec 9>&-
plan=({plan})
what=${{plan[$(( n <= ${{#plan[@]}} ? n - 1 : ${{#plan[@]}} - 1 ))]}}
case "$what" in
    fail) echo "{name}: error: Socket timed out on send/recv operation" >&2; exit 1;;
    refuse) echo "{name}: error: Batch job submission failed: Invalid partition name specified" >&2; exit 1;;
    answer:*) echo "${{what#answer:}}"; exit 0;;
    hang) echo $$ >> "$state.pids"; exec sleep 600;;
    submit-hang) "$real" "$@" >> "$state.submitted"; echo $$ >> "$state.pids"; exec sleep 600;;
    real) out=$("$real" "$@"); rc=$?; [ "$name" = sbatch ] && [ $rc = 0 ] && echo "$out" >> "$state.submitted"
          [ -n "$out" ] && echo "$out"; exit $rc;;
esac
"""


class Fake:
    """A fake SLURM command in ``bin_dir`` with its plan; ``calls``, ``args`` and ``submitted`` read what it saw."""

    def __init__(self, bin_dir: Path, name: str, plan: list[str], match: str = "") -> None:
        self.state = bin_dir / f".{name}"
        for old in bin_dir.glob(f".{name}.*"):  # a new plan counts its calls from 1
            old.unlink()
        real = shutil.which(name, path="/usr/local/bin:/usr/bin:/bin") or f"/usr/bin/{name}"
        script = _FAKE.format(name=name, real=shlex.quote(real), state=shlex.quote(str(self.state)),
                              match=match, plan=" ".join(shlex.quote(p) for p in plan))
        path = bin_dir / name
        path.write_text(script)
        path.chmod(0o755)

    def _lines(self, suffix: str) -> list[str]:
        path = Path(f"{self.state}.{suffix}")
        return path.read_text().split("\n")[:-1] if path.exists() else []

    @property
    def calls(self) -> int:
        return int((self._lines("calls") or ["0"])[0])

    @property
    def args(self) -> list[str]:
        return self._lines("args")

    @property
    def submitted(self) -> list[str]:
        """Job ids the real sbatch gave (``--parsable`` output)."""
        return [line.split(";")[0] for line in self._lines("submitted") if line.strip()]

    @property
    def pids(self) -> list[int]:
        return [int(p) for p in self._lines("pids")]


@pytest.fixture
def fakes(tmp_path, monkeypatch):
    """Put a fresh fake-binary folder first on PATH; returns a maker ``fakes(name, plan, match="")``."""
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return lambda name, plan, match="": Fake(bin_dir, name, plan, match)


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


# ----------------------------------------------------------------------------------------------
# the calls (fakes only: no cluster needed)


def test_a_hanging_squeue_is_stopped_retried_with_doubling_pauses_then_named(fakes):
    from beseg.slurm_calls import SlurmRetry, SlurmUnreachable, call

    squeue = fakes("squeue", ["hang"])
    lines, pauses = [], []
    with pytest.raises(SlurmUnreachable) as info:
        call(["squeue", "-h", "-j", "17"], SlurmRetry(attempts=3, timeout_s=0.5, backoff_s=0.25), lines.append,
             sleep=pauses.append)
    assert squeue.calls == 3 and pauses == [0.25, 0.5]
    assert str(info.value).startswith("squeue -h failed 3 time(s) over ") and str(info.value).endswith(
        "(last: no answer in 0.5 s)")
    assert [re.sub(r"in [0-9.]+ s", "in N s", x) for x in lines] == [
        "squeue -h: no answer in N s; trying again in N s (attempt 2 of 3)",
        "squeue -h: no answer in N s; trying again in N s (attempt 3 of 3)"]
    assert len(squeue.pids) == 3 and all(_gone(pid) for pid in squeue.pids)  # each hung try was killed


def test_a_transient_squeue_failure_is_retried_until_it_answers(fakes):
    from beseg.slurm_calls import SlurmRetry

    squeue = fakes("squeue", ["fail", "fail", "answer:17 RUNNING"])
    lines: list[str] = []
    states = job_states(["17"], SlurmRetry(attempts=4, timeout_s=5, backoff_s=0.05), lines.append)
    assert states == {"17": "RUNNING"} and squeue.calls == 3
    assert len(lines) == 2 and all("squeue -h: exit code 1: squeue: error: Socket timed out" in x for x in lines)


def test_a_refusal_is_not_retried_and_names_the_run_and_the_reason(fakes, tmp_path):
    from beseg.slurm_calls import SlurmError, SlurmRetry, SlurmUnreachable

    sbatch = fakes("sbatch", ["refuse"])
    launcher = SlurmLauncher(partition="nosuch", retry=SlurmRetry(attempts=4, timeout_s=5, backoff_s=0.05))
    with pytest.raises(SlurmError) as info:
        launcher.submit(ResultsLayout(tmp_path / "results"), "segresnet_dice/seed0")
    assert sbatch.calls == 1 and not isinstance(info.value, SlurmUnreachable)
    assert str(info.value).startswith("sbatch refused segresnet_dice/seed0 (") and "Invalid partition name" in str(info.value)

    # Refused in the middle of a comparison's submissions: the jobs already submitted are left to run, and said so.
    fakes("sbatch", ["answer:101", "refuse"])
    fakes("squeue", ["answer:"])  # nothing of this user's is queued yet
    with pytest.raises(SlurmError) as info:
        launcher.execute(ResultsLayout(tmp_path / "results"), ["a/seed0", "b/seed0", "c/seed0"], lambda _: None)
    assert str(info.value).startswith("sbatch refused b/seed0 (") and str(info.value).endswith(
        "the 1 SLURM job(s) submitted (101) keep running (none was cancelled); follow them with `beseg compare "
        f"{tmp_path / 'results'} --status`; fix the cause and run the same command again to submit the rest.")


def test_unreachable_squeue_means_unknown_for_a_claim_not_ended(fakes):
    """A claim is taken over when its SLURM job has ended; a squeue that fails must not look like "ended"."""
    from beseg.slurm_calls import SlurmRetry, job_listed

    fakes("squeue", ["fail"])
    assert job_listed("17", SlurmRetry(attempts=2, timeout_s=5, backoff_s=0.01)) is None
    fakes("squeue", ["hang"])
    assert job_listed("17", SlurmRetry(attempts=1, timeout_s=0.3)) is None


# ----------------------------------------------------------------------------------------------
# beseg compare --launcher slurm on the test cluster (real jobs)


@pytest.fixture(scope="module")
def cluster() -> Path:
    """The test cluster's job-completion file; skips (fails in CI) without a cluster that answers."""
    def unavailable(reason: str) -> None:
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; CI must run the SLURM fault tests (.ci/run starts scripts/slurm_cluster.sh)")
        pytest.skip(reason)

    if shutil.which("sbatch") is None:
        unavailable("SLURM is not installed")
    try:
        info = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        info = None
    if info is None or info.returncode != 0 or not info.stdout.strip():
        unavailable("no SLURM cluster answers (scripts/slurm_cluster.sh start; export SLURM_CONF)")
    config = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=30).stdout
    match = re.search(r"^JobCompLoc\s*=\s*(\S+)", config, flags=re.M)
    if not match:
        unavailable("the cluster writes no job-completion records")
    return Path(match.group(1))


def _job_state(jobcomp: Path, job: str) -> str | None:
    for line in jobcomp.read_text().splitlines():
        fields = dict(m.groups() for m in re.finditer(r"(\w+)=(\S*)", line))
        if fields.get("JobId") == job:
            return fields.get("JobState")
    return None


@pytest.fixture
def compare_argv(tiny_data, tmp_path, monkeypatch):
    """``beseg compare`` of one tiny run through SLURM, into a results folder with a space in its path."""
    monkeypatch.setenv("BESEG_CACHE_DIR", str(tmp_path / "beseg-cache"))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    out = tmp_path / "my results"
    return out, ["compare", "--data", str(tiny_data), "--systems", "dice", "--seeds", "1", "--out", str(out),
                 "--launcher", "slurm", "--no-progress", "--no-report", *TINY, f"data.cache_dir={tmp_path / 'cache'}"]


def test_slurm_unreachable_while_waiting_is_one_line_and_the_job_keeps_running(cluster, fakes, compare_argv, capsys,
                                                                               monkeypatch):
    out, argv = compare_argv
    monkeypatch.setenv("BESEG_SLURM_ATTEMPTS", "3")
    monkeypatch.setenv("BESEG_SLURM_TIMEOUT_S", "1")
    monkeypatch.setenv("BESEG_SLURM_BACKOFF_S", "0.2")
    real_path = os.environ["PATH"].split(os.pathsep, 1)[1]  # without the fakes
    squeue = fakes("squeue", ["hang"], match=" -j ")  # every poll of the jobs hangs; other queries answer
    scancel = fakes("scancel", ["real"])
    assert main(argv) == 1
    captured = capsys.readouterr()
    err_lines = captured.err.strip().splitlines()
    job = (out / "slurm" / "segresnet_dice.seed0.jobid").read_text().strip()
    assert len(err_lines) == 1 and "Traceback" not in captured.err, captured.err
    line = err_lines[0]
    assert line.startswith("beseg compare: error: SLURM does not answer: squeue -h failed 3 time(s) over ")
    assert f"the 1 SLURM job(s) submitted ({job}) keep running (none was cancelled)" in line
    assert f"follow them with `beseg compare {shlex.quote(str(out))} --status`" in line
    assert squeue.calls == 3 and captured.out.count("trying again in") == 2

    # The job was left alone: it finishes on its own, and the same command collects it without a new job.
    monkeypatch.setenv("PATH", real_path)
    end = time.monotonic() + 300
    while job_states([job]) and time.monotonic() < end:
        time.sleep(0.5)
    assert scancel.calls == 0 and _job_state(cluster, job) == "COMPLETED"
    assert (out / "segresnet_dice" / "seed0" / "eval" / "summary.json").is_file()
    assert main(["compare", str(out), "--status"]) == 0
    assert re.search(r"^segresnet_dice/seed0\s+done\b", capsys.readouterr().out, flags=re.M)
    assert main(argv) == 0
    assert (out / "slurm" / "segresnet_dice.seed0.jobid").read_text().strip() == job


def test_transient_sbatch_and_squeue_faults_are_retried_and_the_run_is_submitted_once(cluster, fakes, compare_argv,
                                                                                      capsys, monkeypatch):
    out, argv = compare_argv
    monkeypatch.setenv("BESEG_SLURM_ATTEMPTS", "4")
    monkeypatch.setenv("BESEG_SLURM_TIMEOUT_S", "5")  # room for the real sbatch inside "submit-hang"
    monkeypatch.setenv("BESEG_SLURM_BACKOFF_S", "0.2")
    # sbatch: fails, then submits but its answer never comes; squeue -j: fails, hangs, fails, then answers.
    sbatch = fakes("sbatch", ["fail", "submit-hang", "real"])
    squeue = fakes("squeue", ["fail", "hang", "fail", "real"], match=" -j ")
    assert main(argv) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    job = (out / "slurm" / "segresnet_dice.seed0.jobid").read_text().strip()
    assert sbatch.calls == 2 and sbatch.submitted == [job]  # one job, found in the queue, not submitted again
    assert f"segresnet_dice/seed0: the failed sbatch submitted it after all, as SLURM job {job}" in printed
    assert "sbatch --parsable: exit code 1: sbatch: error: Socket timed out" in printed
    assert "squeue -h: no answer in 5 s; trying again" in printed and squeue.calls >= 4
    assert _job_state(cluster, job) == "COMPLETED"
    run = out / "segresnet_dice" / "seed0"
    assert json.loads((run / "run.json").read_text())["job_id"] == job and (run / "eval" / "summary.json").is_file()

"""Tests of beseg.engine.claim: a run folder is claimed by exactly one live process, on any host.

The claim is beseg.fileio's lock primitive; tests/test_fileio.py tests the primitive itself. Records are
faked here the way a real holder leaves them: taken by a real process (which is then killed, stopped or
given another pid), or written with the fields a holder writes.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

from beseg.engine.claim import Claim, RunLockedError
from beseg.engine.rundir import RunDir
from beseg.fileio import LockLostError, process_identity

REPO = Path(__file__).resolve().parents[1]


def _write(path, **record):
    base = {**process_identity(), "token": "0" * 32, "started": time.time(), "heartbeat": time.time()}
    path.write_text(json.dumps({**base, **record}))


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _age(path: Path, seconds: float) -> None:
    """Make a heartbeat ``seconds`` old, as the filesystem sees it (the file was last written then)."""
    then = time.time() - seconds
    os.utime(path, (then, then))


HOLD = """
import sys, time
from beseg.engine.claim import Claim
claim = Claim(sys.argv[1], heartbeat_s=float(sys.argv[2]), stale_after_s=float(sys.argv[3]))
claim.acquire()
print(claim.token, flush=True)
time.sleep(600)
"""


def _holder(path: Path, heartbeat_s: float = 0.1, stale_after_s: float = 60) -> tuple[subprocess.Popen, str]:
    """A real process holding the claim (its heartbeat thread beating); returns it and its token."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(path), str(heartbeat_s), str(stale_after_s)],
                            stdout=subprocess.PIPE, text=True, env=env)
    token = proc.stdout.readline().strip()
    assert token, "the holder did not take the claim"
    return proc, token


def _end(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGCONT)
    proc.kill()
    proc.wait()


def test_a_claim_records_who_holds_it_refreshes_its_heartbeat_and_is_released(tmp_path):
    claim = Claim(tmp_path / "run" / ".claim", heartbeat_s=0.05, stale_after_s=10)
    assert claim.acquire() is True
    record = json.loads(claim.path.read_text())
    me = process_identity()
    assert {k: record[k] for k in ("host", "pid", "start", "boot")} == {k: me[k] for k in ("host", "pid", "start", "boot")}
    assert record["start"] is not None and record["boot"] is not None  # what survives pid reuse
    first = claim.holder()["beat"]
    time.sleep(0.4)
    assert claim.holder()["beat"] > first  # refreshed by the holder's thread
    assert json.loads(claim.path.read_text()) == record  # in its own file: the claim file is never rewritten
    nested = Claim(claim.path)
    assert nested.acquire() is False and nested.token == claim.token  # the same process: adopted, nothing to release
    claim.release()
    assert list(claim.path.parent.iterdir()) == []  # no claim, heartbeat or guard file left


def test_a_dead_pid_on_this_host_is_taken_over_with_a_warning(tmp_path):
    path = tmp_path / ".claim"
    pid = _dead_pid()
    _write(path, pid=pid)
    claim = Claim(path)
    with pytest.warns(RuntimeWarning, match=f"process {pid} on {socket.gethostname()} no longer exists"):
        assert claim.acquire() is True
    assert json.loads(path.read_text())["pid"] == os.getpid()
    claim.release()


def test_another_hosts_claim_is_taken_over_only_when_its_heartbeat_is_stale(tmp_path):
    path = tmp_path / ".claim"
    _write(path, host="node-elsewhere", pid=1)
    _age(path, 5)  # alive 5 s ago
    with pytest.raises(RunLockedError, match="in use by process 1 on node-elsewhere"):
        Claim(path, heartbeat_s=1, stale_after_s=60).acquire()
    _age(path, 120)  # silent for 2 min
    claim = Claim(path, heartbeat_s=1, stale_after_s=60)
    with pytest.warns(RuntimeWarning, match=r"heartbeat has not changed for \d+ s"):
        assert claim.acquire() is True
    assert json.loads(path.read_text())["host"] == socket.gethostname()
    claim.release()


def test_a_host_whose_clock_is_behind_keeps_its_claim(tmp_path):
    """Suspicion: stale checks compare times taken on different hosts. A node whose clock is 10 minutes behind
    writes heartbeats that look 10 minutes old by this host's clock; it is alive (its heartbeat file was just
    written, by the filesystem's clock) and keeps its claim."""
    path = tmp_path / ".claim"
    behind = time.time() - 600
    _write(path, host="node-slow-clock", pid=1, started=behind, heartbeat=behind)
    with pytest.raises(RunLockedError, match="in use by process 1 on node-slow-clock"):
        Claim(path, heartbeat_s=1, stale_after_s=300).acquire()
    assert json.loads(path.read_text())["host"] == "node-slow-clock"


def test_a_watcher_takes_over_a_heartbeat_it_has_seen_unchanged_for_the_limit(tmp_path, monkeypatch):
    """On another host with a skewed clock and a fresh-looking file, the waiter's own observation decides."""
    monkeypatch.setenv("BESEG_LOCK_SKEW_S", "0")
    path = tmp_path / ".claim"
    _write(path, host="node-elsewhere", pid=1)
    claim = Claim(path, heartbeat_s=0.1, stale_after_s=1.0)
    with pytest.raises(RunLockedError):
        claim.acquire()  # first sight: fresh
    time.sleep(1.2)
    with pytest.warns(RuntimeWarning, match=r"heartbeat has not changed for 1 s \(the limit is 1 s\)"):
        assert claim.acquire() is True
    claim.release()


def test_a_live_process_on_this_host_keeps_its_claim(tmp_path):
    path = tmp_path / ".claim"
    proc, _ = _holder(path)
    try:
        with pytest.raises(RunLockedError, match=f"in use by process {proc.pid}"):
            RunDir(tmp_path).acquire()
        assert json.loads(path.read_text())["pid"] == proc.pid  # untouched
    finally:
        _end(proc)


def test_a_claim_of_an_earlier_start_of_the_same_slurm_job_is_taken_over(tmp_path, monkeypatch):
    path = tmp_path / ".claim"
    _write(path, host="node-elsewhere", pid=1, job_id="4242", restart=0)
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # SLURM ended the first start before it requeued the job
    claim = Claim(path)
    with pytest.warns(RuntimeWarning, match="earlier start of SLURM job 4242"):
        assert claim.acquire() is True
    claim.release()


def test_two_live_processes_of_one_slurm_allocation_do_not_take_a_run_from_each_other(tmp_path, monkeypatch):
    """Fix 3: every step and task of an allocation has the same SLURM_JOB_ID. A claim of a live process with this
    job id (another job step, a second compare in one salloc) is that process's, not an earlier start's."""
    import beseg.fileio

    monkeypatch.setattr(beseg.fileio, "job_listed", lambda job: True)  # the allocation runs (squeue agrees)
    path = tmp_path / ".claim"
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    proc, _ = _holder(path)  # the first step: inherits the job id
    try:
        monkeypatch.setenv("SLURM_STEP_ID", "1")  # a second step of the same allocation
        with pytest.raises(RunLockedError, match=f"in use by process {proc.pid} on {socket.gethostname()} "
                                                 r"\(SLURM job 4242\)"):
            Claim(path).acquire()
        # the same on another host: a job id that matches proves nothing, the heartbeat is fresh
        _write(path, host="node-elsewhere", pid=1, job_id="4242", restart=0)
        with pytest.raises(RunLockedError, match="on node-elsewhere"):
            Claim(path).acquire()
    finally:
        _end(proc)


def test_a_record_of_this_pid_from_another_process_is_not_mine_and_is_taken_over(tmp_path):
    """Fix 5: after a container restart this process may have the pid of the dead process that left a claim.
    Its start time differs, so the claim is not this process's (nested) claim, and it is taken over."""
    path = tmp_path / ".claim"
    me = process_identity()
    _write(path, start=me["start"] - 1)  # this host, this boot, this pid: an earlier process
    claim = Claim(path)
    assert not claim.is_mine(claim.holder())
    with pytest.warns(RuntimeWarning, match=f"pid {os.getpid()} now belongs to another process"):
        assert claim.acquire() is True  # taken, not adopted
    claim.release()
    assert not path.exists()


def test_a_claim_left_by_a_dead_process_whose_pid_is_alive_again_is_taken_over(tmp_path):
    """Fix 5 (the PID-reuse fault): the record of a killed holder, its pid now naming a live process."""
    path = tmp_path / ".claim"
    holder, _ = _holder(path)
    _end(holder)  # killed: its claim stays
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        path.write_text(re.sub(rf'("pid": ){holder.pid}\b', rf"\g<1>{sleeper.pid}", path.read_text()))
        assert json.loads(path.read_text())["pid"] == sleeper.pid
        claim = Claim(path)
        with pytest.warns(RuntimeWarning, match=f"pid {sleeper.pid} now belongs to another process"):
            assert claim.acquire() is True
        claim.release()
    finally:
        sleeper.kill()
        sleeper.wait()


def _race(path, barrier, results):
    barrier.wait()
    try:
        taken = Claim(path).acquire()
        results.put(taken)
        time.sleep(1.0)  # hold it while the others try
    except RunLockedError:
        results.put(False)


def test_of_processes_racing_for_one_run_exactly_one_claims_it(tmp_path):
    path = tmp_path / ".claim"
    _write(path, pid=_dead_pid())  # a stale claim all of them find at once
    ctx = multiprocessing.get_context("fork")
    barrier, results = ctx.Barrier(4), ctx.Queue()
    procs = [ctx.Process(target=_race, args=(path, barrier, results)) for _ in range(4)]
    for p in procs:
        p.start()
    outcomes = [results.get(timeout=30) for _ in procs]
    for p in procs:
        p.join()
    assert sorted(outcomes) == [False, False, False, True]


class _Forced(Claim):
    """A taker that judges one holder gone (as if its heartbeat had been silent for the limit) and every other
    holder by the normal rules."""

    victim = ""

    def gone_reason(self, record, now=None):
        if record and record.get("token") == self.victim:
            return "forced for the test"
        return super().gone_reason(record, now)

    stale_reason = gone_reason  # (the older name of the same rule)


def _refresh_hard(path, ready, done, results):
    replace = os.replace

    def slow_replace(src, dst):  # a slow filesystem: each rename of a refresh takes a while
        time.sleep(0.02)
        replace(src, dst)

    os.replace = slow_replace  # (in this forked holder process only)
    claim = Claim(path, heartbeat_s=100, stale_after_s=1000)  # the thread is slow: this loop beats
    claim.acquire()
    ready.put(claim.token)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and done.empty():
        if not claim.refresh():
            break
    try:
        claim.check()
        results.put(("holder", "not told"))
    except LockLostError as err:
        results.put(("holder", str(err)))


def _take(path, victim, barrier, results):
    claim = _Forced(path)
    claim.victim = victim
    barrier.wait()
    try:
        claim.acquire()
    except RunLockedError:
        results.put(("taker", None))
        return
    time.sleep(0.3)  # the old holder keeps refreshing meanwhile
    results.put(("taker", "kept" if json.loads(path.read_text())["token"] == claim.token else "overwritten"))
    time.sleep(0.5)  # hold it while the old holder looks
    claim.release()


def test_a_refreshing_holder_never_overwrites_the_claim_of_the_process_that_took_it_over(tmp_path):
    """Fix 4: refresh was check-then-rename, so a holder refreshing while it was taken over wrote its record back
    over the new holder's (here each refresh's rename is slowed down, as on a busy network filesystem). The
    heartbeat goes to the holder's own file now. Several takers race; one wins, keeps the claim, and the old holder
    learns at its next check that it lost, naming the winner."""
    ctx = multiprocessing.get_context("fork")
    for round_ in range(2):
        path = tmp_path / f"round{round_}" / ".claim"
        ready, done, results = ctx.Queue(), ctx.Queue(), ctx.Queue()
        holder = ctx.Process(target=_refresh_hard, args=(path, ready, done, results))
        holder.start()
        victim = ready.get(timeout=30)
        barrier = ctx.Barrier(3)
        takers = [ctx.Process(target=_take, args=(path, victim, barrier, results)) for _ in range(3)]
        for p in takers:
            p.start()
        got = []
        while sum(k == "taker" for k, _ in got) < len(takers):
            got.append(results.get(timeout=60))
        done.put(True)  # the holder stops refreshing if it has not noticed yet
        if not any(k == "holder" for k, _ in got):
            got.append(results.get(timeout=60))
        outcomes = sorted(str(v) for k, v in got if k == "taker")
        holder_said = next(v for k, v in got if k == "holder")
        for p in (holder, *takers):
            p.join(timeout=30)
        assert outcomes == ["None", "None", "kept"]
        assert re.fullmatch(rf"{re.escape(str(path.parent))}: claim lost to {re.escape(socket.gethostname())}/\d+; "
                            "stopping without writing", holder_said), holder_said


STOPPED_HOLDER = """
import sys, time
from pathlib import Path
from beseg.engine.rundir import RunDir
from beseg.fileio import LockLostError
run = RunDir(sys.argv[1])
run.acquire()
print("holding", flush=True)
sys.stdin.readline()  # SIGSTOP arrives here; after SIGCONT the test sends a line
try:
    run.log({"kind": "train", "epoch": 2})
    print("wrote", flush=True)
except LockLostError as err:
    print(err, flush=True)
    sys.exit(err.exit_code)
"""


def test_a_holder_stopped_past_the_limit_is_taken_over_and_stops_without_writing(tmp_path, monkeypatch):
    """Fix 4: SIGSTOP past the stale limit on this host (the pid lives on), a takeover, SIGCONT: the first holder
    learns it lost at its next fenced write, writes nothing, and exits with the claim-lost code."""
    for key, value in {"BESEG_CLAIM_HEARTBEAT_S": "0.1", "BESEG_CLAIM_STALE_S": "1", "BESEG_LOCK_SKEW_S": "0"}.items():
        monkeypatch.setenv(key, value)
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", STOPPED_HOLDER, str(run)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert proc.stdout.readline().strip() == "holding"
        proc.send_signal(signal.SIGSTOP)
        taker = Claim(run / ".claim")
        deadline = time.monotonic() + 30
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            while True:  # watch until the heartbeat has been silent for the limit
                try:
                    assert taker.acquire() is True
                    break
                except RunLockedError:
                    assert time.monotonic() < deadline
                    time.sleep(0.2)
        assert re.search(f"taking over the claim of process {proc.pid} .*heartbeat has not changed",
                         str(said[-1].message))
        proc.send_signal(signal.SIGCONT)
        time.sleep(0.5)  # its heartbeat thread wakes up first, finds the claim lost, and writes nothing
        assert json.loads(taker.path.read_text())["token"] == taker.token
        out, _ = proc.communicate(input="go\n", timeout=60)
        assert out.strip() == f"{run}: claim lost to {socket.gethostname()}/{os.getpid()}; stopping without writing"
        assert proc.returncode == 76
        assert not (run / "metrics.jsonl").exists()
        assert sorted(p.name for p in run.iterdir()) == sorted([".claim", f".claim.{taker.token}"])
        taker.release()
    finally:
        _end(proc)

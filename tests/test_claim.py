"""Tests of beseg.engine.claim: a run folder is claimed by exactly one live process, on any host."""

from __future__ import annotations

import json
import multiprocessing
import os
import socket
import subprocess
import sys
import time

import pytest

from beseg.engine.claim import Claim, RunLockedError
from beseg.engine.rundir import RunDir


def _write(path, **record):
    base = {"host": socket.gethostname(), "pid": os.getpid(), "job_id": None, "token": "x",
            "started": time.time(), "heartbeat": time.time()}
    path.write_text(json.dumps({**base, **record}))


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_claim_records_host_pid_and_heartbeat_and_is_released(tmp_path):
    claim = Claim(tmp_path / "run" / ".claim", heartbeat_s=0.05, stale_after_s=10)
    assert claim.acquire() is True
    record = json.loads(claim.path.read_text())
    assert (record["host"], record["pid"]) == (socket.gethostname(), os.getpid())
    first = record["heartbeat"]
    time.sleep(0.3)
    assert json.loads(claim.path.read_text())["heartbeat"] > first  # refreshed by the holder
    assert Claim(claim.path).acquire() is False  # the same process: nested, nothing to release
    assert claim.path.exists()
    claim.release()
    assert not claim.path.exists()


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
    _write(path, host="node-elsewhere", pid=1, heartbeat=time.time() - 5)  # alive 5 s ago
    with pytest.raises(RunLockedError, match="in use by process 1 on node-elsewhere"):
        Claim(path, heartbeat_s=1, stale_after_s=60).acquire()
    _write(path, host="node-elsewhere", pid=1, heartbeat=time.time() - 120)  # silent for 2 min
    claim = Claim(path, heartbeat_s=1, stale_after_s=60)
    with pytest.warns(RuntimeWarning, match="heartbeat is 1[12][0-9] s old"):
        assert claim.acquire() is True
    assert json.loads(path.read_text())["host"] == socket.gethostname()
    claim.release()


def test_a_live_process_on_this_host_keeps_its_claim(tmp_path):
    path = tmp_path / ".claim"
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        _write(path, pid=proc.pid)
        with pytest.raises(RunLockedError, match=f"in use by process {proc.pid}"):
            RunDir(tmp_path).acquire()
        assert json.loads(path.read_text())["pid"] == proc.pid  # untouched
    finally:
        proc.kill()
        proc.wait()


def test_a_claim_of_an_earlier_start_of_the_same_slurm_job_is_taken_over(tmp_path, monkeypatch):
    path = tmp_path / ".claim"
    _write(path, host="node-elsewhere", pid=1, job_id="4242")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    claim = Claim(path)
    with pytest.warns(RuntimeWarning, match="earlier start of this SLURM job"):
        assert claim.acquire() is True
    claim.release()


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

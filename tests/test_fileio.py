"""Atomic output (the target is replaced whole or not at all, and no temporary file is left) and the lock primitive."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest

from beseg.errors import ConfigError
from beseg.fileio import (
    FileLock,
    LockBusyError,
    LockLostError,
    LockTimings,
    atomic_output,
    atomic_write_text,
    process_identity,
    process_start_time,
)


def test_atomic_write_replaces_the_file(tmp_path):
    target = tmp_path / "sub" / "summary.json"
    atomic_write_text(target, "old")
    atomic_write_text(target, "new")
    assert target.read_text() == "new" and sorted(p.name for p in target.parent.iterdir()) == ["summary.json"]


def test_a_failed_write_keeps_the_previous_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "per_case.csv"
    target.write_text("previous")
    with pytest.raises(OSError, match="No space left"):
        with atomic_output(target) as tmp:
            tmp.write_text("half")
            raise OSError(28, "No space left on device")
    assert target.read_text() == "previous" and [p.name for p in tmp_path.iterdir()] == ["per_case.csv"]


def test_temporary_name_is_hidden_and_keeps_the_requested_ending(tmp_path):
    with atomic_output(tmp_path / "case.nii.gz", suffix=".tmp.nii.gz") as tmp:
        assert tmp.name.startswith(".case.nii.gz.") and tmp.name.endswith(".tmp.nii.gz")
        tmp.write_bytes(b"x")
    assert (tmp_path / "case.nii.gz").read_bytes() == b"x"


# ---- the lock primitive ----------------------------------------------------------------------


FAST = LockTimings(heartbeat_s=0.05, stale_after_s=30, skew_s=0)


def test_a_failed_fence_renames_nothing_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "metrics.jsonl"
    target.write_text("previous")

    def fence():
        raise LockLostError("claim lost")

    with pytest.raises(LockLostError):
        with atomic_output(target, fence=fence) as tmp:
            tmp.write_text("new")
    assert target.read_text() == "previous" and [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]


def test_an_os_error_while_writing_names_the_target(tmp_path):
    target = tmp_path / "case.image.npy"
    with pytest.raises(OSError) as err:
        with atomic_output(target):
            raise OSError(28, "No space left on device")
    assert err.value.errno == 28 and err.value.filename == str(target)
    assert str(target) in str(err.value)


def test_the_start_time_survives_an_odd_process_name_and_tells_processes_apart():
    # comm may hold spaces and parentheses; field 22 is counted after the last ")"
    script = "open('/proc/self/comm', 'w').write('a) b (c'); import time; print('ok', flush=True); time.sleep(30)"
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        before = process_start_time(proc.pid)
        assert proc.stdout.readline().strip() == "ok"
        assert open(f"/proc/{proc.pid}/comm").read().strip() == "a) b (c"
        assert process_start_time(proc.pid) == before  # the same process, whatever its name
        assert before >= process_start_time(os.getpid())  # started after this one
    finally:
        proc.kill()
        proc.wait()
    assert process_start_time(proc.pid) is None  # gone


def test_lock_timings_come_from_the_environment_and_bad_values_are_named(monkeypatch):
    assert LockTimings.from_env("CLAIM", 30, 300) == LockTimings(30, 300, 30)
    monkeypatch.setenv("BESEG_CLAIM_STALE_S", "3")
    monkeypatch.setenv("BESEG_CLAIM_HEARTBEAT_S", "0.5")
    assert LockTimings.from_env("CLAIM", 30, 300) == LockTimings(0.5, 3.0, 30.0)
    monkeypatch.setenv("BESEG_CLAIM_STALE_S", "soon")
    with pytest.raises(ConfigError, match="BESEG_CLAIM_STALE_S='soon': expected a number of seconds"):
        LockTimings.from_env("CLAIM", 30, 300)
    monkeypatch.setenv("BESEG_CLAIM_STALE_S", "0.1")
    with pytest.raises(ConfigError, match="need 0 < heartbeat_s < stale_after_s"):
        LockTimings.from_env("CLAIM", 30, 300)


def test_two_threads_of_one_process_never_both_hold_a_lock(tmp_path):
    first, second = FileLock(tmp_path / "x.lock", FAST), FileLock(tmp_path / "x.lock", FAST)
    assert first.acquire() is True
    with pytest.raises(LockBusyError, match=f"locked by process {os.getpid()}"):
        second.acquire()
    first.release()
    assert second.acquire() is True
    second.release()
    assert list(tmp_path.iterdir()) == []


class _Forced(FileLock):
    def gone_reason(self, record, now=None):
        return "forced for the test"


def test_a_holder_that_was_taken_over_is_fenced_and_its_release_leaves_the_new_holder_alone(tmp_path):
    old = FileLock(tmp_path / "x.lock", FAST, noun="claim", label="RUN")
    assert old.acquire()
    old.check()  # still ours: nothing happens
    new = _Forced(tmp_path / "x.lock", FAST, on_takeover=lambda _: None)
    assert new.acquire() is True
    time.sleep(0.3)  # the old holder's heartbeat thread finds out, and writes nothing more
    assert old.lost == f"RUN: claim lost to {process_identity()['host']}/{os.getpid()}; stopping without writing"
    with pytest.raises(LockLostError) as err:
        old.check()
    assert err.value.exit_code == 76 and str(err.value) == old.lost
    assert not old.beat_path(old.token).exists()
    old.release()
    assert json.loads((tmp_path / "x.lock").read_text())["token"] == new.token  # not removed
    new.release()
    assert list(tmp_path.iterdir()) == []


def test_a_guard_left_by_a_dead_process_does_not_block_a_takeover(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock = FileLock(tmp_path / "x.lock", FAST, on_takeover=lambda _: None)
    record = {**process_identity(), "pid": dead.pid, "token": "f" * 32}
    (tmp_path / "x.lock").write_text(json.dumps(record))
    lock.guard_path.write_text(json.dumps(record))  # killed while taking over
    assert lock.acquire() is True
    assert not lock.guard_path.exists()
    lock.release()


def test_of_threads_waiting_for_a_lock_each_gets_it_in_turn(tmp_path):
    held, overlaps = [], []

    def work():
        lock = FileLock(tmp_path / "x.lock", FAST)
        for _ in range(3):
            while True:
                try:
                    lock.acquire()
                    break
                except LockBusyError:
                    time.sleep(0.005)
            if held:
                overlaps.append(True)
            held.append(1)
            time.sleep(0.01)
            held.pop()
            lock.release()

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not overlaps and list(tmp_path.iterdir()) == []

"""PID reuse: the lock or claim of a killed process whose pid now names another live process.

After a container or node restart, pids start again from low numbers, so the pid in a left-over record may be
alive. The record's process start time tells the two apart: the lock is taken over with a message naming the
reason, never waited for forever. The records are made the real way (a command killed mid-way), then given the
pid of a live process.
"""

from __future__ import annotations

import re
import subprocess
import sys

from conftest import beseg, fault_env, kill_group, run_to_end, tiny_train_config, wait_for_marker

HANG = {"when": "before", "call": 1, "action": "hang"}


def _give_pid(record, dead: int, alive: int) -> None:
    """Replace the pid in a lock record (JSON, or the ``"<pid> <host>"`` of older beseg versions)."""
    text = record.read_text()
    record.write_text(re.sub(rf'("pid": ){dead}\b|^{dead}(?= )', lambda m: (m.group(1) or "") + str(alive), text))
    assert record.read_text() != text and str(alive) in record.read_text()


def _sleeper() -> subprocess.Popen:
    """The pid's new owner: a live process started after the holder died (as a reused pid's is)."""
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])


def test_a_store_lock_and_a_run_claim_whose_pid_was_reused_are_taken_over_with_a_message(tiny_data, tmp_path):
    sleepers = []
    try:
        # a store build killed while it held a case's lock
        cache = tmp_path / "cache"
        prepare = ["data", "prepare", tiny_data, "--config", "phantom_spleen_segresnet_dice",
                   f"data.cache_dir={cache}", "--no-progress"]
        proc = beseg(prepare, fault_env(tmp_path, {**HANG, "target": "numpy:save", "marker": str(tmp_path / "s")}))
        builder = wait_for_marker(proc, tmp_path / "s", what="the store build")
        kill_group(proc)
        sleepers.append(_sleeper())
        lock = next(cache.glob("store-*/*.lock"))
        _give_pid(lock, builder, sleepers[-1].pid)
        code, out = run_to_end(prepare, fault_env(tmp_path), timeout=300)
        assert code == 0, out
        assert f"taking over the lock of process {sleepers[-1].pid}" in out
        assert f"pid {sleepers[-1].pid} now belongs to another process" in out

        # a training killed while it held its run folder's claim
        config = tiny_train_config(tmp_path, train={"epochs": 1})
        run = tmp_path / "run"
        train = ["train", config, "--data", tiny_data, "--out", run, "--no-progress"]
        proc = beseg(train, fault_env(tmp_path, {**HANG, "target": "beseg.engine.rundir:RunDir.log",
                                                 "marker": str(tmp_path / "t")}))
        trainer = wait_for_marker(proc, tmp_path / "t", what="training")
        kill_group(proc)
        sleepers.append(_sleeper())
        _give_pid(run / ".claim", trainer, sleepers[-1].pid)
        code, out = run_to_end(train, fault_env(tmp_path), timeout=300)
        assert code == 0, out
        assert f"taking over the claim of process {sleepers[-1].pid}" in out
        assert f"pid {sleepers[-1].pid} now belongs to another process" in out
        assert not list(run.glob(".claim*"))
    finally:
        for sleeper in sleepers:
            sleeper.kill()
            sleeper.wait()

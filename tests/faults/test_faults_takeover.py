"""SIGSTOP of a training run past the stale limit, a takeover by a second `beseg compare`, then SIGCONT.

The claim's limits come from the environment, so the stop lasts seconds, not minutes. The first process must
stop without writing (its worker exits with the claim-lost code, which its compare reads as "another process
has the run"), and the run must finish once: one metrics.jsonl with every epoch once, one run record.
"""

from __future__ import annotations

import json
import os
import signal
import socket

import pytest
from conftest import (
    TINY_COMPARE,
    beseg,
    fault_env,
    kill_group,
    output,
    per_case_rows,
    tree_state,
    wait_ended,
    wait_for_marker,
    wait_stopped,
)

#: A heartbeat every 0.2 s; silent for 3 s means gone.
FAST_CLAIMS = {"BESEG_CLAIM_HEARTBEAT_S": "0.2", "BESEG_CLAIM_STALE_S": "3", "BESEG_LOCK_SKEW_S": "0.5"}
#: Each process stops itself (SIGSTOP) right after its first epoch's record is in metrics.jsonl.
STOP_AFTER_FIRST_EPOCH = {"target": "beseg.engine.rundir:RunDir.log", "call": 1, "when": "after", "action": "stop"}


def _written(run) -> dict:
    """The run folder's files, the claim's own files left out."""
    return {k: v for k, v in tree_state(run).items() if not os.path.basename(k).startswith(".claim")}


@pytest.mark.slow
def test_a_stopped_run_taken_over_by_a_second_compare_stops_without_writing_and_finishes_once(tiny_data, tmp_path):
    results = tmp_path / "results"
    argv = ["compare", "--data", tiny_data, "--systems", "dice", "--seeds", "1", "--out", results, "--no-progress",
            *TINY_COMPARE, "train.epochs=3", f"data.cache_dir={tmp_path / 'cache'}"]
    run = results / "segresnet_dice" / "seed0"
    first = beseg([*argv, "--jobs", "2"], fault_env(tmp_path, {**STOP_AFTER_FIRST_EPOCH, "marker": str(tmp_path / "a")},
                                                     **FAST_CLAIMS), log=tmp_path / "first.out")
    second = None
    try:
        worker = wait_for_marker(first, tmp_path / "a", what="the first epoch")  # its worker process trains
        wait_stopped(worker)
        assert json.loads((run / ".claim").read_text())["pid"] == worker

        second = beseg(argv, fault_env(tmp_path, {**STOP_AFTER_FIRST_EPOCH, "marker": str(tmp_path / "b")},
                                       **FAST_CLAIMS))
        taker = wait_for_marker(second, tmp_path / "b", timeout=300, what="a takeover and its first epoch")
        wait_stopped(taker)
        assert json.loads((run / ".claim").read_text())["pid"] == taker

        before = _written(run)
        os.kill(worker, signal.SIGCONT)  # the first holder goes on, while the second is stopped
        wait_ended(worker)
        assert _written(run) == before  # it wrote nothing more

        os.kill(taker, signal.SIGCONT)
        out_second, _ = second.communicate(timeout=600)
        assert second.returncode == 0, out_second.decode()
        assert first.wait(timeout=600) == 0, (tmp_path / "first.out").read_text()
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGCONT)
                kill_group(proc)
    said_second = out_second.decode()
    assert f"taking over the claim of process {worker} on {socket.gethostname()}" in said_second
    worker_log = (results / "logs" / "segresnet_dice.seed0.log").read_text()
    assert f"claim lost to {socket.gethostname()}/{taker}; stopping without writing" in worker_log
    assert "segresnet_dice/seed0: another process took it over; left to that process" in \
        (tmp_path / "first.out").read_text()

    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r["epoch"] for r in records if r["kind"] == "train"]
    assert train == [1, 2, 3]  # the run finished once: no epoch twice
    assert json.loads((run / "run.json").read_text())["pid"] == taker
    assert not (run / ".failed").exists() and not list(run.glob(".claim*"))
    assert len(per_case_rows(results)) == 1

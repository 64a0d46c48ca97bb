"""SIGKILL of a whole `beseg compare` process group at every stage, then the same command again.

One comparison is killed five times in a row, each time at a later stage (building the store, training,
writing a checkpoint, evaluating, writing the report), and each rerun is the same command. The final per-case
numbers must equal those of an uninterrupted run, every epoch must be logged once, and no temporary file may be
left in the results or the cache.
"""

from __future__ import annotations

import json

import pytest
from conftest import (
    TINY_COMPARE,
    beseg,
    fault_env,
    kill_group,
    per_case_rows,
    run_to_end,
    temporary_files,
    wait_for_marker,
)

#: (stage, fault): each kill happens at the k-th call of a function of the command's own process.
KILLS = [
    # the second case's image array is written to its temporary file, not yet renamed
    ("store build", {"target": "numpy:save", "call": 4, "when": "after"}),
    # the first epoch's training record is in metrics.jsonl; no checkpoint yet
    ("training", {"target": "beseg.engine.rundir:RunDir.log", "call": 1, "when": "after"}),
    # a checkpoint of epoch 1 is complete in its temporary file, not renamed
    ("checkpoint write", {"target": "torch:save", "call": 2, "when": "after"}),
    # one test case's prediction is written, the other is not, and there is no summary
    ("evaluation", {"target": "beseg.engine.evaluate:write_label", "call": 1, "when": "after"}),
    # every run is done; report.md and the figures are written, report.html is not
    ("report", {"target": "beseg.report.render:to_html", "call": 1, "when": "before"}),
]


def epochs_logged(run) -> list[tuple[str, int]]:
    """``(kind, epoch)`` of every record in a run's metrics.jsonl, in order."""
    return [(r["kind"], r["epoch"]) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]


def compare_args(data, out, cache) -> list:
    return ["compare", "--data", data, "--systems", "dice", "--seeds", "1", "--out", out, "--no-progress",
            *TINY_COMPARE, "train.epochs=2", f"data.cache_dir={cache}"]


@pytest.mark.slow
def test_sigkill_at_every_stage_then_the_same_command_gives_an_uninterrupted_runs_numbers(tiny_data, tmp_path):
    code, out = run_to_end(compare_args(tiny_data, tmp_path / "plain", tmp_path / "plain-cache"), fault_env(tmp_path))
    assert code == 0, out
    expected = per_case_rows(tmp_path / "plain")
    assert len(expected) == 1 and len(next(iter(expected.values()))) >= 2

    results, cache = tmp_path / "results", tmp_path / "cache"
    argv = compare_args(tiny_data, results, cache)
    left = {}
    for i, (stage, fault) in enumerate(KILLS):
        marker = tmp_path / f"reached-{i}"
        proc = beseg(argv, fault_env(tmp_path, {**fault, "action": "hang", "marker": str(marker)}))
        wait_for_marker(proc, marker, what=f"the {stage}")
        kill_group(proc)
        left[stage] = [p.name for p in temporary_files(results, cache)]
    # the kills mid-write left half-done files, which the next run cleaned up
    assert [n.split(".")[2:4] for n in left["store build"]] == [["image", "npy"]], left
    assert [n.split(".")[2] for n in left["checkpoint write"]] == ["pt"], left
    assert left["training"] == left["evaluation"] == left["report"] == [], left

    code, out = run_to_end(argv, fault_env(tmp_path))
    assert code == 0, out
    assert per_case_rows(results) == expected
    run = results / "segresnet_dice" / "seed0"
    assert epochs_logged(run) == epochs_logged(tmp_path / "plain" / "segresnet_dice" / "seed0")  # each once
    assert len(set(epochs_logged(run))) == len(epochs_logged(run)) and ("train", 2) in epochs_logged(run)
    assert temporary_files(results, cache) == []
    assert (results / "report" / "report.html").is_file()
    assert not list(run.glob(".claim*")) and not list(cache.glob("store-*/*.lock*"))

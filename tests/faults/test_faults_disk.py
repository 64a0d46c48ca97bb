"""A full disk (a small tmpfs, filled by the fault) while the store is built and while a checkpoint is written.

The command ends with one line naming the file that could not be written, nothing half-written is left (no
temporary file, no lock, no case or checkpoint that looks complete and is not), and the same command succeeds
once there is space again.
"""

from __future__ import annotations

import json
import re

import pytest
from conftest import TINY_COMPARE, fault_env, run_to_end, temporary_files

from beseg.data import get_preset, load_task
from beseg.data.store import open_store

CONFIG = "phantom_spleen_segresnet_dice"


def _fill_before(target: str, call: int, disk) -> dict:
    return {"target": target, "call": call, "when": "before", "action": "fill", "dir": str(disk)}


def _one_error_line(out: str, command: str) -> str:
    errors = [line for line in out.splitlines() if f"beseg {command}: error:" in line]
    assert len(errors) == 1 and "Traceback" not in out, out
    return errors[0]


@pytest.mark.slow
def test_a_full_disk_while_the_store_is_built_is_one_line_and_a_rerun_finishes_it(tiny_data, small_disk, tmp_path):
    cache = small_disk / "cache"
    argv = ["data", "prepare", tiny_data, "--config", CONFIG, f"data.cache_dir={cache}", "--no-progress"]
    # the disk fills up just before the second case's image array is written
    code, out = run_to_end(argv, fault_env(tmp_path, _fill_before("numpy:save", 4, small_disk)))
    assert code == 1
    line = _one_error_line(out, "data")
    assert re.search(rf"could not write {re.escape(str(cache))}/store-[^/]+/[\w.]+\.image\.npy: No space left on "
                     r"device; case '\w+' was not stored", line), line
    store = next(cache.glob("store-*"))
    assert temporary_files(cache) == [] and not list(store.glob("*.lock*"))
    manifests = sorted(p.name for p in store.glob("*.json") if p.name != "settings.json")
    assert len(manifests) == 1  # the first case is complete, the second was never half-stored
    assert len(list(store.glob("*.npy"))) == 3

    (small_disk / ".ballast").unlink()  # space again
    code, out = run_to_end(argv, fault_env(tmp_path))
    assert code == 0, out
    audit = open_store(load_task(tiny_data), get_preset("phantom-spleen"), cache).audit(load_task(tiny_data).training)
    assert len(audit.current) == 10 and audit.problems == 0


@pytest.mark.slow
def test_a_full_disk_while_a_checkpoint_is_written_is_one_line_and_a_rerun_finishes_the_run(tiny_data, small_disk,
                                                                                             tmp_path):
    results = small_disk / "results"
    argv = ["compare", "--data", tiny_data, "--systems", "dice", "--seeds", "1", "--out", results, "--no-progress",
            *TINY_COMPARE, f"data.cache_dir={tmp_path / 'cache'}", "--no-report"]
    # best.pt of epoch 1 is written; the disk fills up before last.pt
    code, out = run_to_end(argv, fault_env(tmp_path, _fill_before("torch:save", 2, small_disk)))
    assert code == 1
    run = results / "segresnet_dice" / "seed0"
    failed = [line for line in out.splitlines() if "FAILED" in line]
    assert len(failed) == 1 and "Traceback" not in out, out
    assert f"could not write checkpoint {run}/checkpoints/last.pt: No space left on device; the previous file is " \
           "intact" in failed[0], out
    assert temporary_files(results) == [] and not list(run.glob(".claim*"))
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.pt"]

    (small_disk / ".ballast").unlink()
    code, out = run_to_end(argv, fault_env(tmp_path))
    assert code == 0, out
    assert json.loads((run / "eval" / "summary.json").read_text())["cases"] >= 2
    assert temporary_files(results) == []

"""``beseg compare RESULTS --status``: where every run of a plan stands, read from the run folders.

One line per run: its state, where it runs or ran, its epoch, its best validation Dice and its time::

    segresnet_dice/seed0   done     node3 pid 4121 (job 5120)   epoch 300/300  best val Dice 0.9412   10 h 02 min
    segresnet_be/seed0     running  node7 pid 881 (job 5121)    epoch 121/300  best val Dice 0.9310    4 h 11 min
    segresnet_be/seed1     failed   see logs/segresnet_be.seed1.log: CUDA out of memory
    segresnet_be/seed2     pending

States: ``done`` (evaluated, ``eval/summary.json`` present and nobody working on it), ``running``
(a live claim), ``failed`` (the last attempt left ``.failed``), else ``pending``. A claim whose
holder is gone is shown as ``pending`` with the reason (the next compare takes it over).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from beseg.engine.claim import Claim
from beseg.engine.rundir import RunDir, read_metrics
from beseg.experiment import nnunet_runs
from beseg.experiment.nnunet_runs import NNUNetSystem
from beseg.experiment.plan import read_plan_json
from beseg.experiment.worker import RUN_RECORD, read_failure

__all__ = ["RunStatus", "plan_status", "format_status"]


@dataclass
class RunStatus:
    """One run's state, as ``--status`` prints it.

    Attributes:
        id: the run id (its folder relative to the results folder).
        state: ``pending``, ``running``, ``done`` or ``failed``.
        where: host and pid (and SLURM job id) of the process that holds or held it, else "".
        epoch: epochs logged so far; epochs: the config's epochs (an nnU-Net run: its trainer's, 0 before it starts).
        best_dice: best validation Dice logged so far (None before the first validation; an nnU-Net run:
            its best EMA pseudo Dice).
        seconds: time since the holder started (running) or the run's own time (done), else None.
        note: the error of a failed run, or why a claim is stale.
    """

    id: str
    state: str
    where: str
    epoch: int
    epochs: int
    best_dice: float | None
    seconds: float | None
    note: str = ""


def _where(record: dict[str, Any]) -> str:
    text = f"{record.get('host', '?')} pid {record.get('pid', '?')}"
    return text + (f" (job {record['job_id']})" if record.get("job_id") else "")


def plan_status(results_dir: str | Path) -> list[RunStatus]:
    """The status of every run in ``RESULTS/plan.json``.

    Raises:
        ConfigError: no readable ``plan.json``.
    """
    plan = read_plan_json(results_dir)
    out = []
    now = time.time()
    for entry in plan["runs"]:
        run_dir: Path = entry["path"]
        folder = RunDir(run_dir)
        epochs = entry["resolved"].train.epochs
        if entry.get("kind") == nnunet_runs.KIND:  # nnU-Net's own training log, while it trains
            system = NNUNetSystem(**entry["nnunet"])
            epoch, planned, best = nnunet_runs.read_progress(
                nnunet_runs.find_fold_dir(run_dir, system, entry.get("fold") or 0))
            epochs, dice = planned if planned is not None else 0, [best] if best is not None else []
        else:
            records = read_metrics(folder.metrics)
            epoch = max((r.get("epoch", 0) for r in records if r.get("kind") == "train"), default=0)
            dice = [r["dice_mean"] for r in records if r.get("kind") == "val" and isinstance(r.get("dice_mean"), float)]
        claim = Claim(folder.lock)
        held = claim.holder()
        record = _read_json(run_dir / RUN_RECORD)
        failure = read_failure(run_dir)
        state, where, seconds, note = "pending", "", None, ""
        if held:
            stale = claim.stale_reason(held, now)
            if stale is None:
                state, where = "running", _where(held)
                seconds = now - held["started"] if isinstance(held.get("started"), (int, float)) else None
            else:
                note = f"claim of {_where(held)} is stale: {stale}"
        if state == "pending":
            if failure is not None:
                state, where = "failed", failure.get("host", "")
                note = f"{failure.get('error', '')}" + (f" (log: {failure['log']})" if failure.get("log") else "")
            elif (folder.eval / "summary.json").is_file() and record is not None:
                state, where, seconds = "done", _where(record), record.get("seconds")
            elif (folder.eval / "summary.json").is_file() and epoch >= epochs:
                state = "done"  # evaluated by a beseg from before run records
        out.append(RunStatus(entry["id"], state, where, epoch, epochs, max(dice) if dice else None, seconds, note))
    return out


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def format_status(rows: list[RunStatus]) -> str:
    """The ``--status`` table: one line per run, then a count per state."""
    from beseg.experiment.outcome import duration_text

    width = max((len(r.id) for r in rows), default=0)
    lines = []
    for r in rows:
        dice = f"best val Dice {r.best_dice:.4f}" if r.best_dice is not None else "best val Dice -"
        took = duration_text(r.seconds) if r.seconds is not None else "-"
        lines.append(f"{r.id:<{width}}  {r.state:<8} {r.where or '-':<28} epoch {r.epoch}/{r.epochs}  {dice}  {took}"
                     + (f"  {r.note}" if r.note else ""))
    counts = {s: sum(r.state == s for r in rows) for s in ("done", "running", "failed", "pending")}
    lines.append(", ".join(f"{n} {s}" for s, n in counts.items() if n) + f" of {len(rows)} run(s)")
    return "\n".join(lines)

"""Launchers: what executes the pending runs of a plan.

* :class:`LocalLauncher` (``--launcher local``, the default) runs them on this machine. With
  neither ``devices`` nor ``jobs > 1`` it runs them one after another in this process (as
  ``beseg compare`` always did). With ``devices=["0", "1", ...]`` it keeps one run per device
  busy, each in its own process that sees only that device (``CUDA_VISIBLE_DEVICES``), for training
  and evaluation alike; with ``jobs=N`` it keeps N CPU runs busy, each with its share of the cores
  (``OMP_NUM_THREADS`` and ``train.threads`` unless the config sets them).

Each process runs ``python -m beseg.experiment.worker RESULTS RUN_ID`` with its output in
``RESULTS/logs/<run>.log``. A failing run does not stop the others. A run another process holds
(a second ``beseg compare`` on the same folder, another node), or took over while this one was
stopped (the worker's exit code :data:`~beseg.experiment.worker.EXIT_CLAIM_LOST`), is left to it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from beseg.errors import ConfigError
from beseg.experiment.layout import ResultsLayout
from beseg.experiment.outcome import LaunchOutcome, Progress, duration_text

__all__ = ["LocalLauncher", "make_launcher", "parse_devices"]


def parse_devices(text: str | None) -> list[str] | None:
    """``--devices 0,1,3`` -> ``["0", "1", "3"]``.

    Raises:
        ConfigError: an entry that is not a GPU index, or one given twice.
    """
    if text is None:
        return None
    devices = [d.strip().removeprefix("cuda:") for d in text.split(",") if d.strip()]
    if not devices or any(not d.isdigit() for d in devices) or len(set(devices)) != len(devices):
        raise ConfigError(f"--devices must list distinct GPU indices, e.g. 0,1,2,3; got {text!r}.")
    return devices


class LocalLauncher:
    """Runs on this machine: in this process one by one, or in a pool of processes over devices or cores.

    Args:
        devices: GPU indices, one run at a time on each.
        jobs: CPU runs at a time (without ``devices``).
        cpus: cores to share among the ``jobs`` (default: the cores this process may use).
    """

    name = "local"

    def __init__(self, devices: Sequence[str] | None = None, jobs: int = 1, cpus: int | None = None) -> None:
        if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
            raise ConfigError(f"--jobs must be at least 1, got {jobs!r}.")
        if devices is not None and jobs != 1:
            raise ConfigError("give --devices (one run per GPU) or --jobs (CPU runs), not both.")
        self.devices = list(devices) if devices is not None else None
        self.jobs = jobs
        self.cpus = cpus or len(os.sched_getaffinity(0))

    @property
    def in_process(self) -> bool:
        """Whether runs execute in this process (no devices, one job)."""
        return self.devices is None and self.jobs == 1

    @property
    def slots(self) -> list[str | None]:
        return list(self.devices) if self.devices is not None else [None] * self.jobs

    def threads_per_run(self) -> int:
        """Each CPU run's share of the cores."""
        return max(1, self.cpus // len(self.slots))

    def _env(self, device: str | None) -> dict[str, str]:
        env = dict(os.environ)
        if device is not None:
            env["CUDA_VISIBLE_DEVICES"] = device
            env["BESEG_RUN_DEVICE"] = "cuda"  # the one GPU the process sees, whatever train.device names
        else:
            share = str(self.threads_per_run())
            env["OMP_NUM_THREADS"] = share
            env["BESEG_RUN_THREADS"] = share
        # The child imports the same beseg as this process, wherever it comes from.
        root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
        return env

    def execute(self, results: ResultsLayout, run_ids: Sequence[str], log: Callable[[str], None],
                poll_s: float = 0.5) -> LaunchOutcome:
        """Run ``python -m beseg.experiment.worker`` for each id, keeping every slot busy, until all have ended.

        Args:
            results: the results folder (its ``plan.json`` holds the runs).
            run_ids: the runs to execute.
            log: progress lines.
            poll_s: how often finished processes are collected.

        Returns:
            The :class:`LaunchOutcome`.
        """
        from beseg.experiment.worker import EXIT_BUSY, EXIT_CLAIM_LOST, read_failure

        outcome = LaunchOutcome()
        queue = list(run_ids)
        free = self.slots
        running: dict[str, tuple[subprocess.Popen, str | None, object]] = {}
        progress = Progress(len(queue), log, len(free))
        results.logs.mkdir(parents=True, exist_ok=True)
        while queue or running:
            while queue and free:
                run_id, slot = queue.pop(0), free.pop(0)
                log_path = results.log(run_id)
                handle = open(log_path, "a", encoding="utf-8")
                proc = subprocess.Popen(
                    [sys.executable, "-m", "beseg.experiment.worker", str(results.root), run_id, "--no-progress"],
                    stdout=handle, stderr=subprocess.STDOUT, env=self._env(slot), cwd=os.getcwd())
                running[run_id] = (proc, slot, handle)
                where = f" on GPU {slot}" if slot is not None else f" ({self.threads_per_run()} thread(s))"
                log(f"{run_id}: started{where}, log {log_path}")
            progress.update(len(outcome.done), len(running), len(outcome.failed))
            time.sleep(poll_s)
            for run_id, (proc, slot, handle) in list(running.items()):
                code = proc.poll()
                if code is None:
                    continue
                handle.close()
                del running[run_id]
                free.append(slot)
                log_path = results.log(run_id)
                if code == 0:
                    outcome.done.append(run_id)
                elif code in (EXIT_BUSY, EXIT_CLAIM_LOST):
                    outcome.busy.append(run_id)
                    log(f"{run_id}: another process " + ("holds it" if code == EXIT_BUSY else "took it over") +
                        "; left to that process")
                else:
                    failure = read_failure(results.root / run_id) or {}
                    error = failure.get("error") or f"the worker exited with code {code}"
                    outcome.failed[run_id] = (error, log_path)
                    log(f"{run_id}: FAILED ({error}); log {log_path}")
        progress.update(len(outcome.done), 0, len(outcome.failed))
        return outcome


def make_launcher(kind: str = "local", devices: str | None = None, jobs: int = 1, partition: str | None = None,
                  time_limit: str | None = None, gpus: int = 0, cpus: int = 1, mem: str | None = None,
                  extra: Sequence[str] = (), detach: bool = False):
    """The launcher ``beseg compare`` options describe.

    Raises:
        ConfigError: options of the other launcher, or invalid values.
    """
    if kind == "local":
        slurm_only = {"--slurm-partition": partition, "--slurm-time": time_limit, "--mem-per-run": mem,
                      "--gpus-per-run": gpus or None, "--cpus-per-run": cpus if cpus != 1 else None,
                      "--slurm-arg": list(extra) or None, "--detach": detach or None}
        given = [k for k, v in slurm_only.items() if v is not None]
        if given:
            raise ConfigError(f"{', '.join(given)} only apply with --launcher slurm.")
        return LocalLauncher(parse_devices(devices), jobs)
    if kind == "slurm":
        if devices is not None or jobs != 1:
            raise ConfigError("--devices and --jobs are for --launcher local; with slurm use --gpus-per-run and "
                              "--cpus-per-run.")
        from beseg.experiment.slurm import SlurmLauncher

        return SlurmLauncher(partition=partition, time_limit=time_limit, gpus=gpus, cpus=cpus, mem=mem,
                             extra=extra, detach=detach)
    raise ConfigError(f"--launcher must be local or slurm, got {kind!r}.")

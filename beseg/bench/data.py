"""``beseg bench data``: can the loader feed the training step it serves?

On a task (``--data DIR``, loaded by the command; default a generated phantom spleen) with a config's data settings,
it prepares (or reuses) the preprocessed store (:mod:`beseg.data.store`) and measures, side by side
in one run:

* patches per second delivered by a ``DataLoader`` over the training dataset the trainer builds,
  with 1 worker process (one core) and with ``--workers N``; the main process only consumes, so
  this is the loader's own rate;
* the resident memory of each worker (PSS and RSS from ``/proc/<pid>/smaps_rollup``, read after
  the timed patches), which must not depend on the dataset's size;
* the CPU training step of the config's network and loss on one batch (``data.batch_size`` x
  ``data.num_samples`` patches), median of ``steps`` after one warm-up step;
* with ``--baseline``, the same patches/s from the ``cache: memory`` chain (MONAI's CacheDataset
  and ``RandCropByPosNegLabeld``, beseg's loader before the store) on the same cases.

The ratio ``patches/s x step seconds / patches per step`` is how many batches one worker makes
while the model consumes one; below 1 the GPU (here the CPU) waits for data.
"""

from __future__ import annotations

import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import monai
import torch
from monai.data import DataLoader, list_data_collate
from torch.utils.data import RandomSampler

from beseg.data.datasets import build_task_data
from beseg.data.msd import MSDTask, load_task
from beseg.data.phantom import make_phantom
from beseg.data.presets import get_preset

__all__ = ["run_data_benchmark", "loader_rate", "process_memory", "step_time"]


def process_memory(pid: int) -> tuple[int, int]:
    """``(PSS, RSS)`` bytes of process ``pid`` from ``/proc/<pid>/smaps_rollup`` (``(0, 0)`` if unreadable).

    PSS (proportional set size) splits pages shared between processes (the page cache of a
    memory-mapped store, copy-on-write pages after ``fork``) among them, so the PSS of a process
    tree is its real share of RAM.
    """
    values = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("Pss", "Rss"):
                    values[key] = int(rest.split()[0]) * 1024
    except (OSError, ValueError):
        return 0, 0
    return values.get("Pss", 0), values.get("Rss", 0)


def child_pids(pid: int) -> list[int]:
    """Direct children of ``pid`` (``/proc/<pid>/task/*/children``)."""
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(p) for p in (task / "children").read_text().split()]
        except (OSError, ValueError):
            continue
    return out


def loader_rate(dataset, workers: int, items: int) -> tuple[float, list[tuple[int, int]], dict]:
    """Patches per second from a ``DataLoader`` over ``dataset`` (one case per item, random order).

    One iterator draws ``items`` timed items after ``2 * workers + 1`` untimed ones (worker start-up
    and first prefetch); each item holds ``num_samples`` patches. Its workers are shut down before
    this returns, so they cannot steal CPU from a later timing.

    Returns:
        ``(patches per second, [(PSS, RSS) bytes per worker after the timed items], one item)``.
    """
    warm = 2 * workers + 1
    sampler = RandomSampler(dataset, replacement=True, num_samples=warm + items)
    it = iter(DataLoader(dataset, batch_size=1, sampler=sampler, num_workers=workers, collate_fn=list_data_collate))
    batch = next(it)
    for _ in range(warm - 1):
        next(it)
    patches, start = 0, time.perf_counter()
    for _ in range(items):
        patches += next(it)["image"].shape[0]
    rate = patches / (time.perf_counter() - start)
    memory = [process_memory(pid) for pid in child_pids(os.getpid())] if workers else []
    del it  # joins the workers
    return rate, memory, batch


def step_time(config, preset, batch: dict, steps: int) -> float:
    """Median seconds of one training step (forward, the config's loss, backward, Adam) on ``batch``."""
    from beseg.engine.networks import build_network
    from beseg.engine.losses import build_loss

    torch.manual_seed(0)
    net = build_network(config.model, preset.in_channels, preset.out_channels)
    loss_fn = build_loss(config.loss, preset.activation)
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    label = batch["label"].long() if preset.activation == "softmax" else batch["label"]
    times = []
    for i in range(steps + 1):  # the first step allocates and is not timed
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(net(batch["image"]).float(), label)
        loss.backward()
        opt.step()
        if i:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def run_data_benchmark(task: MSDTask | None = None, config: str = "phantom_spleen_segresnet_be",
                       overrides: Sequence[str] = (), cases: int = 12, workers: int = 2, items: int = 20,
                       steps: int = 3, threads: int = 2, baseline: bool = False, seed: int = 0,
                       patch_size: Sequence[int] | None = None) -> dict[str, Any]:
    """Run the benchmark and print a report.

    Args:
        task: the task to read (:func:`beseg.data.load_task`); ``None`` generates a phantom spleen of ``cases``
            cases in a temporary folder (with a temporary cache) and loads it.
        config: preset name or YAML file whose ``data`` and ``model`` settings are used.
        overrides: ``KEY=VALUE`` config overrides (e.g. ``data.cache_dir=...``).
        cases: phantom cases when ``task`` is ``None``.
        workers: the N of the N-worker timing (1 worker is always timed).
        items: timed loader items (each ``data.num_samples`` patches) per timing.
        steps: timed training steps (0: no step timing).
        threads: torch intra-op threads for the step.
        baseline: also time today's ``cache: memory`` chain on the same cases.
        seed: phantom and split seed.
        patch_size: overrides ``data.patch_size``.

    Returns:
        ``{"prepare_s", "patches_per_s[1]", "patches_per_s[N]", "worker_pss_mb", "worker_rss_mb",
        "step_s", "batches_per_step[1]", ...}`` (``"baseline_patches_per_s[1]"`` with ``baseline``).
    """
    from beseg.engine.config import load_config
    from beseg.engine.trainer import _patch_size

    torch.set_num_threads(threads)
    cfg, _ = load_config(config, [*overrides, *([f"data.patch_size={list(patch_size)}"] if patch_size else [])])
    preset = get_preset(cfg.data.task)
    patch = _patch_size(cfg, preset)
    d = cfg.data
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="beseg-bench-data-") as tmp:
        if task is None:  # the benchmark's own dataset, made and loaded here
            task = load_task(make_phantom(Path(tmp) / "task", task="spleen", cases=cases, test_cases=0, seed=seed,
                                          progress=False))
            cache_dir: Path | None = Path(tmp) / "cache"
        else:
            cache_dir = d.cache_path
        # A private split file: the benchmark never creates the split a later training would use.
        split = Path(d.split_file) if d.split_file else Path(tmp) / "split.json"
        start = time.perf_counter()
        data = build_task_data(task, preset, split_file=split, cache_dir=cache_dir, patch_size=patch, cache="store",
                               val_frac=d.val_frac, test_frac=d.test_frac, seed=seed, num_samples=d.num_samples,
                               pos=d.pos, neg=d.neg, progress=True)
        results["prepare_s"] = time.perf_counter() - start
        assert data.store is not None
        results["store_mb_per_case"] = data.store.size_bytes() / max(1, len(list(data.store.root.glob("*.json"))) - 1) / 1e6
        counts = sorted({1, workers})
        for n in counts:
            rate, memory, item = loader_rate(data.train, n, items)
            results[f"patches_per_s[{n}]"] = rate
            results[f"worker_pss_mb[{n}]"] = max((m[0] for m in memory), default=0) / 1e6
            results[f"worker_rss_mb[{n}]"] = max((m[1] for m in memory), default=0) / 1e6
        per_step = d.batch_size * d.num_samples
        batch = {k: item[k][:1].repeat(per_step, *([1] * (item[k].ndim - 1))) for k in ("image", "label")}
        if steps:
            results["step_s"] = step_time(cfg, preset, batch, steps)
            for n in counts:
                results[f"batches_per_step[{n}]"] = results[f"patches_per_s[{n}]"] * results["step_s"] / per_step
        if baseline:
            start = time.perf_counter()
            old = build_task_data(task, preset, split_file=split, cache_dir=cache_dir, patch_size=patch,
                                  cache="memory", val_frac=d.val_frac, test_frac=d.test_frac, seed=seed,
                                  num_samples=d.num_samples, pos=d.pos, neg=d.neg, progress=True)
            results["baseline_fill_s"] = time.perf_counter() - start
            rate, memory, _ = loader_rate(old.train, 1, items)
            results["baseline_patches_per_s[1]"] = rate
            results["baseline_worker_pss_mb[1]"] = max((m[0] for m in memory), default=0) / 1e6
            del old

    size = "x".join(map(str, patch))
    print(f"beseg bench data: {task.name} ({len(data.split.train)} training cases), config {config}, patch {size}, "
          f"{d.num_samples} patch(es) per case visit, batch {per_step} patches")
    print(f"machine: {platform.machine()} {os.cpu_count()} CPUs, torch {torch.__version__}, MONAI {monai.__version__}, "
          f"{threads} torch threads for the step")
    print(f"store {data.store.root}: {results['store_mb_per_case']:.1f} MB per case; prepare/open "
          f"{results['prepare_s']:.1f} s")
    for n in counts:
        print(f"loader, {n} worker(s): {results[f'patches_per_s[{n}]']:.2f} patches/s; largest worker PSS "
              f"{results[f'worker_pss_mb[{n}]']:.0f} MB (RSS {results[f'worker_rss_mb[{n}]']:.0f} MB)")
    if not steps:
        print("training step: not timed (--steps 0)")
    else:
        print(f"training step ({cfg.model.network}, loss {cfg.loss.name}, {per_step} patches): {results['step_s']:.2f} s "
              f"(median of {steps})")
    for n in counts if steps else []:
        ratio = results[f"batches_per_step[{n}]"]
        verdict = "OK" if ratio >= 1 else "LOADER TOO SLOW"
        print(f"{n} worker(s) make {ratio:.1f} batches per training step [{verdict}, need >= 1]")
    if baseline:
        old_rate = results["baseline_patches_per_s[1]"]
        print(f"baseline (cache: memory, MONAI CacheDataset + RandCropByPosNegLabeld), 1 worker: {old_rate:.2f} "
              f"patches/s, worker PSS {results['baseline_worker_pss_mb[1]']:.0f} MB, cache fill "
              f"{results['baseline_fill_s']:.1f} s; the store's loader is {results['patches_per_s[1]'] / old_rate:.1f}x "
              "as fast")
    return results


_SHORT_TRAINING = """
import sys
from beseg.allocator import keep_freed_memory
from beseg.engine.config import load_config
from beseg.engine.trainer import Trainer

class ShortTraining(Trainer):
    def validate(self):  # whole-volume validation is timed elsewhere; see training_memory
        return {"dice_mean": 0.0, "dice": {}}

keep_freed_memory()  # as beseg train does
config, _ = load_config(sys.argv[1], sys.argv[4:])
ShortTraining(config, sys.argv[2], sys.argv[3], progress=False).run()
"""


def tree_memory(pid: int) -> tuple[int, int]:
    """``(PSS, processes)`` of ``pid`` and all its descendants."""
    total, count, todo = 0, 0, [pid]
    while todo:
        p = todo.pop()
        total += process_memory(p)[0]
        count += 1
        todo += child_pids(p)
    return total, count


def training_memory(task: MSDTask, config: str, overrides: Sequence[str] = (), steps: int = 3,
                    interval_s: float = 0.1) -> dict[str, float]:
    """Peak PSS of a short ``beseg train`` (process tree, loader workers included).

    The training runs in a child process (``train.epochs=1``, ``train.steps_per_epoch=steps``, the
    run folder in a temporary directory) with every step of a real run (data check, split,
    statistics, store, loader workers, network, optimiser, checkpoint) except validation, which
    reads one whole volume at a time whatever the number of cases and, on a CPU, takes minutes
    per Task09-sized volume. The PSS of the process and all its descendants is sampled every
    ``interval_s`` seconds.

    Returns:
        ``{"peak_pss_gb", "seconds", "processes"}``.

    Raises:
        RuntimeError: the training failed (its stderr's last lines in the message).
    """
    import subprocess
    import sys

    with tempfile.TemporaryDirectory(prefix="beseg-bench-mem-") as tmp:
        # The child is a command of its own: it loads the task folder once (its Trainer).
        args = [sys.executable, "-c", _SHORT_TRAINING, config, str(task.root), str(Path(tmp) / "run"),
                *overrides, "train.epochs=1", f"train.steps_per_epoch={steps}"]
        err_path = Path(tmp) / "stderr"
        with open(err_path, "w") as err:
            start = time.perf_counter()
            proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=err)
            peak, procs = 0, 0
            while proc.poll() is None:
                pss, count = tree_memory(proc.pid)
                if pss > peak:
                    peak, procs = pss, count
                time.sleep(interval_s)
            seconds = time.perf_counter() - start
        if proc.returncode:
            tail = err_path.read_text().strip().splitlines()[-5:]
            raise RuntimeError(f"the short training failed (exit {proc.returncode}): " + " | ".join(tail))
    return {"peak_pss_gb": peak / 1e9, "seconds": seconds, "processes": procs}

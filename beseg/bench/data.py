"""``beseg bench data``: is loading the bottleneck?

Generates a phantom spleen task in a temporary folder, builds the cached training pipeline of the
``phantom-spleen`` preset, and measures

* patches per second delivered by a MONAI ``DataLoader`` with ``workers`` processes once the cache
  is warm (the main process only consumes, so this is the loader's own rate);
* the CPU training step (forward + backward + Adam step, DiceLoss) of SegResNet on a batch of one
  patch of the same size, for the paper's configuration (init_filters 16) and a half-width CPU
  variant (init_filters 8); median of ``steps`` steps after one warm-up step.

The ratio ``patches/s x step seconds`` is how many patches the loader makes while the model
consumes one; it must be at least 3.
"""

from __future__ import annotations

import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Sequence

import monai
import torch
from monai.data import DataLoader
from monai.losses import DiceLoss
from monai.networks.nets import SegResNet
from torch.utils.data import RandomSampler

from beseg.data.datasets import build_task_data
from beseg.data.msd import load_task
from beseg.data.phantom import make_phantom
from beseg.data.presets import get_preset

__all__ = ["run_data_benchmark", "loader_rate", "step_time"]

MODELS = {"SegResNet init_filters=16 (paper)": 16, "SegResNet init_filters=8 (CPU)": 8}


def loader_rate(dataset, workers: int, patches: int) -> tuple[float, dict]:
    """Patches per second from a MONAI ``DataLoader`` over ``dataset`` (batch 1, random order).

    One iterator draws ``patches`` timed patches after ``4 * workers + 1`` untimed ones (worker
    start-up and first prefetch); its workers are shut down before this returns, so they cannot
    steal CPU from a later step timing.

    Returns:
        ``(patches per second, one batch for the step timing)``.
    """
    warm = 4 * workers + 1
    sampler = RandomSampler(dataset, replacement=True, num_samples=warm + patches)
    it = iter(DataLoader(dataset, batch_size=1, sampler=sampler, num_workers=workers))
    batch = next(it)
    for _ in range(warm - 1):
        next(it)
    start = time.perf_counter()
    for _ in range(patches):
        next(it)
    rate = patches / (time.perf_counter() - start)
    del it  # joins the workers
    return rate, batch


def step_time(init_filters: int, batch: dict, out_channels: int, steps: int) -> float:
    """Median seconds of one SegResNet training step (forward, DiceLoss, backward, Adam) on ``batch``."""
    torch.manual_seed(0)
    net = SegResNet(spatial_dims=3, in_channels=batch["image"].shape[1], out_channels=out_channels,
                    init_filters=init_filters, blocks_down=(1, 2, 2, 4), blocks_up=(1, 1, 1))
    loss_fn = DiceLoss(to_onehot_y=True, softmax=True)
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    times = []
    for i in range(steps + 1):  # the first step allocates and is not timed
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(net(batch["image"]), batch["label"])
        loss.backward()
        opt.step()
        if i:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def run_data_benchmark(cases: int = 12, patch_size: Sequence[int] = (64, 64, 64), workers: int = 2,
                       patches: int = 200, steps: int = 3, threads: int = 2, cache: str = "memory",
                       seed: int = 0) -> dict[str, float]:
    """Run the benchmark and print a report.

    Args:
        cases: phantom spleen training cases (default size, 96x96x32 at 0.8x0.8x2.5 mm -> ~77^3 at 1 mm).
        patch_size: patch (voxels at 1 mm).
        workers: DataLoader worker processes.
        patches: patches timed after warm-up.
        steps: timed training steps per model.
        threads: torch intra-op threads for the step.
        cache: ``"memory"`` or ``"disk"`` (see :func:`beseg.data.make_dataset`).
        seed: phantom and split seed.

    Returns:
        ``{"patches_per_s": ..., "cache_fill_s": ..., "step_s[<model>]": ..., "ratio[<model>]": ...}``.
    """
    torch.set_num_threads(threads)
    results: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="beseg-bench-data-") as tmp:
        start = time.perf_counter()
        root = make_phantom(Path(tmp) / "task", task="spleen", cases=cases, test_cases=0, seed=seed, progress=False)
        results["phantom_s"] = time.perf_counter() - start
        start = time.perf_counter()
        data = build_task_data(load_task(root), get_preset("phantom-spleen"), cache_dir=Path(tmp) / "cache",
                               patch_size=patch_size, cache=cache, seed=seed)
        results["cache_fill_s"] = time.perf_counter() - start
        results["patches_per_s"], batch = loader_rate(data.train, workers, patches)
        for name, filters in MODELS.items():
            results[f"step_s[{name}]"] = step_time(filters, batch, data.out_channels, steps)
            results[f"ratio[{name}]"] = results["patches_per_s"] * results[f"step_s[{name}]"]

    patch = "x".join(map(str, patch_size))
    print(f"beseg bench data: phantom spleen, {cases} cases ({len(data.split.train)} train), patch {patch}, "
          f"cache={cache}, {workers} workers, batch 1")
    print(f"machine: {platform.machine()} {os.cpu_count()} CPUs, torch {torch.__version__}, MONAI {monai.__version__}, "
          f"{threads} torch threads, MALLOC_MMAP_THRESHOLD_={os.environ.get('MALLOC_MMAP_THRESHOLD_', 'unset')}")
    print(f"phantom generation: {results['phantom_s']:.1f} s; cache fill (load+resample+normalise): "
          f"{results['cache_fill_s']:.1f} s")
    print(f"loader: {results['patches_per_s']:.1f} patches/s ({patches} patches after {4 * workers + 1} warm-up patches)")
    for name in MODELS:
        step, ratio = results[f"step_s[{name}]"], results[f"ratio[{name}]"]
        verdict = "OK" if ratio >= 3 else "LOADER TOO SLOW"
        print(f"{name}: training step {step:.3f} s (median of {steps}) -> loader makes {ratio:.1f} patches "
              f"per step [{verdict}, need >= 3]")
    return results

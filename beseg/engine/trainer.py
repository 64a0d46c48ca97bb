"""The training loop: Adam, a per-epoch learning-rate schedule, sliding-window validation,
atomic checkpoints and exact resume, on one process or under ``torchrun``.

Reproducibility: the weights come from ``train.seed``; the order of training cases and every
random augmentation are drawn from ``(seed, epoch, position in the epoch)`` alone, so they do not
depend on the number of DataLoader workers or processes, and a resumed run sees exactly the data
an uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import list_data_collate
from monai.metrics import compute_dice
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Sampler

from beseg.data import TaskPreset, build_task_data, get_preset, load_task, require_valid_task
from beseg.engine.checkpoint import (
    CheckpointError,
    atomic_save,
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
)
from beseg.engine.config import Config, config_from_dict, config_to_dict
from beseg.engine.distributed import DistInfo, barrier, init_distributed, shutdown_distributed
from beseg.engine.inference import autocast_for, foreground_masks, predict_probabilities
from beseg.engine.networks import build_network, window_multiple
from beseg.engine.rundir import RunDir
from beseg.errors import BesegError, ConfigError
from beseg.losses.registry import build_loss

__all__ = ["TrainingError", "TrainResult", "train", "load_resume_checkpoint", "EpochSampler", "SeededDataset", "class_names"]


class TrainingError(BesegError):
    """Training cannot go on (e.g. a non-finite loss with ``on_nonfinite: stop``)."""


@dataclass
class TrainResult:
    run_dir: Path
    epochs: int
    best_dice: float
    last_val_dice: float | None


# ----------------------------------------------------------------------------------------------
# reproducible sampling


class EpochSampler(Sampler):
    """Indices for one epoch of ``steps * batch_size * world_size`` samples, with augmentation seeds.

    The epoch's sequence concatenates seeded permutations of the cases; process ``rank`` takes
    every ``world_size``-th element, so a global batch is the same set of samples whatever the
    number of processes. Each element is ``(case index, augmentation seed)``.
    """

    def __init__(self, num_items: int, steps: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        self.num_items, self.steps, self.batch_size = num_items, steps, batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def global_sequence(self) -> list[tuple[int, int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        total = self.steps * self.batch_size * self.world_size
        order: list[int] = []
        while len(order) < total:
            order.extend(rng.permutation(self.num_items).tolist())
        seeds = rng.integers(0, 2**31 - 1, size=total)
        return [(order[i], int(seeds[i])) for i in range(total)]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter(self.global_sequence()[self.rank :: self.world_size])

    def __len__(self) -> int:
        return self.steps * self.batch_size


class SeededDataset(Dataset):
    """Seeds the random transforms of a MONAI dataset from the sampler's seed before each item."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, seed = key
        self.dataset.transform.set_random_state(seed=seed)
        return self.dataset[index]


# ----------------------------------------------------------------------------------------------
# helpers


def class_names(preset: TaskPreset) -> list[str]:
    """Names of the scored classes (the background of a softmax task is not scored)."""
    names = list(preset.channel_names)
    return names[1:] if preset.activation == "softmax" else names


def _lr_lambda(schedule: str, epochs: int):
    if schedule == "constant":
        return lambda e: 1.0
    if schedule == "poly":
        return lambda e: (1.0 - min(e, epochs) / epochs) ** 0.9
    return lambda e: 0.5 * (1.0 + math.cos(math.pi * min(e, epochs) / epochs))


def _patch_size(config: Config, preset: TaskPreset) -> tuple[int, int, int]:
    patch = tuple(config.data.patch_size or preset.patch_size)
    multiple = window_multiple(config.model)
    if any(s % multiple for s in patch):
        raise ConfigError(
            f"data.patch_size {list(patch)} must be a multiple of {multiple} on every axis for "
            f"model.network={config.model.network}."
        )
    return patch  # type: ignore[return-value]


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def measure_loss_seconds(loss_fn: nn.Module, logits: Tensor, label: Tensor, repeats: int = 3) -> float:
    """Median forward+backward seconds of the loss alone on one batch of logits."""
    times = []
    for _ in range(repeats):
        x = logits.detach().float().requires_grad_(True)
        _sync(x.device)
        start = time.perf_counter()
        loss_fn(x, label).backward()
        _sync(x.device)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def validate(model: nn.Module, dataset: Any, preset: TaskPreset, roi: tuple[int, ...], config: Config,
             dist_info: DistInfo, progress: bool = False) -> dict[str, Any]:
    """Mean Dice per class over whole validation volumes, by sliding-window inference.

    Every process scores its share of the cases; per-class sums are all-reduced, so all ranks
    return the same numbers.
    """
    from tqdm.auto import tqdm

    device = dist_info.device
    model.eval()
    names = class_names(preset)
    totals = torch.zeros(2, len(names), dtype=torch.float64, device=device)  # Dice sums, case counts
    mine = range(dist_info.rank, len(dataset), dist_info.world_size)
    for i in tqdm(mine, desc="validate", leave=False, disable=not progress):
        item = dataset[i]
        image = torch.as_tensor(item["image"])[None].to(device)
        label = torch.as_tensor(item["label"])[None].to(device)
        probs = predict_probabilities(model, image, roi, preset.activation, config.train.sw_overlap,
                                      config.train.sw_batch_size, config.train.amp)
        pred = foreground_masks(probs, preset.activation)
        if preset.activation == "softmax":
            truth = torch.stack([label[:, 0] == k for k in range(1, probs.shape[1])], dim=1)
        else:
            truth = label > 0.5
        # Both masks empty counts as a perfect score, as in beseg.metrics.
        dice = compute_dice(pred.float(), truth.float(), include_background=True, ignore_empty=False)[0]
        totals[0] += dice.double()
        totals[1] += 1
    if dist_info.distributed:
        torch.distributed.all_reduce(totals)
    per_class = (totals[0] / totals[1].clamp(min=1)).cpu().tolist()
    model.train()
    return {"dice_mean": float(np.mean(per_class)), "dice": dict(zip(names, per_class))}


# ----------------------------------------------------------------------------------------------
# the loop


def load_resume_checkpoint(run_dir: str | Path) -> dict[str, Any]:
    """The last checkpoint of ``run_dir``, to resume from.

    Raises:
        CheckpointError: the folder has no (readable) ``checkpoints/last.pt``.
    """
    last = RunDir(run_dir).last
    if not last.exists():
        raise CheckpointError(f"cannot resume: {last} does not exist (no epoch finished in {Path(run_dir)}).")
    return load_checkpoint(last)


def train(config: Config | None, data_dir: str | Path, run_dir: str | Path, resume: bool = False,
          progress: bool = True) -> TrainResult:
    """Train ``config`` on the task folder ``data_dir`` into ``run_dir``.

    Args:
        config: the configuration; ignored with ``resume`` (the checkpoint's is used).
        data_dir: MSD-layout task folder.
        run_dir: run folder (see :mod:`beseg.engine.rundir`); created if needed.
        resume: continue from ``run_dir/checkpoints/last.pt``.
        progress: show progress bars (rank 0 only).

    Returns:
        A :class:`TrainResult`.

    Raises:
        ConfigError, DataError, CheckpointError, TrainingError, RunLockedError: with a message
            naming the file or setting at fault.
    """
    run = RunDir(run_dir)
    ckpt = None
    if resume:
        ckpt = load_resume_checkpoint(run_dir)
        config = config_from_dict(ckpt["config"])
    if config is None:
        raise ConfigError("no config given.")
    dist_info = init_distributed(config.train.device)
    try:
        if dist_info.is_main:
            run.acquire()
        try:
            return _train(config, Path(data_dir), run, ckpt, dist_info, progress)
        finally:
            if dist_info.is_main:
                run.release()
    finally:
        shutdown_distributed(dist_info)


def _train(config: Config, data_dir: Path, run: RunDir, ckpt: dict | None, dist_info: DistInfo,
           progress: bool) -> TrainResult:
    from tqdm.auto import tqdm

    device, main = dist_info.device, dist_info.is_main
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    torch.manual_seed(config.train.seed)
    np.random.seed(config.train.seed % 2**32)

    preset = get_preset(config.data.task)
    patch = _patch_size(config, preset)
    cache_dir = Path(config.data.cache_dir) if config.data.cache_dir else None
    # Fail before any compute on a folder with bad files, listing every problem at once.
    require_valid_task(data_dir, cache_dir, progress=progress and main)
    task = load_task(data_dir)
    data = build_task_data(
        task, preset, split_file=config.data.split_file, cache_dir=cache_dir, patch_size=patch,
        cache=config.data.cache, val_frac=config.data.val_frac, seed=config.data.split_seed,
        num_samples=config.data.num_samples, pos=config.data.pos, neg=config.data.neg, progress=progress and main,
    )
    steps = config.train.steps_per_epoch or max(1, len(data.train) // (config.data.batch_size * dist_info.world_size))
    sampler = EpochSampler(len(data.train), steps, config.data.batch_size, config.train.seed,
                           dist_info.rank, dist_info.world_size)
    loader = DataLoader(
        SeededDataset(data.train), batch_size=config.data.batch_size, sampler=sampler,
        num_workers=config.data.num_workers, collate_fn=list_data_collate,
        persistent_workers=config.data.num_workers > 0, pin_memory=device.type == "cuda",
    )

    model = build_network(config.model, preset.in_channels, preset.out_channels).to(device)
    loss_fn = build_loss(
        config.loss.name, preset.activation, include_background=config.loss.include_background,
        lambda_dice=config.loss.lambda_dice, lambda_be=config.loss.lambda_be,
        lambda_boundary=config.loss.lambda_boundary, lambda_focal=config.loss.lambda_focal,
        lambda_ce=config.loss.lambda_ce, lambda_hd=config.loss.lambda_hd, focal_gamma=config.loss.focal_gamma,
        smoothing_passes=config.loss.smoothing_passes,
    )
    if config.optim.name == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=config.optim.lr, momentum=0.9,
                                    weight_decay=config.optim.weight_decay)
    else:
        optimizer = torch.optim.Adam(model.parameters(), lr=config.optim.lr, weight_decay=config.optim.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(config.optim.schedule, config.train.epochs))
    use_amp = config.train.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)

    start_epoch, best, global_step = 0, -1.0, 0
    if ckpt is not None:
        try:
            model.load_state_dict(ckpt["model"])
        except RuntimeError as err:
            raise CheckpointError(f"{run.last} does not fit model.network={config.model.network}: {str(err).splitlines()[0]}") from None
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        start_epoch, best, global_step = ckpt["epoch"], ckpt["best_dice"], ckpt["step"]
        restore_rng_state(ckpt["rng"])
    if dist_info.distributed:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    writer = None
    config_dict = config_to_dict(config)
    if main:
        run.write_config(config_dict)
        if ckpt is not None:
            run.truncate_metrics(start_epoch)
        writer = _tensorboard(run.tensorboard)
        if start_epoch >= config.train.epochs:
            print(f"{run.root}: all {config.train.epochs} epochs are done already.")

    last_val: float | None = None
    model.train()
    for epoch in range(start_epoch, config.train.epochs):
        sampler.set_epoch(epoch)
        losses, step_times, skipped = [], [], 0
        bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{config.train.epochs}", disable=not (progress and main),
                   unit="step", dynamic_ncols=True)
        tick = time.perf_counter()
        logits = label = None
        for batch in loader:
            image = batch["image"].to(device, non_blocking=True)
            label = batch["label"].to(device, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)
            with autocast_for(device, use_amp):
                logits = model(image)
            loss = loss_fn(logits.float(), label)
            value = loss.item()
            if math.isfinite(value):
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
                grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf")))
            else:
                grad_norm = float("nan")
            # A non-finite gradient is only expected under AMP, where the scaler skips the step.
            if not math.isfinite(value) or (not math.isfinite(grad_norm) and not use_amp):
                what = f"loss {value}" if not math.isfinite(value) else f"gradient norm {grad_norm}"
                if config.train.on_nonfinite == "stop":
                    raise TrainingError(
                        f"non-finite {what} at epoch {epoch + 1}, step {global_step + 1} (system {config.system}); "
                        f"training stopped without saving these weights. The last good checkpoint is "
                        f"{run.last if run.last.exists() else '(none yet)'}; lower optim.lr or set "
                        "train.on_nonfinite: skip to skip such steps."
                    )
                skipped += 1
                optimizer.zero_grad(set_to_none=True)
                global_step += 1
                bar.update(1)
                continue
            scaler.step(optimizer)
            scaler.update()
            global_step += 1
            losses.append(value)
            now = time.perf_counter()
            step_times.append(now - tick)
            tick = now
            bar.set_postfix(loss=f"{value:.4f}", samples_s=f"{image.shape[0] * dist_info.world_size / step_times[-1]:.2f}")
            bar.update(1)
        bar.close()
        scheduler.step()

        epoch_done = epoch + 1
        record: dict[str, Any] = {
            "kind": "train", "epoch": epoch_done, "step": global_step,
            "loss": float(np.mean(losses)) if losses else float("nan"),
            "step_time_s": float(np.median(step_times[1:] or step_times)) if step_times else float("nan"),
            "loss_time_s": measure_loss_seconds(loss_fn, logits, label) if logits is not None else float("nan"),
            "lr": optimizer.param_groups[0]["lr"], "skipped_steps": skipped,
        }
        if main:
            run.log(record)
            _tb_log(writer, "train", record, global_step)

        do_val = epoch_done % config.train.val_every == 0 or epoch_done == config.train.epochs
        is_best = False
        if do_val:
            val = validate(_unwrap(model), data.val, preset, patch, config, dist_info, progress=progress and main)
            last_val = val["dice_mean"]
            is_best = last_val > best
            best = max(best, last_val)
            if main:
                run.log({"kind": "val", "epoch": epoch_done, "step": global_step, **val})
                _tb_log(writer, "val", {"dice_mean": last_val, **{f"dice_{k}": v for k, v in val["dice"].items()}}, global_step)
                if progress:
                    per = ", ".join(f"{k} {v:.3f}" for k, v in val["dice"].items())
                    print(f"epoch {epoch_done}: train loss {record['loss']:.4f}, val Dice {val['dice_mean']:.4f} ({per})"
                          + (" *best*" if is_best else ""))

        save_last = epoch_done % config.train.checkpoint_every == 0 or epoch_done == config.train.epochs
        if main and (save_last or is_best):
            state = {
                "format": 1, "config": config_dict, "epoch": epoch_done, "step": global_step, "best_dice": best,
                "model": _unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "rng": capture_rng_state(),
                "val_dice": last_val if do_val else None,
                # What inference needs besides the weights, so predict works without the dataset.
                "preset": preset.name, "roi": list(patch),
                "stats": dataclasses.asdict(data.stats) if data.stats is not None else None,
            }
            if is_best:
                atomic_save(state, run.best)
            if save_last:
                atomic_save(state, run.last)
        barrier(dist_info)

    if writer is not None:
        writer.close()
    return TrainResult(run.root, config.train.epochs, best, last_val)


def _tensorboard(folder: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional: the JSON lines hold the same numbers
        return None
    return SummaryWriter(str(folder))


def _tb_log(writer, prefix: str, record: dict[str, Any], step: int) -> None:
    if writer is None:
        return
    for key, value in record.items():
        if key not in ("kind", "epoch", "step") and isinstance(value, (int, float)) and math.isfinite(value):
            writer.add_scalar(f"{prefix}/{key}", value, step)
    writer.flush()

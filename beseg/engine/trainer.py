"""The training engine: a small :class:`Trainer` whose steps are short methods a variant can override.

::

    Trainer.run()                  process group, the run folder's claim, then
      setup()
        setup_data()               data check, split, intensity statistics and the store (rank 0 first), datasets
        setup_model()              build_network(), build_loss(), build_optimizer(), schedule, AMP scaler
        restore(checkpoint)        with resume: weights, optimiser, counters, RNG (what fits this machine)
      fit()                        the epoch loop:
        train_epoch(epoch)           train_step(batch) per batch, a fixed sequence: forward(batch),
                                     compute_loss(logits, label), the all-rank decision, the update
                                     (after_backward() before the optimiser step)
        validate()                   sliding-window Dice per class, scored as ``beseg evaluate`` scores
        save_checkpoint(...)         best.pt / last.pt (rank 0)

A variant overrides one step and keeps the rest (exact resume, DDP, AMP, logs). ``train_step``
itself is fixed: its hooks (``forward``, ``compute_loss``, ``after_backward``, ``on_nonfinite``)
change what a step does without touching the all-rank decision or the loss timing::

    class TverskyTrainer(Trainer):
        def build_loss(self) -> nn.Module:
            return monai.losses.TverskyLoss(softmax=True, to_onehot_y=True, alpha=0.3, beta=0.7)

    TverskyTrainer(config, "Task09_Spleen", "runs/tversky").run()

Reproducibility: the weights come from ``train.seed``; the order of training cases and every
random augmentation are drawn from ``(seed, epoch, position in the epoch)`` alone
(:mod:`beseg.engine.sampling`), so a resumed run sees exactly the data an uninterrupted one would.

Distributed runs (``torchrun``): every decision that changes what the ranks do next (a failure, a
non-finite loss to skip) is taken collectively (:mod:`beseg.engine.distributed`), so all ranks
skip the same step or stop together with the same message; no rank is left waiting in a
collective. Only rank 0 writes files and prints.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NoReturn

import numpy as np
import torch
from monai.data import list_data_collate
from monai.metrics import compute_dice
from torch import Tensor, nn
from torch.utils.data import DataLoader

from beseg.data import MSDTask, TaskData, TaskPreset, as_task, build_task_data, get_preset, require_valid_task, save_split
from beseg.data.classes import class_masks
from beseg.engine.checkpoint import (
    FORMAT_VERSION,
    CheckpointError,
    atomic_save,
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
)
from beseg.engine.config import Config, config_from_dict, config_to_dict, with_runtime_settings
from beseg.engine.distributed import (
    DistInfo,
    all_reduce_sum,
    barrier,
    gather_rows,
    gather_texts,
    init_distributed,
    shutdown_distributed,
)
from beseg.engine.inference import autocast_for, predict_probabilities
from beseg.engine.networks import build_network, window_multiple
from beseg.engine.rundir import RunDir
from beseg.engine.sampling import EpochSampler, SeededDataset
from beseg.errors import BesegError, ConfigError
from beseg.fileio import LockLostError
from beseg.engine.losses import build_loss

__all__ = [
    "EpochSampler", "LossTimer", "SeededDataset", "TrainResult", "Trainer", "TrainingError",
    "load_resume_checkpoint", "steps_per_epoch", "train",
]


class TrainingError(BesegError):
    """Training cannot go on: a non-finite loss with ``on_nonfinite: stop``, or a failure on any rank."""


@dataclass
class TrainResult:
    run_dir: Path
    epochs: int
    best_dice: float
    last_val_dice: float | None


def load_resume_checkpoint(run_dir: str | Path) -> dict[str, Any]:
    """The last checkpoint of ``run_dir``, to resume from.

    Raises:
        CheckpointError: the folder has no (readable) ``checkpoints/last.pt``, or one of a newer format.
    """
    last = RunDir(run_dir).last
    if not last.exists():
        raise CheckpointError(f"cannot resume: {last} does not exist (no epoch finished in {Path(run_dir)}).")
    return load_checkpoint(last)


def train(config: Config | None, data: MSDTask | str | Path, run_dir: str | Path, resume: bool = False,
          progress: bool = True) -> TrainResult:
    """Train ``config`` on the task ``data`` into ``run_dir`` with the default :class:`Trainer`.

    Args:
        config: the configuration; with ``resume`` the checkpoint's is used, and only the runtime
            settings of ``config`` (if given) replace its own (:data:`beseg.engine.config.RUNTIME_KEYS`).
        data: the task (:func:`beseg.data.load_task`), or its MSD-layout folder, loaded here once.
        run_dir: run folder (see :mod:`beseg.engine.rundir`); created if needed.
        resume: continue from ``run_dir/checkpoints/last.pt``.
        progress: show progress bars (rank 0 only).

    Returns:
        A :class:`TrainResult`.

    Raises:
        ConfigError, DataError, CheckpointError, TrainingError, RunLockedError, DistributedError:
            with a message naming the file, setting or rank at fault.
    """
    return Trainer(config, data, run_dir, resume=resume, progress=progress).run()


class Trainer:
    """One training run, in steps a variant can override (see the module docstring).

    Args:
        config: the configuration; with ``resume`` the checkpoint's is used, and only the runtime
            settings of ``config`` (if given) replace its own (:data:`beseg.engine.config.RUNTIME_KEYS`).
        data: the task (:func:`beseg.data.load_task`), or its MSD-layout folder, loaded here once (``task``).
        run_dir: run folder; created if needed.
        resume: continue from ``run_dir/checkpoints/last.pt``.
        progress: show progress bars and a line per validation (rank 0 only).

    Raises:
        ConfigError: no config, or an invalid patch size for the network.
        CheckpointError: ``resume`` without a readable ``last.pt``.
        DataError: ``data`` is a folder whose ``dataset.json`` cannot be loaded.

    Attributes: ``task`` (the :class:`~beseg.data.MSDTask` trained on), ``config``, ``preset``, ``run_dir``.
    Attributes set by :meth:`run` (for overriding methods): ``dist`` (:class:`DistInfo`),
    ``data`` (:class:`~beseg.data.TaskData`), ``loader``, ``sampler``, ``steps`` (per epoch),
    ``model`` (DDP-wrapped under torchrun), ``loss_fn``, ``optimizer``, ``scheduler``, ``scaler``,
    and the counters ``epoch`` (epochs finished), ``global_step``, ``best_dice``.
    """

    #: The hooks of :meth:`train_step`; the step itself is fixed (see :meth:`__init_subclass__`).
    STEP_HOOKS = ("forward", "compute_loss", "after_backward", "on_nonfinite")

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # train_step holds the all-rank decision and the loss timing: an override that forgets either
        # hangs DDP or loses the timing, so a variant changes the step through its hooks instead.
        super().__init_subclass__(**kwargs)
        if "train_step" in cls.__dict__:
            raise TypeError(
                f"{cls.__name__} overrides Trainer.train_step, which is fixed (it shares every rank's loss and "
                f"times the loss); override one of its hooks instead: {', '.join(Trainer.STEP_HOOKS)} (docs/engine.md)."
            )

    def __init__(self, config: Config | None, data: MSDTask | str | Path, run_dir: str | Path, resume: bool = False,
                 progress: bool = True) -> None:
        self.run_dir = RunDir(run_dir)
        self.task = as_task(data, progress)  # the listed files are checked by setup_data (require_valid_task)
        self.progress = progress
        self.checkpoint: dict[str, Any] | None = load_resume_checkpoint(run_dir) if resume else None
        if self.checkpoint is not None:
            saved = config_from_dict(self.checkpoint["config"])
            # A config given with resume only says where the run now executes (its runtime settings).
            config = saved if config is None else with_runtime_settings(saved, config)
        if config is None:
            raise ConfigError("no config given.")
        self.config = config
        self.preset = get_preset(config.data.task)
        self.patch = _patch_size(config, self.preset)
        self.dist = DistInfo(0, 1, 0, torch.device("cpu"))  # the real one comes from run()
        self.epoch, self.global_step, self.best_dice = 0, 0, -1.0
        self.val_dice: float | None = None  # this epoch's validation, if it had one
        self.last_val_dice: float | None = None
        self.writer: Any = None

    @property
    def device(self) -> torch.device:
        return self.dist.device

    @property
    def use_amp(self) -> bool:
        """float16 autocast and a gradient scaler: ``train.amp`` on CUDA (never on CPU)."""
        return self.config.train.amp and self.device.type == "cuda"

    # ------------------------------------------------------------------------------------------
    # the whole run

    def run(self) -> TrainResult:
        """Join the process group, take the run folder's claim, :meth:`setup`, then :meth:`fit`.

        Returns:
            A :class:`TrainResult`.

        Raises:
            See :func:`train`.
        """
        self.dist = init_distributed(self.config.train.device, self.config.train.dist_timeout_s)
        locked = False
        try:
            with self.all_ranks("taking the run folder's claim"):
                if self.dist.is_main:
                    self.run_dir.acquire()
                    locked = True
            try:
                self.setup()
                result = self.fit()
                # The ranks leave together: a rank that destroys its process group while another still
                # communicates can abort at exit in gloo's worker threads (seen once under srun -n 2).
                barrier(self.dist)
                return result
            finally:
                if self.writer is not None:
                    self.writer.close()
        finally:
            if locked:
                self.run_dir.release()
            shutdown_distributed(self.dist)

    def setup(self) -> None:
        """Seeds, then :meth:`setup_data`, :meth:`setup_model`, :meth:`restore` and the run folder's logs."""
        cfg = self.config.train
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed % 2**32)
        self.setup_data()
        with self.all_ranks("building the model"):
            self.setup_model()
        if self.checkpoint is not None:
            with self.all_ranks(f"restoring {self.run_dir.last}"):
                self.restore(self.checkpoint)
        if self.dist.distributed:
            self.model = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.timer = LossTimer(self.device)
        with self.all_ranks("writing the run folder"):
            if self.dist.is_main:
                # The run records the cases it trained, validated and is tested on: split.json in the run
                # folder, and the split file it used in config.yaml (and every checkpoint).
                self.run_dir.check()
                save_split(self.data.split, self.run_dir.split)
                if self.config.data.split_file is None and self.data.split_file is not None:
                    self.config.data.split_file = str(Path(self.data.split_file).resolve())
                self.run_dir.write_config(config_to_dict(self.config))
                # Records of epochs after the checkpoint (all of them when training from scratch) come from an
                # attempt that was killed before its next checkpoint; they are redone, and logged once.
                if self.run_dir.metrics.exists():
                    self.run_dir.truncate_metrics(self.epoch)
                self.writer = _tensorboard(self.run_dir.tensorboard)
                if self.epoch >= cfg.epochs:
                    print(f"{self.run_dir.root}: all {cfg.epochs} epochs are done already.")

    # ------------------------------------------------------------------------------------------
    # set-up steps

    def setup_data(self) -> None:
        """Check the task folder, split it and build the datasets and the seeded loader.

        Rank 0 checks the folder, writes the split and the intensity statistics to the cache and
        builds the missing cases of the preprocessed store first; the other ranks then read them, so
        no two processes write the same file.
        """
        store = self.config.data.cache in ("store", "disk")
        with self.all_ranks("checking the task folder and preparing the data"):
            if self.dist.is_main:
                # Fail before any compute on a folder with bad files, listing every problem at once.
                require_valid_task(self.task, self.config.data.cache_path, progress=self.progress)
                if self.dist.distributed:
                    # Once: split.json, the statistics and (with the store) every missing case. The
                    # store's case locks would also let all ranks build at once; this keeps their
                    # memory and the shared filesystem quiet meanwhile.
                    self.build_data(cache="store" if store else "none")
        with self.all_ranks("building the datasets"):
            self.data = self.build_data(cache=self.config.data.cache)
        d, world = self.config.data, self.dist.world_size
        self.steps = steps_per_epoch(self.config.train.steps_per_epoch, len(self.data.train), d.batch_size)
        self.sampler = EpochSampler(len(self.data.train), self.steps, d.batch_size, self.config.train.seed,
                                    self.dist.rank, world)
        self.loader = DataLoader(
            SeededDataset(self.data.train), batch_size=d.batch_size, sampler=self.sampler,
            num_workers=d.num_workers, collate_fn=list_data_collate,
            persistent_workers=d.num_workers > 0, pin_memory=self.device.type == "cuda",
        )

    def build_data(self, cache: str) -> TaskData:
        """Split, statistics and datasets of the task (see :func:`beseg.data.build_task_data`)."""
        d = self.config.data
        return build_task_data(
            self.task, self.preset, split_file=d.split_file, cache_dir=self.config.data.cache_path,
            patch_size=self.patch, cache=cache, val_frac=d.val_frac,
            test_frac=d.test_frac, seed=d.split_seed, num_samples=d.num_samples, pos=d.pos, neg=d.neg,
            progress=self.progress and self.dist.is_main,
        )

    def setup_model(self) -> None:
        """The network on its device, the loss, the optimiser, its schedule and the AMP gradient scaler."""
        self.model = self.build_network().to(self.device)
        self.loss_fn = self.build_loss()
        self.optimizer = self.build_optimizer()
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, _lr_lambda(self.config.optim.schedule, self.config.train.epochs))
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)

    def build_network(self) -> nn.Module:
        """The network of ``config.model`` for the preset's channels."""
        return build_network(self.config.model, self.preset.in_channels, self.preset.out_channels)

    def build_loss(self) -> nn.Module | Callable[[Tensor, Tensor], Tensor]:
        """The loss of ``config.loss``: ``loss(logits, label) -> scalar`` (see :func:`build_loss`).

        It gets float32 logits (B, K, ...) and the label on the device: (B, 1, ...) int64 class
        indices for a softmax task, (B, K, ...) float32 binary channels for a sigmoid task. It is
        built without in-loss checks (no device-to-host reads); every step's loss is checked once
        by :meth:`train_step`.
        """
        return build_loss(self.config.loss, self.preset.activation)

    def build_optimizer(self) -> torch.optim.Optimizer:
        """Adam (the paper's) or SGD with momentum 0.9, with ``optim.lr`` and ``optim.weight_decay``."""
        o = self.config.optim
        if o.name == "sgd":
            return torch.optim.SGD(self.model.parameters(), lr=o.lr, momentum=0.9, weight_decay=o.weight_decay)
        return torch.optim.Adam(self.model.parameters(), lr=o.lr, weight_decay=o.weight_decay)

    def restore(self, checkpoint: dict[str, Any]) -> None:
        """Continue from ``checkpoint``: weights, optimiser, schedule, AMP scaler, counters, RNG states.

        What cannot be restored on this machine is said in a ``RuntimeWarning`` (rank 0): CUDA
        generators of devices it does not have, an AMP loss scale from a run without AMP, or a
        different number of processes (the global batch, so the data order, changes).

        Raises:
            CheckpointError: the weights do not fit the network.
        """
        try:
            self.model.load_state_dict(checkpoint["model"])
        except RuntimeError as err:
            raise CheckpointError(f"{self.run_dir.last} does not fit model.network={self.config.model.network}: "
                                  f"{str(err).splitlines()[0]}") from None
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        notes = []
        scaler_state = checkpoint.get("scaler") or {}
        if self.scaler.is_enabled() and not scaler_state:
            notes.append("the checkpoint was trained without AMP (on CPU, or with train.amp off), so the AMP "
                         "loss scale starts afresh.")
        else:
            self.scaler.load_state_dict(scaler_state)  # a no-op when AMP is off here
        self.epoch, self.best_dice, self.global_step = checkpoint["epoch"], checkpoint["best_dice"], checkpoint["step"]
        notes += restore_rng_state(checkpoint["rng"])
        saved_world, world = checkpoint.get("world_size"), self.dist.world_size
        if saved_world is not None and saved_world != world:
            batch = self.config.data.batch_size
            notes.append(f"the checkpoint was written by {saved_world} process(es), this run has {world}: the global "
                         f"batch is now {batch * world} instead of {batch * saved_world}, so the data order differs "
                         "from an uninterrupted run.")
        if self.dist.is_main:
            for note in notes:
                warnings.warn(f"resuming {self.run_dir.last}: {note}", RuntimeWarning, stacklevel=2)

    # ------------------------------------------------------------------------------------------
    # the loop

    def fit(self) -> TrainResult:
        """Train the remaining epochs; validate and save as configured.

        Returns:
            A :class:`TrainResult`.
        """
        cfg = self.config.train
        self.model.train()
        for epoch in range(self.epoch, cfg.epochs):
            record = self.train_epoch(epoch)
            self.epoch = epoch + 1
            do_val = self.epoch % cfg.val_every == 0 or self.epoch == cfg.epochs
            val = self.validate() if do_val else None
            self.val_dice = val["dice_mean"] if val is not None else None
            is_best = False
            if self.val_dice is not None:
                self.last_val_dice = self.val_dice
                is_best = self.val_dice > self.best_dice
                self.best_dice = max(self.best_dice, self.val_dice)
            save_last = self.epoch % cfg.checkpoint_every == 0 or self.epoch == cfg.epochs
            with self.all_ranks("writing the logs and checkpoints"):
                if self.dist.is_main:
                    self.log_epoch(record, val, is_best)
                    if save_last or is_best:
                        self.save_checkpoint(best=is_best, last=save_last)
        return TrainResult(self.run_dir.root, cfg.epochs, self.best_dice, self.last_val_dice)

    def train_epoch(self, epoch: int) -> dict[str, Any]:
        """All steps of one epoch, then the learning-rate schedule's step.

        Args:
            epoch: 0-based index of the epoch.

        Returns:
            The epoch's ``"train"`` record for ``metrics.jsonl``: mean ``loss``, median
            ``step_time_s`` and ``loss_time_s`` (seconds per step; the loss's forward and
            backward within the real step), ``lr`` and ``skipped_steps``.
        """
        from tqdm.auto import tqdm

        self.sampler.set_epoch(epoch)
        losses, step_times, skipped = [], [], 0
        bar = tqdm(total=self.steps, desc=f"epoch {epoch + 1}/{self.config.train.epochs}", unit="step",
                   disable=not (self.progress and self.dist.is_main), dynamic_ncols=True)
        batches = iter(self.loader)
        tick = time.perf_counter()
        for _ in range(self.steps):
            with self.all_ranks("loading a training batch"):
                batch = next(batches)
            loss = self.train_step(batch)
            self.global_step += 1
            bar.update(1)
            now, started = time.perf_counter(), tick
            tick = now
            if loss is None:
                skipped += 1
                continue
            losses.append(loss)
            step_times.append(now - started)
            samples = batch["image"].shape[0] * self.dist.world_size
            bar.set_postfix(loss=f"{loss:.4f}", samples_s=f"{samples / step_times[-1]:.2f}")
        bar.close()
        self.scheduler.step()
        return {
            "kind": "train", "epoch": epoch + 1, "step": self.global_step,
            "loss": float(np.mean(losses)) if losses else float("nan"),
            "step_time_s": float(np.median(step_times[1:] or step_times)) if step_times else float("nan"),
            "loss_time_s": self.timer.epoch_seconds(),
            "lr": self.optimizer.param_groups[0]["lr"], "skipped_steps": skipped,
        }

    def train_step(self, batch: dict[str, Tensor]) -> float | None:
        """One optimiser step, a fixed sequence that subclasses do not override.

        1. :meth:`forward` and :meth:`compute_loss` (timed: the loss's forward and backward);
        2. every rank's loss is shared (one collective under torchrun); when any rank failed, every
           rank stops with that rank's message; when any loss is NaN/Inf, :meth:`on_nonfinite`
           decides for all ranks alike whether to skip the step or stop;
        3. the update: backward (AMP-scaled), unscale, :meth:`after_backward`, a check of the
           gradient norm (without AMP; the scaler does it with AMP), the optimiser and scaler step.

        Args:
            batch: ``{"image": (B, C, *patch), "label": (B, K, *patch)}`` from the loader (CPU).

        Returns:
            The loss (mean over processes), or ``None`` when the step was skipped.

        Raises:
            TrainingError: a non-finite loss or gradient that :meth:`on_nonfinite` decides to stop
                on, or a failure on another rank.
        """
        self.optimizer.zero_grad(set_to_none=True)
        loss, failure, value = None, None, math.nan
        try:
            logits, label = self.forward(batch)
            loss = self.timer.measure(self.compute_loss, logits, label)
            value = loss.item()
        except Exception as err:
            if not self.dist.distributed:
                raise
            failure = err
        values = self._share_losses(value, failure)
        bad = next((r for r, v in enumerate(values) if not math.isfinite(v)), None)
        if bad is not None:
            self._act_on_nonfinite(f"loss {values[bad]}", bad)
            return None
        self.timer.backward_starts()
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)  # after_backward sees the true gradients, also under AMP
        self.after_backward()
        if not self.use_amp:
            # Under AMP the scaler skips steps with non-finite gradients; without it nothing else would.
            # After DDP's all-reduce every rank holds the same gradients, so every rank decides alike.
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), float("inf")))
            if not math.isfinite(grad_norm):
                self._act_on_nonfinite(f"gradient norm {grad_norm}", None)
                self.optimizer.zero_grad(set_to_none=True)
                return None
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return float(np.mean(values))

    def forward(self, batch: dict[str, Tensor]) -> tuple[Tensor | Sequence[Tensor], Tensor]:
        """The network's forward pass on one batch (override for auxiliary or deep-supervision outputs).

        Args:
            batch: as :meth:`train_step`'s.

        Returns:
            ``(logits, label)`` on the training device: float32 (B, K, *patch) logits (or several
            such outputs, which :meth:`compute_loss` then combines) and the label; softmax labels
            are int64 class indices (the loss one-hots them without a check, so no host read).
        """
        image = batch["image"].to(self.device, non_blocking=True)
        label = batch["label"].to(self.device, non_blocking=True)
        if self.preset.activation == "softmax":
            label = label.long()
        with autocast_for(self.device, self.use_amp):
            logits = self.model(image)
        return logits.float(), label

    def compute_loss(self, logits: Tensor | Sequence[Tensor], label: Tensor) -> Tensor:
        """The training loss of one batch's network output.

        :meth:`train_step` times this call and the backward pass through it; an override needs no
        timing or DDP code of its own. It must return a scalar on the training device with its
        graph, and must not call ``backward`` or read values back to the host.

        Args:
            logits: what :meth:`forward` returned.
            label: the label :meth:`forward` returned.

        Returns:
            Scalar float32 loss with its graph.
        """
        return self.loss_fn(logits, label)

    def after_backward(self) -> None:
        """Called once the gradients are complete and unscaled, before the optimiser step.

        Override to clip or inspect gradients (``torch.nn.utils.clip_grad_norm_(self.model.parameters(), 12)``,
        as nnU-Net does). Under torchrun the gradients are already all-reduced, so what this does
        is the same on every rank. It must not step the optimiser, zero the gradients or run a
        collective; non-finite gradients are handled after it (the gradient-norm check, or the AMP scaler).
        """

    def on_nonfinite(self, what: str, rank: int | None) -> Literal["skip", "stop"]:
        """Decide what a non-finite loss or gradient does to the step: ``"skip"`` it or ``"stop"`` training.

        Every rank calls this with the same arguments, so an override must decide from them and
        from state that is the same on every rank (the default: ``train.on_nonfinite``). On
        ``"stop"`` the trainer raises a :class:`TrainingError` naming the epoch, step and last good
        checkpoint.

        Args:
            what: e.g. ``"loss nan"`` or ``"gradient norm inf"``.
            rank: the rank where it happened, when only some had it (``None``: all of them).

        Returns:
            ``"skip"`` or ``"stop"``.
        """
        return self.config.train.on_nonfinite

    def _act_on_nonfinite(self, what: str, rank: int | None) -> None:
        decision = self.on_nonfinite(what, rank)
        if decision == "skip":
            return
        if decision != "stop":
            raise TypeError(f"{type(self).__name__}.on_nonfinite must return 'skip' or 'stop', got {decision!r}.")
        where = f" on rank {rank}" if rank is not None and self.dist.distributed else ""
        last = self.run_dir.last
        raise TrainingError(
            f"non-finite {what}{where} at epoch {self.epoch + 1}, step {self.global_step + 1} (system "
            f"{self.config.system}); training stopped without saving these weights. The last good checkpoint is "
            f"{last if last.exists() else '(none yet)'}; lower optim.lr or set train.on_nonfinite: skip to skip "
            "such steps."
        )

    @torch.no_grad()
    def validate(self) -> dict[str, Any]:
        """Mean Dice per class over whole validation volumes, by sliding-window inference.

        Scored exactly as ``beseg evaluate`` scores (there on the original grid, here on the 1 mm
        one): the output becomes a label map (:meth:`TaskPreset.label_map`) and the masks are
        ``class_masks(label_map, preset.scored_classes)``, for the prediction and the truth alike.
        Every process scores its share of the cases; the sums are all-reduced, so all ranks
        return the same numbers.

        Returns:
            ``{"dice_mean": float, "dice": {class name: float}}``.
        """
        from tqdm.auto import tqdm

        model = _unwrap(self.model)
        model.eval()
        names = self.preset.class_names
        totals = torch.zeros(2, len(names), dtype=torch.float64)  # Dice sums, case counts
        cfg = self.config.train
        with self.all_ranks("validating"):
            mine = range(self.dist.rank, len(self.data.val), self.dist.world_size)
            for i in tqdm(mine, desc="validate", leave=False, disable=not (self.progress and self.dist.is_main)):
                item = self.data.val[i]
                image = torch.as_tensor(item["image"])[None].to(self.device)
                probs = predict_probabilities(model, image, self.patch, self.preset.activation, cfg.sw_overlap,
                                              cfg.sw_batch_size, cfg.amp)
                pred = self._scored(self.preset.label_map(probs))
                # The validation label is a label map in the dataset's values, as evaluation reads it.
                truth = self._scored(torch.as_tensor(item["label"])[None].to(self.device).long())
                # Both masks empty counts as a perfect score, as in beseg.metrics.
                dice = compute_dice(pred.float(), truth.float(), include_background=True, ignore_empty=False)[0]
                totals[0] += dice.double().cpu()
                totals[1] += 1
        all_reduce_sum(self.dist, totals)
        model.train()
        per_class = (totals[0] / totals[1].clamp(min=1)).tolist()
        return {"dice_mean": float(np.mean(per_class)), "dice": dict(zip(names, per_class))}

    def _scored(self, labels: Tensor) -> Tensor:
        """(B, 1, ...) label map -> (B, K, ...) bool masks of the scored classes."""
        return class_masks(labels[:, 0], self.preset.scored_classes).movedim(0, 1)

    def log_epoch(self, record: dict[str, Any], val: dict[str, Any] | None, is_best: bool) -> None:
        """Append the epoch's records to ``metrics.jsonl`` and TensorBoard; print the validation line.

        Every write is fenced by the run's claim (:meth:`RunDir.check`), TensorBoard's too.
        """
        self.run_dir.log(record)
        if val is not None:
            self.run_dir.log({"kind": "val", "epoch": self.epoch, "step": self.global_step, **val})
        self.run_dir.check()
        _tb_log(self.writer, "train", record, self.global_step)
        if val is None:
            return
        _tb_log(self.writer, "val", {"dice_mean": val["dice_mean"], **{f"dice_{k}": v for k, v in val["dice"].items()}},
                self.global_step)
        if self.progress:
            per = ", ".join(f"{k} {v:.3f}" for k, v in val["dice"].items())
            print(f"epoch {self.epoch}: train loss {record['loss']:.4f}, val Dice {val['dice_mean']:.4f} ({per})"
                  + (" *best*" if is_best else ""))

    def checkpoint_state(self) -> dict[str, Any]:
        """Everything a checkpoint holds: states to resume exactly, and what inference needs."""
        return {
            "format": FORMAT_VERSION, "config": config_to_dict(self.config), "epoch": self.epoch,
            "step": self.global_step, "best_dice": self.best_dice, "val_dice": self.val_dice,
            "model": _unwrap(self.model).state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(), "rng": capture_rng_state(),
            "world_size": self.dist.world_size,
            # What inference needs besides the weights, so predict works without the dataset.
            "preset": self.preset.name, "roi": list(self.patch),
            "stats": dataclasses.asdict(self.data.stats) if self.data.stats is not None else None,
        }

    def save_checkpoint(self, best: bool, last: bool) -> None:
        """Write ``best.pt`` and/or ``last.pt`` atomically (called on rank 0 only), fenced by the run's claim.

        Raises:
            CheckpointError: a file cannot be written; the previous one is intact.
            LockLostError: another process took the run over; nothing was written.
        """
        state = self.checkpoint_state()
        if best:
            atomic_save(state, self.run_dir.best, fence=self.run_dir.check)
        if last:
            atomic_save(state, self.run_dir.last, fence=self.run_dir.check)

    # ------------------------------------------------------------------------------------------
    # collective decisions

    @contextmanager
    def all_ranks(self, what: str) -> Iterator[None]:
        """Run the block on every rank; if it failed on any rank, stop every rank.

        One process: an exception propagates unchanged. Under torchrun the ranks exchange a
        failure flag after the block (and the error texts when one failed), and every rank raises
        the same :class:`TrainingError` naming the failing rank, so no rank is left waiting.

        Args:
            what: what the block does, for the message ("saving checkpoints").
        """
        failure = None
        try:
            yield
        except Exception as err:
            if not self.dist.distributed:
                raise
            failure = err
        if self.dist.distributed and bool(gather_rows(self.dist, [failure is not None]).any()):
            self._stop_all_ranks(failure, what)

    def _share_losses(self, value: float, failure: Exception | None) -> list[float]:
        """Every rank's loss of this step (one collective); stops every rank if one failed."""
        if not self.dist.distributed:
            return [value]
        table = gather_rows(self.dist, [failure is not None, value])
        if bool(table[:, 0].any()):
            self._stop_all_ranks(failure, "computing the loss")
        return table[:, 1].tolist()

    def _stop_all_ranks(self, failure: Exception | None, what: str) -> NoReturn:
        texts = gather_texts(self.dist, None if failure is None else _describe(failure))
        failed = [(rank, text) for rank, text in enumerate(texts) if text is not None]
        rank, text = failed[0]
        others = ", ".join(str(r) for r, _ in failed[1:])
        if isinstance(failure, LockLostError):
            raise failure  # this rank's process exits as one whose claim was taken over, not as a failure
        if failure is not None and not isinstance(failure, (BesegError, OSError)):
            traceback.print_exception(failure, file=sys.stderr)  # a bug: keep its traceback on its own rank
        raise TrainingError(
            f"training stopped on all {self.dist.world_size} processes: rank {rank} failed while {what}"
            + (f" (and rank(s) {others})" if others else "") + f": {text}"
        ) from failure



class LossTimer:
    """Seconds spent in the loss per training step (forward and backward), measured inside the real step.

    The loss's backward has finished when the gradient reaches the tensor the loss was given; a
    hook on that tensor marks the moment, so timing costs no extra forward or backward pass. On
    CUDA the marks are events, read once per epoch, so there is no synchronisation per step.

    Args:
        device: where the loss runs.
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self._current: dict[str, Any] = {}
        self._steps: list[dict[str, Any]] = []

    def _now(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def measure(self, loss_fn: Callable[[Any, Tensor], Tensor], input: Tensor | Sequence[Tensor], target: Tensor) -> Tensor:
        """``loss_fn(input, target)``, timing its forward and (through hooks on ``input``) its backward.

        ``input`` may be one tensor or several (deep supervision): the backward ends when the last
        of them has received its gradient.
        """
        marks = {"forward": self._now()}
        loss = loss_fn(input, target)
        marks["forward_end"] = self._now()
        for tensor in [input] if isinstance(input, Tensor) else input:
            if tensor.requires_grad:
                tensor.register_hook(lambda grad: marks.__setitem__("backward_end", self._now()))
        self._current = marks
        return loss

    def backward_starts(self) -> None:
        """Mark the start of the backward pass of the loss last measured (skipped steps never call it)."""
        self._current["backward"] = self._now()
        self._steps.append(self._current)
        self._current = {}

    def epoch_seconds(self) -> float:
        """Median seconds per step in the loss since the last call (NaN when no step completed)."""
        steps = [m for m in self._steps if "backward_end" in m]
        self._steps = []
        if not steps:
            return float("nan")
        if self.cuda:
            torch.cuda.synchronize()  # once per epoch: every event recorded so far has completed
            seconds = [(m["forward"].elapsed_time(m["forward_end"]) + m["backward"].elapsed_time(m["backward_end"])) / 1e3
                       for m in steps]
        else:
            seconds = [(m["forward_end"] - m["forward"]) + (m["backward_end"] - m["backward"]) for m in steps]
        return float(np.median(seconds))


# ----------------------------------------------------------------------------------------------
# helpers


def _describe(err: BaseException) -> str:
    return str(err) if isinstance(err, BesegError) else f"{type(err).__name__}: {err}"


def steps_per_epoch(configured: int | None, train_cases: int, batch_size: int) -> int:
    """Optimiser steps per epoch: ``train.steps_per_epoch``, else one pass over the training cases at one
    process's batch size, ``cases // batch_size`` (at least 1).

    The number does not depend on the number of processes: on 16 GPUs an epoch has as many steps as on
    one (each step then sees 16 times the samples), so ``val_every``, ``checkpoint_every`` and the
    learning-rate schedule, all counted in epochs, mean the same on any world size (nnU-Net, likewise,
    fixes 250 iterations per epoch).
    """
    return configured or max(1, train_cases // batch_size)


def _lr_lambda(schedule: str, epochs: int) -> Callable[[int], float]:
    """Learning-rate factor per finished epoch for ``optim.schedule``.

    Raises:
        ConfigError: an unknown schedule (a config built in code skips the YAML loader's check).
    """
    if schedule == "constant":
        return lambda e: 1.0
    if schedule == "poly":
        return lambda e: (1.0 - min(e, epochs) / epochs) ** 0.9
    if schedule == "cosine":
        return lambda e: 0.5 * (1.0 + math.cos(math.pi * min(e, epochs) / epochs))
    raise ConfigError(f"unknown optim.schedule {schedule!r}; choose one of: cosine, constant, poly.")


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


def _tensorboard(folder: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional: the JSON lines hold the same numbers
        return None
    return SummaryWriter(str(folder))


def _tb_log(writer: Any, prefix: str, record: dict[str, Any], step: int) -> None:
    if writer is None:
        return
    for key, value in record.items():
        if key not in ("kind", "epoch", "step") and isinstance(value, (int, float)) and math.isfinite(value):
            writer.add_scalar(f"{prefix}/{key}", value, step)
    writer.flush()

"""What training costs on this machine's device, measured with the engine's own code on one real case.

These are the measuring functions a cost plan (:mod:`beseg.experiment.cost`) multiplies by the work
of a comparison. Each times the code path a run executes, never a stand-in:

* :func:`measure_store_case`: :meth:`beseg.data.store.Store.build_case` of one case into a scratch
  store beside the real one (same filesystem; the real store is not touched);
* :func:`measure_training`: warm-up and timed :meth:`Trainer.train_step` calls of the config's
  network, loss and optimiser at its patch and batch, on patches the store's training dataset draws
  from that case (the loader's work per batch is timed apart, as a loader worker does it), the peak
  memory of those steps, one checkpoint write (:meth:`Trainer.save_checkpoint`), and one
  :meth:`Trainer.validate` of the case (sliding window over its whole volume at the preset's spacing);
* :func:`measure_evaluation_case`: what scoring one test case adds to its sliding window (the label
  map taken back to the image's own grid, the prediction file written, the label read and the
  metrics computed), as :func:`beseg.engine.evaluate.evaluate` does it;
* :func:`measure_startup`: a fresh Python process importing the engine, which every run started by a
  launcher (``--devices``, ``--jobs``, each SLURM job and requeue) pays before it trains.

Peak memory (:class:`PeakMemory`): on CUDA ``torch.cuda.max_memory_allocated`` (reset before the
measured block); on the CPU the process's peak resident size (``VmHWM`` in ``/proc/self/status``,
reset through ``/proc/self/clear_refs``; where that is not possible, the process's lifetime peak
``ru_maxrss``, which can only overstate). The host's peak RSS is recorded on CUDA too, for
``--mem-per-run``.
"""

from __future__ import annotations

import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.data import list_data_collate

from beseg.data.datasets import TaskData
from beseg.data.msd import Case, MSDTask
from beseg.data.nifti import read_label_map
from beseg.data.patches import StorePatchDataset, StoreVolumeDataset
from beseg.data.presets import TaskPreset
from beseg.data.splits import Split
from beseg.data.store import Store, open_store
from beseg_runtime.io import write_label
from beseg.engine.config import Config
from beseg.engine.distributed import DistInfo
from beseg.engine.evaluate import to_original_grid
from beseg.engine.trainer import LossTimer, Trainer
from beseg.metrics import label_map_metrics

__all__ = [
    "DeviceInfo", "PeakMemory", "StoreCaseCost", "TrainingCost", "cpu_name", "device_info", "measure_evaluation_case",
    "measure_startup", "measure_store_case", "measure_training", "median_seconds", "synchronize",
]


# ----------------------------------------------------------------------------------------------
# the device


@dataclass(frozen=True)
class DeviceInfo:
    """The device a measurement ran on.

    Attributes:
        kind: ``cuda`` or ``cpu``.
        name: the GPU's name (``NVIDIA H200``), or the CPU's model name.
        memory_bytes: the GPU's memory; for the CPU the RAM this process may use (``MemTotal``, or a
            smaller cgroup limit, e.g. a SLURM job's ``--mem``).
        count: GPUs visible to this process (0 on a machine without CUDA); CPU cores for the CPU.
        torch: the torch version.
    """

    kind: str
    name: str
    memory_bytes: int
    count: int
    torch: str

    @property
    def slug(self) -> str:
        """A file-name form: ``cuda-nvidia-h200``, ``cpu-amd-epyc-7b13-2-cores``."""
        text = f"{self.kind}-{self.name}" + (f"-{self.count}-cores" if self.kind == "cpu" else "")
        return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")

    def describe(self) -> str:
        """``NVIDIA H200 (139.8 GiB)``, ``CPU AMD EPYC 7B13 (2 cores, 22.9 GiB)``."""
        if self.kind == "cuda":
            return f"{self.name} ({gib(self.memory_bytes)})"
        return f"CPU {self.name} ({self.count} cores, {gib(self.memory_bytes)})"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def gib(n: float) -> str:
    """Bytes as ``12.3 GiB`` (``850 MiB`` below 1 GiB)."""
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def _host_memory() -> int:
    """RAM this process may use: ``MemTotal``, or the cgroup's limit when that is smaller (bytes)."""
    total = 0
    try:
        with open("/proc/meminfo") as f:
            total = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemTotal:"))
    except (OSError, StopIteration, ValueError):
        pass
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(limit_file).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and 0 < int(text) < (total or 2**62):
            total = int(text)
    return total


def device_info(device: torch.device | str) -> DeviceInfo:
    """What :class:`DeviceInfo` says about ``device`` (``cpu``, ``cuda`` or ``cuda:N``)."""
    device = torch.device(device)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return DeviceInfo("cuda", props.name, int(props.total_memory), torch.cuda.device_count(), torch.__version__)
    return DeviceInfo("cpu", cpu_name(), _host_memory(), len(os.sched_getaffinity(0)), torch.__version__)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU), so a wall-clock time covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], Any], repeats: int, warmup: int = 1,
                   device: torch.device = torch.device("cpu")) -> float:
    """Median wall seconds of ``fn()`` over ``repeats`` calls after ``warmup`` untimed ones (device synchronised)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# ----------------------------------------------------------------------------------------------
# peak memory


def _vm_hwm() -> int | None:
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration, ValueError):
        return None


class PeakMemory:
    """The peak memory of what runs inside ``with PeakMemory(device) as peak:`` (then ``peak.bytes``).

    Attributes:
        bytes: the device's peak: CUDA ``max_memory_allocated``; CPU peak RSS.
        host_bytes: the process's peak RSS (on CUDA too).
        kind: how ``bytes`` was measured, for the plan.
        host_kind: how ``host_bytes`` was measured.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.bytes = 0
        self.host_bytes = 0
        self.kind = ""
        self.host_kind = ""
        self._reset = False

    def __enter__(self) -> "PeakMemory":
        try:  # "5" resets the peak resident size (VmHWM) to the current one (Linux >= 4.0)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self._reset = _vm_hwm() is not None
        except OSError:
            self._reset = False
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._reset:
            self.host_bytes = _vm_hwm() or 0
            self.host_kind = "peak RSS of the process (VmHWM, reset before the steps)"
        else:
            self.host_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            self.host_kind = "lifetime peak RSS of the process (ru_maxrss; could not be reset, so it may overstate)"
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.bytes = int(torch.cuda.max_memory_allocated(self.device))
            self.kind = "torch.cuda.max_memory_allocated"
        else:
            self.bytes, self.kind = self.host_bytes, self.host_kind


# ----------------------------------------------------------------------------------------------
# the store


@dataclass
class StoreCaseCost:
    """Building one case of the preprocessed store.

    Attributes:
        case: the case id.
        seconds: :meth:`Store.build_case` wall time.
        bytes: the case's files in the store.
        voxels: the resampled (stored, before cropping) volume's voxels per channel.
        original_voxels: the source image's voxels per channel.
    """

    case: str
    seconds: float
    bytes: int
    voxels: int
    original_voxels: int


def measure_store_case(task: MSDTask, preset: TaskPreset, case: Case, scratch: Path) -> tuple[StoreCaseCost, Store]:
    """Build ``case`` into a new store under ``scratch`` and time it.

    Args:
        task: the dataset.
        preset: its preset (the store's settings).
        case: the case to build.
        scratch: an empty folder, best beside the real store (the same filesystem); the caller removes it.

    Returns:
        ``(cost, store)``: the figures and the scratch store holding the case (for :func:`measure_training`).

    Raises:
        DataError: the case cannot be read or does not fit the preset.
    """
    store = open_store(task, preset, scratch)
    start = time.perf_counter()
    info = store.build_case(case)
    seconds = time.perf_counter() - start
    props = info["properties"]
    return StoreCaseCost(case.id, seconds, int(sum(info["files"].values())), int(np.prod(props["shape"])),
                         int(np.prod(props["original_shape"]))), store


# ----------------------------------------------------------------------------------------------
# training, checkpoints, validation


@dataclass
class TrainingCost:
    """One system's training costs on one device (seconds unless named otherwise).

    Attributes:
        step_s: median of the timed :meth:`Trainer.train_step` calls on ready batches (device synchronised).
        step_samples: every timed step.
        warmup_steps: untimed steps before them (allocation, kernel selection, AMP scale).
        loss_s: the loss's forward and backward within a step (median, :class:`LossTimer`).
        batch_s: median time one process takes to draw one batch from the store's training dataset
            (what a loader worker does per step: crop, normalise, flip, shift, collate).
        patches: patches per step (``data.batch_size`` x ``data.num_samples``).
        patch: the patch (voxels).
        peak_bytes, peak_kind: the steps' peak memory on the device (see :class:`PeakMemory`).
        host_peak_bytes: the process's peak RSS during the steps.
        checkpoint_s, checkpoint_bytes: one ``last.pt`` written.
        validation_s: :meth:`Trainer.validate` of the one case (sliding window, Dice).
        validation_peak_bytes: its peak memory on the device.
        validation_voxels: that case's voxels at the preset's spacing (validation time scales with them).
        setup_s: network, loss and optimiser built and moved to the device.
        threads: torch CPU threads during the measurement.
        error: why the measurement stopped (e.g. out of memory), else ``None``.
    """

    step_s: float = float("nan")
    step_samples: list[float] = field(default_factory=list)
    warmup_steps: int = 0
    loss_s: float | None = None
    batch_s: float = float("nan")
    patches: int = 0
    patch: tuple[int, ...] = ()
    peak_bytes: int = 0
    peak_kind: str = ""
    host_peak_bytes: int = 0
    checkpoint_s: float = float("nan")
    checkpoint_bytes: int = 0
    validation_s: float = float("nan")
    validation_peak_bytes: int = 0
    validation_voxels: int = 0
    setup_s: float = float("nan")
    threads: int = 0
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["patch"] = list(self.patch)
        return out


def _out_of_memory(err: BaseException) -> bool:
    return isinstance(err, (MemoryError, torch.cuda.OutOfMemoryError)) or "out of memory" in str(err).lower()


def measure_training(config: Config, store: Store, case: Case, task: MSDTask, preset: TaskPreset, stats: Any,
                     device: torch.device, scratch: Path, warmup: int = 2, steps: int = 3,
                     validate: bool = True) -> TrainingCost:
    """Time the real training step, a checkpoint write and one validation of ``config`` on one stored case.

    The :class:`~beseg.engine.trainer.Trainer` of ``config`` builds its network, loss, optimiser,
    schedule and AMP scaler (:meth:`Trainer.setup_model`) on ``device``; its batches come from the
    store's training dataset over ``case`` (``data.batch_size`` items of ``data.num_samples``
    patches, collated as the loader does). Nothing is written outside ``scratch``.

    Args:
        config: the run's config (its patch, batch, network, loss, optimiser, AMP, sliding-window settings).
        store: a store holding ``case`` (from :func:`measure_store_case`).
        case: the case.
        task, preset: the dataset and its preset.
        stats: the preset's intensity statistics (:func:`beseg.data.foreground_percentiles`), or None.
        device: where to measure.
        scratch: a folder for the throw-away run folder (its checkpoint).
        warmup, steps: untimed and timed training steps.
        validate: also time one validation (systems with the same network, patch and sliding window share it).

    Returns:
        A :class:`TrainingCost`; when the device runs out of memory, or a step fails (a patch too small for
        the network...), its ``error`` says where and why, and the figures measured before stay.
    """
    cost = TrainingCost(warmup_steps=warmup, threads=torch.get_num_threads())
    trainer = Trainer(config, task, scratch / "run", progress=False)
    trainer.dist = DistInfo(0, 1, 0, device)
    patch = trainer.patch
    d = config.data
    read = preset.read_transform(stats)
    train_ds = StorePatchDataset(store, [case.id], patch, read, preset.training_target, pos=d.pos, neg=d.neg,
                                 num_samples=d.num_samples)
    trainer.data = TaskData(task, preset, Split([case.id], [case.id]), stats, train_ds,
                            StoreVolumeDataset(store, [case.id], read), store.root.parent, store)
    cost.patch, cost.patches = tuple(patch), d.batch_size * d.num_samples
    cost.validation_voxels = int(np.prod(store.properties(case)["shape"]))
    seeds = iter(range(10**6))

    def draw() -> dict[str, torch.Tensor]:
        return list_data_collate([train_ds.sample(0, next(seeds)) for _ in range(d.batch_size)])

    stage = "building the model"
    try:
        synchronize(device)
        start = time.perf_counter()
        trainer.setup_model()
        synchronize(device)
        cost.setup_s = time.perf_counter() - start
        trainer.timer = LossTimer(device)
        trainer.model.train()
        stage = "training steps"
        batch_times = []
        with PeakMemory(device) as peak:
            for i in range(warmup + steps):
                tick = time.perf_counter()
                batch = draw()
                batch_times.append(time.perf_counter() - tick)
                synchronize(device)
                tick = time.perf_counter()
                trainer.train_step(batch)
                synchronize(device)
                if i >= warmup:
                    cost.step_samples.append(time.perf_counter() - tick)
        cost.step_s = statistics.median(cost.step_samples)
        cost.batch_s = statistics.median(batch_times)
        cost.peak_bytes, cost.peak_kind, cost.host_peak_bytes = peak.bytes, peak.kind, peak.host_bytes
        loss_total = trainer.timer.epoch_seconds()  # the loss's median share per step, read once
        cost.loss_s = loss_total if np.isfinite(loss_total) else None
        stage = "writing a checkpoint"
        start = time.perf_counter()
        trainer.save_checkpoint(best=False, last=True)
        cost.checkpoint_s = time.perf_counter() - start
        cost.checkpoint_bytes = trainer.run_dir.last.stat().st_size
        stage = "validating one case"
        if not validate:
            return cost
        with PeakMemory(device) as peak:
            synchronize(device)
            start = time.perf_counter()
            trainer.validate()
            synchronize(device)
            cost.validation_s = time.perf_counter() - start
        cost.validation_peak_bytes = peak.bytes
    except Exception as err:  # noqa: BLE001 - a step that fails is a finding of the measurement: the runs would fail
        first = (str(err).strip().splitlines() or [""])[0][:200]
        cost.error = (f"out of memory while {stage} ({first})" if _out_of_memory(err)
                      else f"{stage} failed: {type(err).__name__}: {first}")
    finally:
        del trainer
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return cost


# ----------------------------------------------------------------------------------------------
# evaluation and process start


def measure_evaluation_case(store: Store, case: Case, preset: TaskPreset, scratch: Path,
                            nsd_tolerance_mm: float = 1.0) -> float:
    """Seconds that scoring one test case adds to its sliding window, as :func:`~beseg.engine.evaluate.evaluate`
    does it: the label map on the stored grid taken back to the image's grid, written as NIfTI, the label
    read, and Dice, HD95, ASD and NSD computed.

    The "prediction" is the case's own label moved by one voxel along the first axis: a boundary like a
    trained model's (an untrained network's noise would make the surface distances unrepresentatively slow).

    Args:
        store: a store holding ``case``.
        case: the case.
        preset: the dataset's preset (its scored classes).
        scratch: where the prediction file is written (the caller removes it).
        nsd_tolerance_mm: NSD tolerance, as evaluation's.
    """
    props = store.properties(case)
    labels = np.roll(store.volume(case.id)[1][0], 1, axis=0)
    start = time.perf_counter()
    mapped = to_original_grid(labels, props)
    write_label(mapped, nib.load(str(case.label)), scratch / f"{case.id}.nii.gz")
    truth, header = read_label_map(case.label, "label")
    label_map_metrics(mapped, truth, preset.scored_classes, header.spacing, nsd_tolerance_mm)
    return time.perf_counter() - start


def measure_startup(python: str | None = None) -> float:
    """Seconds a new Python process takes to import the engine (torch, MONAI, beseg's trainer and evaluation):
    what every run a launcher starts in its own process pays before its first step.

    Raises:
        RuntimeError: the interpreter cannot import beseg.
    """
    code = "import beseg.engine.trainer, beseg.engine.evaluate"
    start = time.perf_counter()
    out = subprocess.run([python or sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    seconds = time.perf_counter() - start
    if out.returncode != 0:
        raise RuntimeError(f"{python or sys.executable} cannot import beseg: {out.stderr.strip()[-300:]}")
    return seconds

"""A comparison's cost plan: the work of every run, times what this machine's device measured, as wall time.

``beseg compare ... --dry-run`` (and ``beseg reproduce --dry-run``) plans the comparison as it would
run, then, instead of training, builds a :class:`CostPlan` and writes it into ``RESULTS/plan.json``
under the key ``cost``. ``--slurm-time auto`` builds the same plan before submitting and takes each
job's ``--time`` from it. The plan holds:

* **the work**: per run, the epochs left x steps per epoch, the validations (each over the
  validation cases), the checkpoints written and the test cases evaluated, from the run's config,
  its split and how far its folder got (a resumed run counts only what is left);
* **the measured costs** (:mod:`beseg.engine.measure`), on this machine's device with the real
  preset and data: warm-up and timed training steps of each system at its patch and batch, the
  loader's work per batch, one checkpoint write, one sliding-window validation of one real case (per
  network: the systems that differ only in the loss share it), the store build of that case, what
  evaluating a test case adds to its sliding window, and a new process's start-up (for launchers that
  start one per run). The case is the median-sized one of the training and validation cases; per-case
  times are scaled to every other case by its volume, read from the NIfTI headers. The figures are
  cached per device in ``RESULTS/cost/<device>.json``, keyed by the settings they depend on, so
  ``--no-measure`` (and ``--slurm-time auto`` on a login node without the jobs' GPU) uses them;
* **the projection**: the store build of the cases not yet stored, then the runs one after another
  on one device; through the local launcher's slots (``--devices``/``--jobs``, runs taken in plan
  order by the first free slot, as :class:`~beseg.experiment.launch.LocalLauncher` does); and for
  SLURM, each job's time limit, how many times it requeues, and the wall time if every job starts at
  once. Time waiting in a SLURM queue is excluded, and the plan says so;
* **memory**: the peak of a training step (CUDA: ``torch.cuda.max_memory_allocated``; CPU: peak RSS)
  and of the validation, with a warning when it exceeds the device's memory, the node's RAM for the
  runs that share it, or ``--mem-per-run``.

A run's projected seconds: process start (launchers that start one) + building the model + epochs
x steps x step + validations x the validation cases + checkpoints + the evaluation of its test
cases. The step is the measured step, plus the loader's batch time when the loader shares the
run's cores (CPU) or has no workers, else the larger of the two (the loader's workers run beside the
GPU). Not modelled: the data check and intensity statistics on a new dataset, DDP's all-reduce
(``--gpus-per-run G`` keeps the steps per epoch and splits the validation over the ranks), the
report, and nnU-Net runs (their trainer decides their schedule; they are listed as not projected).

``--slurm-time auto``: a job's limit is the smallest whole number of minutes that leaves
``margin`` x (its run's projected seconds, plus the store build it may wait for) before the job's
requeue signal (:func:`beseg.experiment.slurm.signal_grace_s`), capped by the partition's
``MaxTime`` (``scontrol show partition``). A run that does not fit is planned to requeue: each
later start pays the process start and the model again, and may redo the epochs since the last
checkpoint (``train.checkpoint_every``); the plan says how many requeues each job needs.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from beseg.data import MSDTask, default_cache_dir, get_preset, load_split
from beseg.data.intensity import foreground_percentiles
from beseg.data.nifti import read_header
from beseg.data.splits import get_protocol
from beseg.data.store import Store, StoreSettings
from beseg.engine.config import Config, config_to_dict
from beseg.engine.trainer import steps_per_epoch
from beseg.errors import ConfigError
from beseg.experiment.launch import LocalLauncher
from beseg.experiment.outcome import duration_text
from beseg.experiment.layout import ResultsLayout
from beseg.experiment.plan import PlannedRun
from beseg.fileio import atomic_write_text

__all__ = ["COST_VERSION", "DEFAULT_MARGIN", "CostPlan", "CostCache", "auto_time_limit", "format_cost_plan",
           "plan_cost", "pool_wall", "requeues_needed"]

COST_VERSION = 1
#: ``--slurm-time-margin``'s default: a job asks for 1.5x its run's projected time.
DEFAULT_MARGIN = 1.5
#: Untimed and timed training steps per system, by device kind (a CPU step at the paper's patches takes seconds).
WARMUP_STEPS = {"cuda": 3, "cpu": 1}
TIMED_STEPS = {"cuda": 5, "cpu": 3}
#: A peak above this share of a device's memory is warned about (the allocator needs headroom).
MEMORY_WARN_SHARE = 0.95


# ----------------------------------------------------------------------------------------------
# where the runs execute


@dataclass
class Target:
    """Where a comparison's runs will execute, as its launcher says.

    Attributes:
        kind: ``cuda`` or ``cpu``.
        launcher: ``local`` or ``slurm``.
        slots: runs at a time (1: one after another; SLURM: every job).
        process_per_run: each run starts its own Python process (pays :func:`measure_startup`).
        ranks: processes (GPUs) per run.
        cores: CPU cores a run may use (its threads and its loader's workers).
        threads: torch threads of a CPU run whose config does not set ``train.threads``.
        devices: the GPU indices of ``--devices``.
        describe: the launcher's options, for the plan.
    """

    kind: str
    launcher: str
    slots: int
    process_per_run: bool
    ranks: int
    cores: int
    threads: int
    devices: list[str] = field(default_factory=list)
    describe: str = ""


def _config_device(config: Config) -> str:
    import torch

    device = config.train.device
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return "cuda" if device.startswith("cuda") else "cpu"


def target_of(launcher: Any, config: Config, runs: int) -> Target:
    """The :class:`Target` of ``launcher`` (a :class:`LocalLauncher` or a SLURM launcher) for ``runs`` runs."""
    import torch

    cores = len(os.sched_getaffinity(0))
    if getattr(launcher, "name", "local") == "slurm":
        ranks = launcher.ranks
        kind = "cuda" if launcher.gpus else "cpu"
        what = f"--launcher slurm, {launcher.gpus} GPU(s) and {launcher.cpus} core(s) per run" + \
            (f", partition {launcher.partition}" if launcher.partition else "")
        return Target(kind, "slurm", max(1, runs), True, ranks, launcher.cpus, max(1, launcher.cpus // ranks),
                      describe=what)
    launcher = launcher if launcher is not None else LocalLauncher()
    if launcher.devices is not None:
        n = len(launcher.devices)
        return Target("cuda", "local", n, True, 1, max(1, cores // n), torch.get_num_threads(), list(launcher.devices),
                      f"--devices {','.join(launcher.devices)} ({n} at a time)")
    if launcher.jobs > 1:
        return Target("cpu", "local", launcher.jobs, True, 1, launcher.threads_per_run(), launcher.threads_per_run(),
                      describe=f"--jobs {launcher.jobs} ({launcher.jobs} at a time, "
                               f"{launcher.threads_per_run()} core(s) each)")
    return Target(_config_device(config), "local", 1, False, 1, cores, torch.get_num_threads(),
                  describe="one after another in this process")


# ----------------------------------------------------------------------------------------------
# the cache of measured figures


def _digest(value: Any) -> str:
    return hashlib.sha1(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:12]


def system_key(config: Config, kind: str, threads: int) -> str:
    """What a system's training figures depend on: task, network, loss, optimiser, patch and batch, AMP, the
    sliding window, and on the CPU the threads (not seeds, epochs or split)."""
    c = config_to_dict(config)
    relevant = {"task": c["data"]["task"], "patch": c["data"]["patch_size"], "batch": c["data"]["batch_size"],
                "samples": c["data"]["num_samples"], "model": c["model"], "loss": c["loss"],
                "optim": c["optim"]["name"], "amp": c["train"]["amp"] and kind == "cuda",
                "sw": [c["train"]["sw_overlap"], c["train"]["sw_batch_size"]],
                "threads": threads if kind == "cpu" else None}
    return f"{config.system}-{_digest(relevant)}"


def network_key(config: Config, kind: str, threads: int) -> str:
    """What a validation's time depends on: the network, patch, sliding window, AMP (and CPU threads)."""
    c = config_to_dict(config)
    return _digest({"task": c["data"]["task"], "patch": c["data"]["patch_size"], "model": c["model"],
                    "amp": c["train"]["amp"] and kind == "cuda", "sw": [c["train"]["sw_overlap"],
                                                                        c["train"]["sw_batch_size"]],
                    "threads": threads if kind == "cpu" else None})


class CostCache:
    """Measured figures per device: ``RESULTS/cost/<device slug>.json``.

    Each file holds ``{"version", "device", "systems": {key: entry}, "data": {key: entry}, "startup": entry}``;
    an entry is ``{"measured_at": unix time, "figures": {...}, ...}``.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    def _read(self, path: Path) -> dict[str, Any]:
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return doc if isinstance(doc, dict) and doc.get("version") == COST_VERSION else {}

    def devices(self, kind: str) -> list[dict[str, Any]]:
        """Cached documents of devices of ``kind``, most recently written first."""
        paths = sorted(self.folder.glob(f"{kind}-*.json"), key=lambda p: p.stat().st_mtime, reverse=True)
        return [doc for doc in map(self._read, paths) if doc.get("device", {}).get("kind") == kind]

    def document(self, slug: str) -> dict[str, Any]:
        return self._read(self.folder / f"{slug}.json")

    def save(self, device: dict[str, Any], section: str, key: str | None, entry: dict[str, Any]) -> None:
        """Record ``entry`` under ``section`` (and ``key``) of the device's file (atomically)."""
        slug = device["slug"]
        doc = self.document(slug) or {"version": COST_VERSION, "device": device, "systems": {}, "data": {}}
        doc["device"] = device
        if key is None:
            doc[section] = entry
        else:
            doc.setdefault(section, {})[key] = entry
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.folder / f"{slug}.json", json.dumps(doc, indent=1) + "\n")


# ----------------------------------------------------------------------------------------------
# limits and requeues


def auto_time_limit(need_s: float) -> int:
    """The shortest whole-minute time limit whose requeue signal comes no earlier than ``need_s`` seconds in."""
    from beseg.experiment.slurm import signal_grace_s

    limit = 60 * max(1, math.ceil(need_s / 60))
    while limit - signal_grace_s(limit) < need_s:
        limit += 60
    return limit


def requeues_needed(need_s: float, limit_s: int | None, restart_s: float, lost_s: float) -> int | None:
    """How many times a job of ``limit_s`` requeues to do ``need_s`` seconds of work (``None``: it never progresses).

    The first start has ``limit - grace`` seconds before its requeue signal and may lose up to ``lost_s`` (the
    epochs since its last checkpoint); every later start also pays ``restart_s`` (process start and model).
    """
    from beseg.experiment.slurm import signal_grace_s

    if limit_s is None:
        return 0
    window = limit_s - signal_grace_s(limit_s)
    if need_s <= window:
        return 0
    first, later = window - lost_s, window - lost_s - restart_s
    if later <= 0 or first <= 0:
        return None
    return math.ceil((need_s - first) / later)


# ----------------------------------------------------------------------------------------------
# the plan


@dataclass
class CostPlan:
    """The cost plan; :meth:`to_dict` is what ``plan.json`` holds under ``cost``.

    Attributes:
        data: the plan as a JSON-ready dict (see the module docstring; :func:`format_cost_plan` prints it).
        limits: ``{run id: seconds}``: each SLURM job's ``--time`` under ``--slurm-time auto``.
    """

    data: dict[str, Any]
    limits: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return self.data

    @property
    def warnings(self) -> list[str]:
        return list(self.data.get("warnings", []))


def _case_volumes(task: MSDTask, preset: Any, ids: Sequence[str]) -> dict[str, tuple[float, int]]:
    """``{case: (voxels at the preset's spacing, original voxels)}`` from the NIfTI headers (estimates for scaling)."""
    import warnings

    voxel = math.prod(preset.pixdim)
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pixdim notes were given by the data check
        for cid in ids:
            header = read_header(task.case(cid).image)
            shape = header.spatial_shape[:3]
            out[cid] = (math.prod(n * s for n, s in zip(shape, header.spacing)) / voxel, math.prod(shape))
    return out


def _median_case(volumes: dict[str, tuple[float, int]], ids: Sequence[str]) -> str:
    ranked = sorted(ids, key=lambda c: (volumes[c][0], c))
    return ranked[(len(ranked) - 1) // 2]


class _Threads:
    """Set torch's CPU threads for a measurement and put them back."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __enter__(self) -> None:
        import torch

        self.old = torch.get_num_threads()
        torch.set_num_threads(self.n)

    def __exit__(self, *exc: Any) -> None:
        import torch

        torch.set_num_threads(self.old)


def _measure_device(target: Target) -> Any:
    """The torch device to measure on for ``target``, or None when this machine has none of its kind."""
    import torch

    if target.kind == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        return None
    index = int(target.devices[0]) if target.devices and int(target.devices[0]) < torch.cuda.device_count() else 0
    return torch.device("cuda", index)


def _figures(runs: Sequence[PlannedRun], target: Target, task: MSDTask, split: Any, layout: ResultsLayout,
             measure: bool | None, log: Callable[[str], None]) -> dict[str, Any]:
    """Measure (or read from the cache) every figure the runs need.

    Returns:
        ``{"device": dict, "systems": {system: entry}, "data": entry, "startup": entry or None, "notes": [...]}``
        where an entry is ``{"figures": ..., "measured_at": ..., "source": "measured now" | "cached"}``.

    Raises:
        ConfigError: ``measure=False`` (``--no-measure``) and a needed figure is not cached, or the jobs' GPU
            is not here and nothing is cached.
    """
    import torch

    from beseg.engine import measure as m

    cache = CostCache(layout.cost)
    device = _measure_device(target)
    here = None
    if device is not None:
        info = m.device_info(device)
        here = {**info.to_dict(), "slug": info.slug, "describe": info.describe()}
    # The document to read cached figures from: this device's, else (the jobs' GPU is elsewhere) the latest of the kind.
    if here is not None:
        doc = cache.document(here["slug"])
    else:
        docs = cache.devices(target.kind)
        doc = docs[0] if docs else {}
    if here is None and not doc:
        raise ConfigError(
            f"the runs train on a GPU, but this machine has none and {cache.folder} holds no GPU timings; run the dry "
            "run once on a GPU node of the cluster (e.g. `srun --gres=gpu:1 beseg compare ... --dry-run`, same --out), "
            "then this command uses its figures" if target.kind == "cuda" else f"no timings in {cache.folder}")
    device_dict = here or doc["device"]
    preset = get_preset(runs[0].config.data.task)
    per_system: dict[str, tuple[Config, str, str, int]] = {}
    for run in runs:
        threads = run.config.train.threads or target.threads
        key = system_key(run.config, target.kind, threads)
        per_system.setdefault(run.system, (run.config, key, network_key(run.config, target.kind, threads), threads))
    store_key = f"{preset.name}-{StoreSettings.for_preset(preset).digest}"

    def cached(section: str, key: str | None) -> dict[str, Any] | None:
        entry = doc.get(section) if key is None else doc.get(section, {}).get(key)
        return {**entry, "source": "cached"} if isinstance(entry, dict) and "figures" in entry else None

    need_startup = target.process_per_run
    out: dict[str, Any] = {"device": device_dict, "systems": {}, "data": cached("data", store_key),
                           "startup": cached("startup", None) if need_startup else None, "notes": []}
    missing = [name for name, (_, key, _, _) in per_system.items() if cached("systems", key) is None]
    fresh = measure is True or (measure is None and (missing or out["data"] is None
                                                     or (need_startup and out["startup"] is None)))
    if measure is False or device is None:
        lacking = missing + (["the store and evaluation"] if out["data"] is None else []) + \
            (["process start-up"] if need_startup and out["startup"] is None else [])
        if lacking:
            why = "--no-measure was given" if measure is False else f"this machine has no {target.kind.upper()} device"
            raise ConfigError(f"no cached timings in {cache.folder} for {', '.join(lacking)} on "
                              f"{device_dict.get('describe', device_dict.get('name'))} ({why}); run the dry run once "
                              "without --no-measure on the machine the runs use.")
        fresh = False
    if not fresh:
        for name, (_, key, _, _) in per_system.items():
            out["systems"][name] = cached("systems", key)
        if device is None:
            out["notes"].append(f"the runs' GPU is not on this machine: using the timings cached for "
                                f"{device_dict.get('describe')} in {cache.folder}")
        return out
    # Measure now: one case into a scratch store beside the real one, then every system on it.
    ids = sorted({c for part in ("train", "val") for c in split.cases(part)})
    volumes = _case_volumes(task, preset, ids)
    case = task.case(_median_case(volumes, ids))
    cache_dir = runs[0].config.data.cache_path or default_cache_dir(task.root)
    cache_dir.mkdir(parents=True, exist_ok=True)
    warmup, steps = WARMUP_STEPS[device.type], TIMED_STEPS[device.type]
    now = time.time()
    with tempfile.TemporaryDirectory(prefix=".beseg-cost-", dir=cache_dir) as tmp:
        scratch = Path(tmp)
        log(f"measuring on {device_dict['describe']}: the store build of case {case.id} (median size of the "
            f"{len(ids)} training and validation cases)...")
        store_cost, store = m.measure_store_case(task, preset, case, scratch / "store")
        eval_s = m.measure_evaluation_case(store, case, preset, scratch)
        out["data"] = {"figures": {**store_cost.__dict__, "evaluation_case_s": eval_s}, "measured_at": now,
                       "source": "measured now"}
        cache.save(device_dict, "data", store_key, out["data"])
        stats = foreground_percentiles([case], None) if preset.needs_intensity_stats else None
        validated: dict[str, dict[str, Any]] = {}
        for name, (config, key, net, threads) in per_system.items():
            log(f"measuring {name}: {warmup} warm-up + {steps} timed training steps at "
                f"{'x'.join(map(str, config.data.patch_size or preset.patch_size))} x {config.data.batch_size}"
                + ("" if net in validated else ", one validation of the case") + "...")
            with _Threads(threads if device.type == "cpu" else torch.get_num_threads()):
                cost = m.measure_training(config, store, case, task, preset, stats, device, scratch / name, warmup,
                                          steps, validate=net not in validated)
            figures = cost.to_dict()
            if net in validated and cost.error is None:
                for k in ("validation_s", "validation_peak_bytes", "validation_voxels"):
                    figures[k] = validated[net][k]
                figures["validation_from"] = validated[net]["system"]
            elif cost.error is None:
                validated[net] = {**figures, "system": name}
            entry = {"figures": figures, "measured_at": now, "system": name, "source": "measured now"}
            out["systems"][name] = entry
            if cost.error is None:
                cache.save(device_dict, "systems", key, entry)
    if need_startup:
        log("measuring a new process's start-up (imports), which every run a launcher starts pays...")
        out["startup"] = {"figures": {"seconds": m.measure_startup()}, "measured_at": now, "source": "measured now"}
        cache.save(device_dict, "startup", None, out["startup"])
    return out


def _effective_step(fig: dict[str, Any], workers: int, target: Target, threads: int) -> float:
    """Seconds per training step with the loader: beside the step when its workers have cores of their own
    (a GPU run; a CPU run with spare cores), else added to it."""
    step, batch = fig["step_s"], fig["batch_s"]
    if workers <= 0:
        return step + batch
    if target.kind == "cuda" or target.cores >= threads + workers:
        return max(step, batch / workers)
    return step + batch


def _run_cost(run: PlannedRun, split: Any, protocol: str, fig: dict[str, Any], data_fig: dict[str, Any],
              startup_s: float, target: Target, volumes: dict[str, tuple[float, int]]) -> dict[str, Any]:
    cfg = run.config
    t = cfg.train
    threads = t.threads or target.threads
    steps = steps_per_epoch(t.steps_per_epoch, len(split.train), cfg.data.batch_size)
    first = run.epoch if run.state == "resume" else 0
    epochs = range(first + 1, t.epochs + 1) if run.state in ("fresh", "resume") else range(0)
    validations = sum(1 for e in epochs if e % t.val_every == 0 or e == t.epochs)
    saves = sum(1 for e in epochs if e % t.checkpoint_every == 0 or e == t.epochs) + validations  # best.pt: at most
    measured_vox = volumes[data_fig["case"]][0]
    measured_orig = volumes[data_fig["case"]][1]
    per_val = sum(fig["validation_s"] * volumes[c][0] / measured_vox for c in split.val) / target.ranks
    eval_cases = split.cases(get_protocol(protocol).eval_split) if run.state != "done" else []
    evaluation = sum(fig["validation_s"] * volumes[c][0] / measured_vox
                     + data_fig["evaluation_case_s"] * volumes[c][1] / measured_orig for c in eval_cases)
    step = _effective_step(fig, cfg.data.num_workers, target, threads)
    seconds = {
        "startup": startup_s if target.process_per_run and run.state != "done" else 0.0,
        "setup": fig["setup_s"] * (bool(epochs) + bool(eval_cases)),  # the model, for training and for evaluation
        "training": len(epochs) * steps * step,
        "validation": validations * per_val,
        "checkpoints": saves * fig["checkpoint_s"],
        "evaluation": evaluation,
    }
    epoch_s = steps * step + per_val
    return {"id": run.id, "system": run.system, "state": run.state, "epochs": len(epochs), "steps_per_epoch": steps,
            "steps": len(epochs) * steps, "step_s": step, "validations": validations,
            "validation_cases": len(split.val), "test_cases": len(eval_cases), "checkpoints": saves,
            "epoch_s": epoch_s, "lost_s": t.checkpoint_every * epoch_s,
            "seconds": {k: round(v, 3) for k, v in seconds.items()}, "total_s": round(sum(seconds.values()), 3)}


def pool_wall(durations: Sequence[float], slots: int) -> float:
    """Wall time of ``durations`` run in order, each by the first free of ``slots`` (the local launcher's rule)."""
    free = [0.0] * max(1, slots)
    for d in durations:
        i = free.index(min(free))
        free[i] += d
    return max(free) if durations else 0.0


def plan_cost(planned: Sequence[PlannedRun], task: MSDTask, results_dir: str | Path, protocol: str,
              launcher: Any = None, measure: bool | None = True, margin: float = DEFAULT_MARGIN,
              log: Callable[[str], None] = print) -> CostPlan:
    """Build the cost plan of ``planned`` (see the module docstring).

    Args:
        planned: the comparison's runs (:func:`beseg.experiment.plan.plan_runs`), their split files written.
        task: the comparison's dataset (its case sizes, the case measured).
        results_dir: the results folder (its ``cost/`` holds the cached figures).
        protocol: ``heldout``, ``cv`` or ``paper`` (which cases each run's evaluation scores).
        launcher: where the runs execute (default: one after another in this process).
        measure: ``True`` measure now (``--dry-run``); ``None`` use the cached figures when there are all, else
            measure (``--slurm-time auto``); ``False`` only the cached figures (``--no-measure``).
        margin: ``--slurm-time-margin``: a job asks for this multiple of its run's projected time.
        log: progress lines of the measurement.

    Returns:
        The :class:`CostPlan`.

    Raises:
        ConfigError: a margin below 1, cached figures missing with ``measure=False``, or a SLURM partition
            whose ``MaxTime`` is too short for a run to finish one epoch between requeues under ``--slurm-time auto``.
        SlurmError: under ``--slurm-time auto``, the partition's limits cannot be read.
    """
    if not margin >= 1.0:
        raise ConfigError(f"--slurm-time-margin must be at least 1 (a multiple of the projected time), got {margin}.")
    layout = ResultsLayout(Path(results_dir).resolve())
    runs = [r for r in planned if r.nnunet is None]
    others = [r for r in planned if r.nnunet is not None]
    target = target_of(launcher, planned[0].config, len([r for r in planned if r.state != "done"]))
    plan: dict[str, Any] = {
        "version": COST_VERSION, "made_at": time.time(), "launcher": target.describe, "kind": target.kind,
        "queue_wait": "excluded", "warnings": [], "notes": [],
        "not_projected": [f"{r.id}: nnU-Net run (nnU-Net's trainer decides its schedule; time one of its epochs)"
                          for r in others],
    }
    auto = getattr(launcher, "time_limit", None) == "auto"
    if not runs:
        plan["notes"].append("no beseg run to project (only nnU-Net runs)")
        return CostPlan(plan, _nnunet_limits(others, launcher) if auto else {})
    splits: dict[str, Any] = {}
    for run in runs:
        path = run.config.data.split_file
        if path not in splits:
            splits[path] = load_split(path)
    first_split = splits[runs[0].config.data.split_file]
    figures = _figures(runs, target, task, first_split, layout, measure, log)
    plan["device"] = figures["device"]
    plan["figures"] = {name: entry for name, entry in figures["systems"].items()}
    plan["data_figures"] = figures["data"]
    plan["startup"] = figures["startup"]
    plan["notes"] += figures["notes"]
    # Every case the runs store (training, validation; test cases when evaluated), and which are stored already.
    preset = get_preset(runs[0].config.data.task)
    all_ids = sorted({c for s in splits.values() for c in s.cases("all")})
    volumes = _case_volumes(task, preset, sorted(set(all_ids) | {figures["data"]["figures"]["case"]}))
    data_fig = figures["data"]["figures"]
    startup_s = figures["startup"]["figures"]["seconds"] if figures["startup"] else 0.0
    run_costs, failed = [], []
    for run in runs:
        entry = figures["systems"][run.system]["figures"]
        if entry.get("error"):
            failed.append(run.id)
            continue
        run_costs.append(_run_cost(run, splits[run.config.data.split_file], protocol, entry, data_fig, startup_s,
                                   target, volumes))
    for name, entry in figures["systems"].items():
        error = entry["figures"].get("error")
        if error:
            advice = "lower data.batch_size, data.patch_size or train.sw_batch_size" if error.startswith("out of memory") \
                else "its runs would fail the same way"
            plan["warnings"].append(f"{name}: {error} on {figures['device']['describe']}; its runs are not projected: "
                                    f"{advice}")
    if auto and failed:
        raise ConfigError(f"--slurm-time auto: {len(failed)} run(s) cannot be timed because their system failed on "
                          f"{figures['device']['describe']} ({'; '.join(plan['warnings'])[:600]}); fix that first "
                          "(--dry-run shows the plan).")
    plan["not_projected"] += [f"{rid}: its system could not be measured" for rid in failed]
    store_seconds, store_missing = _store_work(runs, task, preset, all_ids, volumes, data_fig)
    plan["store"] = {"cases": len(all_ids) if runs[0].config.data.cache in ("store", "disk") else 0,
                     "missing": store_missing, "seconds": round(store_seconds, 3)}
    plan["runs"] = run_costs
    todo = [r for r in run_costs if r["state"] != "done"]
    plan["work"] = {"runs": len(planned), "to_run": sum(r.state != "done" for r in planned),
                    "steps": sum(r["steps"] for r in run_costs), "validations": sum(r["validations"] for r in run_costs),
                    "validation_cases": sum(r["validations"] * r["validation_cases"] for r in run_costs),
                    "test_evaluations": sum(r["test_cases"] for r in run_costs)}
    totals = [r["total_s"] for r in todo]
    one_device = store_seconds + sum(totals)
    plan["projection"] = {"one_device_s": round(one_device, 1)}
    if target.launcher == "local" and target.slots > 1:
        plan["projection"]["launcher_s"] = round(store_seconds + pool_wall(totals, target.slots), 1)
    gpus_here = figures["device"].get("count", 0) if figures["device"].get("kind") == "cuda" else 0
    if target.kind == "cuda" and target.launcher == "local" and gpus_here > target.slots:
        plan["projection"]["all_gpus_here"] = {"gpus": gpus_here,
                                               "wall_s": round(store_seconds + pool_wall(totals, gpus_here), 1)}
    _memory_warnings(plan, figures, target, launcher)
    limits: dict[str, int] = {}
    if target.launcher == "slurm":
        limits = _slurm_plan(plan, todo, store_seconds, startup_s, figures, launcher, margin, auto)
        if auto:
            limits.update(_nnunet_limits(others, launcher, plan["projection"]["slurm"].get("max_time_s")))
    return CostPlan(plan, limits)


def _store_work(runs: Sequence[PlannedRun], task: MSDTask, preset: Any, ids: Sequence[str],
                volumes: dict[str, tuple[float, int]], data_fig: dict[str, Any]) -> tuple[float, int]:
    """``(seconds, cases)`` of the store build still to do (nothing is created to find out)."""
    cfg = runs[0].config.data
    if cfg.cache not in ("store", "disk"):
        return 0.0, 0
    settings = StoreSettings.for_preset(preset)
    root = (cfg.cache_path or default_cache_dir(task.root)) / f"store-{preset.name}-{settings.digest}"
    store = Store(root, settings, preset) if root.is_dir() else None
    missing = [c for c in ids if store is None or not store.ready(task.case(c))]
    measured = volumes[data_fig["case"]][0]
    return sum(data_fig["seconds"] * volumes[c][0] / measured for c in missing), len(missing)


def _memory_warnings(plan: dict[str, Any], figures: dict[str, Any], target: Target, launcher: Any) -> None:
    from beseg.engine.measure import gib

    device = figures["device"]
    sharing = target.slots  # runs on this machine at once (local launcher)
    for name, entry in figures["systems"].items():
        fig = entry["figures"]
        if fig.get("error"):
            continue
        peak = max(fig["peak_bytes"], fig["validation_peak_bytes"])
        if device["kind"] == "cuda" and peak > MEMORY_WARN_SHARE * device["memory_bytes"]:
            plan["warnings"].append(f"{name}: peak GPU memory {gib(peak)} is {peak / device['memory_bytes']:.0%} of "
                                    f"the {device['name']}'s {gib(device['memory_bytes'])}: expect out-of-memory "
                                    "errors; lower data.batch_size, data.patch_size or train.sw_batch_size")
        host = fig["host_peak_bytes"] * sharing
        memory = device["memory_bytes"] if device["kind"] == "cpu" else _host_memory()
        # SLURM jobs run on other nodes: --mem-per-run (below) is their limit, not this machine's RAM.
        if target.launcher == "local" and memory and host > MEMORY_WARN_SHARE * memory:
            plan["warnings"].append(f"{name}: {sharing} run(s) at a time need about {gib(host)} of RAM (peak RSS "
                                    f"{gib(fig['host_peak_bytes'])} each, without loader workers), more than this "
                                    f"machine's {gib(memory)}; run fewer at a time")
        mem = getattr(launcher, "mem", None)
        if mem:
            limit = _mem_bytes(mem)
            if fig["host_peak_bytes"] > limit:
                plan["warnings"].append(f"{name}: a run's peak RSS {gib(fig['host_peak_bytes'])} exceeds "
                                        f"--mem-per-run {mem}: SLURM would kill its jobs; ask for more")


def _host_memory() -> int:
    from beseg.engine.measure import device_info

    return device_info("cpu").memory_bytes


def _mem_bytes(text: str) -> int:
    units = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    text = text.strip().upper()
    return int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text) * 2**20  # SLURM's default unit: MB


def _slurm_plan(plan: dict[str, Any], todo: list[dict[str, Any]], store_s: float, startup_s: float,
                figures: dict[str, Any], launcher: Any, margin: float, auto: bool) -> dict[str, int]:
    """Each job's time limit and requeues (into ``plan``); returns the ``--slurm-time auto`` limits."""
    from beseg.experiment.slurm import SlurmError, parse_duration, partition_limits

    info: dict[str, Any] = {"margin": margin, "partition": launcher.partition, "max_time_s": None,
                            "default_time_s": None, "queue_wait": "excluded"}
    try:
        limits = partition_limits(launcher.partition, launcher.retry)
        info.update(partition=limits.name, max_time_s=limits.max_s, default_time_s=limits.default_s)
    except SlurmError as err:
        if auto:
            raise
        plan["notes"].append(f"the partition's limits are unknown ({err}); no MaxTime cap or requeue planned")
    max_s = info["max_time_s"]
    given = parse_duration(launcher.time_limit) if launcher.time_limit not in (None, "auto") else None
    info["time"] = "auto" if auto else (launcher.time_limit or "the partition's default")
    if given is not None and max_s is not None and given > max_s:
        plan["warnings"].append(f"--slurm-time {launcher.time_limit} exceeds partition {info['partition']}'s MaxTime "
                                f"({duration_text(max_s)}): SLURM keeps such jobs pending (PartitionTimeLimit); use "
                                "--slurm-time auto or a shorter time")
    out: dict[str, int] = {}
    walls, requeues_total = [], 0
    for run in todo:
        restart = startup_s + figures["systems"][run["system"]]["figures"]["setup_s"]
        need = (run["total_s"] + store_s) * margin
        if auto:
            limit = auto_time_limit(need)
            capped = max_s is not None and limit > max_s
            limit = (max_s // 60) * 60 if capped else limit
            if capped and limit < 60:
                raise ConfigError(f"partition {info['partition']}'s MaxTime is under a minute; choose another partition.")
            out[run["id"]] = limit
        else:
            limit = given if given is not None else (info["default_time_s"] or max_s)
        requeues = requeues_needed(need, limit, restart, run["lost_s"])
        if requeues is None:
            message = (f"{run['id']}: a job of {duration_text(limit)} cannot finish one checkpoint interval "
                       f"(train.checkpoint_every epochs, ~{duration_text(run['lost_s'])}) after its start "
                       f"(~{duration_text(restart)}) before its requeue signal")
            if auto:
                raise ConfigError(message + f"; choose a partition with a longer MaxTime than {duration_text(max_s)} "
                                            "or lower train.checkpoint_every.")
            plan["warnings"].append(message + "; give a longer --slurm-time")
        run["slurm"] = {"time_limit_s": limit, "requeues": requeues}
        requeues_total += requeues or 0
        walls.append(run["total_s"] + (requeues or 0) * (restart + run["lost_s"] / 2))
    info.update(jobs=len(todo), requeues=requeues_total,
                all_at_once_s=round(store_s + max(walls, default=0.0), 1),
                device_hours=round(sum(r["total_s"] for r in todo) * max(1, launcher.gpus or 0) / 3600, 2),
                core_hours=round(sum(r["total_s"] for r in todo) * launcher.cpus / 3600, 2))
    plan["projection"]["slurm"] = info
    return out


def _nnunet_limits(runs: Sequence[PlannedRun], launcher: Any, max_s: int | None = None) -> dict[str, int]:
    """``--slurm-time auto`` for nnU-Net runs (not projected): the partition's MaxTime (they resume with ``--c``)."""
    if not runs:
        return {}
    if max_s is None:
        from beseg.experiment.slurm import partition_limits

        max_s = partition_limits(launcher.partition, launcher.retry).max_s
    return {r.id: max_s for r in runs} if max_s is not None else {}


# ----------------------------------------------------------------------------------------------
# printing


def format_cost_plan(plan: dict[str, Any]) -> list[str]:
    """The plan as lines for the terminal (what ``plan.json``'s ``cost`` holds, read back)."""
    from beseg.engine.measure import gib

    lines = []
    device = plan.get("device")
    work = plan.get("work")
    if device:
        sources = sorted({e.get("source", "?") for e in plan.get("figures", {}).values()})
        lines.append(f"cost plan on {device.get('describe', device.get('name'))} (timings {', '.join(sources)}; "
                     f"runs: {plan['launcher']})")
    if work:
        lines.append(f"work: {work['to_run']} of {work['runs']} run(s) to do: {work['steps']} training steps, "
                     f"{work['validations']} validations ({work['validation_cases']} case validations), "
                     f"{work['test_evaluations']} test-case evaluations")
    by_system: dict[str, list[dict[str, Any]]] = {}
    for run in plan.get("runs", []):
        by_system.setdefault(run["system"], []).append(run)
    if by_system:
        lines.append(f"{'system':<22} {'epochs x steps':>15} {'step':>8} {'batch':>8} {'val/case':>9} "
                     f"{'peak mem':>9} {'per run':>14}")
    for name, runs in by_system.items():
        fig = plan["figures"][name]["figures"]
        run = runs[0]
        per_case = fig["validation_s"]
        lines.append(f"{name:<22} {run['epochs']:>6} x {run['steps_per_epoch']:<6} {fig['step_s']:>7.3f}s "
                     f"{fig['batch_s']:>7.3f}s {per_case:>8.2f}s {gib(max(fig['peak_bytes'], 0)):>9} "
                     f"{duration_text(statistics.mean(r['total_s'] for r in runs)):>14}")
    if device and plan.get("figures"):
        some = next(iter(plan["figures"].values()))["figures"]
        lines.append(f"  (step: median of {len(some.get('step_samples', []))} timed after {some.get('warmup_steps')} "
                     "warm-up; batch: one process drawing a batch; val/case: one sliding-window validation of the "
                     f"measured case; peak: {some.get('peak_kind', '')})")
    store = plan.get("store")
    data = (plan.get("data_figures") or {}).get("figures")
    if store and data:
        lines.append(f"store: {store['missing']} of {store['cases']} case(s) to build, ~{duration_text(store['seconds'])} "
                     f"({data['seconds']:.1f} s for case {data['case']}, {gib(data['bytes'])}; others scaled by volume)")
    projection = plan.get("projection", {})
    if projection:
        lines.append("projected wall time (time waiting in a queue excluded):")
        lines.append(f"  one device, runs one after another: {duration_text(projection['one_device_s'])}")
        if "launcher_s" in projection:
            lines.append(f"  {plan['launcher']}: {duration_text(projection['launcher_s'])}")
        if "all_gpus_here" in projection:
            g = projection["all_gpus_here"]
            lines.append(f"  --devices 0..{g['gpus'] - 1} (all {g['gpus']} GPUs here): {duration_text(g['wall_s'])}")
        slurm = projection.get("slurm")
        if slurm:
            limits = sorted({r["slurm"]["time_limit_s"] for r in plan["runs"] if r.get("slurm")
                             and r["slurm"]["time_limit_s"] is not None})
            shown = ", ".join(duration_text(x) for x in limits[:3]) + (" ..." if len(limits) > 3 else "") or "none"
            cap = f"MaxTime {duration_text(slurm['max_time_s'])}" if slurm["max_time_s"] else "MaxTime unlimited"
            lines.append(f"  SLURM, partition {slurm['partition'] or '(default)'} ({cap}): {slurm['jobs']} job(s), "
                         f"--time {slurm['time']}" + (f" = {shown}" if limits else "")
                         + (f" ({slurm['margin']}x the projected run)" if slurm["time"] == "auto" else "")
                         + f"; {slurm['requeues']} requeue(s) planned; all jobs at once: "
                         f"{duration_text(slurm['all_at_once_s'])}; {slurm['device_hours']} GPU-hours, "
                         f"{slurm['core_hours']} core-hours")
    for item in plan.get("not_projected", []):
        lines.append(f"not projected: {item}")
    for note in plan.get("notes", []):
        lines.append(f"note: {note}")
    for warning in plan.get("warnings", []):
        lines.append(f"warning: {warning}")
    return lines

"""The runs of a comparison: systems, the (system, seed[, fold]) runs, how far each got, and ``plan.json``.

A run is one training (``train.seed=k``, on fold ``f`` in cross-validation; for an nnU-Net
trainer, ``nnunet:NAME``, repeat ``k``: nnU-Net has no seed) followed by its evaluation into the results layout (:class:`beseg.experiment.layout.ResultsLayout`). Each run is
independent of the others, so any launcher may execute them in any order, in parallel, on any host
that sees the results folder.

``RESULTS/plan.json`` lists every run::

    {"version": 1, "protocol": "heldout", "folds": null,
     "data": {"folder": "/data/Task09_Spleen", "dataset_json_sha256": "3f2a...", "training": ["spleen_2", ...],
              "test": ["imagesTs/spleen_1.nii.gz", ...]},
     "runs": [
      {"id": "segresnet_be/seed0", "kind": "beseg", "system": "segresnet_be", "seed": 0, "fold": null,
       "run_dir": "segresnet_be/seed0", "state": "pending", "config": {...}},
      {"id": "nnUNetTrainerBE/repeat0", "kind": "nnunet", "system": "nnUNetTrainerBE", "seed": 0, ...,
       "nnunet": {"trainer": "nnUNetTrainerBE", "configuration": "3d_fullres", "plans": "nnUNetPlans"},
       "config": {...}}, ...],
     "nnunet": {"python": "/envs/nnunet/bin/python", "version": "2.8.1"},
     "primary": {"system": "segresnet_be", "baseline": "segresnet_dice", "metric": "dice", ...},
     "cost": {...}}

``data`` is the dataset's identity (:class:`beseg.data.DatasetIdentity`): its folder, the SHA-256 of the
``dataset.json`` bytes the comparison loaded, and its training ids and test images. A worker process
loads the dataset again from it (:func:`planned_task`) and stops its run, in one line, when the file is
no longer that one; the same compare command plans anew. A ``plan.json`` written before identities were
recorded holds the folder alone (``"data": "/data/Task09_Spleen"``): its workers load that folder
unchecked, and say so in their log; the next compare command records the identity.

``primary`` is the comparison the report answers first, declared here before any run trains
(:mod:`beseg.experiment.primary`). ``cost`` is the cost plan of ``--dry-run`` or ``--slurm-time auto``
(:mod:`beseg.experiment.cost`: the work, the measured timings, the projected wall time, memory
warnings), kept when a later command rewrites the file without making a new one.

An nnU-Net run's ``config`` is the task's reference config: only its ``data`` settings matter
(they make the split; on a dataset without a beseg preset, ``data.task`` is the dataset's own id);
nnU-Net's own plan and trainer decide everything else (:mod:`beseg.experiment.nnunet_runs`).

``run_dir`` is relative to the results folder, and so is the config's ``data.split_file``
(``split.json``): the folder can be moved. ``state`` is what the last ``beseg compare`` found
(``pending``, ``done`` or ``failed``); ``beseg compare RESULTS --status`` reads the live state from
the run folders (:mod:`beseg.experiment.status`).

Settings compared for "same run": the saved config against the requested one, without the
runtime-only keys (:data:`RUNTIME_KEYS`: device, threads, workers, cache folder, checkpoint
interval) and without ``data.split_file``, which compare pins to the results folder's own split file
wherever that folder now is.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable, Sequence
from typing import Any, Literal

from beseg.data.msd import DatasetChangedError, DatasetIdentity, MSDTask, load_task, reload_task
from beseg.data.splits import PROTOCOLS as PROTOCOL_SPECS
from beseg.engine.checkpoint import load_checkpoint
from beseg.engine.config import (
    RUNTIME_KEYS, Config, config_from_dict, config_to_dict, list_presets, load_config, merge_config, parse_overrides,
)
from beseg.engine.rundir import RunDir
from beseg.errors import ConfigError
from beseg.experiment import nnunet_runs
from beseg.experiment.layout import SPLIT_FILE, ResultsLayout, run_id_problem, system_name_problem
from beseg.experiment.nnunet_runs import NNUNetSystem
from beseg.fileio import atomic_write_text

__all__ = [
    "TABLE1_SYSTEMS", "ALIASES", "PROTOCOLS", "PAPER_VAL_FRAC", "RUNTIME_KEYS", "SystemSpec", "PlannedRun",
    "preset_prefix", "resolve_system", "check_protocol", "plan_runs", "run_state", "run_unit", "write_plan_json",
    "read_plan_json", "planned_task",
]

#: The paper's Table 1 rows, in the paper's order.
TABLE1_SYSTEMS: tuple[str, ...] = (
    "unet", "ahnet", "segresnet_dice", "segresnet_boundary", "segresnet_focal", "segresnet_be",
)
#: Short names accepted by ``--systems``.
ALIASES: dict[str, str] = {
    "dice": "segresnet_dice", "dice_be": "segresnet_be", "be": "segresnet_be",
    "boundary": "segresnet_boundary", "focal": "segresnet_focal", "segresnet": "segresnet_dice",
}
#: ``--protocol`` values (``--folds K`` turns ``heldout`` into k-fold cross-validation, ``cv``).
PROTOCOLS: tuple[str, ...] = tuple(name for name, spec in PROTOCOL_SPECS.items() if not spec.folds)
#: The paper's validation share: 80/20 (Task09 32/9 and Task01 388/96 through the presets' paper sizes).
PAPER_VAL_FRAC = 0.2
#: Overrides that compare sets itself for every run.
_PINNED_KEYS = ("train.seed", "data.split_file")
#: ... and, under the paper protocol, the two-way split's shares.
_PAPER_KEYS = ("data.val_frac", "data.test_frac")
State = Literal["done", "evaluate", "resume", "fresh"]
#: What executes a run (:mod:`beseg.experiment.worker`): ``beseg`` trains with :func:`beseg.engine.trainer.train`
#: and evaluates with :func:`beseg.engine.evaluate.evaluate`; ``nnunet`` runs nnU-Net's commands
#: (:mod:`beseg.experiment.nnunet_runs`).
RUN_KIND = "beseg"


@dataclass(frozen=True)
class SystemSpec:
    """A system to compare: the name its results are filed under, and the config it comes from.

    Attributes:
        name: system name (``segresnet_be``...), the ``RESULTS_DIR/<name>/`` folder.
        config: shipped preset name (``phantom_spleen_segresnet_be``) or a YAML file path; for an
            nnU-Net system the task's reference preset, whose ``data`` settings make the split (``""``
            on a dataset without a beseg preset).
        nnunet: the nnU-Net trainer, for an ``nnunet:`` system.
    """

    name: str
    config: str
    nnunet: NNUNetSystem | None = None



@dataclass
class PlannedRun:
    """One (system, seed[, fold]) training run and what compare has to do for it.

    Attributes:
        system: the system name.
        seed: the training seed (``train.seed``).
        run_dir: ``RESULTS_DIR/<system>/seed<seed>`` (``.../fold<f>`` in cross-validation).
        config: the resolved config for this run.
        state: ``done`` (skip), ``evaluate`` (trained, not evaluated), ``resume`` (continue
            training from the last checkpoint) or ``fresh``.
        epoch: epochs already in the last checkpoint (0 when fresh).
        fold: the fold in cross-validation, else ``None``.
        nnunet: the nnU-Net trainer of an nnU-Net run (then ``seed`` is the repeat number).
    """

    system: str
    seed: int
    run_dir: Path
    config: Config
    state: State
    epoch: int = 0
    fold: int | None = None
    nnunet: NNUNetSystem | None = None

    @property
    def kind(self) -> str:
        """``beseg`` or ``nnunet``."""
        return RUN_KIND if self.nnunet is None else nnunet_runs.KIND

    @property
    def unit(self) -> str:
        """``seed``, or ``repeat`` for an nnU-Net run (see :func:`run_unit`)."""
        return run_unit(self.nnunet)

    @property
    def name(self) -> str:
        """``segresnet_be seed 0`` (``... fold 2``; ``nnUNetTrainerBE repeat 0``), for progress lines."""
        return f"{self.system} {self.unit} {self.seed}" + (f" fold {self.fold}" if self.fold is not None else "")

    @property
    def id(self) -> str:
        """``<system>/seed<k>[/fold<f>]`` (``repeat<k>``): the run folder relative to the results folder."""
        return ResultsLayout.run_id(self.system, self.seed, self.fold, self.unit)

    def current_state(self) -> tuple[State, int]:
        """``(state, epochs done)`` read from the run folder now (see :func:`run_state`)."""
        if self.nnunet is not None:
            return nnunet_runs.run_state(self.run_dir, self.nnunet, self.fold or 0)
        return run_state(self.run_dir, self.config)

    @property
    def result_dir(self) -> Path:
        """The folder the report reads this run's scores from: the run, or its seed folder in cross-validation."""
        return self.run_dir.parent if self.fold is not None else self.run_dir

    def describe(self) -> str:
        """What will happen, for the progress line."""
        if self.nnunet is not None:
            what = f"nnU-Net {self.nnunet.trainer} {self.nnunet.configuration}, fold {self.fold or 0}"
            return {"done": f"finished ({what}, evaluated); skipped", "evaluate": f"trained ({what}); evaluating",
                    "resume": f"training {what} (resumes after epoch {self.epoch})"}.get(self.state,
                                                                                          f"training {what}")
        epochs = self.config.train.epochs
        if self.state == "done":
            return f"finished ({epochs} epochs, evaluated); skipped"
        if self.state == "evaluate":
            return f"trained ({epochs} epochs); evaluating"
        if self.state == "resume":
            return f"training (resumes at epoch {self.epoch + 1} of {epochs})"
        return f"training ({epochs} epochs x {self.config.train.steps_per_epoch or 'one pass of'} steps)"


# ----------------------------------------------------------------------------------------------
# naming


def run_unit(nnunet: NNUNetSystem | None) -> str:
    """What tells a system's runs apart: ``seed``, or ``repeat`` for an nnU-Net trainer (nnU-Net sets no seed)."""
    return "seed" if nnunet is None else "repeat"


def preset_prefix(task_name: str) -> str:
    """The preset-name prefix of a task: its canonical id (``phantom-spleen`` -> ``phantom_spleen``)."""
    from beseg.data.presets import canonical_task

    return canonical_task(task_name)


def _check_prefix(prefix: str) -> str:
    """``prefix`` if some shipped Table 1 preset starts with it.

    Raises:
        ConfigError: no preset for that task, listing the known prefixes.
    """
    known = sorted({n[: -len(s) - 1] for n in list_presets() for s in TABLE1_SYSTEMS if n.endswith(f"_{s}")})
    if prefix not in known:
        raise ConfigError(f"no Table 1 presets for task {prefix!r}; known tasks: {', '.join(known)}.")
    return prefix


def resolve_system(name: str, prefix: str | None) -> SystemSpec:
    """A ``--systems`` entry -> the system name and its config.

    Args:
        name: a Table 1 row (``segresnet_be``), an alias (``dice``, ``dice_be``, ``be``,
            ``boundary``, ``focal``), a YAML config path (its ``system:`` names it), or an nnU-Net
            trainer ``nnunet:TRAINER[@CONFIGURATION]`` (named ``TRAINER``, ``TRAINER-2d``...).
        prefix: task preset prefix (``phantom_spleen``, ``task09``, ``task01``); None for a dataset
            without a beseg preset (only nnU-Net systems run on it).

    Returns:
        The :class:`SystemSpec`.

    Raises:
        ConfigError: unknown name, no such preset for this task, or an unreadable config file.
    """
    text = name.strip()
    nnunet = NNUNetSystem.parse(text)
    if nnunet is not None:
        _check_name(nnunet.name, f"--systems {text!r}")
        return SystemSpec(nnunet.name, resolve_system("segresnet_dice", prefix).config if prefix else "", nnunet)
    if prefix is None:
        raise ConfigError(f"system {text!r} needs one of beseg's task presets; this dataset has none, so only nnU-Net "
                          "systems (nnunet:TRAINER) can be compared on it.")
    path = Path(text)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        config, _ = load_config(path)
        _check_name(config.system, f"{path}: system")
        return SystemSpec(config.system, str(path))
    canonical = ALIASES.get(text.lower(), text.lower())
    if canonical not in TABLE1_SYSTEMS:
        choices = ", ".join([*TABLE1_SYSTEMS, *ALIASES])
        raise ConfigError(f"unknown system {text!r}; choose from {choices}, nnunet:TRAINER[@CONFIGURATION], or give "
                          "a YAML config file.")
    preset = f"{prefix}_{canonical}"
    if preset not in list_presets():
        raise ConfigError(f"no preset {preset!r} for system {text!r}; `beseg configs` lists the presets.")
    return SystemSpec(canonical, preset)


def _check_name(name: str, where: str) -> None:
    """Refuse a system name that cannot be a folder of the results folder (:func:`~beseg.experiment.layout.system_name_problem`).

    Raises:
        ConfigError: ``<where> <name>: <why>`` (``where`` names the config file or the ``--systems`` entry).
    """
    problem = system_name_problem(name)
    if problem:
        raise ConfigError(f"{where} {name!r}: {problem}.")


# ----------------------------------------------------------------------------------------------
# planning


def _comparable(config: dict[str, Any]) -> dict[str, Any]:
    """A config dict without the runtime-only settings (which may change between sessions)."""
    return {section: {k: v for k, v in values.items() if (section, k) not in RUNTIME_KEYS}
            if isinstance(values, dict) else values for section, values in config.items()}


def _differences(saved: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    out = []
    for section in sorted(set(saved) | set(wanted)):
        a, b = saved.get(section), wanted.get(section)
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b)):
                if a.get(key) != b.get(key):
                    out.append(f"{section}.{key}: {a.get(key)!r} in the run, {b.get(key)!r} now")
        elif a != b:
            out.append(f"{section}: {a!r} in the run, {b!r} now")
    return out


def run_state(run_dir: Path, config: Config) -> tuple[State, int]:
    """How far the run folder got, checking it was made with the same config.

    Raises:
        ConfigError: the folder holds a run of a different config.
    """
    run = RunDir(run_dir)
    if not run.last.is_file():
        return "fresh", 0
    ckpt = load_checkpoint(run.last)
    diffs = _differences(_comparable(ckpt["config"]), _comparable(config_to_dict(config)))
    if diffs:
        raise ConfigError(
            f"{run_dir} holds a run with different settings ({'; '.join(diffs[:4])}); give another --out, "
            "delete that run folder, or repeat the original settings."
        )
    epoch = int(ckpt["epoch"])
    if epoch < config.train.epochs:
        return "resume", epoch
    return ("done" if (run.eval / "summary.json").is_file() else "evaluate"), epoch


def check_protocol(protocol: str, folds: int | None) -> str:
    """The effective protocol: ``heldout``, ``paper`` or ``cv`` (``heldout`` with folds).

    Raises:
        ConfigError: unknown protocol, fewer than 2 folds, or folds with the paper protocol.
    """
    if protocol not in PROTOCOLS:
        raise ConfigError(f"--protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}.")
    if folds is None:
        return protocol
    if isinstance(folds, bool) or not isinstance(folds, int) or folds < 2:
        raise ConfigError(f"--folds must be at least 2 (k-fold cross-validation), got {folds!r}.")
    if protocol == "paper":
        raise ConfigError("--folds tests every case on the fold model that did not train on it; the paper protocol "
                          "has no test cases. Use --folds with --protocol heldout (the default).")
    return "cv"


def plan_runs(systems: Sequence[SystemSpec], seeds: Sequence[int], results_dir: str | Path,
              overrides: Sequence[str] = (), protocol: str = "heldout", folds: int | None = None,
              task_id: str | None = None) -> list[PlannedRun]:
    """Resolve every (system, seed[, fold]) config and find how far each run already got.

    Args:
        systems: from :func:`resolve_system`.
        seeds: training seeds.
        results_dir: the results folder.
        overrides: ``KEY=VALUE`` overrides for every run (not ``train.seed``/``data.split_file``,
            which compare sets; under the paper protocol not ``data.val_frac``/``data.test_frac``
            either); an nnU-Net run takes only the ``data.`` ones (its trainer sets the rest).
        protocol: ``heldout`` or ``paper``.
        folds: K for k-fold cross-validation (with ``heldout``).
        task_id: the dataset's task id, for nnU-Net systems on a dataset without a beseg preset.

    Returns:
        The runs, system by system, seed by seed (fold by fold).

    Raises:
        ConfigError: a bad override, protocol or fold count, two systems with one name, a pinned
            key overridden, or a run folder holding a run with different settings.
    """
    results_dir = Path(results_dir).resolve()
    layout = ResultsLayout(results_dir)
    protocol = check_protocol(protocol, folds)
    pinned = _PINNED_KEYS + (_PAPER_KEYS if protocol == "paper" else ())
    for item in overrides:
        if item.partition("=")[0].strip() in pinned:
            raise ConfigError(f"override {item!r}: compare sets {', '.join(pinned)} itself"
                              + (" (the paper's 80/20 split)" if protocol == "paper" else " (use --seeds)") + ".")
    names = [s.name for s in systems]
    for spec in systems:
        _check_name(spec.name, f"{spec.config}: system" if spec.config and spec.nnunet is None else "system")
    if len(set(names)) != len(names):
        raise ConfigError(f"systems must have distinct names, got {', '.join(names)}.")
    extra = [f"data.val_frac={PAPER_VAL_FRAC}", "data.test_frac=0"] if protocol == "paper" else []
    planned = []
    for spec in systems:
        mine = overrides if spec.nnunet is None else [o for o in overrides if o.strip().startswith("data.")]
        for seed in seeds:
            for fold, split_file in layout.split_files(folds).items():
                pins = [*mine, *extra, f"train.seed={seed}", f"data.split_file={split_file}"]
                if spec.config:
                    config, _ = load_config(spec.config, pins)
                else:  # an nnU-Net system on a dataset without a preset: only the data settings exist
                    raw = {"data": {"task": task_id}, "model": {"network": "segresnet"}, "loss": {"name": "dice"}}
                    config = config_from_dict(merge_config(raw, parse_overrides(pins)), known_task=False)
                config.system = spec.name
                run_dir = layout.run_dir(spec.name, seed, fold, run_unit(spec.nnunet))
                run = PlannedRun(spec.name, seed, run_dir, config, "fresh", 0, fold, spec.nnunet)
                run.state, run.epoch = run.current_state()
                planned.append(run)
    return planned




# ----------------------------------------------------------------------------------------------
# plan.json

PLAN_VERSION = 1


def write_plan_json(results_dir: str | Path, runs: Sequence[PlannedRun], protocol: str, folds: int | None,
                    dataset: DatasetIdentity, states: dict[str, str] | None = None,
                    nnunet: dict[str, Any] | None = None, primary: dict[str, Any] | None = None,
                    cost: dict[str, Any] | None = None) -> Path:
    """Write ``RESULTS/plan.json`` atomically: every run, its config and its state.

    Paths inside are relative to the results folder (``run_dir``, the config's ``data.split_file``),
    so the plan stays valid when the folder moves; ``data`` is the dataset's identity (its folder, absolute).

    Args:
        results_dir: the results folder.
        runs: the planned runs.
        protocol: ``heldout``, ``cv`` or ``paper``.
        folds: K in cross-validation.
        dataset: the identity of the task the runs train on (:attr:`beseg.data.MSDTask.identity`); workers on
            other hosts load the task from it, checked (:func:`planned_task`).
        states: ``{run id: state}`` to record (default: ``done`` for finished runs, else ``pending``).
        nnunet: the nnU-Net environment of the nnU-Net runs: ``{"python", "version"}``.
        primary: the primary comparison, declared before training (:mod:`beseg.experiment.primary`).
        cost: the cost plan (:mod:`beseg.experiment.cost`), kept under the key ``cost``.

    Returns:
        The path written.
    """
    layout = ResultsLayout(results_dir)
    entries = []
    for run in runs:
        config = config_to_dict(run.config)
        split_file = config["data"].get("split_file")
        if split_file:
            config["data"]["split_file"] = Path(split_file).name  # the results folder's own split file
        state = (states or {}).get(run.id) or ("done" if run.state == "done" else "pending")
        entry = {"id": run.id, "kind": run.kind, "system": run.system, "seed": run.seed, "fold": run.fold,
                 "run_dir": run.id, "state": state, "config": config}
        if run.nnunet is not None:
            entry["nnunet"] = run.nnunet.to_dict()
        entries.append(entry)
    text = json.dumps({"version": PLAN_VERSION, "protocol": protocol, "folds": folds, "data": dataset.to_dict(),
                       "runs": entries, **({"nnunet": dict(nnunet)} if nnunet else {}),
                       **({"primary": dict(primary)} if primary else {}), **({"cost": cost} if cost else {})},
                      indent=1)
    return atomic_write_text(layout.plan, text + "\n")


def read_plan_json(results_dir: str | Path) -> dict[str, Any]:
    """``plan.json`` of a results folder, each run's config resolved against the folder where it now is.

    Returns:
        The plan; each entry of ``runs`` gains ``path`` (its run folder) and ``resolved``
        (a :class:`~beseg.engine.config.Config` whose ``data.split_file`` is an absolute path), and the plan
        gains ``file`` (the ``plan.json`` read) and ``identity`` (the dataset's :class:`~beseg.data.DatasetIdentity`;
        ``None`` in a plan written before identities were recorded, whose ``data`` is the folder alone).

    Raises:
        ConfigError: no ``plan.json`` (the folder was not made by ``beseg compare``), or an unreadable one.
    """
    layout = ResultsLayout(Path(results_dir).resolve())
    try:
        plan = json.loads(layout.plan.read_text(encoding="utf-8"))
        plan["file"] = layout.plan
        plan["identity"] = None if isinstance(plan["data"], str) else DatasetIdentity.from_dict(plan["data"])
        for entry in plan["runs"]:
            _check_entry(layout, entry)
            entry["path"] = layout.root / entry["run_dir"]
            config = json.loads(json.dumps(entry["config"]))
            if config["data"].get("split_file"):
                config["data"]["split_file"] = str(layout.root / config["data"]["split_file"])
            entry["resolved"] = config_from_dict(config, known_task=entry.get("kind") != nnunet_runs.KIND)
    except FileNotFoundError:
        raise ConfigError(f"{layout.plan}: not found; is {layout.root} a `beseg compare` results folder?") from None
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"{layout.plan}: cannot read it ({err}); run the compare command again to rewrite it.") from None
    return plan


def planned_task(plan: dict[str, Any], log: Callable[[str], None] = print) -> MSDTask:
    """The dataset of a plan (:func:`read_plan_json`), loaded again by a process that was not handed it (a
    comparison's worker; ``beseg train`` under ``srun``), and refused unless it is the one planned.

    Args:
        plan: from :func:`read_plan_json`.
        log: where the note about a plan without an identity goes.

    Returns:
        The task.

    Raises:
        DatasetChangedError: ``dataset.json`` changed since planning: one line naming ``plan.json``, what
            changed (cases added or removed, the SHA-256 before and now) and what to do.
        DataError: the folder cannot be loaded as a task any more.
    """
    identity: DatasetIdentity | None = plan["identity"]
    if identity is None:  # written before plan.json recorded identities: the folder alone
        log(f"{plan['file']}: no identity of the dataset recorded (written by an older beseg); {plan['data']} is "
            "loaded unchecked. Run the compare command again to record it.")
        return load_task(plan["data"], check_files=False)
    try:
        return reload_task(identity)
    except DatasetChangedError as err:
        raise DatasetChangedError(
            f"{plan['file']}: the dataset changed since this comparison was planned ({err.change}); run the same beseg "
            "compare command again to plan it anew", err.change) from None


def _check_entry(layout: ResultsLayout, entry: dict[str, Any]) -> None:
    """Refuse a run whose folder or split file, as ``plan.json`` records them, would lie outside the results folder
    (``../x``, ``/abs``) or where the report does not look (``a/b/seed0``, ``report/seed0``).

    Raises:
        ConfigError: naming the file, the run and the value.
    """
    for key in ("id", "run_dir"):
        problem = run_id_problem(entry[key])
        if problem:
            raise ConfigError(f"{layout.plan}: run {entry['id']!r} has {key} {entry[key]!r}, which is not a run folder "
                              f"inside {layout.root} ({problem}); the file was edited or damaged: run the compare "
                              "command again to rewrite it.")
    split_file = entry["config"]["data"].get("split_file")
    if split_file and not SPLIT_FILE.fullmatch(str(split_file)):
        raise ConfigError(f"{layout.plan}: run {entry['id']!r} has data.split_file {split_file!r}, which is not the "
                          f"results folder's split.json or split_fold<f>.json; the file was edited or damaged: run the "
                          "compare command again to rewrite it.")

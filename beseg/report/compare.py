"""``beseg compare``: train and evaluate every system with every seed on one split, then report.

Layout written (what :func:`beseg.report.write_report` reads)::

    RESULTS_DIR/split.json                 the one train/val split every run uses (pinned here so
                                           the comparison does not depend on a shared cache folder)
    RESULTS_DIR/<system>/seed<k>/          a run folder (see :mod:`beseg.engine.rundir`) trained
                                           with ``train.seed=k`` and evaluated into ``eval/``
    RESULTS_DIR/report/                    report.md, report.html, figures/

Resuming: a run is *finished* when ``eval/summary.json`` exists and ``checkpoints/last.pt`` holds
the config's last epoch; finished runs are skipped. A run with a checkpoint but fewer epochs is
resumed with ``train(..., resume=True)``; a trained but unevaluated run is only evaluated; a run
folder without a checkpoint is trained from scratch. A run whose saved config differs from the
requested one is an error (never silently reused or overwritten).
"""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from beseg.data import get_preset, load_task, preset_for_task, require_valid_task
from beseg.engine.checkpoint import load_checkpoint
from beseg.engine.config import Config, config_to_dict, list_presets, load_config
from beseg.engine.evaluate import evaluate
from beseg.engine.rundir import RunDir
from beseg.engine.trainer import train
from beseg.errors import ConfigError, DataError, ReportError
from beseg.report import write_report

__all__ = [
    "TABLE1_SYSTEMS", "ALIASES", "SystemSpec", "PlannedRun", "CompareResult",
    "preset_prefix", "resolve_system", "plan_runs", "run_compare",
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
#: Overrides that compare sets itself for every run.
_PINNED_KEYS = ("train.seed", "data.split_file")
#: Settings that change how a run executes, not what it computes; they may differ on resume.
_RUNTIME_KEYS = {
    ("data", "num_workers"), ("data", "cache"), ("data", "cache_dir"), ("train", "threads"),
    ("train", "device"), ("train", "checkpoint_every"),
}

State = Literal["done", "evaluate", "resume", "fresh"]


@dataclass(frozen=True)
class SystemSpec:
    """A system to compare: the name its results are filed under, and the config it comes from.

    Attributes:
        name: system name (``segresnet_be``...), the ``RESULTS_DIR/<name>/`` folder.
        config: shipped preset name (``phantom_spleen_segresnet_be``) or a YAML file path.
    """

    name: str
    config: str


@dataclass
class PlannedRun:
    """One (system, seed) run and what compare has to do for it.

    Attributes:
        system: the system name.
        seed: the training seed (``train.seed``).
        run_dir: ``RESULTS_DIR/<system>/seed<seed>``.
        config: the resolved config for this run.
        state: ``done`` (skip), ``evaluate`` (trained, not evaluated), ``resume`` (continue
            training from the last checkpoint) or ``fresh``.
        epoch: epochs already in the last checkpoint (0 when fresh).
    """

    system: str
    seed: int
    run_dir: Path
    config: Config
    state: State
    epoch: int = 0

    def describe(self) -> str:
        """What will happen, for the progress line."""
        epochs = self.config.train.epochs
        if self.state == "done":
            return f"finished ({epochs} epochs, evaluated); skipped"
        if self.state == "evaluate":
            return f"trained ({epochs} epochs); evaluating"
        if self.state == "resume":
            return f"training (resumes at epoch {self.epoch + 1} of {epochs})"
        return f"training ({epochs} epochs x {self.config.train.steps_per_epoch or 'one pass of'} steps)"


@dataclass
class CompareResult:
    """What :func:`run_compare` did.

    Attributes:
        results_dir: the results folder.
        runs: every planned run, with the state it was found in.
        report: the written ``report.html`` (None when the report was not requested).
        seconds: wall time of the whole comparison.
    """

    results_dir: Path
    runs: list[PlannedRun] = field(default_factory=list)
    report: Path | None = None
    seconds: float = 0.0


# ----------------------------------------------------------------------------------------------
# naming


def preset_prefix(task_name: str) -> str:
    """The preset-name prefix of a task preset: ``phantom-spleen`` -> ``phantom_spleen``."""
    return task_name.lower().replace("-", "_")


def _check_prefix(prefix: str) -> str:
    """``prefix`` if some shipped Table 1 preset starts with it.

    Raises:
        ConfigError: no preset for that task, listing the known prefixes.
    """
    known = sorted({n[: -len(s) - 1] for n in list_presets() for s in TABLE1_SYSTEMS if n.endswith(f"_{s}")})
    if prefix not in known:
        raise ConfigError(f"no Table 1 presets for task {prefix!r}; known tasks: {', '.join(known)}.")
    return prefix


def resolve_system(name: str, prefix: str) -> SystemSpec:
    """A ``--systems`` entry -> the system name and its config.

    Args:
        name: a Table 1 row (``segresnet_be``), an alias (``dice``, ``dice_be``, ``be``,
            ``boundary``, ``focal``) or a YAML config path (its ``system:`` names it).
        prefix: task preset prefix (``phantom_spleen``, ``task09``, ``task01``).

    Returns:
        The :class:`SystemSpec`.

    Raises:
        ConfigError: unknown name, no such preset for this task, or an unreadable config file.
    """
    text = name.strip()
    path = Path(text)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        config, _ = load_config(path)
        return SystemSpec(config.system, str(path))
    canonical = ALIASES.get(text.lower(), text.lower())
    if canonical not in TABLE1_SYSTEMS:
        choices = ", ".join([*TABLE1_SYSTEMS, *ALIASES])
        raise ConfigError(f"unknown system {text!r}; choose from {choices}, or give a YAML config file.")
    preset = f"{prefix}_{canonical}"
    if preset not in list_presets():
        raise ConfigError(f"no preset {preset!r} for system {text!r}; `beseg configs` lists the presets.")
    return SystemSpec(canonical, preset)


# ----------------------------------------------------------------------------------------------
# planning


def _comparable(config: dict[str, Any]) -> dict[str, Any]:
    """A config dict without the runtime-only settings (which may change between sessions)."""
    return {section: {k: v for k, v in values.items() if (section, k) not in _RUNTIME_KEYS}
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


def _run_state(run_dir: Path, config: Config) -> tuple[State, int]:
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


def plan_runs(systems: Sequence[SystemSpec], seeds: Sequence[int], results_dir: str | Path,
              overrides: Sequence[str] = ()) -> list[PlannedRun]:
    """Resolve every (system, seed) config and find how far each run already got.

    Args:
        systems: from :func:`resolve_system`.
        seeds: training seeds.
        results_dir: the results folder.
        overrides: ``KEY=VALUE`` overrides for every run (not ``train.seed``/``data.split_file``,
            which compare sets).

    Returns:
        The runs, system by system, seed by seed.

    Raises:
        ConfigError: a bad override, two systems with one name, a pinned key overridden, or a run
            folder holding a run with different settings.
    """
    results_dir = Path(results_dir).resolve()
    for item in overrides:
        if item.partition("=")[0].strip() in _PINNED_KEYS:
            raise ConfigError(f"override {item!r}: compare sets {' and '.join(_PINNED_KEYS)} itself (use --seeds).")
    names = [s.name for s in systems]
    if len(set(names)) != len(names):
        raise ConfigError(f"systems must have distinct names, got {', '.join(names)}.")
    split_file = results_dir / "split.json"
    planned = []
    for spec in systems:
        for seed in seeds:
            config, _ = load_config(spec.config, [*overrides, f"train.seed={seed}", f"data.split_file={split_file}"])
            config.system = spec.name
            run_dir = results_dir / spec.name / f"seed{seed}"
            state, epoch = _run_state(run_dir, config)
            planned.append(PlannedRun(spec.name, seed, run_dir, config, state, epoch))
    return planned


# ----------------------------------------------------------------------------------------------
# running


def _check_data(data_dir: Path, task_names: set[str]) -> None:
    """Fail before any training when the folder is unusable or is not the configs' task.

    Raises:
        DataError: listing every problem in the folder, or naming the mismatched task.
    """
    require_valid_task(data_dir)
    task = load_task(data_dir, check_files=False)
    for name in sorted(task_names):
        get_preset(name).validate(task)


def _val_cases(run_dir: Path) -> list[str]:
    """The cases a run was evaluated on: scored ones from ``per_case.csv`` and failed ones."""
    summary = json.loads((run_dir / "eval" / "summary.json").read_text())
    with open(run_dir / "eval" / "per_case.csv", newline="") as f:
        cases = {row["case"] for row in csv.DictReader(f)}
    return sorted(cases | {f["case"] for f in summary.get("failed", [])})


def _check_same_cases(runs: Sequence[PlannedRun]) -> None:
    """Every run must have been scored on the same validation cases, or the table is not paired.

    Raises:
        ReportError: naming the first run whose cases differ.
    """
    reference: tuple[PlannedRun, list[str]] | None = None
    for run in runs:
        cases = sorted(_val_cases(run.run_dir))
        if reference is None:
            reference = (run, cases)
        elif cases != reference[1]:
            first = reference[0]
            raise ReportError(
                f"{run.system}/seed{run.seed} was evaluated on cases {cases}, but {first.system}/seed{first.seed} "
                f"on {reference[1]}; the runs did not use the same split, so they cannot be compared."
            )


def run_compare(data_dir: str | Path, systems: Sequence[str], seeds: int | Sequence[int], results_dir: str | Path,
                overrides: Sequence[str] = (), prefix: str | None = None, progress: bool = True,
                report: bool = True, log: Callable[[str], None] = print) -> CompareResult:
    """Train and evaluate every system with every seed on the same split, then write the report.

    Runs already finished in ``results_dir`` are skipped and interrupted ones resumed, so running
    the same command again after an interruption continues where it stopped.

    Args:
        data_dir: MSD-layout task folder.
        systems: ``--systems`` entries (see :func:`resolve_system`).
        seeds: number of seeds (``0..n-1``) or the seeds themselves.
        results_dir: where the run folders and the report go.
        overrides: ``KEY=VALUE`` config overrides applied to every run.
        prefix: preset prefix (``phantom_spleen``, ``task09``, ``task01``); default from the dataset.
        progress: show the trainer's and evaluator's progress bars.
        report: write ``results_dir/report/`` at the end.
        log: receives one line per run and per stage.

    Returns:
        A :class:`CompareResult`.

    Raises:
        ConfigError: unknown system, bad override, or a run folder made with other settings.
        DataError: the dataset folder is missing, broken, or not the configs' task.
        ReportError: the runs did not use the same validation cases.
    """
    start = time.perf_counter()
    data_dir = Path(data_dir)
    if not (data_dir / "dataset.json").is_file():
        raise DataError(f"{data_dir}: no dataset.json; --data must be an MSD task folder (see `beseg data check`).")
    if prefix is None:
        prefix = preset_prefix(preset_for_task(load_task(data_dir, check_files=False)).name)
    prefix = _check_prefix(prefix)
    seed_list = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    if not seed_list or any(s < 0 for s in seed_list):
        raise ConfigError(f"--seeds must be at least 1, got {seeds}.")
    if not systems:
        raise ConfigError("give at least one system in --systems.")
    specs = [resolve_system(s, prefix) for s in systems]
    results_dir = Path(results_dir)
    planned = plan_runs(specs, seed_list, results_dir, overrides)
    _check_data(data_dir, {p.config.data.task.lower() for p in planned})
    results_dir.mkdir(parents=True, exist_ok=True)
    _write_plan(results_dir, data_dir, specs, seed_list, overrides)

    result = CompareResult(results_dir, planned)
    todo = sum(p.state != "done" for p in planned)
    log(f"compare: {len(specs)} system(s) x {len(seed_list)} seed(s) on {data_dir} -> {results_dir} "
        f"({len(planned) - todo} finished already, {todo} to run)")
    for i, run in enumerate(planned, start=1):
        log(f"[{i}/{len(planned)}] {run.system} seed {run.seed}: {run.describe()}")
        if run.state == "done":
            continue
        tick = time.perf_counter()
        if run.state == "fresh":
            train(run.config, data_dir, run.run_dir, progress=progress)
        elif run.state == "resume":
            train(None, data_dir, run.run_dir, resume=True, progress=progress)
        evaluated = evaluate(run.run_dir, data_dir, split="val", progress=progress)
        summary = evaluated.summary
        for case, reason in evaluated.failed:
            log(f"warning: {run.system} seed {run.seed}: case {case} could not be evaluated: {reason}")
        dice = summary["mean"].get("dice")
        log(f"[{i}/{len(planned)}] {run.system} seed {run.seed}: done in {time.perf_counter() - tick:.0f} s, "
            f"validation Dice {dice:.4f} over {summary['cases']} case(s)" if dice is not None else
            f"[{i}/{len(planned)}] {run.system} seed {run.seed}: done, no case could be scored")
    _check_same_cases(planned)
    if report:
        names = [s.name for s in specs]
        baseline = "segresnet_dice" if "segresnet_dice" in names else names[0]
        be_system = "segresnet_be" if "segresnet_be" in names else names[-1]
        log("writing the report...")
        result.report = write_report(results_dir, data_dir, baseline=baseline, be_system=be_system)
    result.seconds = time.perf_counter() - start
    return result


def _write_plan(results_dir: Path, data_dir: Path, specs: Sequence[SystemSpec], seeds: Sequence[int],
                overrides: Sequence[str]) -> None:
    """Record what was asked, so a results folder says how to reproduce it."""
    plan = {
        "data": str(data_dir.resolve()), "systems": {s.name: s.config for s in specs}, "seeds": list(seeds),
        "overrides": list(overrides),
    }
    (results_dir / "compare.yaml").write_text(yaml.safe_dump(plan, sort_keys=False))

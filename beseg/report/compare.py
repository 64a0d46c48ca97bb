"""``beseg compare``: train and evaluate every system with every seed on one split, then report.

Protocols (``protocol=``, ``--protocol``; ``--folds K`` for cross-validation):

* ``heldout`` (default): one train/val/test split (the runs' ``data.val_frac`` and
  ``data.test_frac``, default 10 % and 20 % of the cases). Training validates on ``val`` and
  keeps the best epoch as ``best.pt``; every reported number is on ``test``, which no training
  or selection decision saw.
* ``cv`` (``folds=K``, K >= 2): K splits; fold ``f``'s test set is the ``f``-th of K disjoint
  parts and the rest is split into train/val for ``best.pt``. Every case gets exactly one
  out-of-fold prediction; the K folds of one (system, seed) are merged into one evaluation that
  the report reads as one run. For small tasks, as nnU-Net reports its 5-fold results.
* ``paper``: the paper's two-way split (80/20: Task09 32/9, Task01 388/96), ``best.pt`` chosen
  by validation Dice on the same validation cases that are then reported. Optimistic: the
  selection saw the reported cases, by different amounts per system. Kept to compare with the
  paper's Table 1.

Layout written (what :func:`beseg.report.write_report` reads)::

    RESULTS_DIR/compare.yaml               what was asked: data, systems, seeds, overrides, protocol, folds
    RESULTS_DIR/split.json                 heldout/paper: the one split every run uses (pinned here so
                                           the comparison does not depend on a shared cache folder)
    RESULTS_DIR/split_fold<f>.json         cv: fold f's split
    RESULTS_DIR/<system>/seed<k>/          heldout/paper: a run folder (see :mod:`beseg.engine.rundir`)
                                           trained with ``train.seed=k`` and evaluated into ``eval/``
    RESULTS_DIR/<system>/seed<k>/fold<f>/  cv: fold f's run folder, evaluated on its test cases
    RESULTS_DIR/<system>/seed<k>/eval/     cv: the K folds' per-case rows and predictions merged
                                           (``split: "oof"``); ``config.yaml`` and ``metrics.jsonl``
                                           beside it are fold 0's, for the report's cost and curves
    RESULTS_DIR/report/                    report.md, report.html, figures/

Every ``eval/summary.json`` says how its numbers were made: ``protocol``, ``split`` (``test``,
``val`` or ``oof``), ``folds``, ``selection`` and the ``case_ids`` scored.

Resuming: a run is *finished* when ``eval/summary.json`` exists and ``checkpoints/last.pt`` holds
the config's last epoch; finished runs are skipped. A run with a checkpoint but fewer epochs is
resumed with ``train(..., resume=True)``; a trained but unevaluated run is only evaluated; a run
folder without a checkpoint is trained from scratch. In cross-validation each fold is such a run,
and the merge is redone when a fold was (re)evaluated or the merged files are missing. A run
whose saved config differs from the requested one is an error (never silently reused or
overwritten), and so is a results folder made with another protocol or split.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from beseg.data import (
    Split, get_preset, load_split, load_task, make_folds, make_split, preset_for_task, require_valid_task, save_split,
)
from beseg.engine.checkpoint import load_checkpoint
from beseg.engine.config import Config, config_to_dict, list_presets, load_config
from beseg.engine.evaluate import evaluate
from beseg.engine.rundir import RunDir
from beseg.engine.trainer import train
from beseg.errors import ConfigError, DataError, ReportError
from beseg.fileio import atomic_output, atomic_write_text
from beseg.metrics import BRATS_DISTANCE_PENALTY_MM
from beseg.report import write_report
from beseg.score import summarize, write_scores

__all__ = [
    "TABLE1_SYSTEMS", "ALIASES", "PROTOCOLS", "PAPER_VAL_FRAC", "SystemSpec", "PlannedRun", "CompareResult",
    "preset_prefix", "resolve_system", "plan_runs", "prepare_splits", "merge_folds", "run_compare",
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
PROTOCOLS: tuple[str, ...] = ("heldout", "paper")
#: The paper's validation share: 80/20 (Task09 32/9 and Task01 388/96 through the presets' paper sizes).
PAPER_VAL_FRAC = 0.2
#: Overrides that compare sets itself for every run.
_PINNED_KEYS = ("train.seed", "data.split_file")
#: ... and, under the paper protocol, the two-way split's shares.
_PAPER_KEYS = ("data.val_frac", "data.test_frac")
#: Settings that change how a run executes, not what it computes; they may differ on resume.
_RUNTIME_KEYS = {
    ("data", "num_workers"), ("data", "cache"), ("data", "cache_dir"), ("train", "threads"),
    ("train", "device"), ("train", "checkpoint_every"), ("train", "dist_timeout_s"),
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
    """

    system: str
    seed: int
    run_dir: Path
    config: Config
    state: State
    epoch: int = 0
    fold: int | None = None

    @property
    def name(self) -> str:
        """``segresnet_be seed 0`` (``... fold 2``), for progress lines."""
        return f"{self.system} seed {self.seed}" + (f" fold {self.fold}" if self.fold is not None else "")

    @property
    def result_dir(self) -> Path:
        """The folder the report reads this run's scores from: the run, or its seed folder in cross-validation."""
        return self.run_dir.parent if self.fold is not None else self.run_dir

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
        protocol: ``heldout``, ``cv`` or ``paper``.
        folds: K in cross-validation, else ``None``.
    """

    results_dir: Path
    runs: list[PlannedRun] = field(default_factory=list)
    report: Path | None = None
    seconds: float = 0.0
    protocol: str = "heldout"
    folds: int | None = None


# ----------------------------------------------------------------------------------------------
# naming


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


def _split_files(results_dir: Path, folds: int | None) -> dict[int | None, Path]:
    """Where the comparison's split(s) live: ``{None: split.json}`` or ``{f: split_fold<f>.json}``."""
    if folds is None:
        return {None: results_dir / "split.json"}
    return {f: results_dir / f"split_fold{f}.json" for f in range(folds)}


def _check_protocol(protocol: str, folds: int | None) -> str:
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
              overrides: Sequence[str] = (), protocol: str = "heldout", folds: int | None = None) -> list[PlannedRun]:
    """Resolve every (system, seed[, fold]) config and find how far each run already got.

    Args:
        systems: from :func:`resolve_system`.
        seeds: training seeds.
        results_dir: the results folder.
        overrides: ``KEY=VALUE`` overrides for every run (not ``train.seed``/``data.split_file``,
            which compare sets; under the paper protocol not ``data.val_frac``/``data.test_frac``
            either).
        protocol: ``heldout`` or ``paper``.
        folds: K for k-fold cross-validation (with ``heldout``).

    Returns:
        The runs, system by system, seed by seed (fold by fold).

    Raises:
        ConfigError: a bad override, protocol or fold count, two systems with one name, a pinned
            key overridden, or a run folder holding a run with different settings.
    """
    results_dir = Path(results_dir).resolve()
    protocol = _check_protocol(protocol, folds)
    pinned = _PINNED_KEYS + (_PAPER_KEYS if protocol == "paper" else ())
    for item in overrides:
        if item.partition("=")[0].strip() in pinned:
            raise ConfigError(f"override {item!r}: compare sets {', '.join(pinned)} itself"
                              + (" (the paper's 80/20 split)" if protocol == "paper" else " (use --seeds)") + ".")
    names = [s.name for s in systems]
    if len(set(names)) != len(names):
        raise ConfigError(f"systems must have distinct names, got {', '.join(names)}.")
    extra = [f"data.val_frac={PAPER_VAL_FRAC}", "data.test_frac=0"] if protocol == "paper" else []
    planned = []
    for spec in systems:
        for seed in seeds:
            for fold, split_file in _split_files(results_dir, folds).items():
                config, _ = load_config(spec.config, [*overrides, *extra, f"train.seed={seed}",
                                                      f"data.split_file={split_file}"])
                config.system = spec.name
                run_dir = results_dir / spec.name / f"seed{seed}"
                if fold is not None:
                    run_dir = run_dir / f"fold{fold}"
                state, epoch = _run_state(run_dir, config)
                planned.append(PlannedRun(spec.name, seed, run_dir, config, state, epoch, fold))
    return planned


# ----------------------------------------------------------------------------------------------
# splits


def _new_split(protocol: str, ids: list[str], config: Config) -> Split:
    data = config.data
    if protocol == "paper":
        n_val = get_preset(data.task).default_val_count(len(ids), PAPER_VAL_FRAC)
        return make_split(ids, val_frac=PAPER_VAL_FRAC, test_frac=0.0, n_val=n_val, seed=data.split_seed)
    return make_split(ids, val_frac=data.val_frac, test_frac=data.test_frac, seed=data.split_seed)


def prepare_splits(results_dir: str | Path, data_dir: str | Path, protocol: str, folds: int | None,
                   config: Config) -> dict[int | None, Split]:
    """Make the comparison's split file(s) in ``results_dir`` before any run trains, or check existing ones.

    Args:
        results_dir: the results folder.
        data_dir: the task folder (its case ids).
        protocol: ``heldout``, ``paper`` or ``cv``.
        folds: K for ``cv``.
        config: a run's config; its ``data.val_frac``, ``data.test_frac`` and ``data.split_seed``
            size a new split (the paper protocol uses the paper's 80/20 instead).

    Returns:
        ``{None: split}``, or ``{f: fold f's split}`` for ``cv``.

    Raises:
        DataError: an existing split file is invalid, names unknown cases, or belongs to another
            protocol (e.g. a two-way split from before held-out test sets under ``heldout``).
        ValueError: the task has too few cases for the requested split.
    """
    results_dir = Path(results_dir)
    ids = [c.id for c in load_task(data_dir, check_files=False).training]
    paths = _split_files(results_dir, folds)

    def fresh(key: int | None) -> Split:
        if protocol == "cv":  # deterministic: a lost fold file is made again exactly as it was
            return make_folds(ids, folds, seed=config.data.split_seed, val_frac=config.data.val_frac)[key]
        return _new_split(protocol, ids, config)

    out: dict[int | None, Split] = {}
    for key, path in paths.items():
        if not path.exists():
            split = fresh(key)
            save_split(split, path)
            out[key] = split
            continue
        split = load_split(path, known_ids=ids)
        if split.protocol != protocol:
            hint = {
                "paper": "a two-way train/val split (the paper's protocol, or a file from before held-out test "
                         "sets): its validation cases chose best.pt, so they cannot be a held-out test set",
                "heldout": "a train/val/test split (a held-out comparison)",
                "cv": f"fold {split.fold} of a {split.folds}-fold cross-validation",
            }[split.protocol]
            raise DataError(f"{path} is {hint}, but this comparison asks for protocol {protocol!r}. Use another --out, "
                            f"or repeat the protocol this folder was made with.")
        if protocol == "cv" and (split.folds != folds or split.fold != key):
            raise DataError(f"{path} is fold {split.fold} of {split.folds}, but this comparison asks for fold {key} "
                            f"of {folds}. Use another --out, or repeat --folds {split.folds}.")
        out[key] = split
    if protocol == "cv":
        tested = sorted(c for split in out.values() for c in split.test)
        if tested != sorted(ids):
            raise DataError(f"{results_dir}: the fold files do not test every case exactly once "
                            f"({len(tested)} test entries for {len(ids)} cases); use another --out.")
    return out


# ----------------------------------------------------------------------------------------------
# running


def _check_data(data_dir: Path, task_names: set[str], cache_dir: str | None = None) -> None:
    """Fail before any training when the folder is unusable or is not the configs' task (the pass is
    remembered in the runs' ``data.cache_dir``, where their training looks for it).

    Raises:
        DataError: listing every problem in the folder, or naming the mismatched task.
    """
    require_valid_task(data_dir, cache_dir)
    task = load_task(data_dir, check_files=False)
    for name in sorted(task_names):
        get_preset(name).validate(task)


def _eval_cases(result_dir: Path) -> list[str]:
    """The cases a run was evaluated on: scored ones from ``per_case.csv`` and failed ones."""
    summary = json.loads((result_dir / "eval" / "summary.json").read_text())
    with open(result_dir / "eval" / "per_case.csv", newline="") as f:
        cases = {row["case"] for row in csv.DictReader(f)}
    return sorted(cases | {f["case"] for f in summary.get("failed", [])})


def _check_same_cases(runs: Sequence[PlannedRun], expected: Sequence[str], part: str) -> None:
    """Every run must have been scored on exactly the ``expected`` cases, or the table is not paired
    (or not the protocol it claims: held-out numbers from test cases only).

    Args:
        runs: the planned runs (in cross-validation, the merged seed folders are checked).
        expected: the case ids the protocol scores.
        part: their name, for the message (``test``, ``validation``, ``out-of-fold``).

    Raises:
        ReportError: naming the first run whose cases differ.
    """
    want = sorted(expected)
    for folder, label in dict((r.result_dir, f"{r.system}/seed{r.seed}") for r in runs).items():
        cases = _eval_cases(folder)
        if cases != want:
            raise ReportError(
                f"{label} was evaluated on cases {cases}, but the comparison's {part} cases are {want}; the runs did "
                "not use the comparison's split, so they cannot be compared."
            )


def _read_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """``per_case.csv`` -> (columns, rows), cells as written (no number is re-formatted)."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        return list(reader.fieldnames or []), rows


def _link_or_copy(src: Path, dst: Path) -> None:
    """Put ``src`` at ``dst`` atomically: a hard link (no copy of the data) where the file system allows it."""
    with atomic_output(dst, suffix=".nii.gz") as tmp:
        tmp.unlink()
        try:
            os.link(src, tmp)
        except OSError:  # another file system, or no hard links: copy
            shutil.copy2(src, tmp)


def merge_folds(seed_dir: str | Path, fold_dirs: Sequence[str | Path], expected: Sequence[str]) -> dict[str, Any]:
    """Merge the K fold evaluations of one (system, seed) into ``seed_dir/eval/``, as one run.

    Every case must have been tested by exactly one fold. The per-case rows and predictions are
    gathered unchanged (hard links where possible); ``summary.json`` is rebuilt from the merged rows
    by the same code as a single evaluation (:func:`beseg.score.summarize`), with
    ``protocol: "cv"``, ``split: "oof"``, ``folds: K`` and each fold's ``epoch``. Fold 0's
    ``config.yaml`` and ``metrics.jsonl`` are copied beside ``eval/`` so the report can show the
    system's settings, step cost and a learning curve (fold 0's).

    Args:
        seed_dir: ``RESULTS_DIR/<system>/seed<k>``.
        fold_dirs: the fold run folders, fold 0 first, each evaluated on its test cases.
        expected: every case id of the task.

    Returns:
        The merged summary.

    Raises:
        ReportError: a fold is not evaluated, two folds scored the same case, a case has no
            out-of-fold prediction, or the folds' CSV columns differ.
    """
    seed_dir, fold_dirs = Path(seed_dir), [Path(d) for d in fold_dirs]
    rows: list[dict[str, str]] = []
    failed: list[tuple[str, str]] = []
    columns: list[str] | None = None
    owner: dict[str, Path] = {}
    summaries = []
    for fold_dir in fold_dirs:
        try:
            summary = json.loads((fold_dir / "eval" / "summary.json").read_text(encoding="utf-8"))
            cols, fold_rows = _read_rows(fold_dir / "eval" / "per_case.csv")
        except (OSError, ValueError) as err:
            raise ReportError(f"{fold_dir}: cannot read its evaluation ({err}); rerun the comparison.") from None
        if columns is not None and cols != columns:
            raise ReportError(f"{fold_dir / 'eval' / 'per_case.csv'}: columns {cols} differ from fold 0's {columns}.")
        columns = cols
        for case in summary.get("case_ids") or sorted({r["case"] for r in fold_rows}):
            if case in owner:
                raise ReportError(f"case {case} was tested by {owner[case]} and by {fold_dir}; folds must not overlap.")
            owner[case] = fold_dir
        rows.extend(fold_rows)
        failed.extend((f["case"], f["reason"]) for f in summary.get("failed", []))
        summaries.append(summary)
    missing = sorted(set(expected) - set(owner))
    if missing:
        raise ReportError(f"{seed_dir}: no out-of-fold prediction for case(s) {', '.join(missing)}.")

    out_dir = seed_dir / "eval"
    for case, fold_dir in owner.items():
        src = fold_dir / "eval" / "predictions" / f"{case}.nii.gz"
        if src.is_file():
            _link_or_copy(src, out_dir / "predictions" / f"{case}.nii.gz")
    for name in ("config.yaml", "metrics.jsonl"):
        if (fold_dirs[0] / name).is_file():
            atomic_write_text(seed_dir / name, (fold_dirs[0] / name).read_text(encoding="utf-8"))
    first = summaries[0]
    # Summarised by the same code as one evaluation (beseg.score), so the report reads the merge as one run.
    merged = summarize(
        rows, first["classes"], failed, first.get("nsd_tolerance_mm", 1.0),
        first.get("distance_penalty_mm", BRATS_DISTANCE_PENALTY_MM),
        task=first["task"], system=first.get("system"), protocol="cv", split="oof", folds=len(fold_dirs), fold=None,
        selection=f"{first.get('selection', 'best.pt by val Dice')}, per fold", case_ids=sorted(owner),
        checkpoint=f"{seed_dir}/fold*/checkpoints (one model per fold)", epoch=[s.get("epoch") for s in summaries],
        fold_runs=[str(d) for d in fold_dirs], log="config.yaml and metrics.jsonl beside eval/ are fold 0's",
    )
    write_scores(out_dir, rows, merged)  # the summary last: it marks the merge as complete
    return merged


_EVAL_SPLIT = {"heldout": "test", "cv": "test", "paper": "val"}
_PART_NAME = {"heldout": "test", "cv": "out-of-fold", "paper": "validation"}


def _describe_protocol(protocol: str, splits: dict[int | None, Split]) -> str:
    if protocol == "cv":
        some = splits[0]
        n = len(some.train) + len(some.val) + len(some.test)
        return (f"protocol cv: {len(splits)}-fold cross-validation of {n} cases; in each fold best.pt is chosen on "
                f"{len(some.val)} validation case(s) and the ~{len(some.test)} test cases are scored; every case is "
                "scored once, by the fold model that neither trained on it nor chose with it")
    split = splits[None]
    if protocol == "paper":
        return (f"protocol paper: {len(split.train)} training / {len(split.val)} validation cases; best.pt is chosen "
                "on the validation cases that are then reported (the paper's protocol: optimistic)")
    return (f"protocol heldout: {len(split.train)} training / {len(split.val)} validation / {len(split.test)} test "
            "cases; best.pt is chosen on the validation cases, every reported number is on the test cases")


def run_compare(data_dir: str | Path, systems: Sequence[str], seeds: int | Sequence[int], results_dir: str | Path,
                overrides: Sequence[str] = (), prefix: str | None = None, progress: bool = True,
                report: bool = True, log: Callable[[str], None] = print, protocol: str = "heldout",
                folds: int | None = None) -> CompareResult:
    """Train and evaluate every system with every seed on the same split(s), then write the report.

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
        protocol: ``heldout`` (default: scored on held-out test cases) or ``paper`` (scored on
            the validation cases that chose ``best.pt``: optimistic); see the module docstring.
        folds: K >= 2 for k-fold cross-validation (out-of-fold scores of every case).

    Returns:
        A :class:`CompareResult`.

    Raises:
        ConfigError: unknown system, bad override, protocol or fold count, or a run folder made
            with other settings.
        DataError: the dataset folder is missing, broken, or not the configs' task, or the
            results folder's split belongs to another protocol.
        ReportError: the runs were not scored on the comparison's cases.
    """
    start = time.perf_counter()
    data_dir = Path(data_dir)
    if not (data_dir / "dataset.json").is_file():
        raise DataError(f"{data_dir}: no dataset.json; --data must be an MSD task folder (see `beseg data check`).")
    if prefix is None:
        prefix = preset_prefix(preset_for_task(load_task(data_dir, check_files=False)).name)
    prefix = _check_prefix(prefix)
    protocol = _check_protocol(protocol, folds)
    seed_list = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    if not seed_list or any(s < 0 for s in seed_list):
        raise ConfigError(f"--seeds must be at least 1, got {seeds}.")
    if not systems:
        raise ConfigError("give at least one system in --systems.")
    specs = [resolve_system(s, prefix) for s in systems]
    results_dir = Path(results_dir)
    _check_plan(results_dir, protocol, folds)
    planned = plan_runs(specs, seed_list, results_dir, overrides, "heldout" if protocol == "cv" else protocol, folds)
    _check_data(data_dir, {p.config.data.task.lower() for p in planned}, planned[0].config.data.cache_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    splits = prepare_splits(results_dir, data_dir, protocol, folds, planned[0].config)
    _write_plan(results_dir, data_dir, specs, seed_list, overrides, protocol, folds)

    result = CompareResult(results_dir, planned, protocol=protocol, folds=folds)
    todo = sum(p.state != "done" for p in planned)
    log(f"compare: {len(specs)} system(s) x {len(seed_list)} seed(s)" + (f" x {folds} folds" if folds else "")
        + f" on {data_dir} -> {results_dir} ({len(planned) - todo} finished already, {todo} to run)")
    log(_describe_protocol(protocol, splits))
    split_name, part = _EVAL_SPLIT[protocol], _PART_NAME[protocol]
    stale: set[Path] = set()  # seed folders whose merged evaluation must be (re)written
    for i, run in enumerate(planned, start=1):
        log(f"[{i}/{len(planned)}] {run.name}: {run.describe()}")
        if run.state == "done":
            continue
        stale.add(run.result_dir)
        tick = time.perf_counter()
        if run.state == "fresh":
            train(run.config, data_dir, run.run_dir, progress=progress)
        elif run.state == "resume":
            train(None, data_dir, run.run_dir, resume=True, progress=progress)
        evaluated = evaluate(run.run_dir, data_dir, split=split_name, progress=progress,
                             protocol=protocol)
        summary = evaluated.summary
        for case, reason in evaluated.failed:
            log(f"warning: {run.name}: case {case} could not be evaluated: {reason}")
        dice = summary["mean"].get("dice")
        log(f"[{i}/{len(planned)}] {run.name}: done in {time.perf_counter() - tick:.0f} s, "
            f"{'test' if split_name == 'test' else 'validation'} Dice {dice:.4f} over {summary['cases']} case(s)"
            if dice is not None else f"[{i}/{len(planned)}] {run.name}: done, no case could be scored")
    if protocol == "cv":
        all_ids = sorted(c for split in splits.values() for c in split.test)
        for seed_dir in dict.fromkeys(r.result_dir for r in planned):
            if seed_dir in stale or not (seed_dir / "eval" / "summary.json").is_file():
                merged = merge_folds(seed_dir, [seed_dir / f"fold{f}" for f in range(folds)], all_ids)
                dice = merged["mean"].get("dice")
                log(f"merged {folds} folds of {seed_dir.parent.name} seed {seed_dir.name[4:]}: out-of-fold Dice "
                    + (f"{dice:.4f}" if dice is not None else "n/a") + f" over {merged['cases']} case(s)")
        expected = all_ids
    else:
        expected = splits[None].cases(split_name)
    _check_same_cases(planned, expected, part)
    if report:
        names = [s.name for s in specs]
        baseline = "segresnet_dice" if "segresnet_dice" in names else names[0]
        be_system = "segresnet_be" if "segresnet_be" in names else names[-1]
        log("writing the report...")
        result.report = write_report(results_dir, data_dir, baseline=baseline, be_system=be_system)
    result.seconds = time.perf_counter() - start
    return result


def _check_plan(results_dir: Path, protocol: str, folds: int | None) -> None:
    """Refuse a results folder whose recorded protocol or fold count differs from this request.

    Raises:
        ConfigError: naming both protocols.
    """
    path = results_dir / "compare.yaml"
    if not path.is_file():
        return
    try:
        plan = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"{path}: cannot read it ({err}); give another --out.") from None
    if not isinstance(plan, dict) or "protocol" not in plan:
        return  # made before protocols were recorded: its split file decides (prepare_splits)
    if (plan.get("protocol"), plan.get("folds")) != (protocol, folds):
        was = f"protocol {plan.get('protocol')}" + (f" with {plan['folds']} folds" if plan.get("folds") else "")
        now = f"protocol {protocol}" + (f" with {folds} folds" if folds else "")
        raise ConfigError(f"{results_dir} holds a comparison made with {was}, not {now}; give another --out, or "
                          "repeat the original protocol.")


def _write_plan(results_dir: Path, data_dir: Path, specs: Sequence[SystemSpec], seeds: Sequence[int],
                overrides: Sequence[str], protocol: str, folds: int | None) -> None:
    """Record what was asked, so a results folder says how to reproduce it."""
    plan = {
        "data": str(data_dir.resolve()), "systems": {s.name: s.config for s in specs}, "seeds": list(seeds),
        "overrides": list(overrides), "protocol": protocol, "folds": folds,
    }
    atomic_write_text(results_dir / "compare.yaml", yaml.safe_dump(plan, sort_keys=False))

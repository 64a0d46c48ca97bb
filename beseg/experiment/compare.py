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

The dataset is loaded once. :func:`run_compare` takes the task (:class:`beseg.data.MSDTask`), or loads its
folder once, and hands that object to every step: the splits, the data check, the runs, the cost plan,
the nnU-Net preparation and the report. ``plan.json`` records its identity (folder, ``dataset.json``
SHA-256, case list); a worker process loads the folder again from it and stops its run when
``dataset.json`` has changed since planning (:mod:`beseg.experiment.worker`).

Plan, execute, collect. :func:`run_compare` checks the request and the data, pins the split(s)
in the results folder, plans every (system, seed[, fold]) run (:mod:`beseg.experiment.plan`,
written to ``RESULTS/plan.json``), has a launcher (:mod:`beseg.experiment.launch`,
:mod:`beseg.experiment.slurm`) execute the unfinished ones, each by
:func:`beseg.experiment.worker.execute_run`, waits for runs other processes hold, merges the folds
(:mod:`beseg.experiment.folds`) and writes the report (:func:`beseg.report.write_report`). The
folder's layout is :class:`beseg.experiment.layout.ResultsLayout`. ``dry_run`` (``--dry-run``) stops
after planning with the cost plan (:mod:`beseg.experiment.cost`) in ``plan.json``; ``--slurm-time
auto`` makes the same plan and takes each job's time limit from it.

Every ``eval/summary.json`` says how its numbers were made: ``protocol``, ``split`` (``test``,
``val`` or ``oof``), ``folds``, ``selection`` and the ``case_ids`` scored.

Resuming: a run is *finished* when ``eval/summary.json`` exists and ``checkpoints/last.pt`` holds
the config's last epoch; finished runs are skipped. A run with a checkpoint but fewer epochs is
resumed from ``last.pt``; a trained but unevaluated run is only evaluated; a run folder without a
checkpoint is trained from scratch. The state is decided again under the run's claim
(:mod:`beseg.engine.claim`), so two processes never train one run. In cross-validation each fold
is such a run, and the merge is redone whenever a fold's evaluation differs from the one the merge
was made of (:func:`beseg.experiment.folds.merge_is_current`) or the merged files are missing. A
run whose saved config differs from the requested one (runtime settings and the split
file's path aside) is an error (never silently reused or overwritten), and so is a results folder
made with another protocol or split. A run that fails is listed with its log; the others finish,
and the report waits until every run has.
"""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from beseg.data import (
    DatasetIdentity, MSDTask, Split, as_task, get_preset, load_split, make_folds, make_split, preset_for_task, require_valid_task,
    save_split,
)
from beseg.data.splits import get_protocol
from beseg.engine.claim import Claim, RunLockedError
from beseg.engine.config import Config
from beseg.engine.rundir import RunDir
from beseg.errors import ConfigError, DataError, ReportError
from beseg.data.presets import PRESETS
from beseg.experiment import nnunet_runs, worker
from beseg.experiment.nnunet_runs import NNUNetSystem
from beseg.experiment.folds import merge_folds, merge_is_current
from beseg.experiment.launch import LocalLauncher
from beseg.experiment.outcome import LaunchOutcome
from beseg.experiment.layout import ResultsLayout
from beseg.experiment.plan import (
    ALIASES, PAPER_VAL_FRAC, PROTOCOLS, TABLE1_SYSTEMS, PlannedRun, SystemSpec, check_protocol, plan_runs,
    preset_prefix, resolve_system, write_plan_json, _check_prefix,
)
from beseg.experiment.primary import declare_primary, default_baseline, read_primary
from beseg.fileio import LockLostError, atomic_write_text
from beseg.score import Summary

__all__ = [
    "TABLE1_SYSTEMS", "ALIASES", "PROTOCOLS", "PAPER_VAL_FRAC", "SystemSpec", "PlannedRun", "CompareResult",
    "preset_prefix", "resolve_system", "plan_runs", "prepare_splits", "split_config", "merge_folds", "run_compare", "default_baseline",
]


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
        failed: ``{run id: (error, log file or None)}`` of the runs that failed (then no report).
        jobs: ``{run id: SLURM job id}`` of the runs submitted by this call (SLURM launcher).
        detached: the runs were submitted and not waited for (``--detach``).
        dry_run: only planned (``--dry-run``): nothing trained or submitted.
        cost: the cost plan (``--dry-run``, ``--slurm-time auto``; :mod:`beseg.experiment.cost`), else ``None``.
    """

    results_dir: Path
    runs: list[PlannedRun] = field(default_factory=list)
    report: Path | None = None
    seconds: float = 0.0
    protocol: str = "heldout"
    folds: int | None = None
    failed: dict[str, tuple[str, Path | None]] = field(default_factory=dict)
    jobs: dict[str, str] = field(default_factory=dict)
    detached: bool = False
    dry_run: bool = False
    cost: dict | None = None


# ----------------------------------------------------------------------------------------------
# splits


def _new_split(protocol: str, ids: list[str], config: Config) -> Split:
    data = config.data
    if protocol == "paper":
        n_val = get_preset(data.task).default_val_count(len(ids), PAPER_VAL_FRAC) if data.task in PRESETS else None
        return make_split(ids, val_frac=PAPER_VAL_FRAC, test_frac=0.0, n_val=n_val, seed=data.split_seed)
    return make_split(ids, val_frac=data.val_frac, test_frac=data.test_frac, seed=data.split_seed)


#: The data settings that size and shuffle the comparison's split(s): one value for every system.
SPLIT_KEYS = ("val_frac", "test_frac", "split_seed")


def split_config(runs: Sequence[PlannedRun]) -> Config:
    """The config whose data settings make the comparison's split(s), once every run agrees on them.

    A comparison has one split (one per fold) for every system, so the systems' ``data.val_frac``,
    ``data.test_frac`` and ``data.split_seed`` must be equal; the split must not depend on which
    system is listed first.

    Args:
        runs: the planned runs (not empty).

    Returns:
        The first run's config (its data settings are every run's).

    Raises:
        ConfigError: two systems disagree, naming both and their values.
    """
    first = runs[0]
    for run in runs[1:]:
        for key in SPLIT_KEYS:
            mine, theirs = getattr(first.config.data, key), getattr(run.config.data, key)
            if mine != theirs:
                raise ConfigError(
                    f"systems {first.system} and {run.system} disagree on data.{key} ({mine!r} in {first.system}, "
                    f"{theirs!r} in {run.system}): a comparison has one split for every system; set the same value in "
                    f"both configs, or give it to all with --set data.{key}=VALUE.")
    return first.config


def prepare_splits(results_dir: str | Path, task: MSDTask, protocol: str, folds: int | None,
                   config: Config) -> dict[int | None, Split]:
    """Make the comparison's split file(s) in ``results_dir`` before any run trains, or check existing ones.

    Args:
        results_dir: the results folder.
        task: the comparison's dataset (its case ids).
        protocol: ``heldout``, ``paper`` or ``cv``.
        folds: K for ``cv``.
        config: the runs' config (:func:`split_config`); its ``data.val_frac``, ``data.test_frac`` and
            ``data.split_seed`` size a new split (the paper protocol uses the paper's 80/20 instead).

    Returns:
        ``{None: split}``, or ``{f: fold f's split}`` for ``cv``.

    Raises:
        DataError: an existing split file is invalid, names unknown cases, or belongs to another
            protocol (e.g. a two-way split from before held-out test sets under ``heldout``).
        ValueError: the task has too few cases for the requested split.
    """
    results_dir = Path(results_dir)
    ids = [c.id for c in task.training]
    paths = ResultsLayout(results_dir).split_files(folds)

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


def _check_data(task: MSDTask, task_names: set[str], cache_dir: str | None = None) -> None:
    """Fail before any training when the task's files are unusable or it is not the configs' task (the pass is
    remembered in the runs' ``data.cache_dir``, where their training looks for it).

    Raises:
        DataError: listing every problem in the folder, or naming the mismatched task.
    """
    require_valid_task(task, cache_dir)
    for name in sorted(task_names & set(PRESETS)):  # a dataset without a preset (nnU-Net systems) has no preset rules
        get_preset(name).validate(task)


def _eval_cases(result_dir: Path) -> list[str]:
    """The cases a run was evaluated on: scored ones from ``per_case.csv`` and failed ones."""
    summary = Summary.read(result_dir / "eval" / "summary.json")
    with open(result_dir / "eval" / "per_case.csv", newline="") as f:
        cases = {row["case"] for row in csv.DictReader(f)}
    return sorted(cases | {case for case, _ in summary.failed})


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
    for folder, label in dict((r.result_dir, ResultsLayout.run_id(r.system, r.seed, unit=r.unit)) for r in runs).items():
        cases = _eval_cases(folder)
        if cases != want:
            raise ReportError(
                f"{label} was evaluated on cases {cases}, but the comparison's {part} cases are {want}; the runs did "
                "not use the comparison's split, so they cannot be compared."
            )


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


def run_compare(data: MSDTask | str | Path, systems: Sequence[str], seeds: int | Sequence[int], results_dir: str | Path,
                overrides: Sequence[str] = (), prefix: str | None = None, progress: bool = True,
                report: bool = True, log: Callable[[str], None] = print, protocol: str = "heldout",
                folds: int | None = None, launcher=None, wait_s: float = 5.0, nnunet_python: str | None = None,
                baseline: str | None = None, primary: str | None = None, replan: bool = False,
                dry_run: bool = False, measure: bool | None = None, time_margin: float | None = None) -> CompareResult:
    """Train and evaluate every system with every seed on the same split(s), then write the report.

    Runs already finished in ``results_dir`` are skipped and interrupted ones resumed, so running
    the same command again after an interruption continues where it stopped.

    Args:
        data: the dataset (:func:`beseg.data.load_task`), or its MSD-layout folder, loaded here once; every
            step below (splits, data check, runs, cost plan, nnU-Net preparation, report) takes that object.
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
        launcher: what executes the runs (default :class:`~beseg.experiment.launch.LocalLauncher`:
            one after another in this process); see :mod:`beseg.experiment.launch`.
        wait_s: how often runs held by other processes are looked at again.
        nnunet_python: the interpreter of the environment with nnunetv2, for ``nnunet:`` systems
            (default ``$BESEG_NNUNET_PYTHON``, else this one); see :mod:`beseg.experiment.nnunet_runs`.
        baseline: the system the report compares every other one with (default: the one ``plan.json``
            declares, else :func:`default_baseline`).
        primary: ``SYSTEM:METRIC``, the primary comparison against the baseline (default: the one
            ``plan.json`` declares, else the baseline's BE counterpart in Dice); recorded in
            ``plan.json`` before any run trains (:mod:`beseg.experiment.primary`).
        replan: allow changing the declared primary comparison (the report says it was changed).
        dry_run: plan only: check the data, pin the split(s), measure this machine's device and write the
            cost plan (:mod:`beseg.experiment.cost`) into ``plan.json``; nothing trains or is submitted.
        measure: ``False``: the cost plan uses the timings cached in ``RESULTS/cost/`` (``--no-measure``);
            otherwise ``--dry-run`` measures afresh and ``--slurm-time auto`` measures what is not cached.
        time_margin: ``--slurm-time-margin``: a job under ``--slurm-time auto`` asks for this multiple of its
            run's projected time (default :data:`beseg.experiment.cost.DEFAULT_MARGIN`).

    Returns:
        A :class:`CompareResult`; ``failed`` lists the runs that failed (the others finish; no
        report is written until every run has).

    Raises:
        ConfigError: unknown system, a system name that cannot be a folder, bad override, protocol
            or fold count, a baseline that is not one of the systems, systems that disagree on the
            split's settings (:func:`split_config`), a bad ``primary`` or a change of the declared one
            without ``replan``, or a run folder made with other settings.
        NNUNetError: an ``nnunet:`` system without a usable nnU-Net, or a trainer nnU-Net cannot find
            (checked before anything trains).
        DataError: the dataset folder is missing, broken, or not the configs' task, or the
            results folder's split belongs to another protocol.
        ReportError: the runs were not scored on the comparison's cases.
    """
    start = time.perf_counter()
    if not isinstance(data, MSDTask) and not (Path(data) / "dataset.json").is_file():
        raise DataError(f"{data}: no dataset.json; --data must be an MSD task folder (see `beseg data check`).")
    task = as_task(data)  # the one load of dataset.json in this command: everything below takes the object
    task_id = None
    if prefix is None:
        try:
            prefix = preset_prefix(preset_for_task(task).name)
        except DataError as err:
            if not systems or not all(NNUNetSystem.parse(s) for s in systems):
                raise DataError(f"{err} (beseg's own systems need a task preset; nnU-Net systems, nnunet:TRAINER, "
                                "run on any MSD-layout dataset)") from None
            task_id = nnunet_runs.dataset_task_id(task)  # only nnU-Net systems: no beseg preset needed
    if prefix is not None:
        prefix = _check_prefix(prefix)
    protocol = check_protocol(protocol, folds)
    seed_list = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    if not seed_list or any(s < 0 for s in seed_list):
        raise ConfigError(f"--seeds must be at least 1, got {seeds}.")
    if not systems:
        raise ConfigError("give at least one system in --systems.")
    specs = [resolve_system(s, prefix) for s in systems]
    names = [s.name for s in specs]
    recorded = read_primary(results_dir)
    if baseline is None:
        baseline = recorded.baseline if recorded is not None and recorded.baseline in names else default_baseline(names)
    if baseline not in names:
        raise ConfigError(f"--baseline {baseline!r} is not one of the systems ({', '.join(names)}).")
    results_dir = Path(results_dir)
    nnunet_install = None
    nnunet_systems = [s.nnunet for s in specs if s.nnunet is not None]
    if nnunet_systems:  # a missing nnU-Net or an unknown trainer fails here, before anything trains
        python = nnunet_runs.resolve_python(nnunet_python)
        version = nnunet_runs.check_environment(
            python, nnunet_systems, nnunet_runs.nnunet_env(ResultsLayout(results_dir.absolute()).nnunet))
        nnunet_install = {"python": python, "version": version}
    auto_time = getattr(launcher, "time_limit", None) == "auto"
    if measure is False and not (dry_run or auto_time):
        raise ConfigError("--no-measure applies only with --dry-run or --slurm-time auto (it makes the cost plan "
                          "from the cached timings).")
    _check_plan(results_dir, protocol, folds)
    _note_changed_dataset(results_dir, task, log)
    planned = plan_runs(specs, seed_list, results_dir, overrides, "heldout" if protocol == "cv" else protocol, folds,
                        task_id=task_id)
    split_settings = split_config(planned)  # the systems agree on the split before anything is written
    _check_data(task, {p.config.data.task.lower() for p in planned}, planned[0].config.data.cache_dir)
    declared = declare_primary(recorded, primary, names, baseline, replan, sum(p.state == "done" for p in planned),
                               len(planned), ResultsLayout(results_dir).plan)
    declared_json = declared.to_dict() if declared is not None else None
    if recorded is not None and declared is not None and not recorded.same(declared):
        log(f"primary comparison changed with --replan: {declared.describe()} (was {recorded.describe()}, "
            f"{declared.runs_done} of {declared.runs_total} runs finished); the report will say so")
    results_dir.mkdir(parents=True, exist_ok=True)
    splits = prepare_splits(results_dir, task, protocol, folds, split_settings)
    _write_plan(results_dir, task.root, specs, seed_list, overrides, protocol, folds)

    cost = _previous_cost(results_dir)  # a dry run's plan stays in plan.json until a new one is made
    write_plan_json(results_dir, planned, protocol, folds, task.identity, nnunet=nnunet_install,
                    primary=declared_json, cost=cost)

    result = CompareResult(results_dir, planned, protocol=protocol, folds=folds)
    todo = sum(p.state != "done" for p in planned)
    log(f"compare: {len(specs)} system(s) x {len(seed_list)} seed(s)" + (f" x {folds} folds" if folds else "")
        + f" on {task.root} -> {results_dir} ({len(planned) - todo} finished already, {todo} to run)")
    log(_describe_protocol(protocol, splits))
    if dry_run or auto_time:
        from beseg.experiment.cost import DEFAULT_MARGIN, format_cost_plan, plan_cost

        cost_plan = plan_cost(planned, task, results_dir, protocol, launcher,
                              measure=(measure is not False) if dry_run else measure,
                              margin=DEFAULT_MARGIN if time_margin is None else time_margin, log=log)
        cost = cost_plan.to_dict()
        write_plan_json(results_dir, planned, protocol, folds, task.identity, nnunet=nnunet_install,
                        primary=declared_json, cost=cost)
        result.cost = cost
        if dry_run:
            result.dry_run = True
            result.seconds = time.perf_counter() - start
            return result
        launcher.run_limits = cost_plan.limits
        for line in format_cost_plan(cost):
            log(line)
    launcher = launcher if launcher is not None else LocalLauncher()
    outcome = _execute(ResultsLayout(results_dir.resolve()), planned, launcher, task, protocol, progress, log, wait_s,
                       nnunet_install)
    result.failed, result.jobs = outcome.failed, outcome.jobs
    if getattr(launcher, "detach", False) and outcome.busy:
        result.detached = True
        result.seconds = time.perf_counter() - start
        return result
    states = {run.id: ("failed" if run.id in outcome.failed else "done") for run in planned}
    write_plan_json(results_dir, planned, protocol, folds, task.identity, states, nnunet=nnunet_install,
                    primary=declared_json, cost=cost)
    if result.failed:
        log(f"{len(result.failed)} run(s) failed; no report until they finish (rerun the same command to retry):")
        for run_id, (error, log_path) in result.failed.items():
            log(f"  {run_id}: {error}" + (f" (log: {log_path})" if log_path else ""))
        result.seconds = time.perf_counter() - start
        return result
    spec = get_protocol(protocol)
    if protocol == "cv":
        all_ids = sorted(c for split in splits.values() for c in split.test)
        for seed_dir in dict.fromkeys(r.result_dir for r in planned):
            fold_dirs = [seed_dir / f"fold{f}" for f in range(folds)]
            if not merge_is_current(seed_dir, fold_dirs):  # a fold (re)evaluated since the merge, or no merge yet
                merged = merge_folds(seed_dir, fold_dirs, all_ids)
                dice = merged["mean"].get("dice")
                log(f"merged {folds} folds of {seed_dir.parent.name} {seed_dir.name}: out-of-fold Dice "
                    + (f"{dice:.4f}" if dice is not None else "n/a") + f" over {merged['cases']} case(s)")
        expected = all_ids
    else:
        expected = splits[None].cases(spec.eval_split)
    _check_same_cases(planned, expected, spec.part)
    if report:
        from beseg.report import write_report  # rendering: the last step, after every run is in

        log("writing the report...")
        result.report = write_report(results_dir, task)  # baseline and primary: from plan.json
    result.seconds = time.perf_counter() - start
    return result


def _held_elsewhere(run: PlannedRun, watchers: dict[str, Claim]) -> bool:
    """Another live process (here or on another host) holds the run's claim.

    Args:
        run: the run.
        watchers: one :class:`Claim` per run, kept across the waiting loop's rounds: each remembers how long
            it has seen the holder's heartbeat unchanged (judged on this process's clock, not the holder's).
    """
    claim = watchers.setdefault(run.id, Claim(RunDir(run.run_dir).lock))
    held = claim.holder()
    return held is not None and not claim.is_mine(held) and claim.stale_reason(held) is None


def _execute(layout: ResultsLayout, planned: Sequence[PlannedRun], launcher, task: MSDTask, protocol: str, progress: bool,
             log: Callable[[str], None], wait_s: float, nnunet_install: dict | None = None) -> LaunchOutcome:
    """Execute the unfinished runs through ``launcher``; then wait for the runs other processes hold,
    taking over any whose holder is gone, until every run is done or failed.

    Returns:
        The combined :class:`LaunchOutcome` (``busy`` is empty unless a detached launcher left jobs).
    """
    total = LaunchOutcome()
    todo = [run for run in planned if run.state != "done"]
    for i, run in enumerate(planned, start=1):
        log(f"[{i}/{len(planned)}] {run.name}: {run.describe()}")
    first = True
    watchers: dict[str, Claim] = {}
    while todo:
        if not first:
            time.sleep(wait_s)
        ready, waiting = [], []
        for run in todo:
            state, run.epoch = run.current_state()
            if state == "done":
                total.done.append(run.id)
            elif _held_elsewhere(run, watchers):
                waiting.append(run)
            elif not total.failed.get(run.id) and (first or _failed_elsewhere(run) is None):
                ready.append(run)
            else:
                failure = _failed_elsewhere(run) or {}
                total.failed[run.id] = (failure.get("error", "failed"), failure.get("log"))
        if ready:
            outcome = _launch(layout, ready, launcher, task, protocol, progress, log, nnunet_install, watchers)
            total.done += outcome.done
            total.failed.update(outcome.failed)
            total.jobs.update(outcome.jobs)
            if getattr(launcher, "detach", False):
                total.busy = list(outcome.busy)
                return total
            waiting += [run for run in ready if run.id in outcome.busy]
        todo = [run for run in waiting if run.id not in total.failed]
        first = False  # the first pass retries runs that failed before; later ones list another process's failure
        if todo:
            log(f"waiting for {len(todo)} run(s) that other processes hold: " + ", ".join(r.id for r in todo))
    return total


def _failed_elsewhere(run: PlannedRun) -> dict | None:
    return worker.read_failure(run.run_dir)


def _launch(layout: ResultsLayout, runs: Sequence[PlannedRun], launcher, task: MSDTask, protocol: str, progress: bool,
            log: Callable[[str], None], nnunet_install: dict | None = None,
            watchers: dict[str, Claim] | None = None) -> LaunchOutcome:
    """One pass of ``launcher`` over ``runs`` (in this process when it is the in-process local launcher, which
    claims each run with its watcher from :func:`_held_elsewhere`: what that saw of a silent holder counts)."""
    if not (isinstance(launcher, LocalLauncher) and launcher.in_process):
        return launcher.execute(layout, [r.id for r in runs], log)
    outcome = LaunchOutcome()
    for i, run in enumerate(runs, start=1):
        tick = time.perf_counter()
        try:
            summary = worker.execute_run(run.run_dir, run.config, task, protocol, progress=progress, log=log,
                                         label=run.name, nnunet=run.nnunet, nnunet_install=nnunet_install,
                                         claim=(watchers or {}).get(run.id))
        except RunLockedError:
            outcome.busy.append(run.id)
            log(f"{run.name}: another process holds it; waiting for it")
            continue
        except LockLostError as err:
            outcome.busy.append(run.id)
            log(f"{err}; waiting for that process")
            continue
        except Exception as err:  # noqa: BLE001 - a failing run must not stop the others
            outcome.failed[run.id] = (str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__,
                                      None)
            log(f"{run.name}: FAILED: {outcome.failed[run.id][0]}")
            continue
        outcome.done.append(run.id)
        if summary is None:
            log(f"{run.name}: finished by another process")
            continue
        dice = summary["mean"].get("dice")
        part = get_protocol(protocol).part
        log(f"[{i}/{len(runs)}] {run.name}: done in {time.perf_counter() - tick:.0f} s, "
            f"{'test' if part != 'validation' else 'validation'} Dice {dice:.4f} over {summary['cases']} case(s)"
            if dice is not None else f"[{i}/{len(runs)}] {run.name}: done, no case could be scored")
    return outcome


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


def _previous(results_dir: Path, key: str) -> Any:
    """``key`` of the ``plan.json`` an earlier command left (``None`` when there is none or it is unreadable)."""
    try:
        return json.loads(ResultsLayout(results_dir).plan.read_text(encoding="utf-8")).get(key)
    except (OSError, ValueError, AttributeError):
        return None


def _previous_cost(results_dir: Path) -> dict | None:
    """The cost plan an earlier command left in ``plan.json`` (``None`` when there is none or it is unreadable)."""
    cost = _previous(results_dir, "cost")
    return cost if isinstance(cost, dict) else None


def _note_changed_dataset(results_dir: Path, task: MSDTask, log: Callable[[str], None]) -> None:
    """Say so when the folder's previous plan was made on another ``dataset.json`` (the plan is made anew on this one)."""
    try:
        before = DatasetIdentity.from_dict(_previous(results_dir, "data"))
    except ValueError:  # no plan yet, or one written before identities were recorded
        return
    change = before.changes(task.identity)
    if change is not None:
        log(f"note: the dataset changed since {ResultsLayout(results_dir).plan} was last written ({change}); planned "
            "anew on it. Runs finished before keep their results; delete a run's folder to redo it.")


def _write_plan(results_dir: Path, folder: Path, specs: Sequence[SystemSpec], seeds: Sequence[int],
                overrides: Sequence[str], protocol: str, folds: int | None) -> None:
    """Record what was asked (``folder``: the task folder, resolved), so a results folder says how to reproduce it."""
    plan = {
        "data": str(folder), "systems": {s.name: s.config for s in specs}, "seeds": list(seeds),
        "overrides": list(overrides), "protocol": protocol, "folds": folds,
    }
    atomic_write_text(results_dir / "compare.yaml", yaml.safe_dump(plan, sort_keys=False))

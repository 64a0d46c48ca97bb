"""The results folder of a comparison: every path in it, spelled in one place.

::

    RESULTS/compare.yaml                  what was asked: data, systems, seeds, overrides, protocol, folds
    RESULTS/plan.json                     every run: id, system, seed, fold, config, run folder, state
    RESULTS/split.json                    heldout/paper: the one split every run uses
    RESULTS/split_fold<f>.json            cv: fold f's split
    RESULTS/<system>/seed<k>/             heldout/paper: a run folder (:mod:`beseg.engine.rundir`),
                                          evaluated into eval/
    RESULTS/<system>/seed<k>/fold<f>/     cv: fold f's run folder, evaluated on its test cases
    RESULTS/<system>/seed<k>/eval/        what the report reads (cv: the K folds merged)
    RESULTS/<system>/repeat<k>/           the same for a system without a seed (an nnU-Net trainer):
                                          repeat k is an independent rerun of identical settings
    RESULTS/nnunet/                       nnU-Net's raw and preprocessed dataset, shared by its runs
    RESULTS/logs/<run id>.log             each run's output when a launcher ran it in its own process
    RESULTS/slurm/<run id>.sbatch         the SLURM launcher's job scripts (and <run id>.jobid)
    RESULTS/cost/<device>.json            timings the cost plan measured on each device (beseg.experiment.cost)
    RESULTS/report/                       report.md, report.html, figures/

A run's *id* is its run folder relative to ``RESULTS`` (``segresnet_be/seed0``,
``segresnet_be/seed0/fold2``, ``nnUNetTrainerBE/repeat1``); file names use it with ``/`` replaced by ``.``. Everything that
is recorded is relative to ``RESULTS``, so a results folder can be moved.

A system's name is a folder of ``RESULTS``, so it is checked (:func:`system_name_problem`) before it
becomes one: letters, digits, ``_`` and ``-``, and none of the folder's own folders (``report``,
``logs``, ``slurm``, ``nnunet``). A name such as ``../x`` or ``a/b`` would put runs outside the results
folder or where the report does not look; ``report`` would mix runs with the report. Run ids read
back from ``plan.json`` are checked the same way (:func:`run_id_problem`).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

__all__ = ["ResultsLayout", "REPORT_DIR", "NNUNET_DIR", "RUN_UNITS", "RESERVED_NAMES", "SPLIT_FILE", "system_name_problem",
           "run_id_problem"]

#: Folders of a results folder that are not systems.
REPORT_DIR = "report"
NNUNET_DIR = "nnunet"
COST_DIR = "cost"
RESERVED_NAMES = frozenset({REPORT_DIR, "logs", "slurm", NNUNET_DIR, COST_DIR})
_NOT_SYSTEMS = RESERVED_NAMES
#: What tells the runs of one system apart: a training seed, or (no seed: nnU-Net) a repeat number.
RUN_UNITS = ("seed", "repeat")
_RUN_DIR = re.compile(r"(seed|repeat)(\d+)")
#: A system name: one plain folder name (no dots: the folder's own files, plan.json, split.json..., have them).
_SYSTEM_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,99}")
#: The results folder's split files: ``split.json``, ``split_fold<f>.json`` (:meth:`ResultsLayout.split_file`).
SPLIT_FILE = re.compile(r"split(?:_fold\d+)?\.json")
_RUN_ID = re.compile(r"([^/]*)/(?:seed|repeat)\d+(?:/fold\d+)?")


def system_name_problem(name: object) -> str | None:
    """Why ``name`` cannot be a system's folder in a results folder, or None when it can.

    Returns:
        A phrase for a message (``it may hold only letters, digits, '_' and '-' ...``), or None.
    """
    if not isinstance(name, str) or not _SYSTEM_NAME.fullmatch(name):
        return ("a system name is a folder of the results folder: it may hold only letters, digits, '_' and '-' "
                "(at most 100, the first a letter or digit)")
    if name.lower() in RESERVED_NAMES:
        return (f"{name!r} is the results folder's own {name.lower()}/ folder (reserved: "
                f"{', '.join(sorted(RESERVED_NAMES))})")
    return None


def run_id_problem(run_id: object) -> str | None:
    """Why ``run_id`` is not a run folder inside a results folder (``SYSTEM/seedK[/foldF]``, ``SYSTEM/repeatK``),
    or None when it is."""
    match = _RUN_ID.fullmatch(run_id) if isinstance(run_id, str) else None
    if match is None:
        return "not a run folder of the form SYSTEM/seedK[/foldF] or SYSTEM/repeatK[/foldF]"
    return system_name_problem(match.group(1))


class ResultsLayout:
    """Paths of one results folder (nothing is created here).

    Args:
        root: the results folder.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    # -- files of the comparison ---------------------------------------------------------------

    @property
    def compare_yaml(self) -> Path:
        return self.root / "compare.yaml"

    @property
    def plan(self) -> Path:
        return self.root / "plan.json"

    @property
    def report(self) -> Path:
        return self.root / REPORT_DIR

    @property
    def nnunet(self) -> Path:
        """nnU-Net's dataset folders (``raw/``, ``preprocessed/``), converted and planned once for all its runs."""
        return self.root / NNUNET_DIR

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def slurm(self) -> Path:
        return self.root / "slurm"

    @property
    def cost(self) -> Path:
        """The cost plan's cached timings, one file per device (:class:`beseg.experiment.cost.CostCache`)."""
        return self.root / COST_DIR

    def split_file(self, fold: int | None = None) -> Path:
        """``split.json``, or fold ``fold``'s ``split_fold<f>.json``."""
        return self.root / ("split.json" if fold is None else f"split_fold{fold}.json")

    def split_files(self, folds: int | None) -> dict[int | None, Path]:
        """``{None: split.json}``, or ``{f: split_fold<f>.json}`` for K folds."""
        if folds is None:
            return {None: self.split_file()}
        return {f: self.split_file(f) for f in range(folds)}

    # -- runs ------------------------------------------------------------------------------------

    @staticmethod
    def run_id(system: str, seed: int, fold: int | None = None, unit: str = "seed") -> str:
        """``<system>/seed<k>[/fold<f>]`` (``repeat<k>`` for ``unit="repeat"``): the run folder relative
        to the results folder."""
        if unit not in RUN_UNITS:
            raise ValueError(f"unit must be one of {RUN_UNITS}, got {unit!r}.")
        problem = system_name_problem(system)
        if problem:  # callers check names where they enter (plan.resolve_system); this is the last guard
            raise ValueError(f"system {system!r}: {problem}.")
        return f"{system}/{unit}{seed}" + (f"/fold{fold}" if fold is not None else "")

    @staticmethod
    def file_stem(run_id: str) -> str:
        """A run id as a file name: ``segresnet_be.seed0.fold1``."""
        return run_id.replace("/", ".")

    def run_dir(self, system: str, seed: int, fold: int | None = None, unit: str = "seed") -> Path:
        """The run folder (trained with ``train.seed=seed``, or repeat ``seed``; on fold ``fold`` in cross-validation)."""
        return self.root / self.run_id(system, seed, fold, unit)

    def result_dir(self, system: str, seed: int, unit: str = "seed") -> Path:
        """The folder the report reads as one run: the run folder, or the seed folder holding merged folds."""
        return self.run_dir(system, seed, unit=unit)

    def eval_dir(self, system: str, seed: int, fold: int | None = None, unit: str = "seed") -> Path:
        return self.run_dir(system, seed, fold, unit) / "eval"

    def summary(self, system: str, seed: int, fold: int | None = None, unit: str = "seed") -> Path:
        """``eval/summary.json`` of a run (fold ``None`` in cross-validation: the merged one)."""
        return self.eval_dir(system, seed, fold, unit) / "summary.json"

    def log(self, run_id: str) -> Path:
        return self.logs / f"{self.file_stem(run_id)}.log"

    def sbatch(self, run_id: str) -> Path:
        return self.slurm / f"{self.file_stem(run_id)}.sbatch"

    def job_id_file(self, run_id: str) -> Path:
        return self.slurm / f"{self.file_stem(run_id)}.jobid"

    def result_dirs(self) -> Iterator[tuple[str, int, Path, str]]:
        """``(system, seed or repeat, folder, unit)`` of every ``<system>/seed<k>`` and ``<system>/repeat<k>``
        folder present, sorted; ``unit`` is ``seed`` or ``repeat``."""
        if not self.root.is_dir():
            return
        for system_dir in sorted(p for p in self.root.iterdir() if p.is_dir() and p.name not in _NOT_SYSTEMS):
            for seed_dir in sorted(system_dir.iterdir()):
                m = _RUN_DIR.fullmatch(seed_dir.name)
                if m and seed_dir.is_dir():
                    yield system_dir.name, int(m.group(2)), seed_dir, m.group(1)

"""nnU-Net v2 trainers as systems of ``beseg compare``: "does BE improve nnU-Net on my data?" in one command.

``--systems nnunet:nnUNetTrainer,nnunet:nnUNetTrainerBE,segresnet_be`` compares nnU-Net's default
trainer, beseg's BE trainer inside nnU-Net (:mod:`beseg.nnunet`) and a beseg system on the same
split, the same held-out test cases and in the same report. ``nnunet:TRAINER@CONFIGURATION``
picks an nnU-Net configuration (default ``3d_fullres``).

How an nnU-Net system is run, all through nnU-Net's own commands (in the Python environment of
``--nnunet-python``, ``$BESEG_NNUNET_PYTHON`` or this one when it has nnunetv2):

1. **Once per results folder** (``RESULTS/nnunet/``, under a claim, by whichever run gets there
   first): the MSD task is converted (``nnUNetv2_convert_MSD_dataset``), planned and preprocessed
   (``nnUNetv2_plan_and_preprocess``), and beseg's split is written as nnU-Net's
   ``splits_final.json``: nnU-Net trains on beseg's training cases and monitors its validation
   cases. Under ``heldout`` (and ``paper``) the held-out test cases are not in nnU-Net's training
   set at all, so its dataset fingerprint and plan never see them; under ``cv`` every case is a
   training case of some fold, and nnU-Net plans once over all of them (its own convention).
2. **Per run** (``RESULTS/<trainer>/repeat<k>[/fold<f>]/``): ``nnUNetv2_train`` into the run's own
   ``nnUNet_results`` (resumed with ``--c`` after an interruption), ``nnUNetv2_predict`` of the cases
   the protocol scores with ``checkpoint_final.pth`` (nnU-Net chooses no checkpoint on validation),
   and :func:`beseg.score.score_predictions` into ``eval/`` with the task's classes, so the report
   pairs these predictions with beseg's systems case by case. nnU-Net's training log becomes the
   run's ``metrics.jsonl`` (train loss, pseudo Dice, time per iteration) and its settings ``config.yaml``.

nnU-Net sets no seed: the runs of one nnU-Net system are *repeats* (``repeat<k>`` folders), reruns of
identical settings. beseg's trainer folder is added to the user's own ``nnUNet_extTrainer`` folders.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from beseg.data import MSDTask, Split, load_split
from beseg.data.classes import ClassSpec
from beseg.data.splits import get_protocol
from beseg.engine.claim import Claim, RunLockedError
from beseg.errors import BesegError, ConfigError
from beseg.experiment.layout import ResultsLayout
from beseg.fileio import atomic_write_text
from beseg.nnunet import INSTALL_HINT, SUPPORTED_VERSIONS, is_supported_version, nnunet_version, trainer_dir

__all__ = [
    "KIND", "PREFIX", "DEFAULT_CONFIGURATION", "DEFAULT_PLANS", "PYTHON_ENV", "NNUNetError", "NNUNetSystem",
    "resolve_python", "check_environment", "nnunet_env", "run_state", "prepare_dataset", "execute",
    "read_progress", "find_fold_dir", "dataset_task_id",
]

#: ``kind`` of an nnU-Net run in ``plan.json``.
KIND = "nnunet"
#: ``--systems`` entries starting with this name an nnU-Net trainer.
PREFIX = "nnunet:"
DEFAULT_CONFIGURATION = "3d_fullres"
DEFAULT_PLANS = "nnUNetPlans"
#: The interpreter with nnunetv2 when ``--nnunet-python`` is not given.
PYTHON_ENV = "BESEG_NNUNET_PYTHON"
#: Configurations a comparison can train (the cascade needs another configuration's predictions first).
CONFIGURATIONS = ("2d", "3d_fullres", "3d_lowres")
#: nnU-Net's entry points (``pyproject`` console scripts), called as ``python -c`` in the nnU-Net environment.
_ENTRY_POINTS = {
    "nnUNetv2_convert_MSD_dataset": ("nnunetv2.dataset_conversion.convert_MSD_dataset", "entry_point"),
    "nnUNetv2_plan_and_preprocess": ("nnunetv2.experiment_planning.plan_and_preprocess_entrypoints",
                                     "plan_and_preprocess_entry"),
    "nnUNetv2_preprocess": ("nnunetv2.experiment_planning.plan_and_preprocess_entrypoints", "preprocess_entry"),
    "nnUNetv2_train": ("nnunetv2.run.run_training", "run_training_entry"),
    "nnUNetv2_predict": ("nnunetv2.inference.predict_from_raw_data", "predict_entry_point"),
}
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
#: What nnU-Net's final checkpoint means for the report.
SELECTION = "checkpoint_final.pth (nnU-Net's final epoch, no selection)"
_PREPARED = "prepared.json"
_RUN_RECORD = "nnunet.json"


class NNUNetError(BesegError):
    """nnU-Net is missing, cannot find a trainer, or one of its commands failed."""


@dataclass(frozen=True)
class NNUNetSystem:
    """An nnU-Net trainer in a comparison.

    Attributes:
        trainer: the trainer class (``nnUNetTrainer``, ``nnUNetTrainerBE``...), found by nnU-Net in its
            own package or in the ``nnUNet_extTrainer`` folders.
        configuration: nnU-Net configuration (``3d_fullres``, ``2d``, ``3d_lowres``).
        plans: plans identifier (``nnUNetPlans``).
    """

    trainer: str
    configuration: str = DEFAULT_CONFIGURATION
    plans: str = DEFAULT_PLANS

    @property
    def name(self) -> str:
        """The system's name in the results folder and the report: the trainer (``-<configuration>`` unless 3d_fullres)."""
        return self.trainer if self.configuration == DEFAULT_CONFIGURATION else f"{self.trainer}-{self.configuration}"

    @property
    def spec(self) -> str:
        """The ``--systems`` entry."""
        return PREFIX + self.trainer + ("" if self.configuration == DEFAULT_CONFIGURATION else f"@{self.configuration}")

    @classmethod
    def parse(cls, text: str) -> NNUNetSystem | None:
        """``nnunet:TRAINER[@CONFIGURATION]`` -> the system; ``None`` for entries without the prefix.

        Raises:
            ConfigError: a malformed trainer name or an unsupported configuration.
        """
        text = text.strip()
        if not text.lower().startswith(PREFIX):
            return None
        trainer, _, configuration = text[len(PREFIX):].partition("@")
        trainer, configuration = trainer.strip(), (configuration.strip() or DEFAULT_CONFIGURATION)
        if not _IDENTIFIER.fullmatch(trainer):
            raise ConfigError(f"--systems {text!r}: expected nnunet:TRAINER[@CONFIGURATION] with a trainer class name, "
                              "e.g. nnunet:nnUNetTrainerBE or nnunet:nnUNetTrainer@2d.")
        if configuration not in CONFIGURATIONS:
            raise ConfigError(f"--systems {text!r}: configuration {configuration!r} is not one of "
                              f"{', '.join(CONFIGURATIONS)} (the cascade is not supported in a comparison).")
        return cls(trainer, configuration)

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


# ----------------------------------------------------------------------------------------------
# the nnU-Net environment


def resolve_python(given: str | None = None) -> str:
    """The interpreter that runs nnU-Net: ``given``, else ``$BESEG_NNUNET_PYTHON``, else this one if it has nnunetv2.

    Raises:
        NNUNetError: a named interpreter does not exist, or none was named and this environment has no nnunetv2.
    """
    for source, value in (("--nnunet-python", given), (PYTHON_ENV, os.environ.get(PYTHON_ENV))):
        if value:
            path = Path(value).expanduser()
            if not (path.is_file() and os.access(path, os.X_OK)):
                raise NNUNetError(f"{source} {value}: no such Python interpreter (give the python of the environment "
                                  "where nnunetv2 is installed, e.g. /path/to/venv/bin/python).")
            return str(path.absolute())
    if nnunet_version() is None:
        raise NNUNetError("nnU-Net systems need nnU-Net v2: give --nnunet-python /path/to/venv/bin/python (an "
                          f"environment with nnunetv2 {SUPPORTED_VERSIONS} and beseg), or {INSTALL_HINT}.")
    return sys.executable


def nnunet_env(nnunet_dir: str | Path, results: str | Path | None = None,
               base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment variables for nnU-Net's commands.

    Args:
        nnunet_dir: ``RESULTS/nnunet`` (its ``raw/`` and ``preprocessed/`` are nnU-Net's ``nnUNet_raw`` and
            ``nnUNet_preprocessed``).
        results: the run's own ``nnUNet_results`` (default ``nnunet_dir/results``, unused by training).
        base: the environment to start from (default this process's).

    Returns:
        ``base`` with nnU-Net's three folders, beseg's trainer folder appended to the user's
        ``nnUNet_extTrainer`` folders, and beseg's own import root removed from ``PYTHONPATH`` (a
        launcher puts it there for beseg's workers; the nnU-Net environment imports its own beseg and torch).
    """
    env = dict(os.environ if base is None else base)
    nnunet_dir = Path(nnunet_dir).absolute()
    env["nnUNet_raw"] = str(nnunet_dir / "raw")
    env["nnUNet_preprocessed"] = str(nnunet_dir / "preprocessed")
    env["nnUNet_results"] = str(Path(results).absolute() if results is not None else nnunet_dir / "results")
    folders = [p for p in env.get("nnUNet_extTrainer", "").split(os.pathsep) if p.strip()]
    ours = str(trainer_dir())
    env["nnUNet_extTrainer"] = os.pathsep.join(folders + ([ours] if ours not in folders else []))
    root = str(Path(__file__).resolve().parents[2])
    kept = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and Path(p).absolute() != Path(root)]
    if kept:
        env["PYTHONPATH"] = os.pathsep.join(kept)
    else:
        env.pop("PYTHONPATH", None)
    return env


_PROBE = r"""
import contextlib, io, json, sys
out = {"version": None, "beseg": None, "trainers": {}}
try:
    from importlib import metadata
    out["version"] = metadata.version("nnunetv2")
except Exception:
    print(json.dumps(out)); sys.exit(0)
try:
    import beseg.nnunet.loss  # what beseg's trainers import
    out["beseg"] = True
except Exception as err:
    out["beseg"] = f"{type(err).__name__}: {err}"
for name in sys.argv[1:]:
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
            cls = recursive_find_trainer_class_by_name(name)
        out["trainers"][name] = None
    except Exception as err:
        text = str(err).strip().splitlines()
        out["trainers"][name] = f"{type(err).__name__}: {text[0] if text else ''}"
print(json.dumps(out))
"""


def check_environment(python: str, systems: Sequence[NNUNetSystem], env: Mapping[str, str] | None = None) -> str:
    """Check, before anything trains, that ``python`` has a supported nnunetv2 that finds every trainer.

    Args:
        python: the nnU-Net environment's interpreter.
        systems: the comparison's nnU-Net systems.
        env: the environment nnU-Net will run in (default :func:`nnunet_env` of a scratch folder).

    Returns:
        The nnunetv2 version.

    Raises:
        NNUNetError: one line: no nnunetv2, an unsupported version, or a trainer nnU-Net cannot find or
            import (naming it and the folders searched).
    """
    env = dict(env) if env is not None else nnunet_env(Path.cwd() / ".nnunet-probe")
    stderr = ""
    try:
        proc = subprocess.run([python, "-c", _PROBE, *dict.fromkeys(s.trainer for s in systems)], env=env,
                              capture_output=True, text=True, timeout=600)
        stderr = proc.stderr
        found = json.loads(proc.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        tail = (stderr.strip().splitlines() or [""])[-1]
        raise NNUNetError(f"{python}: cannot ask it for nnU-Net ({tail or 'it did not answer'}); is it a Python "
                          "interpreter with nnunetv2?") from None
    version = found.get("version")
    if version is None:
        raise NNUNetError(f"{python} has no nnunetv2; give --nnunet-python the interpreter of the environment where "
                          f"nnU-Net v2 is installed, or {INSTALL_HINT}.")
    if not is_supported_version(version):
        raise NNUNetError(f"{python} has nnunetv2 {version}; beseg runs nnU-Net v2 {SUPPORTED_VERSIONS} "
                          f"(nnUNet_extTrainer support); {INSTALL_HINT}.")
    for system in systems:
        problem = found["trainers"].get(system.trainer)
        if problem:
            where = env.get("nnUNet_extTrainer", "")
            hint = ("; beseg's trainers also need beseg installed in that environment "
                    f"({found['beseg']})" if found.get("beseg") is not True else "")
            raise NNUNetError(f"--systems {system.spec}: nnU-Net cannot find or import trainer {system.trainer!r} "
                              f"(searched nnunetv2.training.nnUNetTrainer and nnUNet_extTrainer={where}): "
                              f"{problem}{hint}.")
    return version


def _nnunet(python: str, command: str, args: Sequence[str], env: Mapping[str, str], log_file: Path) -> None:
    """Run one of nnU-Net's commands in its environment, appending its output to ``log_file``.

    Raises:
        NNUNetError: it exited non-zero (the message names the log and its last line).
    """
    module, function = _ENTRY_POINTS[command]
    code = f"import sys; sys.argv[0] = {command!r}; from {module} import {function}; sys.exit({function}())"
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "a", encoding="utf-8") as f:
        f.write(f"\n$ {command} {' '.join(args)}\n")
        f.flush()
        code_ = subprocess.run([python, "-c", code, *args], env=dict(env), stdout=f, stderr=subprocess.STDOUT,
                               stdin=subprocess.DEVNULL).returncode
    if code_ != 0:
        lines = [ln for ln in log_file.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
        raise NNUNetError(f"{command} exited with code {code_} (output in {log_file}): "
                          f"{lines[-1].strip()[:300] if lines else 'no output'}")


# ----------------------------------------------------------------------------------------------
# the dataset, once per results folder


def _nnunet_number_and_name(task: MSDTask) -> tuple[int, str]:
    """The MSD task's number (folder ``Task09_Spleen`` -> 9; 500 otherwise) and its ``dataset.json`` name (else the
    folder's) without ``_`` (nnU-Net's converter splits the folder name at its one underscore)."""
    match = re.match(r"Task(\d+)_", task.root.name)
    number = int(match.group(1)) if match and 0 < int(match.group(1)) < 1000 else 500
    name = re.sub(r"[^A-Za-z0-9]", "", task.name or task.root.name) or "Task"
    return number, name[0].upper() + name[1:]


def dataset_task_id(task: MSDTask) -> str:
    """The task id of a dataset without a beseg preset: its ``dataset.json`` name (else folder name) in
    :func:`~beseg.data.presets.canonical_task` spelling (``Sparse Organs`` -> ``sparse_organs``)."""
    from beseg.data.presets import canonical_task

    name = task.name or task.root.name
    return canonical_task(re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_") or task.root.name)


def _splits_final(splits: Mapping[int | None, Split]) -> list[dict[str, list[str]]]:
    """nnU-Net's ``splits_final.json``: fold k trains on beseg's training cases of split k and validates on its
    validation cases (one fold for ``heldout``/``paper``; K for ``cv``)."""
    return [{"train": sorted(splits[key].train), "val": sorted(splits[key].val)}
            for key in sorted(splits, key=lambda k: -1 if k is None else k)]


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.is_symlink() or dst.exists():
        dst.unlink()
    dst.symlink_to(src.absolute())


def prepare_dataset(layout: ResultsLayout, task: MSDTask, splits: Mapping[int | None, Split], protocol: str,
                    configurations: Sequence[str], python: str, log: Callable[[str], None] = print,
                    wait_s: float = 10.0) -> dict[str, Any]:
    """Convert, plan and preprocess the task for nnU-Net once, and write beseg's split as ``splits_final.json``.

    Safe to call from every run at once: one process does the work under ``RESULTS/nnunet/.claim``,
    the others wait for it; steps already done (``RESULTS/nnunet/prepared.json``) are skipped.

    Args:
        layout: the results folder.
        task: the comparison's dataset (MSD layout): its cases are converted, its ``dataset.json`` keys kept.
        splits: the comparison's split(s): ``{None: split}`` or ``{fold: split}``.
        protocol: ``heldout``, ``paper`` or ``cv``: which cases nnU-Net's training set holds.
        configurations: nnU-Net configurations to preprocess.
        python: the nnU-Net environment's interpreter.
        log: progress lines.
        wait_s: how often a waiting process looks again.

    Returns:
        ``prepared.json``: ``dataset`` (``Dataset009_Spleen``), ``configurations``, ``training_cases``,
        ``test_cases`` (converted to ``imagesTs``).

    Raises:
        NNUNetError: a command failed, or the plan lacks a requested configuration.
    """
    folder = layout.nnunet
    folder.mkdir(parents=True, exist_ok=True)
    marker = folder / _PREPARED
    wanted = list(dict.fromkeys(configurations))
    splits_json = _splits_final(splits)
    claim = Claim(folder / ".claim")
    waiting = False
    while True:
        info = _read_json(marker)
        if info and set(wanted) <= set(info.get("configurations", [])) and info.get("splits") == splits_json:
            return info
        try:
            taken = claim.acquire()
        except RunLockedError:
            if not waiting:
                log(f"nnU-Net dataset: another process is preparing it ({folder}); waiting")
                waiting = True
            time.sleep(wait_s)
            continue
        try:
            return _prepare_locked(folder, task, splits, splits_json, protocol, wanted, python, log)
        finally:
            if taken:
                claim.release()


def _prepare_locked(folder: Path, task: MSDTask, splits: Mapping[int | None, Split], splits_json: list,
                    protocol: str, wanted: list[str], python: str, log: Callable[[str], None]) -> dict[str, Any]:
    marker = folder / _PREPARED
    info = _read_json(marker) or {}
    log_file = folder / "nnunet.log"
    env = nnunet_env(folder)
    if env.get("nnUNet_n_proc_DA", "").strip() == "0":
        # 0 (augmentation in the training process) is valid for training, but nnU-Net's planner also passes it
        # to torch.set_num_threads, which refuses 0.
        del env["nnUNet_n_proc_DA"]
    number, name = _nnunet_number_and_name(task)
    dataset = f"Dataset{number:03d}_{name}"
    held_out = sorted(splits[None].test) if protocol != "cv" else []
    training = sorted(c.id for c in task.training if c.id not in set(held_out))
    if info.get("dataset") != dataset or info.get("training_cases") != training:
        # What nnU-Net converts: beseg's training and validation cases in imagesTr; under heldout the test
        # cases in imagesTs only (predicted, never planned on or trained with).
        log(f"nnU-Net dataset: converting {len(training)} training case(s)"
            + (f" and {len(held_out)} held-out test case(s)" if held_out else "") + f" -> {folder / 'raw' / dataset}")
        view = folder / "msd" / f"Task{number:02d}_{name}"
        for sub in ("imagesTr", "labelsTr", "imagesTs"):
            if (view / sub).is_dir():
                for old in (view / sub).iterdir():
                    old.unlink()
            (view / sub).mkdir(parents=True, exist_ok=True)
        for case in task.training:
            for path in (case.image, case.label):
                if not path.name.endswith(".nii.gz"):  # the converter reads .nii.gz files only
                    raise NNUNetError(f"{path}: nnU-Net's MSD converter reads .nii.gz files only; compress it "
                                      "(gzip) and update dataset.json.")
            if case.id in held_out:
                _link(case.image, view / "imagesTs" / f"{case.id}.nii.gz")
            else:
                _link(case.image, view / "imagesTr" / f"{case.id}.nii.gz")
                _link(case.label, view / "labelsTr" / f"{case.id}.nii.gz")
        msd = {**task.meta,  # the other keys (description, licence...) as the task's dataset.json has them
               "training": [{"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"} for c in training],
               "test": [f"./imagesTs/{c}.nii.gz" for c in held_out], "numTraining": len(training),
               "numTest": len(held_out)}
        atomic_write_text(view / "dataset.json", json.dumps(msd, indent=1))
        for sub in ("raw", "preprocessed"):
            _remove_tree(folder / sub / dataset)  # a partial earlier attempt, or another split's dataset
        info = {"dataset": dataset, "training_cases": training, "test_cases": held_out, "configurations": []}
        _nnunet(python, "nnUNetv2_convert_MSD_dataset", ["-i", str(view), "-np", str(_processes())], env, log_file)
        atomic_write_text(marker, json.dumps(info, indent=1))
    missing = [c for c in wanted if c not in info["configurations"]]
    if missing:
        plans = folder / "preprocessed" / dataset / f"{DEFAULT_PLANS}.json"
        log(f"nnU-Net dataset: planning and preprocessing {', '.join(missing)} (output in {log_file})")
        if not plans.is_file():
            _nnunet(python, "nnUNetv2_plan_and_preprocess",
                    ["-d", str(number), "-c", *missing, "-np", *[str(_processes())] * len(missing),
                     "-npfp", str(_processes())], env, log_file)
        else:
            _nnunet(python, "nnUNetv2_preprocess", ["-d", str(number), "-c", *missing, "-np",
                                                    *[str(_processes())] * len(missing)], env, log_file)
        planned = json.loads(plans.read_text(encoding="utf-8")).get("configurations", {})
        absent = [c for c in missing if c not in planned]
        if absent:
            raise NNUNetError(f"nnU-Net's plan for {dataset} has no configuration {', '.join(absent)} (it has "
                              f"{', '.join(planned)}; 3d_lowres exists only for large images); choose another "
                              "@CONFIGURATION.")
        info["configurations"] = sorted({*info["configurations"], *missing})
    atomic_write_text(folder / "preprocessed" / dataset / "splits_final.json", json.dumps(splits_json, indent=1))
    info["splits"] = splits_json
    atomic_write_text(marker, json.dumps(info, indent=1))
    return info


def _processes() -> int:
    """Processes for nnU-Net's conversion and preprocessing: ``nnUNet_def_n_proc``, else this process's cores (at most 8)."""
    try:
        return max(1, int(os.environ["nnUNet_def_n_proc"]))
    except (KeyError, ValueError):
        return max(1, min(8, len(os.sched_getaffinity(0))))


def _remove_tree(path: Path) -> None:
    import shutil

    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


def _int(value: Any) -> int | None:
    """An integer from nnU-Net's ``debug.json`` (which holds every value as text), else None."""
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


# ----------------------------------------------------------------------------------------------
# one run


def _fold_dir(run_dir: Path, dataset: str, system: NNUNetSystem, fold: int) -> Path:
    """nnU-Net's output folder of the run: ``RUN/nnUNet_results/<dataset>/<trainer>__<plans>__<conf>/fold_<f>``."""
    return (run_dir / "nnUNet_results" / dataset / f"{system.trainer}__{system.plans}__{system.configuration}"
            / f"fold_{fold}")


def find_fold_dir(run_dir: str | Path, system: NNUNetSystem, fold: int) -> Path | None:
    """nnU-Net's fold folder inside a run folder, once training has made it (else None)."""
    found = sorted((Path(run_dir) / "nnUNet_results").glob(
        f"Dataset*/{system.trainer}__{system.plans}__{system.configuration}/fold_{fold}"))
    return found[0] if found else None


def run_state(run_dir: str | Path, system: NNUNetSystem, fold: int) -> tuple[str, int]:
    """How far an nnU-Net run got: ``done``, ``evaluate`` (trained), ``resume`` (a checkpoint) or ``fresh``.

    Args:
        run_dir: the run folder.
        system: the run's trainer and configuration.
        fold: nnU-Net's fold (0, or the cross-validation fold).

    Returns:
        ``(state, epochs done)``: the epoch from nnU-Net's training log (0 when unknown).

    Raises:
        ConfigError: the folder holds a run of another trainer, configuration or plans.
    """
    run_dir = Path(run_dir)
    record = _read_json(run_dir / _RUN_RECORD)
    if record is not None and record.get("system") not in (None, system.to_dict()):
        raise ConfigError(f"{run_dir} holds an nnU-Net run of {record['system']}, not {system.to_dict()}; give another "
                          "--out or delete that run folder.")
    fold_dir = find_fold_dir(run_dir, system, fold)
    if fold_dir is None:
        return "fresh", 0
    epoch = read_progress(fold_dir)[0]
    if (fold_dir / "checkpoint_final.pth").is_file():
        return ("done" if (run_dir / "eval" / "summary.json").is_file() else "evaluate"), epoch
    if any((fold_dir / name).is_file() for name in ("checkpoint_latest.pth", "checkpoint_best.pth")):
        return "resume", epoch
    return "fresh", 0


def read_progress(fold_dir: str | Path | None) -> tuple[int, int | None, float | None]:
    """``(epochs finished, epochs planned, last EMA pseudo Dice)`` from nnU-Net's ``debug.json`` and training log."""
    if fold_dir is None:
        return 0, None, None
    fold_dir = Path(fold_dir)
    epochs = _int((_read_json(fold_dir / "debug.json") or {}).get("num_epochs"))
    done, dice = 0, None
    logs = sorted(fold_dir.glob("training_log_*.txt"))
    if logs:
        text = logs[-1].read_text(encoding="utf-8", errors="replace")
        started = [int(m) for m in re.findall(r"Epoch (\d+)\s*$", text, re.MULTILINE)]
        ended = len(re.findall(r"Epoch time: ", text))
        done = ended if ended else max(started, default=0)
        emas = re.findall(r"Yayy! New best EMA pseudo Dice: ([0-9.]+)", text)
        dice = float(emas[-1]) if emas else None
    return done, epochs, dice


_LOGGING = r"""
import json, sys, numpy as np, torch
# nnU-Net's logging holds numpy scalars: allow those and their dtypes, and no other global (no code runs).
core = getattr(np, "_core", None) or np.core
dtypes = [type(np.dtype(t)) for t in (np.float16, np.float32, np.float64, np.int32, np.int64, np.bool_)]
with torch.serialization.safe_globals([core.multiarray.scalar, np.dtype, *dtypes]):
    ck = torch.load(sys.argv[1], map_location="cpu", weights_only=True)
log = ck.get("logging", {})
keep = ("train_losses", "val_losses", "mean_fg_dice", "ema_fg_dice", "epoch_start_timestamps", "epoch_end_timestamps")
print(json.dumps({k: [None if v is None else float(v) for v in log.get(k, [])] for k in keep}))
"""


def _write_training_record(python: str, env: Mapping[str, str], fold_dir: Path, run_dir: Path,
                           system: NNUNetSystem, fold: int, version: str | None) -> None:
    """``config.yaml`` (the trainer's settings) and ``metrics.jsonl`` (per epoch: nnU-Net's train loss and time
    per iteration, its pseudo Dice on validation patches), read from nnU-Net's final checkpoint and ``debug.json``."""
    debug = _read_json(fold_dir / "debug.json") or {}
    epochs, iterations = _int(debug.get("num_epochs")), _int(debug.get("num_iterations_per_epoch"))
    atomic_write_text(run_dir / "config.yaml", yaml.safe_dump({
        "system": system.name, "kind": KIND,
        "nnunet": {**system.to_dict(), "nnunetv2": version, "dataset": fold_dir.parent.parent.name, "fold": fold,
                   "epochs": epochs, "iterations_per_epoch": iterations},
    }, sort_keys=False))
    proc = subprocess.run([python, "-c", _LOGGING, str(fold_dir / "checkpoint_final.pth")], env=dict(env),
                          capture_output=True, text=True)
    try:
        logged = json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return  # no learning curve; the report says the log is missing
    iterations = iterations or 1
    lines = []
    starts, ends = logged.get("epoch_start_timestamps", []), logged.get("epoch_end_timestamps", [])
    for epoch, loss in enumerate(logged.get("train_losses", [])):
        step = (epoch + 1) * iterations
        entry: dict[str, Any] = {"kind": "train", "step": step, "epoch": epoch, "loss": loss}
        if epoch < min(len(starts), len(ends)) and starts[epoch] is not None and ends[epoch] is not None:
            entry["step_time_s"] = (ends[epoch] - starts[epoch]) / iterations  # includes the epoch's validation
        lines.append(entry)
        dice = logged.get("mean_fg_dice", [])
        if epoch < len(dice) and dice[epoch] is not None:
            lines.append({"kind": "val", "step": step, "epoch": epoch, "dice_mean": dice[epoch]})
    atomic_write_text(run_dir / "metrics.jsonl", "".join(json.dumps(e) + "\n" for e in lines))


def _device(device: str) -> str:
    """nnU-Net's ``-device`` for a beseg device setting (``auto``: cuda when this process sees a GPU)."""
    if device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return "cuda" if device.startswith("cuda") else "cpu"


def execute(run_dir: str | Path, system: NNUNetSystem, fold: int, layout: ResultsLayout, task: MSDTask,
            split_file: str | Path, protocol: str, python: str, task_id: str, classes: ClassSpec | None = None,
            device: str = "auto", ranks: int = 1,
            version: str | None = None, progress: bool = True, log: Callable[[str], None] = print,
            label: str | None = None, fence: Callable[[], None] | None = None) -> dict[str, Any]:
    """Train, predict and score one nnU-Net run (the caller holds the run's claim).

    Args:
        run_dir: the run folder (``RESULTS/<system>/repeat<k>[/fold<f>]``).
        system: the trainer, configuration and plans.
        fold: nnU-Net's fold: 0, or the cross-validation fold.
        layout: the results folder (its ``nnunet/`` dataset is prepared first if needed).
        task: the comparison's dataset (MSD layout).
        split_file: this run's beseg split file (its protocol's scored cases are predicted).
        protocol: ``heldout``, ``paper`` or ``cv``.
        python: the nnU-Net environment's interpreter.
        task_id: the task's name in the summary (its preset, ``task09``; or the dataset's id, :func:`dataset_task_id`).
        classes: the scored classes (the task preset's, so that nnU-Net and beseg systems score the same
            classes); None: the ``dataset.json``'s, its ignore label excluded, as ``beseg score`` reads them.
        device: ``auto``, ``cpu`` or ``cuda``.
        ranks: GPUs of one DDP training (nnU-Net's ``-num_gpus``).
        version: the nnunetv2 version (recorded in ``config.yaml``).
        progress: a progress bar while scoring.
        log: progress lines.
        label: the run's name in them (default its folder).
        fence: the claim check, called before each stage that writes the run folder (nnU-Net's own
            processes write between them, unfenced).

    Returns:
        The run's ``eval/summary.json`` object.

    Raises:
        NNUNetError: an nnU-Net command failed or left no checkpoint; the run folder's ``nnunet.log`` has its output.
    """
    from beseg.score import score_predictions

    run_dir = Path(run_dir)
    label = label or str(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    split = load_split(split_file)
    splits = ({f: load_split(p) for f, p in layout.split_files(split.folds).items()} if protocol == "cv"
              else {None: split})
    info = prepare_dataset(layout, task, splits, protocol, [system.configuration], python, log)
    fence = fence or (lambda: None)
    fence()
    atomic_write_text(run_dir / _RUN_RECORD, json.dumps({"system": system.to_dict(), "fold": fold,
                                                         "dataset": info["dataset"], "python": python}))
    dataset = info["dataset"]
    results = run_dir / "nnUNet_results"
    env = nnunet_env(layout.nnunet, results)
    log_file = run_dir / "nnunet.log"
    fold_dir = _fold_dir(run_dir, dataset, system, fold)
    dev = _device(device)
    state, epoch = run_state(run_dir, system, fold)
    if state in ("fresh", "resume"):
        log(f"{label}: nnUNetv2_train {dataset} {system.configuration} {fold} -tr {system.trainer} on {dev}"
            + (f" (resumes after epoch {epoch})" if state == "resume" else "") + f"; output in {log_file}")
        args = [dataset, system.configuration, str(fold), "-tr", system.trainer, "-p", system.plans, "-device", dev]
        if ranks > 1:
            args += ["-num_gpus", str(ranks)]
        fence()
        _nnunet(python, "nnUNetv2_train", args + (["--c"] if state == "resume" else []), env, log_file)
    if not (fold_dir / "checkpoint_final.pth").is_file():
        raise NNUNetError(f"nnUNetv2_train left no {fold_dir / 'checkpoint_final.pth'} (output in {log_file}).")
    fence()
    _write_training_record(python, env, fold_dir, run_dir, system, fold, version)

    # The cases the protocol scores, predicted by this fold's final model from nnU-Net's converted images.
    cases = sorted(split.cases(get_protocol(protocol).eval_split))
    raw = layout.nnunet / "raw" / dataset
    inputs, labels = run_dir / "nnunet_input", run_dir / "nnunet_labels"
    for folder in (inputs, labels):
        _remove_tree(folder)
        folder.mkdir(parents=True)
    for case in cases:
        channels = sorted((raw / "imagesTs").glob(f"{case}_[0-9][0-9][0-9][0-9].nii.gz")) or sorted(
            (raw / "imagesTr").glob(f"{case}_[0-9][0-9][0-9][0-9].nii.gz"))
        if not channels:
            raise NNUNetError(f"{raw}: no converted image of case {case}; delete {layout.nnunet} and rerun.")
        for path in channels:
            _link(path, inputs / path.name)
        _link(task.case(case).label, labels / f"{case}.nii.gz")
    predictions = run_dir / "eval" / "predictions"
    fence()
    _remove_tree(run_dir / "eval")
    log(f"{label}: nnUNetv2_predict {len(cases)} case(s) with checkpoint_final.pth")
    _nnunet(python, "nnUNetv2_predict", ["-i", str(inputs), "-o", str(predictions), "-d", dataset, "-c",
                                         system.configuration, "-f", str(fold), "-tr", system.trainer, "-p",
                                         system.plans, "-chk", "checkpoint_final.pth", "-device", dev], env, log_file)
    unpredicted = [c for c in cases if not (predictions / f"{c}.nii.gz").is_file()]
    if unpredicted:
        raise NNUNetError(f"nnUNetv2_predict wrote no prediction of case(s) {', '.join(unpredicted)} into {predictions} "
                          f"(output in {log_file}).")
    parts = split if split.folds else None
    fence()
    result = score_predictions(
        predictions, labels, run_dir / "eval", classes=classes, dataset_json=task.root / "dataset.json",
        name=system.name, workers=1,
        progress=progress,
        fields={"task": task_id, "system": system.name, "kind": KIND, "protocol": protocol,
                "split": get_protocol(protocol).eval_split, "folds": parts.folds if parts else None,
                "fold": parts.fold if parts else None, "selection": SELECTION, "case_ids": cases,
                "nnunet": {**system.to_dict(), "dataset": dataset, "fold": fold}})
    return result.summary

"""Score a folder of NIfTI predictions against a folder of labels; the per-case table and summary.

Two things live here, because ``beseg evaluate`` and ``beseg score`` must write the same files:

* :func:`summarize` and :func:`write_scores`: the per-case table ``per_case.csv`` (columns
  :data:`CSV_COLUMNS`: ``case, class, dice, hd95_mm, asd_mm, nsd, empty_in, dim``) and
  ``summary.json`` (per-class means, how many values were penalised or undefined, failed cases).
* :func:`score_predictions`: ``beseg score``. Predictions from nnU-Net (``CASE.nii.gz``), MONAI or
  anything else are matched to labels by case id (the file name without ``.nii``/``.nii.gz``) and
  scored per case and class by :func:`beseg.metrics.label_map_metrics` at each label's own voxel
  spacing, in a process pool. nnU-Net v2's ignore label (``"ignore"`` in ``dataset.json``, or
  ``ignore_label``) is no class, and its voxels count in no metric.

How cases count. A case is *scored* when its prediction and label were read and fit the same
grid; its rows enter every mean. A *failed* case (unreadable file, another grid, not a label
map) has no row, is in no mean, and is listed in ``summary.json``'s ``failed`` with the reason.
A label without a prediction is *missing* (listed in ``missing``), a prediction without a label
*extra* (listed in ``extra``); neither is scored. Means skip undefined (NaN) values and count
them; penalised distances (a class empty in exactly one mask, see :mod:`beseg.metrics`) are
numbers and enter the means, and are counted too.
"""

from __future__ import annotations

import csv
import json
import math
import multiprocessing
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from beseg.data.classes import ClassSpec, classes_from_labels, parse_classes
from beseg.data.msd import case_id, list_nifti
from beseg.data.nifti import AFFINE_TOL_MM, check_same_grid, read_label_map
from beseg.data.splits import PROTOCOLS
from beseg.errors import BesegError, ConfigError, DataError
from beseg.fileio import atomic_output, atomic_write_text
from beseg.metrics import BRATS_DISTANCE_PENALTY_MM, DISTANCE_METRICS, METRIC_NAMES, label_map_metrics

__all__ = [
    "CSV_COLUMNS", "IGNORE_NAME", "PROTOCOL_SPLITS", "ScoreResult", "Summary", "summarize", "write_per_case",
    "write_summary", "write_scores", "match_cases", "classes_from_dataset_json", "dataset_json_labels",
    "scored_classes", "score_predictions", "default_workers",
]

#: Columns of ``per_case.csv``, one row per case and class. ``empty_in`` is ``none``,
#: ``prediction``, ``label`` or ``both``: where the class is empty (see :mod:`beseg.metrics`);
#: ``dim`` is 2 or 3: the boundaries the distances were measured on (2D for 2D and single-slice cases).
CSV_COLUMNS: tuple[str, ...] = ("case", "class", *METRIC_NAMES, "empty_in", "dim")

#: The label name that marks nnU-Net v2's ignore label in ``dataset.json`` (either form).
IGNORE_NAME = "ignore"

#: ``protocol`` -> the ``split`` its reported numbers are recorded under (:data:`beseg.data.splits.PROTOCOLS`).
PROTOCOL_SPLITS: dict[str, str] = {name: spec.merged_split for name, spec in PROTOCOLS.items()}

_ONE_EMPTY = ("prediction", "label")


# --------------------------------------------------------------------------- the table and summary


def _value(x: Any) -> float:
    """A metric cell as float: NaN for None, empty or unparsable text."""
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


def _mean(values: Iterable[float]) -> float | None:
    finite = [v for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else None


def _dims(rows: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    """``{"2": cases, "3": cases}``: how many cases were scored with 2D and 3D boundaries (rows without ``dim`` skipped)."""
    by_case: dict[str, set[int]] = {}
    for r in rows:
        try:
            by_case.setdefault(r["case"], set()).add(int(float(r.get("dim"))))  # type: ignore[arg-type]
        except (TypeError, ValueError):
            continue
    counts: dict[str, int] = {}
    for dims in by_case.values():
        for d in dims:
            counts[str(d)] = counts.get(str(d), 0) + 1
    return dict(sorted(counts.items()))


def summarize(
    rows: Sequence[Mapping[str, Any]],
    classes: Sequence[str],
    failed: Iterable[tuple[str, str]] = (),
    nsd_tolerance_mm: float = 1.0,
    distance_penalty_mm: float | None = BRATS_DISTANCE_PENALTY_MM,
    ignore_label: int | None = None,
    **fields: Any,
) -> dict[str, Any]:
    """The ``summary.json`` object of a set of per-case rows.

    Args:
        rows: :func:`beseg.metrics.case_metrics` rows with a ``case`` key (or the same read back
            from ``per_case.csv``: numbers may be text, ``empty_in`` may be absent).
        classes: the scored class names, in column order.
        failed: ``(case, reason)`` of every case that could not be scored.
        nsd_tolerance_mm: the NSD tolerance used (mm), recorded.
        distance_penalty_mm: the distance given to a class empty in exactly one mask (mm), or
            None when such distances were left undefined; recorded.
        ignore_label: the label value whose voxels counted in no metric, or None; recorded.
        **fields: further keys to record (task, system, protocol ...); they may not replace the
            computed keys.

    Returns:
        ``classes``, ``cases`` (number of scored cases), ``failed`` (``[{"case", "reason"}]``),
        ``nsd_tolerance_mm``, ``distance_penalty_mm``, ``ignore_label``, ``dim`` (2 or 3: the
        boundaries every case was scored with, ``"mixed"``, or None for rows without ``dim``),
        ``dim_cases`` (``{"2": cases, "3": cases}``), ``per_class`` (``{class: {metric: mean or
        None}}``, NaN skipped), ``mean`` (the mean over classes of the per-class means), ``counts``
        (``{class: {metric: {"values", "penalised", "undefined"}}}``: finite values in the mean,
        of which penalised, and NaN values left out), ``note``, then ``fields``.

    Raises:
        ValueError: a key of ``fields`` would replace a computed key.
    """
    per_class: dict[str, dict[str, float | None]] = {}
    counts: dict[str, dict[str, dict[str, int]]] = {}
    for name in classes:
        mine = [r for r in rows if r["class"] == name]
        per_class[name], counts[name] = {}, {}
        for metric in METRIC_NAMES:
            values = [_value(r.get(metric)) for r in mine]
            penalised = sum(
                metric in DISTANCE_METRICS and r.get("empty_in") in _ONE_EMPTY and math.isfinite(v)
                for r, v in zip(mine, values)
            )
            per_class[name][metric] = _mean(values)
            counts[name][metric] = {"values": sum(map(math.isfinite, values)), "penalised": int(penalised),
                                    "undefined": sum(not math.isfinite(v) for v in values)}
    penalty = None if distance_penalty_mm is None or math.isnan(distance_penalty_mm) else float(distance_penalty_mm)
    dims = _dims(rows)
    summary: dict[str, Any] = {
        "classes": list(classes),
        "cases": len({r["case"] for r in rows}),
        "failed": [{"case": c, "reason": r} for c, r in failed],
        "nsd_tolerance_mm": nsd_tolerance_mm,
        "distance_penalty_mm": penalty,
        "ignore_label": None if ignore_label is None else int(ignore_label),
        "dim": (int(next(iter(dims))) if len(dims) == 1 else "mixed") if dims else None,
        "dim_cases": dims,
        "per_class": per_class,
        "mean": {m: _mean(v[m] for v in per_class.values() if v[m] is not None) for m in METRIC_NAMES},
        "counts": counts,
        "note": "distances in mm at each label's own voxel spacing; a class empty in exactly one of prediction and "
                + (f"label gets HD95 = ASD = {penalty} mm (BraTS convention), counted as 'penalised' and included in "
                   "the means" if penalty is not None else
                   "label has undefined (NaN) distances, counted as 'undefined' and left out of the means")
                + "; 2D and single-slice cases are scored with 2D boundaries (dim 2)"
                + ("" if ignore_label is None else
                   f"; voxels labelled {int(ignore_label)} (the ignore label) count in no metric")
                + "; failed cases have no rows and are in no mean",
    }
    clash = sorted(set(fields) & set(summary))
    if clash:
        raise ValueError(f"summary fields {clash} are computed from the rows and cannot be given.")
    summary.update(fields)
    return summary


def write_per_case(rows: Sequence[Mapping[str, Any]], path: str | Path) -> None:
    """Write ``per_case.csv`` atomically: columns :data:`CSV_COLUMNS`, NaN as ``nan``.

    A row without ``empty_in`` (read from an older table) gets an empty cell.

    Raises:
        OSError: the file cannot be written (a previous file is left as it was).
        ValueError: a row has a key that is not a column.
    """
    with atomic_output(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(CSV_COLUMNS), restval="")
        writer.writeheader()
        writer.writerows(rows)


@dataclass(frozen=True)
class Summary:
    """A ``summary.json``, read and written only through this class (``beseg evaluate``, ``beseg score``,
    the fold merge and the report all use it).

    The object is what :func:`summarize` returns; the typed properties are the fields other code
    decides on. Unknown keys are kept as they are.

    Attributes:
        data: the whole JSON object.
    """

    data: Mapping[str, Any]

    @classmethod
    def read(cls, path: str | Path) -> Summary:
        """Read and check a ``summary.json``.

        Raises:
            DataError: the file is missing, not JSON, or lacks a ``task`` string and a non-empty
                ``classes`` list (naming the file).
        """
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
        if not isinstance(data, dict) or not isinstance(data.get("task"), str) or not (
            isinstance(data.get("classes"), list) and data["classes"]
        ):
            raise DataError(f"{path}: needs a 'task' string and a non-empty 'classes' list")
        return cls(data)

    def write(self, path: str | Path) -> None:
        """Write atomically (indented JSON; anything not JSON, such as a path, as text).

        Raises:
            OSError: the file cannot be written (a previous file is left as it was).
        """
        atomic_write_text(path, json.dumps(dict(self.data), indent=2, default=str))

    @property
    def task(self) -> str:
        return str(self.data["task"])

    @property
    def classes(self) -> list[str]:
        return [str(c) for c in self.data["classes"]]

    @property
    def protocol(self) -> str | None:
        """``heldout``, ``cv``, ``paper``, or None (training cases, or an older file)."""
        return self.data.get("protocol")

    @property
    def split(self) -> str | None:
        return self.data.get("split")

    @property
    def folds(self) -> int | None:
        return self.data.get("folds")

    @property
    def case_ids(self) -> list[str] | None:
        """The cases asked for (scored and failed), when recorded."""
        ids = self.data.get("case_ids")
        return [str(c) for c in ids] if isinstance(ids, list) else None

    @property
    def failed(self) -> list[tuple[str, str]]:
        """``(case, reason)`` of the cases that could not be scored."""
        entries = self.data.get("failed")
        if not isinstance(entries, list):
            return []
        return [(str(e.get("case", "?")), str(e.get("reason", ""))) for e in entries if isinstance(e, dict)]

    @property
    def mean(self) -> dict[str, float | None]:
        return dict(self.data.get("mean") or {})


def write_summary(summary: Mapping[str, Any], path: str | Path) -> None:
    """Write ``summary.json`` atomically through :class:`Summary`.

    Raises:
        OSError: the file cannot be written (a previous file is left as it was).
    """
    Summary(summary).write(path)


def write_scores(out_dir: str | Path, rows: Sequence[Mapping[str, Any]], summary: Mapping[str, Any]) -> None:
    """Write ``out_dir/per_case.csv`` and then ``out_dir/summary.json`` (:func:`write_per_case`, :func:`write_summary`).

    The summary last, so a folder with a ``summary.json`` has the matching table.

    Raises:
        OSError, ValueError: as :func:`write_per_case` and :func:`write_summary`.
    """
    out_dir = Path(out_dir)
    write_per_case(rows, out_dir / "per_case.csv")
    write_summary(summary, out_dir / "summary.json")


# --------------------------------------------------------------------------- classes and cases


def classes_from_dataset_json(path: str | Path) -> ClassSpec:
    """The scored classes of a ``dataset.json``: MSD (``{"1": "spleen"}``) or nnU-Net v2 (``{"spleen": 1}``).

    The first element of :func:`dataset_json_labels`: the ignore label is not a class.

    Raises:
        DataError: as :func:`dataset_json_labels`.
    """
    return dataset_json_labels(path)[0]


def dataset_json_labels(path: str | Path) -> tuple[ClassSpec, int | None]:
    """The scored classes and the ignore label of a ``dataset.json``, MSD or nnU-Net v2 form.

    MSD maps values to names (``{"0": "background", "1": "spleen"}``), nnU-Net v2 names to values
    (``{"background": 0, "spleen": 1}``), where region-based datasets give a region as a list of
    label values (``"tumor core": [2, 3]``). The background (value 0) is never scored. A label
    named ``"ignore"`` (nnU-Net v2's ignore label, in either form) is not a class: its value is
    returned as the ignore label.

    Returns:
        ``(classes, ignore_label)``; ``ignore_label`` is None when there is none.

    Raises:
        DataError: the file is missing, not JSON, has no ``labels`` mapping, the mapping is
            neither form, the ignore label is not one integer or is also a class's value; the
            message names the file.
    """
    path = Path(path)
    try:
        labels = json.loads(path.read_text(encoding="utf-8")).get("labels")
    except OSError as err:
        raise DataError(f"{path}: cannot read it ({err.strerror or err}).") from None
    except (json.JSONDecodeError, AttributeError) as err:
        raise DataError(f"{path}: not a JSON object with a 'labels' mapping ({err}).") from None
    if not isinstance(labels, dict) or not labels:
        raise DataError(f"{path}: needs a non-empty 'labels' mapping.")
    try:
        if all(str(k).strip().lstrip("-").isdigit() for k in labels):  # MSD: value -> name
            ignore = [int(k) for k, name in labels.items() if name == IGNORE_NAME]
            spec = classes_from_labels({k: name for k, name in labels.items() if name != IGNORE_NAME})
        else:
            out = []
            ignore = []
            for name, value in labels.items():  # nnU-Net v2: name -> value or region (list of values)
                if name == IGNORE_NAME:
                    if isinstance(value, bool) or not isinstance(value, int):
                        raise DataError(f"{path}: the ignore label must be one integer label value, got {value!r}.")
                    ignore.append(value)
                    continue
                values = tuple(int(v) for v in (value if isinstance(value, list) else [value]))
                if values and set(values) != {0}:
                    out.append((str(name), tuple(v for v in values if v != 0)))
            if not out:
                raise ConfigError("the labels declare no class besides the background (0) and the ignore label.")
            spec = tuple(out)
    except (ConfigError, TypeError, ValueError) as err:
        raise DataError(f"{path}: 'labels' is neither MSD's {{value: name}} nor nnU-Net's {{name: value or "
                        f"[values]}} ({err}).") from None
    if len(ignore) > 1:
        raise DataError(f"{path}: more than one label is named {IGNORE_NAME!r} ({ignore}); nnU-Net allows one.")
    ignore_label = ignore[0] if ignore else None
    clash = [name for name, values in spec if ignore_label in values]
    if clash:
        raise DataError(f"{path}: the ignore label {ignore_label} is also a value of {', '.join(clash)}.")
    return spec, ignore_label


def match_cases(pred_dir: str | Path, labels_dir: str | Path) -> tuple[list[tuple[str, Path, Path]], list[str], list[str]]:
    """Pair prediction and label files by case id (file name without ``.nii``/``.nii.gz``).

    Files that are not NIfTI (nnU-Net's ``plans.json``, ``summary.json`` ...) and macOS ``._``
    files are ignored.

    Returns:
        ``(pairs, missing, extra)``: ``(case, prediction, label)`` sorted by case; case ids with a
        label but no prediction; case ids with a prediction but no label.

    Raises:
        DataError: a folder does not exist, has no NIfTI file, or holds one case twice
            (``x.nii`` and ``x.nii.gz``).
    """
    found = []
    for folder, what in ((Path(pred_dir), "prediction"), (Path(labels_dir), "label")):
        if not folder.is_dir():
            raise DataError(f"{folder}: {what} folder does not exist.")
        files: dict[str, Path] = {}
        for path in list_nifti(folder):
            cid = case_id(path)
            if cid in files:
                raise DataError(f"{folder}: case {cid} has two {what} files, {files[cid].name} and {path.name}.")
            files[cid] = path
        if not files:
            raise DataError(f"{folder}: no {what} files (.nii or .nii.gz).")
        found.append(files)
    preds, labels = found
    pairs = [(c, preds[c], labels[c]) for c in sorted(set(preds) & set(labels))]
    return pairs, sorted(set(labels) - set(preds)), sorted(set(preds) - set(labels))


def _label_values(path: Path) -> set[int]:
    """The label values of one label map (worker function)."""
    return {int(v) for v in np.unique(read_label_map(path, "label")[0])}


def scored_classes(
    labels_dir: str | Path,
    classes: str | ClassSpec | None = None,
    dataset_json: str | Path | None = None,
    workers: int = 1,
    ignore_label: int | None = None,
) -> tuple[ClassSpec, str, int | None, str | None]:
    """The classes to score, the ignore label, and where they came from.

    Classes, in order: ``classes`` (``"TC=2,3;WT=1,2,3;ET=3"`` or a :data:`ClassSpec`), else
    ``dataset_json``, else the ``dataset.json`` beside the labels folder (nnU-Net's raw
    ``DatasetXXX/labelsTr`` and preprocessed ``gt_segmentations``, MSD's ``labelsTr``), else every
    non-zero value found in the label files (but the ignore label), each its own class named by
    its value.

    The ignore label: ``ignore_label``, else the ``"ignore"`` label of ``dataset_json`` or of the
    ``dataset.json`` beside the labels (read for it also when ``classes`` is given), else none.

    Returns:
        ``(classes, source, ignore_label, ignore_source)``: the classes, a phrase naming their
        source for the summary, the ignore label (None if none) and its source (None if none).

    Raises:
        ConfigError: ``classes`` text is malformed, ``ignore_label`` contradicts the
            ``dataset.json``'s, or a class holds the ignore label.
        DataError: the ``dataset.json`` is unusable, or the readable labels hold no non-zero value.
    """
    json_path = Path(dataset_json) if dataset_json is not None else Path(labels_dir).parent / "dataset.json"
    from_json: tuple[ClassSpec, int | None] | None = None
    if dataset_json is not None or json_path.is_file():
        from_json = dataset_json_labels(json_path)
    ignore_source = None
    if ignore_label is not None:
        ignore_label, ignore_source = int(ignore_label), "--ignore-label"
        if from_json is not None and from_json[1] is not None and from_json[1] != ignore_label:
            raise ConfigError(f"--ignore-label {ignore_label} contradicts {json_path}, whose ignore label is "
                              f"{from_json[1]}.")
    elif from_json is not None and from_json[1] is not None:
        ignore_label, ignore_source = from_json[1], str(json_path)
    if classes is not None:
        spec = parse_classes(classes) if isinstance(classes, str) else tuple(classes)
        source = "--classes"
    elif from_json is not None:
        spec, source = from_json[0], str(json_path)
    else:
        files = list_nifti(labels_dir)
        values: set[int] = set()
        for found in _map(_label_values, [(f,) for f in files], workers, "label values", progress=False):
            if not isinstance(found, BaseException):  # an unreadable label fails its own case later, with the reason
                values |= found
        values -= {0, ignore_label}
        if not values:
            raise DataError(f"{labels_dir}: the labels hold no non-zero value to score"
                            + (f" besides the ignore label {ignore_label}." if ignore_label is not None else "."))
        spec, source = tuple((str(v), (v,)) for v in sorted(values)), f"the label values found in {labels_dir}"
    clash = [name for name, values in spec if ignore_label is not None and ignore_label in values]
    if clash:
        raise ConfigError(f"class {', '.join(clash)} ({source}) holds the ignore label {ignore_label} "
                          f"({ignore_source}); the ignore label is not a class.")
    return spec, source, ignore_label, ignore_source


# --------------------------------------------------------------------------- scoring one case


def _score_case(case: str, pred_path: Path, label_path: Path, classes: ClassSpec, nsd_tolerance_mm: float,
                distance_penalty_mm: float | None, affine_tol_mm: float,
                ignore_label: int | None = None) -> list[dict[str, Any]]:
    """The rows of one case (worker function).

    Raises:
        DataError: a file is unreadable or not a label map, or the two grids differ.
        ValueError: from the metrics, on inputs they reject.
    """
    label, label_header = read_label_map(label_path, "label")
    pred, pred_header = read_label_map(pred_path, "prediction")
    check_same_grid(pred_header, label_header, affine_tol_mm)
    rows = label_map_metrics(pred, label, classes, label_header.spacing, nsd_tolerance_mm, ignore_label,
                             distance_penalty_mm)
    return [{"case": case, **row} for row in rows]


def _init_worker() -> None:
    # One thread per process: the pool is the parallelism, more threads would only compete.
    import torch

    torch.set_num_threads(1)


def _call(fn: Callable[..., Any], args: tuple) -> Any:
    """``fn(*args)``, or the user-facing error it raised, returned rather than raised."""
    try:
        return fn(*args)
    except (BesegError, OSError, ValueError, MemoryError) as err:
        return err if isinstance(err, BesegError) else DataError(f"{args[0]}: {type(err).__name__}: {err}")


def _map(fn: Callable[..., Any], jobs: Sequence[tuple], workers: int, desc: str, progress: bool = True) -> list[Any]:
    """``[fn(*job) for job in jobs]`` in a process pool of ``workers`` (in this process for 1).

    A job's user-facing error (:class:`BesegError`, ``OSError``, ``ValueError``) is returned in
    its place; a worker process that dies (killed for memory) fails the jobs it left unfinished.
    """
    from tqdm.auto import tqdm

    results: list[Any] = [None] * len(jobs)
    bar = tqdm(total=len(jobs), desc=desc, unit="case", disable=not progress)
    try:
        if workers <= 1 or len(jobs) <= 1:
            for i, job in enumerate(jobs):
                results[i] = _call(fn, job)
                bar.update()
            return results
        # spawn, not fork: forking a process that holds torch's thread pools can deadlock the child.
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=context,
                                 initializer=_init_worker) as pool:
            futures = {pool.submit(_call, fn, job): i for i, job in enumerate(jobs)}
            for future in as_completed(futures):
                i = futures[future]
                try:
                    results[i] = future.result()
                except BrokenProcessPool:
                    results[i] = DataError(f"{jobs[i][0]}: the worker process died (out of memory?); "
                                           "try fewer --workers.")
                bar.update()
        return results
    finally:
        bar.close()


# --------------------------------------------------------------------------- scoring a folder


@dataclass
class ScoreResult:
    """What :func:`score_predictions` scored and wrote.

    Attributes:
        out_dir: the folder holding ``per_case.csv`` and ``summary.json``.
        name: the system name (the prediction folder's name unless given).
        predictions: the prediction folder.
        rows: the per-case rows, sorted by case, classes in order.
        failed: ``(case, reason)`` of the cases that could not be scored.
        missing: case ids with a label but no prediction.
        extra: case ids with a prediction but no label.
        summary: the ``summary.json`` object.
    """

    out_dir: Path
    name: str
    predictions: Path
    rows: list[dict[str, Any]] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True when every labelled case had a prediction and was scored."""
        return not self.failed and not self.missing


def default_workers() -> int:
    """Worker processes by default: the CPUs this process may use, at most 8."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(8, cpus))


def _task_name(labels_dir: Path, source: str) -> str:
    """A name for the labelled data: dataset.json's ``name``, else the dataset folder's name."""
    if source.endswith("dataset.json"):
        try:
            name = json.loads(Path(source).read_text(encoding="utf-8")).get("name")
            if isinstance(name, str) and name.strip():
                return name.strip()
        except (OSError, ValueError, AttributeError):
            pass
    folder = labels_dir.resolve()
    return folder.parent.name if folder.name in ("labelsTr", "labelsTs", "gt_segmentations") else folder.name


def score_predictions(
    pred_dir: str | Path,
    labels_dir: str | Path,
    out_dir: str | Path,
    classes: str | ClassSpec | None = None,
    dataset_json: str | Path | None = None,
    nsd_tolerance_mm: float = 1.0,
    distance_penalty_mm: float | None = BRATS_DISTANCE_PENALTY_MM,
    affine_tol_mm: float = AFFINE_TOL_MM,
    ignore_label: int | None = None,
    workers: int | None = None,
    name: str | None = None,
    protocol: str | None = None,
    only_predicted: bool = False,
    progress: bool = True,
    fields: Mapping[str, Any] | None = None,
) -> ScoreResult:
    """Score every prediction of ``pred_dir`` against its label; write ``per_case.csv`` and ``summary.json``.

    Args:
        pred_dir: folder of predicted label maps, ``CASE.nii.gz`` or ``CASE.nii`` (nnU-Net's
            ``nnUNetv2_predict`` output or ``fold_k/validation``, MONAI's ``SaveImage`` ...).
        labels_dir: folder of ground-truth label maps with the same case ids (nnU-Net's
            ``labelsTr`` or ``gt_segmentations``, MSD's ``labelsTr``).
        out_dir: where to write the two files (created).
        classes: the scored classes as ``"NAME=V[,V...];..."`` (a region joins several label
            values) or a :data:`ClassSpec`; default see :func:`scored_classes`.
        dataset_json: a ``dataset.json`` (MSD or nnU-Net v2) naming the classes.
        nsd_tolerance_mm: NSD tolerance (mm).
        distance_penalty_mm: HD95 and ASD of a class empty in exactly one mask (mm; default the
            BraTS 373.13 mm); None leaves them undefined.
        affine_tol_mm: largest allowed difference between a prediction's and its label's affine
            entries (mm).
        ignore_label: label value whose voxels (where the label holds it) count in no metric, as
            nnU-Net v2's ignore label; default the ``"ignore"`` label of the ``dataset.json`` (see
            :func:`scored_classes`), else none.
        workers: worker processes (default :func:`default_workers`; 1 scores in this process).
        name: the system's name in the summary (default the prediction folder's name).
        protocol: how the predictions were made, if known: ``heldout`` (test cases), ``cv``
            (out-of-fold, e.g. nnU-Net's ``fold_k/validation`` folders merged) or ``paper``
            (cases that chose the checkpoint); recorded for the report. None: not recorded.
        only_predicted: the predictions cover a chosen subset of the labelled cases (one
            nnU-Net fold's ``validation`` folder against the whole ``labelsTr``): labels without a
            prediction are listed in ``summary.json`` as ``not_predicted`` instead of ``missing``.
        progress: show a progress bar.
        fields: ``summary.json`` fields to record instead of the defaults (``task``, ``system``,
            ``protocol``, ``split``, ``selection``, ``case_ids``...), for a caller that knows how the
            predictions were made (a comparison's nnU-Net run); not the keys computed from the rows.

    Returns:
        A :class:`ScoreResult`; unreadable cases and grid mismatches are in ``failed``.

    Raises:
        DataError: a folder is missing or holds no NIfTI file, a case has two files, the classes
            cannot be determined, or no case has both a prediction and a label.
        ConfigError: ``classes`` text is malformed, or the ignore label is contradicted or a class's.
        ValueError: an invalid tolerance, penalty, worker count or protocol.
    """
    pred_dir, labels_dir, out_dir = Path(pred_dir), Path(labels_dir), Path(out_dir)
    workers = default_workers() if workers is None else int(workers)
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}.")
    if not (math.isfinite(nsd_tolerance_mm) and nsd_tolerance_mm >= 0):
        raise ValueError(f"the NSD tolerance must be a finite number >= 0 mm, got {nsd_tolerance_mm}.")
    if not (math.isfinite(affine_tol_mm) and affine_tol_mm >= 0):
        raise ValueError(f"the affine tolerance must be a finite number >= 0 mm, got {affine_tol_mm}.")
    if distance_penalty_mm is not None and math.isnan(distance_penalty_mm):
        distance_penalty_mm = None
    if distance_penalty_mm is not None and not (math.isfinite(distance_penalty_mm) and distance_penalty_mm >= 0):
        raise ValueError(f"the distance penalty must be a finite number >= 0 mm (or nan), got {distance_penalty_mm}.")
    if protocol is not None and protocol not in PROTOCOL_SPLITS:
        raise ValueError(f"protocol must be one of {', '.join(PROTOCOL_SPLITS)}, got {protocol!r}.")
    pairs, missing, extra = match_cases(pred_dir, labels_dir)
    not_predicted = missing if only_predicted else []
    missing = [] if only_predicted else missing
    if not pairs:
        raise DataError(f"{pred_dir}: none of its {len(extra)} prediction(s) has a label in {labels_dir} "
                        "(cases are matched by file name without .nii/.nii.gz).")
    spec, source, ignore_label, ignore_source = scored_classes(labels_dir, classes, dataset_json, workers, ignore_label)
    name = name or pred_dir.resolve().name

    jobs = [(case, pred, label, spec, nsd_tolerance_mm, distance_penalty_mm, affine_tol_mm, ignore_label)
            for case, pred, label in pairs]
    result = ScoreResult(out_dir, name, pred_dir, missing=missing, extra=extra)
    for (case, _, _), out in zip(pairs, _map(_score_case, jobs, workers, f"score {name}", progress)):
        if isinstance(out, BaseException):
            result.failed.append((case, str(out)))
        else:
            result.rows.extend(out)
    recorded: dict[str, Any] = dict(
        task=_task_name(labels_dir, source), system=name, origin="beseg score", predictions=str(pred_dir.resolve()),
        labels=str(labels_dir.resolve()), classes_from=source, class_values={n: list(v) for n, v in spec},
        ignore_label_from=ignore_source, missing=missing, not_predicted=not_predicted, extra=extra, protocol=protocol,
        split=PROTOCOL_SPLITS.get(protocol or ""), folds=None, selection=None, case_ids=[c for c, _, _ in pairs],
    )
    recorded.update(fields or {})
    result.summary = summarize(
        result.rows, [n for n, _ in spec], result.failed, nsd_tolerance_mm, distance_penalty_mm, ignore_label,
        **recorded)
    write_scores(out_dir, result.rows, result.summary)
    return result

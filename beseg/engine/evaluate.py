"""Evaluation: sliding-window inference on every case of a split, metrics per case and class in mm.

Predictions are brought back to each image's original geometry (as ``beseg predict`` writes them)
and scored against the original label at its own voxel spacing, so the distances are those of the
data as acquired, not of the 1 mm training grid. Each label goes through the same input check as
``beseg score`` (:func:`beseg.data.nifti.read_label_map`, :func:`beseg.data.nifti.check_same_grid`):
an integer label map on its image's grid (shape, and affine within
:data:`beseg.data.nifti.AFFINE_TOL_MM`), checked before the image is predicted; a label that fails
fails its case with the reason. Cases are scored by :func:`beseg.metrics.label_map_metrics`, as
``beseg score`` scores them.

A run trained from the preprocessed store (``data.cache: store``) is evaluated from it: each image is read
from the store (:func:`predict_stored`: the same labels as reading the NIfTI image, which is never opened);
the label is still read from its NIfTI file.

Writes ``eval/per_case.csv`` (case, class, dice, hd95_mm, asd_mm, nsd, empty_in), ``eval/summary.json``
(both by :mod:`beseg.score`, as ``beseg score`` writes them) and ``eval/predictions/<case>.nii.gz`` into
the run folder (or ``out``).

Which cases: the ``test`` cases of the run's own split (``RUN_DIR/split.json``, else ``data.split_file``, or
the cache's ``split.json``) by default, which neither training nor the choice of ``best.pt`` saw. The summary
records how the numbers were made (:func:`protocol_fields`): ``protocol`` (``heldout``, ``cv``,
``paper``, or ``null`` for training cases), ``split``, ``folds``, ``fold``, ``selection`` and the
``case_ids`` scored.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch

from beseg.data import Split, as_task, default_cache_dir, load_split
from beseg.data.splits import PROTOCOLS as PROTOCOL_SPECS
from beseg.data.splits import get_protocol
from beseg.data.classes import class_masks
from beseg.data.msd import Case, MSDTask
from beseg.data.nifti import AFFINE_TOL_MM, NiftiHeader, check_same_grid, read_header, read_label_map
from beseg.data.store import Store, open_store
from beseg.engine.rundir import RunDir
from beseg.engine.predict import LoadedModel, ensemble_labels, load_model, predict_image, write_label
from beseg.errors import BesegError, DataError
from beseg.fileio import LockLostError
from beseg.metrics import BRATS_DISTANCE_PENALTY_MM, label_map_metrics
from beseg.score import summarize, write_scores
from beseg_runtime.geometry import grid_of, to_input_grid

__all__ = ["EVAL_SPLITS", "PROTOCOLS", "EvalSummary", "evaluate", "one_hot_scored", "predict_stored", "protocol_fields",
           "run_split", "run_store", "stored_header", "to_original_grid"]

#: ``evaluate(split=...)`` values: the run's held-out test cases (default), its validation cases
#: (which chose best.pt: optimistic), its training cases, or every labelled case.
EVAL_SPLITS = ("test", "val", "train", "all")
#: How a number was made (:data:`beseg.data.splits.PROTOCOLS`): held-out test cases, out-of-fold
#: k-fold predictions, or the paper's protocol (scored on the cases that chose the checkpoint).
PROTOCOLS = tuple(PROTOCOL_SPECS)


@dataclass
class EvalSummary:
    out_dir: Path
    rows: list[dict[str, Any]] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)


def one_hot_scored(labels: np.ndarray, loaded: LoadedModel) -> np.ndarray:
    """A label map in the dataset's values -> (K', H, W, D) bool masks of the scored classes.

    The same masks validation scores: ``class_masks(labels, preset.scored_classes)``, for the
    prediction and the truth alike.
    """
    return class_masks(labels, loaded.preset.scored_classes)


def run_split(loaded: LoadedModel, task_root: Path, case_ids: list[str],
              split_file: str | Path | None = None) -> tuple[Split, Path]:
    """The split a run was trained with: ``split_file`` where the caller knows the file's present place (a
    moved results folder), else the run folder's own ``split.json``, else its config's ``data.split_file``,
    else the cache's ``split.json``.

    Raises:
        DataError: the file is missing (evaluation never makes a new split: it could put training
            cases into the test set), invalid, or names cases not in the task.
    """
    cfg = loaded.config.data
    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir(task_root)
    if split_file is None:
        split_file = Path(cfg.split_file) if cfg.split_file else cache_dir / "split.json"
        own = RunDir(loaded.checkpoint.parent.parent).split
        if own.is_file():
            split_file = own  # the run's own record of its cases (written when it started training)
    split_file = Path(split_file)
    if not split_file.is_file():
        raise DataError(
            f"{split_file}: split file not found; it holds the split {loaded.checkpoint} was trained with, and "
            "without it the held-out cases cannot be told from the training cases (--split all scores every case)."
        )
    return load_split(split_file, known_ids=case_ids), split_file


def protocol_fields(split: str, parts: Split | None, checkpoint: Path, protocol: str | None = None) -> dict[str, Any]:
    """The summary.json fields that say how the scores were made.

    Args:
        split: the evaluated part (``test``, ``val``, ``train``, ``all``).
        parts: the run's split (``None`` only for ``all``).
        checkpoint: the scored checkpoint (``best.pt`` was chosen by validation Dice).
        protocol: ``heldout``, ``cv`` or ``paper``; ``None`` infers it: ``test`` cases of a fold
            are ``cv``, other ``test`` cases ``heldout``, ``val`` cases ``paper`` (they chose the
            checkpoint), training cases none.

    Returns:
        ``{"protocol", "split", "folds", "fold", "selection"}``.

    Raises:
        ValueError: an unknown protocol, or one that contradicts the split (``heldout`` and
            ``cv`` are scored on test cases, ``paper`` on validation cases).
    """
    folds = parts.folds if parts is not None else None
    inferred = {"test": "cv" if folds else "heldout", "val": "paper"}.get(split)
    if protocol is not None:
        if get_protocol(protocol).eval_split != split or protocol != inferred:
            raise ValueError(f"protocol {protocol!r} does not fit split {split!r}"
                             + (f" of this run (that is protocol {inferred!r})" if inferred else "")
                             + ": heldout and cv score the test cases, paper the validation cases.")
    name = Path(checkpoint).name
    selection = {"best.pt": "best.pt by val Dice", "last.pt": "last.pt (final epoch, no selection)"}.get(name, name)
    return {"protocol": inferred, "split": split, "folds": folds,
            "fold": parts.fold if parts is not None else None, "selection": selection}


def run_store(loaded: LoadedModel, task: MSDTask) -> Store | None:
    """The preprocessed store the run trained and validated from (its config's ``data.cache`` is ``store``
    or ``disk``, in its ``data.cache_dir``), or ``None`` for the other cache modes (NIfTI images are read)."""
    cfg = loaded.config.data
    if cfg.cache not in ("store", "disk"):
        return None
    return open_store(task, loaded.preset, cfg.cache_dir)


def predict_stored(loaded: LoadedModel, store: Store, case: Case) -> np.ndarray:
    """Label map of a case read from the store, in its image's own voxel grid: the same numbers as
    :func:`~beseg.engine.predict.predict_image` on the case's NIfTI image, without reading it.

    The stored volume (crop undone by zero padding, as validation reads it) gets the normalisation the
    store leaves to reading time (:meth:`~beseg.data.presets.TaskPreset.read_transform`), the model's
    sliding window, and :func:`beseg_runtime.geometry.to_input_grid` (nearest neighbour) back to the
    grid recorded in the case's properties.

    Returns:
        (H, W, D) uint8 label map on the original image's grid.

    Raises:
        DataError: the case is not complete in the store (call :meth:`Store.ensure` first).
    """
    props = store.properties(case)
    image = torch.from_numpy(store.volume(case.id)[0])
    read = loaded.preset.read_transform(loaded.stats)
    if read is not None:
        image = torch.as_tensor(read(image), dtype=torch.float32)
    labels = ensemble_labels([loaded], lambda _: image)[0].numpy()
    return to_original_grid(labels, props)


def to_original_grid(labels: np.ndarray, props: dict[str, Any]) -> np.ndarray:
    """A label map on a stored case's resampled grid -> the same map on its image's original grid (nearest
    neighbour, :func:`beseg_runtime.geometry.to_input_grid`).

    Args:
        labels: (X, Y, Z) label map on the stored grid (``props["shape"]``, RAS at the preset's spacing).
        props: the case's store properties (:meth:`beseg.data.store.Store.build_case`).

    Returns:
        (H, W, D) uint8 label map on the original image's grid.
    """
    grid = grid_of(np.asarray(props["original_affine"]), props["original_shape"], "RAS",
                   np.asarray(props["affine"]), props["shape"])
    return to_input_grid(labels, grid)


def stored_header(case: Case, props: dict[str, Any]) -> NiftiHeader:
    """The geometry of a case's image as the store recorded it (:meth:`Store.build_case`)."""
    return NiftiHeader(Path(case.image), tuple(props["original_shape"]), np.asarray(props["original_affine"]),
                       tuple(props["original_spacing"]), np.dtype(np.float32))  # type: ignore[arg-type]


def evaluate(checkpoint: str | Path, data: MSDTask | str | Path, split: str = "test", out: str | Path | None = None,
             nsd_tolerance_mm: float = 1.0, device: str = "auto", progress: bool = True,
             protocol: str | None = None,
             distance_penalty_mm: float | None = BRATS_DISTANCE_PENALTY_MM,
             affine_tol_mm: float = AFFINE_TOL_MM, split_file: str | Path | None = None,
             from_store: bool | None = None, fence: Callable[[], None] | None = None) -> EvalSummary:
    """Score a trained model on the ``split`` cases of the task ``data``.

    Args:
        checkpoint: checkpoint file, or run folder (its best checkpoint).
        data: the task trained on (:func:`beseg.data.load_task`), or its MSD-layout folder, loaded here once.
        split: ``test`` (the held-out cases of the run's split file, the default), ``val`` (the
            cases that chose ``best.pt``: optimistic), ``train`` or ``all`` (every labelled case).
        out: output folder; default ``<run folder>/eval``.
        nsd_tolerance_mm: boundary tolerance of the normalised surface Dice (mm).
        device: ``auto``, ``cpu`` or ``cuda``.
        progress: show a progress bar.
        protocol: ``heldout``, ``cv`` or ``paper``, recorded in ``summary.json``; ``None``
            infers it from the split (see :func:`protocol_fields`).
        distance_penalty_mm: HD95 and ASD (mm) of a class empty in exactly one of prediction and
            label (default 373.13 mm, the BraTS convention); ``None`` leaves them undefined (NaN,
            counted in ``summary.json``). See :func:`beseg.metrics.case_metrics`.
        affine_tol_mm: largest allowed difference between a label's and its image's affine
            entries (mm); a label on another grid fails its case.
        split_file: the run's split file, where it is now (default: the run folder's own record, else
            the one its config names).
        from_store: read each case's image from the run's preprocessed store (building the case there
            first if missing) instead of its NIfTI file; ``None``: when the run's ``data.cache`` is the
            store. Both give the same labels; the label is always read from its NIfTI file.
        fence: called before every file written (the run's claim check, :meth:`beseg.engine.rundir.RunDir.check`):
            a run taken over by another process stops without writing.

    Returns:
        An :class:`EvalSummary`; cases that could not be read, whose label is not an integer label
        map, or whose label is on another grid than its image are listed in ``failed``.

    Raises:
        CheckpointError, DataError, ConfigError: the model or the dataset cannot be used at all,
            the run's split file is missing, or ``split="test"`` on a two-way split (no test cases).
        LockLostError: from ``fence``: the run was taken over; nothing more was written.
        ValueError: an unknown split or protocol, or a protocol that contradicts the split.
    """
    from tqdm.auto import tqdm

    if split not in EVAL_SPLITS:
        raise ValueError(f"--split must be {', '.join(EVAL_SPLITS[:-1])} or {EVAL_SPLITS[-1]}, got {split!r}.")
    loaded = load_model(checkpoint, device)
    task = as_task(data)  # a listed file that is missing fails its case, not the run
    ids = [c.id for c in task.training]
    parts: Split | None = None
    if split == "all":
        chosen = ids
    else:
        parts, split_file = run_split(loaded, task.root, ids, split_file)
        chosen = parts.cases(split)
        if split == "test" and not chosen:
            raise DataError(
                f"{split_file}: no test cases: a two-way train/val split (the paper's protocol, or a split made before "
                "held-out test sets), so nothing was held out from the choice of best.pt. --split val scores the "
                "validation cases (optimistic: they chose best.pt); retrain on a train/val/test split for held-out "
                "numbers."
            )
    fields = protocol_fields(split, parts, loaded.checkpoint, protocol)
    run_root = loaded.checkpoint.parent.parent
    out_dir = Path(out) if out is not None else run_root / "eval"
    names = loaded.preset.class_names
    result = EvalSummary(out_dir)
    store = run_store(loaded, task) if from_store is not False else None
    if from_store and store is None:
        raise ValueError(f"from_store: {loaded.checkpoint} was trained with data.cache={loaded.config.data.cache!r}, "
                         "not the preprocessed store.")
    for cid in tqdm(chosen, desc=f"evaluate {split}", unit="case", disable=not progress):
        case = task.case(cid)
        try:
            # The label is checked before the (costly) prediction: an integer map on its image's grid.
            truth, truth_header = read_label_map(case.label, "label")
            if store is None:
                check_same_grid(truth_header, read_header(case.image), affine_tol_mm, "label", "image")
                labels, ref = predict_image(loaded, case.image)
            else:
                store.ensure(case)  # a test case enters the store the first time it is evaluated
                check_same_grid(truth_header, stored_header(case, store.properties(case)), affine_tol_mm,
                                "label", "image")
                # The label is on the image's grid (checked): its header carries the prediction.
                labels, ref = predict_stored(loaded, store, case), nib.load(str(case.label))
            if fence is not None:
                fence()
            write_label(labels, ref, out_dir / "predictions" / f"{cid}.nii.gz")
            scores = label_map_metrics(labels, truth, loaded.preset.scored_classes, truth_header.spacing,
                                       nsd_tolerance_mm, distance_penalty_mm=distance_penalty_mm)
        except LockLostError:
            raise
        except (BesegError, OSError, ValueError) as err:
            result.failed.append((cid, str(err)))
            continue
        result.rows.extend({"case": cid, **row} for row in scores)
    # How these numbers were made (protocol, split, selection, cases) goes into the summary: the report reads it.
    result.summary = summarize(result.rows, names, result.failed, nsd_tolerance_mm, distance_penalty_mm,
                               task=loaded.preset.name, system=loaded.config.system, checkpoint=str(loaded.checkpoint),
                               epoch=loaded.epoch, **fields, case_ids=list(chosen))
    if fence is not None:
        fence()
    write_scores(out_dir, result.rows, result.summary)
    return result

"""Evaluation: sliding-window inference on every case of a split, metrics per case and class in mm.

Predictions are brought back to each image's original geometry (as ``beseg predict`` writes them)
and scored against the original label at its own voxel spacing, so the distances are those of the
data as acquired, not of the 1 mm training grid.

Writes ``eval/per_case.csv`` (case, class, dice, hd95_mm, asd_mm, nsd), ``eval/summary.json`` and
``eval/predictions/<case>.nii.gz`` into the run folder (or ``out``).
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from beseg.data import default_cache_dir, load_or_make_split, load_task, msd_brats_regions
from beseg.data.nifti import read_array
from beseg.engine.predict import LoadedModel, load_model, predict_image, write_label
from beseg.engine.trainer import class_names
from beseg.errors import BesegError, DataError
from beseg.fileio import atomic_output, atomic_write_text
from beseg.metrics import METRIC_NAMES, case_metrics

__all__ = ["EvalSummary", "evaluate", "one_hot_scored"]


@dataclass
class EvalSummary:
    out_dir: Path
    rows: list[dict[str, Any]] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)


def one_hot_scored(labels: np.ndarray, loaded: LoadedModel) -> np.ndarray:
    """A label map in the dataset's values -> (K', H, W, D) bool masks of the scored classes."""
    if loaded.preset.label_mode == "brats_regions":
        return np.asarray(msd_brats_regions(labels[None]), dtype=bool)
    return np.stack([labels == k for k in range(1, loaded.preset.out_channels)])


def evaluate(checkpoint: str | Path, data_dir: str | Path, split: str = "val", out: str | Path | None = None,
             nsd_tolerance_mm: float = 1.0, device: str = "auto", progress: bool = True) -> EvalSummary:
    """Score a trained model on the ``split`` cases of ``data_dir``.

    Args:
        checkpoint: checkpoint file, or run folder (its best checkpoint).
        data_dir: the MSD-layout task folder trained on.
        split: ``val``, ``train`` or ``all`` (every labelled case).
        out: output folder; default ``<run folder>/eval``.
        nsd_tolerance_mm: boundary tolerance of the normalised surface Dice (mm).
        device: ``auto``, ``cpu`` or ``cuda``.
        progress: show a progress bar.

    Returns:
        An :class:`EvalSummary`; cases that could not be read are listed in ``failed``.

    Raises:
        CheckpointError, DataError, ConfigError: the model or the dataset cannot be used at all.
    """
    from tqdm.auto import tqdm

    if split not in ("val", "train", "all"):
        raise ValueError(f"--split must be val, train or all, got {split!r}.")
    loaded = load_model(checkpoint, device)
    task = load_task(data_dir, check_files=False)  # a missing file fails its case, not the run
    ids = [c.id for c in task.training]
    if split == "all":
        chosen = ids
    else:
        cfg = loaded.config.data
        cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir(task.root)
        split_file = Path(cfg.split_file) if cfg.split_file else cache_dir / "split.json"
        parts = load_or_make_split(split_file, ids, val_frac=cfg.val_frac, seed=cfg.split_seed,
                                   n_val=loaded.preset.default_val_count(len(ids), cfg.val_frac))
        chosen = list(parts.val if split == "val" else parts.train)
    run_root = loaded.checkpoint.parent.parent
    out_dir = Path(out) if out is not None else run_root / "eval"
    names = class_names(loaded.preset)
    result = EvalSummary(out_dir)
    for cid in tqdm(chosen, desc=f"evaluate {split}", unit="case", disable=not progress):
        case = task.case(cid)
        try:
            truth_raw, truth_header = read_array(case.label)  # any unreadable label is a DataError
            truth = np.asarray(truth_raw).round().astype(np.int64)
            labels, ref = predict_image(loaded, case.image)
            write_label(labels, ref, out_dir / "predictions" / f"{cid}.nii.gz")
            if truth.shape != labels.shape:
                raise DataError(f"{case.label}: shape {truth.shape} differs from its image's {labels.shape}.")
            spacing = list(truth_header.spacing)
            scores = case_metrics(one_hot_scored(labels, loaded), one_hot_scored(truth, loaded), spacing, names,
                                  nsd_tolerance_mm, include_background=True)
        except (BesegError, OSError, ValueError) as err:
            result.failed.append((cid, str(err)))
            continue
        result.rows.extend({"case": cid, **row} for row in scores)
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_csv(result.rows, out_dir / "per_case.csv")
    result.summary = _summary(result, loaded, split, nsd_tolerance_mm, names)
    _write_json(result.summary, out_dir / "summary.json")
    return result


def _mean(values: list[float]) -> float | None:
    finite = [v for v in values if isinstance(v, float) and math.isfinite(v)]
    return float(np.mean(finite)) if finite else None


def _summary(result: EvalSummary, loaded: LoadedModel, split: str, tol: float, names: list[str]) -> dict[str, Any]:
    per_class = {
        name: {m: _mean([r[m] for r in result.rows if r["class"] == name]) for m in METRIC_NAMES}
        for name in names
    }
    return {
        "task": loaded.preset.name, "system": loaded.config.system, "classes": names, "split": split,
        "checkpoint": str(loaded.checkpoint), "epoch": loaded.epoch, "nsd_tolerance_mm": tol,
        "cases": len({r["case"] for r in result.rows}), "failed": [{"case": c, "reason": r} for c, r in result.failed],
        "per_class": per_class,
        "mean": {m: _mean([v[m] for v in per_class.values() if v[m] is not None]) for m in METRIC_NAMES},
        "note": "distances in mm at the original voxel spacing; NaN distances (one mask empty) are left out of means",
    }


def _write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    with atomic_output(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["case", "class", *METRIC_NAMES])
        writer.writeheader()
        writer.writerows(rows)


def _write_json(obj: dict[str, Any], path: Path) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=str))

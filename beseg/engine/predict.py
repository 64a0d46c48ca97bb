"""Prediction: a checkpoint and NIfTI images in, label maps in each image's own geometry out.

The image goes through the task's invertible inference chain (RAS, 1 mm, normalisation with the
training-set statistics stored in the checkpoint), sliding-window inference gives a label map on
the 1 mm grid, and MONAI's inverse transforms (nearest neighbour) bring it back to the input's
orientation, voxel grid and affine.

Several checkpoints form an ensemble (e.g. the k folds): the image is resampled once, each member
normalises it with its own statistics, and the probabilities after the activation are averaged
over the members and, with ``mirror_axes``, over the flips (nnU-Net's test-time mirroring) before
the label map is made. ``beseg export`` writes the same pipeline for :mod:`beseg_runtime`.

An image smaller than the window along some axis is padded by MONAI's ``sliding_window_inference``
(constant 0 after normalisation) and cropped back. What is refused, warned about, and how outputs
are planned and written is shared with :mod:`beseg_runtime` (:func:`beseg_runtime.io.check_scan`,
:func:`beseg_runtime.window.small_scan_warning`, :func:`beseg_runtime.io.plan_outputs`,
:func:`beseg_runtime.batch.predict_each`), so both paths accept, refuse and warn about the same images.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from torch import nn

from beseg.data import IntensityRange, TaskPreset, get_preset
from beseg.data.nifti import read_image_header
from beseg.engine.checkpoint import CheckpointError, load_checkpoint
from beseg.engine.config import Config, config_from_dict
from beseg.engine.inference import predict_probabilities
from beseg.engine.networks import build_network
from beseg.engine.rundir import RunDir
from beseg.errors import DataError
from beseg_runtime.batch import PredictSummary, predict_each
from beseg_runtime.geometry import grid_of, to_input_grid
from beseg_runtime.io import check_scan, plan_outputs, write_label
from beseg_runtime.window import DEFAULT_WARN_BELOW, small_scan_warning

__all__ = ["LoadedModel", "PredictSummary", "ensemble_labels", "ensemble_members", "load_model", "predict_image", "predict_files", "resolve_checkpoint", "write_label"]


@dataclass
class LoadedModel:
    """A trained network with everything inference needs."""

    model: nn.Module
    config: Config
    preset: TaskPreset
    stats: IntensityRange | None
    roi: tuple[int, ...]
    device: torch.device
    checkpoint: Path
    epoch: int


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file, or a run folder's best checkpoint (its last one if it has no best).

    Raises:
        CheckpointError: nothing usable at ``path``.
    """
    path = Path(path)
    if path.is_dir():
        run = RunDir(path)
        for candidate in (run.best, run.last):
            if candidate.is_file():
                return candidate
        raise CheckpointError(f"{path} holds no checkpoints/best.pt or checkpoints/last.pt; is it a run folder?")
    if not path.is_file():
        raise CheckpointError(f"checkpoint or run folder {path} does not exist.")
    return path


def load_model(path: str | Path, device: str | torch.device = "auto") -> LoadedModel:
    """Load a checkpoint (or a run folder's best) for inference.

    Raises:
        CheckpointError: missing, unsafe or unreadable file, or weights that do not fit the network.
        ConfigError: the checkpoint's config is invalid.
    """
    ckpt_path = resolve_checkpoint(path)
    ckpt = load_checkpoint(ckpt_path)
    config = config_from_dict(ckpt["config"])
    preset = get_preset(ckpt.get("preset") or config.data.task)
    stats = IntensityRange(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in ckpt["stats"].items()}) \
        if ckpt.get("stats") else None
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    model = build_network(config.model, preset.in_channels, preset.out_channels)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as err:
        raise CheckpointError(
            f"{ckpt_path}: weights do not fit model.network={config.model.network} "
            f"({str(err).splitlines()[0][:160]})."
        ) from None
    model.to(device).eval()
    roi = tuple(ckpt.get("roi") or config.data.patch_size or preset.patch_size)
    return LoadedModel(model, config, preset, stats, roi, device, ckpt_path, int(ckpt.get("epoch", 0)))


def ensemble_members(models: LoadedModel | Sequence[LoadedModel]) -> list[LoadedModel]:
    """The ensemble as a list, checked to read and predict the same way.

    Raises:
        CheckpointError: no model, or runs of tasks that differ in channels, grid, outputs or labels.
    """
    members = [models] if isinstance(models, LoadedModel) else list(models)
    if not members:
        raise CheckpointError("no model to predict with; give at least one checkpoint or run folder.")
    first = members[0].preset
    for other in members[1:]:
        b = other.preset
        if (first.in_channels, first.out_channels, first.activation, first.label_mode, first.pixdim) != \
                (b.in_channels, b.out_channels, b.activation, b.label_mode, b.pixdim):
            raise CheckpointError(f"cannot ensemble {other.checkpoint} (task {b.name}) with {members[0].checkpoint} "
                                  f"(task {first.name}): they differ in channels, grid or outputs.")
    return members


def ensemble_labels(members: Sequence[LoadedModel], normalized: Callable[[LoadedModel], torch.Tensor],
                    mirror_axes: Sequence[int] = ()) -> torch.Tensor:
    """Label map on the model grid: each member's sliding window on its normalised image, probabilities
    (after the activation) averaged over the members and the mirror flips, then turned into labels.

    Args:
        members: from :func:`ensemble_members`.
        normalized: a member -> its (C, X, Y, Z) float32 input on the model grid (normalised as it was trained).
        mirror_axes: test-time mirroring axes of the RAS grid (0, 1, 2); ``()`` for none.

    Returns:
        (1, X, Y, Z) uint8 label map (dataset label values), on the CPU.
    """
    probs = None
    for member in members:
        cfg = member.config.train
        p = predict_probabilities(member.model, normalized(member)[None].to(member.device), member.roi,
                                  member.preset.activation, cfg.sw_overlap, cfg.sw_batch_size, cfg.amp, mirror_axes)
        probs = p if probs is None else probs + p.to(probs.device)
    assert probs is not None
    if len(members) > 1:
        probs = probs / len(members)
    return members[0].preset.label_map(probs)[0].cpu()


def predict_image(models: LoadedModel | Sequence[LoadedModel], image_path: str | Path,
                  mirror_axes: Sequence[int] = (), warn: Callable[[str], None] | None = None,
                  warn_below: float = DEFAULT_WARN_BELOW) -> tuple[np.ndarray, Any]:
    """Label map of one image, in that image's own voxel grid.

    The image is read, reoriented and resampled once; each ensemble member normalises it with its
    own training statistics and runs its sliding window; the probabilities (after the activation)
    are averaged over the members and the mirror flips, then turned into labels.

    Args:
        models: a model from :func:`load_model`, or several (an ensemble, e.g. the k folds).
        image_path: NIfTI image with the task's channels (4D for multi-channel MRI).
        mirror_axes: test-time mirroring axes of the RAS grid (0, 1, 2); ``()`` for none.
        warn: receives a one-line warning about the image (default: :func:`warnings.warn`): a scan
            under ``warn_below`` of the window along some axis once resampled (it is predicted, padded).
        warn_below: see ``warn``; 0 never warns.

    Returns:
        ``(labels, image)``: (H, W, D) uint8 label map in the input's voxel order, and the input's
        nibabel image (for its affine and header).

    Raises:
        DataError: the image cannot be read, has the wrong number of channels, is not a 3D scan
            (:func:`beseg_runtime.io.check_scan`) or holds NaN/Inf.
        CheckpointError: the models cannot form an ensemble.
    """
    members = ensemble_members(models)
    preset = members[0].preset
    image_path = Path(image_path)
    # The input check that evaluate and score share (readable NIfTI, 3D or 4D, the task's channels).
    shape = read_image_header(image_path, preset.in_channels, f"task {preset.name}").shape
    original = nib.load(str(image_path))
    check_scan(image_path, shape, original.affine)  # what beseg-predict refuses too, with the same message
    geometry = preset.infer_geometry()
    try:
        data = geometry({"image": str(image_path)})
    except Exception as err:
        while err.__cause__ is not None:  # MONAI wraps the reader's error in "applying transform ..."
            err = err.__cause__
        raise DataError(f"{image_path}: could not be loaded and resampled ({type(err).__name__}: "
                        f"{' '.join(str(err).split())[:200]}).") from None
    image = data["image"]
    if not torch.isfinite(image.as_tensor()).all():
        raise DataError(f"{image_path}: contains NaN or Inf values.")
    message = small_scan_warning(image_path, tuple(image.shape[1:]), [m.roi for m in members], preset.pixdim,
                                 warn_below)
    if message:
        (warn or (lambda m: warnings.warn(m, stacklevel=3)))(message)
    # a copy: the normalisation works in place, and the next member needs the raw intensities
    labels = ensemble_labels(members, lambda m: m.preset.infer_intensity(m.stats)({"image": image.clone()})["image"]
                             .as_tensor(), mirror_axes)
    # Back to the input's grid with the nearest-neighbour map that beseg-predict and evaluate's store path
    # use too: one rule for voxels halfway between two model voxels (MONAI's inverse decides those by
    # float32 rounding noise, so two implementations would disagree on every other slice of a 2.5 mm scan).
    grid = grid_of(np.asarray(original.affine, dtype=np.float64), shape[:3], "RAS",
                   np.asarray(image.affine, dtype=np.float64), image.shape[1:])
    return to_input_grid(labels[0].numpy().astype(np.uint8), grid), original


def predict_files(checkpoints: str | Path | Sequence[str | Path], images: Sequence[str | Path], out_dir: str | Path,
                  device: str = "auto", progress: bool = True, mirror_axes: Sequence[int] = (),
                  overwrite: bool = False, warn_below: float = DEFAULT_WARN_BELOW,
                  on_warning: Callable[[str], None] | None = None) -> PredictSummary:
    """Predict every image into ``out_dir/<name>.nii.gz``; a bad image is recorded, not fatal.

    Args:
        checkpoints: a checkpoint or run folder, or several: an ensemble averaging their probabilities.
        images: NIfTI files, or folders of them.
        out_dir: output folder; not the folder of an input.
        device: ``auto``, ``cpu``, ``cuda``...
        progress: show a progress bar.
        mirror_axes: test-time mirroring axes, see :func:`predict_image`.
        overwrite: replace existing label maps that beseg wrote (never any other file).
        warn_below: warn about a scan under this fraction of the window, see :func:`predict_image`.
        on_warning: receives each warning as it happens (they are in the summary too).

    Raises:
        OutputError: an output would be written over an input, two inputs share an output name, or
            an output exists (see :func:`beseg_runtime.io.plan_outputs`); checked before anything runs.
        CheckpointError: a checkpoint cannot be used, or the runs cannot form an ensemble (nothing
            is predicted then).
    """
    from tqdm.auto import tqdm

    plan = plan_outputs(list(images), out_dir, overwrite)
    if isinstance(checkpoints, (str, Path)):
        checkpoints = [checkpoints]
    members = ensemble_members([load_model(c, device) for c in checkpoints])
    return predict_each(tqdm(plan, desc="predict", unit="image", disable=not progress),
                        lambda image, warn: predict_image(members, image, mirror_axes, warn, warn_below),
                        overwrite, on_warning=on_warning)

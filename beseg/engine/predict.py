"""Prediction: a checkpoint and NIfTI images in, label maps in each image's own geometry out.

The image goes through the task's invertible inference chain (RAS, 1 mm, normalisation with the
training-set statistics stored in the checkpoint), sliding-window inference gives a label map on
the 1 mm grid, and MONAI's inverse transforms (nearest neighbour) bring it back to the input's
orientation, voxel grid and affine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from torch import nn

from beseg.data import IntensityRange, TaskPreset, get_preset
from beseg.data.msd import case_id
from beseg.data.nifti import read_image_header
from beseg.engine.checkpoint import CheckpointError, load_checkpoint
from beseg.engine.config import Config, config_from_dict
from beseg.engine.inference import predict_probabilities
from beseg.engine.networks import build_network
from beseg.engine.rundir import RunDir
from beseg.errors import BesegError, DataError
from beseg.fileio import atomic_output

__all__ = ["LoadedModel", "PredictSummary", "load_model", "predict_image", "predict_files", "resolve_checkpoint", "write_label"]


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


@dataclass
class PredictSummary:
    """Which inputs were written, and which failed with what reason."""

    written: list[Path] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)


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


def predict_image(loaded: LoadedModel, image_path: str | Path) -> tuple[np.ndarray, Any]:
    """Label map of one image, in that image's own voxel grid.

    Args:
        loaded: from :func:`load_model`.
        image_path: NIfTI image with the task's channels (4D for multi-channel MRI).

    Returns:
        ``(labels, image)``: (H, W, D) uint8 label map in the input's voxel order, and the input's
        nibabel image (for its affine and header).

    Raises:
        DataError: the image cannot be read or has the wrong number of channels.
    """
    image_path = Path(image_path)
    # The input check that evaluate and score share (readable NIfTI, 3D or 4D, the task's channels).
    shape = read_image_header(image_path, loaded.preset.in_channels, f"task {loaded.preset.name}").shape
    original = nib.load(str(image_path))
    infer = loaded.preset.infer_transforms(loaded.stats)
    try:
        data = infer({"image": str(image_path)})
    except Exception as err:
        while err.__cause__ is not None:  # MONAI wraps the reader's error in "applying transform ..."
            err = err.__cause__
        raise DataError(f"{image_path}: could not be loaded and resampled ({type(err).__name__}: "
                        f"{' '.join(str(err).split())[:200]}).") from None
    image = data["image"]
    if not torch.isfinite(image.as_tensor()).all():
        raise DataError(f"{image_path}: contains NaN or Inf values.")
    cfg = loaded.config.train
    probs = predict_probabilities(loaded.model, image.as_tensor()[None].to(loaded.device), loaded.roi,
                                  loaded.preset.activation, cfg.sw_overlap, cfg.sw_batch_size, cfg.amp)
    labels = loaded.preset.label_map(probs)[0].cpu()
    data["pred"] = MetaTensor(labels.float(), affine=image.affine)
    back = loaded.preset.inverter(infer, nearest=True)(data)["pred"]
    out = np.asarray(back.detach().cpu().numpy()[0]).round().astype(np.uint8)
    if out.shape != tuple(shape[:3]):  # the inverse must land exactly on the input grid
        raise BesegError(f"{image_path}: inverse resampling gave shape {out.shape}, expected {shape[:3]}.")
    return out, original


def write_label(labels: np.ndarray, reference: Any, path: str | Path) -> Path:
    """Write a uint8 label map with ``reference``'s affine, atomically (temporary file, rename).

    Raises:
        BesegError: the file cannot be written (e.g. the disk is full); nothing partial is left.
    """
    path = Path(path)
    header = reference.header.copy()
    header.set_data_dtype(np.uint8)
    header.set_data_shape(labels.shape)
    img = nib.Nifti1Image(labels.astype(np.uint8), reference.affine, header=header)
    img.set_qform(reference.affine, code=int(reference.header["qform_code"]) or 1)
    img.set_sform(reference.affine, code=int(reference.header["sform_code"]) or 1)
    try:
        with atomic_output(path, suffix=".tmp.nii.gz") as tmp:  # nibabel picks the format by ending
            nib.save(img, tmp)
    except OSError as err:
        raise BesegError(f"could not write {path}: {err.strerror or err}.") from None
    return path


def predict_files(checkpoint: str | Path, images: list[str | Path], out_dir: str | Path,
                  device: str = "auto", progress: bool = True) -> PredictSummary:
    """Predict every image into ``out_dir/<name>.nii.gz``; a bad image is recorded, not fatal.

    Raises:
        CheckpointError: the checkpoint cannot be used (nothing is predicted then).
    """
    from tqdm.auto import tqdm

    loaded = load_model(checkpoint, device)
    out_dir = Path(out_dir)
    summary = PredictSummary()
    for image in tqdm(images, desc="predict", unit="image", disable=not progress):
        try:
            labels, ref = predict_image(loaded, image)
            summary.written.append(write_label(labels, ref, out_dir / f"{case_id(image)}.nii.gz"))
        except BesegError as err:
            summary.failed.append((str(image), str(err)))
    return summary

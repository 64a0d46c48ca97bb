"""Run an exported model folder on NIfTI images with onnxruntime: NIfTI in, label map in the input's grid out."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from beseg.deploy.geometry import to_input_grid, to_model_grid
from beseg.deploy.io import list_images, output_name, read_image, write_label
from beseg.deploy.pipeline import DeployError, Member, Pipeline, load_pipeline
from beseg.deploy.window import mirror_flips, sliding_window
from beseg.errors import BesegError, DataError

__all__ = ["Predictor", "PredictSummary", "available_providers", "normalize", "to_labels"]


@dataclass
class PredictSummary:
    """Which inputs were written, and which failed with what reason."""

    written: list[Path] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)


def available_providers(device: str = "auto") -> list[str]:
    """onnxruntime execution providers for ``device``: ``auto`` takes CUDA when onnxruntime offers it.

    Raises:
        DeployError: ``cuda`` was asked for but this onnxruntime has no CUDA provider.
    """
    import onnxruntime as ort

    available = ort.get_available_providers()
    cuda = "CUDAExecutionProvider" in available
    if device == "cuda" and not cuda:
        raise DeployError("--device cuda: this onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu).")
    if device not in ("auto", "cpu", "cuda"):
        raise DeployError(f"--device must be auto, cpu or cuda, got {device!r}.")
    return ["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda and device != "cpu" else ["CPUExecutionProvider"]


def normalize(image: np.ndarray, spec: dict[str, Any]) -> np.ndarray:
    """Intensity normalisation of a (C, X, Y, Z) float32 volume as ``spec`` says (a new array).

    ``zscore_nonzero``: per channel, zero mean and unit variance over the non-zero voxels (zeros stay
    zero; a constant channel is only shifted). ``scale_range``: ``low`` -> 0, ``high`` -> 1, clipped.
    """
    kind = spec.get("kind")
    out = image.astype(np.float32, copy=True)
    if kind == "zscore_nonzero":
        for c in out:
            mask = c != 0
            if mask.any():
                values = c[mask]
                std = float(values.std())
                c[mask] = (values - np.float32(values.mean())) / np.float32(std if std != 0 else 1.0)
        return out
    if kind == "scale_range":
        low, high = float(spec["low"]), float(spec["high"])
        return np.clip((out - np.float32(low)) / np.float32(high - low), 0.0, 1.0).astype(np.float32)
    raise DeployError(f"unknown normalization kind {kind!r} in pipeline.json.")


def _activate(logits: np.ndarray, activation: str) -> np.ndarray:
    if activation == "softmax":
        e = np.exp(logits - logits.max(axis=0, keepdims=True))
        return e / e.sum(axis=0, keepdims=True)
    return 1.0 / (1.0 + np.exp(-logits))


def to_labels(probs: np.ndarray, pipeline: Pipeline) -> np.ndarray:
    """(K, X, Y, Z) probabilities -> (X, Y, Z) uint8 labels: the arg-max class, or nested regions
    painted in the pipeline's order (each region's channel above the threshold sets its label)."""
    if pipeline.to_labels == "argmax":
        return probs.argmax(axis=0).astype(np.uint8)
    if pipeline.to_labels == "nested_regions":
        labels = np.zeros(probs.shape[1:], dtype=np.uint8)
        for channel, label in pipeline.regions:
            labels[probs[channel] > pipeline.threshold] = label
        return labels
    raise DeployError(f"unknown output.to_labels {pipeline.to_labels!r} in pipeline.json.")


class Predictor:
    """An exported model folder, loaded once, predicting any number of images.

    Args:
        model_dir: folder written by ``beseg export`` (checksums are verified on loading).
        device: ``auto`` (CUDA when onnxruntime offers it), ``cpu`` or ``cuda``.
        mirror: override the pipeline's test-time mirroring: ``False`` turns it off.
        threads: onnxruntime intra-op threads (default: its own choice).
        batch_size: windows per network call.

    Raises:
        DeployError: the folder is damaged, from a newer format, or onnxruntime cannot load a network.
    """

    def __init__(self, model_dir: str | Path, device: str = "auto", mirror: bool | None = None,
                 threads: int | None = None, batch_size: int = 1) -> None:
        import onnxruntime as ort

        self.pipeline = load_pipeline(model_dir)
        self.providers = available_providers(device)
        self.mirror_axes = self.pipeline.mirror_axes if mirror is not False else ()
        self.batch_size = batch_size
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.sessions = []
        for member in self.pipeline.members:
            path = self.pipeline.root / member.file
            try:
                self.sessions.append(ort.InferenceSession(str(path), options, providers=self.providers))
            except Exception as err:  # onnxruntime raises its own exception types
                raise DeployError(f"{path}: onnxruntime cannot load it ({' '.join(str(err).split())[:200]}).") from None

    def _member_probabilities(self, image: np.ndarray, member: Member, session: Any) -> np.ndarray:
        name = session.get_inputs()[0].name
        x = normalize(image, member.normalization)
        total = None
        flips = mirror_flips(self.mirror_axes)
        for axes in flips:
            dims = tuple(a + 1 for a in axes)
            xf = np.ascontiguousarray(np.flip(x, dims)) if dims else x
            logits = sliding_window(xf, member.window, lambda batch: session.run(None, {name: batch})[0],
                                    member.overlap, member.blending, member.sigma_scale, self.batch_size)
            p = _activate(logits, self.pipeline.activation)
            p = np.flip(p, dims) if dims else p
            total = p if total is None else total + p
        assert total is not None
        return total / len(flips)

    def probabilities(self, image: np.ndarray) -> np.ndarray:
        """(C, X, Y, Z) volume on the model grid -> (K, X, Y, Z) float32 probabilities averaged over
        the ensemble members and the mirror flips."""
        total = None
        for member, session in zip(self.pipeline.members, self.sessions):
            p = self._member_probabilities(image, member, session)
            total = p if total is None else total + p
        assert total is not None
        return (total / len(self.sessions)).astype(np.float32)

    def predict(self, path: str | Path) -> tuple[np.ndarray, Any]:
        """Label map of one image in that image's own voxel grid.

        Returns:
            ``(labels, image)``: (X, Y, Z) uint8 labels and the input's nibabel image.

        Raises:
            DataError: unreadable image, wrong channels, or smaller than a window once resampled.
        """
        p = self.pipeline
        data, img = read_image(path, p.channels)
        model_image, grid = to_model_grid(data, np.asarray(img.affine, dtype=np.float64), p.axcodes, p.spacing)
        for member in p.members:
            if any(s < w for s, w in zip(grid.model_shape, member.window)):
                raise DataError(
                    f"{path}: smaller than one window of the model: resampled to {'x'.join(f'{s:g}' for s in p.spacing)} mm "
                    f"it is {'x'.join(map(str, grid.model_shape))} voxels, the window is "
                    f"{'x'.join(map(str, member.window))}.")
        labels = to_labels(self.probabilities(model_image), p)
        return to_input_grid(labels, grid), img

    def predict_files(self, images: list[str | Path], out_dir: str | Path, progress: bool = False) -> PredictSummary:
        """Predict every image (folders expanded) into ``out_dir/<name>.nii.gz``; a bad image is recorded, not fatal."""
        out_dir = Path(out_dir)
        summary = PredictSummary()
        for image in list_images(images):
            try:
                labels, ref = self.predict(image)
                summary.written.append(write_label(labels, ref, out_dir / output_name(image)))
            except BesegError as err:
                summary.failed.append((str(image), str(err)))
                continue
            if progress:
                print(f"wrote {summary.written[-1]}", flush=True)
        return summary

"""Run an exported model folder on NIfTI images with onnxruntime: NIfTI in, label map in the input's grid out."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from beseg_runtime.batch import PredictSummary, predict_each
from beseg_runtime.errors import require
from beseg_runtime.geometry import to_input_grid, to_model_grid
from beseg_runtime.intensity import normalize
from beseg_runtime.io import plan_outputs, read_image
from beseg_runtime.pipeline import DeployError, Member, Pipeline, load_pipeline
from beseg_runtime.window import DEFAULT_WARN_BELOW, mirror_flips, sliding_window, small_scan_warning

__all__ = ["Predictor", "PredictSummary", "available_providers", "import_onnxruntime", "normalize", "to_labels"]


def import_onnxruntime() -> Any:
    """The onnxruntime module.

    Raises:
        MissingDependencyError: it is not installed; the message says what to install.
    """
    # beseg-runtime depends on onnxruntime, so this is an installation without its dependencies
    # (--no-deps) or a GPU user's swap to onnxruntime-gpu that did not finish.
    return require(["onnxruntime"], "beseg-predict", "pip install onnxruntime (onnxruntime-gpu for CUDA)")[0]


def available_providers(device: str = "auto") -> list[str]:
    """onnxruntime execution providers for ``device``: ``auto`` takes CUDA when onnxruntime offers it.

    Raises:
        DeployError: ``cuda`` was asked for but this onnxruntime has no CUDA provider.
        MissingDependencyError: onnxruntime is not installed.
    """
    ort = import_onnxruntime()
    available = ort.get_available_providers()
    cuda = "CUDAExecutionProvider" in available
    if device == "cuda" and not cuda:
        raise DeployError("--device cuda: this onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu).")
    if device not in ("auto", "cpu", "cuda"):
        raise DeployError(f"--device must be auto, cpu or cuda, got {device!r}.")
    return ["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda and device != "cpu" else ["CPUExecutionProvider"]


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
        warn_below: warn about a scan under this fraction of the window along some axis (on the
            model grid); it is predicted all the same. 0 never warns.

    Raises:
        DeployError: the folder is damaged, from a newer format, or onnxruntime cannot load a network.
        MissingDependencyError: onnxruntime is not installed.
    """

    def __init__(self, model_dir: str | Path, device: str = "auto", mirror: bool | None = None,
                 threads: int | None = None, batch_size: int = 1, warn_below: float = DEFAULT_WARN_BELOW) -> None:
        ort = import_onnxruntime()
        self.pipeline = load_pipeline(model_dir)
        self.providers = available_providers(device)
        self.mirror_axes = self.pipeline.mirror_axes if mirror is not False else ()
        self.batch_size = batch_size
        self.warn_below = warn_below
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

        def run(batch: np.ndarray) -> np.ndarray:
            try:
                return session.run(None, {name: batch})[0]
            except Exception as err:  # onnxruntime's own exception types (e.g. out of device memory)
                raise DeployError(f"onnxruntime failed on {member.file} ({' '.join(str(err).split())[:200]}).") from None

        x = normalize(image, member.normalization)
        total = None
        flips = mirror_flips(self.mirror_axes)
        for axes in flips:
            dims = tuple(a + 1 for a in axes)
            xf = np.ascontiguousarray(np.flip(x, dims)) if dims else x
            # padded after normalisation, each flip on its own, as MONAI's sliding_window_inference in beseg predict
            logits = sliding_window(xf, member.window, run, member.overlap, member.blending, member.sigma_scale,
                                    self.batch_size, member.padding, member.pad_value)
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

    def predict(self, path: str | Path, warn: Callable[[str], None] | None = None) -> tuple[np.ndarray, Any]:
        """Label map of one image in that image's own voxel grid.

        An image smaller than a window along some axis is padded (see :mod:`beseg_runtime.window`);
        one under ``warn_below`` of the window is predicted with a warning.

        Args:
            path: the NIfTI image.
            warn: receives a one-line warning about the image (default: :func:`warnings.warn`).

        Returns:
            ``(labels, image)``: (X, Y, Z) uint8 labels and the input's nibabel image.

        Raises:
            DataError: unreadable image, wrong channels, not a 3D scan, NaN/Inf voxels.
            DeployError: onnxruntime failed.
        """
        p = self.pipeline
        data, img = read_image(path, p.channels)
        model_image, grid = to_model_grid(data, np.asarray(img.affine, dtype=np.float64), p.axcodes, p.spacing)
        message = small_scan_warning(path, grid.model_shape, [m.window for m in p.members], p.spacing, self.warn_below)
        if message:
            (warn or (lambda m: warnings.warn(m, stacklevel=3)))(message)
        labels = to_labels(self.probabilities(model_image), p)
        return to_input_grid(labels, grid), img

    def predict_files(self, images: list[str | Path], out_dir: str | Path, progress: bool = False,
                      overwrite: bool = False, on_warning: Callable[[str], None] | None = None) -> PredictSummary:
        """Predict every image (folders expanded) into ``out_dir/<name>.nii.gz``; a bad image is recorded, not fatal.

        Args:
            images: NIfTI files, or folders of them.
            out_dir: output folder.
            progress: print a line per written file.
            overwrite: replace existing label maps that beseg wrote (never any other file).
            on_warning: receives each warning as it happens (they are in the summary too).

        Raises:
            OutputError: before anything runs, when an output would be written over an input, two
                inputs share an output name, or an output exists (see :func:`beseg_runtime.io.plan_outputs`).
        """
        plan = plan_outputs(images, out_dir, overwrite)
        return predict_each(plan, lambda image, warn: self.predict(image, warn), overwrite,
                            on_written=(lambda out: print(f"wrote {out}", flush=True)) if progress else None,
                            on_warning=on_warning)

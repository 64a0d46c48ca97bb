"""``beseg export``: trained runs -> a self-contained model folder that runs without PyTorch.

::

    MODEL_DIR/
      model.onnx             the network (model-0.onnx, model-1.onnx ... for an ensemble): logits
                             (B, K, *window) of a (B, C, *window) float32 input; dynamic batch,
                             fixed window (the training patch); checked by onnx.checker and
                             against PyTorch's output on random input
      pipeline.json          everything inference needs (format FORMAT_VERSION, see beseg_runtime)
      README.md              inputs, outputs and how to run it

:mod:`beseg_runtime` (``beseg-predict``) runs the folder with onnxruntime, numpy, nibabel and scipy.
The folder is written beside its final place and renamed into it at the end: a failed export
leaves nothing behind. ``overwrite`` replaces only a model folder (its ``pipeline.json`` of beseg's
kind, no file that export did not write) and never a folder that holds a run being exported.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from beseg.data import TaskPreset
from beseg.engine.predict import LoadedModel, ensemble_members, load_model
from beseg.errors import BesegError, require
from beseg_runtime.pipeline import FORMAT_VERSION, KIND, PIPELINE_FILE, sha256

__all__ = ["ExportError", "ExportResult", "export_runs", "pipeline_spec"]

#: Input channels in the order the network reads them (the MSD dataset.json "modality" order).
INPUT_CHANNELS = {"brats_regions": ("FLAIR", "T1w", "t1gd", "T2w"), "foreground": ("CT",)}
#: MSD Task01 label values (what the nested regions are painted as).
BRATS_LABELS = {0: "background", 1: "edema", 2: "non-enhancing tumour", 3: "enhancing tumour"}
#: Largest |ONNX - PyTorch| logit difference accepted when the export is checked.
CHECK_TOLERANCE = 1e-3
#: How a volume smaller than the window is padded: what MONAI's sliding_window_inference does in
#: ``beseg predict`` (constant 0 in normalised units, half before and half after, cropped back).
PADDING = {"mode": "constant", "value": 0.0,
           "where": "on the normalised volume, (window - size) // 2 voxels before, the rest after; cropped back"}


class ExportError(BesegError):
    """A run cannot be exported (the exporter or the check failed), or the output folder is taken."""


@dataclass
class ExportResult:
    out_dir: Path
    files: list[str]
    max_abs_diff: float


def _labels(preset: TaskPreset) -> dict[str, Any]:
    """How outputs become labels, and the label values' names."""
    if preset.activation == "softmax":
        return {"output": {"channels": list(preset.channel_names), "to_labels": "argmax"},
                "labels": {str(k): name for k, name in enumerate(preset.channel_names)}}
    channel = {name: i for i, name in enumerate(preset.channel_names)}
    # Painted outermost first, so a voxel of an inner region is inside the outer ones too (preset.label_map).
    paint = [("WT", 1), ("TC", 2), ("ET", 3)]
    return {"output": {"channels": list(preset.channel_names), "to_labels": "nested_regions", "threshold": 0.5,
                       "paint": [{"channel": channel[name], "region": name, "label": label} for name, label in paint]},
            "labels": {str(k): v for k, v in BRATS_LABELS.items()}}


def pipeline_spec(members: Sequence[LoadedModel], files: Sequence[str], mirror_axes: Sequence[int]) -> dict[str, Any]:
    """The ``pipeline.json`` content (without ``files``) of ``members`` exported as ``files``."""
    from beseg import __version__

    preset = members[0].preset
    spec: dict[str, Any] = {
        "kind": KIND, "format": FORMAT_VERSION, "beseg_version": __version__, "task": preset.name,
        "input": {"channels": preset.in_channels, "channel_names": list(INPUT_CHANNELS[preset.label_mode]),
                  "layout": "NIfTI, 3D for one channel, 4D with the channels last otherwise"},
        "geometry": {"orientation": "RAS", "spacing_mm": [float(s) for s in preset.pixdim],
                     "interpolation": "linear, border values repeated", "inverse_interpolation": "nearest"},
        "activation": preset.activation,
        "mirror_axes": [int(a) for a in mirror_axes],
        **_labels(preset),
        "classes": [{"name": name, "labels": list(values)} for name, values in preset.scored_classes],
        "ensemble": "mean of the members' probabilities (after the activation), each averaged over the mirror flips",
        "members": [],
    }
    for member, file in zip(members, files):
        cfg = member.config.train
        norm: dict[str, Any]
        if preset.normalization == "zscore_nonzero":
            norm = {"kind": "zscore_nonzero"}
        else:
            assert member.stats is not None
            norm = {"kind": "scale_range", "low": member.stats.low, "high": member.stats.high,
                    "percentiles": list(member.stats.percentiles), "num_voxels": member.stats.num_voxels}
        spec["members"].append({
            "file": file, "run": str(member.checkpoint.parent.parent) if member.checkpoint.parent.name == "checkpoints"
            else str(member.checkpoint), "checkpoint": member.checkpoint.name, "epoch": member.epoch,
            "network": member.config.model.network, "input_name": "image", "output_name": "logits",
            "window": [int(w) for w in member.roi], "overlap": float(cfg.sw_overlap), "blending": "gaussian",
            "sigma_scale": 0.125, "padding": dict(PADDING),
            "normalization": norm,
        })
    return spec


def _readme(spec: dict[str, Any]) -> str:
    members = spec["members"]
    lines = [
        f"# beseg model: {spec['task']}",
        "",
        f"Exported by beseg {spec['beseg_version']} (`beseg export`); pipeline format {spec['format']}.",
        f"{len(members)} network(s): " + ", ".join(f"`{m['file']}` ({m['network']}, epoch {m['epoch']}, window "
                                                     f"{'x'.join(map(str, m['window']))})" for m in members) + ".",
        "",
        "## Input",
        f"One NIfTI image per case with {spec['input']['channels']} channel(s) in this order: "
        f"{', '.join(spec['input']['channel_names'])} ({spec['input']['layout']}). Any orientation and spacing: the "
        f"image is reoriented to {spec['geometry']['orientation']} and resampled to "
        f"{' x '.join(f'{s:g}' for s in spec['geometry']['spacing_mm'])} mm. A scan smaller than the window along some axis "
        "is padded to one window (constant 0 after normalisation, as `beseg predict` pads) and cropped back; one under "
        "a quarter of the window (`--warn-below`) is predicted with a warning. Refused, one line each: an axis of 0 or 1 "
        "voxel, a degenerate affine, another number of channels, NaN or Inf intensities.",
        "",
        "## Output",
        "A uint8 label map in the input's own voxel grid, with the input's affine: "
        + ", ".join(f"{k} {v}" for k, v in spec["labels"].items()) + ".",
        ("Labels are the arg-max of the softmax probabilities."
         if spec["output"]["to_labels"] == "argmax" else
         "The sigmoid regions (" + ", ".join(spec["output"]["channels"]) + ") above "
         f"{spec['output']['threshold']} are painted in the order "
         + ", ".join(f"{p['region']} -> {p['label']}" for p in spec["output"]["paint"]) + " (nested regions)."),
        "Scored classes: " + "; ".join(f"{c['name']} = labels {c['labels']}" for c in spec["classes"]) + ".",
        "",
        "## Run",
        "```",
        "pip install beseg-runtime          # onnxruntime, numpy, nibabel, scipy: no PyTorch (from a beseg "
        "checkout: pip install ./runtime)",
        "beseg-predict MODEL_DIR image.nii.gz [more images or folders] --out predictions/",
        "```",
        "The output folder may not be an input's folder, and existing files in it are not replaced (`--overwrite` "
        "replaces label maps beseg wrote, never other files). A bad image is named and skipped; the exit code is 1 "
        "if any failed.",
        "`pipeline.json` holds every step's parameters and the SHA-256 of each file; `beseg-predict` refuses a "
        "folder whose files do not match. Each `model*.onnx` maps a float32 `image` (batch, channels, *window) to "
        "`logits` (batch, classes, *window).",
        "",
    ]
    return "\n".join(lines)


def _export_onnx(member: LoadedModel, path: Path) -> float:
    """Export one network and check it; returns the largest |ONNX - PyTorch| logit on random input."""
    import onnx
    import onnxruntime as ort

    model = member.model.to("cpu").eval()
    channels = member.preset.in_channels
    example = torch.randn(2, channels, *member.roi, generator=torch.Generator().manual_seed(0))
    batch = torch.export.Dim("batch", min=1, max=4096)
    onnx_log = logging.getLogger("torch.onnx")
    level = onnx_log.level
    onnx_log.setLevel(logging.ERROR)  # its "torchvision is not installed" warnings say nothing about this model
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (example,), str(path), dynamo=True, input_names=["image"],
                              output_names=["logits"], dynamic_shapes=({0: batch},), external_data=False,
                              verbose=False, report=False)
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as err:  # the exporter raises many types; any of them means no usable model
        reason = next((line for line in str(err).splitlines() if line.strip()), type(err).__name__)
        raise ExportError(f"{member.checkpoint}: ONNX export of model.network={member.config.model.network} "
                          f"with window {tuple(member.roi)} failed ({reason.strip()[:200]}).") from None
    finally:
        onnx_log.setLevel(level)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    check = example[:1] if example.shape[0] > 1 else example
    with torch.no_grad():
        expected = model(check).numpy()
    got = session.run(None, {"image": check.numpy()})[0]
    diff = float(np.abs(got - expected).max())
    if not diff <= CHECK_TOLERANCE:
        raise ExportError(f"{member.checkpoint}: the ONNX network's logits differ from PyTorch's by {diff:.2g} "
                          f"(more than {CHECK_TOLERANCE:g}); not exported.")
    return diff


def export_runs(runs: Sequence[str | Path], out_dir: str | Path, mirror_axes: Sequence[int] = (),
                overwrite: bool = False, progress: bool = True) -> ExportResult:
    """Export one run, or several as an ensemble, to ``out_dir``.

    Args:
        runs: run folders (their best checkpoint) or checkpoint files.
        out_dir: the model folder to create.
        mirror_axes: test-time mirroring axes recorded in the pipeline (0, 1, 2 of the RAS grid).
        overwrite: replace an existing ``out_dir``.
        progress: print one line per exported network.

    Raises:
        CheckpointError: a run cannot be loaded, or the runs cannot form an ensemble.
        ExportError: ``out_dir`` exists (without ``overwrite``), or an export or its check failed.
    """
    require(["onnx", "onnxscript", "onnxruntime"], "beseg export", "pip install 'beseg[export]'")
    out_dir = Path(out_dir)
    if any(a not in (0, 1, 2) for a in mirror_axes):
        raise ExportError(f"mirror axes must be 0, 1 or 2, got {list(mirror_axes)}.")
    _check_out_dir(out_dir, runs, overwrite)
    members = ensemble_members([load_model(r, "cpu") for r in runs])
    files = ["model.onnx"] if len(members) == 1 else [f"model-{i}.onnx" for i in range(len(members))]
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    os.chmod(tmp, 0o755)  # mkdtemp's folder is private; the model folder is meant to be shared
    try:
        diffs = []
        for member, file in zip(members, files):
            diffs.append(_export_onnx(member, tmp / file))
            if progress:
                print(f"exported {member.checkpoint} -> {file} (ONNX vs PyTorch logits: max |diff| {diffs[-1]:.1e})",
                      flush=True)
        spec = pipeline_spec(members, files, mirror_axes)
        (tmp / "README.md").write_text(_readme(spec), encoding="utf-8")
        spec["files"] = {name: sha256(tmp / name) for name in [*files, "README.md"]}
        (tmp / PIPELINE_FILE).write_text(json.dumps(spec, indent=2) + "\n", encoding="utf-8")
        for name in [*files, "README.md", PIPELINE_FILE]:
            with open(tmp / name, "rb") as f:
                os.fsync(f.fileno())
        if out_dir.exists():
            _check_out_dir(out_dir, runs, overwrite)  # again: it may have changed during the export
            # aside under a fresh name (never an existing folder of the user's), then the new one in its place
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".old", dir=out_dir.parent))
            os.replace(out_dir, old)  # a directory renamed over the empty one mkdtemp made
            try:
                os.replace(tmp, out_dir)
            except BaseException:
                os.replace(old, out_dir)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ExportResult(out_dir, [*files, "README.md", PIPELINE_FILE], max(diffs))


def _check_out_dir(out_dir: Path, runs: Sequence[str | Path], overwrite: bool) -> None:
    """Refuse an ``out_dir`` whose replacement could lose anything that is not an earlier export.

    Raises:
        ExportError: ``out_dir`` is a file; it is, or holds, a run being exported; it is a non-empty
            folder and ``overwrite`` is off; or ``overwrite`` is on and it is not a model folder
            (a ``pipeline.json`` of beseg's kind, and no file that ``beseg export`` did not write).
    """
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise ExportError(f"--out {out_dir} exists and is not a folder; nothing was changed.")
    real = os.path.realpath(out_dir)
    for run in runs:
        run_real = os.path.realpath(run)
        if run_real == real or run_real.startswith(real.rstrip(os.sep) + os.sep):
            raise ExportError(f"--out {out_dir} holds the run {run} being exported; export into another folder "
                              "(nothing was changed).")
    if not any(out_dir.iterdir()):
        return  # an empty folder: nothing to lose
    if not overwrite:
        raise ExportError(f"{out_dir} already exists; choose another --out or pass --overwrite (which replaces only "
                          "a model folder written by beseg export).")
    reason = _not_a_model_folder(out_dir)
    if reason:
        raise ExportError(f"--overwrite replaces only a model folder written by beseg export, and {out_dir} is not one "
                          f"({reason}); nothing was deleted.")


def _not_a_model_folder(folder: Path) -> str | None:
    """Why ``folder`` is not a model folder that ``beseg export`` wrote, or None if it is one."""
    try:
        spec = json.loads((folder / PIPELINE_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return f"no {PIPELINE_FILE}"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return f"its {PIPELINE_FILE} is not readable JSON"
    if not isinstance(spec, dict) or spec.get("kind") != KIND or not isinstance(spec.get("format"), int) \
            or not isinstance(spec.get("files"), dict):
        return f"its {PIPELINE_FILE} is not a beseg pipeline"
    ours = {PIPELINE_FILE, *map(str, spec["files"])}
    others = sorted(p.name for p in folder.iterdir() if p.name not in ours)
    if others:
        return "it holds " + ", ".join(others[:3]) + (" ..." if len(others) > 3 else "") + ", which export did not write"
    return None

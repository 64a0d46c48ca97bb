"""``pipeline.json``: everything needed to run an exported model, and its validation.

A model folder written by ``beseg export`` holds one ONNX network per ensemble member, a
``pipeline.json`` describing the whole pipeline (format :data:`FORMAT_VERSION`) and a README. The
pipeline lists the SHA-256 of every other file of the folder; :func:`load_pipeline` checks them
before anything runs, so a damaged or swapped network is refused rather than used.

Each member records how a volume smaller than its window is padded
(``"padding": {"mode": "constant", "value": 0.0}``). Folders exported before that key existed
(format 1 with no ``padding``, or the string ``"none: ..."``) are read as constant 0 padding: the
padding ``beseg predict`` always applied, so their labels stay those of the research path. A mode
this version does not implement is refused, never ignored.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from beseg_runtime.errors import BesegError
from beseg_runtime.window import PADDING_MODES

__all__ = ["FORMAT_VERSION", "PIPELINE_FILE", "DeployError", "Member", "Pipeline", "load_pipeline", "sha256"]

#: The pipeline.json layout this version writes and the newest it reads.
FORMAT_VERSION = 1
PIPELINE_FILE = "pipeline.json"
KIND = "beseg-pipeline"


class DeployError(BesegError):
    """A model folder is incomplete, damaged, or from a newer format."""


def sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class Member:
    """One network of the ensemble and the preprocessing its training used.

    Attributes:
        file: the ONNX file, relative to the model folder.
        window: the network's fixed input (voxels on the model grid).
        overlap: fraction of a window that neighbouring windows share.
        blending: ``"gaussian"`` or ``"constant"``.
        sigma_scale: Gaussian sigma as a fraction of the window.
        normalization: ``{"kind": "zscore_nonzero"}`` (per channel, over non-zero voxels) or
            ``{"kind": "scale_range", "low": L, "high": H}`` (L -> 0, H -> 1, clipped to [0, 1]).
        padding: how a volume smaller than the window is padded (``"constant"``).
        pad_value: the value of padded voxels, in normalised units.
    """

    file: str
    window: tuple[int, int, int]
    overlap: float
    blending: str
    sigma_scale: float
    normalization: dict[str, Any]
    padding: str = "constant"
    pad_value: float = 0.0


def _padding(spec: Any) -> tuple[str, float]:
    """``(mode, value)`` of a member's ``padding`` entry; absent or a string (format 1 before the key
    existed) is constant 0, what ``beseg predict`` pads with.

    Raises:
        ValueError: not an object with a known ``mode`` and a finite ``value``.
    """
    if spec is None or isinstance(spec, str):
        return "constant", 0.0
    if not isinstance(spec, dict):
        raise ValueError(f"padding must be an object, got {spec!r}")
    mode, value = spec.get("mode"), float(spec.get("value", 0.0))
    if mode not in PADDING_MODES:
        raise ValueError(f"padding mode {mode!r} is not one this beseg-runtime implements ({', '.join(PADDING_MODES)}); "
                         "update beseg-runtime")
    if not math.isfinite(value):
        raise ValueError(f"padding value {value!r} is not finite")
    return str(mode), value


@dataclass(frozen=True)
class Pipeline:
    """A parsed ``pipeline.json`` (see the model folder's README.md for each field)."""

    root: Path
    raw: dict[str, Any]
    channels: int
    channel_names: tuple[str, ...]
    axcodes: str
    spacing: tuple[float, float, float]
    activation: str
    mirror_axes: tuple[int, ...]
    to_labels: str
    regions: tuple[tuple[int, int], ...]
    threshold: float
    members: tuple[Member, ...]


def _get(raw: dict[str, Any], key: str, where: Path) -> Any:
    node: Any = raw
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise DeployError(f"{where}: missing '{key}'; the file is incomplete, export the model again.")
        node = node[part]
    return node


def load_pipeline(model_dir: str | Path, verify: bool = True) -> Pipeline:
    """Read and check a model folder's ``pipeline.json`` (and, with ``verify``, every file's checksum).

    Raises:
        DeployError: the folder or file is missing or malformed, from a newer format, or a file
            listed in it is missing or fails its checksum.
    """
    root = Path(model_dir)
    path = root / PIPELINE_FILE
    if not root.is_dir():
        raise DeployError(f"{root}: model folder does not exist.")
    if not path.is_file():
        raise DeployError(f"{path}: not found; is {root} a folder written by `beseg export`?")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DeployError(f"{path}: not readable JSON ({' '.join(str(err).split())}).") from None
    if not isinstance(raw, dict) or raw.get("kind") != KIND:
        raise DeployError(f"{path}: not a beseg pipeline (its 'kind' is not {KIND!r}).")
    fmt = raw.get("format")
    if isinstance(fmt, bool) or not isinstance(fmt, int) or fmt < 1:
        raise DeployError(f"{path}: invalid format {fmt!r}; expected an integer from 1 to {FORMAT_VERSION}.")
    if fmt > FORMAT_VERSION:
        from beseg_runtime import __version__

        raise DeployError(f"{path}: pipeline format {fmt} is newer than format {FORMAT_VERSION}, the newest that "
                          f"beseg-runtime {__version__} reads; update beseg-runtime to run this model.")
    files = _get(raw, "files", path)
    if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
        raise DeployError(f"{path}: 'files' must map file names to SHA-256 hex digests.")
    if verify:
        for name, digest in files.items():
            file = root / name
            if not file.is_file():
                raise DeployError(f"{file}: listed in {PIPELINE_FILE} but missing.")
            actual = sha256(file)
            if actual != digest:
                raise DeployError(f"{file}: checksum mismatch (sha256 {actual[:12]}..., {PIPELINE_FILE} says "
                                  f"{str(digest)[:12]}...); the file was changed or damaged, export the model again.")
    members = []
    listed = _get(raw, "members", path)
    if not isinstance(listed, list) or not all(isinstance(m, dict) for m in listed):
        raise DeployError(f"{path}: 'members' must be a list of objects.")
    for i, m in enumerate(listed):
        where = f"members[{i}]"
        if m.get("file") not in files:
            raise DeployError(f"{path}: {where}.file {m.get('file')!r} has no checksum in 'files'.")
        try:
            members.append(Member(str(m["file"]), tuple(int(v) for v in m["window"]), float(m["overlap"]),  # type: ignore[arg-type]
                                  str(m["blending"]), float(m["sigma_scale"]), dict(m["normalization"]),
                                  *_padding(m.get("padding"))))
        except (KeyError, TypeError, ValueError) as err:
            raise DeployError(f"{path}: {where} is malformed ({type(err).__name__}: {err}).") from None
    if not members:
        raise DeployError(f"{path}: lists no ensemble members.")
    output = _get(raw, "output", path)
    try:
        return _parse(root, raw, output, members, path)
    except (TypeError, ValueError, KeyError, AttributeError) as err:
        raise DeployError(f"{path}: malformed ({type(err).__name__}: {err}); export the model again.") from None


def _parse(root: Path, raw: dict[str, Any], output: Any, members: list[Member], path: Path) -> Pipeline:
    pipeline = Pipeline(
        root=root, raw=raw,
        channels=int(_get(raw, "input.channels", path)),
        channel_names=tuple(_get(raw, "input.channel_names", path)),
        axcodes=str(_get(raw, "geometry.orientation", path)),
        spacing=tuple(float(v) for v in _get(raw, "geometry.spacing_mm", path)),  # type: ignore[arg-type]
        activation=str(_get(raw, "activation", path)),
        mirror_axes=tuple(int(a) for a in raw.get("mirror_axes", ())),
        to_labels=str(_get(raw, "output.to_labels", path)),
        regions=tuple((int(r["channel"]), int(r["label"])) for r in output.get("paint", ())),
        threshold=float(output.get("threshold", 0.5)),
        members=tuple(members),
    )
    if pipeline.activation not in ("softmax", "sigmoid"):
        raise ValueError(f"activation {pipeline.activation!r} is not softmax or sigmoid")
    if len(pipeline.spacing) != 3 or min(pipeline.spacing) <= 0:
        raise ValueError(f"geometry.spacing_mm {list(pipeline.spacing)} is not 3 positive numbers")
    if any(len(m.window) != 3 or min(m.window) < 1 for m in members):
        raise ValueError("a member's window is not 3 positive integers")
    return pipeline

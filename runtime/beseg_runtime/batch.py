"""The per-image loop of both prediction paths: predict, write, and a bad image named and skipped.

``beseg predict`` (PyTorch) and ``beseg-predict`` (this runtime) differ only in how one image
becomes a label map; what happens around it is this module: the outputs are planned and checked
before anything runs (:func:`beseg_runtime.io.plan_outputs`), each image is predicted and written
atomically, an image that fails is recorded with a one-line reason naming it and the next one is
predicted, and warnings (a scan much smaller than the window) are collected and passed on as they
happen.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from beseg_runtime.errors import BesegError
from beseg_runtime.io import write_label

__all__ = ["PredictOne", "PredictSummary", "predict_each"]

#: ``predict(image, warn)`` -> ``(labels, reference)``: (X, Y, Z) uint8 labels in the image's grid and
#: its nibabel image; ``warn(message)`` reports a one-line warning about this image.
PredictOne = Callable[[Path, Callable[[str], None]], tuple[np.ndarray, Any]]


@dataclass
class PredictSummary:
    """Which inputs were written, which failed with what reason, and the warnings, as ``(input, message)``."""

    written: list[Path] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    warnings: list[tuple[str, str]] = field(default_factory=list)


def _reason(image: Path, err: BaseException) -> str:
    """One line that names ``image``."""
    text = " ".join(str(err).split()) or type(err).__name__
    if isinstance(err, MemoryError):
        text = f"out of memory while predicting it ({text})"
    return text if str(image) in text else f"{image}: {text}"


def predict_each(plan: Iterable[tuple[Path, Path]], predict: PredictOne, overwrite: bool = False,
                 on_written: Callable[[Path], None] | None = None,
                 on_warning: Callable[[str], None] | None = None) -> PredictSummary:
    """Predict and write every ``(image, output)`` of ``plan``; a failing image is recorded, not fatal.

    Args:
        plan: from :func:`beseg_runtime.io.plan_outputs` (possibly wrapped in a progress bar).
        predict: one image -> its label map, see :data:`PredictOne`.
        overwrite: replace an existing output (the plan allowed only beseg's own label maps).
        on_written: called with each output path once it is in place.
        on_warning: called with each warning as it happens (they are in the summary too).

    Returns:
        The :class:`PredictSummary`. An image fails on beseg's own errors (unreadable, not a scan,
        wrong channels, a full disk...), on an OS error, or when memory runs out; any other
        exception is a bug and propagates.
    """
    summary = PredictSummary()
    for image, output in plan:
        def warn(message: str, image: Path = image) -> None:
            summary.warnings.append((str(image), message))
            if on_warning is not None:
                on_warning(message)

        try:
            labels, reference = predict(image, warn)
            summary.written.append(write_label(labels, reference, output, replace=overwrite))
        except (BesegError, OSError, MemoryError) as err:
            summary.failed.append((str(image), _reason(image, err)))
            continue
        if on_written is not None:
            on_written(output)
    return summary

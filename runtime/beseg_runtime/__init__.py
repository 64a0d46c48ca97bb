"""Run an exported beseg model without PyTorch: NIfTI in, NIfTI label map in the input's geometry out.

``beseg export`` writes a model folder (ONNX networks, ``pipeline.json``, README.md); this package
reads it with numpy, nibabel, scipy and onnxruntime only. It is its own distribution,
``beseg-runtime`` (``pip install beseg-runtime``, or ``pip install ./runtime`` from a checkout of
beseg), which imports nothing from ``beseg``, torch or MONAI, so it installs on machines without
PyTorch; ``beseg`` depends on it. The command line is
``beseg-predict MODEL_DIR IMAGE_OR_FOLDER... --out DIR``.

The steps mirror ``beseg predict``: reorient and resample (:mod:`beseg_runtime.geometry`), normalise
with each member's training statistics, sliding window with MONAI's padding, window placement and
blending (:mod:`beseg_runtime.window`), activation, mirroring and ensemble averaging of
probabilities, the label map, and nearest-neighbour resampling back into the input's grid with the
input's affine. The input checks, the output planning and the per-image loop
(:mod:`beseg_runtime.io`, :mod:`beseg_runtime.batch`) are the ones ``beseg predict`` uses too, and
its errors (:mod:`beseg_runtime.errors`) are beseg's.

The exports below are loaded on first use (module ``__getattr__``), so that importing
:mod:`beseg_runtime.errors` (as every ``beseg`` command does) does not load nibabel and scipy.
"""

import importlib
from typing import Any

__version__ = "0.1.0"

#: name -> the module that defines it
_EXPORTS = {"FORMAT_VERSION": "pipeline", "DeployError": "pipeline", "Pipeline": "pipeline", "load_pipeline": "pipeline",
            "PredictSummary": "batch", "Predictor": "runtime"}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"beseg_runtime.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'beseg_runtime' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])

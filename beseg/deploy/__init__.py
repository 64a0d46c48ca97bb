"""Run an exported beseg model without PyTorch: NIfTI in, NIfTI label map in the input's geometry out.

``beseg export`` writes a model folder (ONNX networks, ``pipeline.json``, README.md); this package
reads it with numpy, nibabel, scipy and onnxruntime only -- it never imports torch or MONAI, so it
installs as ``pip install beseg[deploy]`` on machines without PyTorch. The command line is
``beseg-predict MODEL_DIR IMAGE_OR_FOLDER... --out DIR``.

The steps mirror ``beseg predict``: reorient and resample (:mod:`beseg.deploy.geometry`), normalise
with each member's training statistics, sliding window with MONAI's padding, window placement and
blending (:mod:`beseg.deploy.window`), activation, mirroring and ensemble averaging of
probabilities, the label map, and nearest-neighbour resampling back into the input's grid with the
input's affine. The input checks, the output planning and the per-image loop
(:mod:`beseg.deploy.io`, :mod:`beseg.deploy.batch`) are the ones ``beseg predict`` uses too.
"""

from beseg.deploy.batch import PredictSummary
from beseg.deploy.pipeline import FORMAT_VERSION, DeployError, Pipeline, load_pipeline
from beseg.deploy.runtime import Predictor

__all__ = ["FORMAT_VERSION", "DeployError", "Pipeline", "PredictSummary", "Predictor", "load_pipeline"]

"""beseg: boundary-enhanced 3D medical image segmentation."""

from beseg.losses import BoundaryEnhancementLoss, DiceBELoss, log_filter

__version__ = "0.1.0"

__all__ = ["BoundaryEnhancementLoss", "DiceBELoss", "log_filter", "__version__"]

"""beseg: boundary-enhanced 3D medical image segmentation.

The loss exports are loaded on first use (module ``__getattr__``), so that importing a torch-free
part of the package (the CLI's parser, :mod:`beseg.errors`) never imports torch.
"""

from typing import Any

__version__ = "0.1.0"

__all__ = ["BoundaryEnhancementLoss", "DiceBELoss", "log_filter", "__version__"]

_LOSS_EXPORTS = ("BoundaryEnhancementLoss", "DiceBELoss", "log_filter")


def __getattr__(name: str) -> Any:
    if name in _LOSS_EXPORTS:
        from beseg import losses

        return getattr(losses, name)
    raise AttributeError(f"module 'beseg' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LOSS_EXPORTS])

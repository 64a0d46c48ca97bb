"""Training losses by name: the paper's Table 1 rows and a few common MONAI alternatives.

Every loss takes raw network logits and the label a task preset produces: (B, 1, ...) class
indices for a softmax task (one-hot inside the loss), or (B, K, ...) binary channels for a sigmoid
task (the overlapping BraTS regions).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from monai.losses import BoundaryLoss, DiceCELoss, DiceFocalLoss, DiceLoss, HausdorffDTLoss
from torch import Tensor, nn

from beseg.errors import ConfigError
from beseg.losses.boundary_enhancement import DiceBELoss
from beseg.losses.laplacian import check_filter_options

if TYPE_CHECKING:  # the engine's config module imports this one
    from beseg.engine.config import LossConfig

__all__ = ["LOSSES", "WeightedSumLoss", "build_loss", "check_loss_config"]

#: name -> one-line description, for configs, the CLI and error messages.
LOSSES: dict[str, str] = {
    "dice": "soft Dice (MONAI DiceLoss)",
    "dice_be": "soft Dice + boundary enhancement loss (paper: 1 and 1000)",
    "dice_boundary": "soft Dice + boundary loss of Kervadec et al. (MONAI BoundaryLoss)",
    "dice_focal": "soft Dice + focal loss (MONAI DiceFocalLoss)",
    "dice_ce": "soft Dice + cross-entropy (MONAI DiceCELoss)",
    "dice_hd": "soft Dice + Hausdorff distance-transform loss (MONAI HausdorffDTLoss)",
}


class WeightedSumLoss(nn.Module):
    """``sum_i weight_i * loss_i(input, target)`` over named terms."""

    def __init__(self, terms: Sequence[tuple[str, float, nn.Module]]) -> None:
        super().__init__()
        self.names = [name for name, _, _ in terms]
        self.weights = [float(w) for _, w, _ in terms]
        self.terms = nn.ModuleList([loss for _, _, loss in terms])

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        total = None
        for weight, loss in zip(self.weights, self.terms):
            value = weight * loss(input, target)
            total = value if total is None else total + value
        return total


def check_loss_config(config: LossConfig) -> None:
    """Check a config's ``loss`` section.

    Raises:
        ConfigError: the first invalid value, named by its dotted key (``loss.padding`` ...).
    """
    if config.name not in LOSSES:
        raise ConfigError(f"unknown loss.name {config.name!r}; choose one of: {', '.join(LOSSES)}.")
    try:  # the BE filter's own checks; their messages start with the option's name
        check_filter_options(config.smoothing_passes, config.padding, config.impl)
    except ValueError as err:
        raise ConfigError(f"loss.{err}") from None
    for key in ("lambda_dice", "lambda_be", "lambda_boundary", "lambda_focal", "lambda_ce", "lambda_hd"):
        value = getattr(config, key)
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            raise ConfigError(f"loss.{key} must be a finite number >= 0, got {value!r}.")
    if not (isinstance(config.focal_gamma, (int, float)) and math.isfinite(config.focal_gamma) and config.focal_gamma >= 0):
        raise ConfigError(f"loss.focal_gamma must be a finite number >= 0, got {config.focal_gamma!r}.")


def build_loss(config: LossConfig, activation: str, *, validate: bool = False) -> nn.Module:
    """Build the training loss of a config's ``loss`` section for a softmax or sigmoid task.

    Args:
        config: the ``loss`` section: ``name`` (one of :data:`LOSSES`), ``include_background``
            (softmax tasks only; a sigmoid task has no background channel, so it is always kept),
            the term weights ``lambda_*``, ``focal_gamma``, and the BE options
            ``smoothing_passes``, ``padding`` and ``impl``.
        activation: ``"softmax"`` (label = (B, 1, ...) class indices, one-hot inside the loss) or
            ``"sigmoid"`` (label = (B, K, ...) binary channels).
        validate: let the BE losses check class indices and NaN/Inf, which reads tensors back from
            the device (see :class:`~beseg.losses.BoundaryEnhancementLoss`). The training engine
            keeps it off: it checks every step's loss once itself, and on CUDA a check inside the
            loss would synchronise every step.

    Returns:
        A module ``loss(logits, label) -> scalar``.

    Raises:
        ConfigError: a value of ``config`` is invalid (named by its dotted key, e.g. ``loss.name``).
        ValueError: unknown ``activation``.
    """
    if activation not in ("softmax", "sigmoid"):
        raise ValueError(f"activation must be 'softmax' or 'sigmoid', got {activation!r}.")
    check_loss_config(config)
    name, c = config.name, config
    softmax = activation == "softmax"
    act = {
        "softmax": softmax, "sigmoid": not softmax, "to_onehot_y": softmax,
        "include_background": c.include_background or not softmax,
    }
    dice = DiceLoss(**act)
    if name == "dice":
        return WeightedSumLoss([("dice", c.lambda_dice, dice)])
    if name == "dice_be":
        return DiceBELoss(
            **act, lambda_dice=c.lambda_dice, lambda_be=c.lambda_be, smoothing_passes=c.smoothing_passes,
            padding=c.padding, impl=c.impl, validate=validate,
        )
    if name == "dice_boundary":
        return WeightedSumLoss([("dice", c.lambda_dice, dice), ("boundary", c.lambda_boundary, BoundaryLoss(**act))])
    if name == "dice_focal":
        return DiceFocalLoss(**act, gamma=c.focal_gamma, lambda_dice=c.lambda_dice, lambda_focal=c.lambda_focal)
    if name == "dice_ce":
        if not softmax:
            # Overlapping regions need binary cross-entropy per channel. MONAI's DiceCELoss uses it only
            # for a single output channel; with several it applies softmax cross-entropy across them.
            return WeightedSumLoss([("dice", c.lambda_dice, dice), ("bce", c.lambda_ce, nn.BCEWithLogitsLoss())])
        return DiceCELoss(**act, lambda_dice=c.lambda_dice, lambda_ce=c.lambda_ce)
    return WeightedSumLoss([("dice", c.lambda_dice, dice), ("hausdorff", c.lambda_hd, HausdorffDTLoss(**act))])

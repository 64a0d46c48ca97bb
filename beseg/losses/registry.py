"""Training losses by name: the paper's Table 1 rows and a few common MONAI alternatives.

Every loss takes raw network logits and the label a task preset produces: (B, 1, ...) class
indices for a softmax task (one-hot inside the loss), or (B, K, ...) binary channels for a sigmoid
task (the overlapping BraTS regions).
"""

from __future__ import annotations

from collections.abc import Sequence

from monai.losses import BoundaryLoss, DiceCELoss, DiceFocalLoss, DiceLoss, HausdorffDTLoss
from torch import Tensor, nn

from beseg.losses.boundary_enhancement import DiceBELoss

__all__ = ["LOSSES", "WeightedSumLoss", "build_loss"]

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


def build_loss(
    name: str,
    activation: str,
    include_background: bool = True,
    lambda_dice: float = 1.0,
    lambda_be: float = 1000.0,
    lambda_boundary: float = 1.0,
    lambda_focal: float = 1.0,
    lambda_ce: float = 1.0,
    lambda_hd: float = 1.0,
    focal_gamma: float = 2.0,
    smoothing_passes: int = 3,
    be_impl: str = "fast",
) -> nn.Module:
    """Build the training loss ``name`` for a softmax or sigmoid task.

    Args:
        name: one of :data:`LOSSES`.
        activation: ``"softmax"`` (label = class indices, one-hot inside) or ``"sigmoid"``
            (label = binary channels).
        include_background: keep channel 0 in the losses (softmax tasks only; a sigmoid task has
            no background channel, so it is always kept).
        lambda_dice, lambda_be, lambda_boundary, lambda_focal, lambda_ce, lambda_hd: term weights.
        focal_gamma: focusing exponent of the focal term.
        smoothing_passes, be_impl: passed to :class:`~beseg.losses.BoundaryEnhancementLoss`.

    Returns:
        A module ``loss(logits, label) -> scalar``. NaN/Inf checks are left to the caller (the
        training engine checks every step's loss once).

    Raises:
        ValueError: unknown ``name`` or ``activation``.
    """
    if activation not in ("softmax", "sigmoid"):
        raise ValueError(f"activation must be 'softmax' or 'sigmoid', got {activation!r}.")
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose one of: {', '.join(LOSSES)}.")
    softmax = activation == "softmax"
    act = {
        "softmax": softmax, "sigmoid": not softmax, "to_onehot_y": softmax,
        "include_background": include_background or not softmax,
    }
    dice = DiceLoss(**act)
    if name == "dice":
        return WeightedSumLoss([("dice", lambda_dice, dice)])
    if name == "dice_be":
        return DiceBELoss(
            **act, lambda_dice=lambda_dice, lambda_be=lambda_be, smoothing_passes=smoothing_passes,
            impl=be_impl, check_finite=False,
        )
    if name == "dice_boundary":
        return WeightedSumLoss([("dice", lambda_dice, dice), ("boundary", lambda_boundary, BoundaryLoss(**act))])
    if name == "dice_focal":
        return DiceFocalLoss(**act, gamma=focal_gamma, lambda_dice=lambda_dice, lambda_focal=lambda_focal)
    if name == "dice_ce":
        if not softmax:
            # MONAI's DiceCELoss applies binary cross-entropy with logits for sigmoid outputs.
            return DiceCELoss(sigmoid=True, lambda_dice=lambda_dice, lambda_ce=lambda_ce)
        return DiceCELoss(**act, lambda_dice=lambda_dice, lambda_ce=lambda_ce)
    return WeightedSumLoss([("dice", lambda_dice, dice), ("hausdorff", lambda_hd, HausdorffDTLoss(**act))])

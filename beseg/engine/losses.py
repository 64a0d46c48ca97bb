"""Training losses by name: the paper's Table 1 rows and a few common MONAI alternatives.

One table, :data:`LOSSES`, maps each name a config's ``loss.name`` may take to its description and
its builder. Every loss takes raw network logits and the label a task preset produces: (B, 1, ...)
class indices for a softmax task (one-hot inside the loss), or (B, K, ...) binary channels for a
sigmoid task (the overlapping BraTS regions).

This table lives with the engine, not in :mod:`beseg.losses`: the loss library knows nothing of
configs, and the engine chooses which losses a config may name.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from beseg.engine.config import LossConfig

__all__ = ["LOSSES", "LossEntry", "WeightedSumLoss", "build_loss"]


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

    def extra_repr(self) -> str:
        return ", ".join(f"{name}={weight:g}" for name, weight in zip(self.names, self.weights))


#: A builder gets the ``loss`` section, MONAI's activation options for the task (``softmax``,
#: ``sigmoid``, ``to_onehot_y``, ``include_background``) and whether the BE term may validate.
Builder = Callable[["LossConfig", dict[str, Any], bool], nn.Module]


@dataclass(frozen=True)
class LossEntry:
    """One trainable loss: its description (for configs, the CLI and error messages) and builder."""

    description: str
    build: Builder


def _dice(c: LossConfig, act: dict[str, Any], validate: bool) -> nn.Module:
    from monai.losses import DiceLoss

    return WeightedSumLoss([("dice", c.lambda_dice, DiceLoss(**act))])


def _dice_be(c: LossConfig, act: dict[str, Any], validate: bool) -> nn.Module:
    from beseg.losses import DiceBELoss

    return DiceBELoss(
        **act, lambda_dice=c.lambda_dice, lambda_be=c.lambda_be, smoothing_passes=c.smoothing_passes,
        padding=c.padding, impl=c.impl, validate=validate,
    )


def _dice_boundary(c: LossConfig, act: dict[str, Any], validate: bool) -> nn.Module:
    from monai.losses import BoundaryLoss, DiceLoss

    return WeightedSumLoss([("dice", c.lambda_dice, DiceLoss(**act)), ("boundary", c.lambda_boundary, BoundaryLoss(**act))])


def _dice_focal(c: LossConfig, act: dict[str, Any], validate: bool) -> nn.Module:
    from monai.losses import DiceFocalLoss

    return DiceFocalLoss(**act, gamma=c.focal_gamma, lambda_dice=c.lambda_dice, lambda_focal=c.lambda_focal)


def _dice_ce(c: LossConfig, act: dict[str, Any], validate: bool) -> nn.Module:
    from monai.losses import DiceCELoss, DiceLoss

    if not act["softmax"]:
        # Overlapping regions need binary cross-entropy per channel. MONAI's DiceCELoss uses it only
        # for a single output channel; with several it applies softmax cross-entropy across them.
        return WeightedSumLoss([("dice", c.lambda_dice, DiceLoss(**act)), ("bce", c.lambda_ce, nn.BCEWithLogitsLoss())])
    return DiceCELoss(**act, lambda_dice=c.lambda_dice, lambda_ce=c.lambda_ce)


def _dice_hd(c: LossConfig, act: dict[str, Any], validate: bool) -> nn.Module:
    from monai.losses import DiceLoss, HausdorffDTLoss

    return WeightedSumLoss([("dice", c.lambda_dice, DiceLoss(**act)), ("hausdorff", c.lambda_hd, HausdorffDTLoss(**act))])


#: name -> description and builder, for every :data:`~beseg.engine.config.LossName`.
LOSSES: dict[str, LossEntry] = {
    "dice": LossEntry("soft Dice (MONAI DiceLoss)", _dice),
    "dice_be": LossEntry("soft Dice + boundary enhancement loss (paper: 1 and 1000)", _dice_be),
    "dice_boundary": LossEntry("soft Dice + boundary loss of Kervadec et al. (MONAI BoundaryLoss)", _dice_boundary),
    "dice_focal": LossEntry("soft Dice + focal loss (MONAI DiceFocalLoss)", _dice_focal),
    "dice_ce": LossEntry("soft Dice + cross-entropy (MONAI DiceCELoss)", _dice_ce),
    "dice_hd": LossEntry("soft Dice + Hausdorff distance-transform loss (MONAI HausdorffDTLoss)", _dice_hd),
}


def build_loss(config: LossConfig, activation: str, *, validate: bool = False) -> nn.Module:
    """Build the training loss of a config's ``loss`` section for a softmax or sigmoid task.

    Args:
        config: the ``loss`` section: ``name`` (a key of :data:`LOSSES`), ``include_background``
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
        ConfigError: a value of ``config`` is invalid (named by its dotted key, e.g. ``loss.name``),
            including a name that is not in :data:`LOSSES`.
        ValueError: unknown ``activation``.
    """
    if activation not in ("softmax", "sigmoid"):
        raise ValueError(f"activation must be 'softmax' or 'sigmoid', got {activation!r}.")
    config.validate()
    softmax = activation == "softmax"
    act = {
        "softmax": softmax, "sigmoid": not softmax, "to_onehot_y": softmax,
        "include_background": config.include_background or not softmax,
    }
    return LOSSES[config.name].build(config, act, validate)

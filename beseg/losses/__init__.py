"""Losses: the boundary enhancement (BE) loss, its filter, and its combination with soft Dice."""

from beseg.losses.boundary_enhancement import BoundaryEnhancementLoss, DiceBELoss, prepare_prediction_and_target
from beseg.losses.log_filter import log_filter

__all__ = ["BoundaryEnhancementLoss", "DiceBELoss", "log_filter", "prepare_prediction_and_target"]

"""Losses: the boundary enhancement (BE) loss, its filter, and its combination with soft Dice."""

from beseg.losses.boundary_enhancement import BoundaryEnhancementLoss, DiceBELoss, prepare_prediction_and_target
from beseg.losses.laplacian import LoGFilter, log_filter

__all__ = ["BoundaryEnhancementLoss", "DiceBELoss", "LoGFilter", "log_filter", "prepare_prediction_and_target"]

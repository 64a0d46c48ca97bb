"""A CPU-sized BE trainer for the end-to-end test (a second nnUNet_extTrainer folder).

nnU-Net imports this file as the top-level module ``beseg_ci_trainers``.
"""

from __future__ import annotations

import torch

from beseg.nnunet.trainers.beseg_be_trainers import nnUNetTrainerBESpacing


class nnUNetTrainerBESpacing_ci(nnUNetTrainerBESpacing):
    """One epoch of 3 training and 1 validation iterations; validation without mirroring (speed)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 1
        self.num_iterations_per_epoch = 3
        self.num_val_iterations_per_epoch = 1

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        rotation, dummy_2d, initial_patch_size, _ = super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        self.inference_allowed_mirroring_axes = None  # no test-time mirroring: 8x fewer forward passes
        return rotation, dummy_2d, initial_patch_size, None

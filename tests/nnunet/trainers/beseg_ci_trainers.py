"""CPU-sized trainers for the end-to-end tests (a second nnUNet_extTrainer folder, as a user's own).

nnU-Net imports this file as the top-level module ``beseg_ci_trainers`` and finds a trainer as a
module attribute of its name. nnU-Net's shortest shipped schedule (``nnUNetTrainer_1epoch``) still
runs 250 iterations, too long for CI's CPU; these run one epoch of 3 training and 1 validation
iterations, and predict without test-time mirroring (8x fewer forward passes).
"""

from __future__ import annotations

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from beseg.nnunet.trainers.beseg_be_trainers import nnUNetTrainerBE, nnUNetTrainerBESpacing


def _ci(base: type[nnUNetTrainer]) -> type[nnUNetTrainer]:
    """``base`` with CI's schedule, named ``<base>_ci``."""

    class Short(base):
        # nnU-Net records the constructor's arguments by name (my_init_kwargs): keep its explicit signature.
        def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                     device: torch.device = torch.device("cuda")):
            super().__init__(plans, configuration, fold, dataset_json, device)
            self.num_epochs = 1
            self.num_iterations_per_epoch = 3
            self.num_val_iterations_per_epoch = 1

        def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
            rotation, dummy_2d, initial_patch_size, _ = super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
            self.inference_allowed_mirroring_axes = None
            return rotation, dummy_2d, initial_patch_size, None

    Short.__name__ = Short.__qualname__ = f"{base.__name__}_ci"
    Short.__doc__ = f"{base.__name__}, one epoch of 3 iterations, no test-time mirroring."
    return Short


nnUNetTrainer_ci = _ci(nnUNetTrainer)  # nnU-Net's default trainer (Dice + CE)
nnUNetTrainerBE_ci = _ci(nnUNetTrainerBE)  # + 1000 x BE
nnUNetTrainerBESpacing_ci = _ci(nnUNetTrainerBESpacing)  # + 1000 x BE with the spacing-aware filter

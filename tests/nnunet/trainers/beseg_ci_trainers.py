"""CPU-sized trainers for the end-to-end tests (a second nnUNet_extTrainer folder, as a user's own).

nnU-Net imports this file as the top-level module ``beseg_ci_trainers``. nnU-Net's shortest shipped
schedule (``nnUNetTrainer_1epoch``) still runs 250 iterations, too long for CI's CPU; these run one
epoch of 3 training and 1 validation iterations. Each keeps nnU-Net's explicit ``__init__`` signature:
nnU-Net records its arguments by name (``my_init_kwargs``).
"""

from __future__ import annotations

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from beseg.nnunet.trainers.beseg_be_trainers import nnUNetTrainerBE, nnUNetTrainerBESpacing


def _shorten(trainer: nnUNetTrainer) -> None:
    trainer.num_epochs = 1
    trainer.num_iterations_per_epoch = 3
    trainer.num_val_iterations_per_epoch = 1


def _no_test_time_mirroring(trainer: nnUNetTrainer, configured: tuple) -> tuple:
    rotation, dummy_2d, initial_patch_size, _ = configured
    trainer.inference_allowed_mirroring_axes = None  # no test-time mirroring: 8x fewer forward passes
    return rotation, dummy_2d, initial_patch_size, None


class nnUNetTrainerBESpacing_ci(nnUNetTrainerBESpacing):
    """nnUNetTrainerBESpacing, one short epoch; validation without mirroring (speed)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        _shorten(self)

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        return _no_test_time_mirroring(self, super().configure_rotation_dummyDA_mirroring_and_inital_patch_size())


class nnUNetTrainer_ci(nnUNetTrainer):
    """nnU-Net's default trainer (Dice + CE), one short epoch; no test-time mirroring."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        _shorten(self)

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        return _no_test_time_mirroring(self, super().configure_rotation_dummyDA_mirroring_and_inital_patch_size())


class nnUNetTrainerBE_ci(nnUNetTrainerBE):
    """beseg's nnUNetTrainerBE (Dice + CE + 1000 x BE), one short epoch; no test-time mirroring."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        _shorten(self)

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        return _no_test_time_mirroring(self, super().configure_rotation_dummyDA_mirroring_and_inital_patch_size())

"""nnU-Net v2 trainers with the boundary enhancement (BE) loss, found through ``nnUNet_extTrainer``.

Usage (nnunetv2 >= 2.8)::

    export nnUNet_extTrainer=$(beseg nnunet trainer-dir)
    nnUNetv2_train DATASET 3d_fullres 0 -tr nnUNetTrainerBE
    nnUNetv2_predict -i IN -o OUT -d DATASET -c 3d_fullres -f 0 -tr nnUNetTrainerBE

Trainers (the loss per deep-supervision output; outputs weighted as nnU-Net weights them):

* ``nnUNetTrainerBE``: nnU-Net's default loss (Dice + cross-entropy, or Dice + BCE for
  region-based datasets) + 1000 x BE. Compare with ``nnUNetTrainer``.
* ``nnUNetTrainerDiceBE``: the paper's loss, soft Dice + 1000 x BE, where the Dice is the Dice
  term of nnU-Net's default loss. Compare with ``nnUNetTrainerDiceNoBE`` (the same Dice alone;
  unlike upstream's ``nnUNetTrainerDiceLoss`` it honours the ignore label).
* ``nnUNetTrainerBESpacing``, ``nnUNetTrainerDiceBESpacing``: the same with BE's spacing-aware
  filter, given each output's voxel size from the plan (the configuration's target spacing,
  coarsened by the deep-supervision scale).
* Short schedules of each, as nnU-Net's ``nnUNetTrainer_Xepochs``: ``<name>_1epoch`` and
  ``<name>_{5,10,20,50,100,250,500}epochs`` (e.g. ``nnUNetTrainerBE_5epochs``).

This module is imported by nnU-Net as a top-level module named ``beseg_be_trainers``: imports
here are absolute.
"""

from __future__ import annotations

import torch
from nnunetv2.training.loss.compound_losses import DC_and_BCE_loss, DC_and_CE_loss
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from torch import nn

from beseg.nnunet.loss import NNUNetBELoss, deep_supervision_spacings

SHORT_SCHEDULES = (1, 5, 10, 20, 50, 100, 250, 500)


class nnUNetTrainerBE(nnUNetTrainer):
    """nnU-Net's default loss + ``lambda_be`` x BE (1000, the paper's weight) at every output.

    Subclasses change the class attributes: ``lambda_be``; ``be_spacing`` (use the plan's voxel
    size in BE's filter); ``schedule_epochs`` (``num_epochs``; ``None`` keeps nnU-Net's 1000).
    BE is computed in float32 on the softmax (sigmoid for regions) probabilities, also under
    nnU-Net's autocast; voxels with the dataset's ignore label do not count.
    """

    lambda_be: float = 1000.0
    be_spacing: bool = False
    schedule_epochs: int | None = None

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        if self.schedule_epochs is not None:
            self.num_epochs = self.schedule_epochs

    def _build_loss(self) -> nn.Module:
        default = super()._build_loss()
        # Reuse nnU-Net's own loss and weights (including its DDP and torch.compile choices).
        if isinstance(default, DeepSupervisionWrapper):
            base, weights = default.loss, default.weight_factors
        else:
            base, weights = default, None
        spacings = None
        if self.be_spacing:
            spacing = self.configuration_manager.spacing
            scales = self._get_deep_supervision_scales() or [[1.0] * len(spacing)]
            spacings = deep_supervision_spacings(spacing, scales)
        self.print_to_log_file(
            f"beseg: {type(self).__name__}: loss = {self._base_description()} + {self.lambda_be:g} x BE per output, "
            f"deep-supervision weights {None if weights is None else [round(float(w), 4) for w in weights]}, "
            f"BE spacing {spacings if spacings is not None else 'voxels (the paper)'}"
            + ("" if self.label_manager.ignore_label is None else
               f", ignore label {self.label_manager.ignore_label}: its voxels count in no term")
        )
        return NNUNetBELoss(
            self._base_loss(base), weights, regions=self.label_manager.has_regions,
            ignore_label=self.label_manager.ignore_label, spacings=spacings, lambda_be=self.lambda_be,
        )

    def _base_loss(self, default: nn.Module) -> nn.Module:
        """The per-output loss BE is added to, given nnU-Net's default one (returned as is)."""
        return default

    def _base_description(self) -> str:
        return "nnU-Net's Dice + " + ("BCE" if self.label_manager.has_regions else "cross-entropy")


class nnUNetTrainerDiceBE(nnUNetTrainerBE):
    """Soft Dice + 1000 x BE (the paper's loss): nnU-Net's default loss without its CE/BCE term."""

    def _base_loss(self, default: nn.Module) -> nn.Module:
        if not isinstance(default, (DC_and_CE_loss, DC_and_BCE_loss)):
            raise TypeError(
                f"{type(self).__name__} expects nnU-Net's default DC_and_CE_loss or DC_and_BCE_loss, got "
                f"{type(default).__name__}; use nnUNetTrainerBE with this nnU-Net version."
            )
        # The Dice term with nnU-Net's own settings and ignore-label masking; DC_and_CE_loss skips
        # the CE when its weight is 0 (DC_and_BCE_loss computes and multiplies it by 0).
        default.weight_ce = 0
        return default

    def _base_description(self) -> str:
        return "nnU-Net's soft Dice"


class nnUNetTrainerDiceNoBE(nnUNetTrainerDiceBE):
    """Soft Dice alone: the baseline for :class:`nnUNetTrainerDiceBE` (BE weight 0, not computed)."""

    lambda_be = 0.0


class nnUNetTrainerBESpacing(nnUNetTrainerBE):
    """:class:`nnUNetTrainerBE` with BE's spacing-aware filter at each output's voxel size."""

    be_spacing = True


class nnUNetTrainerDiceBESpacing(nnUNetTrainerDiceBE):
    """:class:`nnUNetTrainerDiceBE` with BE's spacing-aware filter at each output's voxel size."""

    be_spacing = True


def _short_schedule(base: type[nnUNetTrainerBE], epochs: int) -> type[nnUNetTrainerBE]:
    name = f"{base.__name__}_{epochs}epoch" + ("" if epochs == 1 else "s")
    doc = f":class:`{base.__name__}` for {epochs} epoch(s) (smoke tests and short comparisons)."
    return type(name, (base,), {"schedule_epochs": epochs, "__doc__": doc, "__module__": __name__,
                                "__qualname__": name})


_TRAINERS = (nnUNetTrainerBE, nnUNetTrainerDiceBE, nnUNetTrainerDiceNoBE, nnUNetTrainerBESpacing,
             nnUNetTrainerDiceBESpacing)
# nnU-Net finds a trainer as an attribute of this module, so each schedule gets a module-level name.
for _base in _TRAINERS:
    for _epochs in SHORT_SCHEDULES:
        _cls = _short_schedule(_base, _epochs)
        globals()[_cls.__name__] = _cls
del _base, _epochs, _cls

__all__ = sorted(name for name, obj in globals().items()
                 if isinstance(obj, type) and issubclass(obj, nnUNetTrainerBE))

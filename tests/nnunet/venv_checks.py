"""Checks of the BE trainers that need nnU-Net v2 installed.

tests/test_nnunet.py runs this file with pytest under the nnU-Net virtual environment's
interpreter (``BESEG_NNUNET_PYTHON``); the main test run does not collect it (its name does not
start with ``test_``). Every expected loss is built here from nnU-Net's own loss classes and
weights and BE written out from beseg's filter (:func:`beseg.losses.log_filter`), not from the
trainer's code nor from the loss class.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from batchgeneratorsv2.transforms.utils.deep_supervision_downsampling import DownsampleSegForDSTransform
from batchgeneratorsv2.transforms.utils.seg_to_regions import ConvertSegmentationToRegionsTransform
from nnunetv2.training.loss.compound_losses import DC_and_BCE_loss, DC_and_CE_loss
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
from nnunetv2.utilities.helpers import softmax_helper_dim1

from beseg.losses import log_filter
from beseg.nnunet import trainer_dir

SPACING = (2.5, 0.8, 0.8)  # (z, y, x): the plan's order, which is the tensors' axis order
PATCH = (8, 16, 16)
STRIDES = ((1, 1, 1), (1, 2, 2), (2, 2, 2), (2, 2, 2))  # three deep-supervision outputs
DS_SCALES = ((1.0, 1.0, 1.0), (1.0, 0.5, 0.5), (0.5, 0.25, 0.25))

LABELS = {"background": 0, "spleen": 1, "liver": 2}
LABELS_IGNORE = {**LABELS, "ignore": 3}
REGIONS = {"background": 0, "whole": [1, 2], "core": 2}
REGIONS_IGNORE = {**REGIONS, "ignore": 3}


@pytest.fixture(autouse=True)
def _nnunet_env(tmp_path, monkeypatch):
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
    monkeypatch.setenv("nnUNet_extTrainer", str(trainer_dir()))
    monkeypatch.setenv("nnUNet_compile", "f")


def _plans(batch_dice: bool) -> dict:
    """The parts of an nnU-Net plan that a trainer's constructor and loss read."""
    configuration = {
        "data_identifier": "nnUNetPlans_3d_fullres", "preprocessor_name": "DefaultPreprocessor", "batch_size": 2,
        "patch_size": list(PATCH), "median_image_size_in_voxels": list(PATCH), "spacing": list(SPACING),
        "normalization_schemes": ["CTNormalization"], "use_mask_for_norm": [False], "batch_dice": batch_dice,
        "architecture": {
            "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
            "arch_kwargs": {"n_stages": len(STRIDES), "strides": [list(s) for s in STRIDES]},
            "_kw_requires_import": [],
        },
    }
    return {
        "dataset_name": "Dataset999_Check", "plans_name": "nnUNetPlans", "continue_training": False,
        "original_median_spacing_after_transp": list(SPACING), "original_median_shape_after_transp": list(PATCH),
        "image_reader_writer": "SimpleITKIO", "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
        "experiment_planner_used": "ExperimentPlanner", "label_manager": "LabelManager",
        "configurations": {"3d_fullres": configuration},
    }


def _trainer(name: str, labels: dict, batch_dice: bool = False) -> nnUNetTrainer:
    dataset_json = {"labels": labels, "channel_names": {"0": "CT"}, "numTraining": 2, "file_ending": ".nii.gz"}
    if any(isinstance(v, list) for v in labels.values()):
        dataset_json["regions_class_order"] = [1, 2]
    cls = recursive_find_trainer_class_by_name(name)
    return cls(plans=_plans(batch_dice), configuration="3d_fullres", fold=0, dataset_json=dataset_json,
               device=torch.device("cpu"))


def _batch(trainer: nnUNetTrainer, seed: int = 0) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Logits per deep-supervision output and the targets nnU-Net's own transforms make for them."""
    gen = torch.Generator().manual_seed(seed)
    lm = trainer.label_manager
    n_values = max(lm.all_labels) + 1 + (1 if lm.has_ignore_label else 0)
    # Blocky label maps (2x4x4 blocks), so every output has structures with boundaries.
    coarse = torch.randint(0, n_values, (2, 1, PATCH[0] // 2, PATCH[1] // 4, PATCH[2] // 4), generator=gen)
    seg = coarse.repeat_interleave(2, 2).repeat_interleave(4, 3).repeat_interleave(4, 4).to(torch.int16)
    scales = [list(s) for s in trainer._get_deep_supervision_scales()]
    assert [tuple(s) for s in scales] == list(DS_SCALES)
    targets = []
    for item in seg:  # nnU-Net's transforms work per case: (1, *spatial)
        if lm.has_regions:
            regions = list(lm.foreground_regions) + ([lm.ignore_label] if lm.has_ignore_label else [])
            item = ConvertSegmentationToRegionsTransform(regions, channel_in_seg=0)(segmentation=item)["segmentation"]
        targets.append(DownsampleSegForDSTransform(ds_scales=scales)(segmentation=item)["segmentation"])
    targets = [torch.stack([case[i] for case in targets]) for i in range(len(scales))]
    n_out = lm.num_segmentation_heads
    outputs = [(2 * torch.randn(2, n_out, *t.shape[2:], generator=gen)).requires_grad_() for t in targets]
    return outputs, targets


def _ds_weights(n: int) -> list[float]:
    """nnU-Net's deep-supervision weights: 1/2^i, the lowest resolution 0, normalised."""
    w = np.array([1 / 2 ** i for i in range(n)])
    w[-1] = 0
    return list(w / w.sum())


def _default_loss(trainer: nnUNetTrainer) -> torch.nn.Module:
    lm, batch_dice = trainer.label_manager, trainer.configuration_manager.batch_dice
    if lm.has_regions:
        return DC_and_BCE_loss({}, {"batch_dice": batch_dice, "do_bg": True, "smooth": 1e-5, "ddp": False},
                               use_ignore_label=lm.has_ignore_label, dice_class=MemoryEfficientSoftDiceLoss)
    return DC_and_CE_loss({"batch_dice": batch_dice, "smooth": 1e-5, "do_bg": False, "ddp": False}, {},
                          weight_ce=1, weight_dice=1, ignore_label=lm.ignore_label,
                          dice_class=MemoryEfficientSoftDiceLoss)


def _soft_dice(trainer: nnUNetTrainer, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    lm = trainer.label_manager
    dice = MemoryEfficientSoftDiceLoss(
        apply_nonlin=torch.sigmoid if lm.has_regions else softmax_helper_dim1,
        batch_dice=trainer.configuration_manager.batch_dice, do_bg=lm.has_regions, smooth=1e-5, ddp=False)
    target, mask = _valid(trainer, target)
    return dice(logits, target, loss_mask=mask)


def _valid(trainer: nnUNetTrainer, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The target without its ignored voxels (replaced by 0 / the ignore channel removed), and their mask."""
    lm = trainer.label_manager
    if not lm.has_ignore_label:
        return target, None
    if lm.has_regions:
        return target[:, :-1], ~target[:, -1:]
    mask = target != lm.ignore_label
    return torch.where(mask, target, 0), mask


def _be(trainer: nnUNetTrainer, logits: torch.Tensor, target: torch.Tensor, spacing=None) -> torch.Tensor:
    """BE written out from beseg's filter alone: the masked P - Y filtered, squared, summed, and divided
    by the voxels that count in every item and kept channel (the loss's mean over the voxels that count)."""
    regions = trainer.label_manager.has_regions
    target, mask = _valid(trainer, target)
    if regions:
        probs, truth = torch.sigmoid(logits.float()), target.float()
    else:  # softmax, one-hot target, background channel left out
        probs = torch.softmax(logits.float(), dim=1)[:, 1:]
        truth = torch.nn.functional.one_hot(target[:, 0].long(), logits.shape[1]).movedim(-1, 1)[:, 1:].float()
    counts = torch.ones_like(probs) if mask is None else mask.float().expand_as(probs)
    response = log_filter((probs - truth) * counts, smoothing_passes=3, spacing=spacing)
    return response.square().sum() / counts.sum()


def _expected(trainer: nnUNetTrainer, outputs, targets, base, lambda_be=1000.0, spacings=None) -> torch.Tensor:
    total = 0.0
    for i, (w, out, tgt) in enumerate(zip(_ds_weights(len(outputs)), outputs, targets)):
        if w:
            be = _be(trainer, out, tgt, None if spacings is None else spacings[i])
            total = total + w * (base(out, tgt) + lambda_be * be)
    return total


def _assert_same_value_and_gradient(actual: torch.Tensor, expected: torch.Tensor, outputs) -> None:
    torch.testing.assert_close(actual, expected.to(actual.dtype), rtol=1e-5, atol=1e-6)
    got = torch.autograd.grad(actual, outputs, allow_unused=True)
    want = torch.autograd.grad(expected, outputs, allow_unused=True)
    for g, w in zip(got, want):
        if w is None:
            assert g is None or not g.any()
        else:
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-7)


CASES = {"labels": LABELS, "labels+ignore": LABELS_IGNORE, "regions": REGIONS, "regions+ignore": REGIONS_IGNORE}


@pytest.mark.parametrize("labels", CASES.values(), ids=CASES.keys())
def test_be_trainer_loss_is_nnunet_default_plus_1000_be(labels):
    trainer = _trainer("nnUNetTrainerBE", labels)
    outputs, targets = _batch(trainer)
    default = _default_loss(trainer)
    expected = _expected(trainer, outputs, targets, default)
    actual = trainer._build_loss()(outputs, targets)
    _assert_same_value_and_gradient(actual, expected, outputs)
    # The BE term is a real part of it: 1000 x BE is not negligible against the default loss.
    be_part = (expected - _expected(trainer, outputs, targets, default, lambda_be=0.0)).detach()
    assert float(be_part) > 1e-3 * abs(float(expected.detach()))


@pytest.mark.parametrize("labels", [LABELS_IGNORE, REGIONS_IGNORE], ids=["labels+ignore", "regions+ignore"])
def test_ignored_voxels_do_not_change_the_be_trainers_loss(labels):
    trainer = _trainer("nnUNetTrainerDiceBE", labels)
    outputs, targets = _batch(trainer)
    loss = trainer._build_loss()
    before = loss(outputs, targets)
    _, mask = _valid(trainer, targets[0])
    changed = [o.detach().clone() for o in outputs]
    changed[0] = torch.where(mask, changed[0], 50 * torch.randn_like(changed[0]))
    assert (~mask).any()
    torch.testing.assert_close(loss(changed, targets), before, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("labels", CASES.values(), ids=CASES.keys())
def test_dice_be_trainer_loss_is_soft_dice_plus_1000_be_and_its_baseline_the_dice_alone(labels):
    trainer = _trainer("nnUNetTrainerDiceBE", labels, batch_dice=True)
    outputs, targets = _batch(trainer, seed=1)

    def dice(out, tgt):
        return _soft_dice(trainer, out, tgt)

    _assert_same_value_and_gradient(trainer._build_loss()(outputs, targets),
                                    _expected(trainer, outputs, targets, dice), outputs)
    baseline = _trainer("nnUNetTrainerDiceNoBE", labels, batch_dice=True)
    _assert_same_value_and_gradient(baseline._build_loss()(outputs, targets),
                                    _expected(trainer, outputs, targets, dice, lambda_be=0.0), outputs)


def test_spacing_trainers_give_each_output_its_own_voxel_size():
    trainer = _trainer("nnUNetTrainerBESpacing", LABELS)
    outputs, targets = _batch(trainer, seed=2)
    spacings = [tuple(sp / s for sp, s in zip(SPACING, scale)) for scale in DS_SCALES]
    expected = _expected(trainer, outputs, targets, _default_loss(trainer), spacings=spacings)
    _assert_same_value_and_gradient(trainer._build_loss()(outputs, targets), expected, outputs)
    voxel_form = _trainer("nnUNetTrainerBE", LABELS)._build_loss()(outputs, targets)
    difference = (voxel_form - expected).detach()
    assert abs(float(difference)) > 1e-4 * abs(float(expected.detach()))  # anisotropic: a different filter

    dice_trainer = _trainer("nnUNetTrainerDiceBESpacing", LABELS)
    expected = _expected(dice_trainer, outputs, targets, lambda o, t: _soft_dice(dice_trainer, o, t),
                         spacings=spacings)
    _assert_same_value_and_gradient(dice_trainer._build_loss()(outputs, targets), expected, outputs)


def test_without_deep_supervision_the_loss_takes_one_output():
    trainer = _trainer("nnUNetTrainerBE", LABELS_IGNORE)
    outputs, targets = _batch(trainer, seed=3)
    trainer.enable_deep_supervision = False
    expected = _default_loss(trainer)(outputs[0], targets[0]) + 1000 * _be(trainer, outputs[0], targets[0])
    _assert_same_value_and_gradient(trainer._build_loss()(outputs[0], targets[0]), expected, outputs[:1])


def test_nnunet_finds_the_trainers_by_name_and_short_schedules_set_the_epochs():
    epochs = {"nnUNetTrainerBE": 1000, "nnUNetTrainerDiceBE": 1000, "nnUNetTrainerDiceNoBE": 1000,
              "nnUNetTrainerBESpacing": 1000, "nnUNetTrainerDiceBESpacing": 1000, "nnUNetTrainerBE_1epoch": 1,
              "nnUNetTrainerBE_5epochs": 5, "nnUNetTrainerDiceBE_50epochs": 50,
              "nnUNetTrainerDiceNoBE_50epochs": 50, "nnUNetTrainerBESpacing_250epochs": 250}
    for name, n in epochs.items():
        trainer = _trainer(name, LABELS)
        assert type(trainer).__name__ == name and isinstance(trainer, nnUNetTrainer)
        assert trainer.num_epochs == n


def test_cli_prints_the_trainer_dir_and_the_core_package_never_imports_nnunetv2():
    # One fresh interpreter: what importing beseg and running the CLI loads, with nnunetv2 installed.
    code = ("import sys, beseg, beseg.cli, beseg.nnunet, beseg.nnunet.loss, beseg.nnunet.trainers; "
            "assert beseg.cli.main(['nnunet', 'trainer-dir']) == 0; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'nnunetv2'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == [str(trainer_dir()), "[]"]

"""build_loss: each name equals an independent sum of MONAI losses / beseg's BE loss with the configured
weights, for softmax and sigmoid tasks; bad settings are refused naming the config key."""

from __future__ import annotations

import typing

import pytest
import torch
import torch.nn.functional as F
from monai.losses import BoundaryLoss, DiceLoss, FocalLoss, HausdorffDTLoss
from monai.networks.utils import one_hot

from beseg.engine.config import LossConfig, LossName, config_from_dict
from beseg.errors import ConfigError
from beseg.losses import BoundaryEnhancementLoss
from beseg.engine.losses import LOSSES, build_loss

# Weights other than 1 and 1000, so that a term with the wrong weight (or none) shows.
WEIGHTS = {"lambda_dice": 0.7, "lambda_be": 30.0, "lambda_boundary": 1.3, "lambda_focal": 1.7, "lambda_ce": 0.4,
           "lambda_hd": 0.9, "focal_gamma": 1.5, "smoothing_passes": 2}


def _inputs(activation: str) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    if activation == "softmax":  # 3 classes, labels as int64 class indices (what the trainer passes)
        return torch.randn(2, 3, 12, 11, 10, generator=g), torch.randint(0, 3, (2, 1, 12, 11, 10), generator=g)
    return torch.randn(2, 3, 12, 11, 10, generator=g), (torch.rand(2, 3, 12, 11, 10, generator=g) > 0.6).float()


def _expected(name: str, activation: str, x: torch.Tensor, y: torch.Tensor, cfg: LossConfig) -> torch.Tensor:
    """The loss built from its parts, following each part's documented definition."""
    softmax = activation == "softmax"
    bg = cfg.include_background or not softmax
    y_1h = one_hot(y, num_classes=x.shape[1]) if softmax else y
    dice = DiceLoss(softmax=softmax, sigmoid=not softmax, include_background=bg)(x, y_1h)
    if name == "dice":
        other = torch.zeros(())
    elif name == "dice_be":
        other = cfg.lambda_be * BoundaryEnhancementLoss(
            softmax=softmax, sigmoid=not softmax, include_background=bg, smoothing_passes=cfg.smoothing_passes,
            padding=cfg.padding, impl=cfg.impl)(x, y_1h)
    elif name == "dice_boundary":
        other = cfg.lambda_boundary * BoundaryLoss(softmax=softmax, sigmoid=not softmax, include_background=bg)(x, y_1h)
    elif name == "dice_focal":  # MONAI's focal term works on the logits (sigmoid focal), per channel
        other = cfg.lambda_focal * FocalLoss(include_background=bg, gamma=cfg.focal_gamma)(x, y_1h)
    elif name == "dice_ce":
        other = cfg.lambda_ce * (F.cross_entropy(x, y[:, 0].long()) if softmax
                                 else F.binary_cross_entropy_with_logits(x, y))
    else:
        other = cfg.lambda_hd * HausdorffDTLoss(softmax=softmax, sigmoid=not softmax, include_background=bg)(x, y_1h)
    return cfg.lambda_dice * dice + other


@pytest.mark.parametrize("activation", ["softmax", "sigmoid"])
@pytest.mark.parametrize("name", list(LOSSES))
def test_each_loss_is_the_weighted_sum_of_its_terms(name, activation):
    cfg = LossConfig(name=name, **WEIGHTS)
    x, y = _inputs(activation)
    got = build_loss(cfg, activation)(x, y)
    torch.testing.assert_close(got, _expected(name, activation, x, y, cfg), rtol=1e-5, atol=1e-6)
    # the weights matter: another lambda_dice changes the value
    heavier = build_loss(LossConfig(name=name, **{**WEIGHTS, "lambda_dice": 2.0}), activation)(x, y)
    assert not torch.isclose(heavier, got)


@pytest.mark.parametrize("padding,impl", [("valid", "fast"), ("same", "reference"), ("valid", "reference")])
def test_be_padding_and_impl_come_from_the_config(padding, impl):
    cfg = LossConfig(name="dice_be", padding=padding, impl=impl, lambda_be=100.0)
    x, y = _inputs("softmax")
    loss = build_loss(cfg, "softmax")
    assert (loss.be.padding, loss.be.impl) == (padding, impl)
    torch.testing.assert_close(loss(x, y), _expected("dice_be", "softmax", x, y, cfg), rtol=1e-5, atol=1e-6)
    if padding == "valid":  # valid padding drops the border: a different value from the paper's "same"
        same = build_loss(LossConfig(name="dice_be", impl=impl, lambda_be=100.0), "softmax")(x, y)
        assert not torch.isclose(same, loss(x, y))


def test_the_engine_builds_the_be_loss_without_device_reads():
    # validate=False: no class-index or NaN scan inside the loss (the trainer checks the loss once per step)
    assert build_loss(LossConfig(name="dice_be"), "softmax").validate is False
    assert build_loss(LossConfig(name="dice_be"), "softmax", validate=True).validate is True


@pytest.mark.parametrize("changes,match", [
    ({"name": "dice_xyz"}, "unknown loss.name 'dice_xyz'; choose one of: dice, dice_be"),
    ({"padding": "reflect"}, "loss.padding must be one of same, valid, got 'reflect'"),
    ({"impl": "cuda"}, "loss.impl must be one of fast, reference, got 'cuda'"),
    ({"smoothing_passes": -1}, "loss.smoothing_passes must be an integer >= 0, got -1"),
    ({"lambda_be": -5.0}, "loss.lambda_be must be a finite number >= 0, got -5.0"),
    ({"lambda_hd": float("nan")}, "loss.lambda_hd must be a finite number >= 0, got nan"),
    ({"focal_gamma": -1}, "loss.focal_gamma must be a finite number >= 0, got -1"),
])
def test_bad_loss_settings_name_the_key(changes, match):
    with pytest.raises(ConfigError, match=match):
        build_loss(LossConfig(**changes), "softmax")
    raw = {"data": {"task": "phantom-spleen"}, "model": {"network": "segresnet"}, "loss": {"name": "dice", **changes}}
    with pytest.raises(ConfigError, match=match):  # and so does loading a config
        config_from_dict(raw)


def test_every_configurable_loss_name_has_a_builder_and_no_builder_is_unreachable():
    assert set(LOSSES) == set(typing.get_args(LossName))


def test_bad_activation_is_refused():
    with pytest.raises(ValueError, match="activation must be 'softmax' or 'sigmoid', got 'relu'"):
        build_loss(LossConfig(), "relu")

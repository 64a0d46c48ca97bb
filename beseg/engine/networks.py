"""Networks of the paper's Table 1, built from MONAI by name."""

from __future__ import annotations

from torch import nn

from beseg.engine.config import ModelConfig

__all__ = ["NETWORKS", "build_network", "window_multiple"]

NETWORKS = {
    "segresnet": "SegResNet (Myronenko 2018): residual encoder-decoder, blocks_down 1,2,2,4, blocks_up 1,1,1",
    "unet": "UNet (MONAI, residual units)",
    "ahnet": "AHNet (Liu et al. 2018), trained from scratch: nothing is downloaded",
}


def build_network(config: ModelConfig, in_channels: int, out_channels: int) -> nn.Module:
    """Build ``config.network`` for 3D inputs of ``in_channels`` channels.

    Returns:
        A module mapping (B, in_channels, H, W, D) to (B, out_channels, H, W, D) logits; H, W, D
        must be multiples of :func:`window_multiple`.

    Raises:
        ValueError: unknown network name.
    """
    from monai.networks.nets import AHNet, SegResNet, UNet

    if config.network == "segresnet":
        return SegResNet(
            spatial_dims=3, in_channels=in_channels, out_channels=out_channels, init_filters=config.init_filters,
            blocks_down=(1, 2, 2, 4), blocks_up=(1, 1, 1), dropout_prob=config.dropout or None,
        )
    if config.network == "unet":
        return UNet(
            spatial_dims=3, in_channels=in_channels, out_channels=out_channels, channels=config.unet_channels,
            strides=config.unet_strides, num_res_units=config.unet_res_units, dropout=config.dropout,
        )
    if config.network == "ahnet":
        return AHNet(
            layers=config.ahnet_layers, spatial_dims=3, in_channels=in_channels, out_channels=out_channels,
            psp_block_num=config.ahnet_psp_blocks, pretrained=False,
        )
    raise ValueError(f"unknown model.network {config.network!r}; choose one of: {', '.join(NETWORKS)}.")


def window_multiple(config: ModelConfig) -> int:
    """Spatial sizes the network accepts are multiples of this (its total down-sampling)."""
    if config.network == "segresnet":
        return 8  # three stride-2 levels
    if config.network == "unet":
        m = 1
        for s in config.unet_strides:
            m *= s
        return m
    return 32  # AHNet: stride-2 stem, pooling and three down-sampling blocks

"""Sliding-window inference, shared by validation during training, ``beseg evaluate`` and ``beseg predict``.

The probabilities become label maps in one place, :meth:`beseg.data.TaskPreset.label_map`, and
scored masks in another, :func:`beseg.data.classes.class_masks`, so that all three score exactly
the same predictions.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from monai.inferers import sliding_window_inference
from torch import Tensor, nn

from beseg_runtime.window import mirror_flips

__all__ = ["predict_probabilities", "autocast_for"]


def autocast_for(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """float16 autocast on CUDA when ``enabled``; a no-op on CPU, where it would only slow down."""
    if enabled and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.float16)
    return contextlib.nullcontext()


@torch.no_grad()
def predict_probabilities(
    model: nn.Module,
    image: Tensor,
    roi_size: Sequence[int],
    activation: str,
    overlap: float = 0.25,
    sw_batch_size: int = 2,
    amp: bool = False,
    mirror_axes: Sequence[int] = (),
) -> Tensor:
    """Class probabilities of a whole volume by sliding-window inference.

    Args:
        model: network in eval mode, (B, C_in, *roi) -> (B, K, *roi) logits.
        image: (B, C_in, H, W, D) preprocessed volume on the model's device.
        roi_size: window in voxels (a multiple of the network's down-sampling).
        activation: ``"softmax"`` or ``"sigmoid"``.
        overlap: fraction of overlap between neighbouring windows (the paper: small).
        sw_batch_size: windows per forward pass.
        amp: float16 autocast on CUDA.
        mirror_axes: spatial axes (0, 1, 2 = H, W, D) of test-time mirroring: the probabilities are
            averaged over every combination of flips of these axes (2^n sliding-window passes,
            as nnU-Net does); ``()`` runs once.

    Returns:
        (B, K, H, W, D) float32 probabilities.
    """
    flips = mirror_flips(mirror_axes)
    total = None
    for axes in flips:
        dims = [2 + a for a in axes]
        x = image.flip(dims) if dims else image
        with autocast_for(image.device, amp):
            logits = sliding_window_inference(x, roi_size, sw_batch_size, model, overlap=overlap, mode="gaussian")
        logits = logits.float()
        probs = torch.softmax(logits, dim=1) if activation == "softmax" else torch.sigmoid(logits)
        probs = probs.flip(dims) if dims else probs
        total = probs if total is None else total + probs
    assert total is not None
    return total if len(flips) == 1 else total / len(flips)

"""Sliding-window inference and turning network outputs into masks and label maps.

Shared by validation during training, ``beseg evaluate`` and ``beseg predict``, so that all three
score exactly the same predictions.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from monai.inferers import sliding_window_inference
from torch import Tensor, nn

__all__ = ["predict_probabilities", "foreground_masks", "label_map", "autocast_for"]


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

    Returns:
        (B, K, H, W, D) float32 probabilities.
    """
    with autocast_for(image.device, amp):
        logits = sliding_window_inference(image, roi_size, sw_batch_size, model, overlap=overlap, mode="gaussian")
    logits = logits.float()
    return torch.softmax(logits, dim=1) if activation == "softmax" else torch.sigmoid(logits)


def foreground_masks(probs: Tensor, activation: str) -> Tensor:
    """Binary masks of the classes that are scored: (B, K, ...) -> (B, K', ...) bool.

    Softmax outputs are arg-maxed and the background channel dropped (K' = K - 1); sigmoid
    outputs (overlapping regions) are thresholded at 0.5 (K' = K).
    """
    if activation == "softmax":
        labels = probs.argmax(dim=1)
        return torch.stack([labels == k for k in range(1, probs.shape[1])], dim=1)
    return probs > 0.5


def label_map(probs: Tensor, activation: str, label_mode: str) -> Tensor:
    """One label map per volume, in the dataset's own label values: (B, K, ...) -> (B, 1, ...) uint8.

    Softmax: the arg-max class. Sigmoid BraTS regions (TC, WT, ET) go back to MSD Task01 labels:
    1 edema (WT outside TC), 2 non-enhancing tumour (TC outside ET), 3 enhancing tumour (ET).
    """
    if activation == "softmax":
        return probs.argmax(dim=1, keepdim=True).to(torch.uint8)
    if label_mode != "brats_regions":
        raise ValueError(f"no label map for sigmoid outputs with label_mode={label_mode!r}.")
    tc, wt, et = (probs[:, i : i + 1] > 0.5 for i in range(3))
    out = torch.zeros_like(tc, dtype=torch.uint8)
    out[wt] = 1
    out[tc] = 2
    out[et] = 3
    return out

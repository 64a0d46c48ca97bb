"""The BE term on nnU-Net v2's terms: its network outputs, targets, ignore label and deep supervision.

nnU-Net hands a trainer's loss the raw network outputs (logits; one tensor per deep-supervision
output, full resolution first) and the matching targets:

* label-based datasets (softmax): (B, 1, *spatial) label maps; voxels holding the dataset's ignore
  label (if it has one) must not count;
* region-based datasets (sigmoid): (B, R, *spatial) region channels, plus a last channel marking
  the ignored voxels when the dataset has an ignore label.

:class:`NNUNetBETerm` turns one such pair into beseg's :class:`BoundaryEnhancementLoss` on the
probabilities; :class:`NNUNetBELoss` adds it, times ``lambda_be``, to a base loss (nnU-Net's
default, or its Dice alone) at every deep-supervision output, weighted as nnU-Net weights them.
Nothing here imports nnunetv2: the trainers in :func:`beseg.nnunet.trainer_dir` do.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from beseg.losses.boundary_enhancement import BoundaryEnhancementLoss
from beseg.losses.laplacian import Impl, Padding

__all__ = ["NNUNetBELoss", "NNUNetBETerm", "deep_supervision_spacings"]


def deep_supervision_spacings(spacing: Sequence[float], scales: Sequence[Sequence[float]]) -> list[tuple[float, ...]]:
    """Voxel size of every deep-supervision output.

    Args:
        spacing: voxel size (mm) of the full-resolution patch per spatial axis, in the tensor's
            axis order (nnU-Net's ``configuration_manager.spacing`` is already in that order: the
            plan's spacing is transposed with ``transpose_forward``, as the data arrays are).
        scales: per output, the size of its grid relative to the patch per axis (nnU-Net's
            ``_get_deep_supervision_scales()``: ``[1, 1, 1]``, ``[0.5, 0.5, 0.5]``, ...).

    Returns:
        One spacing tuple (mm) per output: ``spacing / scale`` per axis.

    Raises:
        ValueError: a scale does not have one positive value per axis of ``spacing``.
    """
    out = []
    for scale in scales:
        if len(scale) != len(spacing) or any(s <= 0 for s in scale):
            raise ValueError(
                f"deep-supervision scale {list(scale)} must have one positive value per spacing axis {list(spacing)}."
            )
        out.append(tuple(float(sp) / float(s) for sp, s in zip(spacing, scale)))
    return out


class NNUNetBETerm(nn.Module):
    """BE of one nnU-Net network output against nnU-Net's target for it, in float32.

    The logits are cast to float32 before the softmax/sigmoid, so under nnU-Net's CUDA autocast
    the probabilities and the BE (which disables autocast itself) are float32; nnU-Net's
    GradScaler scales the sum as usual. Ignored voxels are passed to the BE loss as its ``mask``:
    ``P - Y`` is zero there, so they contribute neither to the value nor to the gradient, and the
    BE is the mean over the voxels that count (as nnU-Net's cross-entropy averages over its
    non-ignored voxels), so its weight does not shrink with the annotated fraction of the patch.

    Example:
        >>> term = NNUNetBETerm(regions=False, ignore_label=3)
        >>> logits = torch.randn(2, 3, 32, 32, 32, requires_grad=True)
        >>> labels = torch.randint(0, 4, (2, 1, 32, 32, 32)).float()   # 3 = ignore
        >>> term(logits, labels).backward()
    """

    def __init__(
        self,
        regions: bool,
        ignore_label: int | None = None,
        spacing: Sequence[float] | None = None,
        smoothing_passes: int = 3,
        padding: Padding = "same",
        impl: Impl = "fast",
    ) -> None:
        """
        Args:
            regions: ``False``: label-based training; softmax over channels, target a (B, 1, ...)
                label map, the background channel left out (as nnU-Net's Dice, ``do_bg=False``).
                ``True``: region-based training; sigmoid per channel, target (B, R, ...) region
                channels, every channel kept (as nnU-Net's Dice there, ``do_bg=True``).
            ignore_label: nnU-Net's ignore label (``label_manager.ignore_label``) or ``None``. For
                label maps, voxels holding it are ignored; for regions, the target's last channel
                marks the ignored voxels (nnU-Net appends it) and is removed.
            spacing: voxel size (mm) of this output per spatial axis, in the tensor's axis order,
                for the BE loss's spacing-aware filter; ``None`` is the paper's voxel form.
            smoothing_passes, padding, impl: as in :class:`BoundaryEnhancementLoss`.

        Raises:
            ValueError: an invalid ``spacing``, ``smoothing_passes``, ``padding`` or ``impl``.
        """
        super().__init__()
        self.regions = bool(regions)
        self.ignore_label = ignore_label
        # validate=False: no device-to-host reads inside the training step (nnU-Net checks its data).
        self.be = BoundaryEnhancementLoss(
            include_background=self.regions, to_onehot_y=not self.regions, smoothing_passes=smoothing_passes,
            padding=padding, impl=impl, spacing=None if spacing is None else tuple(float(s) for s in spacing),
            validate=False,
        )

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        """
        Args:
            logits: (B, C, *spatial) network output, any floating dtype (float16 under autocast).
            target: (B, 1, *spatial) label map, or (B, R[+1], *spatial) region channels (see
                ``regions`` and ``ignore_label``), any dtype nnU-Net produces.

        Returns:
            Scalar BE, float32: the mean over the voxels that count (all but the ignored ones) of
            every batch item and kept channel.
        """
        mask = None
        if self.regions:
            if self.ignore_label is not None:
                ignored = target[:, -1:]
                mask = ~ignored if ignored.dtype == torch.bool else ignored == 0
                target = target[:, :-1]
            probs = torch.sigmoid(logits.float())
        else:
            if self.ignore_label is not None:
                mask = target != self.ignore_label
                # Any valid class will do under the mask; 0 always exists.
                target = torch.where(mask, target, torch.zeros((), dtype=target.dtype, device=target.device))
            probs = torch.softmax(logits.float(), dim=1)
        return self.be(probs, target, mask=mask)


class NNUNetBELoss(nn.Module):
    """``sum_i w_i * (base(out_i, tgt_i) + lambda_be * BE(out_i, tgt_i))`` over nnU-Net's outputs.

    With deep supervision the weights are nnU-Net's (``DeepSupervisionWrapper.weight_factors``:
    ``1/2^i``, the lowest resolution 0, normalised to sum 1), and outputs with weight 0 are not
    computed at all, as nnU-Net does. Each output has its own :class:`NNUNetBETerm`, so the
    spacing-aware form sees each output's own voxel size.

    Example:
        >>> base = lambda out, tgt: out.new_zeros(())      # stands in for nnU-Net's DC_and_CE_loss
        >>> loss = NNUNetBELoss(base, weights=[4 / 7, 2 / 7, 1 / 7, 0.0], regions=False)
        >>> outs = [torch.randn(2, 2, s, s, s) for s in (32, 16, 8, 4)]
        >>> tgts = [torch.randint(0, 2, (2, 1, s, s, s)) for s in (32, 16, 8, 4)]
        >>> value = loss(outs, tgts)
    """

    def __init__(
        self,
        base: nn.Module,
        weights: Sequence[float] | None = None,
        *,
        regions: bool,
        ignore_label: int | None = None,
        spacings: Sequence[Sequence[float]] | None = None,
        lambda_be: float = 1000.0,
        smoothing_passes: int = 3,
        padding: Padding = "same",
        impl: Impl = "fast",
    ) -> None:
        """
        Args:
            base: loss for one output, called as ``base(logits, target)`` with nnU-Net's tensors
                (e.g. nnU-Net's ``DC_and_CE_loss``, unwrapped from its ``DeepSupervisionWrapper``).
            weights: one weight per deep-supervision output; ``None`` without deep supervision
                (the network returns a single tensor).
            regions, ignore_label: as in :class:`NNUNetBETerm`.
            spacings: one voxel size per output (see :func:`deep_supervision_spacings`), or
                ``None`` for the paper's voxel form.
            lambda_be: weight of the BE term (the paper: 1000).
            smoothing_passes, padding, impl: as in :class:`BoundaryEnhancementLoss`.

        Raises:
            ValueError: no weights, a negative or all-zero weight, a negative ``lambda_be``, or
                ``spacings`` not one per output.
        """
        super().__init__()
        n_outputs = 1 if weights is None else len(weights)
        self.weights = (1.0,) if weights is None else tuple(float(w) for w in weights)
        if n_outputs == 0 or any(w < 0 for w in self.weights) or not any(self.weights):
            raise ValueError(f"weights must be >= 0 with at least one > 0, got {list(self.weights)}.")
        if lambda_be < 0:
            raise ValueError(f"lambda_be must be >= 0, got {lambda_be}.")
        if spacings is not None and len(spacings) != n_outputs:
            raise ValueError(f"spacings must have one entry per output ({n_outputs}), got {len(spacings)}.")
        self.base = base
        self.lambda_be = float(lambda_be)
        self.be_terms = nn.ModuleList(
            NNUNetBETerm(regions, ignore_label, None if spacings is None else spacings[i],
                         smoothing_passes=smoothing_passes, padding=padding, impl=impl)
            for i in range(n_outputs)
        )

    def forward(self, output: Tensor | Sequence[Tensor], target: Tensor | Sequence[Tensor]) -> Tensor:
        """
        Args:
            output: the network's (B, C, *spatial) logits, or with deep supervision a list of
                them, full resolution first.
            target: nnU-Net's target for each output (see :class:`NNUNetBETerm`).

        Returns:
            Scalar loss.

        Raises:
            ValueError: the number of outputs or targets differs from the number of weights.
        """
        outputs = [output] if isinstance(output, Tensor) else list(output)
        targets = [target] if isinstance(target, Tensor) else list(target)
        if len(outputs) != len(self.weights) or len(targets) != len(self.weights):
            raise ValueError(
                f"expected {len(self.weights)} output(s) and target(s) (one per deep-supervision weight), got "
                f"{len(outputs)} and {len(targets)}."
            )
        terms = []
        for weight, be, out, tgt in zip(self.weights, self.be_terms, outputs, targets):
            if weight == 0.0:
                continue
            loss = self.base(out, tgt)
            if self.lambda_be != 0.0:  # lambda_be = 0: the base loss alone, as a baseline
                loss = loss + self.lambda_be * be(out, tgt)
            terms.append(weight * loss)
        return sum(terms[1:], terms[0])  # at least one weight is > 0 (checked in __init__)

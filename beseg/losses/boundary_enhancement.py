"""Boundary enhancement (BE) loss of Yang et al., MIDL 2020, and its combination with soft Dice."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch
from monai.losses import DiceLoss
from monai.networks.utils import one_hot
from monai.utils import LossReduction
from torch import Tensor
from torch.nn.modules.loss import _Loss

from beseg.losses.laplacian import (
    Impl,
    Padding,
    _check_filter_args,
    check_filter_options,
    _log_reference,
    _log_same_fast,
    _zero_border_,
    log_margin,
)

__all__ = ["BoundaryEnhancementLoss", "DiceBELoss", "prepare_prediction_and_target"]


def _check_activation_args(sigmoid: bool, softmax: bool, other_act: Callable | None) -> None:
    if other_act is not None and not callable(other_act):
        raise TypeError(f"other_act must be None or callable, got {type(other_act).__name__}.")
    if int(sigmoid) + int(softmax) + int(other_act is not None) > 1:
        raise ValueError("Incompatible values: more than one of sigmoid=True, softmax=True, other_act is not None.")


def prepare_prediction_and_target(
    input: Tensor,
    target: Tensor,
    *,
    sigmoid: bool = False,
    softmax: bool = False,
    other_act: Callable[[Tensor], Tensor] | None = None,
    to_onehot_y: bool = False,
    include_background: bool = True,
) -> tuple[Tensor, Tensor]:
    """Validate a prediction/target pair and apply MONAI's loss preprocessing.

    Applies, in MONAI's order: the activation, the one-hot conversion of the target, then the
    removal of the background channel.

    Args:
        input: (B, C, H, W[, D]) floating-point prediction (logits or probabilities).
        target: (B, C, H, W[, D]) or, with ``to_onehot_y``, (B, 1, H, W[, D]) class indices.
        sigmoid, softmax, other_act, to_onehot_y, include_background: as in MONAI's ``DiceLoss``.

    Returns:
        ``(prediction, target)``, both (B, C', H, W[, D]) in the prediction's dtype, where
        ``C' = C - 1`` without the background channel and ``C`` otherwise.

    Raises:
        TypeError: ``input`` or ``target`` is not a tensor, or the prediction is not floating point.
        ValueError: the number of dimensions is not 4 or 5 or differs between the two, batch or
            spatial sizes differ, a tensor is empty (a zero-size dimension), class indices are not integers in ``[0, C)`` with
            ``to_onehot_y``, or the shapes differ after the one-hot conversion.
    """
    for name, value in (("input", input), ("target", target)):
        if not isinstance(value, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}.")
    if not input.is_floating_point():
        raise TypeError(
            f"input (the prediction) must be a floating-point tensor of logits or probabilities, got dtype "
            f"{input.dtype}; cast it with .float()."
        )
    if input.ndim not in (4, 5):
        raise ValueError(
            f"input must have shape (B, C, H, W) or (B, C, H, W, D), got {input.ndim} dimensions {tuple(input.shape)}."
        )
    if target.ndim != input.ndim:
        raise ValueError(
            f"target must have the same number of dimensions as input ({input.ndim}), got {target.ndim} "
            f"dimensions {tuple(target.shape)}."
        )
    if target.shape[0] != input.shape[0] or target.shape[2:] != input.shape[2:]:
        raise ValueError(
            f"target must match input in batch and spatial sizes: input {tuple(input.shape)}, target {tuple(target.shape)}."
        )
    if input.numel() == 0 or target.numel() == 0:
        raise ValueError(
            f"input and target must not be empty: input {tuple(input.shape)}, target {tuple(target.shape)}; the loss "
            "needs at least one batch item, channel and voxel."
        )
    _check_activation_args(sigmoid, softmax, other_act)

    n_pred_ch = input.shape[1]
    if sigmoid:
        input = torch.sigmoid(input)
    elif softmax:
        if n_pred_ch == 1:
            warnings.warn("single channel prediction, `softmax=True` ignored.", stacklevel=3)
        else:
            input = torch.softmax(input, dim=1)
    elif other_act is not None:
        input = other_act(input)

    if to_onehot_y:
        if n_pred_ch == 1:
            warnings.warn("single channel prediction, `to_onehot_y=True` ignored.", stacklevel=3)
        else:
            target = _checked_one_hot(target, n_pred_ch)

    if not include_background:
        if n_pred_ch == 1:
            warnings.warn("single channel prediction, `include_background=False` ignored.", stacklevel=3)
        else:
            input, target = input[:, 1:], target[:, 1:]

    if target.shape != input.shape:
        raise ValueError(
            f"ground truth has different shape ({tuple(target.shape)}) from input ({tuple(input.shape)})"
            + ("" if to_onehot_y else "; pass to_onehot_y=True for a (B, 1, ...) label map")
            + "."
        )
    return input, target.to(input.dtype)


def _checked_one_hot(target: Tensor, num_classes: int) -> Tensor:
    if target.shape[1] != 1:
        raise ValueError(f"to_onehot_y=True needs a target with one channel of class indices, got shape {tuple(target.shape)}.")
    if target.is_floating_point():
        if not bool(torch.isfinite(target).all()):
            raise ValueError("target contains NaN or Inf values; class indices must be finite integers.")
        if not bool((target == target.round()).all()):
            raise ValueError("target holds non-integer values; with to_onehot_y=True it must hold class indices.")
    if target.dtype == torch.bool:
        target = target.to(torch.uint8)
    lo, hi = torch.aminmax(target)
    if lo < 0 or hi >= num_classes:
        raise ValueError(
            f"target holds class indices in [{lo.item():g}, {hi.item():g}], outside [0, {num_classes - 1}] for "
            f"{num_classes} prediction channels."
        )
    return one_hot(target, num_classes=num_classes, dim=1)


class _PreprocessedLoss(_Loss):
    """MONAI's activation / one-hot / background options, validated and applied in one place."""

    def __init__(
        self,
        include_background: bool,
        to_onehot_y: bool,
        sigmoid: bool,
        softmax: bool,
        other_act: Callable[[Tensor], Tensor] | None,
        reduction: LossReduction | str,
    ) -> None:
        super().__init__(reduction=LossReduction(reduction).value)
        _check_activation_args(sigmoid, softmax, other_act)
        self.include_background = include_background
        self.to_onehot_y = to_onehot_y
        self.sigmoid = sigmoid
        self.softmax = softmax
        self.other_act = other_act

    def prepare(self, input: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        """:func:`prepare_prediction_and_target` with this loss's options."""
        return prepare_prediction_and_target(
            input, target, sigmoid=self.sigmoid, softmax=self.softmax, other_act=self.other_act,
            to_onehot_y=self.to_onehot_y, include_background=self.include_background,
        )


class _FastBEFunction(torch.autograd.Function):
    """Per-(batch, channel) ``mean(F(P - Y)^2)`` with the analytic gradient ``(2/N) F(F(P - Y))``."""

    @staticmethod
    def forward(ctx, pred: Tensor, target: Tensor, smoothing_passes: int, padding: str) -> Tensor:  # type: ignore[override]
        ctx.smoothing_passes = smoothing_passes
        ctx.out_dtype = pred.dtype
        ctx.target_dtype = target.dtype
        # Work in at least float32: the Laplacian takes differences of nearly equal smoothed values.
        work_dtype = torch.promote_types(pred.dtype, torch.float32)
        if pred.dtype == work_dtype:
            diff = torch.sub(pred, target)
        else:  # subtract after the cast, so half-precision inputs lose nothing more
            diff = pred.to(work_dtype).sub_(target)
        filtered = _log_same_fast(diff, smoothing_passes, owned=True)
        del diff
        n_voxels = filtered[0, 0].numel()
        if padding == "valid":
            # The valid result is the interior; zeroing the border makes sum and gradient both right.
            margin = log_margin(smoothing_passes)
            _zero_border_(filtered, margin)
            n_voxels = _numel_interior(filtered.shape[2:], margin)
        ctx.n_voxels = n_voxels
        ctx.save_for_backward(filtered)
        per_channel = torch.linalg.vector_norm(filtered.flatten(2), dim=2).square_()
        return per_channel.div_(n_voxels)

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, Tensor | None, None, None]:  # type: ignore[override]
        (filtered,) = ctx.saved_tensors
        scale = grad_out.to(filtered.dtype).mul(2.0 / ctx.n_voxels)
        scale = scale.reshape(*scale.shape, *([1] * (filtered.ndim - 2)))
        grad = _log_same_fast(filtered, ctx.smoothing_passes, scale=scale)
        grad_pred = grad.to(ctx.out_dtype) if ctx.needs_input_grad[0] else None
        grad_target = grad.neg().to(ctx.target_dtype) if ctx.needs_input_grad[1] else None
        return grad_pred, grad_target, None, None


def _numel_interior(spatial_shape: Sequence[int], margin: int) -> int:
    n = 1
    for s in spatial_shape:
        n *= s - 2 * margin
    return n


def _be_per_channel(pred: Tensor, target: Tensor, smoothing_passes: int, padding: str, impl: str) -> Tensor:
    """``mean over voxels of (F(P) - F(Y))^2``, shape (B, C), in at least float32."""
    if impl == "fast":
        return _FastBEFunction.apply(pred, target, smoothing_passes, padding)
    work_dtype = torch.promote_types(pred.dtype, torch.float32)
    # The literal form: the filter chain runs on the prediction and on the label separately.
    diff = _log_reference(pred.to(work_dtype), smoothing_passes, padding) - _log_reference(
        target.to(work_dtype), smoothing_passes, padding
    )
    return diff.square().flatten(2).mean(dim=2)


class BoundaryEnhancementLoss(_PreprocessedLoss):
    """Boundary enhancement (BE) loss (Yang et al., "Enhancing Foreground Boundaries for Medical
    Image Segmentation", MIDL 2020).

    The prediction ``P`` and the label ``Y`` are passed through the same fixed filter ``F``: three
    3x3x3 box filters (weights 1/27) followed by the discrete Laplacian (see :func:`log_filter`).
    ``F`` responds only near boundaries, so the loss ``mean((F(P) - F(Y))^2)`` compares the two
    boundaries and ignores constant regions. It cannot tell inside from outside, so train it with
    a region loss: :class:`DiceBELoss` is the paper's ``1 * Dice + 1000 * BE``.

    The loss is the mean over voxels of the squared difference per (batch item, channel), then
    reduced over batch and channels; the paper's "l2 norm" is this mean of squares (as in the
    author's public code), which is what makes its weight of 1000 sensible.

    Example:
        >>> loss = BoundaryEnhancementLoss(softmax=True, to_onehot_y=True)
        >>> logits = torch.randn(2, 3, 32, 32, 32, requires_grad=True)
        >>> labels = torch.randint(0, 3, (2, 1, 32, 32, 32))
        >>> loss(logits, labels).backward()
    """

    def __init__(
        self,
        include_background: bool = False,
        to_onehot_y: bool = False,
        sigmoid: bool = False,
        softmax: bool = False,
        other_act: Callable[[Tensor], Tensor] | None = None,
        reduction: LossReduction | str = LossReduction.MEAN,
        smoothing_passes: int = 3,
        padding: Padding = "same",
        impl: Impl = "fast",
        check_finite: bool = True,
    ) -> None:
        """
        Args:
            include_background: if False, channel 0 (the background) is excluded. Ignored, with a
                warning, for a single-channel prediction.
            to_onehot_y: convert a (B, 1, ...) target of class indices to one-hot.
            sigmoid: apply a sigmoid to the prediction first.
            softmax: apply a softmax over channels to the prediction first.
            other_act: any other callable applied to the prediction first, e.g. ``torch.tanh``.
            reduction: ``"mean"`` or ``"sum"`` over batch and channels, or ``"none"`` for a
                (B, C') tensor of per-item, per-channel losses.
            smoothing_passes: box filters before the Laplacian; the paper uses 3.
            padding: ``"same"`` (zero padding keeping the size; the paper's form) or ``"valid"``
                (only voxels whose whole stencil lies inside, as in the author's MONAI pull
                request #4170, which also used ``smoothing_passes=1``).
            impl: ``"fast"`` (filters ``P - Y`` once by separable shifted adds, with an analytic
                backward) or ``"reference"`` (the paper's literal convolutions on ``P`` and ``Y``).
                Same value and gradient up to rounding.
            check_finite: raise a ``ValueError`` naming ``input`` or ``target`` when the loss is
                not finite because of NaN or Inf values. It reads one number back per call, which
                synchronises a CUDA stream; switch it off for asynchronous GPU training.

        Raises:
            TypeError: ``other_act`` is not callable.
            ValueError: more than one of ``sigmoid``, ``softmax``, ``other_act``; an unknown
                ``reduction``, ``padding`` or ``impl``; ``smoothing_passes`` not an integer >= 0.
        """
        super().__init__(include_background, to_onehot_y, sigmoid, softmax, other_act, reduction)
        check_filter_options(smoothing_passes, padding, impl)
        self.smoothing_passes = smoothing_passes
        self.padding = padding
        self.impl = impl
        self.check_finite = check_finite

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        """
        Args:
            input: (B, C, H, W[, D]) floating-point prediction: probabilities, or logits with
                ``sigmoid``/``softmax``/``other_act``.
            target: (B, C, H, W[, D]) label, or (B, 1, H, W[, D]) class indices with ``to_onehot_y``.

        Returns:
            A scalar for ``"mean"``/``"sum"``; a (B, C') tensor for ``"none"``, where ``C'`` is the
            number of channels kept. Computed in at least float32, also under autocast.

        Raises:
            TypeError: a non-tensor argument, or an integer or boolean prediction.
            ValueError: wrong number of dimensions, an empty tensor, mismatched shapes (also after one-hot), class
                indices outside ``[0, C)``, NaN or Inf in the prediction or target (with
                ``check_finite``), or a spatial size too small for ``padding="valid"``.
        """
        pred, target = self.prepare(input, target)
        _check_filter_args(pred, self.smoothing_passes, self.padding, self.impl)
        with torch.autocast(device_type=pred.device.type, enabled=False):
            per_channel = _be_per_channel(pred, target, self.smoothing_passes, self.padding, self.impl)
        if self.check_finite:
            _raise_if_not_finite(per_channel, input, target)
        if self.reduction == LossReduction.MEAN.value:
            return per_channel.mean()
        if self.reduction == LossReduction.SUM.value:
            return per_channel.sum()
        return per_channel


def _raise_if_not_finite(loss: Tensor, input: Tensor, target: Tensor) -> None:
    # Checking the (tiny) loss costs nothing; the inputs are scanned only to name the culprit.
    if bool(torch.isfinite(loss).all()):
        return
    for name, value in (("input", input), ("target", target)):
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise ValueError(f"{name} contains NaN or Inf values; the boundary enhancement loss is undefined.")
    # Both finite: the squared filter response overflowed the dtype; report it rather than hide it.
    raise ValueError(
        "the boundary enhancement loss overflowed; the prediction and target should be probabilities in [0, 1]."
    )


class DiceBELoss(_PreprocessedLoss):
    """``lambda_dice * soft Dice + lambda_be * BE``, the paper's training loss (1 and 1000).

    The activation, one-hot conversion and background removal are applied once and shared by
    both terms. The Dice term is MONAI's :class:`~monai.losses.DiceLoss`, configured with its own
    keyword names.

    Example:
        >>> loss = DiceBELoss(to_onehot_y=True, softmax=True)
        >>> logits = torch.randn(1, 2, 48, 48, 48, requires_grad=True)
        >>> labels = torch.randint(0, 2, (1, 1, 48, 48, 48))
        >>> loss(logits, labels).backward()
    """

    def __init__(
        self,
        include_background: bool = True,
        to_onehot_y: bool = False,
        sigmoid: bool = False,
        softmax: bool = False,
        other_act: Callable[[Tensor], Tensor] | None = None,
        squared_pred: bool = False,
        jaccard: bool = False,
        reduction: LossReduction | str = LossReduction.MEAN,
        smooth_nr: float = 1e-5,
        smooth_dr: float = 1e-5,
        batch: bool = False,
        weight: Sequence[float] | float | int | Tensor | None = None,
        lambda_dice: float = 1.0,
        lambda_be: float = 1000.0,
        smoothing_passes: int = 3,
        padding: Padding = "same",
        impl: Impl = "fast",
        check_finite: bool = True,
    ) -> None:
        """
        Args:
            include_background, to_onehot_y, sigmoid, softmax, other_act, squared_pred, jaccard,
            smooth_nr, smooth_dr, batch, weight: as in MONAI's ``DiceLoss``;
                ``include_background`` applies to both terms.
            reduction: ``"mean"`` or ``"sum"`` (each term reduced so, then weighted and added).
            lambda_dice: weight of the Dice term (the paper's lambda1 = 1).
            lambda_be: weight of the BE term (the paper's lambda2 = 1000).
            smoothing_passes, padding, impl, check_finite: as in :class:`BoundaryEnhancementLoss`.

        Raises:
            TypeError: ``other_act`` is not callable.
            ValueError: conflicting activations, negative weights, ``reduction="none"``, or an
                invalid BE setting.
        """
        super().__init__(include_background, to_onehot_y, sigmoid, softmax, other_act, reduction)
        if self.reduction == LossReduction.NONE.value:
            raise ValueError("DiceBELoss supports reduction 'mean' or 'sum'; use DiceLoss and BoundaryEnhancementLoss for 'none'.")
        if lambda_dice < 0 or lambda_be < 0:
            raise ValueError(f"lambda_dice and lambda_be must be >= 0, got {lambda_dice} and {lambda_be}.")
        self.lambda_dice = float(lambda_dice)
        self.lambda_be = float(lambda_be)
        # The preprocessing is done here once, so both terms get ready-made probabilities.
        self.dice = DiceLoss(
            squared_pred=squared_pred, jaccard=jaccard, reduction=reduction, smooth_nr=smooth_nr,
            smooth_dr=smooth_dr, batch=batch, weight=weight,
        )
        self.be = BoundaryEnhancementLoss(
            include_background=True, reduction=reduction, smoothing_passes=smoothing_passes,
            padding=padding, impl=impl, check_finite=check_finite,
        )

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        """
        Args:
            input: (B, C, H, W[, D]) floating-point prediction.
            target: (B, C, H, W[, D]) label, or (B, 1, H, W[, D]) class indices with ``to_onehot_y``.

        Returns:
            Scalar loss.

        Raises:
            TypeError, ValueError: as :class:`BoundaryEnhancementLoss`.
        """
        pred, target = self.prepare(input, target)
        return self.lambda_dice * self.dice(pred, target) + self.lambda_be * self.be(pred, target)

"""Boundary enhancement (BE) loss of Yang et al., MIDL 2020, and its combination with soft Dice."""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Sequence

import torch
from monai.losses import DiceLoss
from monai.networks.utils import one_hot
from monai.utils import LossReduction
from torch import Tensor
from torch.nn.modules.loss import _Loss

from beseg.losses.laplacian import (
    check_filter_input,
    check_filter_options,
    cpu_chunks,
    crop_margins,
    fast_log_filter,
    filter_chain_,
    filter_spec,
    FilterSpec,
    Impl,
    LoGFilterFunction,
    pad_margins,
    Padding,
    per_volume_scale,
    reference_log_filter,
    scratch_for,
    zero_border_,
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
    validate: bool = True,
) -> tuple[Tensor, Tensor]:
    """Validate a prediction/target pair and apply MONAI's loss preprocessing.

    Applies, in MONAI's order: the activation, the one-hot conversion of the target, then the
    removal of the background channel.

    Args:
        input: (B, C, H, W[, D]) floating-point prediction (logits or probabilities).
        target: (B, C, H, W[, D]) or, with ``to_onehot_y``, (B, 1, H, W[, D]) class indices.
        sigmoid, softmax, other_act, to_onehot_y, include_background: as in MONAI's ``DiceLoss``.
        validate: check that class indices are integers in ``[0, C)`` (reads the target back from
            the device); shapes and types are always checked.

    Returns:
        ``(prediction, target)``, both (B, C', H, W[, D]) in the prediction's dtype, where
        ``C' = C - 1`` without the background channel and ``C`` otherwise.

    Raises:
        TypeError: ``input`` or ``target`` is not a tensor, or the prediction is not floating point.
        ValueError: the number of dimensions is not 4 or 5 or differs between the two, batch or
            spatial sizes differ, a tensor is empty (a zero-size dimension), class indices are not
            integers in ``[0, C)`` with ``to_onehot_y`` and ``validate``, or the shapes differ after
            the one-hot conversion.
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
            target = _checked_one_hot(target, n_pred_ch, validate)

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


def _checked_one_hot(target: Tensor, num_classes: int, validate: bool = True) -> Tensor:
    if target.shape[1] != 1:
        raise ValueError(f"to_onehot_y=True needs a target with one channel of class indices, got shape {tuple(target.shape)}.")
    if target.dtype == torch.bool:
        target = target.to(torch.uint8)
    if not validate:  # every check below reads the target back from the device
        return one_hot(target, num_classes=num_classes, dim=1)
    if target.is_floating_point():
        if not bool(torch.isfinite(target).all()):
            raise ValueError("target contains NaN or Inf values; class indices must be finite integers.")
        if not bool((target == target.round()).all()):
            raise ValueError("target holds non-integer values; with to_onehot_y=True it must hold class indices.")
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
        validate: bool = True,
    ) -> None:
        super().__init__(reduction=LossReduction(reduction).value)
        _check_activation_args(sigmoid, softmax, other_act)
        self.include_background = include_background
        self.to_onehot_y = to_onehot_y
        self.sigmoid = sigmoid
        self.softmax = softmax
        self.other_act = other_act
        self.validate = validate

    def extra_repr(self) -> str:
        act = "sigmoid" if self.sigmoid else "softmax" if self.softmax else (
            getattr(self.other_act, "__name__", "other_act") if self.other_act is not None else "none")
        return (f"activation={act}, include_background={self.include_background}, to_onehot_y={self.to_onehot_y}, "
                f"reduction={self.reduction}, validate={self.validate}")

    def prepare(self, input: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        """:func:`prepare_prediction_and_target` with this loss's options."""
        return prepare_prediction_and_target(
            input, target, sigmoid=self.sigmoid, softmax=self.softmax, other_act=self.other_act,
            to_onehot_y=self.to_onehot_y, include_background=self.include_background, validate=self.validate,
        )


class _FastBEFunction(torch.autograd.Function):
    """Per-(batch, channel) ``sum(F(P - Y)^2)`` with the analytic gradient ``2 F(F(P - Y))``.

    The sum, not the mean: the caller divides by the number of voxels that count (all of them, or
    those of a mask), so the normalisation is an ordinary differentiable division.

    The first backward reuses the filtered difference kept from the forward pass (kept without the
    box filters' constant normalisation, which is applied to the norm instead: one pass less). A backward that
    builds a graph (``create_graph=True``: double backward, Hessian-vector products) recomputes the
    gradient from the inputs with differentiable filter calls instead, so it can be differentiated
    again, with respect to the prediction, the target and the incoming gradient.
    """

    @staticmethod
    def forward(ctx, pred: Tensor, target: Tensor, spec: FilterSpec, padding: str) -> Tensor:  # type: ignore[override]
        ctx.spec, ctx.padding = spec, padding
        ctx.out_dtype, ctx.target_dtype = pred.dtype, target.dtype
        # At least float32: the Laplacian takes differences of nearly equal smoothed values.
        work_dtype = torch.promote_types(pred.dtype, torch.float32)
        filtered = torch.empty(pred.shape, dtype=work_dtype, device=pred.device)
        squares = torch.empty(pred.shape[:2], dtype=work_dtype, device=pred.device)
        chunks = cpu_chunks(filtered)
        scratch = scratch_for(filtered, chunks)
        for idx in chunks:  # chunk by chunk, so that each volume stays in the cache from P - Y to its norm
            response = _difference(pred[idx], target[idx], out=filtered[idx])
            # Unscaled (no final multiply); the norm is scaled instead.
            filter_chain_(response, response, scratch, spec, None)
            if padding == "valid":
                # The valid result is the interior; zeroing the border makes sum and gradient both right.
                zero_border_(response, spec.margins)
            torch.linalg.vector_norm(response.flatten(2), dim=2, out=squares[idx])
        # pred and target are the caller's tensors (no copy); only a graph-building backward reads them.
        ctx.save_for_backward(filtered, pred, target)
        return squares.mul_(spec.box_scale).square_()

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, Tensor | None, None, None]:  # type: ignore[override]
        filtered, pred, target = ctx.saved_tensors
        spec = ctx.spec
        scale = grad_out.to(filtered.dtype).mul(2.0)
        if torch.is_grad_enabled():
            # F is symmetric: d/dD sum((Z F D)^2) = 2 F Z F D, Z zeroing the valid border.
            response = LoGFilterFunction.apply(_difference(pred, target), spec, "same")
            if ctx.padding == "valid":
                response = pad_margins(crop_margins(response, spec.margins), spec.margins)
            grad = LoGFilterFunction.apply(response * per_volume_scale(scale, response.ndim), spec, "same")
        else:
            # `filtered` is F(D) without the box normalisation s, and F = s F', so F(F(D)) = s F(filtered).
            grad = fast_log_filter(filtered, spec, scale=scale.mul_(spec.box_scale))
        grad_pred = grad.to(ctx.out_dtype) if ctx.needs_input_grad[0] else None
        grad_target = grad.neg().to(ctx.target_dtype) if ctx.needs_input_grad[1] else None
        return grad_pred, grad_target, None, None


def _difference(pred: Tensor, target: Tensor, out: Tensor | None = None) -> Tensor:
    """``P - Y`` in at least float32: the Laplacian takes differences of nearly equal smoothed values.

    Differentiable without ``out``; with ``out`` (a tensor of the working dtype) written in place.
    """
    work_dtype = torch.promote_types(pred.dtype, torch.float32)
    if pred.dtype == work_dtype:
        return torch.sub(pred, target, out=out)
    # Cast first, then subtract: half-precision inputs lose nothing more.
    cast = pred.to(work_dtype) if out is None else out.copy_(pred)
    return cast.sub_(target)


def _be_per_channel(pred: Tensor, target: Tensor, spec: FilterSpec, padding: str, impl: str) -> Tensor:
    """``sum over the output voxels of (F(P) - F(Y))^2``, shape (B, C), in at least float32."""
    if impl == "fast":
        return _FastBEFunction.apply(pred, target, spec, padding)
    work_dtype = torch.promote_types(pred.dtype, torch.float32)
    # The literal form: the filter chain runs on the prediction and on the label separately.
    diff = reference_log_filter(pred.to(work_dtype), spec, padding) - reference_log_filter(target.to(work_dtype), spec, padding)
    return diff.square().flatten(2).sum(dim=2)


def _output_voxels(shape: Sequence[int], spec: FilterSpec, padding: str) -> int:
    """Voxels of the filter's output per volume: all of them (``same``), or the interior (``valid``)."""
    if padding == "valid":
        return math.prod(s - 2 * m for s, m in zip(shape, spec.margins))
    return math.prod(shape)


def _counted_voxels(mask: Tensor, spec: FilterSpec, padding: str) -> Tensor:
    """Voxels that count per (batch item, mask channel): the mask's sum over the output voxels, (B, 1 or C')."""
    if padding == "valid":
        mask = crop_margins(mask, spec.margins)
    return mask.flatten(2).sum(dim=2)


def _reduce_be(sums: Tensor, counts: Tensor | None, n_voxels: int, reduction: str) -> Tensor:
    """The BE value from the per-(batch, channel) sums of squares, normalised by the voxels that count.

    Without a mask every output voxel counts. With one, an item or channel with no voxel that
    counts has the value 0 (and no gradient), and ``"mean"`` pools: all sums over all counts.
    """
    if counts is None:
        per_channel = sums / n_voxels
        if reduction == LossReduction.MEAN.value:
            return per_channel.mean()
        return per_channel.sum() if reduction == LossReduction.SUM.value else per_channel
    counts = counts.to(sums.dtype).expand_as(sums)
    # With padding="valid" the response reaches the interior from a mask lying only in the border.
    sums = torch.where(counts > 0, sums, torch.zeros((), dtype=sums.dtype, device=sums.device))
    if reduction == LossReduction.MEAN.value:
        return sums.sum() / counts.sum().clamp(min=1)
    per_channel = sums / counts.clamp(min=1)
    return per_channel.sum() if reduction == LossReduction.SUM.value else per_channel


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

    With a ``mask`` of the voxels that count (e.g. all but nnU-Net's ignore label), ``P - Y`` is
    zeroed outside it before filtering, and the mean is over the voxels that count, not over all:
    with ``M`` the mask, ``O`` the output voxels (all of them; the interior with
    ``padding="valid"``) and ``S_bc = sum over O of F(M (P - Y))^2``,

    * ``"none"``: ``S_bc / n_bc``, where ``n_bc`` is the number of voxels of ``O`` in ``M`` for
      item ``b`` (and channel ``c`` for a per-channel mask);
    * ``"sum"``: the sum of those;
    * ``"mean"``: ``sum S_bc / sum n_bc``, every voxel that counts weighing the same, in any item
      and channel (as nnU-Net's cross-entropy averages over its non-ignored voxels), so an item
      with little annotation weighs little and the BE weight does not shrink with the annotated
      fraction of a patch.

    An item or channel without any voxel that counts adds 0 (no NaN, no gradient). Without a mask
    ``n_bc`` is the number of output voxels and the three agree with the unmasked mean.

    Guarantees (each tested; see docs/loss.md, "Using the loss in your own loop"):

    * no state: nothing is kept between calls, so calls under ``torch.no_grad()`` or
      ``torch.inference_mode()`` never affect later training calls, and one instance serves any
      device, dtype and shape;
    * computed in at least float32, also under autocast (float16/bfloat16);
    * differentiable to any order with ``impl="fast"`` too (double backward, Hessian-vector
      products), with respect to the prediction and the target;
    * with ``validate=False`` the loss reads nothing back from the device: no host synchronisation
      inside a CUDA training step (pass integer class indices, or a one-hot target);
    * the value and gradient of ``impl="fast"`` equal the paper's literal convolutions
      (``impl="reference"``) up to rounding, with or without a mask;
    * with a mask, ignored voxels change neither the value nor the gradient, and the value is a
      mean over the voxels that count (above).

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
        spacing: Sequence[float] | None = None,
        validate: bool = True,
        check_finite: bool | None = None,
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
                (B, C') tensor of per-item, per-channel losses (with a mask, ``"mean"`` is the mean
                over every voxel that counts; see the class docstring).
            smoothing_passes: box filters before the Laplacian; the paper uses 3.
            padding: ``"same"`` (zero padding keeping the size; the paper's form) or ``"valid"``
                (only voxels whose whole stencil lies inside, as in the author's MONAI pull
                request #4170, which also used ``smoothing_passes=1``).
            impl: ``"fast"`` (filters ``P - Y`` once by separable shifted adds, with an analytic
                backward) or ``"reference"`` (the paper's literal convolutions on ``P`` and ``Y``).
                Same value and gradient up to rounding.
            spacing: voxel size in mm per spatial axis, in the tensor's axis order, for the
                spacing-aware filter (smoothing of about the same extent in mm on every axis, a
                Laplacian weighted by spacing; see :func:`~beseg.losses.log_filter`). ``None``
                (default) is the paper's voxel form; for data resampled to isotropic voxels the
                two are identical.
            validate: check what needs a device-to-host read: class indices (integers in
                ``[0, C)``) with ``to_onehot_y``, and a NaN/Inf loss, raised as a ``ValueError``
                naming ``input`` or ``target``. Each check synchronises a CUDA stream; set
                ``validate=False`` in a GPU training loop (shapes and types are still checked, which
                costs nothing).
            check_finite: deprecated name of ``validate``.

        Raises:
            TypeError: ``other_act`` is not callable.
            ValueError: more than one of ``sigmoid``, ``softmax``, ``other_act``; an unknown
                ``reduction``, ``padding`` or ``impl``; ``smoothing_passes`` not an integer >= 0;
                ``spacing`` not 2 or 3 positive numbers.
        """
        validate = _resolve_validate(validate, check_finite)
        super().__init__(include_background, to_onehot_y, sigmoid, softmax, other_act, reduction, validate)
        check_filter_options(smoothing_passes, padding, impl, spacing)
        self.smoothing_passes = smoothing_passes
        self.padding = padding
        self.impl = impl
        self.spacing = tuple(float(s) for s in spacing) if spacing is not None else None

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, smoothing_passes={self.smoothing_passes}, padding={self.padding}, "
                f"impl={self.impl}, spacing={self.spacing}")

    def forward(self, input: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
        """
        Args:
            input: (B, C, H, W[, D]) floating-point prediction: probabilities, or logits with
                ``sigmoid``/``softmax``/``other_act``.
            target: (B, C, H, W[, D]) label, or (B, 1, H, W[, D]) class indices with ``to_onehot_y``.
            mask: optional (B, 1, H, W[, D]) or (B, C', H, W[, D]) boolean or 0/1 tensor of the voxels
                that count (e.g. all but an ignore label). ``P - Y`` is set to 0 outside it before
                filtering, so masked voxels contribute nothing, whatever the prediction or the
                target hold there, and the mean is over the voxels that count (see the class
                docstring). Class indices under masked voxels must still be valid (replace an
                ignore label by 0 first).

        Returns:
            A scalar for ``"mean"``/``"sum"``; a (B, C') tensor for ``"none"``, where ``C'`` is the
            number of channels kept. Computed in at least float32, also under autocast.

        Raises:
            TypeError: a non-tensor argument, or an integer or boolean prediction.
            ValueError: wrong number of dimensions, an empty tensor, mismatched shapes (also after
                one-hot, or of ``mask``), or a spatial size too small for ``padding="valid"``; with
                ``validate``: class indices outside ``[0, C)`` or NaN/Inf in the prediction or target.
        """
        pred, target = self.prepare(input, target)
        pred, target = _apply_mask(pred, target, mask)
        spec = self._spec(pred)
        check_filter_input(pred, spec, self.padding)
        with _autocast_off(pred.device):
            sums = _be_per_channel(pred, target, spec, self.padding, self.impl)
            counts = None if mask is None else _counted_voxels(mask, spec, self.padding)
            value = _reduce_be(sums, counts, _output_voxels(pred.shape[2:], spec, self.padding), self.reduction)
        if self.validate:
            _raise_if_not_finite(value, input, target)
        return value

    def _spec(self, pred: Tensor) -> FilterSpec:
        try:
            return filter_spec(pred.ndim - 2, self.smoothing_passes, self.spacing)
        except ValueError as err:
            raise ValueError(f"{err} (input has shape {tuple(pred.shape)})") from None

    @property
    def check_finite(self) -> bool:
        """Deprecated name of :attr:`validate`."""
        return self.validate


def _autocast_off(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast switched off on ``device``, where autocast exists (not, e.g., on the meta device)."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


def _resolve_validate(validate: bool, check_finite: bool | None) -> bool:
    if check_finite is None:
        return bool(validate)
    warnings.warn("check_finite is deprecated; use validate (the same switch).", DeprecationWarning, stacklevel=3)
    return bool(check_finite)


def _apply_mask(pred: Tensor, target: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """Zero ``P`` and ``Y`` outside ``mask`` (shape checks only: nothing is read from the device)."""
    if mask is None:
        return pred, target
    if not isinstance(mask, Tensor):
        raise TypeError(f"mask must be a torch.Tensor or None, got {type(mask).__name__}.")
    if (mask.ndim != pred.ndim or mask.shape[0] != pred.shape[0] or mask.shape[2:] != pred.shape[2:]
            or mask.shape[1] not in (1, pred.shape[1])):
        raise ValueError(
            f"mask must have shape (B, 1, ...) or (B, C, ...) matching the prediction {tuple(pred.shape)} "
            f"(after the background is dropped), got {tuple(mask.shape)}."
        )
    m = mask.to(pred.dtype)
    return pred * m, target * m


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
        spacing: Sequence[float] | None = None,
        validate: bool = True,
        check_finite: bool | None = None,
    ) -> None:
        """
        Args:
            include_background, to_onehot_y, sigmoid, softmax, other_act, squared_pred, jaccard,
            smooth_nr, smooth_dr, batch, weight: as in MONAI's ``DiceLoss``;
                ``include_background`` applies to both terms. (MONAI checks a given ``weight`` for
                negative values on every call, which reads it back from the device.)
            reduction: ``"mean"`` or ``"sum"`` (each term reduced so, then weighted and added).
            lambda_dice: weight of the Dice term (the paper's lambda1 = 1).
            lambda_be: weight of the BE term (the paper's lambda2 = 1000).
            smoothing_passes, padding, impl, spacing, validate: as in :class:`BoundaryEnhancementLoss`.
            check_finite: deprecated name of ``validate``.

        Raises:
            TypeError: ``other_act`` is not callable.
            ValueError: conflicting activations, negative weights, ``reduction="none"``, or an
                invalid BE setting.
        """
        validate = _resolve_validate(validate, check_finite)
        super().__init__(include_background, to_onehot_y, sigmoid, softmax, other_act, reduction, validate)
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
            padding=padding, impl=impl, spacing=spacing, validate=validate,
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, lambda_dice={self.lambda_dice:g}, lambda_be={self.lambda_be:g}"

    def forward(self, input: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
        """
        Args:
            input: (B, C, H, W[, D]) floating-point prediction.
            target: (B, C, H, W[, D]) label, or (B, 1, H, W[, D]) class indices with ``to_onehot_y``.
            mask: optional voxels that count, as in :meth:`BoundaryEnhancementLoss.forward`; it
                applies to both terms (masked voxels are zeroed in prediction and target, and the
                BE term is the mean over the voxels that count).

        Returns:
            Scalar loss.

        Raises:
            TypeError, ValueError: as :class:`BoundaryEnhancementLoss`.
        """
        pred, target = self.prepare(input, target)
        # The BE term masks (and counts the voxels that count) itself.
        return self.lambda_dice * self.dice(*_apply_mask(pred, target, mask)) + \
            self.lambda_be * self.be(pred, target, mask=mask)

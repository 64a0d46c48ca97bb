"""The paper's "Laplacian of smoothed" filter, in two exact implementations.

The filter ``F = L o B^k`` applies ``k`` box filters of size 3 (weight ``1/3^d`` in ``d``
spatial dimensions), then the discrete Laplacian (3D: 7-point stencil, centre -6; 2D: 5-point,
centre -4). Every stage uses zero padding that keeps the size ("same"), as the paper's
3x3x3 convolutions with padding 1 do. The author's public MONAI pull request used padding 0
("valid"); its result is the interior of the same-size result, ``k + 1`` voxels in from each side.

Two implementations compute the same operator:

* ``"reference"``: the paper's literal form, ``k + 1`` fixed convolutions.
* ``"fast"``: the box filter is separable and each 1D box sum is two shifted adds, so the whole
  chain is a handful of memory passes with no multiplications until the final scale. Because
  every stage is a symmetric matrix and the 1D box and Laplacian commute, ``F`` is symmetric and
  its adjoint (the backward pass) is ``F`` itself.

Spacing-aware form (``spacing=(s1, s2[, s3])`` in mm, off by default). The paper's filter counts
voxels, which on anisotropic data (e.g. 0.8 x 0.8 x 5 mm) smooths 6x further in mm along the coarse
axis and weights its second differences as if the voxels were cubes. With ``spacing``, relative to
the finest axis ``s_min``:

* axis ``d`` gets ``round(k * (s_min / s_d)^2)`` box passes, so the smoothing's spread in mm
  (its standard deviation, ``s_d * sqrt(2 n_d / 3)``) is about the same along every axis;
* the Laplacian weights axis ``d``'s second difference by ``(s_min / s_d)^2``, i.e. it is the
  physical Laplacian in units of the finest voxel.

On isotropic data (any ``s``) this is exactly the paper's filter, so the loss keeps its scale and
``lambda2 = 1000`` stays meaningful. The operator stays separable, symmetric and exact in both
implementations; fewer passes along coarse axes make it cheaper, never dearer.

The module holds no state: every call allocates what it needs (see docs/benchmarks.md for why an
allocator setting, not a buffer pool, is the fix for glibc's cost of fresh volumes on CPU).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "IMPLS", "PADDINGS", "FilterSpec", "LoGFilter", "filter_spec", "log_filter", "log_kernels", "log_margin",
    # The building blocks the BE loss (boundary_enhancement.py) filters with; public within beseg.losses.
    "LoGFilterFunction", "check_filter_input", "check_filter_options", "cpu_chunks", "crop_margins",
    "fast_log_filter", "filter_chain_", "pad_margins", "per_volume_scale", "reference_log_filter", "scratch_for",
    "zero_border_",
]

PADDINGS = ("same", "valid")
IMPLS = ("fast", "reference")

Padding = Literal["same", "valid"]
Impl = Literal["fast", "reference"]


def log_margin(smoothing_passes: int) -> int:
    """Voxels lost on each side by ``padding="valid"`` without ``spacing``: one per 3-tap stage."""
    return smoothing_passes + 1


@dataclass(frozen=True)
class FilterSpec:
    """The filter on one tensor layout: box passes and Laplacian weight of each spatial axis.

    Attributes:
        passes: box passes along each spatial axis (the paper: ``k`` on every axis).
        weights: weight of each axis's second difference in the Laplacian; ``None`` is the paper's
            unweighted stencil (all 1), kept apart so that its integer arithmetic stays exact.
    """

    passes: tuple[int, ...]
    weights: tuple[float, ...] | None = None

    @property
    def margins(self) -> tuple[int, ...]:
        """Voxels lost on each side of each axis by ``padding="valid"``: one per 3-tap stage."""
        return tuple(n + 1 for n in self.passes)

    @property
    def box_scale(self) -> float:
        """The box filters' normalisation, ``prod_d (1/3)^passes_d`` (``(1/27)^k`` in the paper's 3D form)."""
        return math.prod((1.0 / 3.0) ** n for n in self.passes)

    @property
    def is_paper_form(self) -> bool:
        """Same passes on every axis and an unweighted Laplacian: the paper's 3x3x3 chain."""
        return self.weights is None and len(set(self.passes)) == 1


def check_filter_options(smoothing_passes: int, padding: str, impl: str,
                         spacing: Sequence[float] | None = None) -> None:
    """Raise a ``ValueError`` naming the first invalid filter option (its message starts with the name)."""
    if isinstance(smoothing_passes, bool) or not isinstance(smoothing_passes, int) or smoothing_passes < 0:
        raise ValueError(f"smoothing_passes must be an integer >= 0, got {smoothing_passes!r}.")
    if padding not in PADDINGS:
        raise ValueError(f"padding must be one of {', '.join(PADDINGS)}, got {padding!r}.")
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {', '.join(IMPLS)}, got {impl!r}.")
    if spacing is not None:
        try:
            values = [float(s) for s in spacing]
        except (TypeError, ValueError):
            raise ValueError(f"spacing must be a sequence of voxel sizes in mm, got {spacing!r}.") from None
        if len(values) not in (2, 3) or not all(math.isfinite(s) and s > 0 for s in values):
            raise ValueError(f"spacing must be 2 or 3 positive, finite voxel sizes in mm, got {spacing!r}.")


def filter_spec(ndim: int, smoothing_passes: int = 3, spacing: Sequence[float] | None = None) -> FilterSpec:
    """The :class:`FilterSpec` of the paper's filter, or of its spacing-aware form.

    Args:
        ndim: spatial dimensions (2 or 3).
        smoothing_passes: box passes of the finest axis (all axes without ``spacing``).
        spacing: voxel size in mm per spatial axis, in the tensor's axis order; ``None`` is the
            paper's voxel form.

    Returns:
        The :class:`FilterSpec` (see the module docstring for the spacing rule).

    Raises:
        ValueError: ``spacing`` does not have ``ndim`` positive values.
    """
    check_filter_options(smoothing_passes, "same", "fast", spacing)
    if spacing is None:
        return FilterSpec((smoothing_passes,) * ndim)
    values = tuple(float(s) for s in spacing)
    if len(values) != ndim:
        raise ValueError(f"spacing must have one value per spatial axis ({ndim}), got {list(values)}.")
    finest = min(values)
    ratios = [(finest / s) ** 2 for s in values]
    passes = tuple(int(math.floor(smoothing_passes * r + 0.5)) for r in ratios)
    if all(r == 1.0 for r in ratios):
        return FilterSpec(passes)  # isotropic: exactly the paper's form
    return FilterSpec(passes, tuple(ratios))


def check_filter_input(x: Tensor, spec: FilterSpec, padding: str) -> None:
    """Raise if ``x`` is not a (B, C, spatial...) float tensor that ``spec`` and ``padding`` fit."""
    _check_tensor(x)
    _check_valid_size(x, spec, padding)


def _check_tensor(x: Tensor) -> None:
    """Raise unless ``x`` is a floating-point (B, C, H, W[, D]) tensor."""
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}.")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}.")
    if x.ndim not in (4, 5):
        raise ValueError(
            f"x must have shape (B, C, H, W) or (B, C, H, W, D), got {x.ndim} dimensions {tuple(x.shape)}."
        )


def _check_valid_size(x: Tensor, spec: FilterSpec, padding: str) -> None:
    """Raise if ``padding="valid"`` would leave no voxel of ``x``."""
    if padding == "valid":
        small = [s for s, m in zip(x.shape[2:], spec.margins) if s <= 2 * m]
        if small:
            raise ValueError(
                f"padding='valid' loses {list(spec.margins)} voxels per side, so it needs spatial sizes "
                f"larger than {[2 * m for m in spec.margins]}, got spatial shape {tuple(x.shape[2:])}."
            )


# ----------------------------------------------------------------------------------------------
# fast implementation: shifted adds


class _Narrow:
    """``t.narrow(dim, start, length)`` views, made once per call: the 18 box passes of the paper's
    filter alternate between two buffers, so they reuse the same few views."""

    def __init__(self) -> None:
        self._views: dict[tuple[int, int, int, int], Tensor] = {}

    def __call__(self, t: Tensor, dim: int, start: int, length: int) -> Tensor:
        key = (id(t), dim, start, length)
        view = self._views.get(key)
        if view is None:
            view = self._views[key] = t.narrow(dim, start, length)
        return view


def _box_sum_(src: Tensor, dst: Tensor, dim: int, narrow: _Narrow | None = None) -> None:
    """``dst = src[i-1] + src[i] + src[i+1]`` along ``dim``, zero outside (unnormalised 3-tap box)."""
    n = src.shape[dim]
    if n == 1:
        dst.copy_(src)
        return
    nv = narrow or _Narrow()
    # Two full passes instead of copy + two adds: left pair sums first, then the right neighbour.
    torch.add(nv(src, dim, 0, n - 1), nv(src, dim, 1, n - 1), out=nv(dst, dim, 1, n - 1))
    nv(dst, dim, 0, 1).copy_(nv(src, dim, 0, 1))
    nv(dst, dim, 0, n - 1).add_(nv(src, dim, 1, n - 1))


def _laplacian_(src: Tensor, dst: Tensor, scale: float | Tensor | None, weights: tuple[float, ...] | None) -> None:
    """``dst = scale * Laplacian(src)`` with zero padding; ``scale`` is a number, a tensor broadcasting to
    ``src``, or ``None`` for no scaling at all."""
    w = weights or (1.0,) * (src.ndim - 2)
    axes = [(dim, wd) for dim, wd in zip(range(2, src.ndim), w) if wd != 0.0 and src.shape[dim] > 1]
    # The first axis writes both neighbours at once: an axis of weight 1 (the finest has it) needs no multiply.
    first = next(((dim, wd) for dim, wd in axes if wd == 1.0), None)
    if first is None:
        torch.mul(src, -2.0 * sum(w), out=dst)
    else:
        dim, n = first[0], src.shape[first[0]]
        torch.add(src.narrow(dim, 0, n - 2), src.narrow(dim, 2, n - 2), out=dst.narrow(dim, 1, n - 2))
        dst.narrow(dim, 0, 1).copy_(src.narrow(dim, 1, 1))
        dst.narrow(dim, n - 1, 1).copy_(src.narrow(dim, n - 2, 1))
        dst.add_(src, alpha=-2.0 * sum(w))
    for dim, wd in axes:
        if (dim, wd) == first:
            continue
        n = src.shape[dim]
        dst.narrow(dim, 1, n - 1).add_(src.narrow(dim, 0, n - 1), alpha=wd)
        dst.narrow(dim, 0, n - 1).add_(src.narrow(dim, 1, n - 1), alpha=wd)
    # Scaling last keeps sums of a binary mask integral, so constant regions filter to exactly 0.
    if scale is not None:
        dst.mul_(scale)


#: Work is split into chunks of whole (batch item, channel) volumes of about this size on the CPU, so
#: that the ~30 passes of the filter over a chunk and its scratch volume stay in the cache instead of
#: streaming the whole batch through memory ~30 times. (CUDA runs the whole tensor at once.)
_CPU_CHUNK_BYTES = 4 * 2**20


def cpu_chunks(x: Tensor) -> list[tuple[slice, slice]]:
    """Index tuples ``(batch slice, channel slice)`` of the chunks of ``x`` to filter one after the other.

    One chunk (all of ``x``) on CUDA or when ``x`` is small; otherwise runs of channels of one
    batch item, each about :data:`_CPU_CHUNK_BYTES` (at least one volume).
    """
    everything = [(slice(None), slice(None))]
    if x.device.type != "cpu" or x.numel() * x.element_size() <= _CPU_CHUNK_BYTES:
        return everything
    volume_bytes = max(1, x[0, 0].numel() * x.element_size())
    per_chunk = max(1, min(x.shape[1], _CPU_CHUNK_BYTES // volume_bytes))
    return [(slice(b, b + 1), slice(c, min(c + per_chunk, x.shape[1])))
            for b in range(x.shape[0]) for c in range(0, x.shape[1], per_chunk)]


def scratch_for(x: Tensor, chunks: list[tuple[slice, slice]], dtype: torch.dtype | None = None) -> Tensor:
    """One scratch tensor large enough for the largest chunk of ``x``."""
    largest = max(chunks, key=lambda idx: x[idx].numel())
    return torch.empty(x[largest].shape, dtype=dtype or x.dtype, device=x.device)


def filter_chain_(src: Tensor, out: Tensor, scratch: Tensor, spec: FilterSpec, scale: float | Tensor | None) -> None:
    """``out = scale * F(src)`` ("same" zero padding) by shifted adds, ping-ponging between ``out`` and ``scratch``.

    ``out`` may be ``src`` itself (in place). The stages are assigned backwards from the last one,
    which must write ``out``, so one scratch volume suffices.

    Args:
        src, out: tensors of one (N, C, *spatial) shape.
        scratch: a tensor with at least as many elements, of ``out``'s dtype and device.
        spec: box passes and Laplacian weights per spatial axis.
        scale: a number, or a tensor broadcasting to ``src`` (e.g. (N, C, 1, 1, 1)); ``None`` leaves out
            the box filters' normalisation too, saving a pass (the result is ``F(src) / spec.box_scale``).
    """
    scratch = scratch.flatten()[: out.numel()].view(out.shape)
    dims = [dim for dim, passes in zip(range(2, src.ndim), spec.passes) for _ in range(passes)]
    # A stage writes `out` when an even number of stages follow it (the Laplacian, last, writes `out`).
    first_dst = out if len(dims) % 2 == 0 else scratch
    if first_dst.data_ptr() == src.data_ptr():  # the first stage cannot work in place
        scratch.copy_(src)
        src = scratch
    narrow = _Narrow()  # lives for this call only; `src`, `out` and `scratch` outlive it
    for i, dim in enumerate(dims):
        dst = out if (len(dims) - i) % 2 == 0 else scratch
        _box_sum_(src, dst, dim, narrow)
        src = dst
    _laplacian_(src, out, None if scale is None else scale * spec.box_scale, spec.weights)


def per_volume_scale(scale: Tensor, ndim: int) -> Tensor:
    """A (B, C) tensor of factors, shaped to broadcast over (B, C, *spatial) with ``ndim`` dimensions."""
    return scale.reshape(*scale.shape, *([1] * (ndim - 2)))


def fast_log_filter(x: Tensor, spec: FilterSpec, scale: float | Tensor = 1.0) -> Tensor:
    """``scale * F(x)`` with "same" zero padding, chunk by chunk, into a new tensor.

    Args:
        x: (B, C, *spatial) floating tensor.
        spec: box passes and Laplacian weights per spatial axis.
        scale: a number, or a (B, C) tensor of one factor per volume, folded into the last stage.

    Returns:
        A new contiguous tensor of the shape and dtype of ``x``.
    """
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    chunks = cpu_chunks(out)
    scratch = scratch_for(out, chunks)
    for idx in chunks:
        s = per_volume_scale(scale[idx], x.ndim) if isinstance(scale, Tensor) else scale
        filter_chain_(x[idx], out[idx], scratch, spec, s)
    return out


def crop_margins(x: Tensor, margins: Sequence[int]) -> Tensor:
    for dim, m in zip(range(2, x.ndim), margins):
        x = x.narrow(dim, m, x.shape[dim] - 2 * m)
    return x


def zero_border_(x: Tensor, margins: Sequence[int]) -> Tensor:
    """Zero the outer ``margins[d]`` voxels on both sides of every spatial axis ``d``, in place."""
    for dim, m in zip(range(2, x.ndim), margins):
        n = x.shape[dim]
        x.narrow(dim, 0, m).zero_()
        x.narrow(dim, n - m, m).zero_()
    return x


def pad_margins(x: Tensor, margins: Sequence[int]) -> Tensor:
    """Zero-pad a valid-cropped tensor back to the full size (the adjoint of :func:`crop_margins`)."""
    pad: list[int] = []
    for m in reversed(margins):  # F.pad lists the last axis first
        pad += [m, m]
    return F.pad(x, pad)


class LoGFilterFunction(torch.autograd.Function):
    """``F(x)`` (cropped for "valid") with the adjoint ``F`` as backward; differentiable to any order."""

    @staticmethod
    def forward(ctx, x: Tensor, spec: FilterSpec, padding: str) -> Tensor:  # type: ignore[override]
        ctx.spec, ctx.padding = spec, padding
        out = fast_log_filter(x, spec)
        if padding == "valid":
            out = crop_margins(out, spec.margins).contiguous()
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        if ctx.padding == "valid":
            grad = pad_margins(grad, ctx.spec.margins)
        # F is symmetric, so its adjoint is itself; applying it through this Function again keeps
        # the backward differentiable (double backward, Hessian-vector products).
        return LoGFilterFunction.apply(grad, ctx.spec, "same"), None, None


# ----------------------------------------------------------------------------------------------
# reference implementation: the paper's fixed convolutions


def log_kernels(ndim: int, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
    """The paper's fixed kernels, shape (1, 1, 3, ...): the box (all ``1/3^ndim``) and the Laplacian."""
    size = (1, 1) + (3,) * ndim
    box = torch.full(size, 1.0 / 3**ndim, dtype=dtype, device=device)
    return box, _laplacian_kernel(ndim, None, dtype, device)


def _laplacian_kernel(ndim: int, weights: Sequence[float] | None, dtype: torch.dtype,
                      device: torch.device) -> Tensor:
    w = list(weights) if weights is not None else [1.0] * ndim
    lap = torch.zeros((1, 1) + (3,) * ndim, dtype=dtype, device=device)
    lap[(0, 0) + (1,) * ndim] = -2.0 * sum(w)
    for d in range(ndim):
        for offset in (0, 2):
            idx = [0, 0] + [1] * ndim
            idx[2 + d] = offset
            lap[tuple(idx)] = w[d]
    return lap


def reference_log_filter(x: Tensor, spec: FilterSpec, padding: str) -> Tensor:
    """The literal chain of fixed convolutions: box filters, then the Laplacian.

    The paper's form runs ``k`` 3x3x3 box convolutions; a spacing-aware spec runs each axis's 1D
    box convolutions (3x1x1, 1x3x1, 1x1x3) instead, since its axes differ in passes.
    """
    ndim = x.ndim - 2
    conv = F.conv3d if ndim == 3 else F.conv2d
    pad = 1 if padding == "same" else 0
    b, c = x.shape[:2]
    # Single-channel convolutions applied to every (batch, channel) volume, as in the paper.
    out = x.reshape(b * c, 1, *x.shape[2:])
    if spec.is_paper_form:
        box, _ = log_kernels(ndim, x.dtype, x.device)
        for _ in range(spec.passes[0]):
            out = conv(out, box, padding=pad)
    else:
        for d, passes in enumerate(spec.passes):
            size = [1] * ndim
            size[d] = 3
            kernel = torch.full((1, 1, *size), 1.0 / 3.0, dtype=x.dtype, device=x.device)
            padding_d = [0] * ndim
            padding_d[d] = pad
            for _ in range(passes):
                out = conv(out, kernel, padding=tuple(padding_d))
    out = conv(out, _laplacian_kernel(ndim, spec.weights, x.dtype, x.device), padding=pad)
    return out.reshape(b, c, *out.shape[2:])


def _apply(x: Tensor, spec: FilterSpec, padding: str, impl: str) -> Tensor:
    if impl == "reference":
        return reference_log_filter(x, spec, padding)
    return LoGFilterFunction.apply(x, spec, padding)


# ----------------------------------------------------------------------------------------------
# public function and module


def log_filter(
    x: Tensor,
    smoothing_passes: int = 3,
    padding: Padding = "same",
    impl: Impl = "fast",
    spacing: Sequence[float] | None = None,
) -> Tensor:
    """Apply the BE loss's "Laplacian of smoothed" filter to every channel of ``x``.

    ``smoothing_passes`` box filters of size 3 (weights ``1/27`` in 3D, ``1/9`` in 2D), then the
    discrete Laplacian (3D 7-point stencil with centre -6; 2D 5-point with centre -4). Zero
    padding keeps the size at every stage; ``padding="valid"`` returns the interior that the same
    chain with unpadded convolutions gives.

    Args:
        x: (B, C, H, W[, D]) floating-point tensor; every channel is filtered on its own.
        smoothing_passes: number of box filters before the Laplacian (the paper uses 3; the
            author's MONAI pull request used 1). With ``spacing``: the passes of the finest axis.
        padding: ``"same"`` (output size = input size) or ``"valid"`` (each spatial side loses one
            voxel per 3-tap stage along that axis: ``smoothing_passes + 1`` in the paper's form).
        impl: ``"fast"`` (separable shifted adds with an analytic backward, differentiable to any
            order) or ``"reference"`` (the literal fixed convolutions, differentiated by autograd).
            Both compute the same operator; they differ only in rounding.
        spacing: voxel size in mm of each spatial axis, in ``x``'s axis order (e.g. ``(0.8, 0.8,
            5.0)``), for the spacing-aware form (see the module docstring); ``None`` (default) is
            the paper's voxel form. Isotropic spacing gives exactly the paper's form.

    Returns:
        Filtered tensor of the dtype of ``x``: shape (B, C, H, W[, D]) for ``"same"``, or each
        spatial size reduced by twice that axis's margin for ``"valid"``.

    Raises:
        TypeError: ``x`` is not a floating-point tensor.
        ValueError: ``x`` is not 4D or 5D, ``smoothing_passes`` is negative or not an integer,
            ``padding`` or ``impl`` is unknown, ``spacing`` is not one positive number per spatial
            axis, or ``"valid"`` leaves no voxel.

    Example:
        >>> mask = torch.zeros(1, 1, 16, 16, 16); mask[..., 4:12, 4:12, 4:12] = 1
        >>> edges = log_filter(mask)           # non-zero only near the cube's faces
        >>> edges.shape
        torch.Size([1, 1, 16, 16, 16])
    """
    check_filter_options(smoothing_passes, padding, impl, spacing)
    _check_tensor(x)
    spec = filter_spec(x.ndim - 2, smoothing_passes, spacing)
    _check_valid_size(x, spec, padding)
    return _apply(x, spec, padding, impl)


class LoGFilter(torch.nn.Module):
    """Module form of :func:`log_filter` (fixed weights, nothing to train, no state).

    Args:
        smoothing_passes, padding, impl, spacing: as in :func:`log_filter`.

    Raises:
        ValueError: an invalid option.

    Example:
        >>> edges = LoGFilter(smoothing_passes=1, padding="valid")(torch.rand(1, 1, 16, 16, 16))
        >>> edges.shape
        torch.Size([1, 1, 12, 12, 12])
    """

    def __init__(self, smoothing_passes: int = 3, padding: Padding = "same", impl: Impl = "fast",
                 spacing: Sequence[float] | None = None) -> None:
        super().__init__()
        check_filter_options(smoothing_passes, padding, impl, spacing)
        self.smoothing_passes, self.padding, self.impl = smoothing_passes, padding, impl
        self.spacing = tuple(float(s) for s in spacing) if spacing is not None else None

    def extra_repr(self) -> str:
        return f"smoothing_passes={self.smoothing_passes}, padding={self.padding}, impl={self.impl}, spacing={self.spacing}"

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W[, D]) -> filtered, see :func:`log_filter`."""
        return log_filter(x, self.smoothing_passes, self.padding, self.impl, self.spacing)

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
"""

from __future__ import annotations

import threading
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["LoGFilter", "clear_workspace", "log_filter", "log_kernels", "log_margin", "PADDINGS", "IMPLS"]

PADDINGS = ("same", "valid")
IMPLS = ("fast", "reference")

Padding = Literal["same", "valid"]
Impl = Literal["fast", "reference"]


def log_margin(smoothing_passes: int) -> int:
    """Voxels lost on each side by ``padding="valid"``: one per 3-tap stage."""
    return smoothing_passes + 1


def check_filter_options(smoothing_passes: int, padding: str, impl: str) -> None:
    """Raise a ``ValueError`` naming the first invalid filter option."""
    if isinstance(smoothing_passes, bool) or not isinstance(smoothing_passes, int) or smoothing_passes < 0:
        raise ValueError(f"smoothing_passes must be an integer >= 0, got {smoothing_passes!r}.")
    if padding not in PADDINGS:
        raise ValueError(f"padding must be one of {PADDINGS}, got {padding!r}.")
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}.")


def _check_filter_args(x: Tensor, smoothing_passes: int, padding: str, impl: str) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}.")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}.")
    if x.ndim not in (4, 5):
        raise ValueError(
            f"x must have shape (B, C, H, W) or (B, C, H, W, D), got {x.ndim} dimensions {tuple(x.shape)}."
        )
    check_filter_options(smoothing_passes, padding, impl)
    if padding == "valid":
        margin = log_margin(smoothing_passes)
        small = [s for s in x.shape[2:] if s <= 2 * margin]
        if small:
            raise ValueError(
                f"padding='valid' with smoothing_passes={smoothing_passes} needs every spatial size > "
                f"{2 * margin}, got spatial shape {tuple(x.shape[2:])}."
            )


# ----------------------------------------------------------------------------------------------
# fast implementation: shifted adds into preallocated buffers


def _box_sum_(src: Tensor, dst: Tensor, dim: int) -> None:
    """``dst = src[i-1] + src[i] + src[i+1]`` along ``dim``, zero outside (unnormalised 3-tap box)."""
    n = src.shape[dim]
    if n == 1:
        dst.copy_(src)
        return
    # Two full passes instead of copy + two adds: left pair sums first, then the right neighbour.
    torch.add(src.narrow(dim, 0, n - 1), src.narrow(dim, 1, n - 1), out=dst.narrow(dim, 1, n - 1))
    dst.narrow(dim, 0, 1).copy_(src.narrow(dim, 0, 1))
    dst.narrow(dim, 0, n - 1).add_(src.narrow(dim, 1, n - 1))


def _laplacian_(src: Tensor, dst: Tensor, scale: float | Tensor) -> None:
    """``dst = scale * Laplacian(src)`` with zero padding; ``scale`` is a number or broadcasts to ``src``."""
    ndim = src.ndim - 2
    torch.mul(src, -2.0 * ndim, out=dst)
    for dim in range(2, src.ndim):
        n = src.shape[dim]
        if n > 1:
            dst.narrow(dim, 1, n - 1).add_(src.narrow(dim, 0, n - 1))
            dst.narrow(dim, 0, n - 1).add_(src.narrow(dim, 1, n - 1))
    # Scaling last keeps sums of a binary mask integral, so constant regions filter to exactly 0.
    dst.mul_(scale)


class _Workspace:
    """Scratch volumes reused across calls of the fast filter on CPU.

    With glibc's default malloc every freed volume goes back to the kernel and the next one is
    page-faulted in again, which costs about a third of the fast filter's time. A returned
    scratch buffer is kept here (at most ``max_entries`` shapes) and handed out again; a buffer is
    never in two hands at once. CUDA's caching allocator already reuses memory, so CUDA buffers
    are not kept.
    """

    def __init__(self, max_entries: int = 4) -> None:
        self._free: dict[tuple, Tensor] = {}
        self._lock = threading.Lock()
        self.max_entries = max_entries

    @staticmethod
    def _key(t: Tensor) -> tuple:
        return tuple(t.shape), t.dtype, t.device

    def take(self, like: Tensor) -> Tensor:
        with self._lock:
            buf = self._free.pop(self._key(like), None)
        return buf if buf is not None else torch.empty(like.shape, dtype=like.dtype, device=like.device)

    def give(self, buf: Tensor) -> None:
        if buf.device.type != "cpu":
            return
        with self._lock:
            key = self._key(buf)
            if key not in self._free and len(self._free) >= self.max_entries:
                self._free.pop(next(iter(self._free)))
            self._free[key] = buf

    def clear(self) -> None:
        with self._lock:
            self._free.clear()


_WORKSPACE = _Workspace()


def clear_workspace() -> None:
    """Release the scratch volumes the fast filter keeps between calls (CPU only)."""
    _WORKSPACE.clear()


def _log_same_fast(x: Tensor, smoothing_passes: int, scale: float | Tensor = 1.0, owned: bool = False) -> Tensor:
    """``scale * F(x)`` with "same" zero padding, by shifted adds.

    Two volumes are written in turn: ``x`` itself when ``owned`` (a fresh one otherwise) and a
    scratch volume from the workspace. Whichever does not hold the result goes back to the
    workspace, so a call allocates at most one volume.

    Args:
        x: (B, C, *spatial) floating tensor.
        smoothing_passes: number of box filters before the Laplacian.
        scale: extra factor folded into the final stage (a number, or a tensor broadcasting to ``x``).
        owned: ``x`` is a temporary the caller gives up, so it may be overwritten (and kept as
            scratch).

    Returns:
        A new tensor (never ``x`` unless ``owned``) of the shape of ``x``.
    """
    ndim = x.ndim - 2
    box_scale = (1.0 / 3**ndim) ** smoothing_passes
    scale = scale * box_scale
    first = x if owned else torch.empty_like(x)
    second = _WORKSPACE.take(x)
    src, dst = x, (second if owned else first)
    for _ in range(smoothing_passes):
        for dim in range(2, x.ndim):
            _box_sum_(src, dst, dim)
            src, dst = dst, (first if dst is second else second)
    _laplacian_(src, dst, scale)
    _WORKSPACE.give(first if dst is second else second)
    return dst


def _crop(x: Tensor, margin: int) -> Tensor:
    for dim in range(2, x.ndim):
        x = x.narrow(dim, margin, x.shape[dim] - 2 * margin)
    return x


def _zero_border_(x: Tensor, margin: int) -> Tensor:
    """Zero the outer ``margin`` voxels on every spatial side, in place."""
    for dim in range(2, x.ndim):
        n = x.shape[dim]
        x.narrow(dim, 0, margin).zero_()
        x.narrow(dim, n - margin, margin).zero_()
    return x


class _LoGFilterFunction(torch.autograd.Function):
    """``F(x)`` (cropped for "valid") with the adjoint ``F`` as backward; twice differentiable."""

    @staticmethod
    def forward(ctx, x: Tensor, smoothing_passes: int, padding: str) -> Tensor:  # type: ignore[override]
        ctx.smoothing_passes, ctx.padding = smoothing_passes, padding
        ctx.spatial_shape = x.shape[2:]
        out = _log_same_fast(x, smoothing_passes)
        if padding == "valid":
            out = _crop(out, log_margin(smoothing_passes)).contiguous()
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        if ctx.padding == "valid":
            margin = log_margin(ctx.smoothing_passes)
            pad = [margin] * (2 * len(ctx.spatial_shape))
            grad = F.pad(grad, pad)
        # F is symmetric, so its adjoint is itself; going through log_filter keeps double backward.
        return log_filter(grad, ctx.smoothing_passes, "same", "fast"), None, None


# ----------------------------------------------------------------------------------------------
# reference implementation: the paper's fixed convolutions


def log_kernels(ndim: int, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
    size = (1, 1) + (3,) * ndim
    box = torch.full(size, 1.0 / 3**ndim, dtype=dtype, device=device)
    lap = torch.zeros(size, dtype=dtype, device=device)
    centre = (0, 0) + (1,) * ndim
    lap[centre] = -2.0 * ndim
    for d in range(ndim):
        for offset in (0, 2):
            idx = [0, 0] + [1] * ndim
            idx[2 + d] = offset
            lap[tuple(idx)] = 1.0
    return box, lap


def _log_reference(x: Tensor, smoothing_passes: int, padding: str) -> Tensor:
    """The paper's literal chain: ``smoothing_passes`` box convolutions then a Laplacian convolution."""
    ndim = x.ndim - 2
    conv = F.conv3d if ndim == 3 else F.conv2d
    pad = 1 if padding == "same" else 0
    b, c = x.shape[:2]
    box, lap = log_kernels(ndim, x.dtype, x.device)
    # Single-channel convolutions applied to every (batch, channel) volume, as in the paper.
    out = x.reshape(b * c, 1, *x.shape[2:])
    for _ in range(smoothing_passes):
        out = conv(out, box, padding=pad)
    out = conv(out, lap, padding=pad)
    return out.reshape(b, c, *out.shape[2:])


# ----------------------------------------------------------------------------------------------
# public function


def log_filter(
    x: Tensor,
    smoothing_passes: int = 3,
    padding: Padding = "same",
    impl: Impl = "fast",
) -> Tensor:
    """Apply the BE loss's "Laplacian of smoothed" filter to every channel of ``x``.

    ``smoothing_passes`` box filters of size 3 (weights ``1/27`` in 3D, ``1/9`` in 2D), then the
    discrete Laplacian (3D 7-point stencil with centre -6; 2D 5-point with centre -4). Zero
    padding keeps the size at every stage; ``padding="valid"`` returns the interior that the same
    chain with unpadded convolutions gives.

    Args:
        x: (B, C, H, W[, D]) floating-point tensor; every channel is filtered on its own.
        smoothing_passes: number of box filters before the Laplacian (the paper uses 3; the
            author's MONAI pull request used 1).
        padding: ``"same"`` (output size = input size) or ``"valid"`` (each spatial side loses
            ``smoothing_passes + 1`` voxels).
        impl: ``"fast"`` (separable shifted adds with an analytic backward) or ``"reference"``
            (the literal fixed convolutions, differentiated by autograd). Both compute the same
            operator; they differ only in rounding.

    Returns:
        Filtered tensor of the dtype of ``x``: shape (B, C, H, W[, D]) for ``"same"``, or each
        spatial size reduced by ``2 * (smoothing_passes + 1)`` voxels for ``"valid"``.

    Raises:
        TypeError: ``x`` is not a floating-point tensor.
        ValueError: ``x`` is not 4D or 5D, ``smoothing_passes`` is negative or not an integer,
            ``padding`` or ``impl`` is unknown, or ``"valid"`` leaves no voxel.

    Example:
        >>> mask = torch.zeros(1, 1, 16, 16, 16); mask[..., 4:12, 4:12, 4:12] = 1
        >>> edges = log_filter(mask)           # non-zero only near the cube's faces
        >>> edges.shape
        torch.Size([1, 1, 16, 16, 16])
    """
    _check_filter_args(x, smoothing_passes, padding, impl)
    if impl == "reference":
        return _log_reference(x, smoothing_passes, padding)
    return _LoGFilterFunction.apply(x, smoothing_passes, padding)


class LoGFilter(torch.nn.Module):
    """Module form of :func:`log_filter` (fixed weights, nothing to train).

    Args:
        smoothing_passes, padding, impl: as in :func:`log_filter`.

    Raises:
        ValueError: an invalid option.

    Example:
        >>> edges = LoGFilter(smoothing_passes=1, padding="valid")(torch.rand(1, 1, 16, 16, 16))
        >>> edges.shape
        torch.Size([1, 1, 12, 12, 12])
    """

    def __init__(self, smoothing_passes: int = 3, padding: Padding = "same", impl: Impl = "fast") -> None:
        super().__init__()
        check_filter_options(smoothing_passes, padding, impl)
        self.smoothing_passes, self.padding, self.impl = smoothing_passes, padding, impl

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W[, D]) -> filtered, see :func:`log_filter`."""
        return log_filter(x, self.smoothing_passes, self.padding, self.impl)

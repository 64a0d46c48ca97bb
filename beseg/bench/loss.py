"""Loss benchmark: forward+backward time and peak extra memory, side by side in one run.

Every case runs on the same tensors: a prediction of probabilities (requires grad) and a binary
label of the same shape, no activation, background included, so that only the loss itself is
measured. Times are medians over repeated runs after warm-up; ratios are taken between cases of
the same run, never against stored numbers.

Peak memory on CPU is measured in a child process per case, with glibc's mmap threshold pinned
low so that every tensor buffer is mapped on allocation and unmapped on free: the resident-set
high-water mark (reset through ``/proc/self/clear_refs``) then follows live tensors. On CUDA it is
``torch.cuda.max_memory_allocated`` above the inputs.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from beseg.errors import ConfigError
from beseg.allocator import keep_freed_memory
from beseg.losses import BoundaryEnhancementLoss, DiceBELoss
from beseg.losses.laplacian import log_kernels

DEFAULT_SHAPES: tuple[tuple[int, ...], ...] = ((2, 1, 96, 96, 96), (1, 3, 128, 128, 128))
CASES = ("reference", "fast", "fast_spacing", "pr_style", "dice", "dice_be")
#: The anisotropic voxel size of the spacing-aware case (mm, tensor axis order): thick-slice CT.
BENCH_SPACING = (5.0, 0.8, 0.8)
CASE_LABELS = {
    "reference": "BE reference (paper: 4 conv on P and Y)",
    "fast": "BE fast (beseg default)",
    "fast_spacing": "BE fast, spacing-aware (5 x 0.8 x 0.8 mm)",
    "pr_style": "BE author's PR style (1 box + Laplacian, valid)",
    "dice": "MONAI DiceLoss",
    "dice_be": "DiceBELoss (Dice + 1000 BE, fast)",
}
# A fixed mmap threshold switches off glibc's dynamic threshold, so freed buffers leave the RSS.
_PROBE_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
# Slow cases are repeated fewer times, within about this many seconds each.
_TIME_BUDGET_S = 20.0


class PRStyleBELoss(nn.Module):
    """The BE module as in the first author's MONAI pull request #4170, for comparison only.

    One fixed box convolution and one Laplacian convolution, both unpadded (valid), applied to
    the prediction and to the label separately; squared difference summed over channels and
    averaged over batch and voxels. Inputs here are already probabilities and one-hot labels.
    """

    def __init__(self, spatial_dims: int = 3) -> None:
        super().__init__()
        box, lap = log_kernels(spatial_dims, torch.float32, torch.device("cpu"))
        conv = nn.Conv3d if spatial_dims == 3 else nn.Conv2d
        self.box = conv(1, 1, 3, padding=0, bias=False)
        self.lap = conv(1, 1, 3, padding=0, bias=False)
        self.box.weight = nn.Parameter(box, requires_grad=False)
        self.lap.weight = nn.Parameter(lap, requires_grad=False)

    def _filter(self, x: Tensor) -> Tensor:
        return self.lap(self.box(x))

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        total = input.new_zeros(())
        for c in range(input.shape[1]):
            diff = self._filter(input[:, c : c + 1]) - self._filter(target[:, c : c + 1])
            total = total + diff.square().mean()
        return total


def make_loss(case: str, spatial_dims: int = 3) -> Callable[[Tensor, Tensor], Tensor]:
    """The loss module of a benchmark case, configured for probabilities and one-hot labels."""
    if case == "reference":
        return BoundaryEnhancementLoss(include_background=True, impl="reference")
    if case == "fast":
        return BoundaryEnhancementLoss(include_background=True, impl="fast")
    if case == "fast_spacing":
        return BoundaryEnhancementLoss(include_background=True, impl="fast", spacing=BENCH_SPACING[-spatial_dims:])
    if case == "pr_style":
        return PRStyleBELoss(spatial_dims)
    if case == "dice":
        from monai.losses import DiceLoss

        return DiceLoss(include_background=True)
    if case == "dice_be":
        return DiceBELoss(include_background=True)
    raise ValueError(f"unknown benchmark case {case!r}; choose from {CASES}.")


def make_inputs(shape: Sequence[int], device: str | torch.device = "cpu", seed: int = 0) -> tuple[Tensor, Tensor]:
    """A probability map (requires grad) and a binary label, both float32 of ``shape``."""
    gen = torch.Generator().manual_seed(seed)
    pred = torch.rand(tuple(shape), generator=gen).to(device).requires_grad_(True)
    label = (torch.rand(tuple(shape), generator=gen) > 0.5).float().to(device)
    return pred, label


def _step(loss_fn: Callable[[Tensor, Tensor], Tensor], pred: Tensor, label: Tensor) -> None:
    pred.grad = None
    loss_fn(pred, label).backward()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_case(
    case: str, pred: Tensor, label: Tensor, repeats: int, warmup: int
) -> tuple[float, int]:
    """Median forward+backward seconds of ``case`` and the number of timed runs."""
    loss_fn = make_loss(case, pred.ndim - 2)
    if isinstance(loss_fn, nn.Module):
        loss_fn = loss_fn.to(pred.device)
    device = pred.device
    start = time.perf_counter()
    for _ in range(max(1, warmup)):
        _step(loss_fn, pred, label)
    _sync(device)
    per_run = (time.perf_counter() - start) / max(1, warmup)
    n = max(3, min(repeats, int(_TIME_BUDGET_S / max(per_run, 1e-9))))
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        _step(loss_fn, pred, label)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), n


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status")


def _memory_probe(case: str, shape: Sequence[int], threads: int) -> int:
    """Run in a child process: peak bytes above the inputs during one forward+backward (CPU)."""
    torch.set_num_threads(threads)
    pred, label = make_inputs(shape)
    loss_fn = make_loss(case, len(shape) - 2)
    _step(loss_fn, pred, label)  # warm-up: lazy initialisation and the .grad buffer
    pred.grad = None
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    base = _rss_kib("VmRSS")
    _step(loss_fn, pred, label)
    return (_rss_kib("VmHWM") - base) * 1024


def peak_extra_bytes(case: str, shape: Sequence[int], threads: int, device: torch.device) -> int | None:
    """Peak memory above the inputs during one forward+backward, or None where it cannot be measured."""
    if device.type == "cuda":
        pred, label = make_inputs(shape, device)
        loss_fn = make_loss(case, len(shape) - 2)
        if isinstance(loss_fn, nn.Module):
            loss_fn = loss_fn.to(device)
        _step(loss_fn, pred, label)
        pred.grad = None
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        _step(loss_fn, pred, label)
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    if not os.path.exists("/proc/self/clear_refs"):
        return None
    code = (
        "import sys; from beseg.bench.loss import _memory_probe; "
        f"print(_memory_probe({case!r}, {tuple(shape)!r}, {threads}))"
    )
    env = {**os.environ, **_PROBE_ENV}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if out.returncode != 0:
        return None
    return int(out.stdout.strip().splitlines()[-1])


@dataclass
class CaseResult:
    case: str
    shape: tuple[int, ...]
    seconds: float
    runs: int
    peak_extra_bytes: int | None


def parse_shape(text: str) -> tuple[int, ...]:
    """``"2,1,96,96,96"`` -> ``(2, 1, 96, 96, 96)``; 4 or 5 positive integers."""
    try:
        shape = tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        raise ConfigError(f"--shapes: {text!r} is not a comma-separated list of integers, e.g. 2,1,96,96,96.") from None
    if len(shape) not in (4, 5) or min(shape) < 1:
        raise ConfigError(f"--shapes: {text!r} must be 4 or 5 positive integers (B,C,H,W[,D]).")
    return shape


def machine_description(device: torch.device, threads: int, malloc: str | None = None) -> str:
    from beseg.engine.measure import cpu_name

    cpu = cpu_name()
    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {threads} threads"
    env = {k: os.environ[k] for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_") if k in os.environ}
    allocator = malloc or (f"env {env}" if env else "glibc defaults")
    return (
        f"{dev}; {cpu}; {os.cpu_count()} cores; torch {torch.__version__}; python {platform.python_version()}; "
        f"allocator {allocator}"
    )


def apply_malloc(malloc: str) -> str | None:
    """Apply a benchmark's ``--malloc`` choice to this process.

    Returns:
        What the machine line should say about the allocator, or ``None`` for glibc's defaults.

    Raises:
        ValueError: ``malloc`` is not ``"default"`` or ``"keep"``.
    """
    if malloc not in ("default", "keep"):
        raise ConfigError(f"--malloc must be default or keep, got {malloc!r}.")
    if malloc == "default":
        return None
    if keep_freed_memory():
        return "glibc keeping freed memory (beseg.allocator.keep_freed_memory, as beseg train)"
    return "unchanged (keep_freed_memory does not apply here)"


def speed_lines(seconds: dict[str, float]) -> list[str]:
    """The summary lines of one shape: the fast BE against the reference and against DiceLoss.

    Args:
        seconds: median seconds per case name (``fast``, ``reference``, ``dice``), as measured.

    Returns:
        Lines whose ratios are computed from ``seconds`` and whose wording follows their direction.
    """
    lines = []
    fast, ref, dice = seconds.get("fast"), seconds.get("reference"), seconds.get("dice")
    if fast and ref:
        ratio = ref / fast
        lines.append(f"fast BE is {ratio:.1f}x faster than the reference" if ratio >= 1
                     else f"fast BE is {1 / ratio:.1f}x SLOWER than the reference")
    if fast and dice:
        lines.append(f"fast BE costs {fast / dice:.1f}x MONAI DiceLoss")
    spacing = seconds.get("fast_spacing")
    if fast and spacing:
        lines.append(f"spacing-aware fast BE costs {spacing / fast:.2f}x the default fast BE")
    return lines


def run_loss_benchmark(
    shapes: Sequence[Sequence[int]] | None = None,
    repeats: int = 15,
    warmup: int = 3,
    threads: int = 2,
    device: str = "cpu",
    memory: bool = True,
    cases: Sequence[str] = CASES,
    malloc: str = "default",
    print_fn: Callable[[str], None] = print,
) -> list[CaseResult]:
    """Time every case on every shape and print a table of ratios measured in this run.

    Args:
        shapes: (B, C, H, W[, D]) shapes; default (2,1,96,96,96) and (1,3,128,128,128).
        repeats: the most timed runs per case (slow cases get fewer, at least 3).
        warmup: untimed runs first.
        threads: ``torch.set_num_threads`` for CPU runs.
        device: ``"cpu"`` or a CUDA device.
        memory: also measure the peak extra memory per case.
        cases: which cases; ``"reference"`` is needed for the ratios.
        malloc: ``"default"`` (glibc as the process started) or ``"keep"`` (keep freed memory, as
            ``beseg train`` sets it on the CPU: :func:`beseg.allocator.keep_freed_memory`).
        print_fn: where the lines go.

    Returns:
        One :class:`CaseResult` per shape and case.
    """
    if repeats < 1 or warmup < 0 or threads < 1:
        raise ConfigError("--repeats and --threads must be >= 1 and --warmup >= 0.")
    malloc_note = apply_malloc(malloc)
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: CUDA is not available on this machine.")
    torch.set_num_threads(threads)
    shapes = [tuple(s) for s in (shapes or DEFAULT_SHAPES)]
    print_fn(f"# beseg bench loss: forward+backward, float32, median of repeated runs after {warmup} warm-up")
    print_fn(f"# machine: {machine_description(dev, threads, malloc_note)}")
    results: list[CaseResult] = []
    for shape in shapes:
        pred, label = make_inputs(shape, dev)
        input_bytes = pred.numel() * pred.element_size()
        timed = {}
        for case in cases:
            seconds, runs = time_case(case, pred, label, repeats, warmup)
            peak = peak_extra_bytes(case, shape, threads, dev) if memory else None
            timed[case] = CaseResult(case, shape, seconds, runs, peak)
        results.extend(timed.values())
        ref = timed.get("reference")
        dice = timed.get("dice")
        print_fn("")
        print_fn(f"shape {shape}  (input {input_bytes / 2**20:.1f} MiB)")
        print_fn(f"{'case':<50} {'median ms':>10} {'runs':>5} {'x reference':>12} {'x DiceLoss':>11} {'peak extra':>11}")
        for r in timed.values():
            vs_ref = f"{r.seconds / ref.seconds:.4f}" if ref else "-"
            vs_dice = f"{r.seconds / dice.seconds:.1f}" if dice else "-"
            peak = "-" if r.peak_extra_bytes is None else f"{r.peak_extra_bytes / input_bytes:.2f} x in"
            print_fn(f"{CASE_LABELS[r.case]:<50} {r.seconds * 1e3:>10.2f} {r.runs:>5} {vs_ref:>12} {vs_dice:>11} {peak:>11}")
        for line in speed_lines({name: r.seconds for name, r in timed.items()}):
            print_fn(line)
    print_fn("")
    print_fn("# json " + json.dumps([r.__dict__ for r in results]))
    return results

"""Time this checkout's BE loss against the BE loss of an earlier git revision, side by side in one process.

Usage (from the repository root)::

    python scripts/loss_versus_revision.py REV [--rounds 40] [--threads 2] [--malloc keep]

The loss modules of REV (``beseg/losses/laplacian.py`` and ``boundary_enhancement.py``) are loaded
from git under another package name, then the old BE, the new BE and MONAI's DiceLoss run in turn
(forward + backward on the same tensors) for ``--rounds`` rounds per shape. Per-round ratios make
the comparison robust to the slow drifts of a shared machine; the medians are printed.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import torch
from monai.losses import DiceLoss

from beseg.losses import BoundaryEnhancementLoss

SHAPES = ((2, 1, 96, 96, 96), (1, 3, 128, 128, 128))
MODULES = ("laplacian", "boundary_enhancement")


def load_revision_loss(rev: str, root: Path) -> type:
    """``BoundaryEnhancementLoss`` of git revision ``rev``, imported as package ``beseg_rev``."""
    package = types.ModuleType("beseg_rev")
    package.__path__ = []
    losses = types.ModuleType("beseg_rev.losses")
    losses.__path__ = []
    sys.modules.update({"beseg_rev": package, "beseg_rev.losses": losses})
    folder = Path(tempfile.mkdtemp(prefix="beseg_rev_"))
    for name in MODULES:
        source = subprocess.run(["git", "-C", str(root), "show", f"{rev}:beseg/losses/{name}.py"],
                                capture_output=True, text=True, check=True).stdout
        path = folder / f"{name}.py"
        path.write_text(source.replace("beseg.losses.", "beseg_rev.losses."))
        spec = importlib.util.spec_from_file_location(f"beseg_rev.losses.{name}", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    return sys.modules["beseg_rev.losses.boundary_enhancement"].BoundaryEnhancementLoss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("rev", help="the git revision to compare with, e.g. a commit before a change")
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--malloc", choices=("default", "keep"), default="default",
                        help="keep: glibc keeps freed memory, as beseg train sets it (beseg.allocator)")
    args = parser.parse_args()
    if args.malloc == "keep":
        from beseg.allocator import keep_freed_memory

        keep_freed_memory()
    torch.set_num_threads(args.threads)
    old_cls = load_revision_loss(args.rev, Path(__file__).resolve().parents[1])
    print(f"# BE loss of {args.rev} vs this checkout, forward+backward, float32, {args.threads} threads, "
          f"{args.rounds} interleaved rounds (medians), allocator {args.malloc}")
    for shape in SHAPES:
        gen = torch.Generator().manual_seed(0)
        pred = torch.rand(shape, generator=gen).requires_grad_(True)
        label = (torch.rand(shape, generator=gen) > 0.5).float()
        losses = {"old": old_cls(include_background=True), "new": BoundaryEnhancementLoss(include_background=True),
                  "dice": DiceLoss(include_background=True)}
        times: dict[str, list[float]] = {name: [] for name in losses}
        for rnd in range(args.rounds + 3):
            for name, loss in losses.items():
                pred.grad = None
                start = time.perf_counter()
                loss(pred, label).backward()
                if rnd >= 3:  # three warm-up rounds
                    times[name].append(time.perf_counter() - start)

        def ratio(a: str, b: str) -> float:
            return statistics.median(x / y for x, y in zip(times[a], times[b]))

        ms = {name: statistics.median(t) * 1e3 for name, t in times.items()}
        print(f"{shape}: old {ms['old']:.2f} ms, new {ms['new']:.2f} ms, DiceLoss {ms['dice']:.2f} ms; "
              f"old/DiceLoss {ratio('old', 'dice'):.2f}, new/DiceLoss {ratio('new', 'dice'):.2f}, "
              f"new is {ratio('old', 'new'):.2f}x as fast as old")


if __name__ == "__main__":
    main()

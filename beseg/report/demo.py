"""``beseg demo``: the whole comparison, CPU-sized, on the generated phantom spleen.

It generates (or reuses) the cached phantom spleen task, runs :func:`beseg.report.compare.run_compare`
for the baseline (SegResNet + soft Dice) and the paper's system (SegResNet + Dice + 1000 x BE) with
:data:`DEMO_OVERRIDES` on top of the ``phantom_spleen_*`` presets, and writes the report into
``<out>/report/``. Rerunning it reuses ``<out>``: finished runs are skipped, interrupted ones resumed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from beseg.data.phantom import ensure_phantom
from beseg.report.compare import CompareResult, run_compare

__all__ = ["DEMO_SYSTEMS", "DEMO_OVERRIDES", "demo_overrides", "run_demo"]

#: The two rows the paper's claim rests on: the baseline and the proposed loss.
DEMO_SYSTEMS: tuple[str, ...] = ("segresnet_dice", "segresnet_be")

def demo_overrides(epochs: int | None = None, steps: int | None = None, patch: int | None = None,
                   init_filters: int | None = None, val_every: int | None = None) -> list[str]:
    """Config overrides that shrink the demo (tests make it tiny); none by default.

    The demo's schedule is the ``phantom_spleen_*`` presets' own (``_phantom_spleen.yaml``: 48^3
    patches, batch 2, 12 epochs x 32 steps, validation every 4 epochs), so ``beseg demo`` and
    ``beseg train phantom_spleen_segresnet_be`` train the same thing. A step of SegResNet
    (init_filters 16) on two 48^3 patches takes about 0.7 s on an idle 2-core CPU: each system
    trains in about 5 minutes (docs/benchmarks.md, "Demo").

    Args:
        epochs, steps, patch, init_filters, val_every: replace the preset's value when given.

    Returns:
        ``KEY=VALUE`` overrides for :func:`run_compare`.
    """
    out = []
    if epochs is not None:
        out.append(f"train.epochs={epochs}")
    if steps is not None:
        out.append(f"train.steps_per_epoch={steps}")
    if val_every is not None or epochs is not None:
        out.append(f"train.val_every={min(val_every or 4, epochs or 12)}")
    if patch is not None:
        out.append(f"data.patch_size=[{patch},{patch},{patch}]")
    if init_filters is not None:
        out.append(f"model.init_filters={init_filters}")
    return out


#: The default overrides (what ``beseg demo`` runs).
DEMO_OVERRIDES: list[str] = demo_overrides()


def run_demo(out: str | Path = "beseg-demo", seeds: int = 1, overrides: Sequence[str] = DEMO_OVERRIDES,
             phantom: dict | None = None, progress: bool = True,
             log: Callable[[str], None] = print) -> CompareResult:
    """Generate the phantom spleen (cached) and compare Dice against Dice + BE on it.

    Args:
        out: results folder (reused when it exists); the report goes to ``out/report/``.
        seeds: training seeds per system.
        overrides: config overrides for every run (default :data:`DEMO_OVERRIDES`).
        phantom: :class:`beseg.data.phantom.PhantomConfig` fields for the generated dataset
            (default: the standard phantom spleen).
        progress: progress bars.
        log: receives the progress lines.

    Returns:
        The :class:`CompareResult`; ``result.report`` is the HTML page.

    Raises:
        ConfigError, DataError, ReportError: as :func:`run_compare`.
    """
    settings = f"{seeds} seed(s)" + (f"; {' '.join(overrides)}" if overrides else "; the phantom_spleen presets' schedule")
    log(f"beseg demo: phantom spleen, SegResNet + Dice vs SegResNet + Dice + 1000 x BE ({settings})")
    data = ensure_phantom("spleen", progress=progress, **(phantom or {}))
    log(f"dataset: {data}")
    return run_compare(data, DEMO_SYSTEMS, seeds, out, overrides=overrides, prefix="phantom_spleen",
                       progress=progress, log=log)

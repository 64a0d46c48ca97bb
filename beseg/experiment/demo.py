"""``beseg demo``: the whole comparison, CPU-sized, on the generated phantom spleen.

It generates (or reuses) the cached phantom spleen task (:data:`DEMO_PHANTOM`: 40 cases), runs
:func:`beseg.experiment.compare.run_compare` for the baseline (SegResNet + soft Dice) and the paper's
system (SegResNet + Dice + 1000 x BE) with :data:`DEMO_OVERRIDES` on top of the ``phantom_spleen_*``
presets, and writes the report into ``<out>/report/``. Rerunning it reuses ``<out>``: finished runs
are skipped, interrupted ones resumed.

The split is held out (protocol ``heldout``): 20 training, 4 validation cases (which choose
``best.pt``) and 16 test cases, on which every reported number is computed. Sixteen paired cases
are what lets the demo decide: the smallest two-sided p-value of the exact sign-flip test is 2 / 2^n, 0.125 with
the four cases an 80/20 split of 24 would score, 3e-5 with 16. Training costs steps, not cases,
so the extra cases cost only their generation and scoring (about a second each).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from beseg.data.phantom import ensure_phantom
from beseg.experiment.compare import CompareResult, run_compare

__all__ = ["DEMO_SYSTEMS", "DEMO_PHANTOM", "DEMO_SPLIT", "DEMO_OVERRIDES", "demo_overrides", "run_demo"]

#: The two rows the paper's claim rests on: the baseline and the proposed loss.
DEMO_SYSTEMS: tuple[str, ...] = ("segresnet_dice", "segresnet_be")
#: The demo's phantom: 40 labelled cases (the standard phantom spleen has 24).
DEMO_PHANTOM: dict = {"cases": 40}
#: Shares of all cases: 40 cases -> 16 test, 4 validation, 20 training.
DEMO_SPLIT: dict[str, float] = {"test_frac": 0.4, "val_frac": 0.1}

def demo_overrides(epochs: int | None = None, steps: int | None = None, patch: int | None = None,
                   init_filters: int | None = None, val_every: int | None = None) -> list[str]:
    """Config overrides of the demo: its split shares (:data:`DEMO_SPLIT`), plus what shrinks it
    (tests make it tiny).

    The demo's schedule is the ``phantom_spleen_*`` presets' own (``_phantom_spleen.yaml``: 32^3
    patches, batch 2, 12 epochs x 20 steps, validation every 4 epochs), so ``beseg demo`` and
    ``beseg train phantom_spleen_segresnet_be`` train the same thing. A step of SegResNet
    (init_filters 16) on two 32^3 patches takes about 0.45 s on the 2-core development VM: each system
    trains and is evaluated in about 2.5 minutes (docs/benchmarks.md, "Demo").

    Args:
        epochs, steps, patch, init_filters, val_every: replace the preset's value when given.

    Returns:
        ``KEY=VALUE`` overrides for :func:`run_compare`.
    """
    out = [f"data.{key}={value}" for key, value in DEMO_SPLIT.items()]
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
            (default :data:`DEMO_PHANTOM`: the standard phantom spleen with 40 cases).
        progress: progress bars.
        log: receives the progress lines.

    Returns:
        The :class:`CompareResult`; ``result.report`` is the HTML page.

    Raises:
        ConfigError, DataError, ReportError: as :func:`run_compare`.
    """
    settings = f"{seeds} seed(s); the phantom_spleen presets' schedule" + "".join(f"; {o}" for o in overrides)
    log(f"beseg demo: phantom spleen, SegResNet + Dice vs SegResNet + Dice + 1000 x BE ({settings})")
    data = ensure_phantom("spleen", progress=progress, **{**DEMO_PHANTOM, **(phantom or {})})
    log(f"dataset: {data}")
    return run_compare(data, DEMO_SYSTEMS, seeds, out, overrides=overrides, prefix="phantom_spleen",
                       progress=progress, log=log)

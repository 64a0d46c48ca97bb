"""Prediction benchmark: seconds per case of ``beseg predict`` (PyTorch + MONAI) and of the exported
ONNX pipeline (``beseg-predict``: onnxruntime + numpy), side by side in one run.

Each case is a phantom image written to a temporary folder; the model is a SegResNet with random
weights (the time does not depend on what it learnt) saved as a run folder and exported with
``beseg export``. Both sides predict the same file, from reading the NIfTI to the label map in the
input's grid, alternating between the two so that a busy machine slows both alike; the median of
the repeats is reported, with the share of voxels on which the two label maps agree.

Cases:

* ``phantom``: the phantom spleen's default geometry (96 x 96 x 32 voxels at 0.8 x 0.8 x 2.5 mm),
  preset ``phantom-spleen`` (64^3 windows at 1 mm);
* ``task09``: MSD Task09 geometry (512 x 512 x 90 voxels at 0.79 x 0.79 x 5 mm), preset ``task09``
  (96^3 windows at 1 mm: 405 x 405 x 446 voxels to cover).
"""

from __future__ import annotations

import dataclasses
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from beseg.bench.loss import machine_description

__all__ = ["CASES", "run_predict_benchmark"]

#: name -> (preset, phantom size (voxels), spacing (mm))
CASES: dict[str, tuple[str, tuple[int, int, int], tuple[float, float, float]]] = {
    "phantom": ("phantom-spleen", (96, 96, 32), (0.8, 0.8, 2.5)),
    "task09": ("task09", (512, 512, 90), (0.79, 0.79, 5.0)),
}


def _write_run(root: Path, preset: str, init_filters: int) -> Path:
    """A run folder whose best checkpoint is a randomly initialised SegResNet for ``preset``."""
    from beseg.data import IntensityRange, get_preset
    from beseg.engine.checkpoint import FORMAT_VERSION, atomic_save
    from beseg.engine.config import config_to_dict, load_config
    from beseg.engine.networks import build_network

    task = get_preset(preset)
    base = "phantom_spleen_segresnet_dice" if preset.startswith("phantom") else "task09_segresnet_dice"
    config, _ = load_config(base, [f"model.init_filters={init_filters}"])
    torch.manual_seed(0)
    model = build_network(config.model, task.in_channels, task.out_channels)
    run = root / f"run-{preset}"
    atomic_save({"format": FORMAT_VERSION, "config": config_to_dict(config), "epoch": 0, "model": model.state_dict(),
                 "preset": preset, "roi": list(task.patch_size),
                 "stats": dataclasses.asdict(IntensityRange(-100.0, 250.0))}, run / "checkpoints" / "best.pt")
    return run


def _write_image(path: Path, size: Sequence[int], spacing: Sequence[float]) -> Path:
    from beseg.data.nifti import write_nifti
    from beseg.data.phantom import phantom_case

    image, _ = phantom_case("spleen", 0, 0, size, spacing)
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])  # stored LPS-like, as the MSD CT volumes
    write_nifti(path, image, affine)
    return path


def run_predict_benchmark(cases: Sequence[str] = ("phantom", "task09"), repeats: int = 3, threads: int = 2,
                          init_filters: int = 16, print_fn: Callable[[str], None] = print) -> list[dict]:
    """Time ``beseg predict`` and the ONNX runtime per case; prints a table, returns its rows.

    Args:
        cases: names from :data:`CASES`.
        repeats: timed predictions per side and case (median reported); no warm-up run beyond
            loading, as a service predicting one case after another would see.
        threads: torch intra-op threads and onnxruntime intra-op threads.
        init_filters: SegResNet width (16: the paper's network).

    Raises:
        ValueError: an unknown case name.
    """
    from beseg.engine.export import export_runs
    from beseg.engine.predict import load_model, predict_image
    from beseg_runtime import Predictor

    unknown = [c for c in cases if c not in CASES]
    if unknown:
        raise ValueError(f"unknown case(s) {unknown}; choose from {', '.join(CASES)}")
    torch.set_num_threads(threads)
    print_fn(machine_description(torch.device("cpu"), threads))
    print_fn(f"SegResNet init_filters={init_filters}, random weights; {repeats} repeat(s) per side, alternating; "
             "times from reading the NIfTI to the label map in the input grid")
    rows = []
    root = Path(tempfile.mkdtemp(prefix="beseg-bench-predict-"))
    try:
        for name in cases:
            preset, size, spacing = CASES[name]
            t0 = time.perf_counter()
            image = _write_image(root / f"{name}.nii.gz", size, spacing)
            run = _write_run(root, preset, init_filters)
            export_runs([run], root / f"model-{name}", progress=False)
            prep = time.perf_counter() - t0
            loaded = load_model(run, "cpu")
            predictor = Predictor(root / f"model-{name}", device="cpu", threads=threads)
            torch_times, onnx_times = [], []
            for _ in range(repeats):
                start = time.perf_counter()
                ours, _ = predict_image(loaded, image)
                torch_times.append(time.perf_counter() - start)
                start = time.perf_counter()
                theirs, _ = predictor.predict(image)
                onnx_times.append(time.perf_counter() - start)
                print_fn(f"    {name}: beseg predict {torch_times[-1]:.2f} s, ONNX runtime {onnx_times[-1]:.2f} s")
            row = {"case": name, "size": "x".join(map(str, size)), "spacing_mm": "x".join(f"{s:g}" for s in spacing),
                   "window": "x".join(map(str, loaded.roi)), "torch_s": statistics.median(torch_times),
                   "onnx_s": statistics.median(onnx_times), "agree": float((ours == theirs).mean()),
                   "setup_s": prep}
            rows.append(row)
            print_fn(f"  {name}: {row['size']} at {row['spacing_mm']} mm, window {row['window']}: beseg predict "
                     f"{row['torch_s']:.2f} s, ONNX runtime {row['onnx_s']:.2f} s per case (ratio onnx/torch "
                     f"{row['onnx_s'] / row['torch_s']:.2f}; label maps agree on {100 * row['agree']:.3f}% of voxels; "
                     f"image + export {prep:.0f} s, not timed)")
            del loaded, predictor
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print_fn("")
    print_fn("| case | image (voxels) | spacing (mm) | window | beseg predict (s/case) | ONNX runtime (s/case) | ratio |")
    print_fn("|---|---|---|---|---:|---:|---:|")
    for r in rows:
        print_fn(f"| {r['case']} | {r['size']} | {r['spacing_mm']} | {r['window']} | {r['torch_s']:.2f} | "
                 f"{r['onnx_s']:.2f} | {r['onnx_s'] / r['torch_s']:.2f} |")
    return rows

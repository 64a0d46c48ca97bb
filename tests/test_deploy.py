"""beseg_runtime (the beseg-runtime distribution): the torch-free runtime of exported models.

Its pieces are checked against MONAI (window placement, blending, reorientation and resampling)
and against independent computations on a hand-made ONNX model; `beseg export` and the
equivalence with `beseg predict` on trained runs are in tests/test_export.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import tree_state

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from beseg_runtime import FORMAT_VERSION, DeployError, Predictor, load_pipeline  # noqa: E402
from beseg_runtime.cli import main as deploy_main  # noqa: E402
from beseg_runtime.geometry import to_input_grid, to_model_grid  # noqa: E402
from beseg_runtime.pipeline import sha256  # noqa: E402
from beseg_runtime.runtime import normalize, to_labels  # noqa: E402
from beseg_runtime.window import importance_map, mirror_flips, sliding_window, window_starts  # noqa: E402

def import_blocker(*packages: str) -> str:
    """Python code that makes importing ``packages`` (and their submodules) fail as if they were not installed."""
    return f"""
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {packages!r}:
            raise ModuleNotFoundError(f"blocked import of {{name}}", name=name)
        return None
sys.meta_path.insert(0, Block())
"""


#: What the runtime may not import: it is installed without PyTorch, MONAI and beseg (tests/test_distributions.py).
BLOCKED = import_blocker("torch", "monai", "beseg")


def run_cli_without(packages: tuple[str, ...], module: str, args: list[str], folder: Path) -> subprocess.CompletedProcess:
    """``python -m module args`` with ``packages`` not importable: a ``sitecustomize.py`` put first on PYTHONPATH
    installs the blocker before anything else is imported, as a machine without them would behave. beseg
    comes from where this interpreter finds it (the working directory or PYTHONPATH), as in :func:`run_runtime_alone`."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(import_blocker(*packages))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(folder), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=300, env=env)


def run_runtime_alone(code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter whose torch, monai and beseg imports fail (:data:`BLOCKED`)."""
    return subprocess.run([sys.executable, "-c", BLOCKED + code], capture_output=True, text=True, timeout=300)


# ---------------------------------------------------------------------------------------------
# a hand-made model folder: softmax of (0.5 - x, x - 0.5), i.e. "normalised intensity above 0.5"

def threshold_model(path: Path, window=(16, 16, 16), channels: int = 1) -> None:
    from onnx import TensorProto, helper

    half = helper.make_tensor("half", TensorProto.FLOAT, [], [0.5])
    nodes = [
        helper.make_node("Slice", ["image", "starts", "ends", "axes"], ["first"]),
        helper.make_node("Sub", ["first", "half"], ["fg"]),
        helper.make_node("Neg", ["fg"], ["bg"]),
        helper.make_node("Concat", ["bg", "fg"], ["logits"], axis=1),
    ]
    ints = [helper.make_tensor(n, TensorProto.INT64, [1], [v]) for n, v in (("starts", 0), ("ends", 1), ("axes", 1))]
    graph = helper.make_graph(
        nodes, "threshold",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", channels, *window])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 2, *window])],
        initializer=[half, *ints])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def make_model_dir(root: Path, low: float = 0.0, high: float = 200.0, window=(16, 16, 16), mirror=()) -> Path:
    root.mkdir(parents=True)
    threshold_model(root / "model.onnx", window)
    (root / "README.md").write_text("test model\n")
    spec = {
        "kind": "beseg-pipeline", "format": FORMAT_VERSION, "task": "test",
        "input": {"channels": 1, "channel_names": ["CT"]},
        "geometry": {"orientation": "RAS", "spacing_mm": [1.0, 1.0, 1.0]},
        "activation": "softmax", "mirror_axes": list(mirror),
        "output": {"channels": ["background", "fg"], "to_labels": "argmax"},
        "labels": {"0": "background", "1": "fg"},
        "members": [{"file": "model.onnx", "window": list(window), "overlap": 0.25, "blending": "gaussian",
                     "sigma_scale": 0.125, "normalization": {"kind": "scale_range", "low": low, "high": high}}],
        "files": {name: sha256(root / name) for name in ("model.onnx", "README.md")},
    }
    (root / "pipeline.json").write_text(json.dumps(spec))
    return root


def write_image(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data.astype(np.float32), np.eye(4) if affine is None else affine), str(path))
    return path


def smooth_volume(shape, seed=0) -> np.ndarray:
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    return (ndimage.gaussian_filter(rng.normal(size=shape), 2.0) * 1000 + 100).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# sliding window and mirroring: the same as MONAI

def test_mirror_flips_are_every_subset_identity_first():
    assert mirror_flips(()) == [()]
    flips = mirror_flips((2, 0, 1))
    assert flips[0] == () and len(flips) == 8 and len(set(flips)) == 8 and (0, 1, 2) in flips


@pytest.mark.parametrize("window", [(16, 16, 16), (8, 12, 10), (5, 7, 9)])
def test_importance_map_matches_monai(window):
    from monai.data.utils import compute_importance_map

    for mode in ("gaussian", "constant"):
        np.testing.assert_allclose(importance_map(window, mode), compute_importance_map(window, mode).numpy(),
                                   rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("size,window,overlap,mode", [
    ((37, 16, 23), (16, 16, 16), 0.25, "gaussian"),
    ((20, 33, 41), (8, 12, 10), 0.5, "constant"),
    ((16, 17, 18), (16, 16, 16), 0.0, "gaussian"),
    ((50, 21, 19), (16, 8, 16), 0.7, "gaussian"),
    # smaller than the window: padded (odd and even differences), then cropped back
    ((37, 16, 5), (16, 16, 16), 0.25, "gaussian"),
    ((4, 9, 30), (16, 16, 16), 0.25, "gaussian"),
    ((3, 2, 1), (8, 12, 10), 0.5, "constant"),
])
def test_sliding_window_matches_monai(size, window, overlap, mode):
    """A network whose output depends on where the window is (its mean), so placement, weights and
    padding matter."""
    from monai.inferers import sliding_window_inference

    image = np.random.default_rng(1).normal(size=(2, *size)).astype(np.float32)

    def net_np(x):
        return np.concatenate([x, x.mean(axis=(1, 2, 3, 4), keepdims=True) + x[:, :1] ** 2], axis=1)

    def net_torch(x):
        return torch.cat([x, x.mean(dim=(1, 2, 3, 4), keepdim=True) + x[:, :1] ** 2], dim=1)

    ours = sliding_window(image, window, net_np, overlap, mode, batch_size=3)
    theirs = sliding_window_inference(torch.from_numpy(image)[None], window, 2, net_torch, overlap=overlap,
                                      mode=mode)[0].numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)


def test_window_starts_cover_the_axis_and_end_at_its_edge():
    for size, window, overlap in [(37, 16, 0.25), (16, 16, 0.5), (100, 7, 0.9)]:
        starts = window_starts(size, window, overlap)
        assert starts[0] == 0 and starts[-1] == size - window
        assert all(b - a <= window for a, b in zip(starts, starts[1:]))


# ---------------------------------------------------------------------------------------------
# geometry: the same grid and values as the presets' MONAI chain, and back

def oblique_affine(spacing=(0.7, 1.1, 3.0), angle=0.3) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    rot = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ np.array([[1, 0, 0], [0, np.cos(0.2), -np.sin(0.2)],
                                                                    [0, np.sin(0.2), np.cos(0.2)]])
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag(spacing)
    affine[:3, 3] = [-20.0, 13.5, 7.25]
    return affine


def swapped_lps_affine() -> np.ndarray:
    affine = np.zeros((4, 4))
    affine[0, 1], affine[1, 0], affine[2, 2], affine[3, 3] = -0.8, 0.8, -2.5, 1.0
    affine[:3, 3] = [12.0, -30.0, 40.0]
    return affine


@pytest.mark.parametrize("affine", [np.diag([0.8, 0.8, 2.5, 1.0]), oblique_affine(), swapped_lps_affine()],
                         ids=["axial", "oblique", "swapped-lps"])
def test_model_grid_and_inverse_match_the_monai_chain(affine, tmp_path):
    from monai.data import MetaTensor

    from beseg.data import get_preset

    data = smooth_volume((27, 31, 11))
    path = write_image(tmp_path / "img.nii.gz", data, affine)
    preset = get_preset("task09")
    geometry = preset.infer_geometry()
    ref = geometry({"image": str(path)})
    affine = nib.load(str(path)).affine  # as stored (float32), which is what both sides read
    ours, grid = to_model_grid(data[None], affine, "RAS", (1.0, 1.0, 1.0))
    assert ours.shape == tuple(ref["image"].shape)
    np.testing.assert_allclose(grid.model_affine, ref["image"].affine.numpy(), atol=1e-5)
    np.testing.assert_allclose(ours, ref["image"].numpy(), rtol=1e-4, atol=1e-2)  # intensities ~1e3
    labels = (np.random.default_rng(2).random(grid.model_shape) * 4).astype(np.uint8)
    ref["pred"] = MetaTensor(torch.from_numpy(labels[None]).float(), affine=ref["image"].affine)
    monai_back = preset.inverter(geometry, nearest=True)(ref)["pred"].numpy()[0].round().astype(np.uint8)
    back = to_input_grid(labels, grid)
    assert back.shape == data.shape
    assert (back != monai_back).mean() < 1e-3  # random labels: only exact rounding ties could differ


def test_normalize_and_label_maps_follow_their_definitions():
    x = np.array([[[[0.0, 1.0], [3.0, 0.0]]]], dtype=np.float32)
    z = normalize(x, {"kind": "zscore_nonzero"})
    assert z[0, 0, 0, 0] == 0 and z[0, 0, 1, 1] == 0 and np.isclose(z[0][x[0] != 0].mean(), 0)
    assert np.isclose(z[0][x[0] != 0].std(), 1)
    s = normalize(x, {"kind": "scale_range", "low": 1.0, "high": 2.0})
    np.testing.assert_allclose(s, [[[[0, 0], [1, 0]]]])

    class P:  # the two fields to_labels reads
        to_labels, threshold = "nested_regions", 0.5
        regions = ((1, 1), (0, 2), (2, 3))  # WT -> 1, TC -> 2, ET -> 3

    probs = np.zeros((3, 4), dtype=np.float32)
    probs[:, 1] = [0, 0.9, 0]        # WT only: edema
    probs[:, 2] = [0.9, 0.9, 0]      # TC: non-enhancing
    probs[:, 3] = [0.2, 0.2, 0.9]    # ET wins whatever TC and WT say (nested)
    assert to_labels(probs, P).tolist() == [0, 1, 2, 3]


def test_the_presets_and_the_runtime_clear_the_same_resampling_noise():
    """Values within 1e-6 of a channel's peak (what linear resampling leaves beside a zero background)
    are 0 for the non-zero z-score, in MONAI's chain and in the runtime alike; real values stay."""
    from monai.data import MetaTensor

    from beseg.data.presets import ClearResamplingNoised
    from beseg_runtime.intensity import clear_resampling_noise

    x = (np.random.default_rng(0).random((4, 10, 11, 12)) * 100 + 1).astype(np.float32)
    x[:, :3] = 0
    x[0, 0, 0, 0], x[1, 0, 0, 1], x[2, 1, 1, 1], x[3, 2, 2, 2] = 1e-12, -2e-13, 5e-4, 1e-14
    ours = clear_resampling_noise(x.copy())
    theirs = ClearResamplingNoised(keys="image")({"image": MetaTensor(torch.from_numpy(x.copy()))})["image"].numpy()
    np.testing.assert_array_equal(ours, theirs)
    assert ours[0, 0, 0, 0] == ours[1, 0, 0, 1] == ours[3, 2, 2, 2] == 0 and ours[2, 1, 1, 1] == np.float32(5e-4)
    assert (ours[:, 3:] == x[:, 3:]).all()


def test_a_label_map_is_written_atomically_and_never_over_a_file_that_appeared(tmp_path):
    from beseg_runtime.io import OutputError, is_beseg_label, write_label

    reference = nib.Nifti1Image(np.zeros((4, 5, 6), np.float32), np.diag([0.5, 1.0, 2.0, 1.0]))
    labels = np.arange(120, dtype=np.uint8).reshape(4, 5, 6) % 3
    path = write_label(labels, reference, tmp_path / "a.nii.gz", replace=False)
    assert is_beseg_label(path) and not is_beseg_label(write_image(tmp_path / "b.nii.gz", np.zeros((4, 5, 6))))
    np.testing.assert_array_equal(np.asarray(nib.load(str(path)).dataobj), labels)
    before = path.read_bytes()
    with pytest.raises(OutputError, match="appeared while predicting"):
        write_label(labels * 0, reference, path, replace=False)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["a.nii.gz", "b.nii.gz"]
    write_label(labels * 0, reference, path, replace=True)
    assert not np.asarray(nib.load(str(path)).dataobj).any()


# ---------------------------------------------------------------------------------------------
# the runtime on a hand-made model

def test_threshold_model_labels_the_bright_voxels_in_the_input_grid(tmp_path):
    model = make_model_dir(tmp_path / "model", low=0.0, high=200.0, mirror=(0, 1, 2))
    data = smooth_volume((40, 36, 20))
    affine = np.diag([-1.0, 1.0, 1.0, 1.0])  # 1 mm, but L->R: reoriented and back, never resampled
    affine[0, 3] = 39.0
    image = write_image(tmp_path / "in" / "case_a.nii.gz", data, affine)
    assert deploy_main([str(model), str(image.parent), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    out = nib.load(str(tmp_path / "out" / "case_a.nii.gz"))
    assert out.shape == data.shape and out.get_data_dtype() == np.uint8
    np.testing.assert_allclose(out.affine, affine)
    np.testing.assert_array_equal(np.asarray(out.dataobj), (data > 100.0).astype(np.uint8))


def test_the_runtime_runs_without_torch_monai_or_beseg(tmp_path):
    model = make_model_dir(tmp_path / "model")
    write_image(tmp_path / "in" / "a.nii.gz", smooth_volume((20, 20, 18)), oblique_affine((1.2, 0.9, 2.0)))
    write_image(tmp_path / "in" / "thin.nii.gz", smooth_volume((20, 20, 4)), oblique_affine((1.2, 0.9, 2.0)))
    result = run_runtime_alone(f"""
from beseg_runtime.cli import main
rc = main([{str(model)!r}, {str(tmp_path / 'in')!r}, "--out", {str(tmp_path / 'out')!r}])
import beseg_runtime
for name in beseg_runtime.__all__:  # the lazy exports load too
    getattr(beseg_runtime, name)
print("rc", rc, "imported", sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "monai", "beseg")))
""")
    assert result.returncode == 0, result.stderr
    assert "rc 0 imported []" in result.stdout
    assert nib.load(str(tmp_path / "out" / "a.nii.gz")).shape == (20, 20, 18)
    assert nib.load(str(tmp_path / "out" / "thin.nii.gz")).shape == (20, 20, 4)  # padded: thinner than the window
    # the guard works: the same interpreter refuses torch and beseg, but not the runtime's own modules
    assert "blocked import of torch" in run_runtime_alone("import torch").stderr
    assert "blocked import of beseg" in run_runtime_alone("import beseg.errors").stderr


def test_no_runtime_module_imports_beseg_torch_or_monai():
    """Read from the source, so that an import in a branch the test above does not reach is caught too."""
    import ast

    import beseg_runtime

    found = []
    for path in sorted(Path(beseg_runtime.__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            found += [f"{path.name}: {n}" for n in names if n.split(".")[0] in ("beseg", "torch", "monai")]
    assert found == []


def test_without_onnxruntime_beseg_predict_says_what_to_install(tmp_path):
    model = make_model_dir(tmp_path / "model")
    image = write_image(tmp_path / "in" / "a.nii.gz", smooth_volume((20, 20, 20)))
    result = run_cli_without(("onnxruntime",), "beseg_runtime.cli", [str(model), str(image), "--out",
                                                                     str(tmp_path / "out")], tmp_path / "site")
    assert result.returncode == 1, result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert "beseg-predict needs onnxruntime" in result.stderr and "pip install onnxruntime" in result.stderr
    assert "onnxruntime-gpu for CUDA" in result.stderr and not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# bad input: one line naming the file and the reason

def error_of(capsys, *args: str) -> str:
    assert deploy_main(list(args)) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


def test_a_damaged_model_file_fails_its_checksum(tmp_path, capsys):
    model = make_model_dir(tmp_path / "model")
    with open(model / "model.onnx", "ab") as f:
        f.write(b"\0")
    image = write_image(tmp_path / "a.nii.gz", smooth_volume((20, 20, 20)))
    err = error_of(capsys, str(model), str(image), "--out", str(tmp_path / "out"))
    assert "model.onnx" in err and "checksum mismatch" in err
    assert not (tmp_path / "out").exists()


def test_a_pipeline_of_a_newer_format_is_refused(tmp_path, capsys):
    model = make_model_dir(tmp_path / "model")
    spec = json.loads((model / "pipeline.json").read_text())
    spec["format"] = FORMAT_VERSION + 1
    (model / "pipeline.json").write_text(json.dumps(spec))
    err = error_of(capsys, str(model), str(tmp_path), "--out", str(tmp_path / "out"))
    assert "pipeline.json" in err and f"format {FORMAT_VERSION + 1} is newer" in err
    with pytest.raises(DeployError, match="newer than format"):
        load_pipeline(model)


@pytest.mark.parametrize("key,value,match", [
    ("members", "model.onnx", "'members' must be a list"),
    ("activation", "relu", "activation 'relu' is not softmax or sigmoid"),
    ("geometry", {"orientation": "RAS"}, "missing 'geometry.spacing_mm'"),
    ("kind", "something-else", "not a beseg pipeline"),
])
def test_a_malformed_pipeline_is_one_clear_error(key, value, match, tmp_path, capsys):
    model = make_model_dir(tmp_path / "model")
    spec = json.loads((model / "pipeline.json").read_text())
    spec[key] = value
    (model / "pipeline.json").write_text(json.dumps(spec))
    err = error_of(capsys, str(model), str(tmp_path), "--out", str(tmp_path / "out"))
    assert "pipeline.json" in err and match in err


def write_with_affine(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    """A NIfTI file whose sform is ``affine`` verbatim, even a degenerate one nibabel would not build an image from."""
    header = nib.Nifti1Header()
    header.set_data_shape(data.shape)
    header.set_data_dtype(np.float32)
    header["sform_code"] = 1
    for row, name in enumerate(("srow_x", "srow_y", "srow_z")):
        header[name] = affine[row]
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data.astype(np.float32), None, header), str(path))
    return path


def test_scans_thinner_than_the_window_are_padded_and_predicted(tmp_path, capsys):
    """Thin along one axis (odd padding), along two, and under a quarter of the window (a warning):
    the threshold model labels each voxel by its own intensity, so the labels are known exactly and
    any misplaced padding or crop shows."""
    model = make_model_dir(tmp_path / "model", mirror=(0, 1, 2))  # window 16^3; mirroring flips the padding too
    volumes = {"thin_z": (20, 18, 9), "thin_xy": (6, 5, 30), "sliver": (20, 18, 3)}
    data = {name: smooth_volume(shape, seed=i) for i, (name, shape) in enumerate(volumes.items())}
    for name, volume in data.items():
        write_image(tmp_path / "in" / f"{name}.nii.gz", volume)
    assert deploy_main([str(model), str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    for name, volume in data.items():
        out = nib.load(str(tmp_path / "out" / f"{name}.nii.gz"))
        assert out.shape == volume.shape
        labels = np.asarray(out.dataobj)
        np.testing.assert_array_equal(labels, (volume > 100.0).astype(np.uint8))
        assert 0 < labels.mean() < 1, name  # both labels present: the comparison is not of constant maps
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "warning" in err[0] and "sliver.nii.gz" in err[0] and "20x18x3 voxels" in err[0]
    assert "under 25% of the window 16x16x16 along axis 2" in err[0]
    # the threshold is configurable: 0 never warns, 0.5 warns about thin_xy (6 and 5 < 8) too, not thin_z (9)
    args = [str(model), str(tmp_path / "in"), "--quiet", "--overwrite"]
    assert deploy_main([*args, "--out", str(tmp_path / "out"), "--warn-below", "0"]) == 0
    assert capsys.readouterr().err == ""
    assert deploy_main([*args, "--out", str(tmp_path / "out"), "--warn-below", "0.5"]) == 0
    warned = capsys.readouterr().err
    assert "thin_xy.nii.gz" in warned and "along axis 0, 1" in warned and "thin_z" not in warned


def test_what_cannot_be_a_scan_is_refused_and_the_rest_is_predicted(tmp_path, capsys):
    """One line per bad image, naming it; the images after a bad one are still predicted; exit code 1."""
    model = make_model_dir(tmp_path / "model")
    folder = tmp_path / "in"
    bad = {
        "a_degenerate": write_with_affine(folder / "a_degenerate.nii.gz", smooth_volume((20, 20, 20)),
                                          np.diag([1.0, 1.0, 0.0, 1.0])),
        "b_collinear": write_with_affine(folder / "b_collinear.nii.gz", smooth_volume((20, 20, 20)),
                                         np.array([[1.0, 1, 0, 0], [0, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])),
        "c_one_slice": write_image(folder / "c_one_slice.nii.gz", smooth_volume((20, 20, 1))),
        "d_four": write_image(folder / "d_four.nii.gz", np.zeros((20, 20, 20, 4))),
        "e_nan": write_image(folder / "e_nan.nii.gz", np.full((20, 20, 20), np.nan)),
        "f_not_nifti": folder / "f_not_nifti.nii.gz",
    }
    bad["f_not_nifti"].write_bytes(b"not a NIfTI file")
    good = write_image(folder / "z_good.nii.gz", smooth_volume((20, 20, 20)))
    before = tree_state(folder)
    assert deploy_main([str(model), str(folder), "--out", str(tmp_path / "out"), "--quiet"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(err)
    assert err[0] == f"{len(bad)} input(s) failed:" and len(err) == len(bad) + 1
    reasons = {"a_degenerate": "degenerate affine", "b_collinear": "degenerate affine",
               "c_one_slice": "1 voxel(s) along axis 2", "d_four": "has 4 channel(s)", "e_nan": "NaN or Inf",
               "f_not_nifti": "not a readable NIfTI"}
    for name, path in bad.items():
        assert sum(str(path) in line and reasons[name] in line for line in err) == 1, (name, err)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [good.name]
    assert tree_state(folder) == before


def test_a_model_folder_from_before_the_padding_key_pads_and_an_unknown_mode_is_refused(tmp_path, capsys):
    """Format 1 as 1580cec wrote it (``padding`` a string) or with no key: constant 0 padding, like
    ``beseg predict``; a mode this version does not implement is refused, not ignored."""
    volume = smooth_volume((20, 18, 7))
    write_image(tmp_path / "in" / "thin.nii.gz", volume)
    for i, padding in enumerate(["none: an image smaller than the window is refused", None,
                                 {"mode": "constant", "value": 0.0}]):
        model = make_model_dir(tmp_path / f"model{i}")
        spec = json.loads((model / "pipeline.json").read_text())
        assert spec["format"] == 1
        if padding is not None:
            spec["members"][0]["padding"] = padding
        (model / "pipeline.json").write_text(json.dumps(spec))
        assert load_pipeline(model).members[0].padding == "constant"
        out = tmp_path / f"out{i}"
        assert deploy_main([str(model), str(tmp_path / "in"), "--out", str(out), "--quiet"]) == 0
        np.testing.assert_array_equal(np.asarray(nib.load(str(out / "thin.nii.gz")).dataobj), volume > 100.0)
    spec["members"][0]["padding"] = {"mode": "reflect"}
    (model / "pipeline.json").write_text(json.dumps(spec))
    err = error_of(capsys, str(model), str(tmp_path / "in"), "--out", str(tmp_path / "out9"))
    assert "pipeline.json" in err and "padding mode 'reflect'" in err and "update beseg" in err


# ---------------------------------------------------------------------------------------------
# outputs never replace an input, never collide, and replace only beseg's own label maps


def test_out_in_an_input_folder_is_refused_and_the_images_are_untouched(tmp_path, capsys):
    model = make_model_dir(tmp_path / "model")
    scans = tmp_path / "scans"
    write_image(scans / "ct.nii.gz", smooth_volume((20, 20, 20)))
    write_image(scans / "mr.nii", smooth_volume((20, 20, 20)))
    before = tree_state(scans)
    for images in ([scans], [scans / "mr.nii"]):  # the folder itself, or one file of it
        err = error_of(capsys, str(model), *map(str, images), "--out", str(scans))
        assert f"--out {scans} is the folder of the input" in err and "choose another output folder" in err
        assert tree_state(scans) == before
    # a link from the output folder to an input: refused as well
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "ct.nii.gz").symlink_to(scans / "ct.nii.gz")
    err = error_of(capsys, str(model), str(scans), "--out", str(tmp_path / "out"), "--overwrite")
    assert f"{tmp_path / 'out' / 'ct.nii.gz'} is the input {scans / 'ct.nii.gz'}" in err
    assert tree_state(scans) == before


def test_two_inputs_with_one_output_name_are_refused_naming_both(tmp_path, capsys):
    model = make_model_dir(tmp_path / "model")
    a = write_image(tmp_path / "A" / "case.nii.gz", smooth_volume((20, 20, 20), seed=1))
    b = write_image(tmp_path / "B" / "case.nii", smooth_volume((20, 20, 20), seed=2))
    err = error_of(capsys, str(model), str(a.parent), str(b.parent), "--out", str(tmp_path / "out"))
    assert str(a) in err and str(b) in err and str(tmp_path / "out" / "case.nii.gz") in err
    assert not (tmp_path / "out").exists()  # refused before anything ran
    # the same file given twice (its folder and itself) is one input, not a collision
    assert deploy_main([str(model), str(a.parent), str(a), "--out", str(tmp_path / "out"), "--quiet"]) == 0


def test_existing_outputs_are_kept_unless_overwrite_and_only_beseg_label_maps_are_replaced(tmp_path, capsys):
    model = make_model_dir(tmp_path / "model")
    write_image(tmp_path / "in" / "a.nii.gz", smooth_volume((20, 20, 20), seed=1))
    write_image(tmp_path / "in" / "b.nii.gz", smooth_volume((20, 20, 20), seed=2))
    out = tmp_path / "out"
    args = [str(model), str(tmp_path / "in"), "--out", str(out), "--quiet"]
    assert deploy_main(args) == 0
    ours = tree_state(out)
    err = error_of(capsys, *args)  # a second run: refused, nothing replaced
    assert f"{out / 'a.nii.gz'} exists already (and 1 more output(s))" in err and "--overwrite" in err
    assert tree_state(out) == ours
    assert deploy_main([*args, "--overwrite"]) == 0  # beseg's own label maps are replaced
    assert all(tree_state(out)[k][1] != ours[k][1] for k in ours)
    # a file beseg did not write is never replaced, --overwrite or not
    write_image(out / "b.nii.gz", np.zeros((20, 20, 20)))
    theirs = tree_state(out)
    err = error_of(capsys, *args, "--overwrite")
    assert f"{out / 'b.nii.gz'} exists and is not a label map written by beseg" in err
    assert tree_state(out) == theirs


def test_missing_model_folder_and_device(tmp_path, capsys):
    assert "not found" in error_of(capsys, str(tmp_path), "x.nii.gz", "--out", str(tmp_path / "o"))
    model = make_model_dir(tmp_path / "model")
    predictor = Predictor(model, device="cpu")
    assert predictor.providers == ["CPUExecutionProvider"]

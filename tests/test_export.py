"""`beseg export` and the ensembles and mirroring of `beseg predict`, on tiny phantom runs.

The equivalence tests run the exported folder with beseg-predict in a fresh interpreter whose torch,
monai and beseg imports are refused, and compare its label maps with `beseg predict`'s.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from beseg.cli import main  # noqa: E402
from beseg.data import make_phantom  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from conftest import tiny_train_config  # noqa: E402
from test_deploy import oblique_affine, run_runtime_alone  # noqa: E402
from beseg_runtime.cli import main as deploy_main  # noqa: E402

pytestmark = pytest.mark.slow


#: Crops of a 32x32xZ phantom image (0.8 x 0.8 x 2.5 mm) thinner than the 16^3 window once resampled to 1 mm:
#: along z (5 slices: 11 voxels, an odd padding), along x and y (12 x 11 voxels: 10 x 9), and a 2-slice sliver
#: (at 2 mm: 3 voxels, under a quarter of the window: predicted with a warning).
THIN_CROPS = {"thin_z": (slice(None), slice(None), slice(3, 8)), "thin_xy": (slice(8, 20), slice(10, 21), slice(None)),
              "sliver": (slice(None), slice(None), slice(5, 7))}


def add_thin_scans(source: Path, folder: Path) -> list[str]:
    """Write :data:`THIN_CROPS` of ``source`` (3D or 4D) into ``folder``, plus the z crop on an oblique grid.

    Returns:
        The file names written.
    """
    img = nib.load(str(source))
    data = np.asarray(img.dataobj).astype(np.float32)
    names = []
    for name, crop in THIN_CROPS.items():
        affine = img.affine.copy()
        affine[:3, 3] = img.affine[:3] @ np.array([c.start or 0 for c in crop] + [1.0])  # the crop's first voxel
        if name == "sliver":
            affine[:3, 2] *= 2.0 / 2.5
        nib.save(nib.Nifti1Image(data[crop], affine), str(folder / f"{name}.nii.gz"))
        names.append(f"{name}.nii.gz")
    nib.save(nib.Nifti1Image(data[THIN_CROPS["thin_z"]], oblique_affine()), str(folder / "thin_oblique.nii.gz"))
    return [*names, "thin_oblique.nii.gz"]


def assert_thin_scans_segmented(folder: Path, images: Path, names: list[str], labels: list[int]) -> None:
    """Each thin scan has a label map in its own grid, and the labels do occur in them (so the
    comparison with the other path is not one of empty maps)."""
    found: set[int] = set()
    for name in names:
        out = nib.load(str(folder / name))
        assert out.shape == nib.load(str(images / name)).shape[:3], name
        found |= set(np.unique(np.asarray(out.dataobj)).tolist())
    assert set(labels) <= found, (found, labels)


@pytest.fixture(scope="module")
def runs(tiny_phantom, tmp_path_factory) -> dict[str, Path]:
    """Two tiny spleen runs (seeds 0 and 1), and test images: the phantom's, an oblique anisotropic one,
    and scans thinner than the window (:func:`add_thin_scans`)."""
    root = tmp_path_factory.mktemp("runs")
    old = os.environ.get("BESEG_CACHE_DIR")
    os.environ["BESEG_CACHE_DIR"] = str(root / "cache")
    try:
        for seed in (0, 1):
            cfg = tiny_train_config(root, f"s{seed}", train={"seed": seed, "epochs": 2, "steps_per_epoch": 3})
            assert main(["train", str(cfg), "--data", str(tiny_phantom), "--out", str(root / f"run{seed}"),
                         "--no-progress"]) == 0
    finally:
        os.environ.pop("BESEG_CACHE_DIR", None) if old is None else os.environ.__setitem__("BESEG_CACHE_DIR", old)
    images = root / "images"
    images.mkdir()
    for src in sorted((tiny_phantom / "imagesTs").glob("*.nii.gz")):
        (images / src.name).write_bytes(src.read_bytes())
    src = nib.load(str(images / src.name))
    nib.save(nib.Nifti1Image(np.asarray(src.dataobj).astype(np.float32), oblique_affine()), str(images / "oblique.nii.gz"))
    thin = add_thin_scans(src.get_filename(), images)
    return {"run0": root / "run0", "run1": root / "run1", "images": images, "thin": thin}  # type: ignore[dict-item]


def labels_of(folder: Path) -> dict[str, nib.Nifti1Image]:
    return {p.name: nib.load(str(p)) for p in sorted(folder.glob("*.nii.gz"))}


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 1.0 if not a.any() and not b.any() else 2.0 * (a & b).sum() / (a.sum() + b.sum())


def deploy_without_torch(model: Path, images: Path, out: Path) -> None:
    result = run_runtime_alone(f"""
from beseg_runtime.cli import main
rc = main([{str(model)!r}, {str(images)!r}, "--out", {str(out)!r}, "--quiet"])
assert not [m for m in sys.modules if m.split(".")[0] in ("torch", "monai", "beseg")]
sys.exit(rc)
""")
    assert result.returncode == 0, result.stderr


def assert_equivalent(reference: Path, deployed: Path, labels: list[int]) -> None:
    """Same files, shapes and affines; Dice of at least 0.999 per case and label."""
    ref, dep = labels_of(reference), labels_of(deployed)
    assert list(ref) == list(dep) and ref
    for name, img in ref.items():
        a, b = np.asarray(img.dataobj), np.asarray(dep[name].dataobj)
        assert a.shape == b.shape, name
        np.testing.assert_allclose(img.affine, dep[name].affine, atol=1e-6)
        for label in labels:
            assert dice(a == label, b == label) >= 0.999, (name, label, dice(a == label, b == label))


def test_export_single_run_equals_beseg_predict_without_torch(runs, tmp_path, capsys):
    model = tmp_path / "model"
    assert main(["export", str(runs["run0"]), "--out", str(model)]) == 0
    assert sorted(p.name for p in model.iterdir()) == ["README.md", "model.onnx", "pipeline.json"]
    spec = json.loads((model / "pipeline.json").read_text())
    assert spec["format"] == 1 and spec["activation"] == "softmax" and spec["mirror_axes"] == []
    assert spec["members"][0]["window"] == [16, 16, 16] and spec["members"][0]["normalization"]["kind"] == "scale_range"
    assert spec["labels"] == {"0": "background", "1": "spleen"} and set(spec["files"]) == {"model.onnx", "README.md"}
    import onnx

    graph = onnx.load(str(model / "model.onnx")).graph
    dims = graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [1, 16, 16, 16]  # dynamic batch, fixed window
    assert main(["predict", str(runs["run0"]), str(runs["images"]), "--out", str(tmp_path / "torch")]) == 0
    deploy_without_torch(model, runs["images"], tmp_path / "onnx")
    assert_equivalent(tmp_path / "torch", tmp_path / "onnx", [0, 1])
    assert_thin_scans_segmented(tmp_path / "torch", runs["images"], runs["thin"], [0, 1])
    # a second export into the same folder is refused rather than mixed with the first
    capsys.readouterr()
    assert main(["export", str(runs["run0"]), "--out", str(model)]) == 1
    assert "already exists" in capsys.readouterr().err


def test_export_ensemble_with_mirroring_equals_beseg_predict(runs, tmp_path):
    model = tmp_path / "ens"
    assert main(["export", str(runs["run0"]), str(runs["run1"]), "--mirror", "--out", str(model)]) == 0
    spec = json.loads((model / "pipeline.json").read_text())
    assert [m["file"] for m in spec["members"]] == ["model-0.onnx", "model-1.onnx"] and spec["mirror_axes"] == [0, 1, 2]
    # 16 passes per image and path: one phantom image, the oblique one, and the scans thin along one and two axes
    images = tmp_path / "images"
    images.mkdir()
    chosen = ["oblique.nii.gz", "phantom_spleen_006.nii.gz", "thin_xy.nii.gz", "thin_z.nii.gz"]
    for name in chosen:
        (images / name).symlink_to(runs["images"] / name)
    args = [str(runs["run0"]), str(runs["run1"]), str(images), "--mirror"]
    assert main(["predict", *args, "--out", str(tmp_path / "torch")]) == 0
    deploy_without_torch(model, images, tmp_path / "onnx")
    assert_equivalent(tmp_path / "torch", tmp_path / "onnx", [0, 1])
    assert_thin_scans_segmented(tmp_path / "torch", images, ["thin_xy.nii.gz", "thin_z.nii.gz"], [0, 1])


def test_ensemble_averages_probabilities_and_mirroring_changes_them(runs):
    """[run0, run0] is run0 itself; [run0, run1] and mirroring are not (their probabilities differ)."""
    import torch

    from beseg.engine.predict import load_model, predict_image

    image = sorted(runs["images"].glob("phantom*.nii.gz"))[0]
    m0, m1 = load_model(runs["run0"], "cpu"), load_model(runs["run1"], "cpu")
    single, _ = predict_image(m0, image)
    twice, _ = predict_image([m0, m0], image)
    np.testing.assert_array_equal(single, twice)
    pair, _ = predict_image([m0, m1], image)
    mirrored, _ = predict_image(m0, image, mirror_axes=(0, 1, 2))
    assert (pair != single).any() and (mirrored != single).any()
    from beseg.engine.inference import predict_probabilities

    x = torch.rand(1, 1, 24, 20, 18)
    p = predict_probabilities(m0.model, x, m0.roi, "softmax", mirror_axes=(0,))
    manual = (predict_probabilities(m0.model, x, m0.roi, "softmax")
              + predict_probabilities(m0.model, x.flip(2), m0.roi, "softmax").flip(2)) / 2
    torch.testing.assert_close(p, manual)


def test_predict_arguments_and_a_failed_export_leaves_nothing(runs, tmp_path, capsys, monkeypatch):
    assert main(["predict", str(runs["images"]), "--out", str(tmp_path / "o")]) == 1
    assert "not a run folder" in capsys.readouterr().err
    assert main(["predict", str(runs["run0"]), str(runs["run1"]), "--out", str(tmp_path / "o")]) == 1
    assert "no images given" in capsys.readouterr().err
    from beseg.engine import export as export_mod

    calls = []
    real = export_mod._export_onnx

    def second_fails(member, path):
        calls.append(path)
        if len(calls) == 2:
            raise export_mod.ExportError(f"{member.checkpoint}: simulated failure")
        return real(member, path)

    monkeypatch.setattr(export_mod, "_export_onnx", second_fails)
    assert main(["export", str(runs["run0"]), str(runs["run1"]), "--out", str(tmp_path / "m")]) == 1
    err = capsys.readouterr().err
    assert "simulated failure" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == [] or all(p.name == "o" for p in tmp_path.iterdir())


def test_brain_sigmoid_regions_export_equals_beseg_predict(tmp_path):
    brain = make_phantom(tmp_path / "brain", task="brain", cases=5, test_cases=2, size=(32, 32, 16), progress=False)
    cfg = tiny_train_config(tmp_path, "brain")
    raw = yaml.safe_load(cfg.read_text())
    raw["base"] = "phantom_brain_segresnet_be"
    cfg.write_text(yaml.safe_dump(raw))
    assert main(["train", str(cfg), "--data", str(brain), "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "model")]) == 0
    spec = json.loads((tmp_path / "model" / "pipeline.json").read_text())
    assert spec["output"]["to_labels"] == "nested_regions" and spec["input"]["channels"] == 4
    assert [p["label"] for p in spec["output"]["paint"]] == [1, 2, 3]
    images = tmp_path / "images"
    images.mkdir()
    for src in sorted((brain / "imagesTs").glob("*.nii.gz")):
        (images / src.name).write_bytes(src.read_bytes())
    thin = add_thin_scans(src, images)
    assert main(["predict", str(tmp_path / "run"), str(images), "--out", str(tmp_path / "torch")]) == 0
    found = set().union(*(np.unique(np.asarray(i.dataobj)).tolist() for i in labels_of(tmp_path / "torch").values()))
    assert len(found) >= 3, found  # nested labels appear, so the comparison is not of empty maps
    deploy_without_torch(tmp_path / "model", images, tmp_path / "onnx")
    assert_equivalent(tmp_path / "torch", tmp_path / "onnx", [0, 1, 2, 3])
    assert_thin_scans_segmented(tmp_path / "torch", images, thin, [0, 1])


# ---------------------------------------------------------------------------------------------
# both paths: the same images refused, warned about and written; outputs never over inputs


def test_both_paths_refuse_warn_and_write_the_same_images(runs, tmp_path, capsys):
    from test_deploy import smooth_volume, write_with_affine

    model = tmp_path / "model"
    assert main(["export", str(runs["run0"]), "--out", str(model)]) == 0
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("thin_xy.nii.gz", "sliver.nii.gz"):
        (folder / name).write_bytes((runs["images"] / name).read_bytes())
    write_with_affine(folder / "degenerate.nii.gz", smooth_volume((20, 20, 20)), np.diag([1.0, 0.0, 1.0, 1.0]))
    nib.save(nib.Nifti1Image(smooth_volume((20, 20, 1)), np.eye(4)), str(folder / "one_slice.nii.gz"))
    nib.save(nib.Nifti1Image(np.zeros((20, 20, 20, 2), np.float32), np.eye(4)), str(folder / "two_channels.nii.gz"))
    nib.save(nib.Nifti1Image(np.full((20, 20, 20), np.inf, np.float32), np.eye(4)), str(folder / "inf.nii.gz"))
    (folder / "truncated.nii.gz").write_bytes((runs["images"] / "thin_z.nii.gz").read_bytes()[:200])
    capsys.readouterr()
    outcome = {}
    for path, command in (("torch", ["predict", str(runs["run0"])]), ("onnx", None)):
        out = tmp_path / path
        if command:
            code = main([*command, str(folder), "--out", str(out)])
        else:
            code = deploy_main([str(model), str(folder), "--out", str(out), "--quiet"])
        err = capsys.readouterr().err
        assert code == 1 and "Traceback" not in err
        failed = sorted(line.split(": ")[0].removeprefix("  - ") for line in err.splitlines() if line.startswith("  - "))
        warned = [line for line in err.splitlines() if "warning:" in line]
        outcome[path] = (failed, sorted(p.name for p in out.iterdir()), len(warned), err)
    torch_side, onnx_side = outcome["torch"], outcome["onnx"]
    assert torch_side[:3] == onnx_side[:3]
    assert torch_side[0] == sorted(str(folder / n) for n in ("degenerate.nii.gz", "inf.nii.gz", "one_slice.nii.gz",
                                                             "truncated.nii.gz", "two_channels.nii.gz"))
    assert torch_side[1] == ["sliver.nii.gz", "thin_xy.nii.gz"] and torch_side[2] == 1
    for shared in ("degenerate affine", "1 voxel(s) along axis 2", "NaN or Inf", "sliver.nii.gz: only 26x26x3 voxels"):
        assert shared in torch_side[3] and shared in onnx_side[3], shared


def test_beseg_predict_never_writes_over_inputs_and_refuses_colliding_names(runs, tmp_path, capsys):
    from conftest import tree_state

    scans = tmp_path / "scans"
    scans.mkdir()
    (scans / "ct.nii.gz").write_bytes((runs["images"] / "thin_xy.nii.gz").read_bytes())
    before = tree_state(scans)
    capsys.readouterr()
    assert main(["predict", str(runs["run0"]), str(scans), "--out", str(scans)]) == 1
    err = capsys.readouterr().err
    assert f"--out {scans} is the folder of the input {scans / 'ct.nii.gz'}" in err and err.count("\n") == 1
    assert tree_state(scans) == before
    # two inputs, one output name: both named, nothing written
    (tmp_path / "A").mkdir()
    (tmp_path / "B").mkdir()
    (tmp_path / "A" / "case.nii.gz").write_bytes((runs["images"] / "thin_xy.nii.gz").read_bytes())
    nib.save(nib.load(str(runs["images"] / "thin_z.nii.gz")), str(tmp_path / "B" / "case.nii"))
    out = tmp_path / "out"
    assert main(["predict", str(runs["run0"]), str(tmp_path / "A"), str(tmp_path / "B"), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert str(tmp_path / "A" / "case.nii.gz") in err and str(tmp_path / "B" / "case.nii") in err
    assert not out.exists()
    # an existing output: kept unless --overwrite, and --overwrite never replaces a file beseg did not write
    assert main(["predict", str(runs["run0"]), str(scans), "--out", str(out)]) == 0
    written = tree_state(out)
    assert main(["predict", str(runs["run0"]), str(scans), "--out", str(out)]) == 1
    assert f"{out / 'ct.nii.gz'} exists already" in capsys.readouterr().err and tree_state(out) == written
    assert main(["predict", str(runs["run0"]), str(scans), "--out", str(out), "--overwrite"]) == 0
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.uint8), np.eye(4)), str(out / "ct.nii.gz"))
    theirs = tree_state(out)
    capsys.readouterr()
    assert main(["predict", str(runs["run0"]), str(scans), "--out", str(out), "--overwrite"]) == 1
    assert "is not a label map written by beseg" in capsys.readouterr().err and tree_state(out) == theirs


def test_export_overwrite_replaces_only_a_model_folder(runs, tmp_path, capsys):
    import shutil

    from conftest import tree_state

    run = tmp_path / "run"
    shutil.copytree(runs["run0"], run)
    before = tree_state(run)
    capsys.readouterr()
    # into the run's own folder (or a folder holding it): refused, nothing deleted
    for out in (run, tmp_path):
        assert main(["export", str(run), "--out", str(out), "--overwrite"]) == 1
        err = capsys.readouterr().err
        assert f"--out {out} holds the run {run}" in err and err.count("\n") == 1
        assert tree_state(run) == before
    # over a folder of the user's: refused, nothing deleted
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    assert main(["export", str(run), "--out", str(mine), "--overwrite"]) == 1
    assert "replaces only a model folder written by beseg export" in capsys.readouterr().err
    assert (mine / "notes.txt").read_text() == "keep me"
    # over an earlier export: replaced; a folder named like the old code's aside folder is left alone
    model = tmp_path / "model"
    assert main(["export", str(run), "--out", str(model)]) == 0
    (tmp_path / ".model.old").mkdir()
    (tmp_path / ".model.old" / "keep.txt").write_text("keep me")
    first = tree_state(model)
    assert main(["export", str(run), "--out", str(model), "--overwrite"]) == 0
    assert set(tree_state(model)) == set(first) and tree_state(model) != first
    assert (tmp_path / ".model.old" / "keep.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".model.old", "mine", "model", "run"]  # nothing aside left
    # a model folder with a file export did not write: not replaced
    (model / "calibration.csv").write_text("site,offset\n")
    capsys.readouterr()
    assert main(["export", str(run), "--out", str(model), "--overwrite"]) == 1
    assert "calibration.csv, which export did not write" in capsys.readouterr().err
    assert (model / "calibration.csv").exists() and tree_state(run) == before


def test_export_without_onnx_says_what_to_install(runs, tmp_path):
    from test_deploy import run_cli_without

    result = run_cli_without(("onnx", "onnxscript"), "beseg.cli",
                             ["export", str(runs["run0"]), "--out", str(tmp_path / "model")], tmp_path / "site")
    assert result.returncode == 1, result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert "beseg export needs onnx, onnxscript" in result.stderr and "pip install 'beseg[export]'" in result.stderr
    assert not (tmp_path / "model").exists()

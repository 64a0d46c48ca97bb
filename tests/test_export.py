"""`beseg export` and the ensembles and mirroring of `beseg predict`, on tiny phantom runs.

The equivalence tests run the exported folder with beseg-predict in a fresh interpreter whose torch
and monai imports are refused, and compare its label maps with `beseg predict`'s.
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
from test_deploy import oblique_affine, run_without_torch  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runs(tiny_phantom, tmp_path_factory) -> dict[str, Path]:
    """Two tiny spleen runs (seeds 0 and 1) and an oblique, anisotropic test image."""
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
    return {"run0": root / "run0", "run1": root / "run1", "images": images}


def labels_of(folder: Path) -> dict[str, nib.Nifti1Image]:
    return {p.name: nib.load(str(p)) for p in sorted(folder.glob("*.nii.gz"))}


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 1.0 if not a.any() and not b.any() else 2.0 * (a & b).sum() / (a.sum() + b.sum())


def deploy_without_torch(model: Path, images: Path, out: Path) -> None:
    result = run_without_torch(f"""
from beseg.deploy.cli import main
rc = main([{str(model)!r}, {str(images)!r}, "--out", {str(out)!r}, "--quiet"])
assert not [m for m in sys.modules if m.split(".")[0] in ("torch", "monai")]
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
    # a second export into the same folder is refused rather than mixed with the first
    capsys.readouterr()
    assert main(["export", str(runs["run0"]), "--out", str(model)]) == 1
    assert "already exists" in capsys.readouterr().err


def test_export_ensemble_with_mirroring_equals_beseg_predict(runs, tmp_path):
    model = tmp_path / "ens"
    assert main(["export", str(runs["run0"]), str(runs["run1"]), "--mirror", "--out", str(model)]) == 0
    spec = json.loads((model / "pipeline.json").read_text())
    assert [m["file"] for m in spec["members"]] == ["model-0.onnx", "model-1.onnx"] and spec["mirror_axes"] == [0, 1, 2]
    args = [str(runs["run0"]), str(runs["run1"]), str(runs["images"]), "--mirror"]
    assert main(["predict", *args, "--out", str(tmp_path / "torch")]) == 0
    deploy_without_torch(model, runs["images"], tmp_path / "onnx")
    assert_equivalent(tmp_path / "torch", tmp_path / "onnx", [0, 1])


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
    assert main(["predict", str(tmp_path / "run"), str(brain / "imagesTs"), "--out", str(tmp_path / "torch")]) == 0
    found = set().union(*(np.unique(np.asarray(i.dataobj)).tolist() for i in labels_of(tmp_path / "torch").values()))
    assert len(found) >= 3, found  # nested labels appear, so the comparison is not of empty maps
    deploy_without_torch(tmp_path / "model", brain / "imagesTs", tmp_path / "onnx")
    assert_equivalent(tmp_path / "torch", tmp_path / "onnx", [0, 1, 2, 3])

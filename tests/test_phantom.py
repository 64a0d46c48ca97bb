"""Tests for the phantom task folders: deterministic, MSD layout, pass the checker, load through the presets."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import ndimage

from beseg.cli import main
from beseg.data import build_task_data, check_task, load_task, make_phantom, phantom_case, preset_for_task
from beseg.errors import DataError

SMALL = dict(size=(40, 40, 12), cases=4, test_cases=1)


def test_phantom_is_deterministic_for_a_seed():
    a_img, a_lab = phantom_case("spleen", seed=1, index=2, size=(32, 32, 10))
    b_img, b_lab = phantom_case("spleen", seed=1, index=2, size=(32, 32, 10))
    np.testing.assert_array_equal(a_img, b_img)
    np.testing.assert_array_equal(a_lab, b_lab)
    c_img, _ = phantom_case("spleen", seed=2, index=2, size=(32, 32, 10))
    assert not np.array_equal(a_img, c_img)


def test_spleen_phantom_has_ct_intensities_and_a_touching_neighbour():
    image, label = phantom_case("spleen", seed=0, index=0)
    assert image.dtype == np.int16 and label.dtype == np.uint8 and image.shape == (96, 96, 32)
    organ = label == 1
    assert 2000 < organ.sum() < 0.2 * organ.size
    assert 90 < np.median(image[organ]) < 150 and image.min() < -900  # air outside the body
    # Just outside the organ, some voxels are about as bright as the organ: the neighbour touches it
    # (it is 25-40 HU darker by design, about two noise standard deviations).
    ring = ndimage.binary_dilation(organ, iterations=2) & ~organ
    assert np.mean(np.abs(image[ring].astype(float) - np.median(image[organ])) < 45) > 0.1


def test_brain_phantom_has_four_channels_and_nested_labels():
    image, label = phantom_case("brain", seed=0, index=1, size=(48, 48, 16))
    assert image.shape == (48, 48, 16, 4) and image.dtype == np.float32
    assert set(np.unique(label)) == {0, 1, 2, 3}
    assert np.all(image[label > 0] > 0)  # tumour lies inside the (non-zero) head
    assert np.any(image[..., 0] == 0)  # skull-stripped: zero background
    et = label == 3  # enhancing rim is brightest on T1gd
    assert image[..., 2][et].mean() > 1.3 * image[..., 2][label == 0][image[..., 2][label == 0] > 0].mean()


@pytest.mark.parametrize("task", ["spleen", "brain"])
def test_phantom_folder_passes_check_and_loads_through_its_preset(tmp_path, task):
    root = make_phantom(tmp_path / task, task=task, progress=False, **SMALL)
    meta = json.loads((root / "dataset.json").read_text())
    assert meta["numTraining"] == 4 and len(meta["test"]) == 1
    assert sorted(p.name for p in root.iterdir()) == ["dataset.json", "imagesTr", "imagesTs", "labelsTr"]
    report = check_task(root, progress=False)
    assert report.ok, report.all_problems
    assert report.cases[0].spacing == pytest.approx((0.8, 0.8, 2.5))
    preset = preset_for_task(load_task(root))
    assert preset.name == f"phantom_{task}"
    data = build_task_data(load_task(root), preset, cache_dir=tmp_path / "cache", patch_size=(16, 16, 16))
    patch = data.train[0][0]
    assert patch["image"].shape == (preset.in_channels, 16, 16, 16)
    assert patch["label"].shape[0] == (3 if task == "brain" else 1)
    # 40x40x12 voxels at 0.8x0.8x2.5 mm -> 1 mm isotropic
    assert data.val[0]["image"].shape[1:] == (32, 32, 28)


def test_phantom_refuses_to_overwrite(tmp_path):
    make_phantom(tmp_path / "p", progress=False, **SMALL)
    with pytest.raises(DataError, match="dataset.json: already exists"):
        make_phantom(tmp_path / "p", progress=False, **SMALL)
    with pytest.raises(ValueError, match="phantom task must be"):
        make_phantom(tmp_path / "q", task="liver", progress=False)


def test_cli_phantom_then_check(tmp_path, capsys):
    out = tmp_path / "ph"
    assert main(["data", "phantom", str(out), "--task", "brain", "--cases", "2", "--test-cases", "0",
                 "--size", "24", "24", "8", "--seed", "3"]) == 0
    assert "wrote brain phantom (2 training + 0 test cases)" in capsys.readouterr().out
    assert json.loads((out / "dataset.json").read_text())["beseg_phantom"]["seed"] == 3
    assert main(["data", "check", str(out)]) == 0
    assert "phantom_brain_001" in capsys.readouterr().out


def test_cli_phantom_like_the_real_archives(tmp_path, capsys, monkeypatch):
    import beseg.data.phantom as phantom_mod

    calls = []
    monkeypatch.setattr(phantom_mod, "make_phantom", lambda out, **kw: calls.append(kw) or out)
    assert main(["data", "phantom", str(tmp_path / "a"), "--like", "task09", "--cases", "1"]) == 0
    assert main(["data", "phantom", str(tmp_path / "b"), "--like", "task01", "--cases", "1"]) == 0
    assert [(c["task"], c["size"], c["spacing"]) for c in calls] == [
        ("spleen", (512, 512, 90), (0.79, 0.79, 5.0)), ("brain", (240, 240, 155), (1.0, 1.0, 1.0))]
    assert "of 240x240x155 voxels at 1x1x1 mm" in capsys.readouterr().out
    assert main(["data", "phantom", str(tmp_path / "c"), "--like", "task01", "--task", "spleen"]) == 1
    assert "--like task01 is a brain phantom" in capsys.readouterr().err


@pytest.mark.slow
def test_default_spleen_phantom_is_valid(tmp_path):
    root = make_phantom(tmp_path / "spleen", task="spleen", progress=False)
    report = check_task(root, progress=False)
    # 40 labelled cases: the README's first training command validates on 8 of them (data.val_frac 0.2)
    assert report.ok and len(report.cases) == 40 and report.test_images == 4


@pytest.mark.slow
def test_bench_data_smoke(capsys):
    from beseg.bench.data import run_data_benchmark

    res = run_data_benchmark(cases=5, patch_size=(16, 16, 16), workers=2, items=3, steps=1, baseline=True)
    assert res["patches_per_s[1]"] > 0 and res["patches_per_s[2]"] > 0 and res["baseline_patches_per_s[1]"] > 0
    assert res["worker_pss_mb[1]"] > 0 and res["worker_pss_mb[2]"] > 0  # read from the workers' /proc entries
    assert res["batches_per_step[1]"] == pytest.approx(res["patches_per_s[1]"] * res["step_s"] / 2)
    out = capsys.readouterr().out
    assert "1 worker(s) make" in out and "2 worker(s) make" in out and "as fast" in out

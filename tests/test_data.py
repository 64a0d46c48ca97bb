"""Tests for beseg.data: the MSD reader, splits, presets, intensity statistics, the checker and the CLI."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose

from beseg.cli import main
from beseg.data import (
    DatasetChangedError,
    DatasetIdentity,
    build_task_data,
    check_task,
    foreground_percentiles,
    get_preset,
    list_nifti,
    load_or_make_split,
    load_split,
    load_task,
    make_folds,
    make_split,
    msd_brats_regions,
    preset_for_task,
    reload_task,
    save_split,
)
from beseg.data import intensity as intensity_mod
from beseg.errors import DataError

SPLEEN_LABELS = {"0": "background", "1": "spleen"}


def write_nii(path: Path, array: np.ndarray, affine: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.eye(4) if affine is None else affine), str(path))
    return path


def make_task(root: Path, n: int = 3, shape=(8, 8, 6), channels: int = 1, labels=None, name="Spleen",
              rng_seed: int = 0, extra: dict | None = None) -> Path:
    """A tiny valid MSD task folder: images with a bright cube, labels marking it."""
    rng = np.random.default_rng(rng_seed)
    training = []
    for i in range(n):
        label = np.zeros(shape, np.uint8)
        label[2:5, 2:5, 1:4] = 1
        image = rng.normal(0, 1, shape + ((channels,) if channels > 1 else ())).astype(np.float32)
        image[label > 0] += 10
        write_nii(root / "imagesTr" / f"case_{i}.nii.gz", image)
        write_nii(root / "labelsTr" / f"case_{i}.nii.gz", label)
        training.append({"image": f"./imagesTr/case_{i}.nii.gz", "label": f"./labelsTr/case_{i}.nii.gz"})
    meta = {"name": name, "modality": {str(c): f"ch{c}" for c in range(channels)},
            "labels": labels or SPLEEN_LABELS, "numTraining": n, "training": training, "test": []}
    meta.update(extra or {})
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def edit_json(root: Path, fn) -> None:
    meta = json.loads((root / "dataset.json").read_text())
    fn(meta)
    (root / "dataset.json").write_text(json.dumps(meta))


# ---- MSD reader -----------------------------------------------------------------------------

def test_load_task_parses_paths_and_ignores_apple_double(tmp_path):
    root = make_task(tmp_path / "T")
    (root / "imagesTr" / "._case_0.nii.gz").write_bytes(b"\x00\x05\x16\x07 AppleDouble junk")
    (root / "labelsTr" / "._case_0.nii.gz").write_bytes(b"junk")
    task = load_task(root)
    assert [c.id for c in task.training] == ["case_0", "case_1", "case_2"]
    assert task.training[0].image == (root / "imagesTr" / "case_0.nii.gz").resolve()
    assert task.num_channels == 1 and task.labels == {0: "background", 1: "spleen"}
    assert [p.name for p in list_nifti(root / "imagesTr")] == ["case_0.nii.gz", "case_1.nii.gz", "case_2.nii.gz"]
    report = check_task(root, progress=False)
    assert report.ok, report.all_problems
    assert report.ignored == 2


def test_dataset_json_naming_apple_double_is_rejected(tmp_path):
    root = make_task(tmp_path / "T")
    edit_json(root, lambda m: m["training"][1].update(image="./imagesTr/._case_1.nii.gz"))
    with pytest.raises(DataError, match=r"training\[1\].*AppleDouble"):
        load_task(root)


@pytest.mark.parametrize("bad, expected", [
    ("../outside.nii.gz", "outside the task folder"),
    ("./imagesTr/../../outside.nii.gz", "outside the task folder"),
    ("/etc/passwd", "absolute path"),
])
def test_paths_escaping_the_folder_are_rejected(tmp_path, bad, expected):
    root = make_task(tmp_path / "T")
    edit_json(root, lambda m: m["training"][0].update(label=bad))
    with pytest.raises(DataError, match=expected) as err:
        load_task(root)
    assert "dataset.json" in str(err.value) and "training[0]" in str(err.value)


def test_symlink_escaping_the_folder_is_rejected(tmp_path):
    root = make_task(tmp_path / "T")
    outside = write_nii(tmp_path / "secret.nii.gz", np.zeros((8, 8, 6), np.uint8))
    (root / "labelsTr" / "case_0.nii.gz").unlink()
    os.symlink(outside, root / "labelsTr" / "case_0.nii.gz")
    with pytest.raises(DataError, match="outside the task folder"):
        load_task(root)


def test_missing_files_are_listed_in_one_error(tmp_path):
    root = make_task(tmp_path / "T")
    (root / "labelsTr" / "case_0.nii.gz").unlink()
    (root / "imagesTr" / "case_2.nii.gz").unlink()
    with pytest.raises(DataError) as err:
        load_task(root)
    msg = str(err.value)
    assert "2 listed file(s) missing" in msg
    assert "labelsTr/case_0.nii.gz" in msg and "imagesTr/case_2.nii.gz" in msg


@pytest.mark.parametrize("mutate, expected", [
    (lambda p: p.write_text("{not json"), "invalid JSON at line 1"),
    (lambda p: p.write_text("[1, 2]"), "top level must be a JSON object"),
    (lambda p: p.write_text(json.dumps({"name": "x", "modality": {"0": "CT"}, "labels": {"0": "bg"}})),
     "missing required key 'training'"),
    (lambda p: p.write_text(json.dumps({"name": "x", "modality": "CT", "labels": {"0": "bg"}, "training": []})),
     "key 'modality' must be dict, got str"),
    (lambda p: p.write_text(json.dumps({"name": "x", "modality": {"a": "CT"}, "labels": {"0": "bg"},
                                        "training": []})), "'modality' key 'a' is not an integer"),
    (lambda p: p.write_text(json.dumps({"name": "x", "modality": {"0": "CT"}, "labels": {"0": "bg"},
                                        "training": [3]})), r"training\[0\] must be an object"),
    (lambda p: p.write_bytes(b"\xff\xfe\x00"), "cannot read"),
])
def test_invalid_dataset_json_raises_data_error_only(tmp_path, mutate, expected):
    root = make_task(tmp_path / "T")
    mutate(root / "dataset.json")
    with pytest.raises(DataError, match=expected) as err:
        load_task(root)
    assert str(root / "dataset.json") in str(err.value)


def test_duplicate_cases_and_num_training_mismatch(tmp_path):
    root = make_task(tmp_path / "T")
    edit_json(root, lambda m: m["training"].append(dict(m["training"][0])))
    with pytest.raises(DataError, match=r"case 'case_0' is listed twice \(also training\[0\]\)"):
        load_task(root)
    root = make_task(tmp_path / "U", extra={"numTraining": 7})
    with pytest.raises(DataError, match="numTraining is 7 but 'training' lists 3 cases"):
        load_task(root)


def test_missing_folder_and_dataset_json(tmp_path):
    with pytest.raises(DataError, match="task folder not found"):
        load_task(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="must contain dataset.json"):
        load_task(tmp_path / "empty")


# ---- splits ----------------------------------------------------------------------------------

def test_split_is_seeded_three_way_and_disjoint():
    ids = [f"c{i}" for i in range(41)]
    a, b = make_split(ids, seed=3), make_split(list(reversed(ids)), seed=3)
    assert a == b and a.protocol == "heldout"
    assert make_split(ids, seed=4).test != a.test
    # defaults: 20 % test, 10 % validation of all cases, floor, at least 1
    assert (len(a.train), len(a.val), len(a.test)) == (29, 4, 8)
    assert sorted(a.train + a.val + a.test) == sorted(ids)
    assert not set(a.train) & set(a.val) and not set(a.train) & set(a.test) and not set(a.val) & set(a.test)
    tiny = make_split([f"c{i}" for i in range(5)])
    assert (len(tiny.train), len(tiny.val), len(tiny.test)) == (3, 1, 1)
    assert len(make_split([f"c{i}" for i in range(100)], test_frac=0.29).test) == 29  # 0.29 * 100 is 28.999...
    assert len(make_split(ids, n_test=16, n_val=4).test) == 16
    with pytest.raises(ValueError, match="val_frac"):
        make_split(ids, val_frac=1.5)
    with pytest.raises(ValueError, match="test_frac"):
        make_split(ids, test_frac=-0.1)
    with pytest.raises(ValueError, match="leave no training case"):
        make_split(ids[:3], n_test=2, n_val=1)


def test_two_way_split_has_paper_sizes_and_the_same_validation_cases():
    ids = [f"c{i}" for i in range(41)]
    paper = make_split(ids, val_frac=0.2, test_frac=0, seed=3)
    assert paper.protocol == "paper" and paper.test == [] and (len(paper.train), len(paper.val)) == (33, 8)
    spleen, brain = get_preset("task09"), get_preset("task01")
    assert spleen.default_val_count(41) == 9 and brain.default_val_count(484) == 96
    assert spleen.default_val_count(40) is None
    assert len(make_split([f"c{i}" for i in range(484)], n_val=96, test_frac=0).train) == 388
    # The same cases as the two-way splits made before test sets existed: the first n_val of the seeded permutation.
    order = np.random.default_rng(3).permutation(41)
    assert paper.val == sorted(sorted(ids)[i] for i in order[:8])


def test_folds_test_every_case_exactly_once():
    ids = [f"c{i}" for i in range(23)]
    folds = make_folds(ids, 5, seed=2)
    assert [f.fold for f in folds] == list(range(5)) and {f.folds for f in folds} == {5}
    assert {f.protocol for f in folds} == {"cv"}
    tested = [c for f in folds for c in f.test]
    assert sorted(tested) == sorted(ids)  # each case once
    assert sorted(len(f.test) for f in folds) == [4, 4, 5, 5, 5]
    for f in folds:
        assert len(f.val) == 2  # floor(0.1 * 23)
        assert sorted(f.train + f.val + f.test) == sorted(ids)
        assert not (set(f.train) | set(f.val)) & set(f.test) and not set(f.train) & set(f.val)
    assert make_folds(list(reversed(ids)), 5, seed=2) == folds
    assert make_folds(ids, 5, seed=3) != folds
    with pytest.raises(ValueError, match="folds must be an integer >= 2"):
        make_folds(ids, 1)
    assert [len(f.train) for f in make_folds(ids[:3], 3)] == [1, 1, 1]  # 1 test, 1 validation, 1 training case
    with pytest.raises(ValueError, match="too few for 2 folds"):
        make_folds(ids[:2], 2)


def test_split_file_roundtrip_and_validation(tmp_path):
    ids = [f"c{i}" for i in range(10)]
    path = save_split(make_split(ids, seed=1), tmp_path / "s" / "split.json")
    assert json.loads(path.read_text())["test"] == make_split(ids, seed=1).test
    assert load_split(path, known_ids=ids) == make_split(ids, seed=1)
    assert [p.name for p in path.parent.iterdir()] == ["split.json"]  # no temporary file left
    # An existing split file wins over new arguments: every loss sees the same cases.
    assert load_or_make_split(path, ids, seed=99, test_frac=0.5) == make_split(ids, seed=1)
    fold = save_split(make_folds(ids, 3)[2], tmp_path / "fold2.json")
    assert load_split(fold) == make_folds(ids, 3)[2]
    with pytest.raises(DataError, match=r"split.json: case ids not in the task's dataset.json: c0"):
        load_split(path, known_ids=ids[1:])
    for raw, message in [
        ({"train": ["a", "b"], "val": ["b"]}, "cases in both train and val: b"),
        ({"train": ["a"], "val": ["b"], "test": ["a"]}, "cases in both train and test: a"),
        ({"train": ["a"], "val": ["b"], "test": "c"}, "'test' must be a list of case id strings"),
        ({"train": ["a"], "val": ["b"], "test": ["c"], "fold": 3, "folds": 3}, "0 <= fold < folds"),
    ]:
        path.write_text(json.dumps(raw))
        with pytest.raises(DataError, match=message):
            load_split(path)
    path.write_text("{")
    with pytest.raises(DataError, match="cannot read split file"):
        load_split(path)


def test_a_two_way_split_file_is_the_paper_protocol_never_a_held_out_one(tmp_path):
    ids = [f"c{i}" for i in range(10)]
    path = tmp_path / "split.json"
    # A file from before test sets existed: no "test" key.
    path.write_text(json.dumps({"seed": 0, "val_frac": 0.2, "train": ids[2:], "val": ids[:2]}))
    old = load_split(path, known_ids=ids)
    assert old.test == [] and old.protocol == "paper"
    with pytest.raises(DataError, match="two-way train/val split with no 'test' cases.*data.test_frac is 0.2"):
        load_or_make_split(path, ids)
    assert load_or_make_split(path, ids, test_frac=0) == old  # the paper protocol, asked for explicitly


# ---- presets: the paper's normalisation and label conversion --------------------------------

def test_task09_foreground_percentile_normalisation(tmp_path):
    # Foreground holds 0..100 (101 voxels), so the 5th/95th percentiles are exactly 5 and 95.
    shape = (11, 11, 11)
    image = np.full(shape, -500.0, np.float32)
    label = np.zeros(shape, np.uint8)
    flat_idx = np.arange(101)
    image.reshape(-1)[flat_idx] = np.arange(101, dtype=np.float32)
    label.reshape(-1)[flat_idx] = 1
    image.reshape(-1)[200] = 50.0  # background voxel inside the range
    image.reshape(-1)[201] = 1000.0  # above the range -> clipped to 1
    root = tmp_path / "T"
    write_nii(root / "imagesTr" / "a.nii.gz", image)
    write_nii(root / "labelsTr" / "a.nii.gz", label)
    (root / "dataset.json").write_text(json.dumps({
        "name": "Spleen", "modality": {"0": "CT"}, "labels": SPLEEN_LABELS, "numTraining": 1,
        "training": [{"image": "./imagesTr/a.nii.gz", "label": "./labelsTr/a.nii.gz"}]}))
    task = load_task(root)
    stats = foreground_percentiles(task.training, tmp_path / "cache")
    assert (stats.low, stats.high, stats.num_voxels) == (5.0, 95.0, 101)
    out = get_preset("task09").val_transforms(stats)(task.training[0].as_dict())
    img = out["image"].numpy().reshape(-1)  # 1 mm identity affine: no resampling, same voxel order
    assert out["image"].shape == (1, 11, 11, 11) and out["label"].shape == (1, 11, 11, 11)
    assert img[50] == pytest.approx(0.5) and img[5] == pytest.approx(0.0) and img[95] == pytest.approx(1.0)
    assert img[200] == pytest.approx(0.5) and img[201] == 1.0 and img[300] == 0.0


def test_foreground_percentiles_are_cached_and_invalidated(tmp_path, monkeypatch):
    root = make_task(tmp_path / "T")
    task = load_task(root)
    first = foreground_percentiles(task.training, tmp_path / "cache")
    assert (tmp_path / "cache" / "intensity_stats.json").is_file()

    def boom(*a, **k):
        raise AssertionError("recomputed although cached")

    monkeypatch.setattr(intensity_mod, "_compute", boom)
    assert foreground_percentiles(task.training, tmp_path / "cache") == first
    monkeypatch.undo()
    write_nii(task.training[0].image, np.full((8, 8, 6), 7.0, np.float32))  # data changed: recompute
    assert foreground_percentiles(task.training, tmp_path / "cache") != first


def test_msd_brats_region_conversion():
    label = np.array([0, 1, 2, 3], np.uint8).reshape(1, 4, 1, 1)
    regions = msd_brats_regions(label)
    assert regions.shape == (3, 4, 1, 1)
    # channels (TC, WT, ET); MSD 1 = edema, 2 = non-enhancing tumour, 3 = enhancing tumour
    np.testing.assert_array_equal(regions[:, :, 0, 0], [[0, 0, 1, 1], [0, 1, 1, 1], [0, 0, 0, 1]])
    assert torch.equal(msd_brats_regions(torch.as_tensor(label)), torch.as_tensor(regions))


def test_task01_preset_regions_and_nonzero_zscore(tmp_path):
    root = tmp_path / "T"
    shape = (6, 6, 6)
    image = np.zeros(shape + (4,), np.float32)
    image[1:5, 1:5, 1:5, :] = np.random.default_rng(0).uniform(1, 5, (4, 4, 4, 4)) * [1, 10, 100, 1000]
    label = np.zeros(shape, np.uint8)
    label[1:5, 1:5, 1:5] = 1
    label[2:4, 2:4, 2:4] = 2
    label[2, 2, 2] = 3
    write_nii(root / "imagesTr" / "b.nii.gz", image)
    write_nii(root / "labelsTr" / "b.nii.gz", label)
    (root / "dataset.json").write_text(json.dumps({
        "name": "BrainTumour", "modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"},
        "labels": {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"},
        "training": [{"image": "./imagesTr/b.nii.gz", "label": "./labelsTr/b.nii.gz"}]}))
    task = load_task(root)
    preset = preset_for_task(task)
    assert preset.name == "task01" and preset.out_channels == 3 and preset.activation == "sigmoid"
    out = Compose(preset.deterministic_transforms())(task.training[0].as_dict())  # the training chain's prefix
    img, lab = out["image"].numpy(), out["label"].numpy()
    assert img.shape == (4, 6, 6, 6) and lab.shape == (3, 6, 6, 6)
    val = preset.val_transforms()(task.training[0].as_dict())  # validation: the label map itself
    np.testing.assert_array_equal(val["label"].numpy()[0], label)
    np.testing.assert_array_equal(val["image"].numpy(), img)
    nz = image[..., 0] != 0
    for c in range(4):  # zero mean, unit variance over the non-zero voxels of each channel; zeros stay 0
        assert img[c][nz].mean() == pytest.approx(0.0, abs=1e-5)
        assert img[c][nz].std() == pytest.approx(1.0, abs=1e-3)
        assert np.all(img[c][~nz] == 0)
    assert lab[0].sum() == 8 and lab[1].sum() == 64 and lab[2].sum() == 1  # TC, WT, ET


@pytest.mark.filterwarnings("ignore:Num foregrounds:UserWarning")  # neg=0 on purpose
def test_train_transforms_pad_sample_and_augment(tmp_path):
    root = make_task(tmp_path / "T", n=2)
    task = load_task(root)
    stats = foreground_percentiles(task.training, None)
    preset = get_preset("phantom-spleen")
    tr = preset.train_transforms(patch_size=(10, 10, 4), stats=stats, pos=1, neg=0, num_samples=3)
    tr.set_random_state(0)
    patches = tr(task.training[0].as_dict())
    assert len(patches) == 3
    for p in patches:
        # 8x8x6 volume padded to 10x10x6, patch 10x10x4; pos-only sampling always hits the cube
        assert p["image"].shape == (1, 10, 10, 4) and p["label"].shape == (1, 10, 10, 4)
        assert p["label"].dtype == torch.float32 and p["label"].sum() > 0
        assert not isinstance(p["image"], MetaTensor)


def test_infer_transforms_invert_to_original_geometry(tmp_path):
    root = make_task(tmp_path / "T", n=2)
    affine = np.diag([-0.8, -0.8, 2.5, 1.0])  # anisotropic, LPS-like: reorient + resample
    image = np.random.default_rng(0).normal(size=(20, 20, 6)).astype(np.float32)
    write_nii(root / "imagesTs" / "t.nii.gz", image, affine)
    task = load_task(root)
    preset = get_preset("task09")
    infer = preset.infer_transforms(foreground_percentiles(task.training, None))
    data = infer({"image": str(root / "imagesTs" / "t.nii.gz")})
    assert data["image"].shape == (1, 16, 16, 14)  # 1 mm isotropic: MONAI keeps (n - 1) * spacing + 1
    data["pred"] = MetaTensor(torch.rand(2, *data["image"].shape[1:]), affine=data["image"].affine)
    back = preset.inverter(infer)(data)
    assert back["pred"].shape == (2, 20, 20, 6)
    np.testing.assert_allclose(back["pred"].affine.numpy(), affine, atol=1e-5)


def test_build_task_data_end_to_end(tmp_path):
    root = make_task(tmp_path / "T", n=5)
    data = build_task_data(load_task(root), get_preset("phantom-spleen"), cache_dir=tmp_path / "cache",
                           patch_size=(8, 8, 4))
    assert (len(data.split.train), len(data.split.val), len(data.split.test)) == (3, 1, 1)
    assert (tmp_path / "cache" / "split.json").is_file()
    # The held-out case is in neither dataset.
    assert sorted(d["id"] for d in data.train.data) == data.split.train
    assert [d["id"] for d in data.val.data] == data.split.val
    assert data.out_channels == 2 and data.activation == "softmax"
    sample = data.train[0][0]
    assert sample["image"].shape == (1, 8, 8, 4)
    assert data.val[0]["image"].shape == (1, 8, 8, 6)
    memory = build_task_data(load_task(root), get_preset("phantom-spleen"), cache_dir=tmp_path / "cache",
                             patch_size=(8, 8, 4), cache="memory")
    assert memory.split == data.split and memory.train[1][0]["image"].shape == (1, 8, 8, 4)
    np.testing.assert_allclose(np.asarray(memory.val[0]["image"]), data.val[0]["image"].numpy(), atol=1e-6)
    assert data.store is not None and data.store.root.parent == tmp_path / "cache"
    disk = build_task_data(load_task(root), get_preset("phantom-spleen"), cache_dir=tmp_path / "cache",
                           patch_size=(8, 8, 4), cache="disk")  # the old name of the store
    assert disk.store is not None and disk.store.root == data.store.root
    assert not (tmp_path / "cache" / "persistent").exists()


def test_preset_validation_and_lookup(tmp_path):
    task = load_task(make_task(tmp_path / "T", channels=2, name="Prostate"))
    with pytest.raises(DataError, match=r"preset 'task09' expects 1 image channel\(s\), 'modality' declares 2"):
        get_preset("task09").validate(task)
    with pytest.raises(DataError, match="cannot tell the task preset"):
        preset_for_task(task)
    with pytest.raises(ValueError, match="unknown task preset 'task42'"):
        get_preset("task42")
    assert get_preset("PHANTOM-BRAIN").label_mode == "brats_regions"


# ---- checker ---------------------------------------------------------------------------------

def test_check_reports_every_problem_with_file_names(tmp_path):
    root = make_task(tmp_path / "T", n=6)
    img = lambda i: root / "imagesTr" / f"case_{i}.nii.gz"  # noqa: E731
    lab = lambda i: root / "labelsTr" / f"case_{i}.nii.gz"  # noqa: E731
    write_nii(lab(0), np.zeros((8, 8, 5), np.uint8))  # shape mismatch
    nan = np.zeros((8, 8, 6), np.float32)
    nan[0, 0, 0], nan[1, 0, 0] = np.nan, np.inf
    write_nii(img(1), nan)  # NaN and Inf
    bad = np.zeros((8, 8, 6), np.uint8)
    bad[0, 0, 0] = 7
    write_nii(lab(2), bad)  # undeclared label
    half = np.zeros((8, 8, 6), np.float32)
    half[0, 0, 0] = 0.5
    write_nii(lab(3), half)  # non-integer label
    write_nii(lab(4), np.zeros((8, 8, 6), np.uint8), np.diag([2.0, 1, 1, 1]))  # affine mismatch
    img(5).unlink()  # missing
    report = check_task(root, progress=False)
    probs = report.all_problems
    assert not report.ok and len(probs) == 6
    expected = [
        (lab(0), "shape (8, 8, 5) does not match image shape (8, 8, 6)"),
        (img(1), "1 NaN and 1 Inf voxel(s)"),
        (lab(2), "label values [7] are not declared"),
        (lab(3), "non-integer label values, e.g. 0.5"),
        (lab(4), "affine differs from the image's by up to 1"),
        (img(5), "file not found"),
    ]
    for path, text in expected:
        assert any(str(path.resolve()) in p and text in p for p in probs), (text, probs)
    with pytest.raises(DataError, match="6 problem"):
        report.raise_for_problems()


def _five_bad_cases(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A task of six cases, five of them bad in five ways; returns the folder and case -> expected problem."""
    root = make_task(tmp_path / "T", n=6)
    write_nii(root / "labelsTr" / "case_0.nii.gz", np.zeros((8, 8, 5), np.uint8))
    nan = np.zeros((8, 8, 6), np.float32)
    nan[3, 3, 3] = np.nan
    write_nii(root / "imagesTr" / "case_1.nii.gz", nan)
    undeclared = np.zeros((8, 8, 6), np.uint8)
    undeclared[0, 0, 0] = 4
    write_nii(root / "labelsTr" / "case_2.nii.gz", undeclared)
    (root / "imagesTr" / "case_3.nii.gz").unlink()
    # A valid label outside the folder, with a value that would be reported if it were ever read.
    write_nii(tmp_path / "outside.nii.gz", np.full((8, 8, 6), 9, np.uint8))
    edit_json(root, lambda m: m["training"][4].update(label="../outside.nii.gz"))
    return root, {
        "case_0": "shape (8, 8, 5) does not match image shape (8, 8, 6)",
        "case_1": "1 NaN and 0 Inf voxel(s)",
        "case_2": "label values [4] are not declared",
        "case_3": "case_3.nii.gz: file not found",
        "case_4": "training[4]: path '../outside.nii.gz' resolves to",
    }


def test_check_lists_every_problem_of_every_case_path_escapes_included(tmp_path):
    root, expected = _five_bad_cases(tmp_path)
    report = check_task(root, progress=False)
    assert report.bad_cases == list(expected)
    by_case = {c.id: c.problems for c in report.cases}
    for case, problem in expected.items():
        assert len(by_case[case]) == 1 and problem in by_case[case][0], (case, by_case[case])
    assert "outside the task folder" in by_case["case_4"][0]
    assert not any("[9]" in p for p in report.all_problems)  # the escaping file was never read
    assert by_case["case_5"] == [] and report.problems == []
    # The image of the entry with the escaping label is still checked.
    write_nii(root / "imagesTr" / "case_4.nii.gz", np.full((8, 8, 6), np.inf, np.float32))
    assert any("case_4.nii.gz: 0 NaN and 384 Inf" in p for p in check_task(root, progress=False).cases[4].problems)


def test_cli_check_and_train_name_all_five_bad_cases(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("BESEG_CACHE_DIR", str(tmp_path / "cache"))
    root, expected = _five_bad_cases(tmp_path)
    assert main(["data", "check", str(root)]) == 1
    out = capsys.readouterr().out
    assert "FAILED: 5 problem(s):" in out
    for case, problem in expected.items():
        assert any(problem in line for line in out.splitlines()), (case, out)
        assert any(line.startswith(case) and "1 problem(s)" in line for line in out.splitlines()), (case, out)
    run = tmp_path / "run"
    argv = ["train", "phantom_spleen_segresnet_dice", "--data", str(root), "--out", str(run), "--no-progress"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "5 problem(s) in 5 case(s) (case_0, case_1, case_2, case_3, case_4)" in err
    assert all(problem in err for problem in expected.values())
    assert not (run / "checkpoints").exists()


def test_load_task_names_every_bad_entry_in_one_error(tmp_path):
    root = make_task(tmp_path / "T", n=4)
    edit_json(root, lambda m: (m["training"][0].update(label="/etc/passwd"), m["training"][2].pop("image"),
                               m["training"].append(dict(m["training"][1])), m.update(numTraining=5)))
    with pytest.raises(DataError) as err:
        load_task(root)
    msg = str(err.value)
    assert msg.startswith(f"{root.resolve() / 'dataset.json'}: 3 problems: ")
    assert "training[0]: absolute path '/etc/passwd'" in msg and "training[2]: missing required key 'image'" in msg
    assert "training[4]: case 'case_1' is listed twice (also training[1])" in msg


def test_check_corrupt_and_wrong_channel_files(tmp_path):
    root = make_task(tmp_path / "T", n=3, channels=2)
    (root / "imagesTr" / "case_0.nii.gz").write_bytes(b"")
    (root / "imagesTr" / "case_1.nii.gz").write_bytes(b"this is not nifti")
    write_nii(root / "imagesTr" / "case_2.nii.gz", np.zeros((8, 8, 6), np.float32))
    probs = check_task(root, progress=False).all_problems
    assert any("case_0.nii.gz: file is empty" in p for p in probs)
    assert any("case_1.nii.gz: not a readable NIfTI file" in p for p in probs)
    assert any("case_2.nii.gz: 1 channel(s) but dataset.json 'modality' declares 2" in p for p in probs)


# --------------------------------------------------------------------------- the task's identity


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_loaded_task_knows_the_bytes_it_was_parsed_from_and_its_cases(tmp_path):
    root = make_task(tmp_path / "Task09_Spleen", n=3, extra={"test": ["./imagesTs/t_0.nii.gz"]})
    write_nii(root / "imagesTs" / "t_0.nii.gz", np.zeros((8, 8, 6), np.float32))
    digest = _sha(root / "dataset.json")
    task = load_task(root)
    assert task.identity == DatasetIdentity(root.resolve(), digest, ("case_0", "case_1", "case_2"),
                                            ("imagesTs/t_0.nii.gz",))
    assert task.meta["numTraining"] == 3  # the whole parsed file travels with the task
    assert DatasetIdentity.from_dict(json.loads(json.dumps(task.identity.to_dict()))) == task.identity
    # Recorded when the file was read, not looked up again: an edit afterwards does not change the object.
    edit_json(root, lambda m: m.update(description="edited"))
    assert task.sha256 == digest and load_task(root).sha256 == _sha(root / "dataset.json") != digest


def _add_case(root: Path, meta: dict) -> None:
    for sub in ("imagesTr", "labelsTr"):
        shutil.copy(root / sub / "case_0.nii.gz", root / sub / "case_9.nii.gz")
    meta["training"].append({"image": "./imagesTr/case_9.nii.gz", "label": "./labelsTr/case_9.nii.gz"})
    meta["numTraining"] += 1


def _drop_case(root: Path, meta: dict) -> None:
    meta["training"].pop(1)
    meta["numTraining"] -= 1


def _other_label(root: Path, meta: dict) -> None:
    shutil.copy(root / "labelsTr" / "case_0.nii.gz", root / "labelsTr" / "other.nii.gz")
    meta["training"][0]["label"] = "./labelsTr/other.nii.gz"


@pytest.mark.parametrize("edit, change", [
    (_add_case, "3 -> 4 training cases (added case_9)"),
    (_drop_case, "3 -> 2 training cases (removed case_1)"),
    (_other_label, "the same cases, other content (a path, a label or another key)"),
])
def test_reload_task_refuses_a_dataset_json_changed_since_the_identity_naming_what_changed(tmp_path, edit, change):
    root = make_task(tmp_path / "Task09_Spleen", n=3)
    identity = load_task(root).identity
    assert reload_task(identity) == load_task(root)  # unchanged: the same task
    before = _sha(root / "dataset.json")
    edit_json(root, lambda meta: edit(root, meta))
    with pytest.raises(DatasetChangedError) as info:
        reload_task(identity)
    after = _sha(root / "dataset.json")
    expected = f"Task09_Spleen/dataset.json: {change}, SHA-256 {before[:12]}... -> {after[:12]}..."
    assert str(info.value) == info.value.change == expected
    assert identity.changes(load_task(root).identity) == expected


def test_cli_data_check(tmp_path, capsys):
    root = make_task(tmp_path / "T")
    assert main(["data", "check", str(root)]) == 0
    out = capsys.readouterr().out
    assert "case_0" in out and "8x8x6" in out and "1.00x1.00x1.00" in out and "OK: no problems found" in out
    write_nii(root / "labelsTr" / "case_1.nii.gz", np.full((8, 8, 6), 9, np.uint8))
    assert main(["data", "check", str(root)]) == 1
    out = capsys.readouterr().out
    assert "FAILED: 1 problem(s)" in out and "case_1.nii.gz: label values [9] are not declared" in out
    assert main(["data", "check", str(tmp_path / "missing")]) == 1
    assert "task folder not found" in capsys.readouterr().out


def test_cli_errors_are_one_line(tmp_path, capsys):
    root = make_task(tmp_path / "T")
    assert main(["data", "phantom", str(root), "--cases", "2"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "dataset.json: already exists" in err and "Traceback" not in err


def test_require_valid_task_remembers_a_pass_until_a_file_changes(tmp_path, monkeypatch):
    import beseg.data.check as check_module
    from beseg.data import make_phantom, require_valid_task

    root = make_phantom(tmp_path / "ph", cases=2, test_cases=0, size=(12, 12, 8), progress=False)
    calls = []
    real = check_module._check_files
    monkeypatch.setattr(check_module, "_check_files", lambda *a, **k: calls.append(1) or real(*a, **k))
    task = load_task(root)
    require_valid_task(task, tmp_path / "cache")
    require_valid_task(task, tmp_path / "cache")
    assert len(calls) == 1  # the second call trusts the recorded pass
    image = root / "imagesTr" / "phantom_spleen_000.nii.gz"
    image.write_bytes(image.read_bytes()[:200])  # truncated: size and mtime change
    with pytest.raises(DataError, match="phantom_spleen_000.nii.gz"):
        require_valid_task(task, tmp_path / "cache")
    assert len(calls) == 2


# --------------------------------------------------------------------------- NIfTI geometry and the shared input check


def _nifti(path: Path, array: np.ndarray, affine: np.ndarray, edit=None) -> Path:
    img = nib.Nifti1Image(array, affine)
    if edit is not None:
        edit(img)
    nib.save(img, str(path))
    return path


def test_spacing_is_the_affines_column_lengths_and_a_disagreeing_pixdim_is_named(tmp_path):
    import warnings

    from beseg.data.nifti import read_header

    a, b = np.deg2rad(25.0), np.deg2rad(10.0)
    rot = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]]) @ \
        np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag([0.8, 0.9, 2.5])
    path = _nifti(tmp_path / "oblique.nii.gz", np.zeros((4, 5, 6), np.uint8), affine)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # pixdim agrees with this affine: no warning
        header = read_header(path)
    assert header.spacing == pytest.approx((0.8, 0.9, 2.5), rel=1e-6)
    bad = _nifti(tmp_path / "pixdim.nii.gz", np.zeros((4, 5, 6), np.uint8), affine,
                 lambda img: img.header.set_zooms((1.0, 1.0, 1.0)))
    with pytest.warns(UserWarning, match=r"pixdim\.nii\.gz: pixdim says 1 x 1 x 1 mm .*0\.8 x 0\.9 x 2\.5 mm"):
        assert read_header(bad).spacing == pytest.approx((0.8, 0.9, 2.5), rel=1e-6)


def test_micrometre_and_metre_headers_are_read_in_mm(tmp_path):
    from beseg.data.nifti import read_header

    for unit, scale in (("micron", 1000.0), ("meter", 1e-3), ("mm", 1.0), ("unknown", 1.0)):
        affine = np.diag([0.8 * scale, 0.8 * scale, 2.5 * scale, 1.0])
        affine[:3, 3] = [10 * scale, -20 * scale, 5 * scale]
        path = _nifti(tmp_path / f"{unit}.nii.gz", np.zeros((3, 3, 3), np.uint8), affine,
                      lambda img, u=unit: img.header.set_xyzt_units(u))
        header = read_header(path)
        assert header.spacing == pytest.approx((0.8, 0.8, 2.5), rel=1e-6), unit
        assert header.affine[:3, 3] == pytest.approx([10.0, -20.0, 5.0], rel=1e-6), unit


def test_the_shared_input_check_names_the_file(tmp_path):
    from beseg.data.nifti import check_same_grid, read_header, read_image_header, read_label_map

    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    labels = _nifti(tmp_path / "labels.nii.gz", np.eye(4, dtype=np.uint8)[..., None].repeat(3, 2), affine)
    flat = _nifti(tmp_path / "flat.nii.gz", np.eye(4, dtype=np.int16), affine)  # a 2D label map is fine
    soft = _nifti(tmp_path / "soft.nii.gz", np.full((4, 4, 3), 0.5, np.float32), affine)
    moved = affine.copy()
    moved[0, 3] = 0.01
    other = _nifti(tmp_path / "other.nii.gz", np.zeros((4, 4, 3), np.uint8), moved)
    assert read_label_map(labels)[0].shape == (4, 4, 3) and read_label_map(flat)[0].shape == (4, 4)
    with pytest.raises(DataError, match=r"soft\.nii\.gz: prediction holds non-integer values"):
        read_label_map(soft, "prediction")
    with pytest.raises(DataError, match=r"other\.nii\.gz: prediction and its label .*labels\.nii\.gz have different "
                                        r"affines \(largest difference 0\.01 mm"):
        check_same_grid(read_header(other), read_header(labels))
    check_same_grid(read_header(other), read_header(labels), affine_tol_mm=0.02)
    with pytest.raises(DataError, match=r"flat\.nii\.gz: prediction has shape \(4, 4\), its label"):
        check_same_grid(read_header(flat, allow_2d=True), read_header(labels))
    with pytest.raises(DataError, match=r"flat\.nii\.gz: shape \(4, 4\) does not fit task x \(1 channel"):
        read_image_header(flat, 1, "task x")
    with pytest.raises(DataError, match=r"flat\.nii\.gz: expected a 3D or 4D image, got 2D"):
        read_header(flat)

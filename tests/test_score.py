"""Tests of beseg.score and ``beseg score``: CT-like oblique geometry, case matching, failures, classes, reports."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from beseg.cli import main
from beseg.data import make_phantom
from beseg.errors import DataError, ReportError
from beseg.report import default_names
from beseg.score import classes_from_dataset_json, score_predictions, summarize

#: per_case.csv's header, typed here (the same file `beseg evaluate` writes).
HEADER = "case,class,dice,hd95_mm,asd_mm,nsd,empty_in,dim"


def _oblique_lps_affine(spacing: tuple[float, float, float]) -> np.ndarray:
    """A CT-like voxel-to-RAS affine: LPS axes (x, y flipped), rotated 20° about z and 8° about x, anisotropic."""
    a, b = np.deg2rad(20.0), np.deg2rad(8.0)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    affine = np.eye(4)
    affine[:3, :3] = np.diag([-1.0, -1.0, 1.0]) @ rz @ rx @ np.diag(spacing)
    affine[:3, 3] = [171.3, 140.9, -402.5]
    return affine


def _save(path: Path, array: np.ndarray, affine: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return path


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _reference_hd95(pred: np.ndarray, gt: np.ndarray, spacing) -> float:
    """HD95 (mm) from boundary voxels and scipy's Euclidean distance transform, independent of MONAI."""
    def edges(m):
        return m & ~ndimage.binary_erosion(m)

    ep, eg = edges(pred), edges(gt)
    d_pg = ndimage.distance_transform_edt(~eg, sampling=spacing)[ep]
    d_gp = ndimage.distance_transform_edt(~ep, sampling=spacing)[eg]
    return float(max(np.percentile(d_pg, 95), np.percentile(d_gp, 95)))


SPACING = (0.79, 0.79, 2.5)


@pytest.fixture(scope="module")
def ct(tmp_path_factory) -> dict:
    """Phantom spleen labels on an oblique LPS grid (0.79 x 0.79 x 2.5 mm), and two prediction folders.

    ``A`` is the label dilated in-plane on every case and empty on case 0 (a missed spleen); ``B``
    is the label shifted by one voxel. nnU-Net-like folder names, so the default names are tested.
    """
    tmp = tmp_path_factory.mktemp("ct")
    phantom = make_phantom(tmp / "phantom", cases=4, test_cases=0, size=(48, 44, 14), progress=False)
    affine = _oblique_lps_affine(SPACING)
    root = tmp / "Dataset009_Spleen"
    labels, a, b = {}, {}, {}
    for path in sorted((phantom / "labelsTr").glob("*.nii.gz")):
        label = np.asarray(nib.load(str(path)).dataobj).astype(np.uint8)
        case = path.name[: -len(".nii.gz")]
        labels[case] = label
        a[case] = ndimage.binary_dilation(label > 0, np.ones((3, 3, 1), bool)).astype(np.uint8)
        if case.endswith("000"):
            a[case][:] = 0
        b[case] = np.roll(label, 1, axis=0)
        _save(root / "labelsTr" / path.name, label, affine)
        image = np.asarray(nib.load(str(phantom / "imagesTr" / path.name)).dataobj)
        _save(root / "imagesTr" / f"{case}_0000.nii.gz", image, affine)  # nnU-Net's image names
    results = tmp / "nnUNet_results" / "Dataset009_Spleen"
    dirs = {}
    for trainer, preds in (("nnUNetTrainer", a), ("nnUNetTrainerBE", b)):
        folder = results / f"{trainer}__nnUNetPlans__3d_fullres" / "fold_0" / "validation"
        for case, pred in preds.items():
            _save(folder / f"{case}.nii.gz", pred, affine)
        (folder / "summary.json").write_text("{}")  # nnU-Net's own files beside the predictions are ignored
        dirs[trainer] = folder
    (root / "dataset.json").write_text(json.dumps({"name": "Dataset009_Spleen", "labels": {"background": 0, "spleen": 1},
                                                   "channel_names": {"0": "CT"}, "file_ending": ".nii.gz"}))
    return {"root": root, "labels": labels, "A": a, "B": b, "dirs": dirs, "affine": affine}


# --------------------------------------------------------------------------- numbers


def test_scores_match_independent_numpy_on_oblique_lps_geometry(ct, tmp_path):
    result = score_predictions(ct["dirs"]["nnUNetTrainerBE"], ct["root"] / "labelsTr", tmp_path, workers=1,
                               progress=False)
    assert (tmp_path / "per_case.csv").read_text().splitlines()[0] == HEADER
    rows = {r["case"]: r for r in _rows(tmp_path / "per_case.csv")}
    assert sorted(rows) == sorted(ct["labels"]) and result.ok
    spacing = np.linalg.norm(ct["affine"][:3, :3], axis=0)  # the voxel size, from the geometry itself
    for case, label in ct["labels"].items():
        p, y = ct["B"][case] > 0, label > 0
        assert float(rows[case]["dice"]) == pytest.approx(2 * (p & y).sum() / (p.sum() + y.sum()), abs=1e-4)
        assert float(rows[case]["hd95_mm"]) == pytest.approx(_reference_hd95(p, y, spacing), rel=1e-4)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["classes"] == ["spleen"] and summary["classes_from"].endswith("dataset.json")  # beside labelsTr
    assert summary["task"] == "Dataset009_Spleen" and summary["cases"] == 4
    dice = [float(r["dice"]) for r in rows.values()]
    assert summary["per_class"]["spleen"]["dice"] == pytest.approx(np.mean(dice))


def test_a_missed_structure_is_penalised_and_counted(ct, tmp_path):
    labels = ct["root"] / "labelsTr"
    score_predictions(ct["dirs"]["nnUNetTrainer"], labels, tmp_path / "pen", workers=1, progress=False)
    rows = {r["case"]: r for r in _rows(tmp_path / "pen" / "per_case.csv")}
    missed = rows["phantom_spleen_000"]
    assert (missed["dice"], missed["hd95_mm"], missed["empty_in"]) == ("0.0", "373.13", "prediction")
    summary = json.loads((tmp_path / "pen" / "summary.json").read_text())
    assert summary["counts"]["spleen"]["hd95_mm"] == {"values": 4, "penalised": 1, "undefined": 0}
    assert summary["per_class"]["spleen"]["hd95_mm"] == pytest.approx(np.mean([float(r["hd95_mm"]) for r in rows.values()]))
    assert summary["distance_penalty_mm"] == 373.13

    score_predictions(ct["dirs"]["nnUNetTrainer"], labels, tmp_path / "nan", workers=1, progress=False,
                      distance_penalty_mm=None)
    rows = {r["case"]: r for r in _rows(tmp_path / "nan" / "per_case.csv")}
    assert rows["phantom_spleen_000"]["hd95_mm"] == "nan"
    summary = json.loads((tmp_path / "nan" / "summary.json").read_text())
    assert summary["counts"]["spleen"]["hd95_mm"] == {"values": 3, "penalised": 0, "undefined": 1}
    others = [float(r["hd95_mm"]) for c, r in rows.items() if c != "phantom_spleen_000"]
    assert summary["per_class"]["spleen"]["hd95_mm"] == pytest.approx(np.mean(others))
    assert summary["distance_penalty_mm"] is None


def test_regions_and_dataset_json_forms(tmp_path):
    rng = np.random.default_rng(0)
    label = np.zeros((20, 20, 8), np.uint8)
    label[4:16, 4:16, 1:7] = 1
    label[6:14, 6:14, 2:6] = 2
    label[8:12, 8:12, 3:5] = 3
    pred = label.copy()
    flip = rng.random(label.shape) < 0.05
    pred[flip] = rng.integers(0, 4, flip.sum())
    for d in ("labels", "pred"):
        _save(tmp_path / d / "brats_001.nii.gz", label if d == "labels" else pred, np.diag([1.0, 1.0, 2.0, 1.0]))

    def dice(values):
        p, y = np.isin(pred, values), np.isin(label, values)
        return 2 * (p & y).sum() / (p.sum() + y.sum())

    regions = {"TC": (2, 3), "WT": (1, 2, 3), "ET": (3,)}
    result = score_predictions(tmp_path / "pred", tmp_path / "labels", tmp_path / "o1", classes="TC=2,3;WT=1,2,3;ET=3",
                               workers=1, progress=False)
    assert [(r["class"], round(r["dice"], 6)) for r in result.rows] == [(k, round(dice(v), 6)) for k, v in regions.items()]

    # nnU-Net v2 region-based dataset.json: name -> value or [values]
    nnunet = tmp_path / "nnunet.json"
    nnunet.write_text(json.dumps({"labels": {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3],
                                             "enhancing tumor": 3}, "regions_class_order": [1, 2, 3]}))
    assert classes_from_dataset_json(nnunet) == (("whole tumor", (1, 2, 3)), ("tumor core", (2, 3)),
                                                 ("enhancing tumor", (3,)))
    msd = tmp_path / "msd.json"
    msd.write_text(json.dumps({"labels": {"0": "background", "1": "edema", "2": "non-enhancing", "3": "enhancing"}}))
    result = score_predictions(tmp_path / "pred", tmp_path / "labels", tmp_path / "o2", dataset_json=msd, workers=1,
                               progress=False)
    assert [r["class"] for r in result.rows] == ["edema", "non-enhancing", "enhancing"]
    assert result.rows[0]["dice"] == pytest.approx(dice([1]))

    # no classes given and no dataset.json: every non-zero value in the labels, named by its value
    result = score_predictions(tmp_path / "pred", tmp_path / "labels", tmp_path / "o3", workers=1, progress=False)
    assert [r["class"] for r in result.rows] == ["1", "2", "3"] and result.rows[2]["dice"] == pytest.approx(dice([3]))

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"labels": {"background": 0, "tumour": "x"}}))
    with pytest.raises(DataError, match=r"bad\.json.*neither MSD's"):
        classes_from_dataset_json(bad)


# --------------------------------------------------------------------------- cases that cannot be scored


def test_missing_extra_and_failed_cases_are_listed(ct, tmp_path, capsys):
    src = ct["dirs"]["nnUNetTrainerBE"]
    pred = tmp_path / "pred"
    pred.mkdir()
    cases = sorted(ct["labels"])
    (pred / f"{cases[0]}.nii.gz").write_bytes((src / f"{cases[0]}.nii.gz").read_bytes())  # good
    (pred / f"{cases[1]}.nii.gz").write_bytes(b"junk" * 100)  # unreadable
    affine = ct["affine"].copy()
    affine[0, 3] += 0.5  # the same shape, shifted by half a millimetre
    _save(pred / f"{cases[2]}.nii.gz", ct["B"][cases[2]], affine)
    # cases[3] has no prediction; an extra prediction has no label
    _save(pred / "unknown_case.nii.gz", ct["B"][cases[0]], ct["affine"])
    out = tmp_path / "out"
    code = main(["score", str(pred), "--labels", str(ct["root"] / "labelsTr"), "--out", str(out), "--workers", "1",
                 "--no-progress"])
    captured = capsys.readouterr()
    assert code == 1 and "Traceback" not in captured.err
    assert f"1 labelled case(s) without a prediction: {cases[3]}" in captured.err
    assert "1 prediction(s) without a label, not scored: unknown_case" in captured.err
    assert "2 input(s) failed:" in captured.err
    assert re.search(rf"  - {cases[1]}: .*{cases[1]}\.nii\.gz: not a readable NIfTI", captured.err)
    assert re.search(rf"  - {cases[2]}: .*{cases[2]}\.nii\.gz: prediction and its label .* different affines "
                     r"\(largest difference 0\.5 mm", captured.err)
    assert [r["case"] for r in _rows(out / "per_case.csv")] == [cases[0]]
    summary = json.loads((out / "summary.json").read_text())
    assert [f["case"] for f in summary["failed"]] == [cases[1], cases[2]]
    assert summary["missing"] == [cases[3]] and summary["extra"] == ["unknown_case"] and summary["cases"] == 1


def test_one_fold_against_all_labels_with_only_predicted(ct, tmp_path, capsys):
    """nnU-Net's fold_k/validation holds a subset of labelsTr: --only-predicted scores it and exits 0."""
    src = ct["dirs"]["nnUNetTrainerBE"]
    fold = tmp_path / "fold_0" / "validation"
    fold.mkdir(parents=True)
    cases = sorted(ct["labels"])
    for case in cases[:2]:
        (fold / f"{case}.nii.gz").write_bytes((src / f"{case}.nii.gz").read_bytes())
    labels = str(ct["root"] / "labelsTr")
    strict = main(["score", str(fold), "--labels", labels, "--out", str(tmp_path / "strict"), "--workers", "1",
                   "--no-progress"])
    assert strict == 1 and "--only-predicted" in capsys.readouterr().err
    code = main(["score", str(fold), "--labels", labels, "--out", str(tmp_path / "out"), "--workers", "1",
                 "--no-progress", "--only-predicted"])
    assert code == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["cases"] == 2 and summary["missing"] == [] and summary["not_predicted"] == cases[2:]


def test_grid_and_content_errors_name_the_case(tmp_path):
    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    label = np.zeros((10, 10, 4), np.uint8)
    label[3:7, 3:7, 1:3] = 1
    _save(tmp_path / "labels" / "a.nii.gz", label, affine)
    _save(tmp_path / "labels" / "b.nii.gz", label, affine)
    _save(tmp_path / "labels" / "c.nii", label, affine)
    _save(tmp_path / "pred" / "a.nii.gz", label[:, :, :3], affine)  # another shape
    _save(tmp_path / "pred" / "b.nii.gz", label * np.float32(0.5), affine)  # probabilities, not labels
    _save(tmp_path / "pred" / "c.nii", label, affine)  # .nii works too
    result = score_predictions(tmp_path / "pred", tmp_path / "labels", tmp_path / "out", workers=1, progress=False)
    reasons = dict(result.failed)
    assert "has shape (10, 10, 3), its label" in reasons["a"] and "(10, 10, 4)" in reasons["a"]
    assert "non-integer values" in reasons["b"]
    assert [r["case"] for r in result.rows] == ["c"] and result.rows[0]["dice"] == 1.0


def test_folder_errors_are_one_line(tmp_path, capsys):
    _save(tmp_path / "pred" / "a.nii.gz", np.zeros((4, 4, 4), np.uint8), np.eye(4))
    code = main(["score", str(tmp_path / "pred"), "--labels", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("beseg score: error:") and "nope: label folder does not exist" in err
    assert len(err.strip().splitlines()) == 1
    (tmp_path / "empty").mkdir()
    code = main(["score", str(tmp_path / "empty"), "--labels", str(tmp_path / "pred"), "--out", str(tmp_path / "o")])
    assert code == 1 and "empty: no prediction files (.nii or .nii.gz)" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # nothing written when nothing could be scored


def test_summarize_refuses_to_overwrite_computed_keys():
    with pytest.raises(ValueError, match="cases"):
        summarize([], ["a"], cases=3)


@pytest.mark.slow
def test_process_pool_gives_the_same_rows(ct, tmp_path):
    kwargs = {"progress": False}
    one = score_predictions(ct["dirs"]["nnUNetTrainer"], ct["root"] / "labelsTr", tmp_path / "one", workers=1, **kwargs)
    two = score_predictions(ct["dirs"]["nnUNetTrainer"], ct["root"] / "labelsTr", tmp_path / "two", workers=2, **kwargs)
    assert (tmp_path / "one" / "per_case.csv").read_text() == (tmp_path / "two" / "per_case.csv").read_text()
    assert one.rows == two.rows


# --------------------------------------------------------------------------- comparing prediction folders


def test_default_names_tell_nnunet_trainers_apart(tmp_path):
    a = tmp_path / "nnUNetTrainer__nnUNetPlans__3d_fullres" / "fold_0" / "validation"
    b = tmp_path / "nnUNetTrainerBE__nnUNetPlans__3d_fullres" / "fold_0" / "validation"
    assert default_names([a, b]) == ["nnUNetTrainer__nnUNetPlans__3d_fullres", "nnUNetTrainerBE__nnUNetPlans__3d_fullres"]
    assert default_names([tmp_path / "x", tmp_path / "y"]) == ["x", "y"]
    with pytest.raises(ReportError, match="--names"):
        default_names([tmp_path / "x", tmp_path / "x"])


@pytest.mark.slow
def test_two_folders_give_the_comparison_report(ct, tmp_path, capsys):
    dirs = ct["dirs"]
    out = tmp_path / "cmp"
    code = main(["score", str(dirs["nnUNetTrainer"]), str(dirs["nnUNetTrainerBE"]), "--labels",
                 str(ct["root"] / "labelsTr"), "--out", str(out), "--names", "default,be", "--workers", "1",
                 "--no-progress", "--protocol", "cv"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "default: 4 case(s) scored" in captured.out and "(2 penalised distance(s))" in captured.out
    md = (out / "report" / "report.md").read_text()
    assert md.split("\n\n")[1].startswith("Protocol: cv")
    table = {r.split("|")[1].strip(): r.split("|")[2].strip()
             for r in md.split("**Out-of-fold Dice on Dataset009_Spleen**", 1)[1].split("\n\n")[1].splitlines()[2:]}
    for name in ("default", "be"):
        dice = np.mean([float(r["dice"]) for r in _rows(out / name / "per_case.csv")])
        assert float(table[name]) == pytest.approx(dice, abs=5e-4)
    compared = [line for line in md.splitlines() if line.startswith("| be | spleen | HD95 (mm)")]
    assert len(compared) == 1 and "| 0 / 1 |" in compared[0]  # the baseline's missed spleen, counted
    assert "MDD (80% power)" in md and "min. p" in md
    # The primary comparison: the first folder other than the baseline, in Dice, and chosen after the fact.
    verdict = md.split("## Verdict", 1)[1].strip()
    assert verdict.startswith("Primary comparison, be vs default in Dice on 4 out-of-fold cases: ")
    assert "beseg score chose it after the predictions were made, by the default rule" in verdict
    assert sorted(p.name for p in (out / "report" / "figures").glob("*.png")) == ["figure1_contours.png",
                                                                                 "figure1_filter.png", "paired_dice.png"]
    html = (out / "report" / "report.html").read_text()
    assert html.count('<img src="data:image/png;base64,') == 3 and "Training time" not in html


def test_comparison_refuses_bad_names(ct, tmp_path, capsys):
    dirs = [str(d) for d in ct["dirs"].values()]
    code = main(["score", *dirs, "--labels", str(ct["root"] / "labelsTr"), "--out", str(tmp_path),
                 "--names", "a/b,c"])
    assert code == 1 and "cannot be folder names" in capsys.readouterr().err
    code = main(["score", *dirs, "--labels", str(ct["root"] / "labelsTr"), "--out", str(tmp_path),
                 "--baseline", "nobody"])
    assert code == 1 and "baseline 'nobody' is not one of the systems" in capsys.readouterr().err
    code = main(["score", *dirs, "--labels", str(ct["root"] / "labelsTr"), "--out", str(tmp_path / "p"),
                 "--primary", "nnUNetTrainerBE:iou"])
    err = capsys.readouterr().err
    assert code == 1 and "--primary 'nnUNetTrainerBE:iou': unknown metric 'iou'" in err and not (tmp_path / "p").exists()


def test_comparison_with_an_unscorable_folder_says_why(ct, tmp_path, capsys):
    junk = tmp_path / "junk"
    junk.mkdir()
    for case in ct["labels"]:
        (junk / f"{case}.nii.gz").write_bytes(b"junk")
    code = main(["score", str(ct["dirs"]["nnUNetTrainerBE"]), str(junk), "--labels", str(ct["root"] / "labelsTr"),
                 "--out", str(tmp_path / "out"), "--workers", "1", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1 and "no case could be scored (4 failed" in err and "not a readable NIfTI" in err
    assert len(json.loads((tmp_path / "out" / "junk" / "summary.json").read_text())["failed"]) == 4


# --------------------------------------------------------------------------- nnU-Net's conventions


def _ignore_case(tmp_path: Path) -> tuple[Path, Path]:
    """One case: an organ annotated in part of the volume, the rest nnU-Net's ignore label 2, and a
    prediction that is perfect on the annotated voxels but also finds "organ" in unannotated ones."""
    label = np.zeros((24, 24, 10), np.uint8)
    label[4:12, 5:13, 2:7] = 1
    label[14:, :, :] = 2
    pred = (label == 1).astype(np.uint8)
    pred[16:22, 3:20, 1:8] = 1
    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    _save(tmp_path / "Dataset777_Sparse" / "labelsTr" / "sparse_001.nii.gz", label, affine)
    _save(tmp_path / "pred" / "sparse_001.nii.gz", pred, affine)
    return tmp_path / "pred", tmp_path / "Dataset777_Sparse" / "labelsTr"


@pytest.mark.parametrize("labels", [{"background": 0, "organ": 1, "ignore": 2},       # nnU-Net v2
                                    {"0": "background", "1": "organ", "2": "ignore"}],  # MSD's form
                         ids=["nnunet", "msd"])
def test_the_ignore_label_is_no_class_and_its_voxels_count_in_no_metric(tmp_path, labels):
    pred, labels_dir = _ignore_case(tmp_path)
    (labels_dir.parent / "dataset.json").write_text(json.dumps({"labels": labels}))
    assert classes_from_dataset_json(labels_dir.parent / "dataset.json") == (("organ", (1,)),)
    result = score_predictions(pred, labels_dir, tmp_path / "out", workers=1, progress=False)
    assert [(r["class"], r["dice"], r["hd95_mm"], r["asd_mm"], r["nsd"]) for r in result.rows] == \
        [("organ", 1.0, 0.0, 0.0, 1.0)]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["classes"] == ["organ"] and summary["ignore_label"] == 2
    assert summary["ignore_label_from"].endswith("dataset.json")


def test_ignore_label_option_without_a_dataset_json(tmp_path, capsys):
    pred, labels_dir = _ignore_case(tmp_path)
    out = tmp_path / "out"
    code = main(["score", str(pred), "--labels", str(labels_dir), "--out", str(out), "--ignore-label", "2",
                 "--workers", "1", "--no-progress"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "pred: 1 case(s) scored (ignore label 2): dice 1.0000" in captured.out
    rows = _rows(out / "per_case.csv")
    assert [(r["class"], r["dice"]) for r in rows] == [("1", "1.0")]  # value 2 is not a class
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ignore_label"] == 2 and summary["ignore_label_from"] == "--ignore-label"
    # The ignore label cannot also be a class, nor contradict the dataset's.
    code = main(["score", str(pred), "--labels", str(labels_dir), "--out", str(out), "--ignore-label", "2",
                 "--classes", "organ=1;other=2"])
    assert code == 1 and "holds the ignore label 2" in capsys.readouterr().err
    (labels_dir.parent / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "organ": 1, "ignore": 2}}))
    code = main(["score", str(pred), "--labels", str(labels_dir), "--out", str(out), "--ignore-label", "3"])
    assert code == 1 and "--ignore-label 3 contradicts" in capsys.readouterr().err


def _plate_pair(tmp_path: Path, header) -> tuple[Path, Path]:
    """A plate and the same plate two voxels further along the third axis; ``header(img)`` edits each file's header."""
    label = np.zeros((12, 12, 10), np.uint8)
    label[2:10, 2:10, 3] = 1
    for folder, array in (("labels", label), ("pred", np.roll(label, 2, axis=2))):
        img = nib.Nifti1Image(array, np.diag([0.8, 0.8, 2.5, 1.0]))
        header(img)
        (tmp_path / folder).mkdir(parents=True, exist_ok=True)
        nib.save(img, str(tmp_path / folder / "case.nii.gz"))
    return tmp_path / "pred", tmp_path / "labels"


def test_spacing_comes_from_the_affine_not_pixdim(tmp_path):
    """The issue's file: sform 0.8 x 0.8 x 2.5 mm, pixdim 1 mm. Two slices apart is 5.0 mm, not 2.0."""
    pred, labels = _plate_pair(tmp_path, lambda img: img.header.set_zooms((1.0, 1.0, 1.0)))
    with pytest.warns(UserWarning, match=r"case\.nii\.gz: pixdim says 1 x 1 x 1 mm but the affine"):
        result = score_predictions(pred, labels, tmp_path / "out", classes="plate=1", workers=1, progress=False)
    assert result.rows[0]["hd95_mm"] == pytest.approx(5.0)


@pytest.mark.parametrize("unit, scale", [("micron", 1000.0), ("meter", 0.001)])
def test_nifti_length_units_are_converted_to_mm(tmp_path, unit, scale):
    def in_unit(img):
        img.set_sform(np.diag([0.8 * scale, 0.8 * scale, 2.5 * scale, 1.0]), code=1)
        img.set_qform(np.diag([0.8 * scale, 0.8 * scale, 2.5 * scale, 1.0]), code=1)
        img.header.set_xyzt_units(unit)

    pred, labels = _plate_pair(tmp_path, in_unit)
    result = score_predictions(pred, labels, tmp_path / "out", classes="plate=1", workers=1, progress=False)
    assert result.rows[0]["hd95_mm"] == pytest.approx(5.0)  # not 5000 "mm" (or 0.005)


@pytest.mark.parametrize("layout", ["2d", "xy1"])
def test_2d_cases_are_scored_with_2d_boundaries_and_say_so(tmp_path, layout):
    y, x = np.mgrid[:30, :26]
    gt = (((y - 15) / 9.0) ** 2 + ((x - 13) / 7.0) ** 2 <= 1).astype(np.uint8)
    pred = (((y - 16) / 8.0) ** 2 + ((x - 12) / 7.5) ** 2 <= 1).astype(np.uint8)
    if layout == "xy1":
        gt, pred = gt[..., None], pred[..., None]
    affine = np.diag([0.7, 1.3, 3.0, 1.0])
    _save(tmp_path / "labels" / "slice.nii.gz", gt, affine)
    _save(tmp_path / "pred" / "slice.nii.gz", pred, affine)
    result = score_predictions(tmp_path / "pred", tmp_path / "labels", tmp_path / "out", workers=1, progress=False)
    row = result.rows[0]
    # Independent: 2D boundaries (scipy erosion in the plane) and 2D distances.
    g, p = gt.reshape(30, 26) > 0, pred.reshape(30, 26) > 0
    edge = lambda m: m & ~ndimage.binary_erosion(m)  # noqa: E731
    d_pg = ndimage.distance_transform_edt(~edge(g), sampling=(0.7, 1.3))[edge(p)]
    d_gp = ndimage.distance_transform_edt(~edge(p), sampling=(0.7, 1.3))[edge(g)]
    both = np.concatenate([d_pg, d_gp])
    assert row["hd95_mm"] == pytest.approx(max(np.percentile(d_pg, 95), np.percentile(d_gp, 95)))
    assert row["asd_mm"] == pytest.approx(both.mean()) and row["nsd"] == pytest.approx((both <= 1.0).mean())
    assert _rows(tmp_path / "out" / "per_case.csv")[0]["dim"] == "2"
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["dim"] == 2 and summary["dim_cases"] == {"2": 1}

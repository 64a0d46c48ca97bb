"""BE in nnU-Net v2 (beseg.nnunet): the CLI, the BE term on nnU-Net's tensors, and nnU-Net itself.

The first tests need no nnU-Net. The rest run nnU-Net's commands and tests/nnunet/venv_checks.py
with the interpreter of a separate virtual environment that has the ``nnunet`` extra, named by
``BESEG_NNUNET_PYTHON`` (.ci/run creates it): nnunetv2's torchvision must match its torch, which
the main environment's CPU wheel of torch does not guarantee.
"""

from __future__ import annotations

import ast
import csv
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

import beseg.nnunet
from conftest import nnunet_compare_env, nnunet_python, tiny_compare
from beseg.cli import main
from beseg.data import make_phantom
from beseg.losses import BoundaryEnhancementLoss, log_filter
from beseg.nnunet import trainer_dir
from beseg.nnunet.loss import NNUNetBELoss, NNUNetBETerm, deep_supervision_spacings

ROOT = Path(__file__).resolve().parents[1]
HELPERS = Path(__file__).resolve().parent / "nnunet"


# --------------------------------------------------------------------------- CLI and trainer folder


def test_trainer_dir_command_prints_the_folder_with_the_trainer_classes(monkeypatch, capsys):
    monkeypatch.setattr(beseg.nnunet, "nnunet_version", lambda: "2.8.1")
    assert main(["nnunet", "trainer-dir"]) == 0
    folder = Path(capsys.readouterr().out.strip())
    assert folder.is_absolute() and folder == trainer_dir()
    # nnU-Net imports every top-level module of the folder; the trainers are defined in them.
    classes = {node.name for path in folder.glob("*.py") for node in ast.walk(ast.parse(path.read_text()))
               if isinstance(node, ast.ClassDef)}
    assert {"nnUNetTrainerBE", "nnUNetTrainerDiceBE", "nnUNetTrainerBESpacing"} <= classes


@pytest.mark.parametrize("version, expected", [(None, "not installed"), ("2.7.3", "nnunetv2 2.7.3 is installed"),
                                               ("3.0.0", "nnunetv2 3.0.0 is installed")])
def test_without_a_supported_nnunet_the_command_says_how_to_install_it(monkeypatch, capsys, version, expected):
    monkeypatch.setattr(beseg.nnunet, "nnunet_version", lambda: version)
    assert main(["nnunet", "trainer-dir"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("beseg nnunet: error: ")
    assert expected in lines[0] and '-e ".[nnunet]"' in lines[0]


# --------------------------------------------------------------------------- the BE term (no nnU-Net needed)


class _RecordingBase(torch.nn.Module):
    """Stands in for nnU-Net's per-output loss: a differentiable value, and the shapes it was called with."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[int, ...]] = []

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        self.calls.append(tuple(logits.shape[2:]))
        return logits.float().square().mean()


def _labels(gen: torch.Generator, shape: tuple[int, ...], n: int) -> torch.Tensor:
    return torch.randint(0, n, shape, generator=gen).to(torch.int16)


def test_loss_is_the_weighted_sum_of_base_plus_1000_be_and_skips_zero_weight_outputs():
    gen = torch.Generator().manual_seed(0)
    sizes = [(12, 12, 8), (6, 6, 4), (3, 3, 2), (2, 2, 1)]
    outputs = [torch.randn(2, 3, *s, generator=gen, requires_grad=True) for s in sizes]
    targets = [_labels(gen, (2, 1, *s), 3) for s in sizes]
    weights = [8 / 14, 4 / 14, 2 / 14, 0.0]
    base = _RecordingBase()
    value = NNUNetBELoss(base, weights, regions=False)(outputs, targets)
    be = BoundaryEnhancementLoss(softmax=True, to_onehot_y=True)
    expected = sum(w * (o.square().mean() + 1000 * be(o, t)) for w, o, t in zip(weights, outputs, targets) if w)
    torch.testing.assert_close(value, expected, rtol=1e-5, atol=0)
    assert base.calls == sizes[:3]  # the weight-0 output is not computed at all
    value.backward()
    assert outputs[3].grad is None and all(o.grad.isfinite().all() for o in outputs[:3])


def test_ignored_voxels_contribute_nothing_to_be():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, 10, 10, 6, generator=gen, requires_grad=True)
    target = _labels(gen, (2, 1, 10, 10, 6), 4)  # label 3 is the ignore label
    ignored = target == 3
    term = NNUNetBETerm(regions=False, ignore_label=3)
    value = term(logits, target)
    value.backward()
    # Independently: beseg's loss with the ignore label replaced by 0 and masked out.
    expected = BoundaryEnhancementLoss(softmax=True, to_onehot_y=True)(
        logits, torch.where(ignored, 0, target), mask=~ignored)
    torch.testing.assert_close(value, expected)
    assert not (logits.grad * ignored).any() and (logits.grad * ~ignored).any()
    other = torch.where(ignored, 20 * torch.randn(logits.shape, generator=gen), logits.detach())
    torch.testing.assert_close(term(other, torch.where(ignored, 3, target)), value.detach())


@pytest.mark.parametrize("side", [16, 8])
def test_be_weight_does_not_shrink_with_the_annotated_fraction_of_the_patch(side):
    """The issue's case: the same logits and labels annotated on all of a 32^3 patch and on 12.5 % (16^3)
    or 1.6 % (8^3) of it, the rest the ignore label. nnU-Net's Dice + CE do not change; BE shrank in
    proportion (0.001216, 0.000163, 0.000020) when it averaged over all voxels."""
    idx = torch.arange(32)
    i, j, k = torch.meshgrid(idx, idx, idx, indexing="ij")
    target = ((i // 4 + 2 * (j // 4) + k // 4) % 3).expand(2, 1, 32, 32, 32).to(torch.int16)
    wobble = torch.sin(i * 0.7) * torch.cos(j * 0.9) + torch.sin(k * 1.3)
    logits = 2.0 * torch.nn.functional.one_hot(target[:, 0].long(), 3).movedim(-1, 1).float() + wobble
    term = NNUNetBETerm(regions=False, ignore_label=3)
    full = term(logits, target)
    sparse = torch.full_like(target, 3)
    block = (..., slice(8, 8 + side), slice(8, 8 + side), slice(8, 8 + side))
    sparse[block] = target[block]
    ratio = float(term(logits, sparse) / full)
    assert 0.75 < ratio < 1.5, ratio
    # The mean over the annotated voxels: the masked response's sum over 2 items x 2 channels x side^3 voxels.
    mask = (sparse != 3)
    probs = torch.softmax(logits, 1)[:, 1:]
    truth = torch.nn.functional.one_hot(torch.where(mask, sparse, 0)[:, 0].long(), 3).movedim(-1, 1)[:, 1:]
    response = log_filter((probs - truth) * mask, smoothing_passes=3)
    torch.testing.assert_close(term(logits, sparse), response.square().sum() / (2 * 2 * side ** 3))


def test_region_targets_use_sigmoid_every_channel_and_the_last_channel_as_ignore_mask():
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 2, 8, 8, 8, generator=gen)
    regions = torch.rand(2, 3, 8, 8, 8, generator=gen) > 0.5  # two regions, then the ignore channel
    value = NNUNetBETerm(regions=True, ignore_label=4)(logits, regions)
    expected = BoundaryEnhancementLoss(include_background=True, sigmoid=True)(
        logits, regions[:, :2].float(), mask=~regions[:, 2:])
    torch.testing.assert_close(value, expected)
    without_ignore = NNUNetBETerm(regions=True)(logits, regions[:, :2])
    torch.testing.assert_close(without_ignore, BoundaryEnhancementLoss(include_background=True, sigmoid=True)(
        logits, regions[:, :2].float()))


@pytest.mark.parametrize("size", [(1, 1, 1), (2, 2, 1), (1, 3, 2), (4, 4, 4), (1, 1), (3, 2)])
def test_be_term_works_on_the_smallest_deep_supervision_outputs(size):
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 3, *size, generator=gen, requires_grad=True)
    value = NNUNetBETerm(regions=False)(logits, _labels(gen, (2, 1, *size), 3))
    value.backward()
    assert value.isfinite() and value >= 0 and logits.grad.isfinite().all()


def test_be_term_is_float32_under_autocast():
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 2, 16, 16, 8, generator=gen).to(torch.bfloat16)
    target = _labels(gen, (2, 1, 16, 16, 8), 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = NNUNetBETerm(regions=False)(logits, target)
    reference = BoundaryEnhancementLoss(softmax=True, to_onehot_y=True)(logits.double(), target)
    assert value.dtype == torch.float32
    torch.testing.assert_close(value.double(), reference, rtol=1e-5, atol=0)


def test_deep_supervision_spacings_divide_the_plan_spacing_by_each_scale():
    spacings = deep_supervision_spacings([2.5, 0.8, 0.8], [[1, 1, 1], [1, 0.5, 0.5], [0.5, 0.25, 0.25]])
    assert spacings == [(2.5, 0.8, 0.8), (2.5, 1.6, 1.6), (5.0, 3.2, 3.2)]
    with pytest.raises(ValueError, match="one positive value per spacing axis"):
        deep_supervision_spacings([2.5, 0.8, 0.8], [[1, 1]])


def test_spacings_reach_each_outputs_be_term():
    gen = torch.Generator().manual_seed(5)
    spacings = [(2.5, 0.8, 0.8), (5.0, 1.6, 1.6)]
    outputs = [torch.randn(1, 2, *s, generator=gen) for s in [(6, 16, 16), (3, 8, 8)]]
    targets = [_labels(gen, (1, 1, *o.shape[2:]), 2) for o in outputs]
    value = NNUNetBELoss(_RecordingBase(), [2 / 3, 1 / 3], regions=False, spacings=spacings)(outputs, targets)
    expected = sum(
        w * (o.square().mean() + 1000 * BoundaryEnhancementLoss(softmax=True, to_onehot_y=True, spacing=s)(o, t))
        for w, s, o, t in zip([2 / 3, 1 / 3], spacings, outputs, targets))
    torch.testing.assert_close(value, expected)
    voxel_form = NNUNetBELoss(_RecordingBase(), [2 / 3, 1 / 3], regions=False)(outputs, targets)
    assert not torch.isclose(voxel_form, value, rtol=1e-3)


def test_one_output_without_deep_supervision_and_lambda_zero_is_the_base_alone():
    gen = torch.Generator().manual_seed(6)
    logits, target = torch.randn(1, 2, 8, 8, 8, generator=gen), _labels(gen, (1, 1, 8, 8, 8), 2)
    value = NNUNetBELoss(_RecordingBase(), regions=False)(logits, target)
    be = BoundaryEnhancementLoss(softmax=True, to_onehot_y=True)(logits, target)
    torch.testing.assert_close(value, logits.square().mean() + 1000 * be)
    torch.testing.assert_close(NNUNetBELoss(_RecordingBase(), regions=False, lambda_be=0)(logits, target),
                               logits.square().mean())


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="at least one > 0"):
        NNUNetBELoss(_RecordingBase(), [0.0, 0.0], regions=False)
    with pytest.raises(ValueError, match="one entry per output"):
        NNUNetBELoss(_RecordingBase(), [1.0, 0.5], regions=False, spacings=[(1.0, 1.0, 1.0)])
    loss = NNUNetBELoss(_RecordingBase(), [1.0, 0.5], regions=False)
    with pytest.raises(ValueError, match="expected 2 output"):
        loss([torch.randn(1, 2, 4, 4, 4)], [torch.zeros(1, 1, 4, 4, 4)])


# --------------------------------------------------------------------------- with nnU-Net (its own venv)


def _run(cmd: list[str], env: dict[str, str], timeout: int = 900) -> str:
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{output[-6000:]}"
    return output


@pytest.mark.slow
def test_trainer_losses_match_nnunet_default_plus_1000_be_in_the_nnunet_venv():
    python = nnunet_python()
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    # -o addopts=: one process, whatever pyproject.toml asks of the main suite
    _run([str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=", str(HELPERS / "venv_checks.py")],
         env)


@pytest.mark.slow
def test_nnunet_trains_predicts_with_a_be_trainer_and_beseg_scores_it(tmp_path):
    """MSD phantom -> nnU-Net convert, plan, preprocess, train (a few iterations), validate, predict -> beseg score."""
    python = nnunet_python()
    raw, pre, results = tmp_path / "nnUNet_raw", tmp_path / "nnUNet_preprocessed", tmp_path / "nnUNet_results"
    env = {
        **os.environ, "PATH": f"{python.parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "nnUNet_raw": str(raw), "nnUNet_preprocessed": str(pre), "nnUNet_results": str(results),
        # The shipped trainers, and a second folder with a CPU-sized subclass of one of them.
        "nnUNet_extTrainer": f"{trainer_dir()}{os.pathsep}{HELPERS / 'trainers'}",
        "nnUNet_compile": "f", "nnUNet_def_n_proc": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"),
    }
    # nnU-Net's MSD converter takes the dataset id from the folder name TaskNN_Name.
    task = make_phantom(tmp_path / "Task77_Phantom", cases=8, test_cases=1, size=(48, 48, 20), progress=False)
    _run(["nnUNetv2_convert_MSD_dataset", "-i", str(task), "-np", "1"], env)
    _run(["nnUNetv2_plan_and_preprocess", "-d", "77", "-c", "3d_fullres", "-np", "1", "-npfp", "1"], env)
    trainer = "nnUNetTrainerBESpacing_ci"
    # nnUNet_n_proc_DA=0: data augmentation in the main process (planning needs it > 0).
    _run(["nnUNetv2_train", "77", "3d_fullres", "0", "-tr", trainer, "-device", "cpu"],
         {**env, "nnUNet_n_proc_DA": "0"})

    fold = results / "Dataset077_Phantom" / f"{trainer}__nnUNetPlans__3d_fullres" / "fold_0"
    log = "\n".join(p.read_text() for p in sorted(fold.glob("training_log_*.txt")))
    loss_line = re.search(r"beseg: .*\+ 1000 x BE per output.*BE spacing (\[.*\])", log)
    assert loss_line, f"no BE loss line in the training log:\n{log[-3000:]}"
    plans = json.loads((pre / "Dataset077_Phantom" / "nnUNetPlans.json").read_text())["configurations"]["3d_fullres"]
    spacing, strides = plans["spacing"], plans["architecture"]["arch_kwargs"]["strides"]
    expected, factor = [], [1] * len(spacing)
    for stride in strides[:-1]:  # one output per decoder stage, full resolution first
        factor = [f * s for f, s in zip(factor, stride)]
        expected.append([sp * f for sp, f in zip(spacing, factor)])
    logged = ast.literal_eval(loss_line.group(1))
    assert [len(s) for s in logged] == [len(s) for s in expected]
    assert [v for s in logged for v in s] == pytest.approx([v for s in expected for v in s])
    train_losses = [float(v) for v in re.findall(r"train_loss (\S+)", log)]
    assert train_losses and all(math.isfinite(v) for v in train_losses)

    split = json.loads((pre / "Dataset077_Phantom" / "splits_final.json").read_text())[0]["val"]
    validation = fold / "validation"
    assert sorted(p.name for p in validation.glob("*.nii.gz")) == sorted(f"{case}.nii.gz" for case in split)

    # nnUNetv2_predict finds the trainer through nnUNet_extTrainer too.
    images_ts = raw / "Dataset077_Phantom" / "imagesTs"
    _run(["nnUNetv2_predict", "-i", str(images_ts), "-o", str(tmp_path / "pred_ts"), "-d", "77", "-c", "3d_fullres",
          "-f", "0", "-tr", trainer, "-chk", "checkpoint_final.pth", "--disable_tta", "-npp", "1", "-nps", "1",
          "-device", "cpu"], env)
    (image,) = images_ts.glob("*_0000.nii.gz")
    predicted = nib.load(tmp_path / "pred_ts" / image.name.replace("_0000.nii.gz", ".nii.gz"))
    assert predicted.shape == nib.load(image).shape

    # The fold's validation cases against their labels (beseg score flags labelled cases left unpredicted).
    labels = tmp_path / "labels_fold0_val"
    labels.mkdir()
    for case in split:
        shutil.copy(raw / "Dataset077_Phantom" / "labelsTr" / f"{case}.nii.gz", labels)
    out = tmp_path / "score"
    _run([sys.executable, "-m", "beseg.cli", "score", str(validation), "--labels", str(labels), "--out", str(out),
          "--no-progress"], os.environ.copy())
    with open(out / "per_case.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {"case", "class", "dice", "hd95_mm", "asd_mm", "nsd"} <= set(rows[0])
    assert sorted({r["case"] for r in rows}) == sorted(split)
    assert all(0.0 <= float(r["dice"]) <= 1.0 for r in rows)
    assert (out / "summary.json").is_file()


# --------------------------------------------------------------------------- nnU-Net trainers in beseg compare


@pytest.mark.slow
def test_compare_pairs_nnunet_trainers_with_a_beseg_system_on_the_same_test_cases(tmp_path, monkeypatch, capsys):
    """The issue's CI check: nnU-Net's default trainer and nnUNetTrainerBE (short subclasses) and segresnet_dice in one
    `beseg compare` on a phantom; nnU-Net trains on beseg's split and every system is scored on the same test cases."""
    python = nnunet_python()
    nnunet_compare_env(monkeypatch, python)
    data = make_phantom(tmp_path / "phantom", cases=10, test_cases=0, size=(48, 48, 20), progress=False)
    out = tmp_path / "results"
    systems = "nnunet:nnUNetTrainer_ci,nnunet:nnUNetTrainerBE_ci,segresnet_dice"
    code = main(["compare", "--data", str(data), "--systems", systems, "--seeds", "1", "--out", str(out),
                 "--baseline", "nnUNetTrainer_ci", "--no-progress", *tiny_compare(tmp_path)])
    printed = capsys.readouterr()
    assert code == 0, printed.out[-4000:] + printed.err[-4000:]

    split = json.loads((out / "split.json").read_text())
    test_cases = sorted(split["test"])
    assert test_cases
    # nnU-Net's splits_final.json is beseg's split: it trains on beseg's training cases, monitors its validation cases.
    (dataset,) = (out / "nnunet" / "preprocessed").iterdir()
    final = json.loads((dataset / "splits_final.json").read_text())
    assert final == [{"train": sorted(split["train"]), "val": sorted(split["val"])}]
    # The held-out test cases never enter nnU-Net's training set (nor its fingerprint and plan): only imagesTs.
    raw = out / "nnunet" / "raw" / dataset.name
    in_training = {p.name[:-len("_0000.nii.gz")] for p in (raw / "imagesTr").glob("*_0000.nii.gz")}
    assert in_training == set(split["train"]) | set(split["val"])
    assert {p.name[:-len("_0000.nii.gz")] for p in (raw / "imagesTs").glob("*_0000.nii.gz")} == set(test_cases)

    runs = {"nnUNetTrainer_ci": out / "nnUNetTrainer_ci" / "repeat0",
            "nnUNetTrainerBE_ci": out / "nnUNetTrainerBE_ci" / "repeat0",
            "segresnet_dice": out / "segresnet_dice" / "seed0"}
    for name, run in runs.items():
        with open(run / "eval" / "per_case.csv", newline="") as f:
            assert sorted({r["case"] for r in csv.DictReader(f)}) == test_cases, name
        summary = json.loads((run / "eval" / "summary.json").read_text())
        assert summary["protocol"] == "heldout" and summary["split"] == "test" and summary["case_ids"] == test_cases
    # The BE trainer really trained with BE, each nnU-Net run in its own nnUNet_results.
    be_log = next((runs["nnUNetTrainerBE_ci"] / "nnUNet_results").rglob("training_log_*.txt")).read_text()
    assert "1000 x BE" in be_log
    assert "1000 x BE" not in next((runs["nnUNetTrainer_ci"] / "nnUNet_results").rglob("training_log_*.txt")).read_text()

    # Each nnU-Net run's test Dice is what `beseg score` gives on its prediction folder.
    for name in ("nnUNetTrainer_ci", "nnUNetTrainerBE_ci"):
        scored = tmp_path / f"score_{name}"
        assert main(["score", str(runs[name] / "eval" / "predictions"), "--labels", str(data / "labelsTr"),
                     "--out", str(scored), "--no-progress"]) in (0, 1)  # 1: the training cases have no prediction
        mine = json.loads((runs[name] / "eval" / "summary.json").read_text())
        theirs = json.loads((scored / "summary.json").read_text())
        assert theirs["case_ids"] == test_cases
        assert mine["mean"]["dice"] == pytest.approx(theirs["mean"]["dice"], abs=1e-9)
        assert mine["per_class"] == theirs["per_class"]

    report = (out / "report" / "report.md").read_text()
    for name in runs:
        assert name in report
    assert "nnUNetTrainerBE_ci vs nnUNetTrainer_ci" in report
    assert "segresnet_dice vs nnUNetTrainer_ci" in report

    # --status reads nnU-Net's runs too.
    capsys.readouterr()
    assert main(["compare", str(out), "--status"]) == 0
    status = capsys.readouterr().out
    assert re.search(r"nnUNetTrainerBE_ci/repeat0\s+done", status), status
    assert "3 done of 3 run(s)" in status


@pytest.mark.slow
def test_an_unknown_nnunet_trainer_is_one_line_before_anything_trains(tmp_path, monkeypatch, capsys):
    python = nnunet_python()
    nnunet_compare_env(monkeypatch, python)
    data = make_phantom(tmp_path / "phantom", cases=10, test_cases=0, size=(32, 32, 12), progress=False)
    out = tmp_path / "results"
    code = main(["compare", "--data", str(data), "--systems", "nnunet:nnUNetTrainerNoSuch,segresnet_dice",
                 "--seeds", "1", "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1, err
    assert "nnUNetTrainerNoSuch" in err[0] and "nnUNet_extTrainer=" in err[0] and str(HELPERS / "trainers") in err[0]
    assert str(trainer_dir()) in err[0]  # beseg's folder is added to the user's, not instead of it
    assert not (out / "segresnet_dice").exists()


def _sparse_phantom(folder: Path) -> Path:
    """A 10-case phantom made a dataset without a beseg preset, annotated sparsely as nnU-Net v2 datasets are:
    ``{"background": 0, "organ": 1, "ignore": 2}``, the upper 6 of 20 slices of every label unannotated (2)."""
    data = make_phantom(folder, cases=10, test_cases=0, size=(48, 48, 20), progress=False)
    meta = json.loads((data / "dataset.json").read_text())
    meta.update(name="Sparse Organs", labels={"0": "background", "1": "organ", "2": "ignore"})
    (data / "dataset.json").write_text(json.dumps(meta))
    for path in (data / "labelsTr").glob("*.nii.gz"):
        image = nib.load(path)
        label = np.asarray(image.dataobj).astype(np.uint8)
        label[..., 14:] = 2
        nib.save(nib.Nifti1Image(label, image.affine, image.header), path)
    return data


@pytest.mark.slow
def test_does_be_improve_nnunet_on_a_sparsely_annotated_dataset_without_a_beseg_preset(tmp_path, monkeypatch, capsys):
    """nnU-Net-only comparisons run on any MSD-layout dataset: classes and the ignore label come from its dataset.json,
    and the ignored voxels count in no metric."""
    python = nnunet_python()
    nnunet_compare_env(monkeypatch, python)
    data = _sparse_phantom(tmp_path / "sparse")
    out = tmp_path / "results"
    code = main(["compare", "--data", str(data), "--systems", "nnunet:nnUNetTrainer_ci,nnunet:nnUNetTrainerBE_ci",
                 "--seeds", "1", "--out", str(out), "--baseline", "nnUNetTrainer_ci", "--no-progress"])
    printed = capsys.readouterr()
    assert code == 0, printed.out[-4000:] + printed.err[-4000:]
    test_cases = sorted(json.loads((out / "split.json").read_text())["test"])
    for name in ("nnUNetTrainer_ci", "nnUNetTrainerBE_ci"):
        run = out / name / "repeat0"
        summary = json.loads((run / "eval" / "summary.json").read_text())
        assert summary["task"] == "sparse_organs" and summary["classes"] == ["organ"]
        assert summary["ignore_label"] == 2 and summary["case_ids"] == test_cases
        # Independently: Dice of the organ over the annotated voxels only, from the files.
        for case in test_cases:
            truth = np.asarray(nib.load(data / "labelsTr" / f"{case}.nii.gz").dataobj)
            pred = np.asarray(nib.load(run / "eval" / "predictions" / f"{case}.nii.gz").dataobj)
            annotated = truth != 2
            a, b = (pred == 1) & annotated, (truth == 1) & annotated
            dice = 2 * (a & b).sum() / (a.sum() + b.sum()) if a.sum() + b.sum() else 1.0
            with open(run / "eval" / "per_case.csv", newline="") as f:
                row = next(r for r in csv.DictReader(f) if r["case"] == case)
            assert float(row["dice"]) == pytest.approx(dice, abs=1e-6)
    be_log = next((out / "nnUNetTrainerBE_ci" / "repeat0" / "nnUNet_results").rglob("training_log_*.txt")).read_text()
    assert "1000 x BE" in be_log and "ignore label 2: its voxels count in no term" in be_log
    report = (out / "report" / "report.md").read_text()
    assert "nnUNetTrainerBE_ci vs nnUNetTrainer_ci" in report and "sparse_organs" in report


def test_beseg_systems_on_a_dataset_without_a_preset_are_one_line(tmp_path, capsys):
    data = _sparse_phantom(tmp_path / "sparse")
    code = main(["compare", "--data", str(data), "--systems", "segresnet_dice,nnunet:nnUNetTrainer", "--seeds", "1",
                 "--out", str(tmp_path / "results"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1, err
    assert "cannot tell the task preset" in err[0] and "nnU-Net systems, nnunet:TRAINER, run on any" in err[0]

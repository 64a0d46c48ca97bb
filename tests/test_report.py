"""Tests of beseg.report on a tiny fake results folder and MSD-like dataset written in tmp_path."""

from __future__ import annotations

import csv
from dataclasses import replace
import json
import math
import os
import re
import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import stats

from beseg.data import MSDTask, load_task
from beseg.errors import ReportError
from beseg.metrics import METRIC_NAMES
from beseg.report import collect_results, write_report
from beseg.report.stats import paired_test

from beseg.report.paper import PAPER_TABLE1, msd_task_key, paper_dice

SYSTEMS = ("segresnet_dice", "segresnet_be")
SEEDS = (0, 1)
CASES = ("spleen_1", "spleen_2", "spleen_3", "spleen_4")
SHAPE = (28, 28, 12)
SPACING = (1.5, 1.5, 3.0)


def _nifti(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.diag([*SPACING, 1.0])), str(path))


def _ellipsoid(centre: tuple[float, float, float], radius_mm: float) -> np.ndarray:
    grid = np.indices(SHAPE).astype(float)
    d2 = sum(((g - c) * s) ** 2 for g, c, s in zip(grid, centre, SPACING))
    return (d2 <= radius_mm**2).astype(np.uint8)


def make_dataset(root: Path) -> MSDTask:
    """An MSD-like task folder (dataset.json, imagesTr/, labelsTr/ with 4 small cases), loaded."""
    rng = np.random.default_rng(0)
    training = []
    for i, case in enumerate(CASES):
        label = _ellipsoid((14 + i, 13, 6), 9.0 + i)
        image = (label * 100 + rng.normal(0, 20, SHAPE)).astype(np.float32)
        _nifti(root / "imagesTr" / f"{case}.nii.gz", image)
        _nifti(root / "labelsTr" / f"{case}.nii.gz", label)
        training.append({"image": f"./imagesTr/{case}.nii.gz", "label": f"./labelsTr/{case}.nii.gz"})
    (root / "dataset.json").write_text(json.dumps({"name": "Spleen", "labels": {"0": "background", "1": "spleen"},
                                                   "modality": {"0": "CT"}, "training": training}))
    return load_task(root)


#: How the fake runs were evaluated (the keys `beseg evaluate` records in summary.json).
HELDOUT = {"protocol": "heldout", "split": "test", "folds": None, "selection": "best.pt by val Dice"}
#: The one missed structure: segresnet_dice/seed1 predicts nothing on spleen_4 (HD95, ASD penalised).
MISSED = ("segresnet_dice", 1, "spleen_4")
#: One distance left undefined (an evaluation made without a penalty): segresnet_be/seed0, spleen_3.
UNDEFINED = ("segresnet_be", 0, "spleen_3")


def write_run(run: Path, system: str, seed: int, rng: np.random.Generator, task: str = "task09",
              fields: dict | None = HELDOUT) -> None:
    """One run folder in the engine's layout, with made-up numbers; ``fields`` are the protocol keys (None: none)."""
    (run / "eval").mkdir(parents=True)
    (run / "config.yaml").write_text(f"system: {system}\nnetwork: segresnet\nloss: {system.split('_', 1)[1]}\n"
                                     f"task: {task}\nseed: {seed}\n")
    lines = []
    for step in range(1, 41):
        lines.append({"kind": "train", "epoch": step // 10, "step": step, "loss": 1.0 / step + rng.uniform(0, 0.05),
                      "step_time_s": 0.9 + rng.uniform(0, 0.2), "loss_time_s": rng.uniform(0.005, 0.02), "lr": 1e-4})
        if step % 10 == 0:
            lines.append({"kind": "val", "epoch": step // 10, "step": step, "dice_mean": 0.5 + step / 100,
                          "dice": {"spleen": 0.5 + step / 100}})
    (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    with (run / "eval" / "per_case.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["case", "class", *METRIC_NAMES, "empty_in"])
        boost = 0.03 if system == "segresnet_be" else 0.0
        for i, case in enumerate(CASES):
            dice, hd95, asd, nsd = (0.8 + boost + 0.02 * i + rng.uniform(0, 0.02), rng.uniform(2, 9),
                                    rng.uniform(0.5, 2), rng.uniform(0.6, 0.9))
            empty_in = "none"
            if (system, seed, case) == MISSED:
                dice, hd95, asd, nsd, empty_in = 0.0, 373.13, 373.13, 0.0, "prediction"
            if (system, seed, case) == UNDEFINED:
                dice, hd95, asd, nsd, empty_in = 0.0, math.nan, math.nan, 0.0, "label"
            w.writerow([case, "spleen", f"{dice:.6f}", f"{hd95:.6f}", f"{asd:.6f}", f"{nsd:.6f}", empty_in])
    summary = {"task": task, "classes": ["spleen"], "nsd_tolerance_mm": 2.0, "distance_penalty_mm": 373.13,
               "failed": [], **(fields or {})}
    (run / "eval" / "summary.json").write_text(json.dumps(summary))
    for i, case in enumerate(CASES):
        pred = _ellipsoid((14 + i + seed, 13, 6), 8.0 + i + (1 if system == "segresnet_be" else 0))
        _nifti(run / "eval" / "predictions" / f"{case}.nii.gz", pred)


def make_results(root: Path, task: str = "task09", fields: dict | None = HELDOUT) -> Path:
    rng = np.random.default_rng(1)
    for system in SYSTEMS:
        for seed in SEEDS:
            write_run(root / system / f"seed{seed}", system, seed, rng, task, fields)
    return root


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(results folder, dataset, report.html) written once for the module."""
    tmp = tmp_path_factory.mktemp("report")
    data = make_dataset(tmp / "data")
    results = make_results(tmp / "results")
    return results, data, write_report(results, data)


def _csv_values(results: Path, system: str, seed: int, metric: str) -> dict[str, float]:
    with (results / system / f"seed{seed}" / "eval" / "per_case.csv").open() as f:
        return {r["case"]: float(r[metric]) for r in csv.DictReader(f)}


def _md_rows(md: str, caption: str) -> list[list[str]]:
    """Body rows of the Markdown table under the bold ``caption``."""
    block = md.split(f"**{caption}**", 1)[1].strip().split("\n\n", 1)[0]
    return [[c.strip() for c in line.strip("|").split("|")] for line in block.splitlines()[2:]]


def _numbers(cell: str) -> list[float]:
    return [float(x) for x in re.findall(r"[-+]?\d+\.\d+", cell)]


# --------------------------------------------------------------------------- numbers from the runs


def test_files_written(report):
    results, _, html = report
    out = results / "report"
    assert html == out / "report.html"
    assert (out / "report.md").is_file()
    pngs = sorted(p.name for p in (out / "figures").glob("*.png"))
    assert pngs == ["figure1_contours.png", "figure1_filter.png", "learning_curves.png", "paired_dice.png"]
    for p in (out / "figures").glob("*.png"):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


BOUNDARY = "Boundary metrics on the test cases (mean ± std over seeds)"


@pytest.mark.parametrize("metric, col, caption", [
    ("dice", 2, "Test Dice on task09"),
    ("hd95_mm", 1, BOUNDARY),
    ("asd_mm", 2, BOUNDARY),
    ("nsd", 3, BOUNDARY),
])
def test_table_equals_mean_of_per_case_csv(report, metric, col, caption):
    results, _, html = report
    md = (html.parent / "report.md").read_text()
    rows = {r[0]: r for r in _md_rows(md, caption)}
    digits = 3 if metric in ("dice", "nsd") else 2
    for system in SYSTEMS:
        # mean over cases per seed (penalised values included, NaN skipped), then mean and sample std over seeds
        run_means = [np.nanmean(list(_csv_values(results, system, s, metric).values())) for s in SEEDS]
        got = _numbers(rows[system][col])
        assert got[0] == pytest.approx(np.mean(run_means), abs=0.5 * 10**-digits + 1e-12)
        assert got[1] == pytest.approx(np.std(run_means, ddof=1), abs=0.5 * 10**-digits + 1e-12)
    if metric in ("hd95_mm", "asd_mm"):
        assert rows["segresnet_dice"][col].endswith("(1 pen.)")  # the missed spleen: in the mean, and counted
        assert rows["segresnet_be"][col].endswith("(1 undef.)")  # the NaN distance: left out, and counted
    if metric == "dice":
        assert [rows[s][3] for s in SYSTEMS] == ["4", "4"]  # cases scored per run
        assert rows["segresnet_dice"][-1] == "0.95" and rows["segresnet_be"][-1] == "0.96"  # the paper's


def test_penalised_and_undefined_counts_table(report):
    _, _, html = report
    md = (html.parent / "report.md").read_text()
    rows = {r[0]: r[2:] for r in _md_rows(md, "Penalised and undefined values per class and metric")}
    # case values, HD95 pen./undef., ASD pen./undef., Dice/NSD undef.: 4 cases x 2 seeds
    assert rows["segresnet_dice"] == ["8", "1", "0", "1", "0", "0"]
    assert rows["segresnet_be"] == ["8", "0", "1", "0", "1", "0"]


def _verdict(md: str) -> str:
    return md.split("## Verdict", 1)[1].split("## How the numbers were made", 1)[0]


def test_the_verdict_comes_before_the_tables_and_its_numbers_are_the_paired_ones(report):
    results, _, html = report
    md = (html.parent / "report.md").read_text()
    assert md.index("## Verdict") < md.index("## How the numbers were made") < md.index("## Table 1: Dice")
    verdict = _verdict(md)
    first = verdict.strip().split("\n\n")[0]
    # The primary comparison first: the BE system against its own baseline in Dice, at 5%.
    assert first.startswith("Primary comparison, segresnet_be vs segresnet_dice in Dice on 4 test cases, 2 seeds: "
                            "no difference shown, ")
    # the mean difference is the mean over cases of the seed-averaged per-case differences (numpy, from the CSVs)
    be = [_csv_values(results, "segresnet_be", s, "dice") for s in SEEDS]
    base = [_csv_values(results, "segresnet_dice", s, "dice") for s in SEEDS]
    d = np.array([np.mean([b[c] for b in be]) - np.mean([b[c] for b in base]) for c in CASES])
    assert _numbers(first.split("no difference shown, ", 1)[1])[0] == pytest.approx(d.mean(), abs=5e-4)
    # The exact paired sign-flip p-value (scipy); and 4 cases can never reach 5%: the smallest p-value is 2 / 2^4.
    p = stats.permutation_test((d,), np.mean, permutation_type="samples", n_resamples=np.inf).pvalue
    assert f"p = {p:.3g}, two-sided, 5% level" in first and "the smallest possible p-value is 0.125" in first
    assert "(95% interval unbounded;" in first
    # This folder has no plan.json: the report says the primary comparison was chosen now, by a rule.
    assert "No primary comparison is declared in" in first and "does not look at the results" in first
    # Then the family, untested because the primary did not reject, and why nothing could have been called anyway.
    family = verdict.strip().split("\n\n")[1]
    assert family.startswith("Secondary comparisons: the other 3 (1 system x 4 metrics x 1 class, less the primary) "
                             "were not tested.")
    assert "above Holm's first threshold 0.05/3 = 0.0167" in family
    assert "Holm's step-down" in verdict and "sign-flip" in verdict and "two-level" in verdict
    assert "better" not in verdict.replace("'better'", "") and "worse" not in verdict.replace("'worse'", "")
    assert "paired_dice.png" in verdict


@pytest.mark.parametrize("metric, mean, reject, word", [
    ("dice", -0.002, False, "no difference shown"),
    ("dice", 0.03, True, "better"),
    ("dice", -0.03, True, "worse"),
    ("hd95_mm", -2.0, True, "better"),  # lower distances are better
    ("asd_mm", 2.0, True, "worse"),
    ("nsd", 0.05, False, "no difference shown"),  # a large difference the test did not reject is not a finding
])
def test_verdict_words_follow_the_decision(metric, mean, reject, word):
    from beseg.report.document import direction

    assert direction(metric, mean, reject) == word


def test_report_states_the_protocol_first_and_names_the_split(report):
    _, _, html = report
    md = (html.parent / "report.md").read_text()
    first = md.split("\n\n")[1]  # the paragraph right after the title
    assert first.startswith("Protocol: heldout.") and "best.pt by val Dice" in first
    assert "Per test case" in md and "Per validation case" not in md
    assert "Validation Dice on" not in md and "Test Dice on task09" in md


@pytest.mark.parametrize("fields, opening, caption", [
    ({"protocol": "paper", "split": "val", "folds": None, "selection": "best.pt by val Dice"},
     "Protocol: paper. OPTIMISTIC", "Validation Dice on task09 (optimistic: these cases chose the checkpoint)"),
    ({"protocol": "cv", "split": "oof", "folds": 5, "selection": "best.pt by val Dice, per fold"},
     "Protocol: cv (5-fold cross-validation)", "Out-of-fold Dice on task09"),
    (None, "Unknown protocol", "Dice on task09 (split not recorded)"),
])
def test_protocols_and_older_summaries(tmp_path, fields, opening, caption):
    results = make_results(tmp_path / "results", fields=fields)
    md = (write_report(results, None).parent / "report.md").read_text()
    assert md.split("\n\n")[1].startswith(opening)
    assert _md_rows(md, caption)  # the Table 1 caption names the cases
    if fields is None or fields["protocol"] != "paper":
        assert "OPTIMISTIC" not in md and "(optimistic" not in md


def test_failed_cases_are_listed_and_counted(tmp_path):
    results = make_results(tmp_path / "results")
    summary_path = results / "segresnet_be" / "seed1" / "eval" / "summary.json"
    summary = json.loads(summary_path.read_text())
    summary["failed"] = [{"case": "spleen_5", "reason": "labelsTr/spleen_5.nii.gz: file is empty"}]
    summary_path.write_text(json.dumps(summary))
    md = (write_report(results, None).parent / "report.md").read_text()
    rows = {r[0]: r for r in _md_rows(md, "Test Dice on task09")}
    assert rows["segresnet_be"][3] == "4 (1 failed)" and rows["segresnet_dice"][3] == "4"
    assert "segresnet_be/seed1: case spleen_5 failed (in no mean): labelsTr/spleen_5.nii.gz: file is empty" in md


def test_comparison_equals_stats_on_csv(report):
    results, _, html = report
    md = (html.parent / "report.md").read_text()
    table = md.split("## Paired comparison against segresnet_dice", 1)[1].split("\n## ", 1)[0]
    assert "UNADJUSTED for the number of comparisons" in table
    rows = {r[2]: r for r in (
        [c.strip() for c in line.strip("|").split("|")] for line in table.splitlines() if line.startswith("| segresnet_be")
    )}
    for metric, label in [("dice", "Dice"), ("nsd", "NSD"), ("hd95_mm", "HD95 (mm)")]:
        def averaged(system):
            per_seed = [_csv_values(results, system, s, metric) for s in SEEDS]
            return np.array([np.nanmean([p[c] for p in per_seed]) for c in CASES])

        d = averaged("segresnet_be") - averaged("segresnet_dice")
        exact = stats.permutation_test((d,), np.mean, permutation_type="samples", n_resamples=np.inf)

        def runs(system):
            return np.array([[_csv_values(results, system, s, metric)[c] for c in CASES] for s in SEEDS])

        two_level = paired_test(runs("segresnet_be"), runs("segresnet_dice"))
        row = rows[label]
        assert row[3] == "4"
        digits = 3 if metric != "hd95_mm" else 2
        assert _numbers(row[4])[0] == pytest.approx(d.mean(), abs=0.5 * 10**-digits + 1e-12)
        assert row[5] == "unbounded"  # 4 cases: no p-value can reach 5%, so no shift is excluded
        # Two seeds per system: the seeds' variance widens the case-only exact test (scipy's), never narrows it.
        assert float(row[6]) == pytest.approx(two_level.p_value, rel=1e-2)
        assert two_level.p_value >= exact.pvalue - 1e-12
        assert row[7] == ("primary" if metric == "dice" else "family")
        assert row[9] == ("no difference shown" if metric == "dice" else "not tested")
        assert row[10] == "none" and float(row[11]) == pytest.approx(0.125)
        # the missed spleen (spleen_4 of segresnet_dice seed 1) is a penalised baseline HD95 of a paired case
        assert row[12] == ("0 / 1" if metric == "hd95_mm" else "0 / 0")


def test_cost_table(report):
    results, _, html = report
    md = (html.parent / "report.md").read_text()
    rows = {r[0]: r for r in _md_rows(md, "Training time per step and the share spent computing the loss")}
    for system in SYSTEMS:
        medians, shares = [], []
        for s in SEEDS:
            entries = [json.loads(x) for x in (results / system / f"seed{s}" / "metrics.jsonl").read_text().splitlines()]
            train = [e for e in entries if e["kind"] == "train"]
            medians.append(np.median([e["step_time_s"] for e in train]))
            shares.append(sum(e["loss_time_s"] for e in train) / sum(e["step_time_s"] for e in train))
        assert rows[system][1:3] == ["2", "80"]
        assert float(rows[system][3]) == pytest.approx(np.mean(medians), abs=5e-4)
        assert float(rows[system][5]) == pytest.approx(100 * np.mean(shares), abs=0.05)


def test_html_is_self_contained(report):
    _, _, html = report
    text = html.read_text()
    srcs = re.findall(r'<img src="([^"]*)"', text)
    assert len(srcs) == 4 and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert "<link" not in text and "<script" not in text


# --------------------------------------------------------------------------- missing and partial runs


def test_unfinished_run_is_skipped_with_note(tmp_path):
    results = make_results(tmp_path / "results")
    shutil.rmtree(results / "segresnet_be" / "seed1" / "eval")
    (results / "segresnet_be" / "seed1" / "metrics.jsonl").write_text("{truncated")
    with (results / "segresnet_dice" / "seed0" / "metrics.jsonl").open("a") as f:
        f.write('{"kind": "train", "st')
    html = write_report(results, None, out_dir=tmp_path / "out")
    md = (html.parent / "report.md").read_text()
    assert "skipped segresnet_be/seed1:" in md and "summary.json" in md
    assert "1 line(s) are not JSON" in md
    assert "no dataset folder given" in md
    assert [r.name for r in collect_results(results).runs] == ["segresnet_be/seed0", "segresnet_dice/seed0",
                                                               "segresnet_dice/seed1"]


def test_missing_baseline_and_phantom_task(tmp_path):
    results = make_results(tmp_path / "results", task="phantom-spleen")
    (results / "plan.json").write_text(json.dumps({"primary": {
        "system": "segresnet_be", "baseline": "segresnet_dice", "metric": "dice", "declared_at": "2026-12-01"}}))
    shutil.rmtree(results / "segresnet_dice")
    md = (write_report(results, make_dataset(tmp_path / "data")).parent / "report.md").read_text()
    assert "Not computed: the baseline segresnet_dice has no run" in md
    assert ("Primary comparison, segresnet_be vs segresnet_dice in Dice: not computed (segresnet_dice has no run "
            "here).") in md
    assert "paper" not in md.split("**Test Dice on phantom-spleen**", 1)[1].split("\n\n", 2)[1].splitlines()[0]
    assert "The paper's Table 1" not in md


def test_one_system_alone_has_no_verdict(tmp_path):
    results = make_results(tmp_path / "results")
    shutil.rmtree(results / "segresnet_be")
    md = (write_report(results, None).parent / "report.md").read_text()
    assert "## Verdict" not in md and "Primary comparison" not in md
    assert "Not computed: there is no other system to compare with segresnet_dice." in md


@pytest.mark.parametrize("damage, match", [
    (lambda r: shutil.rmtree(r), "does not exist"),
    (lambda r: [shutil.rmtree(p) for p in r.iterdir()], "no <system>/seed<k>/ folders"),
    (lambda r: [shutil.rmtree(p / "seed0" / "eval") or shutil.rmtree(p / "seed1" / "eval") for p in r.iterdir()],
     "no finished run"),
    (lambda r: (r / "segresnet_be" / "seed0" / "eval" / "summary.json").write_text(
        json.dumps({"task": "task01", "classes": ["spleen"]})), "different tasks"),
])
def test_unusable_results_raise_report_error(tmp_path, damage, match):
    results = make_results(tmp_path / "results")
    damage(results)
    with pytest.raises(ReportError, match=match):
        write_report(results, None)


def test_bad_per_case_csv_skipped(tmp_path):
    results = make_results(tmp_path / "results")
    (results / "segresnet_be" / "seed0" / "eval" / "per_case.csv").write_text("case,class,dice\nspleen_1,spleen,0.9\n")
    res = collect_results(results)
    assert len(res.runs) == 3 and "missing column(s) hd95_mm, asd_mm, nsd" in res.notes[0]


# --------------------------------------------------------------------------- nnU-Net runs: repeats, not seeds

NNUNET = "nnUNetTrainerBE"
REPEATS = (0, 1, 2)
NNUNET_EPOCHS = 6
NNUNET_SELECTION = "checkpoint_final.pth (nnU-Net's final epoch, no selection)"


def write_nnunet_run(run: Path, repeat: int, rng: np.random.Generator) -> None:
    """An nnU-Net run folder ``<system>/repeat<k>`` as beseg's nnU-Net systems write it: beseg's evaluation
    files (numbers made up as for segresnet_be), nnU-Net's config.yaml, and one train and one val line per epoch
    with nnU-Net's negative Dice + CE loss and no loss_time_s."""
    write_run(run, "segresnet_be", repeat, rng)
    (run / "config.yaml").write_text(
        f"system: {NNUNET}\nkind: nnunet\nnnunet: {{trainer: {NNUNET}, configuration: 3d_fullres, "
        "plans: nnUNetPlans, nnunetv2: 2.8.1, dataset: Dataset009_Spleen, fold: 0}\n")
    lines = []
    for epoch in range(NNUNET_EPOCHS):
        step = 250 * (epoch + 1)
        lines.append({"kind": "train", "step": step, "epoch": epoch, "loss": -0.2 - 0.1 * epoch + rng.uniform(0, 0.02),
                      "step_time_s": 0.5 + rng.uniform(0, 0.1)})
        lines.append({"kind": "val", "step": step, "epoch": epoch, "dice_mean": 0.6 + 0.05 * epoch})
    (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    summary = json.loads((run / "eval" / "summary.json").read_text())
    (run / "eval" / "summary.json").write_text(json.dumps({**summary, "kind": "nnunet", "selection": NNUNET_SELECTION}))


def make_nnunet_results(root: Path) -> Path:
    """segresnet_dice with seeds 0 and 1 beside nnUNetTrainerBE with repeats 0, 1 and 2."""
    rng = np.random.default_rng(5)
    for seed in SEEDS:
        write_run(root / "segresnet_dice" / f"seed{seed}", "segresnet_dice", seed, rng)
    for repeat in REPEATS:
        write_nnunet_run(root / NNUNET / f"repeat{repeat}", repeat, rng)
    return root


@pytest.fixture(scope="module")
def nnunet_report(tmp_path_factory) -> tuple[Path, str]:
    """(results folder, report.md) of a seed system beside an nnU-Net system with repeats."""
    tmp = tmp_path_factory.mktemp("nnunet_report")
    results = make_nnunet_results(tmp / "results")
    html = write_report(results, make_dataset(tmp / "data"))
    return results, (html.parent / "report.md").read_text()


def _run_values(results: Path, folder: str, metric: str) -> dict[str, float]:
    with (results / folder / "eval" / "per_case.csv").open() as f:
        return {r["case"]: float(r[metric]) for r in csv.DictReader(f)}


def test_collect_reads_repeat_folders_as_repeats(tmp_path):
    results = make_nnunet_results(tmp_path / "results")
    shutil.rmtree(results / NNUNET / "repeat2" / "eval")
    res = collect_results(results)
    assert [r.name for r in res.runs] == [f"{NNUNET}/repeat0", f"{NNUNET}/repeat1", "segresnet_dice/seed0",
                                          "segresnet_dice/seed1"]
    assert [r.unit for r in res.runs] == ["repeat", "repeat", "seed", "seed"]
    assert res.units(NNUNET) == ["repeat"] and res.units("segresnet_dice") == ["seed"] and res.has_repeats
    assert [r.is_nnunet for r in res.runs] == [True, True, False, False]
    assert any(n.startswith(f"skipped {NNUNET}/repeat2: ") and "summary.json" in n for n in res.notes)
    assert not any("seed2" in n for n in res.notes)
    assert not collect_results(make_results(tmp_path / "seeds_only")).has_repeats


def test_table1_counts_repeats_for_nnunet_and_seeds_for_the_others(nnunet_report):
    results, md = nnunet_report
    table = md.split("**Test Dice on task09**", 1)[1]
    assert table.strip().splitlines()[0].startswith("| system | seeds / repeats | spleen Dice | cases |")
    rows = {r[0]: r for r in _md_rows(md, "Test Dice on task09")}
    assert rows[NNUNET][1] == "repeats 0,1,2" and rows["segresnet_dice"][1] == "seeds 0,1"
    # the nnU-Net cell is the mean and sample std over its repeats of each repeat's case mean (from the CSVs)
    means = [np.mean(list(_run_values(results, f"{NNUNET}/repeat{k}", "dice").values())) for k in REPEATS]
    got = _numbers(rows[NNUNET][2])
    assert got[0] == pytest.approx(np.mean(means), abs=5e-4) and got[1] == pytest.approx(np.std(means, ddof=1), abs=5e-4)
    assert "(mean ± std over seeds / repeats)" in md and "over seeds)" not in md


def test_verdict_counts_repeats_and_seeds_separately(nnunet_report):
    _, md = nnunet_report
    verdict = md.split("## Verdict", 1)[1].split("## How the numbers were made", 1)[0]
    # segresnet_dice's BE version here is the nnU-Net BE trainer: the default primary comparison.
    assert verdict.strip().startswith(f"Primary comparison, {NNUNET} vs segresnet_dice in Dice on 4 test cases, "
                                      "3 repeats / 2 seeds: ")
    assert "each case's value is first averaged over a system's seeds / repeats" in verdict


def test_listing_note_and_settings_name_repeats_and_the_nnunet_trainer(nnunet_report):
    _, md = nnunet_report
    how = md.split("## How the numbers were made", 1)[1].split("\n## ", 1)[0]
    assert f"- {NNUNET}: repeats 0,1,2; nnU-Net v2 2.8.1: trainer {NNUNET}, configuration 3d_fullres, " \
           "plans nnUNetPlans" in how.splitlines()
    assert "- segresnet_dice: seeds 0,1; network segresnet, loss dice" in how.splitlines()
    note = "nnU-Net sets no seed; its repeats are reruns of identical settings"
    assert md.count(note) == 1 and f"Repeats ({NNUNET})" in how
    # the protocol sentence says whose checkpoint is which
    assert md.split("\n\n")[1].endswith(f"(checkpoint: {NNUNET}: {NNUNET_SELECTION}; segresnet_dice: "
                                         "best.pt by val Dice).")


def test_seed_only_report_never_mentions_repeats(report):
    _, _, html = report
    md = (html.parent / "report.md").read_text()
    assert "repeat" not in md.lower() and "nnU-Net" not in md
    assert "| system | seeds | spleen Dice |" in md


def test_cost_table_shows_nnunet_step_time_and_no_loss_share(nnunet_report):
    results, md = nnunet_report
    rows = {r[0]: r for r in _md_rows(md, "Training time per step and the share spent computing the loss")}
    medians = []
    for k in REPEATS:
        entries = [json.loads(x) for x in (results / NNUNET / f"repeat{k}" / "metrics.jsonl").read_text().splitlines()]
        medians.append(np.median([e["step_time_s"] for e in entries if e["kind"] == "train"]))
    assert rows[NNUNET][1:3] == ["3", str(3 * NNUNET_EPOCHS)]
    assert float(rows[NNUNET][3]) == pytest.approx(np.mean(medians), abs=5e-4)
    assert rows[NNUNET][4:] == ["n/a", "n/a"]
    assert rows["segresnet_dice"][4] != "n/a" and 0 < float(rows["segresnet_dice"][5]) < 100
    cost = md.split("## Cost", 1)[1].split("\n## ", 1)[0]
    assert f"nnU-Net ({NNUNET})" in cost and "includes nnU-Net's per-epoch validation" in cost


def test_nnunet_report_renders_with_negative_losses(nnunet_report):
    results, md = nnunet_report
    out = results / "report"
    assert sorted(p.name for p in (out / "figures").glob("*.png")) == [
        "figure1_contours.png", "figure1_filter.png", "learning_curves.png", "paired_dice.png"]
    assert "one line per seed / repeat" in md and "negative by construction" in md
    html = (out / "report.html").read_text()
    assert "repeats 0,1,2" in html and "3 repeats / 2 seeds" in html
    assert len(re.findall(r'<img src="data:image/png;base64,', html)) == 4


def test_failed_case_of_a_repeat_names_the_repeat_folder(tmp_path):
    results = make_nnunet_results(tmp_path / "results")
    path = results / NNUNET / "repeat1" / "eval" / "summary.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "failed": [{"case": "spleen_5", "reason": "unreadable"}]}))
    md = (write_report(results, None).parent / "report.md").read_text()
    assert f"{NNUNET}/repeat1: case spleen_5 failed (in no mean): unreadable" in md


@pytest.mark.parametrize("config, text", [
    ({"system": "segresnet_be", "model": {"network": "segresnet"}, "loss": {"name": "dice_be", "lambda_be": 1000.0}},
     "network segresnet, loss dice_be"),  # the engine's config.yaml
    ({"system": "unet_dice", "network": "unet", "loss": "dice"}, "network unet, loss dice"),
    ({"kind": "nnunet", "nnunet": {"trainer": "nnUNetTrainer", "configuration": "2d", "plans": "nnUNetResEncUNetMPlans"}},
     "nnU-Net v2: trainer nnUNetTrainer, configuration 2d, plans nnUNetResEncUNetMPlans"),
    ({"kind": "nnunet"}, "nnU-Net v2: trainer not recorded"),
    ({"system": "x"}, ""),
])
def test_settings_text(config, text):
    from beseg.report.document import settings_text

    assert settings_text(config) == text


#: The paper's Table 1 (validation Dice) as REFERENCE.md gives it, typed here: a typo in paper.py fails.
REFERENCE_TABLE1 = {
    "unet_dice": (0.72, 0.94), "ahnet_dice": (0.81, 0.95), "segresnet_dice": (0.83, 0.95),
    "segresnet_boundary": (0.85, 0.94), "segresnet_focal": (0.85, 0.95), "segresnet_be": (0.85, 0.96),
}
#: The nine numbers still legible in the seed copy's Table 1 (seed text, lines after "Table 1:").
SEED_LEGIBLE = (0.81, 0.85, 0.85, 0.95, 0.95, 0.94, 0.95, 0.85, 0.96)


def test_paper_table1_matches_the_reference():
    assert {r.system: (r.dice["task01"], r.dice["task09"]) for r in PAPER_TABLE1} == REFERENCE_TABLE1
    for system, (t01, t09) in REFERENCE_TABLE1.items():
        assert paper_dice(system, "Task01_BrainTumour")[1] == t01 and paper_dice(system, "task09")[1] == t09
    # every legible seed number is one of the table's values, as often as it is legible
    values = [v for r in PAPER_TABLE1 for v in r.dice.values()]
    for v in set(SEED_LEGIBLE):
        assert values.count(v) >= SEED_LEGIBLE.count(v), v


def test_msd_task_key():
    assert msd_task_key("task09") == "task09" and msd_task_key("Task01_BrainTumour") == "task01"
    assert msd_task_key("phantom-spleen") is None and msd_task_key("task03") is None


# --------------------------------------------------------------------------- the page in a browser


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


def _load_in_chromium(page: Path, tmp: Path, screenshot: Path | None = None) -> str:
    binary = _chromium()
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is required in CI to check the report page: apt-get install -y chromium")
        pytest.skip("chromium not installed (Debian: apt-get update && apt-get install -y chromium)")
    args = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--disable-dev-shm-usage", f"--user-data-dir={tmp / 'profile'}", "--virtual-time-budget=10000"]
    if screenshot is not None:
        args += ["--window-size=1280,4000", f"--screenshot={screenshot}"]
    else:
        args += ["--window-size=1280,800", "--dump-dom"]  # a laptop's first screen
    proc = subprocess.run([*args, page.as_uri()], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def _probe(html: Path, tmp_path: Path, script: str, attribute: str):
    """Load a copy of the report with ``script`` appended in Chromium; the JSON it set as ``attribute`` on <body>."""
    page = tmp_path / "probe.html"
    page.write_text(html.read_text().replace("</body>", script + "</body>"))
    dom = _load_in_chromium(page, tmp_path)
    m = re.search(attribute + r'="([^"]*)"', dom)
    assert m, dom[-2000:]
    return json.loads(m.group(1).replace("&quot;", '"'))


@pytest.mark.slow
def test_every_image_loads_in_headless_chromium(report, tmp_path):
    _, _, html = report
    # A copy of the page with a probe: on load, record for every image whether it decoded, and add a
    # deliberately broken image first so the probe is shown to detect a broken one.
    probe = (
        '<img id="control" src="data:image/png;base64,AAAA">'
        "<script>window.addEventListener('load', () => { document.body.setAttribute('data-images', "
        "JSON.stringify([...document.images].map(i => i.complete && i.naturalWidth > 0))); });</script>"
    )
    loaded = _probe(html, tmp_path, probe, "data-images")
    assert loaded == [True, True, True, True, False]  # four report figures, then the broken control
    shot = tmp_path / "shot.png"
    _load_in_chromium(html, tmp_path, screenshot=shot)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_the_first_screen_shows_the_verdict_and_the_paired_plot(report, tmp_path):
    _, _, html = report
    # In a 1280x800 window: where the verdict's heading and the paired plot end, and where Table 1 starts.
    probe = (
        "<script>window.addEventListener('load', () => { const h = [...document.querySelectorAll('h2')]; "
        "const top = t => h.find(e => e.textContent.startsWith(t)).getBoundingClientRect().top; "
        "const img = [...document.images].find(i => i.src.length > 0 && i.alt.startsWith('Per-case Dice'));"
        "document.body.setAttribute('data-layout', JSON.stringify({screen: window.innerHeight, verdict: top('Verdict'), "
        "plot_bottom: img.getBoundingClientRect().bottom, table1: top('Table 1')})); });</script>"
    )
    layout = _probe(html, tmp_path, probe, "data-layout")
    assert layout["verdict"] < layout["plot_bottom"] <= layout["screen"] < layout["table1"], layout

"""``beseg bench verdict``: the report's decision code on simulated experiments (beseg.bench.verdict)."""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import numpy as np
import pytest

from beseg.bench.verdict import CaseModel, _pvalues, simulate_scores, simulate_verdict
from beseg.cli import main
from beseg.metrics import METRIC_NAMES
from beseg.report import write_report
from beseg.report.stats import SignFlips
from beseg.report.verdict import decide


@pytest.mark.slow
def test_the_corrected_verdict_keeps_its_false_positive_rate_and_finds_a_real_gain():
    # 2,000 null experiments of 5 systems x 4 metrics against one baseline (20 comparisons), 32 cases: the report's
    # verdict calls something better or worse in at most 6.5% of them, the uncorrected rule in more than 40%; and a
    # true +0.03 Dice gain of the primary system is found in at least 80% of 2,000 experiments.
    start = time.perf_counter()
    r = simulate_verdict(systems=5, cases=32, metrics=4, simulations=2000, effect=0.03, seed=0)
    print(f"\n5 systems x 4 metrics, 32 cases, 2000 null experiments: corrected {100 * r.corrected:.1f}%, "
          f"uncorrected {100 * r.uncorrected:.1f}% (primary alone {100 * r.primary_alone:.1f}%, Holm without the gate "
          f"{100 * r.holm_ungated:.1f}%, both at 5% without the gate {100 * r.no_gate:.1f}%); power at +0.03 Dice "
          f"{100 * r.power:.1f}%; "
          f"{time.perf_counter() - start:.1f} s")
    assert r.comparisons == 20 and r.simulations == 2000
    assert r.corrected <= 0.065
    assert r.uncorrected > 0.40
    assert r.power >= 0.80


def test_seed_luck_is_not_a_finding_with_several_seeds():
    # Each run shifts all its cases (seed-to-seed SD 0.02 Dice, large against the per-case noise): with 3 seeds the
    # two-level test keeps the primary comparison's false-positive rate near 5%.
    r = simulate_verdict(systems=1, cases=16, metrics=1, simulations=300, effect=0.0, seeds=3,
                         model=CaseModel(seed_sd=0.02), seed=1)
    assert r.primary_alone <= 0.09


def test_the_planted_gain_is_the_requested_mean_dice_difference():
    rng = np.random.default_rng(0)
    scores = simulate_scores(rng, 400, 1, 64, effect=0.03)
    gain = (scores[:, 1, 0, :, 0] - scores[:, 0, 0, :, 0]).mean()
    assert gain == pytest.approx(0.03, abs=0.002)
    assert scores[..., 0].min() > 0 and scores[..., 0].max() < 1 and scores[..., 1:3].min() > 0
    null = simulate_scores(rng, 400, 1, 64)
    d = null[:, 1, 0] - null[:, 0, 0]  # (sims, cases, metrics)
    corr = np.corrcoef(d.reshape(-1, 4).T)
    assert corr[0, 3] > 0.6 and corr[0, 1] < -0.3  # Dice moves with NSD and against HD95, as real metrics do
    assert abs(d[..., 0].mean()) < 0.002


def _write_results(root: Path, scores: np.ndarray, names: list[str]) -> Path:
    """A results folder with one ``<system>/seed<k>/eval`` per simulated run (one class, ``organ``)."""
    for s, name in enumerate(names):
        for k in range(scores.shape[1]):
            folder = root / name / f"seed{k}" / "eval"
            folder.mkdir(parents=True)
            with (folder / "per_case.csv").open("w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["case", "class", *METRIC_NAMES, "empty_in"])
                for c in range(scores.shape[2]):
                    w.writerow([f"case{c:02d}", "organ", *(f"{v:.9f}" for v in scores[s, k, c]), "none"])
            (folder / "summary.json").write_text(json.dumps({
                "task": "sim", "classes": ["organ"], "protocol": "heldout", "split": "test", "failed": []}))
    return root


def test_the_benchmark_decides_exactly_what_the_report_says(tmp_path):
    # One simulated experiment, written as a results folder: the words of the report's paired table are the bench's
    # decisions on the same numbers. A clear primary gain opens the gate; sys2 is clearly worse in HD95.
    rng = np.random.default_rng(3)
    scores = simulate_scores(rng, 1, 3, 16, effect=0.08)[0]  # (4 systems, 1 seed, 16 cases, 4 metrics)
    scores[2, :, :, 1] *= 1.8
    names = ["base", "sys1", "sys2", "sys3"]
    md = (write_report(_write_results(tmp_path / "results", scores, names), None).parent / "report.md").read_text()
    table = md.split("**Paired differences on the test cases (unadjusted intervals and p-values)**", 1)[1]
    words = {}
    for line in table.strip().splitlines()[2:]:
        if not line.startswith("| sys"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        words[(cells[0], cells[2])] = cells[9]
    p = _pvalues(scores[None], 4, SignFlips(16, 0))[0]  # (systems, metrics), as the benchmark computes them
    flat = p.reshape(-1)
    decision = decide(flat[0], flat[1:])
    labels = ["Dice", "HD95 (mm)", "ASD (mm)", "NSD"]
    rejected = [bool(decision.primary), *map(bool, decision.family)]
    assert rejected[0] and rejected[1 * 4 + 1]  # the planted gain, and sys2's HD95
    for i, reject in enumerate(rejected):
        system, metric = names[1 + i // 4], labels[i % 4]
        assert (words[(system, metric)] in ("better", "worse")) == reject, (system, metric, words)
    assert words[("sys1", "Dice")] == "better" and words[("sys2", "HD95 (mm)")] == "worse"
    verdict = md.split("## Verdict", 1)[1].split("## How the numbers were made", 1)[0]
    assert verdict.strip().startswith("Primary comparison, sys1 vs base in Dice on 16 test cases, 1 seed: better")
    assert "Secondary comparisons, tested because the primary comparison rejected: the other 11" in verdict


def test_cli_prints_both_rates_and_the_power(capsys):
    assert main(["bench", "verdict", "--systems", "2", "--cases", "8", "--simulations", "40"]) == 0
    out = capsys.readouterr().out
    assert "corrected" in out and "uncorrected" in out and "power" in out
    row = next(line for line in out.splitlines() if line.split()[:3] == ["2", "8", "8"])
    assert row.count("%") == 6


@pytest.mark.parametrize("argv", [["--systems", "0"], ["--cases", "1"], ["--seed-sd", "-1"]])
def test_cli_rejects_bad_arguments_in_one_line(argv, capsys):
    assert main(["bench", "verdict", *argv]) == 1
    err = capsys.readouterr().err
    assert err.startswith("beseg bench: error: ") and "Traceback" not in err and len(err.strip().splitlines()) == 1

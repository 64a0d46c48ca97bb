"""Verdict benchmark: how often the report calls something "better" or "worse" when nothing differs.

It simulates whole experiments as the report sees them: K systems and a baseline, each scored on
the same n cases in Dice, HD95, ASD and NSD (one class), with one or more seeds, and runs the
report's own decision code on each (:func:`beseg.report.stats.sign_flip_pvalues` for the
p-values, :func:`beseg.report.stats.run_variance` for the seeds, :func:`beseg.report.verdict.decide`
for the primary comparison and the gated Holm family). System 1 is the primary one (Dice).

Per-case model (:class:`CaseModel`): a case's difficulty is shared by every system and metric;
each system deviates from it per case (the paired differences), with the four metrics' deviations
correlated as real ones are (a case a system segments worse has a lower Dice and NSD and larger
distances); with several seeds, part of that deviation is new in every run and each run also
shifts all its cases alike (seed luck). Dice and NSD live on the logit scale, HD95 and ASD on the
log scale, so the scores are bounded or positive and skewed like real ones.

Null experiments draw every system from the same model: any "better" or "worse" is false. The
family-wise false-positive rate is the share of experiments with at least one, for:

* the corrected verdict (the report's rule): the primary at 5%, the family by Holm after it;
* the uncorrected rule: every comparison's own 95% interval (p <= 0.05);
* and, to show what the gate adds: the primary alone, the Holm family alone, and both at 5% each
  without the gate.

Power: the primary system gains ``effect`` Dice on average (a logit shift calibrated to that mean
gain); the share of experiments where the primary comparison calls it "better".
"""

from __future__ import annotations

import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from beseg.errors import ConfigError
from beseg.metrics import METRIC_NAMES
from beseg.report.stats import SignFlips, run_variance, sign_flip_pvalues
from beseg.report.verdict import ALPHA, decide

__all__ = ["CaseModel", "VerdictRates", "simulate_scores", "simulate_verdict", "run_verdict_benchmark"]

#: Correlation of a system's per-case deviations between metrics, each oriented so that larger is better
#: (Dice, HD95, ASD, NSD: the distances enter with a minus sign).
METRIC_CORRELATION = np.array([
    [1.0, 0.5, 0.6, 0.8],
    [0.5, 1.0, 0.7, 0.5],
    [0.6, 0.7, 1.0, 0.6],
    [0.8, 0.5, 0.6, 1.0],
])


def _logit(p: float) -> float:
    return float(np.log(p / (1 - p)))


@dataclass(frozen=True)
class CaseModel:
    """The distribution of one system's per-case scores (SDs in Dice units near the mean Dice).

    Attributes:
        dice: mean Dice.
        case_sd: between-case SD of Dice from the case's difficulty (shared by all systems and metrics).
        system_sd: SD of a system's own per-case deviation (the SD of a paired Dice difference
            is about sqrt(2) times this).
        seed_sd: SD of a run's shift of all its cases (seed to seed), 0 for none.
        nsd: mean NSD; ``hd95_mm``, ``asd_mm``: median HD95 and ASD (mm).
    """

    dice: float = 0.85
    case_sd: float = 0.07
    system_sd: float = 0.032
    seed_sd: float = 0.0
    nsd: float = 0.75
    hd95_mm: float = 6.0
    asd_mm: float = 1.5

    @property
    def slope(self) -> float:
        """d Dice / d logit at the mean Dice: converts the Dice-unit SDs to the logit scale."""
        return self.dice * (1 - self.dice)

    def describe(self) -> str:
        return (f"mean Dice {self.dice} (between-case SD {self.case_sd}, case difficulty shared by every system and "
                f"metric), a system's own per-case SD {self.system_sd} Dice (paired differences ~"
                f"{self.system_sd * 2**0.5:.3f}), seed-to-seed SD {self.seed_sd} Dice; NSD {self.nsd}, HD95 "
                f"{self.hd95_mm} mm, ASD {self.asd_mm} mm; the four metrics' deviations correlated 0.5-0.8")


def _effect_shift(model: CaseModel, effect: float) -> float:
    """The logit shift of Dice whose mean gain over the case distribution is ``effect`` (bisection)."""
    if effect == 0:
        return 0.0
    rng = np.random.default_rng(12345)
    x = _logit(model.dice) + rng.standard_normal(200_000) * np.hypot(model.case_sd, model.system_sd) / model.slope
    base = 1 / (1 + np.exp(-x))
    lo, hi = (0.0, 10.0) if effect > 0 else (-10.0, 0.0)
    for _ in range(60):
        mid = (lo + hi) / 2
        gain = float(np.mean(1 / (1 + np.exp(-(x + mid))) - base))
        lo, hi = (mid, hi) if (gain < effect) == (effect > 0) else (lo, mid)
    return (lo + hi) / 2


def simulate_scores(rng: np.random.Generator, simulations: int, systems: int, cases: int, seeds: int = 1,
                    model: CaseModel = CaseModel(), effect: float = 0.0) -> np.ndarray:
    """Per-case scores of simulated experiments.

    Args:
        rng: the random generator.
        simulations: experiments.
        systems: systems besides the baseline (system 0).
        cases: cases per experiment.
        seeds: runs per system.
        model: the per-case model.
        effect: mean Dice gain of system 1 (0: every system from one distribution).

    Returns:
        ``(simulations, systems + 1, seeds, cases, 4)`` scores, the metrics in ``METRIC_NAMES`` order
        (Dice, HD95 mm, ASD mm, NSD).
    """
    k = systems + 1
    chol = np.linalg.cholesky(METRIC_CORRELATION)
    # Standardised units: the between-case SD of every metric's latent quality is 1.
    difficulty = rng.standard_normal((simulations, 1, 1, cases, 1))
    # A system's own per-case deviation: persistent across its seeds, plus a part new in every run when there are
    # several (half the variance each); plus each run's shift of all its cases.
    deviation = rng.standard_normal((simulations, k, 1, cases, 4)) @ chol.T
    if seeds > 1:
        fresh = rng.standard_normal((simulations, k, seeds, cases, 4)) @ chol.T
        deviation = np.sqrt(0.5) * (deviation + fresh)
    run = rng.standard_normal((simulations, k, seeds, 1, 4)) @ chol.T * (model.seed_sd / model.system_sd)
    latent = difficulty + (deviation + run) * (model.system_sd / model.case_sd)
    shift = np.zeros((1, k, 1, 1, 1))
    shift[0, 1] = _effect_shift(model, effect)
    sigmoid = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
    dice = sigmoid(_logit(model.dice) + latent[..., 0:1] * (model.case_sd / model.slope) + shift)
    hd95 = model.hd95_mm * np.exp(-0.5 * latent[..., 1:2])  # log-normal: between-case log-SD 0.5
    asd = model.asd_mm * np.exp(-0.5 * latent[..., 2:3])
    nsd = sigmoid(_logit(model.nsd) + 0.8 * latent[..., 3:4])
    return np.concatenate([dice, hd95, asd, nsd], axis=-1)


def _pvalues(scores: np.ndarray, metrics: int, flips: SignFlips) -> np.ndarray:
    """``(simulations, systems, metrics)`` p-values of every system against system 0, as the report computes them."""
    runs = np.moveaxis(scores[..., :metrics], -1, 2)  # (sims, k, metrics, seeds, cases)
    system, baseline = runs[:, 1:], runs[:, :1]
    diffs = system.mean(axis=3) - baseline.mean(axis=3)  # seed-averaged per case
    var, df = run_variance(system, np.broadcast_to(baseline, system.shape[:3] + baseline.shape[3:]))
    return sign_flip_pvalues(diffs, flips, var, df)


@dataclass(frozen=True)
class VerdictRates:
    """What :func:`simulate_verdict` measured (rates are shares of the simulated experiments).

    Attributes:
        systems: systems compared with the baseline.
        cases: cases per experiment.
        metrics: metrics per system.
        seeds: runs per system.
        simulations: experiments per rate.
        corrected: null: the verdict (primary at 5%, gated Holm family) calls something better or worse.
        uncorrected: null: some comparison's own 95% interval excludes 0.
        primary_alone: null: the primary comparison rejects.
        holm_ungated: null: Holm on the family, without the gate, rejects something.
        no_gate: null: the primary at 5% or the Holm family at 5% rejects something (the verdict without the gate).
        power: with ``effect``: the primary comparison calls the primary system better.
        effect: the mean Dice gain of the primary system in the power simulations.
        seconds: wall time.
    """

    systems: int
    cases: int
    metrics: int
    seeds: int
    simulations: int
    corrected: float
    uncorrected: float
    primary_alone: float
    holm_ungated: float
    no_gate: float
    power: float
    effect: float
    seconds: float

    @property
    def comparisons(self) -> int:
        return self.systems * self.metrics


def simulate_verdict(systems: int, cases: int, metrics: int = 4, simulations: int = 2000, effect: float = 0.03,
                     seeds: int = 1, model: CaseModel = CaseModel(), seed: int = 0) -> VerdictRates:
    """Measure the verdict's family-wise false-positive rate, with and without the correction, and its power.

    Args:
        systems: systems compared with the baseline (>= 1).
        cases: cases per experiment (>= 2).
        metrics: the first ``metrics`` of Dice, HD95, ASD, NSD (1-4).
        simulations: experiments per rate.
        effect: mean Dice gain of the primary system for the power.
        seeds: runs per system.
        model: the per-case model (its ``seed_sd`` is the seed-to-seed spread).
        seed: seed of the simulation and of the sign patterns.

    Returns:
        The :class:`VerdictRates`.

    Raises:
        ConfigError: an argument out of range.
    """
    if systems < 1 or cases < 2 or not 1 <= metrics <= len(METRIC_NAMES) or simulations < 1 or seeds < 1:
        raise ConfigError(f"need systems >= 1, cases >= 2, 1-{len(METRIC_NAMES)} metrics, simulations >= 1 and "
                          f"seeds >= 1; got {systems}, {cases}, {metrics}, {simulations}, {seeds}.")
    start = time.perf_counter()
    rng = np.random.default_rng([seed, systems, cases, metrics, seeds])
    flips = SignFlips(cases, seed)
    null = _pvalues(simulate_scores(rng, simulations, systems, cases, seeds, model), metrics, flips)
    flat = null.reshape(simulations, -1)  # system 1's Dice first: the primary comparison
    decision = decide(flat[:, 0], flat[:, 1:], ALPHA)
    power_scores = simulate_scores(rng, simulations, 1, cases, seeds, model, effect)
    gain = power_scores[:, 1, :, :, 0].mean(axis=1) - power_scores[:, 0, :, :, 0].mean(axis=1)
    primary_p = _pvalues(power_scores, 1, flips)[:, 0, 0]
    better = decide(primary_p, np.zeros((simulations, 0)), ALPHA).primary & (gain.mean(axis=1) > 0)
    return VerdictRates(systems, cases, metrics, seeds, simulations, float(decision.any_claim.mean()),
                        float(decision.any_uncorrected.mean()), float(decision.primary.mean()),
                        float(decision.holm.reject.any(axis=-1).mean()),
                        float((decision.primary | decision.holm.reject.any(axis=-1)).mean()), float(better.mean()), effect,
                        time.perf_counter() - start)


def run_verdict_benchmark(systems: Sequence[int] = (2, 6, 10), cases: Sequence[int] = (16, 48), metrics: int = 4,
                          simulations: int = 2000, effect: float = 0.03, seeds: int = 1, seed_sd: float = 0.0,
                          seed: int = 0, log=print) -> list[VerdictRates]:
    """Print one line per (systems, cases): false-positive rates with and without the correction, and power.

    Returns:
        The measured :class:`VerdictRates`, in the printed order.
    """
    model = CaseModel(seed_sd=seed_sd)
    log(f"# beseg bench verdict: {simulations} simulated experiments per rate; K systems against one baseline, "
        f"{metrics} metric(s) ({', '.join(METRIC_NAMES[:metrics])}), 1 class, {seeds} seed(s) per system")
    log(f"# per case: {model.describe()}")
    log("# null: every system drawn from the baseline's distribution; rates = share of experiments in which the rule "
        "calls anything better or worse (family-wise false-positive rate)")
    log(f"# decision code: the report's (beseg.report.verdict.decide on the sign-flip p-values), alpha {ALPHA}; "
        f"power: the primary system gains {effect:+.3f} Dice on average")
    log(f"# machine: {platform.machine()}, python {platform.python_version()}, numpy {np.__version__}")
    header = (f"{'systems':>7} {'cases':>5} {'comparisons':>11} | {'corrected':>9} {'uncorrected':>11} | "
              f"{'primary alone':>13} {'Holm alone':>10} {'no gate':>7} | {'power':>6} {'seconds':>7}")
    log(header)
    out = []
    for k in systems:
        for n in cases:
            r = simulate_verdict(k, n, metrics, simulations, effect, seeds, model, seed)
            out.append(r)
            log(f"{k:>7} {n:>5} {r.comparisons:>11} | {100 * r.corrected:>8.1f}% {100 * r.uncorrected:>10.1f}% | "
                f"{100 * r.primary_alone:>12.1f}% {100 * r.holm_ungated:>9.1f}% {100 * r.no_gate:>6.1f}% | "
                f"{100 * r.power:>5.1f}% "
                f"{r.seconds:>7.1f}")
    log("# corrected: the report's verdict (primary at 5%, then Holm on the others only if the primary rejects); "
        "uncorrected: any comparison whose own 95% interval excludes 0; primary alone, Holm alone: the two parts on "
        "their own; no gate: both parts at 5% each, the family tested even when the primary does not reject")
    return out

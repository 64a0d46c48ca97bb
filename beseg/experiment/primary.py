"""The primary comparison of a comparison: declared before training, recorded in ``plan.json``.

A comparison answers one question first: by default, does the BE system beat its own baseline
(``segresnet_be`` against ``segresnet_dice``, ``nnUNetTrainerBE`` against ``nnUNetTrainer``) in mean
foreground Dice? ``--primary SYSTEM:METRIC`` asks another one. ``beseg compare`` writes it into
``RESULTS/plan.json`` (key ``primary``) when it plans the runs, before any of them trains, and a
rerun that would change it (another ``--primary``, another ``--baseline``, or systems without it)
is refused unless ``--replan`` is given; the old declaration is then kept under ``previous``, with
when it was replaced and how many runs had finished, and the report states it. The report tests the
primary comparison alone at 5% and the others as a family (:mod:`beseg.report.verdict`).

``plan.json``'s ``primary``::

    {"system": "segresnet_be", "baseline": "segresnet_dice", "metric": "dice", "chosen": "default",
     "declared_at": "2026-12-01T10:00:00+00:00", "runs_done": 0, "runs_total": 6, "previous": []}
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from beseg.errors import ConfigError
from beseg.experiment.layout import ResultsLayout
from beseg.metrics import METRIC_NAMES

__all__ = ["Primary", "METRIC_ALIASES", "metric_name", "parse_primary", "default_baseline", "be_counterpart",
           "declare_primary", "read_primary"]

#: ``--primary`` metric spellings -> the metric columns of ``per_case.csv``.
METRIC_ALIASES: dict[str, str] = {"dice": "dice", "hd95": "hd95_mm", "hd95_mm": "hd95_mm", "asd": "asd_mm",
                                  "asd_mm": "asd_mm", "nsd": "nsd"}
#: How a primary comparison came about: beseg's default rule, or the user's ``--primary``.
CHOICES = ("default", "--primary")
#: Where it was declared: in ``plan.json`` by ``beseg compare``; when a report was written for a
#: folder whose ``plan.json`` has none; by ``beseg score`` on finished predictions.
CONTEXTS = ("compare", "report", "score")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class Primary:
    """The primary comparison: ``system`` against ``baseline`` in ``metric`` (averaged over the classes).

    Attributes:
        system: the compared system.
        baseline: the system it is compared with (every comparison of the report uses it).
        metric: a ``per_case.csv`` metric (``dice``, ``hd95_mm``, ``asd_mm``, ``nsd``).
        chosen: ``default`` (beseg's rule) or ``--primary`` (the user's).
        context: ``compare`` (declared in plan.json), ``report`` (none was declared: chosen when the
            report was written) or ``score`` (``beseg score``, after the predictions were made).
        declared_at: when (ISO 8601, UTC; "" if unknown).
        runs_done: runs already finished (evaluated) when it was declared.
        runs_total: runs planned then.
        previous: earlier declarations it replaced with ``--replan``, oldest first, each a dict with
            ``system``, ``baseline``, ``metric``, ``declared_at``, ``replaced_at`` and ``runs_done``,
            ``runs_total`` at the replacement.
    """

    system: str
    baseline: str
    metric: str = "dice"
    chosen: str = "default"
    context: str = "compare"
    declared_at: str = ""
    runs_done: int = 0
    runs_total: int = 0
    previous: tuple[dict[str, Any], ...] = field(default=())

    def same(self, other: Primary) -> bool:
        """True when both ask the same question (system, baseline, metric)."""
        return (self.system, self.baseline, self.metric) == (other.system, other.baseline, other.metric)

    def describe(self) -> str:
        """``segresnet_be vs segresnet_dice in dice``."""
        return f"{self.system} vs {self.baseline} in {self.metric}"

    def to_dict(self) -> dict[str, Any]:
        """The ``plan.json`` form."""
        return {"system": self.system, "baseline": self.baseline, "metric": self.metric, "chosen": self.chosen,
                "declared_at": self.declared_at, "runs_done": self.runs_done, "runs_total": self.runs_total,
                "previous": [dict(p) for p in self.previous]}

    @classmethod
    def from_dict(cls, data: Any, where: str) -> Primary:
        """Read the ``plan.json`` form.

        Raises:
            ConfigError: not an object with string ``system``, ``baseline`` and a known ``metric``.
        """
        ok = isinstance(data, Mapping) and all(isinstance(data.get(k), str) and data.get(k)
                                               for k in ("system", "baseline", "metric"))
        if not ok or data["metric"] not in METRIC_NAMES:
            raise ConfigError(f"{where}: 'primary' must name a system, a baseline and a metric "
                              f"({', '.join(METRIC_NAMES)}); got {data!r}. Rerun the compare command with --replan.")
        previous = data.get("previous") or []
        return cls(data["system"], data["baseline"], data["metric"],
                   data.get("chosen") if data.get("chosen") in CHOICES else "default", "compare",
                   str(data.get("declared_at") or ""), int(data.get("runs_done") or 0),
                   int(data.get("runs_total") or 0),
                   tuple(dict(p) for p in previous if isinstance(p, Mapping)))


def metric_name(text: str) -> str | None:
    """The ``per_case.csv`` metric for a ``--primary`` spelling (``hd95`` -> ``hd95_mm``), or None."""
    return METRIC_ALIASES.get(text.strip().lower())


def _system_name(text: str, names: Sequence[str]) -> str | None:
    """The compared system ``text`` names: itself, a ``--systems`` alias or ``nnunet:TRAINER``."""
    if text in names:
        return text
    from beseg.experiment.plan import ALIASES  # compare's aliases (dice_be -> segresnet_be)

    alias = ALIASES.get(text.lower())
    if alias in names:
        return alias
    if text.startswith("nnunet:"):
        from beseg.experiment.nnunet_runs import NNUNetSystem

        try:
            parsed = NNUNetSystem.parse(text)
        except ConfigError:
            return None
        return parsed.name if parsed is not None and parsed.name in names else None
    return None


def parse_primary(text: str, names: Sequence[str], baseline: str, option: str = "--primary") -> tuple[str, str]:
    """``SYSTEM:METRIC`` -> ``(system, metric)``, checked against the compared systems.

    Args:
        text: e.g. ``segresnet_be:dice``, ``be:hd95``, ``nnunet:nnUNetTrainerBE:nsd``.
        names: the compared systems.
        baseline: the baseline (the primary system must be another one).
        option: the option's name, for messages.

    Raises:
        ConfigError: one line naming what is wrong: the form, an unknown metric, a system that is
            not compared, or the baseline itself.
    """
    system_text, sep, metric_text = text.strip().rpartition(":")
    if not sep or not system_text or not metric_text:
        raise ConfigError(f"{option} {text!r}: expected SYSTEM:METRIC, e.g. segresnet_be:dice (metrics: dice, hd95, "
                          "asd, nsd).")
    metric = metric_name(metric_text)
    if metric is None:
        raise ConfigError(f"{option} {text!r}: unknown metric {metric_text!r}; choose dice, hd95, asd or nsd.")
    system = _system_name(system_text.strip(), names)
    if system is None:
        raise ConfigError(f"{option} {text!r}: {system_text!r} is not one of the compared systems "
                          f"({', '.join(names)}).")
    if system == baseline:
        raise ConfigError(f"{option} {text!r}: {system} is the baseline; the primary comparison is another system "
                          "against it (or choose another --baseline).")
    return system, metric


def default_baseline(names: Sequence[str]) -> str:
    """The system the report compares the others with: nnU-Net's default trainer when it is in the comparison
    (the question is then "does BE improve nnU-Net?"), else ``segresnet_dice``, else the first system."""
    for candidate in ("nnUNetTrainer", "segresnet_dice"):
        if candidate in names:
            return candidate
    return names[0]


def be_counterpart(baseline: str, names: Sequence[str]) -> str:
    """The baseline's BE version if it is compared (``segresnet_dice`` -> ``segresnet_be``,
    ``nnUNetTrainer_ci`` -> ``nnUNetTrainerBE_ci``), else the first other system (the baseline when alone)."""
    for candidate in (f"{baseline}BE", baseline.replace("nnUNetTrainer", "nnUNetTrainerBE", 1),
                      baseline.replace("_dice", "_be"), "segresnet_be", "nnUNetTrainerBE"):
        if candidate in names and candidate != baseline:
            return candidate
    others = [n for n in names if n != baseline]
    return others[0] if others else baseline


def declare_primary(recorded: Primary | None, requested: str | None, names: Sequence[str], baseline: str,
                    replan: bool = False, runs_done: int = 0, runs_total: int = 0,
                    where: str | Path = "plan.json") -> Primary | None:
    """The primary comparison to record for this request, checked against the recorded one.

    Without ``requested`` a recorded declaration with the same baseline stays; otherwise the
    default is the baseline's BE counterpart (:func:`be_counterpart`) in Dice.

    Args:
        recorded: what ``plan.json`` holds (None: nothing yet).
        requested: ``--primary SYSTEM:METRIC`` (None: not given).
        names: the compared systems.
        baseline: the baseline of this request.
        replan: ``--replan``: a change is allowed, and recorded as one.
        runs_done: runs already finished (evaluated) now.
        runs_total: runs planned.
        where: the ``plan.json`` path, for the message.

    Returns:
        The declaration (the recorded one when nothing changed); None when the baseline is the only system.

    Raises:
        ConfigError: a bad ``--primary``, or a change of the recorded one without ``replan`` (one line).
    """
    if requested:
        system, metric = parse_primary(requested, names, baseline)
        chosen = "--primary"
    elif recorded is not None and recorded.baseline == baseline and recorded.system in names:
        system, metric, chosen = recorded.system, recorded.metric, recorded.chosen
    else:
        system, metric, chosen = be_counterpart(baseline, names), "dice", "default"
        if system == baseline:
            return None
    now = _now()
    wanted = Primary(system, baseline, metric, chosen, "compare", now, runs_done, runs_total)
    if recorded is None:
        return wanted
    if recorded.same(wanted):
        return recorded
    if not replan:
        raise ConfigError(
            f"{where} declares the primary comparison {recorded.describe()} ({recorded.declared_at or 'date unknown'}), "
            f"but this request makes it {wanted.describe()}; it is fixed before the results are seen: repeat the "
            "declared one, or pass --replan to change it (the report will say so).")
    replaced = {"system": recorded.system, "baseline": recorded.baseline, "metric": recorded.metric,
                "declared_at": recorded.declared_at, "replaced_at": now, "runs_done": runs_done,
                "runs_total": runs_total}
    return Primary(system, baseline, metric, chosen, "compare", now, runs_done, runs_total,
                   (*recorded.previous, replaced))


def read_primary(results_dir: str | Path) -> Primary | None:
    """The primary comparison recorded in ``RESULTS/plan.json``; None without one (or without a plan).

    Raises:
        ConfigError: ``plan.json`` has a malformed ``primary``.
    """
    path = ResultsLayout(results_dir).plan
    try:
        plan = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # no plan (not made by beseg compare) or unreadable: the plan's own reader reports that
    if not isinstance(plan, dict) or plan.get("primary") is None:
        return None
    return Primary.from_dict(plan["primary"], str(path))

"""The primary comparison (beseg.experiment.primary): parsed, declared once in plan.json, changed only with --replan."""

from __future__ import annotations

import json

import pytest

from beseg.errors import ConfigError
from beseg.experiment.primary import Primary, declare_primary, parse_primary, read_primary

NAMES = ["segresnet_dice", "segresnet_be", "segresnet_focal", "nnUNetTrainerBE"]


@pytest.mark.parametrize("text, expected", [
    ("segresnet_be:dice", ("segresnet_be", "dice")),
    ("be:HD95", ("segresnet_be", "hd95_mm")),  # compare's aliases, metric spellings without the unit
    ("focal:asd_mm", ("segresnet_focal", "asd_mm")),
    ("nnunet:nnUNetTrainerBE:nsd", ("nnUNetTrainerBE", "nsd")),  # as --systems spells an nnU-Net trainer
])
def test_parse_primary(text, expected):
    assert parse_primary(text, NAMES, "segresnet_dice") == expected


@pytest.mark.parametrize("text, message", [
    ("segresnet_be", "expected SYSTEM:METRIC"),
    ("segresnet_be:iou", "unknown metric 'iou'; choose dice, hd95, asd or nsd"),
    ("unet:dice", "'unet' is not one of the compared systems (segresnet_dice, segresnet_be"),
    ("dice:dice", "segresnet_dice is the baseline"),
])
def test_bad_primary_is_one_line_naming_the_problem(text, message):
    with pytest.raises(ConfigError, match=None) as err:
        parse_primary(text, NAMES, "segresnet_dice")
    assert message in str(err.value) and "\n" not in str(err.value) and str(err.value).startswith(f"--primary {text!r}")


def test_the_default_is_the_baselines_be_version_in_dice():
    p = declare_primary(None, None, NAMES, "segresnet_dice", runs_done=0, runs_total=8)
    assert (p.system, p.baseline, p.metric, p.chosen, p.runs_done, p.runs_total) == (
        "segresnet_be", "segresnet_dice", "dice", "default", 0, 8)
    assert declare_primary(None, None, ["segresnet_dice"], "segresnet_dice") is None  # nothing to compare


def test_a_declared_primary_stays_and_a_change_needs_replan():
    first = declare_primary(None, "focal:nsd", NAMES, "segresnet_dice", runs_total=8)
    assert (first.system, first.metric, first.chosen) == ("segresnet_focal", "nsd", "--primary")
    # Rerunning without --primary keeps what was declared (not the default), with its date.
    assert declare_primary(first, None, NAMES, "segresnet_dice", runs_done=3, runs_total=8) is first
    assert declare_primary(first, "segresnet_focal:nsd", NAMES, "segresnet_dice") is first
    for requested, baseline in (("be:dice", "segresnet_dice"), (None, "segresnet_focal")):
        with pytest.raises(ConfigError) as err:
            declare_primary(first, requested, NAMES, baseline, where="/r/plan.json")
        text = str(err.value)
        assert "\n" not in text and "--replan" in text and "/r/plan.json declares the primary comparison " \
            "segresnet_focal vs segresnet_dice in nsd" in text
    changed = declare_primary(first, "be:dice", NAMES, "segresnet_dice", replan=True, runs_done=5, runs_total=8)
    assert (changed.system, changed.metric) == ("segresnet_be", "dice")
    (old,) = changed.previous
    assert (old["system"], old["metric"], old["runs_done"], old["runs_total"]) == ("segresnet_focal", "nsd", 5, 8)
    assert old["declared_at"] == first.declared_at and old["replaced_at"] == changed.declared_at
    # The history survives the plan.json round trip, and a second change appends to it.
    again = declare_primary(Primary.from_dict(json.loads(json.dumps(changed.to_dict())), "plan.json"), "focal:dice",
                            NAMES, "segresnet_dice", replan=True)
    assert [p["system"] for p in again.previous] == ["segresnet_focal", "segresnet_be"]


def test_read_primary(tmp_path):
    assert read_primary(tmp_path) is None  # no plan.json
    (tmp_path / "plan.json").write_text(json.dumps({"runs": []}))
    assert read_primary(tmp_path) is None  # a plan from before primary comparisons
    p = declare_primary(None, None, NAMES, "segresnet_dice")
    (tmp_path / "plan.json").write_text(json.dumps({"runs": [], "primary": p.to_dict()}))
    assert read_primary(tmp_path).same(p)
    (tmp_path / "plan.json").write_text(json.dumps({"runs": [], "primary": {"system": "x", "metric": "iou"}}))
    with pytest.raises(ConfigError, match="'primary' must name a system, a baseline and a metric"):
        read_primary(tmp_path)

"""The paper's Table 1 (validation Dice), to show beside our numbers on the same MSD task.

Provenance: Yang et al., "Enhancing Foreground Boundaries for Medical Image Segmentation", MIDL 2020
short paper (arXiv 2005.14355), Table 1. The seed copy of the paper is garbled, so these values come
from a secondary summary that was not checked against the PDF; the nine numbers still legible in the
seed agree with it (see REFERENCE.md). They are shown for orientation only: the paper trained at
full resolution on a GPU, and its exact split and Dice averaging are not known.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["PaperRow", "PAPER_TABLE1", "PAPER_SOURCE", "msd_task_key", "paper_dice"]

PAPER_SOURCE = (
    "Yang et al., MIDL 2020 (arXiv 2005.14355), Table 1, as given by a secondary summary "
    "not checked against the PDF"
)


@dataclass(frozen=True)
class PaperRow:
    """One row of the paper's Table 1.

    Attributes:
        label: the system as the paper names it.
        system: the beseg system name that reproduces it (a ``beseg compare --systems`` name).
        dice: validation Dice per MSD task key (``task01``: brain tumour, ``task09``: spleen).
    """

    label: str
    system: str
    dice: dict[str, float]


PAPER_TABLE1: tuple[PaperRow, ...] = (
    PaperRow("U-Net", "unet_dice", {"task01": 0.72, "task09": 0.94}),
    PaperRow("AH-Net", "ahnet_dice", {"task01": 0.81, "task09": 0.95}),
    PaperRow("SegResNet", "segresnet_dice", {"task01": 0.83, "task09": 0.95}),
    PaperRow("SegResNet + boundary loss (Kervadec et al.)", "segresnet_boundary", {"task01": 0.85, "task09": 0.94}),
    PaperRow("SegResNet + focal loss", "segresnet_focal", {"task01": 0.85, "task09": 0.95}),
    PaperRow("SegResNet + BE (proposed)", "segresnet_be", {"task01": 0.85, "task09": 0.96}),
)


def msd_task_key(task: str) -> str | None:
    """``task01`` or ``task09`` when ``task`` names that MSD task (``Task09_Spleen``, ``task09``), else None.

    Phantom datasets (``phantom_spleen``) and other tasks give None: the paper has no values for them.
    """
    m = re.fullmatch(r"task0?(\d+)(?:_.*)?", task.strip().lower())
    if m is None:
        return None
    key = f"task{int(m.group(1)):02d}"
    return key if key in ("task01", "task09") else None


def paper_dice(system: str, task: str) -> tuple[str, float] | None:
    """The paper's (row label, Dice) for a beseg system name on ``task``, or None if it has none."""
    key = msd_task_key(task)
    for row in PAPER_TABLE1:
        if key is not None and row.system == system:
            return row.label, row.dice[key]
    return None

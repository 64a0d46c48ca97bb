"""The evaluation protocols: how a comparison's numbers are made, in one table every layer reads.

A dependency-free module, so that the command-line parsers can offer the protocols without
importing the data layer (:mod:`beseg.data.splits` re-exports these names).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["PROTOCOLS", "Protocol", "ProtocolSpec", "get_protocol"]

@dataclass(frozen=True)
class ProtocolSpec:
    """How a comparison's numbers are made: the one description every layer reads.

    Attributes:
        name: ``heldout``, ``cv`` or ``paper`` (what ``summary.json`` records as ``protocol``).
        eval_split: the split part each run is evaluated on (``test`` or ``val``).
        merged_split: the ``split`` recorded for what the report reads (``oof`` for the merged
            folds of cross-validation, else ``eval_split``).
        part: the scored cases' name in messages (``test``, ``out-of-fold``, ``validation``).
        description: one line for help texts.
        folds: the protocol needs ``--folds K`` (cross-validation).
    """

    name: str
    eval_split: str
    merged_split: str
    part: str
    description: str
    folds: bool = False


#: Every protocol, by name.
PROTOCOLS: dict[str, ProtocolSpec] = {
    "heldout": ProtocolSpec("heldout", "test", "test", "test",
                            "best.pt chosen on validation cases, every number on held-out test cases"),
    "cv": ProtocolSpec("cv", "test", "oof", "out-of-fold",
                       "k-fold cross-validation: every case scored once, out of fold", folds=True),
    "paper": ProtocolSpec("paper", "val", "val", "validation",
                          "the paper's 80/20 split, scored on the validation cases that chose best.pt (optimistic)"),
}


def get_protocol(name: str) -> ProtocolSpec:
    """The :class:`ProtocolSpec` called ``name``.

    Raises:
        ValueError: unknown name, listing the known ones.
    """
    try:
        return PROTOCOLS[name]
    except (KeyError, TypeError):
        raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {name!r}.") from None


#: A protocol's name, for annotations: derived from :data:`PROTOCOLS`, so the names are spelled once.
Protocol = Literal[*PROTOCOLS]

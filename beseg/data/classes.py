"""Scored classes of a label map: each class is a set of label values (a region).

A plain class is one label value (``spleen = {1}``); a region joins several (BraTS tumour core
``TC = {2, 3}`` on MSD Task01 labels). Training presets, evaluation and ``beseg score`` all turn
label maps into the masks they score with :func:`class_masks`, so the same label map always gives
the same masks.

The text form, for command lines, is ``NAME=V[,V...]`` entries separated by ``;``::

    "TC=2,3;WT=1,2,3;ET=3"
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from beseg.errors import ConfigError

__all__ = ["ClassSpec", "class_masks", "classes_from_labels", "format_classes", "parse_classes"]

#: Ordered ``(name, label values)`` pairs; the order is the order of the masks.
ClassSpec = tuple[tuple[str, tuple[int, ...]], ...]


def class_masks(labels: np.ndarray | torch.Tensor, classes: ClassSpec) -> np.ndarray | torch.Tensor:
    """One boolean mask per scored class, stacked on a new first axis.

    Args:
        labels: integer label map of any shape (e.g. (H, W, D), or (B, 1, H, W, D) for a batch);
            a numpy array or a tensor on any device.
        classes: the scored classes; a voxel belongs to a class when its label is one of the
            class's values.

    Returns:
        Bool masks of shape ``(K, *labels.shape)``, of the same kind (and device) as ``labels``.

    Raises:
        ValueError: ``classes`` is empty.
    """
    if not classes:
        raise ValueError("classes must name at least one scored class.")
    if isinstance(labels, torch.Tensor):
        return torch.stack([torch.isin(labels, torch.tensor(values, device=labels.device)) for _, values in classes])
    labels = np.asarray(labels)
    return np.stack([np.isin(labels, values) for _, values in classes])


def classes_from_labels(labels: Mapping[int | str, str]) -> ClassSpec:
    """Every non-zero label of a ``dataset.json`` ``labels`` mapping as its own class, by value.

    Args:
        labels: label value -> name (keys may be JSON strings), e.g. ``{"0": "background", "1": "spleen"}``.

    Raises:
        ConfigError: a key is not an integer, or there is no non-zero label.
    """
    out = []
    for key, name in labels.items():
        try:
            value = int(key)
        except (TypeError, ValueError):
            raise ConfigError(f"label {key!r} is not an integer label value.") from None
        if value != 0:
            out.append((str(name), (value,)))
    if not out:
        raise ConfigError("the labels declare no class besides the background (0).")
    return tuple(sorted(out, key=lambda item: item[1]))


def parse_classes(text: str) -> ClassSpec:
    """``"TC=2,3;WT=1,2,3;ET=3"`` -> ``(("TC", (2, 3)), ("WT", (1, 2, 3)), ("ET", (3,)))``.

    Raises:
        ConfigError: an entry is not ``NAME=V[,V...]`` with integer values, or a name repeats.
    """
    out: list[tuple[str, tuple[int, ...]]] = []
    for entry in (e.strip() for e in str(text).split(";")):
        if not entry:
            continue
        name, sep, raw = entry.partition("=")
        name = name.strip()
        try:
            values = tuple(int(v) for v in raw.split(",") if v.strip())
        except ValueError:
            values = ()
        if not sep or not name or not values:
            raise ConfigError(
                f"class {entry!r} must look like NAME=V[,V...] with integer label values, e.g. 'TC=2,3'."
            )
        if name in (n for n, _ in out):
            raise ConfigError(f"class name {name!r} is given twice in {text!r}.")
        out.append((name, values))
    if not out:
        raise ConfigError(f"no classes in {text!r}; give e.g. 'spleen=1' or 'TC=2,3;WT=1,2,3;ET=3'.")
    return tuple(out)


def format_classes(classes: Sequence[tuple[str, Sequence[int]]]) -> str:
    """The inverse of :func:`parse_classes`."""
    return ";".join(f"{name}={','.join(str(v) for v in values)}" for name, values in classes)

"""Scored classes: label maps to masks, and the NAME=V,... text form."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from beseg.data import get_preset, msd_brats_regions
from beseg.data.classes import class_masks, classes_from_labels, format_classes, parse_classes
from beseg.errors import ConfigError


def test_brats_regions_of_the_preset_match_the_msd_converter():
    labels = np.random.default_rng(0).integers(0, 4, size=(6, 7, 8))
    masks = class_masks(labels, get_preset("task01").scored_classes)
    np.testing.assert_array_equal(masks, msd_brats_regions(labels).astype(bool))


def test_tensor_and_array_give_the_same_masks():
    labels = np.random.default_rng(1).integers(0, 3, size=(2, 1, 5, 5, 5))
    spec = (("a", (1,)), ("ab", (1, 2)))
    as_array = class_masks(labels, spec)
    as_tensor = class_masks(torch.from_numpy(labels), spec)
    assert as_tensor.dtype == torch.bool and as_tensor.shape == (2, 2, 1, 5, 5, 5)
    np.testing.assert_array_equal(as_tensor.numpy(), as_array)
    np.testing.assert_array_equal(as_array[1], (labels == 1) | (labels == 2))


def test_softmax_preset_scores_each_foreground_label():
    assert get_preset("task09").scored_classes == (("spleen", (1,)),)


def test_text_form_round_trips_and_dataset_labels():
    spec = parse_classes(" TC=2,3; WT=1,2,3 ;ET=3;")
    assert spec == (("TC", (2, 3)), ("WT", (1, 2, 3)), ("ET", (3,)))
    assert parse_classes(format_classes(spec)) == spec
    assert classes_from_labels({"0": "background", "2": "kidney", "1": "liver"}) == (("liver", (1,)), ("kidney", (2,)))


@pytest.mark.parametrize("text, match", [
    ("TC", "NAME=V"), ("TC=a", "NAME=V"), ("=1", "NAME=V"), ("A=1;A=2", "given twice"), (" ; ", "no classes"),
])
def test_bad_class_text_is_a_clear_error(text, match):
    with pytest.raises(ConfigError, match=match):
        parse_classes(text)

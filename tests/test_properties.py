"""Property-based tests (hypothesis) for the BE loss and the dataset.json parser.

The loss: for random shapes, dtypes, settings and values it is finite and non-negative, exactly zero
when the prediction equals the label, unchanged when prediction and label are flipped together
along a spatial axis, and on any input it raises nothing but its documented ValueError/TypeError,
whose message names the argument at fault (``input``, ``target`` or ``padding``).
The parser: whatever dataset.json holds, it raises nothing but DataError, and the message names
dataset.json and the key or entry at fault.
"""

from __future__ import annotations

import json
import re
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from beseg import BoundaryEnhancementLoss
from beseg.data import load_task
from beseg.data.msd import MSDTask
from beseg.errors import DataError

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DTYPES = {"float32": torch.float32, "float64": torch.float64}

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # MONAI's single-channel warnings


# ---------------------------------------------------------------------------------------------
# the loss


@st.composite
def loss_cases(draw):
    """A valid (loss, prediction, label) with random layout, dtype, settings and values."""
    spatial = draw(st.lists(st.integers(1, 10), min_size=2, max_size=3))
    batch, channels = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    dtype = DTYPES[draw(st.sampled_from(sorted(DTYPES)))]
    onehot = draw(st.booleans())
    kwargs = dict(
        impl=draw(st.sampled_from(["fast", "reference"])),
        padding=draw(st.sampled_from(["same", "valid"])),
        smoothing_passes=draw(st.integers(0, 3)),
        include_background=draw(st.booleans()),
        reduction=draw(st.sampled_from(["mean", "sum", "none"])),
        to_onehot_y=onehot,
        softmax=onehot and channels > 1,
    )
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.sampled_from([1.0, 10.0, 1e3]))  # probabilities, or logits of growing size
    gen = torch.Generator().manual_seed(seed)
    pred = (torch.rand((batch, channels, *spatial), generator=gen, dtype=torch.float64) * 2 - 1) * scale
    if not kwargs["softmax"]:
        pred = pred.abs().clamp(max=1.0)  # without an activation the prediction is a probability map
    if onehot:
        label = torch.randint(0, channels, (batch, 1, *spatial), generator=gen).to(dtype)
    else:
        label = (torch.rand((batch, channels, *spatial), generator=gen) > 0.5).to(dtype)
    return BoundaryEnhancementLoss(**kwargs), pred.to(dtype), label


def _value(loss, pred, label):
    """The loss, or None where the documented 'valid padding needs a larger input' error applies."""
    try:
        return loss(pred, label)
    except ValueError as err:
        assert loss.padding == "valid" and "needs spatial sizes larger than" in str(err), err
        return None


@SETTINGS
@given(loss_cases(), st.data())
def test_loss_is_finite_non_negative_and_unchanged_by_a_joint_flip(case, data):
    loss, pred, label = case
    value = _value(loss, pred, label)
    assume(value is not None)
    assert torch.isfinite(value).all() and (value >= 0).all()
    axis = data.draw(st.integers(2, pred.ndim - 1), label="flip axis")
    flipped = loss(pred.flip(axis), label.flip(axis))
    tol = 1e-4 if pred.dtype == torch.float32 else 1e-9
    torch.testing.assert_close(flipped, value, rtol=tol, atol=tol * (1.0 + float(value.abs().max())))


@SETTINGS
@given(loss_cases())
def test_loss_is_zero_when_the_prediction_equals_the_label(case):
    loss, _, label = case
    loss.softmax, loss.to_onehot_y = False, False  # compare one-hot maps directly
    if label.shape[1] == 1 and loss.include_background is False:
        loss.include_background = True
    perfect = label if label.max() <= 1 else torch.zeros_like(label)
    value = _value(loss, perfect.clone(), perfect)
    assume(value is not None)
    assert (value == 0).all(), value


FLOATS = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
ANY_DTYPE = st.sampled_from(FLOATS * 3 + [torch.int64, torch.uint8, torch.bool])  # mostly valid dtypes
SPECIAL = st.sampled_from([0.0, 1.0, -1.0, 0.5, 2.0, 1e30, -1e30, float("nan"), float("inf"), float("-inf")])


@st.composite
def any_tensor(draw, shape=None):
    shape = shape or draw(st.one_of(st.lists(st.integers(0, 5), min_size=4, max_size=5),  # mostly valid ranks
                                    st.lists(st.integers(0, 5), min_size=1, max_size=6)))
    dtype = draw(ANY_DTYPE)
    values = torch.tensor(draw(st.lists(SPECIAL, min_size=1, max_size=4)), dtype=torch.float64)
    index = torch.randint(0, len(values), tuple(shape), generator=torch.Generator().manual_seed(draw(st.integers(0, 99))))
    return values[index].to(dtype) if dtype.is_floating_point else values[index].nan_to_num().clamp(-5, 5).to(dtype)


@SETTINGS
@given(st.data())
def test_loss_raises_only_its_documented_errors_on_any_input(data):
    pred = data.draw(any_tensor(), label="input")
    same_layout = st.sampled_from([list(pred.shape), [pred.shape[0], 1, *pred.shape[2:]]])
    label = data.draw(st.one_of(any_tensor(), same_layout.flatmap(lambda shape: any_tensor(shape=shape))), label="target")
    act = data.draw(st.sampled_from(["none", "sigmoid", "softmax"]), label="activation")
    loss = BoundaryEnhancementLoss(
        include_background=data.draw(st.booleans()), to_onehot_y=data.draw(st.booleans()),
        sigmoid=act == "sigmoid", softmax=act == "softmax", padding=data.draw(st.sampled_from(["same", "valid"])),
        impl=data.draw(st.sampled_from(["fast", "reference"])), smoothing_passes=data.draw(st.integers(0, 3)),
    )
    try:
        value = loss(pred, label)
    except (ValueError, TypeError) as err:
        # The documented errors name the argument at fault (the tensors, or the padding too large for
        # them); an error from deep inside torch would not.
        assert re.search(r"\b(input|target|padding)\b", str(err)), err
        return
    assert torch.isfinite(value).all() and (value >= 0).all(), (value, pred, label)


# ---------------------------------------------------------------------------------------------
# the dataset.json parser

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
PATHS = st.one_of(
    st.text(max_size=30),
    st.text(alphabet="./\\x\x00:~ ", max_size=40),
    st.integers(250, 5000).map(lambda n: "x" * n),  # longer than a file name may be
    st.integers(1, 3000).map(lambda n: "a/" * n),  # longer than a path may be
    st.sampled_from(["./imagesTr/a.nii.gz", "../a.nii.gz", "/etc/passwd", "C:\\x.nii.gz", "./._a.nii.gz", "", " ",
                     "a\x00b.nii.gz", "x" * 5000, "./imagesTr/../../../a.nii.gz", "imagesTr", "."]),
)


def _valid_meta() -> dict:
    return {"name": "Spleen", "modality": {"0": "CT"}, "labels": {"0": "background", "1": "spleen"},
            "numTraining": 2, "numTest": 1,
            "training": [{"image": f"./imagesTr/s_{i}.nii.gz", "label": f"./labelsTr/s_{i}.nii.gz"} for i in range(2)],
            "test": ["./imagesTs/s_9.nii.gz"]}


#: What a parser message must name when the top level is broken or a top-level key is wrong.
TOP_LEVEL = re.compile(r"invalid JSON|cannot read|top level|'(name|modality|labels|training|test)'|numTraining")


def _parse(content: str | bytes, check_files: bool, names: re.Pattern = TOP_LEVEL):
    """``load_task`` on a folder holding ``content`` as dataset.json: the task, or None after a DataError
    whose message names dataset.json and matches ``names`` (the key or entry at fault)."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "task"
        root.mkdir()
        # Every file _valid_meta lists exists, so a missing file is always one a mutation named.
        for rel in ("imagesTr/s_0", "imagesTr/s_1", "labelsTr/s_0", "labelsTr/s_1", "imagesTs/s_9"):
            (root / rel).parent.mkdir(exist_ok=True)
            (root / f"{rel}.nii.gz").write_bytes(b"")
        path = root / "dataset.json"
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content, encoding="utf-8")
        try:
            return load_task(root, check_files=check_files)
        except DataError as err:
            assert f"{root.resolve() / 'dataset.json'}: " in str(err), err
            assert names.search(str(err)), (names.pattern, str(err))
            return None


@SETTINGS
@given(JSON_VALUES, st.booleans())
def test_parser_raises_only_data_error_on_any_json(value, check_files):
    result = _parse(json.dumps(value), check_files)
    assert result is None or isinstance(result, MSDTask)


@SETTINGS
@given(st.binary(max_size=200))
def test_parser_raises_only_data_error_on_any_bytes(content):
    result = _parse(content, True)
    assert result is None or isinstance(result, MSDTask)


@SETTINGS
@given(PATHS, st.sampled_from(["image", "label", "test"]), st.booleans())
def test_parser_raises_only_data_error_on_any_listed_path(path, field, check_files):
    meta = _valid_meta()
    if field == "test":
        meta["test"][0] = path
    else:
        meta["training"][1][field] = path
    # The only entry changed is the one the message must name (a new image path may also repeat a case).
    entry = re.escape("test[0]" if field == "test" else "training[1]")
    result = _parse(json.dumps(meta), check_files, re.compile(entry))
    if result is not None:
        listed = result.test[0] if field == "test" else getattr(result.training[1], field)
        assert listed.is_relative_to(result.root)


@st.composite
def mutated_meta(draw):
    """A valid dataset.json with a few entries replaced by random JSON, random paths or removed.

    Returns ``(meta, names)``: ``names`` matches what an error message may name for the places changed
    (the key, the entry of a list, or numTraining when the number of entries changed).
    """
    meta = _valid_meta()
    names: set[str] = set()
    for _ in range(draw(st.integers(1, 3))):
        where = draw(st.sampled_from(["name", "modality", "labels", "numTraining", "training", "test",
                                      "training[].image", "training[].label", "training[]", "test[]",
                                      "modality{}", "labels{}"]))
        how = draw(st.sampled_from(["json", "path", "delete"]))
        new = draw(JSON_VALUES) if how == "json" else draw(PATHS)
        if where.endswith("[]") or where.startswith("training[]."):
            key = "training" if where.startswith("training") else "test"
            items = meta.get(key)
            if not isinstance(items, list) or not items:
                continue
            # Entries shift when one is removed, so any entry of the list (or its count) may be named.
            names |= {f"'{key}'", re.escape(f"{key}[") + r"\d+\]", "numTraining"}
            i = draw(st.integers(0, len(items) - 1))
            if "." in where and isinstance(items[i], dict):
                field = where.split(".")[1]
                items[i].pop(field, None) if how == "delete" else items[i].__setitem__(field, new)
            else:
                items.pop(i) if how == "delete" else items.__setitem__(i, new)
        elif where.endswith("{}"):
            mapping = meta.get(where[:-2])
            if isinstance(mapping, dict):
                mapping[draw(st.text(max_size=4))] = new
                names.add(f"'{where[:-2]}'")
        else:
            meta.pop(where, None) if how == "delete" else meta.__setitem__(where, new)
            names |= {f"'{where}'", where if where == "numTraining" else f"'{where}'"}
            if where in ("training", "test"):  # a new list: its entries or their count may be at fault
                names |= {re.escape(f"{where}[") + r"\d+\]", "numTraining"}
    return meta, names


@SETTINGS
@given(mutated_meta(), st.booleans())
def test_parser_raises_only_data_error_on_mutated_valid_files(mutated, check_files):
    meta, names = mutated
    result = _parse(json.dumps(meta), check_files, re.compile("|".join(sorted(names)) or "(?!)"))
    if result is not None:
        assert all(p.is_relative_to(result.root) for c in result.training for p in (c.image, c.label))
        assert all(p.is_relative_to(result.root) for p in result.test)


def test_the_unmutated_file_parses():
    task = _parse(json.dumps(_valid_meta()), check_files=False)
    assert task is not None and [c.id for c in task.training] == ["s_0", "s_1"]
    assert np.array_equal(sorted(task.labels), [0, 1])

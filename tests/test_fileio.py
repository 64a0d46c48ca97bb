"""Atomic output: the target is replaced whole or not at all, and no temporary file is left."""

from __future__ import annotations

import pytest

from beseg.fileio import atomic_output, atomic_write_text


def test_atomic_write_replaces_the_file(tmp_path):
    target = tmp_path / "sub" / "summary.json"
    atomic_write_text(target, "old")
    atomic_write_text(target, "new")
    assert target.read_text() == "new" and sorted(p.name for p in target.parent.iterdir()) == ["summary.json"]


def test_a_failed_write_keeps_the_previous_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "per_case.csv"
    target.write_text("previous")
    with pytest.raises(OSError, match="No space left"):
        with atomic_output(target) as tmp:
            tmp.write_text("half")
            raise OSError(28, "No space left on device")
    assert target.read_text() == "previous" and [p.name for p in tmp_path.iterdir()] == ["per_case.csv"]


def test_temporary_name_is_hidden_and_keeps_the_requested_ending(tmp_path):
    with atomic_output(tmp_path / "case.nii.gz", suffix=".tmp.nii.gz") as tmp:
        assert tmp.name.startswith(".case.nii.gz.") and tmp.name.endswith(".tmp.nii.gz")
        tmp.write_bytes(b"x")
    assert (tmp_path / "case.nii.gz").read_bytes() == b"x"

"""docs/reliability.md: every guarantee names a test, and every test it names exists."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "reliability.md"
REFERENCE = re.compile(r"`(tests/[\w/]+\.py)::(test_\w+)")


def test_every_test_the_guarantees_name_exists():
    text = DOC.read_text(encoding="utf-8")
    named = REFERENCE.findall(text)
    assert len(named) > 50
    missing = [f"{path}::{name}" for path, name in sorted(set(named))
               if not (REPO / path).is_file()
               or not re.search(rf"^(async )?def {name}\(", (REPO / path).read_text(encoding="utf-8"), re.M)]
    assert not missing, f"docs/reliability.md names tests that do not exist: {missing}"


def test_every_row_of_a_guarantee_table_names_a_test():
    rows = [line for line in DOC.read_text(encoding="utf-8").splitlines()
            if line.startswith("| ") and not line.startswith("| guarantee |")]
    assert rows
    unproved = [row[:80] for row in rows if not REFERENCE.search(row.rsplit("|", 2)[-2])]
    assert not unproved, f"rows whose last column names no test: {unproved}"

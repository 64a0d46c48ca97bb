"""The README's quickstart and its loss example."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_loss_example_prints_what_its_comment_says(capsys):
    # tests/test_docs.py runs every block; this one also checks the documented output.
    block = re.search(r"^```python\n(.*?)^```", README.read_text(), flags=re.S | re.M)[1]
    exec(compile(block, str(README), "exec"), {})
    assert capsys.readouterr().out.strip() == "torch.Size([2, 1])"
    assert "# torch.Size([2, 1])" in block


def test_readme_quickstart_has_two_commands_and_ci_runs_the_test_one():
    text = README.read_text()
    quick = text.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"```bash\n(.*?)\n```", quick, flags=re.S)
    assert len(commands) == 2
    ci = (README.parent / ".ci" / "run").read_text()
    assert commands[1] in ci

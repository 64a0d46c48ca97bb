"""Docs that cannot rot: every fenced code block and relative link of README.md and docs/*.md is checked.

- ``python`` blocks run, each in a fresh namespace in an empty folder;
- every ``beseg ...`` / ``beseg-predict ...`` command in a shell block parses with the CLI's own parser
  (its subcommand and flags exist; nothing runs);
- every relative link (and ``#anchor``) resolves.

A block that cannot run here (a GPU, real MSD data, hours of training) is marked on the line before its
fence with ``<!-- docs-test: skip REASON -->``; the reason is required. Checking a page returns a list of
problems, so that a deliberately broken copy of a page can be shown to fail (the last tests).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELLS = {"bash", "sh", "shell", "console", "zsh"}
SKIP = re.compile(r"<!--\s*docs-test:\s*skip\b\s*(?P<reason>.*?)\s*-->")
FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`\s]*)[^`]*$")
#: Words that run the command after them (``time beseg demo``, ``srun -n 2 beseg train ...``).
WRAPPERS = {"time", "/usr/bin/time", "env", "nohup", "exec", "srun", "timeout", "salloc"}
PROGRAMS = {"beseg", "beseg-predict"}
#: ``python -m MODULE`` / ``torchrun ... -m MODULE`` -> the program it is.
MODULES = {"beseg": "beseg", "beseg.cli": "beseg", "beseg_runtime.cli": "beseg-predict"}


@dataclass(frozen=True)
class Block:
    """One fenced code block: its page, the line of its opening fence (1-based), language and text."""

    page: Path
    line: int
    lang: str
    text: str
    skip: str | None  # the reason given in a docs-test skip marker, or None

    def __str__(self) -> str:
        return f"{self.page.relative_to(ROOT) if self.page.is_relative_to(ROOT) else self.page}:{self.line}"


def code_blocks(page: Path, text: str | None = None) -> list[Block]:
    """The fenced blocks of a Markdown page (indented ones, inside lists, included)."""
    lines = (page.read_text() if text is None else text).splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, lang = len(m["indent"]), m["fence"], m["info"].lower()
        body, j = [], i + 1
        while j < len(lines) and not (lines[j].strip().startswith(fence) and lines[j].strip().strip(fence[0]) == ""):
            body.append(lines[j][indent:] if lines[j][:indent].strip() == "" else lines[j])
            j += 1
        before = next((lines[k] for k in range(i - 1, -1, -1) if lines[k].strip()), "")
        marker = SKIP.search(before)
        blocks.append(Block(page, i + 1, lang, "\n".join(body) + "\n", marker["reason"] if marker else None))
        i = j + 1
    return blocks


def shell_commands(block: Block) -> list[list[str]]:
    """The ``beseg``/``beseg-predict`` argument lists of a shell block (program name first)."""
    text = block.text
    if block.lang == "console":  # only the prompt lines are commands; the rest is output
        text = "\n".join(line[2:] for line in text.splitlines() if line.startswith("$ "))
    commands = []
    for logical in text.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(logical, posix=True, punctuation_chars=True)
        lexer.commenters = "#"
        lexer.whitespace_split = True
        tokens = list(lexer)
        segment: list[str] = []
        for token in [*tokens, ";"]:
            if token in {"&&", "||", ";", "|", "&", "(", ")"}:
                commands.extend(_program_call(segment))
                segment = []
            else:
                segment.append(token)
    return commands


def _program_call(words: list[str]) -> list[list[str]]:
    while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]):  # FOO=1 beseg ...
        words = words[1:]
    if not words:
        return []
    if words[0] in WRAPPERS:
        start = next((k for k, w in enumerate(words) if w in PROGRAMS), None)
        words = words[start:] if start is not None else []
    if words[0] in {"python", "python3", "torchrun"} and "-m" in words:  # python -m beseg.cli, torchrun ... -m beseg.cli
        k = words.index("-m")
        program = MODULES.get(words[k + 1] if k + 1 < len(words) else "")
        words = [program, *words[k + 2:]] if program else []
    if not words or words[0] not in PROGRAMS:
        return []
    end = next((k for k, w in enumerate(words) if re.fullmatch(r"[<>&]+", w)), len(words))  # a redirection
    if end < len(words) and words[end - 1].isdigit():  # 2>&1: the lexer splits off the descriptor
        end -= 1
    return [words[:end]]


def parse_problem(argv: list[str]) -> str | None:
    """None if ``argv`` parses with the program's own parser, else the parser's message."""
    if argv[0] == "beseg":
        from beseg.cli import parse_args as parse
    else:
        from beseg_runtime.cli import build_parser

        parse = build_parser().parse_args
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            parse(argv[1:])
    except SystemExit as exit_:
        if exit_.code not in (0, None):  # --help and --version exit 0
            return err.getvalue().strip().splitlines()[-1] if err.getvalue().strip() else f"exit {exit_.code}"
    return None


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]|\[([^]]*)]\([^)]*\)", lambda m: m.group(1) or "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(text: str) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    in_code = False
    for line in text.splitlines():
        if FENCE.match(line):
            in_code = not in_code
        if in_code:
            continue
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            base = slug(m[1])
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return out


def link_problems(page: Path, text: str | None = None) -> list[str]:
    """Relative links (and anchors) of a page that do not resolve."""
    text = page.read_text() if text is None else text
    prose = "\n".join(_outside_code(text))
    problems = []
    for target in re.findall(r"(?<!!)\[[^\]]*]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", prose) + \
            re.findall(r"!\[[^\]]*]\(([^)\s]+)\)", prose):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:, file: ...
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if path and not dest.exists():
            problems.append(f"{page.name}: link to {target}: {dest} does not exist")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest.read_text() if path else text):
            problems.append(f"{page.name}: link to {target}: no heading with anchor #{anchor} in {dest.name}")
    return problems


def _outside_code(text: str):
    in_code = False
    for line in text.splitlines():
        if FENCE.match(line):
            in_code = not in_code
            continue
        if not in_code:
            yield re.sub(r"`[^`]*`", "", line)  # inline code is not a link


def command_problems(page: Path, text: str | None = None) -> list[str]:
    """Every ``beseg`` command of a page's shell blocks that its parser refuses, with the parser's message."""
    problems = []
    for block in code_blocks(page, text):
        if block.lang in SHELLS and not block.skip:
            for argv in shell_commands(block):
                problem = parse_problem(argv)
                if problem:
                    problems.append(f"{block}: {shlex.join(argv)}: {problem}")
    return problems


def run_python(block: Block, folder: Path) -> None:
    cwd = Path.cwd()
    os.chdir(folder)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            exec(compile(block.text, str(block), "exec"), {"__name__": "__docs__"})
    finally:
        os.chdir(cwd)


def _all_blocks() -> list[Block]:
    return [b for page in PAGES for b in code_blocks(page)]


PYTHON_BLOCKS = [b for b in _all_blocks() if b.lang in {"python", "py"}]


@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=str)
def test_python_blocks_run(block, tmp_path):
    if block.skip:
        pytest.skip(block.skip)
    run_python(block, tmp_path)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_beseg_command_parses(page):
    assert command_problems(page) == []


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_resolves(page):
    assert link_problems(page) == []


def test_every_skip_marker_gives_a_reason():
    assert [str(b) for b in _all_blocks() if b.skip is not None and not b.skip.strip()] == []


def test_the_docs_have_shell_commands_and_python_blocks_to_check():
    # The checks above must not pass by finding nothing (a fence pattern gone wrong).
    commands = [argv for page in PAGES for b in code_blocks(page) if b.lang in SHELLS for argv in shell_commands(b)]
    assert len(commands) >= 10 and {argv[1] for argv in commands if argv[0] == "beseg"} >= {"demo", "compare", "score"}
    assert len(PYTHON_BLOCKS) >= 2


# ------------------------------------------------------------------------------------------------
# The checks themselves fail on a broken page.


def test_a_broken_flag_in_a_copy_of_a_page_fails(tmp_path):
    page = tmp_path / "README.md"
    text = (ROOT / "README.md").read_text()
    assert command_problems(page, text) == []
    broken = text.replace("```bash\n", "```bash\nbeseg demo --seeds 2 --no-such-flag\n", 1)
    problems = command_problems(page, broken)
    assert len(problems) == 1 and "--no-such-flag" in problems[0] and "unrecognized arguments" in problems[0]


@pytest.mark.parametrize("line, bad", [
    ("beseg trian phantom_spleen_segresnet_be", True),          # no such subcommand
    ("beseg compare --data D --systems dice --seeds x", True),  # a flag's value of the wrong type
    ("BESEG_CACHE_DIR=/tmp/c beseg demo --out /tmp/d", False),
    ("srun -n 2 beseg train phantom_spleen_segresnet_be train.epochs=1 --out runs/x", False),
    ("beseg score a b --labels L --out O 2>&1 | tee log", False),
    ("beseg-predict model ct.nii.gz --out pred --device tpu", True),
    ("pip install beseg && beseg configs", False),
    ("torchrun --nproc_per_node 4 -m beseg.cli train phantom_spleen_segresnet_be --ot runs/ddp", True),
])
def test_command_lines_are_checked_with_the_real_parsers(tmp_path, line, bad):
    page = tmp_path / "page.md"
    problems = command_problems(page, f"# Page\n\n```bash\n{line}\n```\n")
    assert bool(problems) == bad, problems


def test_a_broken_link_and_anchor_fail(tmp_path):
    (tmp_path / "other.md").write_text("# Other page\n\n## A section\n")
    page = tmp_path / "page.md"
    good = "# Page\n\nSee [it](other.md#a-section), [here](#page) and [web](https://example.org/x).\n"
    assert link_problems(page, good) == []
    bad = good + "And [gone](missing.md), [no anchor](other.md#nope).\n"
    assert len(link_problems(page, bad)) == 2


def test_a_failing_python_block_fails(tmp_path):
    block = code_blocks(tmp_path / "p.md", "```python\nfrom beseg import NoSuchThing\n```\n")[0]
    with pytest.raises(ImportError):
        run_python(block, tmp_path)

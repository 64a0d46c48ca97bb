"""Render a report, given as a list of blocks, as Markdown and as one self-contained HTML page.

Both formats come from the same blocks, so they always show the same numbers. The HTML embeds every
PNG as a base64 ``data:`` URI: the page works when opened alone, copied or mailed. The Markdown
references the PNG files by a path relative to the Markdown file.
"""

from __future__ import annotations

import base64
import html
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Heading", "Paragraph", "Table", "Figure", "Block", "to_markdown", "to_html"]


@dataclass(frozen=True)
class Heading:
    """A section title; level 1 is the page title."""

    text: str
    level: int = 2


@dataclass(frozen=True)
class Paragraph:
    """Plain text; ``items`` makes it a bulleted list after the text."""

    text: str
    items: tuple[str, ...] = ()


@dataclass(frozen=True)
class Table:
    """A table of already formatted cells; ``caption`` is printed above it."""

    header: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    caption: str = ""
    notes: tuple[str, ...] = field(default=())


@dataclass(frozen=True)
class Figure:
    """A PNG file with a caption."""

    path: Path
    caption: str


Block = Heading | Paragraph | Table | Figure


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def to_markdown(blocks: Sequence[Block], md_path: str | Path) -> str:
    """The report as GitHub-flavoured Markdown.

    Args:
        blocks: the report content.
        md_path: where the Markdown will be written; figure links are made relative to its folder.

    Returns:
        The Markdown text.
    """
    base = Path(md_path).parent
    out: list[str] = []
    for b in blocks:
        if isinstance(b, Heading):
            out.append(f"{'#' * b.level} {b.text}")
        elif isinstance(b, Paragraph):
            out.append(b.text + ("\n\n" if b.text and b.items else "") + "\n".join(f"- {i}" for i in b.items))
        elif isinstance(b, Table):
            lines = [f"**{b.caption}**", ""] if b.caption else []
            lines.append("| " + " | ".join(map(_md_cell, b.header)) + " |")
            lines.append("|" + "---|" * len(b.header))
            lines += ["| " + " | ".join(map(_md_cell, r)) + " |" for r in b.rows]
            lines += [""] + [f"- {n}" for n in b.notes] if b.notes else []
            out.append("\n".join(lines))
        elif isinstance(b, Figure):
            rel = Path(os.path.relpath(b.path, base)).as_posix()
            out.append(f"![{_md_cell(b.caption)}]({rel})\n\n*{b.caption}*")
    return "\n\n".join(out) + "\n"


_CSS = """
body { font-family: system-ui, sans-serif; max-width: 1200px; margin: 2em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #bbb; padding: 0.25em 0.6em; text-align: right; }
th { background: #eee; } td:first-child, th:first-child { text-align: left; }
caption { caption-side: top; text-align: left; font-weight: bold; padding-bottom: 0.3em; }
figure { margin: 1em 0 2em; } img { max-width: 100%; border: 1px solid #ddd; }
figcaption { font-style: italic; font-size: 0.9em; } .notes { font-size: 0.85em; color: #555; }
"""


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def to_html(blocks: Sequence[Block], title: str) -> str:
    """The report as one HTML page with every figure embedded.

    Args:
        blocks: the report content.
        title: the page title.

    Returns:
        The HTML text.

    Raises:
        OSError: a figure file cannot be read.
    """
    e = html.escape
    out = [f"<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>{e(title)}</title>",
           f"<style>{_CSS}</style>\n</head>\n<body>"]
    for b in blocks:
        if isinstance(b, Heading):
            out.append(f"<h{b.level}>{e(b.text)}</h{b.level}>")
        elif isinstance(b, Paragraph):
            if b.text:
                out.append(f"<p>{e(b.text)}</p>")
            if b.items:
                out.append("<ul>" + "".join(f"<li>{e(i)}</li>" for i in b.items) + "</ul>")
        elif isinstance(b, Table):
            rows = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>\n" for r in b.rows)
            head = "".join(f"<th>{e(h)}</th>" for h in b.header)
            cap = f"<caption>{e(b.caption)}</caption>" if b.caption else ""
            out.append(f"<table>{cap}<thead><tr>{head}</tr></thead>\n<tbody>\n{rows}</tbody></table>")
            if b.notes:
                out.append("<ul class=\"notes\">" + "".join(f"<li>{e(n)}</li>" for n in b.notes) + "</ul>")
        elif isinstance(b, Figure):
            out.append(f"<figure><img src=\"{_data_uri(Path(b.path))}\" alt=\"{e(b.caption)}\">"
                       f"<figcaption>{e(b.caption)}</figcaption></figure>")
    out.append("</body>\n</html>\n")
    return "\n".join(out)

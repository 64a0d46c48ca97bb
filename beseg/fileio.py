"""Atomic file output: write to a temporary file beside the target, then rename it over.

A reader sees the old file or the new one, never half of one, even after SIGKILL or a full disk;
on failure the temporary file is removed and the previous file is left as it was.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_output", "atomic_write_text"]


@contextmanager
def atomic_output(path: str | Path, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a fresh temporary path in ``path``'s folder; rename it to ``path`` if the block succeeds.

    Args:
        path: the file to (re)place; its folder is created if needed.
        suffix: ending of the temporary name (writers that infer the format from it, such as
            ``nibabel.save``, need ``.nii.gz``). The temporary name starts with ``.<name>.``, so
            it is hidden and never mistaken for the target.

    Raises:
        Whatever the block or the rename raises, after the temporary file is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns ``path``."""
    with atomic_output(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)

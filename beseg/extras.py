"""Optional dependencies: import them, or say in one line what to install.

``beseg export`` needs the ONNX tools (the ``export`` extra) and ``beseg-predict`` needs onnxruntime
(the ``deploy`` extra); neither is installed by a plain ``pip install beseg``. A missing one is a
user's setup, not a bug, so it is a :class:`MissingDependencyError` (a :class:`~beseg.errors.BesegError`:
one line, exit code 1), raised before any work starts. This module imports nothing but the standard
library and :mod:`beseg.errors`, so the torch-free runtime (:mod:`beseg.deploy`) can use it.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from beseg.errors import BesegError

__all__ = ["MissingDependencyError", "require"]


class MissingDependencyError(BesegError):
    """An optional package that a command needs is not installed (or cannot be imported)."""


def require(modules: tuple[str, ...] | list[str], needed_by: str, install: str) -> list[ModuleType]:
    """Import ``modules``, or raise one error naming every one that is missing and what to install.

    Args:
        modules: importable names, e.g. ``("onnx", "onnxscript")``.
        needed_by: what needs them, for the message (``"beseg export"``).
        install: the command that installs them (``"pip install 'beseg[export]'"``).

    Returns:
        The imported modules, in the order given.

    Raises:
        MissingDependencyError: one or more cannot be imported; the message says which, why when it is
            not simply absent (a broken installation), and ``install``.
    """
    found, missing = [], []
    for name in modules:
        try:
            found.append(importlib.import_module(name))
        except ImportError as err:  # absent, or installed but broken (a missing shared library)
            absent = isinstance(err, ModuleNotFoundError) and (err.name or "").split(".")[0] == name.split(".")[0]
            missing.append(name if absent else f"{name} ({' '.join(str(err).split())[:160]})")
    if missing:
        names = ", ".join(missing)
        raise MissingDependencyError(f"{needed_by} needs {names}, which {'is' if len(missing) == 1 else 'are'} not "
                                     f"installed or cannot be imported; install with: {install}")
    return found

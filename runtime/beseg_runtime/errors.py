"""The errors that a command turns into one line on stderr and exit code 1, and the list of failed inputs.

:class:`BesegError` is the base of every user-facing error of beseg, defined here, in the lowest
layer, so that ``beseg-predict`` (which imports nothing from ``beseg``) and ``beseg`` (which builds on
this runtime and re-exports these names from :mod:`beseg.errors`) raise and catch one family: a
:class:`DataError` from :func:`beseg_runtime.io.check_scan` is the same class whether ``beseg
predict`` or ``beseg-predict`` meets it, and both command lines print it as one line. This module
imports nothing but the standard library.
"""

from __future__ import annotations

import importlib
import sys
import traceback
from collections.abc import Callable
from types import ModuleType

__all__ = ["EXIT_BUG", "EXIT_FAILURE", "EXIT_INTERRUPTED", "BUG_REPORT", "BesegError", "DataError",
           "MissingDependencyError", "report_failures", "require", "run_reporting_errors"]

#: Exit code of a command that failed on bad input (or for which some inputs failed).
EXIT_FAILURE = 1
#: Exit code of a bug (an exception that is not a user-facing error), after its traceback.
EXIT_BUG = 3
#: Exit code after Ctrl-C (128 + SIGINT, as a shell reports it).
EXIT_INTERRUPTED = 130
BUG_REPORT = "this is a bug in beseg; please report it with the traceback above and the command you ran"


class BesegError(Exception):
    """Base class for user-facing errors: the message names the file or argument and the problem."""


class DataError(BesegError):
    """An input (an image or label file, a dataset folder, its ``dataset.json``) is missing, unreadable or inconsistent."""


class MissingDependencyError(BesegError):
    """An optional package that a command needs is not installed (or cannot be imported).

    A missing one is a user's setup, not a bug: one line naming it and what to install, exit code 1,
    raised before any work starts.
    """


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


def run_reporting_errors(prog: str, body: Callable[[], int], debug: bool = False) -> int:
    """Run a command's ``body`` and turn what it raises into one line on stderr and an exit code.

    ``beseg`` and ``beseg-predict`` both run their commands through this, so they report errors alike:
    a :class:`BesegError` (its message names the file or argument) or an ``OSError`` (a missing file, a
    full disk) is ``PROG: error: MESSAGE``, exit :data:`EXIT_FAILURE` (or the error's own ``exit_code``,
    e.g. beseg's claim-lost code, which launchers read as "another process has the run"); Ctrl-C is ``PROG: interrupted``,
    exit :data:`EXIT_INTERRUPTED`; anything else is a bug: its traceback, ``PROG: internal error: ...``
    and :data:`BUG_REPORT`, exit :data:`EXIT_BUG`.

    Args:
        prog: how the command names itself in messages (``"beseg train"``, ``"beseg-predict"``).
        body: the command; returns its exit code.
        debug: print the traceback of user-facing errors too.

    Returns:
        ``body``'s exit code, or the code of what it raised.
    """
    try:
        return body()
    except (BesegError, OSError) as err:
        if debug:
            traceback.print_exc()
        print(f"{prog}: error: {err}", file=sys.stderr)
        return getattr(err, "exit_code", EXIT_FAILURE)  # an error may carry its own (a run claim taken over)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as err:  # noqa: BLE001 - anything else is a bug: keep its traceback
        traceback.print_exc()
        print(f"{prog}: internal error: {type(err).__name__}: {err}\n{BUG_REPORT}", file=sys.stderr)
        return EXIT_BUG


def report_failures(failed: list[tuple[str, str]]) -> int:
    """List failed inputs on stderr after a command processed the others (``beseg predict``,
    ``beseg-predict``, ``evaluate``, ``score``): ``N input(s) failed:``, then one line per input
    naming it and the reason.

    Args:
        failed: ``(input, reason)`` pairs.

    Returns:
        The exit code: :data:`EXIT_FAILURE` if any failed, else 0.
    """
    if not failed:
        return 0
    print(f"{len(failed)} input(s) failed:", file=sys.stderr)
    for name, reason in failed:
        print(f"  - {reason if reason.startswith(name) else f'{name}: {reason}'}", file=sys.stderr)
    return EXIT_FAILURE

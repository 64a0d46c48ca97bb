"""Exceptions that the CLI turns into one clear message and a non-zero exit, and the list of failed inputs."""

from __future__ import annotations

import sys

#: Exit code of a command that failed on bad input (or for which some inputs failed).
EXIT_FAILURE = 1


class BesegError(Exception):
    """Base class for user-facing errors: the message names the file or argument and the problem."""


class ConfigError(BesegError):
    """A configuration file or command-line override is missing, malformed or inconsistent."""


class DataError(BesegError):
    """A dataset folder, ``dataset.json`` or image/label file is missing, unreadable or inconsistent."""


class ReportError(BesegError):
    """A results folder cannot be turned into a report: missing, empty, or runs that disagree."""


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

"""Exceptions that the CLI turns into one clear message and a non-zero exit, and the list of failed inputs.

The base class :class:`BesegError`, :class:`DataError`, :class:`MissingDependencyError`, the exit
codes and the functions that report errors (:func:`run_reporting_errors`, :func:`report_failures`)
are defined in :mod:`beseg_runtime.errors`, the torch-free runtime that beseg builds on, so that
the runtime's errors (a bad scan, a damaged model folder) are beseg's errors too: one family,
caught and printed the same way by ``beseg`` and ``beseg-predict``. They are imported here so that
this module lists every error beseg raises.
"""

from __future__ import annotations

from beseg_runtime.errors import (BUG_REPORT, EXIT_BUG, EXIT_FAILURE, EXIT_INTERRUPTED, BesegError, DataError,
                                  MissingDependencyError, report_failures, require, run_reporting_errors)

__all__ = ["BUG_REPORT", "EXIT_BUG", "EXIT_FAILURE", "EXIT_INTERRUPTED", "BesegError", "ConfigError", "DataError",
           "MissingDependencyError", "ReportError", "report_failures", "require", "run_reporting_errors"]


class ConfigError(BesegError):
    """A configuration file or command-line override is missing, malformed or inconsistent."""


class ReportError(BesegError):
    """A results folder cannot be turned into a report: missing, empty, or runs that disagree."""

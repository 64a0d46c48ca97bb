"""Exceptions that the CLI turns into one clear message and a non-zero exit."""

from __future__ import annotations


class BesegError(Exception):
    """Base class for user-facing errors: the message names the file or argument and the problem."""


class ConfigError(BesegError):
    """A configuration file or command-line override is missing, malformed or inconsistent."""


class DataError(BesegError):
    """A dataset folder, ``dataset.json`` or image/label file is missing, unreadable or inconsistent."""


class ReportError(BesegError):
    """A results folder cannot be turned into a report: missing, empty, or runs that disagree."""

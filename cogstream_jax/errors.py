"""User-facing error types.

A `UserError` means the input (a file, a flag, a dataset field) is wrong, not the code: command-line entry
points print its message on one line and exit non-zero without a traceback. Messages must name the file and
field at fault.
"""
from __future__ import annotations


class UserError(Exception):
    """Bad input from the user; printed without a traceback by the CLIs."""


class ConfigError(UserError):
    """A config file or flag is missing, malformed or unsupported."""


class WeightError(UserError):
    """A checkpoint is missing tensors, has unknown keys, wrong shapes or is unreadable."""


class DataError(UserError):
    """A dataset file (QA json, result json) is malformed."""


class VideoError(UserError):
    """A video file is missing, unreadable or empty."""


class InputError(UserError):
    """Model inputs are inconsistent (pixel rows vs grids, placeholder counts, context length)."""


def first_line(error: BaseException, limit: int = 200) -> str:
    """An exception's first line (runtimes' messages run to pages of traces), for a one-line error; its type's
    name when it has no message."""
    lines = str(error).strip().splitlines()
    return (lines[0] if lines else type(error).__name__)[:limit]

"""Error types that the command line turns into one-line messages and exit codes.

Bad usage, configuration or data exits 2; a failure while running exits 1 (docs/architecture.md).
"""

from __future__ import annotations


class DrtuneError(Exception):
    """A failure while running (exit code 1)."""

    exit_code = 1


class InputError(DrtuneError):
    """Bad usage, configuration or data (exit code 2); the message names the file/row/key."""

    exit_code = 2

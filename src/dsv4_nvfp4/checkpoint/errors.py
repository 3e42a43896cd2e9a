"""The one error type of the checkpoint toolkit, and how the CLI prints it.

A :class:`CheckpointError` is a user's problem (a bad path, a shard that cannot
be read, a layout we cannot convert), never a bug of ours: the CLI prints its
message as one line and exits 2, without a stack trace.
"""

from __future__ import annotations

import sys


class CheckpointError(Exception):
    """Unusable input. The message names file, tensor, expected and found."""


def fail(message: str) -> int:
    """Print ``error: <message>`` on stderr and return the CLI's "unusable input" code."""
    print(f"error: {message}", file=sys.stderr)
    return 2

"""The quantize runner's two failure kinds and their exit codes.

A :class:`QuantizeInputError` is the user's problem (a path, an argument, a
checkpoint that is not BF16): one line, exit 2, no stack trace. A
:class:`QuantizeCheckError` is a run that finished a stage but failed one of
our checks (an expert that saw no calibration tokens, a linear ModelOpt left
unquantized against the recipe): one line plus what to do, exit 1.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_CHECK_FAILED = 1
EXIT_BAD_INPUT = 2


class QuantizeInputError(Exception):
    """Unusable input. The message names file or argument, expected and found."""

    exit_code = EXIT_BAD_INPUT


class QuantizeCheckError(Exception):
    """A stage ran but its output failed a check; the message says what and how to fix it."""

    exit_code = EXIT_CHECK_FAILED

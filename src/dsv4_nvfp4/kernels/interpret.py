"""Load these kernels for Triton's CPU interpreter (CPU CI, machines without a GPU).

Triton fixes interpreter mode when a ``@triton.jit`` function is decorated,
including its own library functions (``tl.max``, ``tl.sum`` are jit functions
decorated when ``triton`` is first imported). So ``TRITON_INTERPRET=1`` must be
set before the first ``import triton`` of the process, and it must stay set
(triton reads it again lazily at launch). :func:`load_interpreted` sets it for
the rest of the process; if ``triton`` was already imported in compiled mode it
raises
:class:`InterpreterUnavailable`, and the caller can run its work in a fresh
process instead (:func:`interpreter_env`).
"""

from __future__ import annotations

import importlib
import os
import sys
from types import ModuleType

_MODULES = ("_bits", "_config", "staging", "megamoe_staging")


class InterpreterUnavailable(RuntimeError):
    """``triton`` was imported in this process before ``TRITON_INTERPRET=1`` was set."""


def _interpreted(fn: object) -> bool:
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(fn, InterpretedFunction)


def interpreter_env() -> dict[str, str]:
    """The environment for a fresh process that runs these kernels in the interpreter."""
    return {**os.environ, "TRITON_INTERPRET": "1"}


def load_interpreted() -> ModuleType:
    """Return ``dsv4_nvfp4.kernels`` with every kernel an interpreted (CPU) function."""
    if "triton" not in sys.modules:
        os.environ["TRITON_INTERPRET"] = "1"
    import triton.language as tl

    if not _interpreted(tl.max) or os.environ.get("TRITON_INTERPRET") != "1":
        raise InterpreterUnavailable(
            "triton was imported before TRITON_INTERPRET=1 was set; run in a fresh process "
            "with TRITON_INTERPRET=1")
    pkg = importlib.import_module("dsv4_nvfp4.kernels")
    staging = importlib.import_module("dsv4_nvfp4.kernels.staging")
    if not _interpreted(staging._stage_per_token_kernel):
        for name in _MODULES:
            module = sys.modules.get(f"dsv4_nvfp4.kernels.{name}")
            if module is not None:
                importlib.reload(module)
    return pkg

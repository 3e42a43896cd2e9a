"""Shared harness (no tests) for the CPU kernel tests, which run Triton in interpreter mode.

Triton's interpreter mode is fixed at its first import. When another test
file imported triton in compiled mode first, a kernel test file cannot load
the kernels in this process: its tests then skip, and its
``test_fresh_process`` reruns the whole file in a fresh interpreter with
``TRITON_INTERPRET=1``.

Use in a test file, after ``kernels = load_interpreted()`` (None on
``InterpreterUnavailable``)::

    _interpreter, test_fresh_process = interpreter_guard(kernels, __file__)
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from types import ModuleType

import pytest

from dsv4_nvfp4.kernels.interpret import interpreter_env

FRESH_PROCESS_TEST = "test_fresh_process"


def interpreter_guard(kernels: ModuleType | None, test_file: str
                      ) -> tuple[Callable[..., None], Callable[[], None]]:
    """(autouse fixture that skips when ``kernels`` is None, the fresh-process rerun test)."""

    @pytest.fixture(autouse=True)
    def _interpreter(request: pytest.FixtureRequest) -> None:
        if kernels is None and request.node.name != FRESH_PROCESS_TEST:
            pytest.skip("triton was imported in compiled mode first; "
                        f"{FRESH_PROCESS_TEST} runs this file")

    def test_fresh_process() -> None:
        """Runs this file in a fresh interpreter when triton was imported first here."""
        if kernels is not None:
            pytest.skip("the tests ran in this process")
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                            test_file], env=interpreter_env(), capture_output=True, text=True,
                           timeout=900)
        assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]

    return _interpreter, test_fresh_process

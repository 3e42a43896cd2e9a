"""Triton kernels beside their torch references in :mod:`dsv4_nvfp4.formats`.

* :func:`stage_nvfp4_activations_per_token`: BF16/FP16 hidden states → packed
  E2M1, int32 words of four E4M3 block-16 scales and fp32 per-token scales, the
  activation input of vLLM 0.34.0's NVFP4 MegaMoE (DeepGEMM ``nvfp4_mega_moe``
  with ``use_x_scales=True``; see ``docs/kernels.md``).
* :func:`stage_megamoe_nvfp4_inputs`: vLLM 0.34.0's ``prepare_megamoe_nvfp4_inputs``
  byte for byte (``formats.mega_moe_stage_inputs``), in one faster launch;
  :func:`megamoe_staging_unsupported` names what it leaves to vLLM's kernel.

It is bit-exact with its ``formats`` reference on the GPU and in Triton's CPU
interpreter (every rounding is done on bit patterns, see ``_bits.py``).

Names are resolved lazily so that ``import dsv4_nvfp4.kernels.interpret`` does
not import ``triton`` (interpreter mode must be chosen before that import);
``from dsv4_nvfp4.kernels import X`` raises ImportError when triton is missing.
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "TileConfig": "._config",
    "megamoe_staging_unsupported": ".megamoe_staging",
    "stage_megamoe_nvfp4_inputs": ".megamoe_staging",
    "stage_nvfp4_activations_per_token": ".staging",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_EXPORTS[name], __name__), name)

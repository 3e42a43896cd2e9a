"""Triton kernels beside their torch references in :mod:`dsv4_nvfp4.formats`.

* :func:`stage_nvfp4_activations_static` / :func:`stage_nvfp4_activations_per_token`:
  BF16/FP16 hidden states → packed E2M1 + UE4M3 block-16 scale words, the
  input buffer of DeepGEMM's NVFP4 mega-MoE (see ``docs/kernels.md``).
* :func:`dequantize_nvfp4_to_bf16`: NVFP4 weights → BF16.

Each is bit-exact with its ``formats`` reference on the GPU and in Triton's CPU
interpreter (every rounding is done on bit patterns, see ``_bits.py``).
Importing this package needs ``triton``; running it needs a GPU or
``TRITON_INTERPRET=1`` with CPU tensors.
"""

from ._config import TileConfig
from .dequant import dequantize_nvfp4_to_bf16
from .staging import stage_nvfp4_activations_per_token, stage_nvfp4_activations_static

__all__ = [
    "TileConfig",
    "dequantize_nvfp4_to_bf16",
    "stage_nvfp4_activations_per_token",
    "stage_nvfp4_activations_static",
]

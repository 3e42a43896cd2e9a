"""MXFP4 (OCP MX): E2M1 values with one UE8M0 power-of-two scale per 32 elements along K.

This is the routed-expert format of the native DeepSeek V4 checkpoint (layout A):
``weight`` I8 ``[out, in/2]`` (two E2M1 codes per byte, element 2i low) and
``scale`` F8_E8M0 ``[out, in/32]``.

Scale rule when we quantize (tiny checkpoints, tests): the smallest power of two
with ``block_amax / scale <= 6`` (``ceil(log2(amax/6))``, ModelOpt's MXFP4 rule),
so no element saturates. Elements round to nearest, ties to even. Dequantizing
is exact for any source: ``e2m1 · 2**(b-127)``.
"""

from __future__ import annotations

import torch

from .constants import E2M1_MAX, MXFP4_GROUP
from .e2m1 import dequant_e2m1_packed, e2m1_encode, pack_e2m1
from .errors import expect
from .scales import decode_ue8m0, ue8m0_bytes, ue8m0_exponent_for_amax


def quantize_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``w [..., K]`` (K % 32 == 0) → packed uint8 ``[..., K/2]``, UE8M0 bytes ``[..., K/32]``."""
    expect(w.is_floating_point(), "weight", "a floating-point tensor", w.dtype)
    expect(w.shape[-1] % MXFP4_GROUP == 0, "weight",
           f"last dimension a multiple of {MXFP4_GROUP}", tuple(w.shape))
    blocks = w.float().reshape(*w.shape[:-1], w.shape[-1] // MXFP4_GROUP, MXFP4_GROUP)
    scale = ue8m0_exponent_for_amax(blocks.abs().amax(dim=-1), E2M1_MAX)
    codes = e2m1_encode(blocks / decode_ue8m0(scale).unsqueeze(-1))
    return pack_e2m1(codes.reshape(w.shape)), scale


def dequantize_mxfp4(packed: torch.Tensor, scale: torch.Tensor,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Packed E2M1 ``[..., K/2]`` + UE8M0 ``[..., K/32]`` → ``[..., K]``."""
    values = dequant_e2m1_packed(packed)
    s = decode_ue8m0(ue8m0_bytes(scale))
    expect(values.shape[:-1] == s.shape[:-1] and values.shape[-1] == s.shape[-1] * MXFP4_GROUP,
           "scale", f"shape {(*values.shape[:-1], values.shape[-1] // MXFP4_GROUP)}",
           tuple(s.shape))
    out = values.reshape(*s.shape, MXFP4_GROUP) * s.unsqueeze(-1)
    return out.reshape(values.shape).to(dtype)

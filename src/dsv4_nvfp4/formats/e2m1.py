"""E2M1 (FP4) codec: round-to-nearest-even encode, table decode, nibble packing.

Bit layout of a code: ``s e e m`` (bit 3 = sign). Magnitudes 0, .5, 1, 1.5, 2, 3, 4, 6.
Two codes share a byte: element ``2i`` in the low nibble, ``2i+1`` in the high
nibble (ModelOpt, compressed-tensors, vLLM, DeepGEMM, torch ``float4_e2m1fn_x2``).
torch's ``float4_e2m1fn_x2`` is storage-only (no casts), so decoding goes through
a 16-entry table.

NaN / inf policy of :func:`e2m1_encode` (E2M1 has neither):
  * ``|x| > 6`` and ``±inf`` saturate to ``±6`` (codes 0x7 / 0xF), like PTX ``satfinite``;
  * NaN encodes as code 0x7 (+6), the same as ModelOpt's ``_cast_fp4``
    (ml_dtypes would give 0x8; we follow ModelOpt because NVFP4 weights are made by it);
  * ``-0.0`` encodes as 0x0, a negative value that rounds to zero as 0x8 (-0),
    again as ModelOpt does.
"""

from __future__ import annotations

import torch

from .constants import (
    E2M1_NAN_CODE,
    E2M1_SIGN_BIT,
    E2M1_TIE_DOWN_THRESHOLDS,
    E2M1_TIE_UP_THRESHOLDS,
    E2M1_VALUES,
)
from .errors import expect

_TABLES: dict[torch.device, torch.Tensor] = {}
_PAIR_TABLES: dict[torch.device, torch.Tensor] = {}


def e2m1_table(device: torch.device | str = "cpu") -> torch.Tensor:
    """The 16 E2M1 values as fp32, indexed by code."""
    device = torch.device(device)
    if device not in _TABLES:
        _TABLES[device] = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=device)
    return _TABLES[device]


def e2m1_encode(x: torch.Tensor) -> torch.Tensor:
    """Round ``x`` (already divided by its scale) to E2M1 codes, uint8 in [0, 15].

    Round half to even: 0.25→0, 0.75→1, 1.25→1, 1.75→2, 2.5→2, 3.5→4, 5→4; >5→6.
    """
    expect(x.is_floating_point(), "x", "a floating-point tensor", x.dtype)
    xf = x.float()
    mag = xf.abs()
    code = torch.zeros_like(mag, dtype=torch.uint8)
    for t in E2M1_TIE_DOWN_THRESHOLDS:
        code += (mag > t).to(torch.uint8)
    for t in E2M1_TIE_UP_THRESHOLDS:
        code += (mag >= t).to(torch.uint8)
    code = torch.where(torch.isnan(xf), torch.full_like(code, E2M1_NAN_CODE), code)
    sign = (xf < 0).to(torch.uint8) * E2M1_SIGN_BIT
    return code | sign


def e2m1_decode(codes: torch.Tensor) -> torch.Tensor:
    """E2M1 codes (uint8, low 4 bits) → fp32 values."""
    expect(codes.dtype == torch.uint8, "codes", "uint8", codes.dtype)
    return e2m1_table(codes.device)[(codes & 0xF).long()]


def pack_e2m1(codes: torch.Tensor) -> torch.Tensor:
    """Pack codes ``[..., 2n]`` into bytes ``[..., n]``: element 2i low nibble, 2i+1 high."""
    expect(codes.dtype == torch.uint8, "codes", "uint8", codes.dtype)
    expect(codes.shape[-1] % 2 == 0, "codes", "an even last dimension", tuple(codes.shape))
    lo = codes[..., 0::2] & 0xF
    hi = codes[..., 1::2] & 0xF
    return lo | (hi << 4)


def unpack_e2m1(packed: torch.Tensor) -> torch.Tensor:
    """Bytes ``[..., n]`` → codes ``[..., 2n]`` (inverse of :func:`pack_e2m1`)."""
    if packed.dtype in (torch.int8, getattr(torch, "float4_e2m1fn_x2", None)):
        packed = packed.view(torch.uint8)
    expect(packed.dtype == torch.uint8, "packed", "uint8 (or int8 / float4_e2m1fn_x2)",
           packed.dtype)
    out = torch.empty((*packed.shape[:-1], packed.shape[-1] * 2), dtype=torch.uint8,
                      device=packed.device)
    out[..., 0::2] = packed & 0xF
    out[..., 1::2] = packed >> 4
    return out


def _pair_table(device: torch.device) -> torch.Tensor:
    """``[256, 2]`` fp32: the (low, high) nibble values of every byte."""
    if device not in _PAIR_TABLES:
        b = torch.arange(256, dtype=torch.int64, device=device)
        t = e2m1_table(device)
        _PAIR_TABLES[device] = torch.stack([t[b & 0xF], t[b >> 4]], dim=-1)
    return _PAIR_TABLES[device]


def dequant_e2m1_packed(packed: torch.Tensor) -> torch.Tensor:
    """Packed bytes ``[..., n]`` → fp32 values ``[..., 2n]`` (no scale applied).

    One lookup per byte in a 256×2 table: the same values as decoding each
    nibble (:func:`unpack_e2m1` then :func:`e2m1_decode`), twice as fast.
    """
    if packed.dtype in (torch.int8, getattr(torch, "float4_e2m1fn_x2", None)):
        packed = packed.view(torch.uint8)
    expect(packed.dtype == torch.uint8, "packed", "uint8 (or int8 / float4_e2m1fn_x2)",
           packed.dtype)
    pairs = _pair_table(packed.device).index_select(0, packed.reshape(-1).int())
    return pairs.reshape(*packed.shape[:-1], packed.shape[-1] * 2)

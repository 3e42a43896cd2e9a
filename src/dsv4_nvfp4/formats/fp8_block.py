"""FP8 E4M3 weights with one scale per 128×128 tile (DeepSeek V3/V4 dense linears).

Two scale forms (an enum, not a boolean):

* ``ScaleFormat.FP32``  — ``scale = amax / 448`` (fp32 ``weight_scale_inv``);
* ``ScaleFormat.UE8M0`` — ``scale = 2**ceil(log2(amax / 448))`` stored as UE8M0
  bytes, the form of the native DeepSeek V4 checkpoint (``.scale`` F8_E8M0) and
  of DeepGEMM's SM100 kernels. Rounding the scale up means no element saturates.

``q = e4m3(clamp(x / scale, ±448))``, ``dequant = fp32(q) · scale``. An all-zero
tile gets scale 1.0. The scale tensor is ``[ceil(N/128), ceil(K/128)]``; edge
tiles may be partial.
"""

from __future__ import annotations

import enum

import torch

from .constants import E4M3_MAX, FP8_BLOCK
from .errors import expect
from .scales import decode_ue8m0, ue8m0_bytes, ue8m0_exponent_for_amax


class ScaleFormat(enum.Enum):
    """How a 128×128 FP8 block scale is stored."""

    FP32 = "fp32"
    UE8M0 = "ue8m0"


def _pad_to_tiles(w: torch.Tensor, block: int) -> torch.Tensor:
    n, k = w.shape
    pn, pk = (-n) % block, (-k) % block
    if pn or pk:
        w = torch.nn.functional.pad(w, (0, pk, 0, pn))
    return w


def _per_tile(x: torch.Tensor, scale: torch.Tensor, block: int, op) -> torch.Tensor:
    """``op(x, scale)`` with one scale per ``block × block`` tile, without expanding the scale.

    ``x`` is ``[N, K]``; it is padded to whole tiles, viewed as
    ``[tn, block, tk, block]``, combined with ``scale[:, None, :, None]`` and
    cropped back: the same per-element operation as on an expanded scale.
    """
    n, k = x.shape
    xp = _pad_to_tiles(x, block)
    tn, tk = xp.shape[0] // block, xp.shape[1] // block
    out = op(xp.view(tn, block, tk, block), scale[:, None, :, None])
    return out.reshape(tn * block, tk * block)[:n, :k]


def quantize_fp8_block(w: torch.Tensor, block: int = FP8_BLOCK,
                       scale_format: ScaleFormat = ScaleFormat.UE8M0
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """``w [N, K]`` → (``float8_e4m3fn [N, K]``, scale ``[⌈N/b⌉, ⌈K/b⌉]`` fp32 or UE8M0 uint8)."""
    expect(w.dim() == 2, "weight", "a 2-D tensor", tuple(w.shape))
    expect(w.is_floating_point(), "weight", "a floating-point tensor", w.dtype)
    wp = _pad_to_tiles(w.float(), block)
    tn, tk = wp.shape[0] // block, wp.shape[1] // block
    amax = wp.reshape(tn, block, tk, block).abs().amax(dim=(1, 3))
    if scale_format is ScaleFormat.UE8M0:
        stored = ue8m0_exponent_for_amax(amax, E4M3_MAX)
        scale = decode_ue8m0(stored)
    else:
        scale = torch.where(amax == 0, torch.ones_like(amax), amax / E4M3_MAX)
        stored = scale
    q = _per_tile(w.float(), scale, block, torch.div).clamp(-E4M3_MAX, E4M3_MAX)
    return q.to(torch.float8_e4m3fn), stored


def decode_fp8_block_scale(scale: torch.Tensor) -> torch.Tensor:
    """fp32 scales pass through; UE8M0 bytes (uint8 / float8_e8m0fnu) are decoded."""
    if scale.dtype == torch.float32:
        return scale
    return decode_ue8m0(ue8m0_bytes(scale))


def dequantize_fp8_block(q: torch.Tensor, scale: torch.Tensor, block: int = FP8_BLOCK,
                         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``fp32(q) · scale`` tile by tile."""
    expect(q.dtype == torch.float8_e4m3fn, "weight", "float8_e4m3fn", q.dtype)
    n, k = q.shape
    s = decode_fp8_block_scale(scale)
    want = (-(-n // block), -(-k // block))
    expect(tuple(s.shape) == want, "scale", f"shape {want}", tuple(s.shape))
    return _per_tile(q.float(), s, block, torch.mul).to(dtype)

"""Block-scale codecs: UE4M3 (NVFP4) and UE8M0 (MXFP4, DeepSeek FP8 blocks).

The two are both one byte and their byte ranges overlap on real weights, so a
scale's format is decided by metadata (dtype + tensor name + shape), never by
its bytes. Decoding a UE4M3 byte as UE8M0 (``2**(b-127)``, or ``b << 23`` as
float bits) is a known NVFP4 serving bug: a 448 scale (0x7E) becomes
0.5.

UE4M3 encode clamps to 448 **before** the cast: torch ≥ 2.12 saturates
out-of-range values on the cast, but older torch and ml_dtypes produce NaN, so
we never rely on the cast to saturate.
"""

from __future__ import annotations

import torch

from .constants import E4M3_MAX, E4M3_NAN_BYTES, UE8M0_BIAS, UE8M0_NAN
from .errors import FormatError, expect

_E8M0 = getattr(torch, "float8_e8m0fnu", None)


def encode_ue4m3(x: torch.Tensor, *, zero_value: float | None = None) -> torch.Tensor:
    """Non-negative fp32 scales → ``float8_e4m3fn`` with round-to-nearest-even.

    ``zero_value``: what an exact zero becomes. ``None`` keeps 0 (byte 0x00: the
    activation kernels' convention, a zero block dequantizes to zeros); ModelOpt
    weights use ``1.0`` (byte 0x38). Values above 448 saturate to 448 (0x7E).
    NaN stays NaN, always as byte 0x7F (the sign of a NaN differs between CPU
    and CUDA arithmetic, e.g. ``inf/inf``), so a caller's bug stays visible.
    """
    expect(x.is_floating_point(), "scale", "a floating-point tensor", x.dtype)
    xf = x.float()
    if bool((xf < 0).any()):
        raise FormatError(f"scale: expected non-negative values, found min {xf.min().item()}")
    if zero_value is not None:
        xf = torch.where(xf == 0, torch.full_like(xf, zero_value), xf)
    out = xf.clamp(max=E4M3_MAX).to(torch.float8_e4m3fn)
    nan = torch.isnan(xf)
    if bool(nan.any()):
        out = torch.where(nan, torch.full_like(out.view(torch.uint8), E4M3_NAN_BYTES[0]),
                          out.view(torch.uint8)).view(torch.float8_e4m3fn)
    return out


def as_e4m3(t: torch.Tensor, name: str = "scale") -> torch.Tensor:
    """View uint8 bytes as ``float8_e4m3fn``; pass ``float8_e4m3fn`` through."""
    if t.dtype == torch.uint8:
        return t.view(torch.float8_e4m3fn)
    expect(t.dtype == torch.float8_e4m3fn, name, "float8_e4m3fn or uint8", t.dtype)
    return t


def decode_ue4m3(t: torch.Tensor) -> torch.Tensor:
    """``float8_e4m3fn`` (or its uint8 bytes) → fp32. Exact for every finite code."""
    return as_e4m3(t).float()


def ue8m0_bytes(t: torch.Tensor, name: str = "scale") -> torch.Tensor:
    """UE8M0 scales as uint8 bytes, from uint8 or ``float8_e8m0fnu``."""
    if _E8M0 is not None and t.dtype == _E8M0:
        return t.view(torch.uint8)
    expect(t.dtype == torch.uint8, name, "uint8 or float8_e8m0fnu", t.dtype)
    return t


def decode_ue8m0(t: torch.Tensor) -> torch.Tensor:
    """UE8M0 → fp32: ``2**(b-127)``; byte 0xFF is NaN (there is no zero and no inf)."""
    b = ue8m0_bytes(t).to(torch.int32)
    out = torch.ldexp(torch.ones_like(b, dtype=torch.float32), b - UE8M0_BIAS)
    return torch.where(b == UE8M0_NAN, torch.full_like(out, float("nan")), out)


def ue8m0_exponent_for_amax(amax: torch.Tensor, elem_max: float) -> torch.Tensor:
    """Smallest power-of-two scale ``2**k`` with ``amax / 2**k <= elem_max``, as a UE8M0 byte.

    ``k = ceil(log2(amax / elem_max))`` computed exactly with frexp (no log2
    rounding). An all-zero block gets ``2**0`` (byte 127). This is the
    round-up rule of ModelOpt's MXFP4 quantizer and of vLLM/DeepGEMM's UE8M0
    FP8 block scales: no element ever saturates.
    """
    ratio = amax.float() / elem_max
    mant, exp = torch.frexp(ratio)  # ratio = mant * 2**exp, mant in [0.5, 1)
    k = torch.where(mant == 0.5, exp - 1, exp).to(torch.int32)
    k = torch.where(ratio == 0, torch.zeros_like(k), k)
    k = k.clamp(-UE8M0_BIAS, UE8M0_BIAS)
    return (k + UE8M0_BIAS).to(torch.uint8)

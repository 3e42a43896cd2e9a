"""Conversions between weight formats, each reporting its own error.

* :func:`mxfp4_to_nvfp4_lossless` — the native checkpoint's MXFP4 experts become
  NVFP4 with the E2M1 nibbles byte-identical (ModelOpt's ``--cast_mxfp4_to_nvfp4``
  idea, re-derived here): a block scale ``2**k_j`` (UE8M0) is split into
  ``weight_scale_2 = 2**(k_max-8)`` and ``weight_scale = 2**(k_j-k_max+8)``, an
  exact E4M3 power of two whenever ``k_max - k_j <= 17`` (E4M3 spans 2⁻⁹…2⁸).
  Blocks further below the tensor maximum are requantized at the 2⁻⁹ floor and
  counted; real DeepSeek V4 weights have none.
* :func:`nvfp4_to_fp8_block`, :func:`nvfp4_to_bf16` — the converter's dense
  paths, returning the error against the exact fp32 dequantization.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .constants import MXFP4_GROUP, NVFP4_GROUP, UE8M0_BIAS, UE8M0_NAN
from .e2m1 import e2m1_decode, e2m1_encode, pack_e2m1, unpack_e2m1
from .errors import FormatError, expect
from .fp8_block import ScaleFormat, dequantize_fp8_block, quantize_fp8_block
from .nvfp4 import NVFP4Tensor
from .scales import ue8m0_bytes


@dataclass(frozen=True)
class ConversionError:
    """Error of a converted tensor against its exact reference (fp32).

    max_abs: max |converted - reference|
    max_rel: max_abs / max |reference|
    rel_l2:  ||converted - reference|| / ||reference||

    The relative statistics are NaN (undefined), never 0, when the reference is
    all zero or not finite: a tensor that dequantized to zeros (a zero global
    scale) or to NaN must not read as a perfect conversion. :meth:`from_sums`
    is the one formula; :meth:`between` and the converter's chunked
    accumulator both call it.
    """

    max_abs: float
    max_rel: float
    rel_l2: float

    @property
    def defined(self) -> bool:
        """False when the reference was all zero or not finite (relative error undefined)."""
        return self.rel_l2 == self.rel_l2 and self.max_rel == self.max_rel

    @staticmethod
    def from_sums(max_abs: float, ref_amax: float, diff_sq: float, ref_sq: float
                  ) -> ConversionError:
        """From max |diff|, max |reference|, sum diff² and sum reference²."""
        nan = float("nan")
        finite = math.isfinite(ref_amax) and math.isfinite(ref_sq)
        return ConversionError(
            max_abs=max_abs,
            max_rel=max_abs / ref_amax if finite and ref_amax > 0 else nan,
            rel_l2=math.sqrt(diff_sq) / math.sqrt(ref_sq) if finite and ref_sq > 0 else nan,
        )

    @staticmethod
    def between(converted: torch.Tensor, reference: torch.Tensor) -> ConversionError:
        ref = reference.float().reshape(-1)
        diff = converted.float().reshape(-1) - ref
        if not diff.numel():
            return ConversionError.from_sums(0.0, 0.0, 0.0, 0.0)
        return ConversionError.from_sums(float(diff.abs().max()), float(ref.abs().max()),
                                         float(torch.dot(diff, diff)), float(torch.dot(ref, ref)))


def mxfp4_to_nvfp4_lossless(packed: torch.Tensor, scale: torch.Tensor
                            ) -> tuple[NVFP4Tensor, int]:
    """MXFP4 ``(packed [N, K/2], UE8M0 [N, K/32])`` → (NVFP4 tensor, lossy 32-blocks count)."""
    packed = packed.view(torch.uint8) if packed.dtype == torch.int8 else packed
    expect(packed.dtype == torch.uint8, "packed", "uint8 or int8", packed.dtype)
    sb = ue8m0_bytes(scale)
    k = packed.shape[-1] * 2
    expect(sb.shape[:-1] == packed.shape[:-1] and sb.shape[-1] * MXFP4_GROUP == k, "scale",
           f"shape {(*packed.shape[:-1], k // MXFP4_GROUP)}", tuple(sb.shape))
    if bool((sb == UE8M0_NAN).any()):
        raise FormatError("scale: expected UE8M0 bytes without 0xFF (NaN), found 0xFF")
    kj = sb.to(torch.int32) - UE8M0_BIAS
    k_max = int(kj.max()) if kj.numel() else 0
    e = kj - k_max + 8  # exponent of each block's E4M3 scale, <= 8
    lossless = e >= -9
    e_clamped = e.clamp(min=-9)
    ws_blocks = torch.ldexp(torch.ones_like(e_clamped, dtype=torch.float32), e_clamped)
    # each 32-block becomes two 16-groups with the same scale
    ws = ws_blocks.repeat_interleave(MXFP4_GROUP // NVFP4_GROUP, dim=-1).to(torch.float8_e4m3fn)
    ws2 = torch.tensor(2.0 ** (k_max - 8), dtype=torch.float32, device=packed.device)
    out_packed = packed.clone()
    lossy = 0
    if not bool(lossless.all()):
        codes = unpack_e2m1(packed).reshape(*sb.shape, MXFP4_GROUP)
        # value / (2^-9 · ws2) = e2m1 · 2^(k_j - k_max + 8 + 9): shrink by 2^(e + 9) < 1
        shrink = torch.ldexp(torch.ones_like(e, dtype=torch.float32), e + 9)
        requant = e2m1_encode(e2m1_decode(codes) * shrink.unsqueeze(-1))
        new_codes = torch.where(lossless.unsqueeze(-1), codes, requant)
        changed = (e2m1_decode(new_codes) != e2m1_decode(codes) * shrink.unsqueeze(-1))
        lossy = int((changed.any(dim=-1) & ~lossless).sum())
        out_packed = pack_e2m1(new_codes.reshape(*packed.shape[:-1], k))
    return NVFP4Tensor(out_packed, ws, ws2), lossy


def nvfp4_to_fp8_block(t: NVFP4Tensor, scale_format: ScaleFormat = ScaleFormat.UE8M0
                       ) -> tuple[torch.Tensor, torch.Tensor, ConversionError]:
    """NVFP4 → FP8 E4M3 with 128×128 block scales (for vLLM's FP8 dense linears)."""
    ref = t.dequantize(torch.float32)
    q, s = quantize_fp8_block(ref, scale_format=scale_format)
    return q, s, ConversionError.between(dequantize_fp8_block(q, s), ref)


def nvfp4_to_bf16(t: NVFP4Tensor) -> tuple[torch.Tensor, ConversionError]:
    """NVFP4 → BF16 (for ``--dense bf16`` and fully dequantized checkpoints)."""
    ref = t.dequantize(torch.float32)
    out = ref.to(torch.bfloat16)
    return out, ConversionError.between(out, ref)

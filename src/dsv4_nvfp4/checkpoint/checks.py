"""Value checks on tensors, each returning findings as ``(check, expected, found)``.

Scale formats are never guessed from bytes: the caller knows from dtype + name
+ shape that a tensor is an NVFP4 ``weight_scale`` (E4M3) or a ``.scale``
(UE8M0) and calls the matching check. The byte-level rules below are what the
producers guarantee:

* ModelOpt NVFP4 weights (``NVFP4QTensor``): ``weight_scale_2 = amax/2688``,
  ``weight_scale = e4m3(clamp(block_amax/(6·ws2), 2⁻⁹, 448))`` with empty
  blocks set to 1.0. So a scale byte is never 0, never negative, never NaN,
  and the block holding the amax of the ``weight_scale_2`` group gets exactly
  448 (0x7E). The lossless MXFP4 cast puts it at 256 (0x78) instead.
* Either way the packed values are scaled so that the largest block reaches
  code 3.0 or more: the dequantized amax is between half and all of
  ``max(weight_scale)·ws2·6``.
* UE8M0 (``.scale``) has no zero and no infinity; 0xFF is NaN.
"""

from __future__ import annotations

import torch

from dsv4_nvfp4.formats import (
    E2M1_MAX,
    E4M3_MAX,
    MXFP4_GROUP,
    NVFP4_GROUP,
    UE8M0_NAN,
    decode_ue8m0,
    e2m1_table,
    unpack_e2m1,
)

Problem = tuple[str, str, str]  # (check, expected, found)

# Max block scale of a ws2 group: 448 (ModelOpt) or 256 (lossless MXFP4 cast).
GROUP_MAX_SCALES = (256.0, E4M3_MAX)
# Smallest acceptable amax(dequant) / (max(scale) * 6): the largest block reaches code >= 3.0.
MIN_AMAX_RATIO = 0.5
# A scale tensor with at least this many blocks that holds one value is not a real export.
CONSTANT_MIN_BLOCKS = 64


def finite(t: torch.Tensor) -> list[Problem]:
    """NaN / inf in a floating-point tensor (FP8 e4m3 weights: the 0x7F / 0xFF codes)."""
    if t.dtype == torch.float8_e4m3fn:
        b = t.view(torch.uint8)
        n = int(((b & 0x7F) == 0x7F).sum())
        return [("value.nan", "no NaN codes (0x7F/0xFF) in FP8 e4m3",
                 f"{n} NaN codes")] if n else []
    if not t.is_floating_point() or t.dtype == getattr(torch, "float8_e8m0fnu", None):
        return []
    if bool(torch.isfinite(t).all()):
        return []
    bad = ~torch.isfinite(t.float())
    if bool(bad.any()):
        n_nan = int(torch.isnan(t.float()).sum())
        return [("value.nonfinite", "finite values",
                 f"{n_nan} NaN and {int(bad.sum()) - n_nan} inf")]
    return []


def ue8m0_scale(scale: torch.Tensor) -> list[Problem]:
    b = scale.view(torch.uint8)
    n = int((b == UE8M0_NAN).sum())
    return [("scale.ue8m0_nan", "UE8M0 bytes without 0xFF (NaN)", f"{n} bytes 0xFF")] if n else []


def _block_amax_codes(packed: torch.Tensor, group: int) -> torch.Tensor:
    """Per-block max |E2M1| value (fp32 ``[N, K/group]``) of packed FP4 ``[N, K/2]``."""
    codes = unpack_e2m1(packed.view(torch.uint8)) & 0x7
    n, k = codes.shape
    mx = codes.reshape(n, k // group, group).amax(dim=-1)
    return e2m1_table(packed.device)[mx.long()]


def e4m3_block_scale(ws: torch.Tensor) -> tuple[list[Problem], bool]:
    """Byte rules of an NVFP4 ``weight_scale``. Returns (problems, usable for value checks)."""
    out: list[Problem] = []
    b = ws.view(torch.uint8)
    neg = int((b >= 0x80).sum())
    if neg:
        out.append(("scale.e4m3_sign", "E4M3 block scales with the sign bit clear (UE4M3)",
                    f"{neg} bytes >= 0x80: UE8M0 exponent bytes stored where E4M3 belong?"))
    nan = int(((b & 0x7F) == 0x7F).sum())
    if nan:
        out.append(("scale.e4m3_nan", "E4M3 block scales <= 448 without NaN codes (0x7F/0xFF)",
                    f"{nan} NaN codes"))
    zero = int((b == 0).sum())
    if zero:
        out.append(("scale.zero", "block scales >= 2^-9 (ModelOpt writes 1.0 for empty blocks, "
                    "never 0)", f"{zero} of {b.numel()} zero scales: those blocks dequantize to "
                    "0 (global scale folded into the block scales?)"))
    if b.numel() >= CONSTANT_MIN_BLOCKS and bool((b == b.flatten()[0]).all()):
        v = float(ws.view(torch.float8_e4m3fn).flatten()[0].float())
        out.append(("scale.constant", "block scales that follow the weights' block maxima",
                     f"all {b.numel()} scales equal {v:g} (byte 0x{int(b.flatten()[0]):02X})"))
    return out, not (neg or nan)


def nvfp4_values(packed: torch.Tensor, ws: torch.Tensor, ws2: torch.Tensor,
                 input_scale: torch.Tensor | None) -> list[Problem]:
    """Rules of one NVFP4 linear; the ws2-group rule is :func:`nvfp4_group_max`."""
    out, usable = e4m3_block_scale(ws)
    for label, s in (("weight_scale_2", ws2), ("input_scale", input_scale)):
        if s is None:
            continue
        v = float(s.float().reshape(-1)[0]) if s.numel() else float("nan")
        if not (v > 0 and v < float("inf")):
            out.append((f"scale.{label}", f"{label} a finite value > 0", f"{v!r}"))
            usable = False
    shapes_agree = packed.shape[0] == ws.shape[0] and \
        packed.shape[1] * 2 == ws.shape[1] * NVFP4_GROUP
    if usable and shapes_agree:
        wsf = ws.view(torch.float8_e4m3fn).float()
        smax = float(wsf.max()) * E2M1_MAX
        amax = float((_block_amax_codes(packed, NVFP4_GROUP) * wsf).max())
        if smax > 0 and amax < MIN_AMAX_RATIO * smax:
            out.append(("scale.amax_ratio", f"amax(dequantized) between {MIN_AMAX_RATIO} and 1 x "
                        "max(weight_scale)*weight_scale_2*6",
                        f"{amax / smax:.3f} x: packed values and block scales disagree "
                        "(scales of another tensor, or garbled FP4 bytes?)"))
    return out


def nvfp4_group_max(scales: list[torch.Tensor]) -> list[Problem]:
    """The max block scale over linears sharing one ``weight_scale_2`` must be 448 or 256."""
    vals = [float(s.view(torch.float8_e4m3fn).float().max()) for s in scales if s.numel()]
    vals = [v for v in vals if v == v]
    if not vals:
        return []
    m = max(vals)
    if m not in GROUP_MAX_SCALES:
        return [("scale.global_mismatch", "the weight_scale_2 group's largest block scale = 448 "
                 "(ModelOpt: ws2 = amax/2688) or 256 (lossless MXFP4 cast)",
                 f"{m:g}: weight_scale_2 does not match the block scales (global scale folded "
                 "or rescaled?)")]
    return []


def mxfp4_values(packed: torch.Tensor, scale: torch.Tensor) -> list[Problem]:
    out = ue8m0_scale(scale)
    if out or packed.shape[1] * 2 != scale.shape[1] * MXFP4_GROUP:
        return out
    s = decode_ue8m0(scale.view(torch.uint8))
    smax = float(s.max()) * E2M1_MAX
    amax = float((_block_amax_codes(packed, MXFP4_GROUP) * s).max())
    if smax > 0 and amax < MIN_AMAX_RATIO * smax:
        out.append(("scale.amax_ratio", f"amax(dequantized) between {MIN_AMAX_RATIO} and 1 x "
                    "max(scale)*6", f"{amax / smax:.3f} x: packed values and scales disagree"))
    return out

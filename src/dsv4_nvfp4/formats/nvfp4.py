"""NVFP4: E2M1 values, one UE4M3 scale per 16 elements along K, one fp32 global scale.

Weights are quantized exactly as NVIDIA ModelOpt's ``NVFP4QTensor`` does
(modelopt/torch/quantization/qtensor/nvfp4_tensor.py, 0.45–0.47):

    weight_scale_2 = amax(W) / 2688                     (fp32, = amax / (6·448))
    weight_scale   = e4m3(clamp(block_amax / (6·ws2), 2⁻⁹, 448)), all-zero block → 1.0
    q              = RNE_e2m1(x / (fp32(weight_scale) · ws2))
    dequant        = e2m1 · (fp32(weight_scale) · ws2)

The global scale is never folded into the E4M3 block scales: with a small ws2
(≈1e-4 for real weights) the product underflows E4M3's 2⁻⁹ floor and whole
blocks dequantize to zero (a known NVFP4 serving bug).

Activations have two conventions (see :func:`quantize_nvfp4_activation_static`
and :func:`quantize_nvfp4_activation_per_token`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .constants import (
    E2M1_MAX,
    E4M3_MAX,
    NVFP4_GLOBAL_DIVISOR,
    NVFP4_GROUP,
    NVFP4_WEIGHT_SCALE_MIN,
    PER_TOKEN_AMAX_FLOOR,
)
from .e2m1 import dequant_e2m1_packed, e2m1_encode, pack_e2m1
from .errors import expect
from .scales import as_e4m3, encode_ue4m3


@dataclass(frozen=True)
class NVFP4Tensor:
    """One NVFP4 weight as stored in a ModelOpt checkpoint.

    packed:       uint8 ``[N, K/2]`` (element 2i in the low nibble)
    block_scale:  float8_e4m3fn ``[N, K/16]`` (ModelOpt ``weight_scale``)
    global_scale: fp32 0-d (ModelOpt ``weight_scale_2``)
    """

    packed: torch.Tensor
    block_scale: torch.Tensor
    global_scale: torch.Tensor

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_nvfp4(self.packed, self.block_scale, self.global_scale, dtype)


def _blocks(x: torch.Tensor, group: int, name: str) -> torch.Tensor:
    expect(x.dim() >= 1, name, "at least one dimension", tuple(x.shape))
    expect(x.shape[-1] % group == 0, name, f"last dimension a multiple of {group}",
           tuple(x.shape))
    return x.reshape(*x.shape[:-1], x.shape[-1] // group, group)


def true_div(x: torch.Tensor, divisor: float) -> torch.Tensor:
    """``x / divisor`` as an IEEE fp32 division on every device.

    torch turns ``cuda_tensor / python_float`` into a multiply by the fp32
    reciprocal, while the CPU divides, so the same reference gave different
    bits at exact E4M3 ties on the two devices. Dividing by a 0-d tensor on
    ``x``'s device is a true division everywhere (and is what the Triton
    kernel computes).
    """
    return x / torch.full((), divisor, dtype=torch.float32, device=x.device)


def nvfp4_global_scale_from_amax(amax: torch.Tensor | float) -> torch.Tensor:
    """ModelOpt's ``weight_scale_2`` (and ``input_scale``): ``amax / 2688`` in fp32.

    Same torch expression as ModelOpt's ``get_weights_scaling_factor_2``, so the
    result equals ModelOpt's on the same device (on CUDA both multiply by the
    fp32 reciprocal of 2688; on CPU both divide).
    """
    return torch.as_tensor(amax).float() / NVFP4_GLOBAL_DIVISOR


def quantize_nvfp4_weight(w: torch.Tensor, global_scale: torch.Tensor | None = None
                          ) -> NVFP4Tensor:
    """Quantize a weight ``[..., K]`` (K % 16 == 0) bit-exactly as ModelOpt does.

    One deliberate difference: an all-zero tensor gets ``global_scale = 1.0``
    (every block scale 1.0, every code 0, dequantizes to zeros). ModelOpt
    computes ``0/0`` there and writes NaN block scales.
    """
    expect(w.is_floating_point(), "weight", "a floating-point tensor", w.dtype)
    blocks = _blocks(w, NVFP4_GROUP, "weight")
    if global_scale is None:
        global_scale = nvfp4_global_scale_from_amax(w.abs().amax())
        if float(global_scale) == 0.0:
            global_scale = torch.ones((), dtype=torch.float32)
    ws2 = torch.as_tensor(global_scale, dtype=torch.float32, device=w.device).reshape(())
    block_amax = blocks.abs().amax(dim=-1).float()
    ws = block_amax / (E2M1_MAX * ws2)
    ws = torch.where(ws == 0, torch.ones_like(ws), ws)
    ws = ws.clamp(min=NVFP4_WEIGHT_SCALE_MIN, max=E4M3_MAX).to(torch.float8_e4m3fn)
    scaled = blocks.float() / (ws.float() * ws2).unsqueeze(-1)
    codes = e2m1_encode(scaled.reshape(w.shape))
    return NVFP4Tensor(pack_e2m1(codes), ws, ws2)


def dequantize_nvfp4(packed: torch.Tensor, block_scale: torch.Tensor,
                     global_scale: torch.Tensor | float, dtype: torch.dtype = torch.float32
                     ) -> torch.Tensor:
    """``e2m1 · (fp32(block_scale) · global_scale)``, in ModelOpt's operation order."""
    bs = as_e4m3(block_scale, "block_scale")
    values = dequant_e2m1_packed(packed)
    expect(values.shape[:-1] == bs.shape[:-1] and values.shape[-1] == bs.shape[-1] * NVFP4_GROUP,
           "block_scale", f"shape {(*values.shape[:-1], values.shape[-1] // NVFP4_GROUP)}",
           tuple(bs.shape))
    g = torch.as_tensor(global_scale, dtype=torch.float32, device=packed.device).reshape(())
    scale = bs.float() * g
    out = values.reshape(*bs.shape, NVFP4_GROUP) * scale.unsqueeze(-1)
    return out.reshape(values.shape).to(dtype)


def quantize_nvfp4_activation_static(x: torch.Tensor, input_scale: torch.Tensor | float
                                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Static-global-scale activation quantization: one calibrated scale for every token.

    ``input_scale`` is the checkpoint's calibrated ``input_scale`` (= act_amax / 2688).
    With ``G = 1 / input_scale`` (fp32)::

        SF    = e4m3(min((amax16 / 6) · G, 448))      (all-zero block → SF byte 0x00)
        codes = RNE_e2m1(x · (G / fp32(SF)))          (SF == 0 → codes 0)
        x    ≈ e2m1 · fp32(SF) · input_scale

    A reference: vLLM 0.34.0's NVFP4 MegaMoE stages its input per token instead
    (:func:`quantize_nvfp4_activation_per_token`). Returns packed uint8 ``[T, H/2]``
    and E4M3 SF ``[T, H/16]``.
    """
    expect(x.is_floating_point(), "x", "a floating-point tensor", x.dtype)
    blocks = _blocks(x, NVFP4_GROUP, "x").float()
    s = torch.as_tensor(input_scale, dtype=torch.float32, device=x.device).reshape(())
    expect(bool(s > 0) and bool(torch.isfinite(s)), "input_scale", "a finite value > 0",
           s.item())
    g = 1.0 / s
    amax = blocks.abs().amax(dim=-1)
    sf = encode_ue4m3(true_div(amax, E2M1_MAX) * g)
    sf_f = sf.float()
    mult = torch.where(sf_f == 0, torch.zeros_like(sf_f), g / sf_f)
    codes = e2m1_encode((blocks * mult.unsqueeze(-1)).reshape(x.shape))
    return pack_e2m1(codes), sf


def quantize_nvfp4_activation_per_token(x: torch.Tensor
                                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two-level per-token activation quantization, the input of vLLM's NVFP4 MegaMoE.

    vLLM 0.34.0's ``DeepGemmMegaMoEExperts`` (``MEGA_MOE_NVFP4``) calls DeepGEMM
    ``nvfp4_mega_moe`` with ``use_x_scales=True``: packed E2M1 ``x``, int32 ``x_sf``
    (four E4M3 block-16 scales per word, ``pack_sf_bytes_to_int32``) and fp32
    per-token ``x_scales`` (= ``pts``). The convention was first defined by
    SGLang's DeepGEMM fork (``nvfp4xnvfp4``). vLLM's own staging kernel
    (``_prepare_megamoe_nvfp4_inputs_kernel``,
    ``vllm/model_executor/layers/fused_moe/prepare_megamoe.py``) is not
    byte-identical to this: ``pts = max(row_amax, 1e-12) * fp32(1/2688)``, it
    divides by ``pts`` and then by the SF, floors the SF at 2⁻⁹ and writes code 0
    for negative values that round to zero (``docs/kernels.md``).

    No calibrated scale is needed::

        pts   = max(row_amax, 1e-4) / 2688                    (fp32 [T])
        SF    = e4m3_satfinite(block_amax / (6 · pts))         (≤ 448 by construction)
        codes = RNE_e2m1(x / (fp32(SF) · pts))                 (SF == 0 → codes 0)
        x    ≈ e2m1 · fp32(SF) · pts

    Returns packed uint8 ``[T, H/2]``, E4M3 SF ``[T, H/16]`` and ``pts`` fp32 ``[T]``.
    """
    expect(x.dim() == 2, "x", "a 2-D tensor [T, H]", tuple(x.shape))
    expect(x.is_floating_point(), "x", "a floating-point tensor", x.dtype)
    blocks = _blocks(x, NVFP4_GROUP, "x").float()
    block_amax = blocks.abs().amax(dim=-1)
    row_amax = (block_amax.amax(dim=-1) if x.shape[-1]
                else torch.zeros(x.shape[0], device=x.device))
    pts = true_div(row_amax.clamp(min=PER_TOKEN_AMAX_FLOOR), NVFP4_GLOBAL_DIVISOR)
    sf = encode_ue4m3(block_amax / (E2M1_MAX * pts.unsqueeze(-1)))
    denom = sf.float() * pts.unsqueeze(-1)
    safe = torch.where(denom == 0, torch.ones_like(denom), denom)
    scaled = blocks / safe.unsqueeze(-1)
    scaled = torch.where((denom == 0).unsqueeze(-1), torch.zeros_like(scaled), scaled)
    codes = e2m1_encode(scaled.reshape(x.shape))
    return pack_e2m1(codes), sf, pts

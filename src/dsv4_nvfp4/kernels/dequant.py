"""NVFP4 → BF16 dequantization on the GPU (the converter's fast path).

Input is a ModelOpt NVFP4 weight exactly as stored in a checkpoint: packed E2M1
uint8 ``[..., N, K/2]`` (element 2i in the low nibble), ``weight_scale``
float8_e4m3fn ``[..., N, K/16]`` and the fp32 ``weight_scale_2``. The output is
``bf16(e2m1 · (fp32(weight_scale) · weight_scale_2))``, in that operation order,
bit-exact with ``formats.dequantize_nvfp4(..., dtype=torch.bfloat16)``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv4_nvfp4.formats.constants import NVFP4_GROUP
from dsv4_nvfp4.formats.errors import expect

from ._bits import bf16_pair_word, e2m1_decode, e4m3_to_f32
from ._config import TileConfig, check_tile, dequant_tile
from .staging import scale_tensor

_FP4X2 = getattr(torch, "float4_e2m1fn_x2", None)


@triton.jit
def _dequant_kernel(packed_ptr, bs_ptr, g_ptr, out_ptr, N, stride_p, stride_bs, stride_ow,
                    ROWS: tl.constexpr, BLOCK_K: tl.constexpr, HW: tl.constexpr):
    """One tile of ROWS rows × BLOCK_K columns.

    Each packed byte becomes one int32 output word holding its two bf16 values
    (element 2i in the low half), so no interleaving shuffle is needed.
    """
    G: tl.constexpr = BLOCK_K // 16
    W: tl.constexpr = BLOCK_K // 2
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    rmask = (rows < N)[:, None]
    rows64 = rows.to(tl.int64)[:, None]
    wcols = tl.program_id(1) * W + tl.arange(0, W)[None, :]

    p = tl.load(packed_ptr + rows64 * stride_p + wcols, mask=rmask, other=0).to(tl.int32)
    lo = tl.reshape(e2m1_decode(p & 0xF), [ROWS, G, 8])
    hi = tl.reshape(e2m1_decode((p >> 4) & 0xF), [ROWS, G, 8])
    scols = tl.program_id(1) * G + tl.arange(0, G)[None, :]
    sfb = tl.load(bs_ptr + rows64 * stride_bs + scols, mask=rmask, other=0).to(tl.int32)
    scale = (e4m3_to_f32(sfb, HW) * tl.load(g_ptr))[:, :, None]  # formats: fp32(block) * global
    word = bf16_pair_word(lo * scale, hi * scale, HW)
    tl.store(out_ptr + rows64 * stride_ow + wcols, tl.reshape(word, [ROWS, W]), mask=rmask)


def _packed_bytes(packed: torch.Tensor) -> torch.Tensor:
    expect(isinstance(packed, torch.Tensor), "packed", "a torch.Tensor", type(packed).__name__)
    fp4x2 = _FP4X2 is not None and packed.dtype == _FP4X2
    ok = packed.dtype in (torch.uint8, torch.int8) or fp4x2
    expect(ok, "packed", "uint8 packed E2M1 (or int8 / float4_e2m1fn_x2)", packed.dtype)
    return packed.view(torch.uint8)


def _scale_bytes(block_scale: torch.Tensor) -> torch.Tensor:
    expect(isinstance(block_scale, torch.Tensor), "block_scale", "a torch.Tensor",
           type(block_scale).__name__)
    expect(block_scale.dtype in (torch.float8_e4m3fn, torch.uint8), "block_scale",
           "float8_e4m3fn (or its uint8 bytes)", block_scale.dtype)
    return block_scale.view(torch.uint8)


def dequantize_nvfp4_to_bf16(packed: torch.Tensor, block_scale: torch.Tensor,
                             global_scale: torch.Tensor | float, out: torch.Tensor | None = None,
                             *, config: TileConfig | None = None) -> torch.Tensor:
    """NVFP4 ``[..., N, K/2]`` + scales → bf16 ``[..., N, K]``, bit-exact with ``formats``.

    Args:
        packed: uint8 ``[..., K/2]`` (int8 and float4_e2m1fn_x2 views accepted).
        block_scale: float8_e4m3fn (or uint8 bytes) ``[..., K/16]``, same leading dims.
        global_scale: ``weight_scale_2``, a float or a one-element tensor.
        out: optional contiguous bf16 ``[..., K]`` to write into.
        config: tile shape override (benchmarks and tests only).

    Returns ``out`` (allocated when not given).
    """
    p = _packed_bytes(packed)
    bs = _scale_bytes(block_scale)
    expect(p.dim() >= 1 and p.shape[-1] > 0, "packed", "at least one dimension, K/2 > 0",
           tuple(p.shape))
    k = p.shape[-1] * 2
    want_bs = (*p.shape[:-1], k // NVFP4_GROUP)
    expect(k % NVFP4_GROUP == 0 and tuple(bs.shape) == want_bs, "block_scale",
           f"shape {want_bs} (one scale per {NVFP4_GROUP} values; K = {k})", tuple(bs.shape))
    expect(bs.device == p.device, "block_scale", f"device {p.device} (same as packed)", bs.device)
    shape = (*p.shape[:-1], k)
    if out is None:
        out = torch.empty(shape, dtype=torch.bfloat16, device=p.device)
    else:
        expect(isinstance(out, torch.Tensor), "out", "a torch.Tensor", type(out).__name__)
        expect(out.dtype == torch.bfloat16, "out", "dtype torch.bfloat16", out.dtype)
        expect(tuple(out.shape) == shape, "out", f"shape {shape}", tuple(out.shape))
        expect(out.device == p.device, "out", f"device {p.device}", out.device)
        expect(out.is_contiguous(), "out", "a contiguous tensor", out.stride())
    g = scale_tensor(global_scale, "global_scale", p.device, positive=False)
    rows = out.numel() // k
    if rows == 0:
        return out
    p2 = p.reshape(rows, k // 2)
    bs2 = bs.reshape(rows, k // NVFP4_GROUP)
    expect(out.data_ptr() % 4 == 0, "out", "a 4-byte aligned data pointer", out.data_ptr())
    o2 = out.view(rows, k).view(torch.int32)  # two bf16 per word
    if p2.stride(-1) != 1:
        p2 = p2.contiguous()
    if bs2.stride(-1) != 1:
        bs2 = bs2.contiguous()
    cfg = check_tile(config, k, NVFP4_GROUP) if config else dequant_tile(k, device=p.device)
    grid = (triton.cdiv(rows, cfg.rows), k // cfg.block)
    _dequant_kernel[grid](p2, bs2, g, o2, rows, p2.stride(0), bs2.stride(0), o2.stride(0),
                          ROWS=cfg.rows, BLOCK_K=cfg.block, HW=p2.is_cuda,
                          num_warps=cfg.num_warps)
    return out

"""vLLM 0.34.0's NVFP4 MegaMoE input staging, byte for byte, in one faster launch.

vLLM 0.34.0 stages the inputs of its NVFP4 MegaMoE (``DeepGemmMegaMoEExperts``,
``MEGA_MOE_NVFP4``) with ``prepare_megamoe_nvfp4_inputs``
(``vllm/model_executor/layers/fused_moe/prepare_megamoe.py``).
:func:`stage_megamoe_nvfp4_inputs` takes the same arguments and writes the same
bytes — the packed E2M1 ``x``, the E4M3 scale words ``x_sf``, the fp32 ``x_scales``,
the repacked ``topk_idx_out`` / ``topk_weights_out`` (padded tokens unrouted: id -1,
weight 0) and ``l2_alpha`` — for every input, inf and NaN included. Its torch
transcription is ``formats.mega_moe_stage_inputs`` / ``formats.mega_moe_stage_tokens``.

Not handled here (:func:`megamoe_staging_unsupported` names the reason, and the
vLLM plugin then calls vLLM's own kernel): an active EPLB state (logical→physical
replica mapping and load recording), a fused shared expert's input (``shared_x``,
MXFP8 or BF16), and inputs vLLM accepts but this kernel does not take (other dtypes,
strided rows, rows too long to hold in registers).

The arithmetic is vLLM's, per token row ``x`` (every step IEEE fp32)::

    xs    = max(amax|x|, 1e-12) · fp32(1/2688)         maxima skip NaN
    v     = RN(x / xs)
    SF    = e4m3(clamp(RN(amax16|v| · fp32(1/6)), 2⁻⁹, 448))
    codes = E2M1_RNE(RN(v / SF)), sign only when the magnitude code is nonzero, NaN → 0

vLLM divides with ``div.rn.f32`` twice per element. Here, for rows whose values are
all finite, each division is one multiply and two FMAs from a reciprocal rounded once
per row or block (:func:`~._bits.div_by_reciprocal`, Markstein's correction). That
is ``RN(a / b)`` for every pair that occurs: the GPU tests check it exhaustively over
the bf16 numerators and every fp32 token scale (``x / xs``) and over every fp32
numerator and E4M3 scale (``v / SF``), on one binade each — the computation is
exact under scaling by powers of two, and where an intermediate would leave fp32's
normal range the quotient is far below 0.25·SF, whose code is 0 whichever way it
rounds. ``amax16|v|`` is ``RN(amax16|x| / xs)`` (division by ``xs > 0`` and RN are
monotone), one division per block. Rows holding inf or NaN take vLLM's literal
sequence (IEEE divisions, NaN-skipping maxima, seven comparisons per code).

Layout as vLLM's: ``x`` ``[T, H/2]`` bytes (element ``2i`` in the low nibble),
``x_sf`` int32 ``[T, H/64]`` row-major (byte ``i`` of word ``j`` = block ``4j+i``),
``x_scales`` ``[T]``. One program stages ``rows`` whole tokens held in registers (one
read of the input), the first program also writes ``l2_alpha`` (also for ``T = 0``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv4_nvfp4.formats.errors import FormatError

from ._bits import (
    div_by_reciprocal,
    div_rn,
    e2m1_magnitude_bits,
    e4m3_encode,
    e4m3_to_f32,
    f32_bits,
    nan_max_reduce,
    pair_to_f32,
)
from ._config import TileConfig, check_tile, pow2_divisor, row_fits
from .staging import (
    K_E2M1_MAX,
    K_E4M3_MAX,
    K_E4M3_MIN_SUBNORMAL,
    K_GLOBAL_DIVISOR,
    K_GROUP,
    K_MEGA_MOE_TOKEN_AMAX_FLOOR,
    _group_amax,
    _store_chunk,
)

#: vLLM's staging requires the hidden size to be a multiple of this.
VLLM_H_MULTIPLE = 128
FP32_MAX = tl.constexpr(3.4028234663852886e38)  # largest finite fp32


@triton.jit
def _vllm_pair_byte(qlo, qhi):
    """``code(qlo) | code(qhi) << 4`` in the low byte (upper bits garbage), vLLM's codes.

    Magnitude: :func:`~._bits.e2m1_magnitude_bits` (RNE onto {0, .5, 1, 1.5, 2, 3, 4, 6},
    saturating), which equals vLLM's seven comparisons ``m > .25, m >= .75, m > 1.25,
    m >= 1.75, m > 2.5, m >= 3.5, m > 5`` for finite ``m``. Sign: vLLM sets it only
    for ``q < 0`` with a nonzero code, i.e. ``q < -0.25``, the sign bit of
    ``RN(q + 0.25)`` (exact zero for ``q = -0.25`` is +0), taken with an unsigned
    high multiply. Finite ``q`` only.
    """
    a_lo = e2m1_magnitude_bits(tl.abs(qlo))
    a_hi = e2m1_magnitude_bits(tl.abs(qhi))
    s_lo = tl.umulhi(f32_bits(qlo + 0.25), 2)  # bit 31 → 0 or 1
    s_hi = tl.umulhi(f32_bits(qhi + 0.25), 2)
    return a_lo + s_lo * 8 + (a_hi + s_hi * 8) * 16


@triton.jit
def _vllm_code(q):
    """vLLM's E2M1 code of ``q`` literally: seven comparisons (NaN fails all: 0), sign
    only on a nonzero code."""
    m = tl.abs(q)
    code = ((m > 0.25).to(tl.int32) + (m >= 0.75).to(tl.int32) + (m > 1.25).to(tl.int32)
            + (m >= 1.75).to(tl.int32) + (m > 2.5).to(tl.int32) + (m >= 3.5).to(tl.int32)
            + (m > 5.0).to(tl.int32))
    return tl.where((q < 0) & (code != 0), code | 8, code)


@triton.jit
def _block_scale(bmv, HW: tl.constexpr):
    """SF byte and its fp32 value from ``amax16|v|``: ``e4m3(clamp(bmv · fp32(1/6), 2⁻⁹, 448))``
    (``tl.maximum``/``tl.minimum`` skip NaN, as vLLM's)."""
    bs = bmv * (1.0 / K_E2M1_MAX)
    bs = tl.minimum(tl.maximum(bs, K_E4M3_MIN_SUBNORMAL), K_E4M3_MAX)
    sf_byte = e4m3_encode(bs, HW)
    return sf_byte, e4m3_to_f32(sf_byte, HW)


@triton.jit
def _fast_chunk(w, amax, xs2, zxs2, ROWS: tl.constexpr, G: tl.constexpr, IS_BF16: tl.constexpr,
                HW: tl.constexpr):
    """One tile of finite rows: SF bytes ``[ROWS, G]`` and packed codes ``[ROWS, G, 8]``."""
    sf_byte, sff = _block_scale(div_by_reciprocal(amax, xs2, zxs2), HW)
    zsf = div_rn(tl.full([ROWS, G], 1.0, tl.float32), sff)
    lo, hi = pair_to_f32(w, IS_BF16)
    xs3 = xs2[:, :, None]
    zxs3 = zxs2[:, :, None]
    s3 = sff[:, :, None]
    z3 = zsf[:, :, None]
    qlo = div_by_reciprocal(div_by_reciprocal(tl.reshape(lo, [ROWS, G, 8]), xs3, zxs3), s3, z3)
    qhi = div_by_reciprocal(div_by_reciprocal(tl.reshape(hi, [ROWS, G, 8]), xs3, zxs3), s3, z3)
    return sf_byte, _vllm_pair_byte(qlo, qhi)


@triton.jit
def _exact_chunk(w, xs2, ROWS: tl.constexpr, G: tl.constexpr, IS_BF16: tl.constexpr,
                 HW: tl.constexpr):
    """One tile with vLLM's literal sequence (rows holding inf or NaN)."""
    lo, hi = pair_to_f32(w, IS_BF16)
    xs3 = xs2[:, :, None]
    vlo = div_rn(tl.reshape(lo, [ROWS, G, 8]), xs3)
    vhi = div_rn(tl.reshape(hi, [ROWS, G, 8]), xs3)
    bmv = tl.max(tl.maximum(tl.abs(vlo), tl.abs(vhi)), axis=2)  # NaN skipped
    sf_byte, sff = _block_scale(bmv, HW)
    s3 = sff[:, :, None]
    return sf_byte, _vllm_code(div_rn(vlo, s3)) | (_vllm_code(div_rn(vhi, s3)) << 4)


@triton.jit
def _l2_alpha(w2gs_ptr, l2a_ptr, l2_scale, num_experts, BLOCK_E: tl.constexpr):
    """vLLM: ``l2_alpha = w2_global_scale * l2_activation_scale`` (fp32), one program."""
    e = tl.arange(0, BLOCK_E)
    emask = e < num_experts
    alpha = tl.load(w2gs_ptr + e, mask=emask)
    tl.store(l2a_ptr + e, alpha * l2_scale, mask=emask)


@triton.jit
def _topk_rows(rows64, rmask1, ids_ptr, w_ptr, pad_ptr, ids_out_ptr, w_out_ptr,
               ids_sm, ids_sk, w_sm, w_sk, pad_sm, ido_sm, ido_sk, wo_sm, wo_sk,
               TOP_K: tl.constexpr, BLOCK_TOPK: tl.constexpr, HAS_PAD: tl.constexpr):
    """Top-k routing of ``rows``: ids widened to int64, weights copied; padded tokens -1 / 0.0."""
    k = tl.arange(0, BLOCK_TOPK)[None, :]
    kmask = rmask1[:, None] & (k < TOP_K)
    r2 = rows64[:, None]
    ids = tl.load(ids_ptr + r2 * ids_sm + k * ids_sk, mask=kmask, other=0).to(tl.int64)
    wts = tl.load(w_ptr + r2 * w_sm + k * w_sk, mask=kmask, other=0.0)
    if HAS_PAD:
        pad = tl.load(pad_ptr + rows64 * pad_sm, mask=rmask1, other=True)
        ids = tl.where(pad[:, None], -1, ids)
        wts = tl.where(pad[:, None], 0.0, wts)
    tl.store(ids_out_ptr + r2 * ido_sm + k * ido_sk, ids, mask=kmask)
    tl.store(w_out_ptr + r2 * wo_sm + k * wo_sk, wts, mask=kmask)


@triton.jit
def _megamoe_nvfp4_stage_kernel(
        x_ptr, out_x_ptr, out_sf_ptr, out_xs_ptr,
        ids_ptr, w_ptr, pad_ptr, ids_out_ptr, w_out_ptr, w2gs_ptr, l2a_ptr, l2_scale,
        T, num_experts, stride_xw, stride_ox, stride_osf,
        ids_sm, ids_sk, w_sm, w_sk, pad_sm, ido_sm, ido_sk, wo_sm, wo_sk,
        TOP_K: tl.constexpr, BLOCK_TOPK: tl.constexpr, BLOCK_E: tl.constexpr,
        HAS_PAD: tl.constexpr, HAS_L2: tl.constexpr,
        CHUNKS: tl.constexpr, ROWS: tl.constexpr, BLOCK_H: tl.constexpr,
        IS_BF16: tl.constexpr, HW: tl.constexpr):
    """ROWS whole tokens: top-k repack, then the row in registers, amax, quantize, store."""
    pid = tl.program_id(0)
    if HAS_L2:  # noqa: SIM102 (a constexpr test, then a runtime one)
        if pid == 0:
            _l2_alpha(w2gs_ptr, l2a_ptr, l2_scale, num_experts, BLOCK_E)
    rows = pid * ROWS + tl.arange(0, ROWS)
    rmask1 = rows < T
    rows64 = rows.to(tl.int64)
    r2 = rows64[:, None]
    _topk_rows(rows64, rmask1, ids_ptr, w_ptr, pad_ptr, ids_out_ptr, w_out_ptr, ids_sm, ids_sk,
               w_sm, w_sk, pad_sm, ido_sm, ido_sk, wo_sm, wo_sk, TOP_K, BLOCK_TOPK, HAS_PAD)

    G: tl.constexpr = BLOCK_H // K_GROUP
    W: tl.constexpr = BLOCK_H // 2
    rmask = rmask1[:, None]
    src = x_ptr + r2 * stride_xw + tl.arange(0, W)[None, :]
    # Tuples grow by concatenation: Triton's frontend has no starred unpacking.
    words = ()
    for c in tl.static_range(CHUNKS):
        words = words + (tl.load(src + c * W, mask=rmask, other=0),)  # noqa: RUF005
    amaxes = ()
    acc = tl.zeros([ROWS, G], tl.float32)
    for c in tl.static_range(CHUNKS):
        lo, hi = pair_to_f32(words[c], IS_BF16)
        a = _group_amax(lo, hi, ROWS, G, HW)  # NaN-propagating: a NaN row shows here
        amaxes = amaxes + (a,)  # noqa: RUF005
        acc = tl.maximum(acc, a, propagate_nan=tl.PropagateNan.ALL)
    row_amax = nan_max_reduce(acc, 1, HW)
    finite = (row_amax <= FP32_MAX).to(tl.int32)  # false for inf and NaN
    if tl.sum(finite, axis=0) == ROWS:
        xs = tl.maximum(row_amax, K_MEGA_MOE_TOKEN_AMAX_FLOOR) * (1.0 / K_GLOBAL_DIVISOR)
        tl.store(out_xs_ptr + rows, xs, mask=rmask1)
        xs2 = xs[:, None]
        zxs2 = div_rn(tl.full([ROWS, 1], 1.0, tl.float32), xs2)
        for c in tl.static_range(CHUNKS):
            sf_byte, packed = _fast_chunk(words[c], amaxes[c], xs2, zxs2, ROWS, G, IS_BF16, HW)
            _store_chunk(out_x_ptr, out_sf_ptr, r2, rmask, stride_ox, stride_osf, c,
                         sf_byte, packed, ROWS, G)
    else:
        acc = tl.zeros([ROWS, G], tl.float32)
        for c in tl.static_range(CHUNKS):
            lo, hi = pair_to_f32(words[c], IS_BF16)
            m = tl.maximum(tl.abs(lo), tl.abs(hi))  # NaN skipped, as vLLM's tl.max
            acc = tl.maximum(acc, tl.max(tl.reshape(m, [ROWS, G, 8]), axis=2))
        xs = tl.maximum(tl.max(acc, axis=1), K_MEGA_MOE_TOKEN_AMAX_FLOOR) * (1.0 / K_GLOBAL_DIVISOR)
        tl.store(out_xs_ptr + rows, xs, mask=rmask1)
        xs2 = xs[:, None]
        for c in tl.static_range(CHUNKS):
            sf_byte, packed = _exact_chunk(words[c], xs2, ROWS, G, IS_BF16, HW)
            _store_chunk(out_x_ptr, out_sf_ptr, r2, rmask, stride_ox, stride_osf, c,
                         sf_byte, packed, ROWS, G)


@triton.jit
def _megamoe_nvfp4_split_kernel(
        x_ptr, out_x_ptr, out_sf_ptr, out_xs_ptr,
        ids_ptr, w_ptr, pad_ptr, ids_out_ptr, w_out_ptr, w2gs_ptr, l2a_ptr, l2_scale,
        T, num_experts, stride_xw, stride_ox, stride_osf,
        ids_sm, ids_sk, w_sm, w_sk, pad_sm, ido_sm, ido_sk, wo_sm, wo_sk,
        TOP_K: tl.constexpr, BLOCK_TOPK: tl.constexpr, BLOCK_E: tl.constexpr,
        HAS_PAD: tl.constexpr, HAS_L2: tl.constexpr,
        CHUNKS: tl.constexpr, BLOCK_H: tl.constexpr, IS_BF16: tl.constexpr, HW: tl.constexpr):
    """Few tokens: program (token, c) reads the token's row for its amax and quantizes tile
    c only (CHUNKS programs per token, so a handful of tokens still fill several SMs)."""
    row = tl.program_id(0)
    c = tl.program_id(1)
    rows = row + tl.arange(0, 1)
    rmask1 = rows < T
    rows64 = rows.to(tl.int64)
    r2 = rows64[:, None]
    if c == 0:
        if HAS_L2:  # noqa: SIM102 (a constexpr test, then a runtime one)
            if row == 0:
                _l2_alpha(w2gs_ptr, l2a_ptr, l2_scale, num_experts, BLOCK_E)
        _topk_rows(rows64, rmask1, ids_ptr, w_ptr, pad_ptr, ids_out_ptr, w_out_ptr, ids_sm,
                   ids_sk, w_sm, w_sk, pad_sm, ido_sm, ido_sk, wo_sm, wo_sk, TOP_K, BLOCK_TOPK,
                   HAS_PAD)
    G: tl.constexpr = BLOCK_H // K_GROUP
    W: tl.constexpr = BLOCK_H // 2
    rmask = rmask1[:, None]
    src = x_ptr + r2 * stride_xw + tl.arange(0, W)[None, :]
    acc = tl.zeros([1, G], tl.float32)
    for cc in tl.static_range(CHUNKS):
        lo, hi = pair_to_f32(tl.load(src + cc * W, mask=rmask, other=0), IS_BF16)
        acc = tl.maximum(acc, _group_amax(lo, hi, 1, G, HW), propagate_nan=tl.PropagateNan.ALL)
    row_amax = nan_max_reduce(acc, 1, HW)
    w = tl.load(src + c * W, mask=rmask, other=0)
    out_x = out_x_ptr + c * W
    out_sf = out_sf_ptr + c * G
    if tl.sum((row_amax <= FP32_MAX).to(tl.int32), axis=0) == 1:
        lo, hi = pair_to_f32(w, IS_BF16)
        xs = tl.maximum(row_amax, K_MEGA_MOE_TOKEN_AMAX_FLOOR) * (1.0 / K_GLOBAL_DIVISOR)
        xs2 = xs[:, None]
        zxs2 = div_rn(tl.full([1, 1], 1.0, tl.float32), xs2)
        sf_byte, packed = _fast_chunk(w, _group_amax(lo, hi, 1, G, HW), xs2, zxs2, 1, G,
                                      IS_BF16, HW)
    else:
        acc = tl.zeros([1, G], tl.float32)
        for cc in tl.static_range(CHUNKS):
            lo, hi = pair_to_f32(tl.load(src + cc * W, mask=rmask, other=0), IS_BF16)
            m = tl.maximum(tl.abs(lo), tl.abs(hi))  # NaN skipped, as vLLM's tl.max
            acc = tl.maximum(acc, tl.max(tl.reshape(m, [1, G, 8]), axis=2))
        xs = tl.maximum(tl.max(acc, axis=1), K_MEGA_MOE_TOKEN_AMAX_FLOOR) * (1.0 / K_GLOBAL_DIVISOR)
        sf_byte, packed = _exact_chunk(w, xs[:, None], 1, G, IS_BF16, HW)
    if c == 0:
        tl.store(out_xs_ptr + rows, xs, mask=rmask1)
    _store_chunk(out_x, out_sf, r2, rmask, stride_ox, stride_osf, 0, sf_byte, packed, 1, G)


# --------------------------------------------------------------------------- host side

#: GPU tiles by token count, the fastest of ``benchmarks/vllm_staging_bench.py --sweep`` on
#: an H200 at H = 7168 (docs/kernels.md): (smallest T, rows per program, warps per program),
#: the first entry whose T the batch reaches (up to 32 tokens: warps of the split launch).
GPU_MEGAMOE_TILES = ((4096, 1, 2), (33, 1, 4), (0, 1, 8))
#: Up to this many tokens the GPU launch splits each row over its tiles (one program
#: per token and tile, vLLM's own small-batch grid).
GPU_SPLIT_MAX_TOKENS = 32
MAX_GPU_BLOCK = 1024
CPU_TILE_ELEMS = 1 << 16


def megamoe_tile(tokens: int, hidden: int, *, device: torch.device) -> TileConfig | None:
    """The tile for ``tokens`` rows of ``hidden``; None when no whole-row tile fits."""
    if device.type == "cpu":  # Triton's interpreter: few, large programs
        rows = max(1, CPU_TILE_ELEMS // hidden)
        cfg = TileConfig(rows=1 << (rows.bit_length() - 1), block=pow2_divisor(hidden, 8192))
        return cfg if row_fits(cfg, hidden, device) else None
    block = pow2_divisor(hidden, MAX_GPU_BLOCK)
    rows, warps = next((r, w) for min_t, r, w in GPU_MEGAMOE_TILES if tokens >= min_t)
    while warps <= 32:  # more warps until the row fits in registers
        cfg = TileConfig(rows=rows, block=block, num_warps=warps)
        if row_fits(cfg, hidden, device):
            return cfg
        warps *= 2
    return None


def _is_int(t: torch.Tensor) -> bool:
    return t.dtype in (torch.int32, torch.int64)


def _is_float(t: torch.Tensor) -> bool:
    return t.dtype in (torch.float32, torch.bfloat16, torch.float16)


def megamoe_staging_unsupported(
    hidden_states, topk_weights, topk_ids, x, x_sf, x_scales, topk_idx_out, topk_weights_out,
    is_padding=None, shared_x=None, shared_x_sf=None, shared_block_m=None,
    w2_global_scale=None, l2_alpha=None, l2_activation_scale=1.0, eplb_state=None,
    *, config: TileConfig | None = None,
) -> str | None:
    """Why :func:`stage_megamoe_nvfp4_inputs` cannot stage this call (None: it can).

    The arguments are ``prepare_megamoe_nvfp4_inputs``'s. A reason is one short phrase;
    vLLM's own kernel handles every such call (or raises its own error).
    """
    if eplb_state is not None and getattr(eplb_state, "logical_to_physical_map", None) is not None:
        return "EPLB replica mapping and load recording"
    if shared_x is not None or shared_x_sf is not None or shared_block_m is not None:
        return "a fused shared expert's input"
    tensors = (hidden_states, topk_weights, topk_ids, x, x_sf, x_scales, topk_idx_out,
               topk_weights_out)
    if not all(isinstance(t, torch.Tensor) for t in tensors):
        return "a non-tensor buffer"
    h = hidden_states
    if h.dim() != 2 or h.dtype not in (torch.bfloat16, torch.float16):
        return f"hidden_states {h.dtype} {tuple(h.shape)} (bf16/fp16 [T, H] only)"
    t, hid = h.shape
    if hid == 0 or hid % VLLM_H_MULTIPLE:
        return f"hidden size {hid} (a positive multiple of {VLLM_H_MULTIPLE} only)"
    dev = h.device
    extra = [is_padding] + ([w2_global_scale, l2_alpha] if l2_alpha is not None else [])
    if any(isinstance(o, torch.Tensor) and o.device != dev for o in (*tensors, *extra)):
        return "buffers on different devices"
    if h.stride(1) != 1 or (t > 1 and h.stride(0) % 2) or h.data_ptr() % 4:
        return f"hidden_states strides {h.stride()} (unit stride along H, even row stride)"
    if topk_ids.dim() != 2 or topk_ids.shape[0] != t or not _is_int(topk_ids):
        return f"topk_ids {topk_ids.dtype} {tuple(topk_ids.shape)}"
    k = topk_ids.shape[1]
    if k < 1 or tuple(topk_weights.shape) != (t, k) or not _is_float(topk_weights):
        return f"topk_weights {topk_weights.dtype} {tuple(topk_weights.shape)}"
    if tuple(topk_idx_out.shape) != (t, k) or not _is_int(topk_idx_out):
        return f"topk_idx_out {topk_idx_out.dtype} {tuple(topk_idx_out.shape)}"
    if tuple(topk_weights_out.shape) != (t, k) or not _is_float(topk_weights_out):
        return f"topk_weights_out {topk_weights_out.dtype} {tuple(topk_weights_out.shape)}"
    if (x.element_size() != 1 or tuple(x.shape) != (t, hid // 2)
            or (x.numel() and x.stride(1) != 1)):
        return f"x {x.dtype} {tuple(x.shape)} {x.stride()}"
    if (x_sf.dtype != torch.int32 or tuple(x_sf.shape) != (t, hid // 64)
            or (x_sf.numel() and x_sf.stride(1) != 1)):
        return f"x_sf {x_sf.dtype} {tuple(x_sf.shape)} {x_sf.stride()}"
    if x_scales.dtype != torch.float32 or tuple(x_scales.shape) != (t,) or (
            t > 1 and x_scales.stride(0) != 1):
        return f"x_scales {x_scales.dtype} {tuple(x_scales.shape)} {x_scales.stride()}"
    if is_padding is not None and (not isinstance(is_padding, torch.Tensor)
                                   or is_padding.dtype != torch.bool or is_padding.dim() != 1
                                   or is_padding.shape[0] < t):
        return "is_padding other than a bool [T] tensor"
    if (w2_global_scale is None) != (l2_alpha is None):
        return "w2_global_scale without l2_alpha or the reverse"
    if l2_alpha is not None:
        if not (isinstance(l2_alpha, torch.Tensor) and isinstance(w2_global_scale, torch.Tensor)):
            return "a non-tensor l2_alpha or w2_global_scale"
        if (l2_alpha.dtype != torch.float32 or w2_global_scale.dtype != torch.float32
                or not l2_alpha.is_contiguous() or not w2_global_scale.is_contiguous()
                or w2_global_scale.numel() < l2_alpha.numel() or l2_alpha.numel() < 1):
            return "l2_alpha / w2_global_scale other than contiguous fp32"
        if not isinstance(l2_activation_scale, float | int) or isinstance(
                l2_activation_scale, bool):
            return f"l2_activation_scale of type {type(l2_activation_scale).__name__}"
    if config is not None:
        try:
            check_tile(config, hid, VLLM_H_MULTIPLE // 2)
        except FormatError as e:
            return str(e)
        if not row_fits(config, hid, dev):
            return f"tile {config} does not hold a row of {hid} in registers"
    elif megamoe_tile(t, hid, device=dev) is None:
        return f"hidden size {hid} too long to hold a row in registers"
    return None


def stage_megamoe_nvfp4_inputs(
    hidden_states: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    x: torch.Tensor,
    x_sf: torch.Tensor,
    x_scales: torch.Tensor,
    topk_idx_out: torch.Tensor,
    topk_weights_out: torch.Tensor,
    is_padding: torch.Tensor | None = None,
    shared_x: torch.Tensor | None = None,
    shared_x_sf: torch.Tensor | None = None,
    shared_block_m: int | None = None,
    w2_global_scale: torch.Tensor | None = None,
    l2_alpha: torch.Tensor | None = None,
    l2_activation_scale: float = 1.0,
    eplb_state: object | None = None,
    *,
    config: TileConfig | None = None,
    split: bool | None = None,
) -> None:
    """vLLM 0.34.0's ``prepare_megamoe_nvfp4_inputs``, same arguments, same bytes written.

    Raises :class:`~dsv4_nvfp4.formats.FormatError` (a ValueError) with the reason of
    :func:`megamoe_staging_unsupported` for a call it does not handle. ``config``
    overrides the tile, ``split`` the choice of one program per token and tile (by
    default on the GPU up to :data:`GPU_SPLIT_MAX_TOKENS` tokens); benchmarks and tests
    only, results do not depend on them.
    """
    reason = megamoe_staging_unsupported(
        hidden_states, topk_weights, topk_ids, x, x_sf, x_scales, topk_idx_out,
        topk_weights_out, is_padding, shared_x, shared_x_sf, shared_block_m, w2_global_scale,
        l2_alpha, l2_activation_scale, eplb_state, config=config)
    if reason is not None:
        raise FormatError(f"stage_megamoe_nvfp4_inputs: not handled here: {reason}")
    t, hid = hidden_states.shape
    has_l2 = l2_alpha is not None
    if t == 0 and not has_l2:
        return
    cfg = config or megamoe_tile(t, hid, device=hidden_states.device)
    assert cfg is not None  # megamoe_staging_unsupported checked it
    words = hidden_states.view(torch.int32)
    sf_bytes = x_sf.view(torch.uint8)  # [T, H/16]; byte i of word j = block 4j+i
    k = topk_ids.shape[1]
    n_e = l2_alpha.numel() if has_l2 else 0
    if split is None:
        split = hidden_states.is_cuda and 0 < t <= GPU_SPLIT_MAX_TOKENS
    if split and t:
        kernel, grid, tile = _megamoe_nvfp4_split_kernel, (t, hid // cfg.block), {}
    else:
        kernel, grid = _megamoe_nvfp4_stage_kernel, (max(triton.cdiv(t, cfg.rows), 1),)
        tile = {"ROWS": cfg.rows}
    kernel[grid](
        words, x.view(torch.uint8), sf_bytes, x_scales,
        topk_ids, topk_weights, is_padding if is_padding is not None else x_scales,
        topk_idx_out, topk_weights_out,
        w2_global_scale if has_l2 else x_scales, l2_alpha if has_l2 else x_scales,
        float(l2_activation_scale),
        t, n_e, words.stride(0), x.stride(0), sf_bytes.stride(0),
        topk_ids.stride(0), topk_ids.stride(1), topk_weights.stride(0), topk_weights.stride(1),
        is_padding.stride(0) if is_padding is not None else 0,
        topk_idx_out.stride(0), topk_idx_out.stride(1),
        topk_weights_out.stride(0), topk_weights_out.stride(1),
        TOP_K=k, BLOCK_TOPK=triton.next_power_of_2(k),
        BLOCK_E=triton.next_power_of_2(max(n_e, 1)),
        HAS_PAD=is_padding is not None, HAS_L2=has_l2,
        CHUNKS=hid // cfg.block, BLOCK_H=cfg.block,
        IS_BF16=hidden_states.dtype == torch.bfloat16, HW=hidden_states.is_cuda,
        num_warps=cfg.num_warps, **tile)

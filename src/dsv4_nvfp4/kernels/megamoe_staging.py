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

vLLM divides with ``div.rn.f32`` twice per element. The whole-row launch (from 65 tokens)
holds each token row in registers (one read of the input) and takes one of three paths:

* **quick** (bf16 rows): no division per element. ``xs`` depends on the row amax only
  through its 7 fraction bits (``A`` is bf16), so ``(xs, SF)`` pairs come in 129 x 8
  significand classes; :func:`quick_table` finds, for each, a multiplier ``C`` for which
  the code of the exact product ``|x| · C`` (three FMAs, the E2M1 rounding in their
  ``2²³`` magic) is vLLM's code for every bf16 ``x``, and proves it by enumerating them
  (the GPU tests repeat that over every bf16 value at exponents across the range).
  For 44 of the 128 amax significands some SF significand has no such ``C`` (vLLM's first
  rounding lands inputs exactly on a threshold of each tie kind in one block); those rows,
  and rows with a nonzero block amax under ``0.07 · xs`` (a subnormal SF, quotients that
  may pass 6.5), token scales from 2¹⁰⁰ and fp16 rows take
* **two divisions**: each division one multiply and two FMAs from a reciprocal rounded once
  per row (``RN(1/xs)``) or taken from the table (``RN(1/SF)``), Markstein's correction
  (:func:`~._bits.div_by_reciprocal`), which is ``RN(a / b)`` for every pair that occurs:
  the GPU tests check it exhaustively over the bf16 numerators and every fp32 token scale
  and over every fp32 numerator and E4M3 scale, one binade each (exact under powers of
  two). This path re-reads its tiles from L2 in a loop (a second unrolled copy would
  double the registers of every row).
* **literal** (rows holding inf or NaN): vLLM's sequence, IEEE divisions, NaN-skipping
  maxima, seven comparisons per code, tiles re-read from L2.

On every path ``amax16|v|`` is ``RN(amax16|x| / xs)`` (division by ``xs > 0`` and RN are
monotone), one division per block, and the block amax is a tree of packed
``max.NaN.xorsign.abs.bf16x2``. Four input words' codes become one output word in a short
``prmt`` sequence (sign only on a nonzero code), and each block's 8 code bytes are stored
as one 8-byte word. Up to 64 tokens the split launch (vLLM's small-batch grid: one program
per token and 1024-wide tile) uses the two-division arithmetic.

Layout as vLLM's: ``x`` ``[T, H/2]`` bytes (element ``2i`` in the low nibble),
``x_sf`` int32 ``[T, H/64]`` row-major (byte ``i`` of word ``j`` = block ``4j+i``),
``x_scales`` ``[T]``; ``x`` rows must be 8-byte aligned. The first program also writes
``l2_alpha`` (also for ``T = 0``).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from dsv4_nvfp4.formats.errors import FormatError

from ._bits import (
    bits_f32,
    div_by_reciprocal,
    div_rn,
    e2m1_magnitude_bits,
    e4m3_encode,
    e4m3_to_f32,
    f32_bits,
    nan_max_reduce,
    pack_sf_words,
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
#: Rows whose token scale is at least this take the exact path (keeps ``C / 2`` normal).
QUICK_XS_LIMIT = tl.constexpr(2.0**100)
#: Offsets in the table of :func:`quick_table`: 129 x 8 multipliers, 129 row flags, 8 reciprocals.
TAB_FLAGS = tl.constexpr(129 * 8)
TAB_RCP = tl.constexpr(129 * 9)
#: The inline-PTX packer of four words' codes into one output word (:func:`_pack_codes`):
#: nibbles merged, bytes gathered with ``prmt``, the sign bits (bit 15 and 31 of each input
#: word) broadcast with ``prmt``'s sign-replicating selectors and kept only on nonzero codes.
_PACK_PTX = tl.constexpr("""{
.reg .b32 b0, b1, b2, b3, p01, p23, m, l01, l23, slo, shi, s, nz;
mad.lo.u32 b0, $9, 16, $5;
mad.lo.u32 b1, $10, 16, $6;
mad.lo.u32 b2, $11, 16, $7;
mad.lo.u32 b3, $12, 16, $8;
prmt.b32 p01, b0, b1, 0x0040;
prmt.b32 p23, b2, b3, 0x0040;
prmt.b32 m, p01, p23, 0x5410;
prmt.b32 l01, $1, $2, 0xFBD9;
prmt.b32 l23, $3, $4, 0xFBD9;
prmt.b32 slo, l01, l23, 0x5410;
prmt.b32 shi, l01, l23, 0x7632;
and.b32 slo, slo, 0x0F0F0F0F;
and.b32 shi, shi, 0xF0F0F0F0;
or.b32 s, slo, shi;
add.u32 nz, m, 0x77777777;
and.b32 nz, nz, s;
and.b32 nz, nz, 0x88888888;
or.b32 $0, m, nz;
}""")


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
def _bf16x2_absmax(a, b):
    """Per bf16 half of two int32 words: ``max(|a|, |b|)``, NaN-propagating, with the sign bit
    the XOR of the two (``max.NaN.xorsign.abs.bf16x2``; callers clear it at the end)."""
    return tl.inline_asm_elementwise("max.NaN.xorsign.abs.bf16x2 $0, $1, $2;", "=r,r,r",
                                     [a, b], dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def _halves(t, ROWS: tl.constexpr, G: tl.constexpr, N: tl.constexpr):
    """``[ROWS, G, N]`` → its even and odd elements along the last axis."""
    a, b = tl.split(tl.reshape(t, [ROWS, G, N // 2, 2]))
    return a, b


@triton.jit
def _group_amax_bf16(w3, ROWS: tl.constexpr, G: tl.constexpr):
    """Block-16 amax ``[ROWS, G]`` (fp32, NaN-propagating) of bf16 pair words ``[ROWS, G, 8]``:
    a tree of packed absolute maxima, then the two halves of the last word."""
    a, b = _halves(w3, ROWS, G, 8)
    a, b = _halves(_bf16x2_absmax(a, b), ROWS, G, 4)
    a, b = tl.split(_bf16x2_absmax(a, b))
    m = _bf16x2_absmax(a, b)
    m = tl.inline_asm_elementwise(
        "{ .reg .b32 t; prmt.b32 t, $1, $1, 0x1032; max.NaN.xorsign.abs.bf16x2 $0, $1, t; }",
        "=r,r", [m], dtype=tl.int32, is_pure=True, pack=1)
    return bits_f32(m & 0x7FFF0000)  # the high copy, sign cleared


@triton.jit
def _scaled_e2m1_magnitude(a, c2, c1, ch):
    """Low 3 bits: the E2M1 magnitude code (vLLM's thresholds and ties) of the real product
    ``a · c1``, ``0 <= a · c1 < 7``; ``c2 = 2 c1``, ``ch = c1 / 2``.

    :func:`~._bits.e2m1_magnitude_bits` with the scaling folded into its three FMAs: each
    rounds the exact product once, so the code is that of ``a · c1`` itself; no cap at 7 is
    needed below 7.
    """
    t1 = tl.fma(a, c2, 8388608.0)  # 2**23 + RNE(2 a c1)
    t2 = tl.fma(a, c1, 8388610.0)  # 2**23 + 2 + RNE(a c1)
    t3 = tl.fma(a, ch, 8388612.0)  # 2**23 + 4 + RNE(a c1 / 2)
    return f32_bits(tl.minimum(tl.minimum(t1, t2), t3))


@triton.jit
def _quads(t, ROWS: tl.constexpr, G: tl.constexpr):
    """``[ROWS, G, 8]`` → four ``[ROWS, G, 2]``: elements 4o, 4o+1, 4o+2, 4o+3 of each group."""
    e0, e1 = tl.split(tl.reshape(t, [ROWS, G, 2, 2, 2]))
    q0, q2 = tl.split(e0)
    q1, q3 = tl.split(e1)
    return q0, q1, q2, q3


@triton.jit
def _pack_codes(w3, mlo, mhi, ROWS: tl.constexpr, G: tl.constexpr, HW: tl.constexpr):
    """Output words ``[ROWS, G, 2]`` of input words ``w3 [ROWS, G, 8]`` and magnitude codes
    (low 3 bits of ``mlo``/``mhi``, elements 2i and 2i+1): byte i is ``code(2i) | code(2i+1) << 4``
    with the sign bit of a nonzero code set from the input (vLLM: sign only on a nonzero code).
    On the GPU four words per ``prmt`` sequence (:data:`_PACK_PTX`)."""
    if HW:
        w0, w1, w2, w3_ = _quads(w3, ROWS, G)
        l0, l1, l2, l3 = _quads(mlo, ROWS, G)
        h0, h1, h2, h3 = _quads(mhi, ROWS, G)
        return tl.inline_asm_elementwise(
            _PACK_PTX, "=r,r,r,r,r,r,r,r,r,r,r,r,r",
            [w0, w1, w2, w3_, l0, l1, l2, l3, h0, h1, h2, h3], dtype=tl.int32, is_pure=True,
            pack=1)
    else:
        b = (mlo & 7) | ((mhi & 7) << 4)
        nz = (b + 0x77) & 0x88  # bit 3 (7) set when the low (high) code is nonzero
        sign = ((w3 >> 12) & 8) | ((w3 >> 24) & 0x80)  # bits 15, 31 → 3, 7
        byte = b | (nz & sign)
        return tl.reshape(pack_sf_words(tl.reshape(byte, [ROWS, G * 8]), ROWS, G * 8),
                          [ROWS, G, 2])


@triton.jit
def _abs_pairs(w, ROWS: tl.constexpr, G: tl.constexpr, IS_BF16: tl.constexpr):
    """``|x|`` of the even and odd elements of words ``[ROWS, 8G]`` as fp32 ``[ROWS, G, 8]``."""
    if IS_BF16:  # one masking of the word for both
        aw = tl.reshape(w & 0x7FFF7FFF, [ROWS, G, 8])
        return bits_f32(aw << 16), bits_f32(aw & -65536)
    else:
        lo, hi = pair_to_f32(w, IS_BF16)
        return tl.abs(tl.reshape(lo, [ROWS, G, 8])), tl.abs(tl.reshape(hi, [ROWS, G, 8]))


@triton.jit
def _sf_index(sff):
    """E4M3 scale ``sff`` (fp32) → (its significand's 3 fraction bits j, its exponent s)."""
    b = f32_bits(sff)
    return (b >> 20) & 7, (b >> 23) - 127


@triton.jit
def _quick_chunk(w, amax, xs2, zxs2, tab_ptr, idx2, a2, ROWS: tl.constexpr, G: tl.constexpr,
                 HW: tl.constexpr):
    """One bf16 tile of rows whose table entry is complete: SF bytes ``[ROWS, G]`` and output
    words ``[ROWS, G, 2]``, with no division per element.

    ``SF`` is vLLM's (``amax16|v| = RN(amax16|x| / xs)`` exactly). The code of each element is
    that of the exact product ``|x| · C`` (three FMAs), ``C`` the table's multiplier for the row's
    amax significand ``idx`` and the block's SF significand ``j``, scaled by ``2^-(a + s)``
    (:func:`quick_table` proves it gives vLLM's code for every bf16 value).
    """
    sf_byte, sff = _block_scale(div_by_reciprocal(amax, xs2, zxs2), HW)
    j, s = _sf_index(sff)
    c = bits_f32(tl.load(tab_ptr + idx2 * 8 + j) - ((a2 + s) << 23))
    c3 = c[:, :, None]
    alo, ahi = _abs_pairs(w, ROWS, G, True)
    mlo = _scaled_e2m1_magnitude(alo, c3 * 2.0, c3, c3 * 0.5)
    mhi = _scaled_e2m1_magnitude(ahi, c3 * 2.0, c3, c3 * 0.5)
    return sf_byte, _pack_codes(tl.reshape(w, [ROWS, G, 8]), mlo, mhi, ROWS, G, HW)


@triton.jit
def _finite_chunk(w, amax, xs2, zxs2, tab_ptr, ROWS: tl.constexpr, G: tl.constexpr,
                  IS_BF16: tl.constexpr, HW: tl.constexpr):
    """One tile of finite rows, vLLM's two divisions: ``v = RN(|x| / xs)``, ``q = RN(v / SF)``
    (:func:`~._bits.div_by_reciprocal` from ``RN(1/xs)`` and the table's ``RN(1/SF)``), the
    three-FMA E2M1 magnitude of ``q``; words as :func:`_quick_chunk`."""
    sf_byte, sff = _block_scale(div_by_reciprocal(amax, xs2, zxs2), HW)
    j, s = _sf_index(sff)
    zsf = bits_f32(tl.load(tab_ptr + TAB_RCP + j) - (s << 23))
    xs3 = xs2[:, :, None]
    zxs3 = zxs2[:, :, None]
    s3 = sff[:, :, None]
    z3 = zsf[:, :, None]
    # Not _abs_pairs: with its own expressions nothing is shared with the quick path, which the
    # compiler would otherwise hoist above the branch for all tiles at once (registers).
    lo, hi = pair_to_f32(w, IS_BF16)
    alo = tl.abs(tl.reshape(lo, [ROWS, G, 8]))
    ahi = tl.abs(tl.reshape(hi, [ROWS, G, 8]))
    qlo = div_by_reciprocal(div_by_reciprocal(alo, xs3, zxs3), s3, z3)
    qhi = div_by_reciprocal(div_by_reciprocal(ahi, xs3, zxs3), s3, z3)
    mlo = e2m1_magnitude_bits(qlo)  # capped at 7: a subnormal SF can round far down
    mhi = e2m1_magnitude_bits(qhi)
    return sf_byte, _pack_codes(tl.reshape(w, [ROWS, G, 8]), mlo, mhi, ROWS, G, HW)


@triton.jit
def _store_tile(out_x_ptr, out_sf_ptr, r2, rmask, stride_ox, stride_osf, c, sf_byte, packed,
                ROWS: tl.constexpr, G: tl.constexpr):
    """Tile ``c`` (run-time or constexpr) of a row: ``G * 8`` code bytes and ``G`` scale bytes
    (``out_sf_ptr`` is the scale words viewed as bytes: byte i of word j is group 4j+i)."""
    W: tl.constexpr = G * 8
    offs = c * W + tl.arange(0, W)[None, :]
    tl.store(out_x_ptr + r2 * stride_ox + offs, tl.reshape(packed, [ROWS, W]).to(tl.uint8),
             mask=rmask)
    gcols = c * G + tl.arange(0, G)[None, :]
    tl.store(out_sf_ptr + r2 * stride_osf + gcols, sf_byte.to(tl.uint8), mask=rmask)


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
def _store_words(out_g, out_s, rmask, c, sf_byte, packed, G: tl.constexpr):
    """Tile ``c``: output words ``[ROWS, G, 2]`` as one int64 per block, and the G scale bytes."""
    p0, p1 = tl.split(packed)
    cols = (tl.arange(0, G) + c * G)[None, :]
    tl.store(out_g + cols, p0.to(tl.uint32).to(tl.int64) | (p1.to(tl.int64) << 32), mask=rmask)
    tl.store(out_s + cols, sf_byte.to(tl.uint8), mask=rmask)


@triton.jit
def _stage_rows_literally(x_ptr, out_x_ptr, out_sf_ptr, out_xs_ptr, rows, rmask1, r2, rmask,
                          stride_xw, stride_ox, stride_osf, CHUNKS: tl.constexpr,
                          ROWS: tl.constexpr, BLOCK_H: tl.constexpr, IS_BF16: tl.constexpr,
                          HW: tl.constexpr):
    """Rows holding inf or NaN (rare), re-read tile by tile from L2: vLLM's NaN-skipping amax,
    then its literal sequence (IEEE divisions, seven comparisons per code)."""
    G: tl.constexpr = BLOCK_H // K_GROUP
    W: tl.constexpr = BLOCK_H // 2
    src = x_ptr + r2 * stride_xw + tl.arange(0, W)[None, :]
    acc = tl.zeros([ROWS, G], tl.float32)
    for c in range(CHUNKS):
        lo, hi = pair_to_f32(tl.load(src + c * W, mask=rmask, other=0), IS_BF16)
        m = tl.maximum(tl.abs(lo), tl.abs(hi))  # NaN skipped, as vLLM's tl.max
        acc = tl.maximum(acc, tl.max(tl.reshape(m, [ROWS, G, 8]), axis=2))
    xs = tl.maximum(tl.max(acc, axis=1), K_MEGA_MOE_TOKEN_AMAX_FLOOR) * (1.0 / K_GLOBAL_DIVISOR)
    tl.store(out_xs_ptr + rows, xs, mask=rmask1)
    for c in range(CHUNKS):
        sf_byte, packed = _exact_chunk(tl.load(src + c * W, mask=rmask, other=0), xs[:, None],
                                       ROWS, G, IS_BF16, HW)
        _store_tile(out_x_ptr, out_sf_ptr, r2, rmask, stride_ox, stride_osf, c, sf_byte,
                    packed, ROWS, G)


@triton.jit
def _stage_tile(tile, x_ptr, out_x_ptr, out_sf_ptr, out_xs_ptr, tab_ptr, T, stride_xw,
                stride_ox, stride_osf, CHUNKS: tl.constexpr, ROWS: tl.constexpr,
                BLOCK_H: tl.constexpr, IS_BF16: tl.constexpr, HW: tl.constexpr):
    """Tokens ``tile * ROWS ...``: the rows in registers (one read), amax, then the quick path
    (bf16 rows whose amax significand has a complete table entry), vLLM's two divisions
    (other finite rows) or its literal sequence (inf, NaN); codes stored as one 8-byte word
    per block."""
    G: tl.constexpr = BLOCK_H // K_GROUP
    W: tl.constexpr = BLOCK_H // 2
    rows = tile * ROWS + tl.arange(0, ROWS)
    rmask1 = rows < T
    rmask = rmask1[:, None]
    r2 = rows.to(tl.int64)[:, None]
    # Rows past T re-read row T - 1 (unmasked loads need no zeroed registers); not stored.
    src = (x_ptr + tl.minimum(rows, T - 1).to(tl.int64)[:, None] * stride_xw
           + tl.arange(0, W)[None, :])
    # Tuples grow by concatenation: Triton's frontend has no starred unpacking.
    words = ()
    for c in tl.static_range(CHUNKS):
        words = words + (tl.load(src + c * W),)  # noqa: RUF005
    amaxes = ()
    acc = tl.zeros([ROWS, G], tl.float32)
    low = tl.full([ROWS, G], -1, tl.int32)  # unsigned: the smallest nonzero block amax bits - 1
    for c in tl.static_range(CHUNKS):
        if HW and IS_BF16:
            a = _group_amax_bf16(tl.reshape(words[c], [ROWS, G, 8]), ROWS, G)
        else:
            lo, hi = pair_to_f32(words[c], IS_BF16)
            a = _group_amax(lo, hi, ROWS, G, HW)  # NaN-propagating: a NaN row shows here
        amaxes = amaxes + (a,)  # noqa: RUF005
        acc = tl.maximum(acc, a, propagate_nan=tl.PropagateNan.ALL)
        low = tl.minimum(low.to(tl.uint32), (f32_bits(a) - 1).to(tl.uint32)).to(tl.int32)
    row_amax = nan_max_reduce(acc, 1, HW)
    finite = row_amax <= FP32_MAX  # false for inf and NaN
    n_finite = tl.sum(finite.to(tl.int32), axis=0)
    # A nonzero block amax below 0.07 xs may get a subnormal E4M3 scale m 2^-9 (m < 6), rounded
    # down by up to a third: its quotients may exceed 7, and the quick path's codes (no cap at
    # 7, a table checked up to q = 6.5) hold for q < 6.5 only (6 · 6.5/6 for m >= 6, 6 · 17/16
    # for normal scales). Such rows take the two divisions.
    low_amax = bits_f32(tl.min(low.to(tl.uint32), axis=1).to(tl.int32) + 1)
    # The table row: the amax's 7 fraction bits (a bf16 value) and exponent, or 128 below the
    # token-scale floor (xs is then one constant).
    floor = row_amax < K_MEGA_MOE_TOKEN_AMAX_FLOOR
    a_bits = f32_bits(row_amax)
    idx = tl.where(floor, 128, (a_bits >> 16) & 0x7F)
    expo = tl.where(floor, 0, (a_bits >> 23) - 127)
    xs = tl.maximum(row_amax, K_MEGA_MOE_TOKEN_AMAX_FLOOR) * (1.0 / K_GLOBAL_DIVISOR)
    quick = (finite & (xs < QUICK_XS_LIMIT) & (low_amax >= 0.07 * xs) & IS_BF16
             & (tl.load(tab_ptr + TAB_FLAGS + idx) != 0))
    if n_finite == ROWS:
        tl.store(out_xs_ptr + rows, xs, mask=rmask1)
        xs2 = xs[:, None]
        zxs2 = div_rn(tl.full([ROWS, 1], 1.0, tl.float32), xs2)
        # One 8-byte word per group (the whole group in one thread: no layout conversion).
        out_g = out_x_ptr.to(tl.pointer_type(tl.int64)) + r2 * (stride_ox // 8)
        out_s = out_sf_ptr + r2 * stride_osf
        if tl.sum(quick.to(tl.int32), axis=0) == ROWS:
            for c in tl.static_range(CHUNKS):
                sf_byte, packed = _quick_chunk(words[c], amaxes[c], xs2, zxs2, tab_ptr,
                                               idx[:, None], expo[:, None], ROWS, G, HW)
                _store_words(out_g, out_s, rmask, c, sf_byte, packed, G)
        else:  # a loop re-reading the tiles (from L2): one tile's code, few registers
            for t in range(CHUNKS):
                wt = tl.load(src + t * W)
                if HW and IS_BF16:
                    at = _group_amax_bf16(tl.reshape(wt, [ROWS, G, 8]), ROWS, G)
                else:
                    lt, ht = pair_to_f32(wt, IS_BF16)
                    at = _group_amax(lt, ht, ROWS, G, HW)
                sf_byte, packed = _finite_chunk(wt, at, xs2, zxs2, tab_ptr, ROWS, G, IS_BF16, HW)
                _store_words(out_g, out_s, rmask, t, sf_byte, packed, G)
    else:
        _stage_rows_literally(x_ptr, out_x_ptr, out_sf_ptr, out_xs_ptr, rows, rmask1, r2, rmask,
                              stride_xw, stride_ox, stride_osf, CHUNKS, ROWS, BLOCK_H, IS_BF16,
                              HW)


@triton.jit
def _megamoe_nvfp4_stage_kernel(
        x_ptr, out_x_ptr, out_sf_ptr, out_xs_ptr, tab_ptr,
        ids_ptr, w_ptr, pad_ptr, ids_out_ptr, w_out_ptr, w2gs_ptr, l2a_ptr, l2_scale,
        T, num_experts, stride_xw, stride_ox, stride_osf,
        ids_sm, ids_sk, w_sm, w_sk, pad_sm, ido_sm, ido_sk, wo_sm, wo_sk,
        TOP_K: tl.constexpr, BLOCK_TOPK: tl.constexpr, BLOCK_E: tl.constexpr,
        HAS_PAD: tl.constexpr, HAS_L2: tl.constexpr,
        CHUNKS: tl.constexpr, ROWS: tl.constexpr, BLOCK_H: tl.constexpr,
        IS_BF16: tl.constexpr, HW: tl.constexpr, STAGES: tl.constexpr):
    """Tiles of ROWS whole tokens, ``pid, pid + grid, ...`` (one tile per program, or a
    persistent grid): top-k repack, then :func:`_stage_tile`."""
    pid = tl.program_id(0)
    if HAS_L2:  # noqa: SIM102 (a constexpr test, then a runtime one)
        if pid == 0:
            _l2_alpha(w2gs_ptr, l2a_ptr, l2_scale, num_experts, BLOCK_E)
    for tile in tl.range(pid, tl.cdiv(T, ROWS), tl.num_programs(0), num_stages=STAGES):
        rows64 = (tile * ROWS + tl.arange(0, ROWS)).to(tl.int64)
        _topk_rows(rows64, rows64 < T, ids_ptr, w_ptr, pad_ptr, ids_out_ptr, w_out_ptr, ids_sm,
                   ids_sk, w_sm, w_sk, pad_sm, ido_sm, ido_sk, wo_sm, wo_sk, TOP_K, BLOCK_TOPK,
                   HAS_PAD)
        _stage_tile(tile, x_ptr, out_x_ptr, out_sf_ptr, out_xs_ptr, tab_ptr, T, stride_xw,
                    stride_ox, stride_osf, CHUNKS, ROWS, BLOCK_H, IS_BF16, HW)


@triton.jit
def _megamoe_nvfp4_split_kernel(
        x_ptr, out_x_ptr, out_sf_ptr, out_xs_ptr, tab_ptr,
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
#: the first entry whose T the batch reaches (up to :data:`GPU_SPLIT_MAX_TOKENS`: warps of the
#: split launch). A register cap (``TileConfig.max_registers`` 96: 20 warps per multiprocessor
#: instead of 16) and a persistent grid measured no faster, and are not used.
GPU_MEGAMOE_TILES = ((65, 1, 2), (33, 1, 4), (0, 1, 8))
#: Up to this many tokens the GPU launch splits each row over its tiles (one program
#: per token and tile, vLLM's own small-batch grid).
GPU_SPLIT_MAX_TOKENS = 64
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


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


#: vLLM's E2M1 magnitude thresholds: (T, strict), code += (q > T) if strict else (q >= T).
E2M1_THRESHOLDS = ((0.25, True), (0.75, False), (1.25, True), (1.75, False), (2.5, True),
                   (3.5, False), (5.0, True))


def _vllm_magnitude_codes(q: torch.Tensor) -> torch.Tensor:
    return sum(((q > t) if strict else (q >= t)).to(torch.int32) for t, strict in E2M1_THRESHOLDS)


@functools.cache
def quick_table() -> torch.Tensor:
    """int32 ``[129 * 9 + 8]`` (CPU): the quick path's multipliers, row flags and ``RN(1/SF)``.

    A bf16 row amax ``A = (1 + i/128) · 2^a`` (``i`` < 128) gives the token scale
    ``xs = RN(A · fp32(1/2688)) = xs_i · 2^a``; below the floor (1e-12) ``xs`` is one constant
    (``i = 128``, ``a = 0``). A block scale is ``SF = (1 + j/8) · 2^s``. vLLM's code of an input
    ``x``, ``code(RN(RN(x / xs) / SF))``, is invariant under those powers of two, so it depends on
    ``(i, j)`` and on the bf16 ``x`` over about six binades only: 129 x 8 x 776 cases, all
    computed here with IEEE fp32 divisions (torch on the CPU). For each ``(i, j)`` the multipliers
    ``C`` with ``code(x · C) == vLLM's code`` for every such ``x`` form an interval (the code is
    monotone in ``x``; at each threshold the last ``x`` below and the first above bound it);
    entry ``8i + j`` holds the bits of an fp32 ``C`` strictly inside it (``1 / (xs_i (1 + j/8))``
    rounded, when inside), checked against every case, or 0 where the interval holds no fp32
    value: there vLLM's double rounding lands inputs on thresholds of both tie kinds (q exactly
    0.25, counted below, and exactly 0.75, counted above, in one block), which no single
    multiplier reproduces. Entry ``129·8 + i``: 1 when all 8 of row ``i`` are usable (the kernel's
    quick path takes such rows: 84 of the 128 significands, and the floor). Entries ``129·9 + j``:
    the bits of ``RN(1 / (1 + j/8))`` for the two-division path.
    """
    r = torch.tensor(1.0 / K_GLOBAL_DIVISOR.value, dtype=torch.float32)
    floor = torch.tensor(K_MEGA_MOE_TOKEN_AMAX_FLOOR.value, dtype=torch.float32)
    amax = torch.cat([1 + torch.arange(128, dtype=torch.float32) / 128, floor[None]])
    xs = (amax * r)[:, None, None]  # [129, 1, 1]
    sf = (1 + torch.arange(8, dtype=torch.float32) / 8)[None, :, None]  # [1, 8, 1]
    base = (torch.tensor(0.1, dtype=torch.float32) * sf * xs).view(torch.int32) & -65536
    x = (base + torch.arange(776, dtype=torch.int32) * 65536).view(torch.float32)  # q < 6.6
    code = _vllm_magnitude_codes((x / xs) / sf)
    xd = x.double()
    lo = torch.zeros(129, 8, dtype=torch.float64)
    hi = torch.full((129, 8), torch.inf, dtype=torch.float64)
    for k, (t, _) in enumerate(E2M1_THRESHOLDS, 1):
        up = code >= k
        lo = torch.maximum(lo, t / torch.where(up, xd, torch.inf).amin(-1))
        hi = torch.minimum(hi, t / torch.where(up, -torch.inf, xd).amax(-1))
    ideal = (1 / (xs[..., 0].double() * sf[..., 0].double())).float()
    above = lo.float()
    above = torch.where(above.double() <= lo, torch.nextafter(above, torch.tensor(torch.inf)),
                        above)
    c = torch.where((ideal.double() > lo) & (ideal.double() < hi), ideal, above)
    usable = (c.double() > lo) & (c.double() < hi)
    # Every case again, from the exact product (8 x 24 bits: exact in fp64).
    agree = _vllm_magnitude_codes(xd * c.double()[..., None]) == code
    if not bool(agree[usable].all()):
        raise AssertionError("quick_table: a multiplier disagrees with vLLM's codes")
    mult = torch.where(usable, c.view(torch.int32), 0)
    rcp = (1 / sf[0, :, 0]).view(torch.int32)
    return torch.cat([mult.reshape(-1), usable.all(dim=1).to(torch.int32), rcp])


@functools.cache
def _device_table(device: torch.device) -> torch.Tensor:
    return quick_table().to(device)


def quick_rows(hidden_states: torch.Tensor) -> torch.Tensor:
    """bool ``[T]``: the rows the whole-row launch stages on its quick path (bf16, finite, token
    scale below 2**100, no nonzero block amax below ``0.07 xs``, amax significand with a complete
    :func:`quick_table` row); the other finite rows take vLLM's two divisions. For tests and
    benchmarks."""
    x = hidden_states.float()
    amax = x.abs().amax(dim=1) if x.shape[0] else x.new_zeros(0)
    floor = K_MEGA_MOE_TOKEN_AMAX_FLOOR.value
    xs = torch.clamp(amax, min=floor) * torch.tensor(1.0 / K_GLOBAL_DIVISOR.value,
                                                     dtype=torch.float32)
    idx = torch.where(amax < floor, 128, (amax.view(torch.int32) >> 16) & 0x7F)
    flags = quick_table()[129 * 8:129 * 9].to(x.device)
    blocks = x.abs().reshape(x.shape[0], x.shape[1] // 16, 16).amax(dim=2)
    low = torch.where(blocks > 0, blocks, torch.inf).amin(dim=1) if x.shape[0] else amax
    return (torch.isfinite(amax) & (xs < QUICK_XS_LIMIT.value) & (flags[idx.long()] != 0)
            & (low >= 0.07 * xs) & (hidden_states.dtype == torch.bfloat16))


def threshold_rows(idx: list[int], hidden: int, seed: int = 0) -> torch.Tensor:
    """bf16 ``[len(idx), hidden]`` (CPU) that sit on vLLM's code thresholds: row r's amax has the
    significand ``1 + idx[r]/128`` (``idx[r] == 128``: below the 1e-12 token-scale floor) and
    lies in its first block; every other block holds a block amax that sets a random normal
    E4M3 scale ``SF`` and 15 of the bf16 values nearest ``T · SF · xs`` for the seven thresholds
    ``T`` (the nearest, one step below and one above), with random signs. For tests: every
    table entry of :func:`quick_table`, at the values where its multiplier is tightest."""
    g = torch.Generator().manual_seed(seed)
    n, nb = len(idx), hidden // 16
    i = torch.tensor(idx, dtype=torch.int64)
    e = torch.randint(-8, 9, (n,), generator=g).double()
    sig = 1 + torch.where(i < 128, i, torch.randint(0, 128, (n,), generator=g)).double() / 128
    amax = torch.where(i < 128, sig * 2**e, sig * 2.0**-45).float()  # bf16 values
    r = torch.tensor(1.0 / K_GLOBAL_DIVISOR.value, dtype=torch.float32)
    xs = torch.clamp(amax, min=K_MEGA_MOE_TOKEN_AMAX_FLOOR.value) * r
    # Block scales (1 + j/8) 2^s up to a sixth of the row amax's.
    s_max = torch.floor(torch.log2(amax.double() / (6 * 1.875 * xs.double())))[:, None]
    j = torch.randint(0, 8, (n, nb), generator=g).double()
    s = torch.clamp(s_max - torch.randint(0, 14, (n, nb), generator=g).double(), min=-6)
    bmax = (6 * (1 + j / 8) * 2**s * xs.double()[:, None]).bfloat16().float()
    bs = torch.clamp((bmax / xs[:, None]) * torch.tensor(1 / 6, dtype=torch.float32), 2.0**-9,
                     448.0)
    sf = bs.to(torch.float8_e4m3fn).float()
    t = torch.tensor([thr for thr, _ in E2M1_THRESHOLDS], dtype=torch.float64)
    near = (t * sf.double()[..., None] * xs.double()[:, None, None]).bfloat16()  # [n, nb, 7]
    bits = near.view(torch.int16).to(torch.int32)[..., None] + torch.tensor([-1, 0, 1])
    cand = bits.reshape(n, nb, 21).to(torch.int16).view(torch.bfloat16).float()
    pick = torch.randint(0, 21, (n, nb, 15), generator=g)
    vals = torch.cat([bmax[..., None], torch.gather(cand, 2, pick)], dim=2)
    vals = torch.minimum(vals, bmax[..., None])  # the block amax stays the amax
    vals = vals * torch.where(torch.rand(n, nb, 16, generator=g) < 0.5, -1.0, 1.0)
    perm = torch.argsort(torch.rand(n, nb, 16, generator=g), dim=2)
    vals = torch.gather(vals, 2, perm).reshape(n, hidden)
    vals[:, 0] = amax
    vals[:, 1:16] = vals[:, 1:16].clamp(-amax[:, None], amax[:, None])
    return vals.bfloat16()


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
    if x.data_ptr() % 8 or (t > 1 and x.stride(0) % 8):
        return f"x rows not 8-byte aligned ({x.stride()}, address {x.data_ptr() % 16} mod 16)"
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
        tiles = max(triton.cdiv(t, cfg.rows), 1)
        if cfg.programs_per_sm and hidden_states.is_cuda:
            tiles = min(tiles, cfg.programs_per_sm * _sm_count(hidden_states.device))
        kernel, grid = _megamoe_nvfp4_stage_kernel, (tiles,)
        tile = {"ROWS": cfg.rows, "STAGES": cfg.stages}
        if cfg.max_registers and hidden_states.is_cuda:
            tile["maxnreg"] = cfg.max_registers
    kernel[grid](
        words, x.view(torch.uint8), sf_bytes, x_scales, _device_table(hidden_states.device),
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

"""NVFP4 activation staging: BF16/FP16 hidden states → the NVFP4 mega-MoE input buffer.

The consumer is vLLM 0.34.0's NVFP4 MegaMoE: ``DeepGemmMegaMoEExperts`` with
``MEGA_MOE_NVFP4`` calls the vendored DeepGEMM 2.8.1 ``nvfp4_mega_moe`` with
``use_x_scales=True`` (``vllm/model_executor/layers/fused_moe/deep_gemm_mega_moe.py``,
``vllm/third_party/deep_gemm/mega/nvfp4.py``). For ``T`` local tokens it reads
these views of its ``NVFP4SymmBuffer``:

* ``x``        uint8 ``[T, H/2]``: packed E2M1, element ``2i`` in the low nibble;
* ``x_sf``     int32 ``[T, H/64]``, row-major (K-major): four E4M3 block-16 scales
  per word, byte ``i`` of word ``j`` = group ``4j+i``;
* ``x_scales`` fp32 ``[T]``: one dequantization scale per token, which the kernel
  multiplies into the token's L1 accumulator together with ``l1_alpha``.

:func:`stage_nvfp4_activations_per_token` writes exactly these three, bit-exact
with ``formats.quantize_nvfp4_activation_per_token``. It does not write the
routing views (``topk_idx``, ``topk_weights``), ``l2_alpha`` or a fused shared
expert's input, which vLLM's own staging kernel writes in the same launch.

vLLM 0.34.0 stages this buffer itself with ``_prepare_megamoe_nvfp4_inputs_kernel``
(``vllm/model_executor/layers/fused_moe/prepare_megamoe.py``), whose numbers are
not those of ``formats``, so the two are not byte-identical:

* token scale: vLLM ``max(row_amax, 1e-12) * fp32(1/2688)``; here
  ``max(row_amax, 1e-4) / 2688`` (a different floor, and an IEEE division);
* vLLM divides twice, ``v = x / x_scale``, ``SF = e4m3(clamp(max|v| * fp32(1/6),
  2**-9, 448))``, ``codes = E2M1(v / fp32(SF))``; here once,
  ``SF = e4m3(block_amax / (6 * pts))``, ``codes = E2M1(x / (fp32(SF) * pts))``, so
  roundings at exact ties can differ;
* vLLM's ``2**-9`` floor gives an all-zero block SF byte 0x01 (here 0x00), and a
  block whose SF rounds to 0 here (block amax below about ``2**-10 / 448`` of the
  row amax; all its codes 0) keeps nonzero codes there;
* vLLM's E2M1 drops the sign of a negative value that rounds to zero (code 0; here
  8, ModelOpt's policy) and gives NaN code 0 (here 7);
* vLLM requires ``H % 128 == 0``; this kernel any positive multiple of 64.

It writes into caller-provided tensors (no allocation on the hot path), accepts
any ``T >= 0`` and bf16 or fp16 input with ``H`` a positive multiple of 64, and
never reads or writes outside ``[T, ...]``. Validation raises
:class:`dsv4_nvfp4.formats.FormatError` (a ValueError) naming the argument.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from dsv4_nvfp4.formats.constants import (
    E2M1_MAX,
    E4M3_MAX,
    E4M3_MIN_SUBNORMAL,
    MEGA_MOE_TOKEN_AMAX_FLOOR,
    NVFP4_GLOBAL_DIVISOR,
    NVFP4_GROUP,
    PER_TOKEN_AMAX_FLOOR,
)
from dsv4_nvfp4.formats.errors import expect

from ._bits import (
    abs_max,
    div_by_reciprocal,
    div_rn,
    e2m1_encode,
    e2m1_pair_byte,
    e4m3_encode,
    e4m3_to_f32,
    nan_max_reduce,
    pack_sf_words,
    pair_to_f32,
)
from ._config import TileConfig, check_tile, row_fits, staging_tile

SF_WORD_GROUPS = 4  # UE4M3 scales per int32 word
H_MULTIPLE = NVFP4_GROUP * SF_WORD_GROUPS  # 64: one int32 scale word

# The format constants as Triton compile-time values (a kernel reads only constexpr
# globals); formats.constants owns them. Each keeps its literal's value, so the
# compiled code is the literal's. Inside kernels a constexpr goes right of a tensor
# operand (``pts * K_E2M1_MAX``): the CPU interpreter cannot put it on the left.
K_GROUP = tl.constexpr(NVFP4_GROUP)  # 16
K_E2M1_MAX = tl.constexpr(E2M1_MAX)  # 6.0
K_E4M3_MAX = tl.constexpr(E4M3_MAX)  # 448.0
K_E4M3_MIN_SUBNORMAL = tl.constexpr(E4M3_MIN_SUBNORMAL)  # 2**-9
K_GLOBAL_DIVISOR = tl.constexpr(NVFP4_GLOBAL_DIVISOR)  # 2688.0 = 6 * 448
K_PER_TOKEN_AMAX_FLOOR = tl.constexpr(PER_TOKEN_AMAX_FLOOR)  # 1e-4
K_MEGA_MOE_TOKEN_AMAX_FLOOR = tl.constexpr(MEGA_MOE_TOKEN_AMAX_FLOOR)  # 1e-12, vLLM's


@triton.jit
def _group_amax(lo, hi, ROWS: tl.constexpr, G: tl.constexpr, HW: tl.constexpr):
    """Block-16 amax of a [ROWS, 8G] tile of (even, odd) pairs, NaN-propagating like torch."""
    a = tl.reshape(abs_max(lo, hi), [ROWS, G, 8])
    return nan_max_reduce(a, 2, HW)


@triton.jit
def _packed_codes(lo, hi, scale, rcp, ROWS: tl.constexpr, G: tl.constexpr,
                  EXACT: tl.constexpr):
    """Per (even, odd) pair the byte code(lo) | code(hi) << 4 of ``x / scale``.

    EXACT: IEEE division; otherwise from ``rcp = 1 / scale`` (:func:`div_by_reciprocal`,
    the same bits, fewer instructions).
    """
    lo3 = tl.reshape(lo, [ROWS, G, 8])
    hi3 = tl.reshape(hi, [ROWS, G, 8])
    s3 = scale[:, :, None]
    if EXACT:
        lo3 = div_rn(lo3, s3)
        hi3 = div_rn(hi3, s3)
    else:
        r3 = rcp[:, :, None]
        lo3 = div_by_reciprocal(lo3, s3, r3)
        hi3 = div_by_reciprocal(hi3, s3, r3)
    return e2m1_encode(lo3) | (e2m1_encode(hi3) << 4)


@triton.jit
def _stage_per_token_kernel(x_ptr, out_x_ptr, out_sf_ptr, out_pts_ptr, T,
                            stride_xw, stride_ox, stride_osf,
                            H: tl.constexpr, ROWS: tl.constexpr, BLOCK_H: tl.constexpr,
                            IS_BF16: tl.constexpr, HW: tl.constexpr):
    """ROWS whole tokens: pass 1 finds the row amax, pass 2 quantizes (re-reads hit L2)."""
    G: tl.constexpr = BLOCK_H // K_GROUP
    W: tl.constexpr = BLOCK_H // 2
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    rmask1 = rows < T
    rmask = rmask1[:, None]
    rows64 = rows.to(tl.int64)[:, None]
    offs = tl.arange(0, W)[None, :]

    row_amax = tl.zeros([ROWS], tl.float32)  # NaN propagates, like torch.amax
    for w0 in range(0, H // 2, W):
        lo, hi = pair_to_f32(tl.load(x_ptr + rows64 * stride_xw + (w0 + offs), mask=rmask,
                                     other=0), IS_BF16)
        a = nan_max_reduce(abs_max(lo, hi), 1, HW)
        row_amax = tl.maximum(row_amax, a, propagate_nan=tl.PropagateNan.ALL)
    # formats: pts = max(row_amax, 1e-4) / 2688 (clamp keeps NaN, like torch.clamp)
    clamped = tl.maximum(row_amax, K_PER_TOKEN_AMAX_FLOOR, propagate_nan=tl.PropagateNan.ALL)
    pts = div_rn(clamped, tl.full([ROWS], K_GLOBAL_DIVISOR, tl.float32))
    tl.store(out_pts_ptr + rows, pts, mask=rmask1)
    six_pts = (pts * K_E2M1_MAX)[:, None]
    pts2 = pts[:, None]
    # Quotients x / (SF * pts) of a nonzero bf16 can round to zero only when SF * pts >= 2**16,
    # i.e. pts > 146; below that the reciprocal form is exact (see div_by_reciprocal).
    fast = tl.max(pts, axis=0) <= 128.0

    for w0 in range(0, H // 2, W):
        lo, hi = pair_to_f32(tl.load(x_ptr + rows64 * stride_xw + (w0 + offs), mask=rmask,
                                     other=0), IS_BF16)
        # formats: SF = e4m3(block_amax / (6 * pts)); codes = E2M1(x / (fp32(SF) * pts))
        sf_byte = e4m3_encode(div_rn(_group_amax(lo, hi, ROWS, G, HW), six_pts), HW)
        denom = e4m3_to_f32(sf_byte, HW) * pts2
        zero = denom == 0.0
        safe = tl.where(zero, 1.0, denom)
        if fast:
            rcp = div_rn(tl.full([ROWS, G], 1.0, tl.float32), safe)
            packed = _packed_codes(lo, hi, safe, rcp, ROWS, G, False)
        else:
            packed = _packed_codes(lo, hi, safe, safe, ROWS, G, True)
        packed = tl.where(zero[:, :, None], 0, packed)  # SF 0 → codes 0

        tl.store(out_x_ptr + rows64 * stride_ox + (w0 + offs),
                 tl.reshape(packed, [ROWS, W]).to(tl.uint8), mask=rmask)
        scols = w0 // 32 + tl.arange(0, BLOCK_H // 64)[None, :]
        tl.store(out_sf_ptr + rows64 * stride_osf + scols, pack_sf_words(sf_byte, ROWS, G),
                 mask=rmask)


@triton.jit
def _quantize_chunk(w, amax, pts2, six_pts, rcp_six_pts, ROWS: tl.constexpr, G: tl.constexpr,
                    IS_BF16: tl.constexpr, HW: tl.constexpr, EXACT: tl.constexpr):
    """Scale bytes ``[ROWS, G]`` and packed codes ``[ROWS, G, 8]`` of one tile of a row.

    formats: SF = e4m3(block_amax / (6 * pts)); codes = E2M1(x / (fp32(SF) * pts)), SF 0 →
    codes 0. EXACT divides with ``div_rn`` and encodes with :func:`e2m1_encode`. Otherwise
    (every row of the program has pts <= 128) the quotient comes from the reciprocal
    (:func:`div_by_reciprocal`, the same bits) and the codes from :func:`e2m1_pair_byte`:
    a block with SF 0 gets reciprocal 0, so its quotients are ±0 and its codes 0 once the
    sign is masked; a block whose SF or denominator is NaN (a row holding inf or NaN) gets
    NaN quotients, code 7, sign masked too. Everywhere else ``denom > 0`` and the quotient
    of ±0 is +0, so the sign bit is the sign of a nonzero quotient.
    """
    if EXACT:
        sf_byte = e4m3_encode(div_rn(amax, six_pts), HW)
    else:  # amax / (6 pts) from the row's reciprocal (the quotient is <= 448)
        sf_byte = e4m3_encode(div_by_reciprocal(amax, six_pts, rcp_six_pts), HW)
    denom = e4m3_to_f32(sf_byte, HW) * pts2
    zero = denom == 0.0
    safe = tl.where(zero, 1.0, denom)
    lo, hi = pair_to_f32(w, IS_BF16)
    if EXACT:
        packed = _packed_codes(lo, hi, safe, safe, ROWS, G, True)
        packed = tl.where(zero[:, :, None], 0, packed)
    else:
        rcp = tl.where(zero, 0.0, div_rn(tl.full([ROWS, G], 1.0, tl.float32), safe))
        sign_mask = tl.where(denom > 0.0, 8, 0)[:, :, None]
        s3 = safe[:, :, None]
        r3 = rcp[:, :, None]
        qlo = div_by_reciprocal(tl.reshape(lo, [ROWS, G, 8]), s3, r3)
        qhi = div_by_reciprocal(tl.reshape(hi, [ROWS, G, 8]), s3, r3)
        packed = e2m1_pair_byte(qlo, qhi, sign_mask)
    return sf_byte, packed


@triton.jit
def _store_chunk(out_x_ptr, out_sf_ptr, rows64, rmask, stride_ox, stride_osf, c: tl.constexpr,
                 sf_byte, packed, ROWS: tl.constexpr, G: tl.constexpr):
    """Tile ``c`` of a row: W packed bytes and G scale bytes.

    ``out_sf_ptr`` is the int32 scale words viewed as bytes (little-endian: byte i of
    word j is group 4j+i), so each scale byte is stored where it lies, no packing.
    """
    W: tl.constexpr = G * 8
    offs = c * W + tl.arange(0, W)[None, :]
    tl.store(out_x_ptr + rows64 * stride_ox + offs, tl.reshape(packed, [ROWS, W]).to(tl.uint8),
             mask=rmask)
    gcols = c * G + tl.arange(0, G)[None, :]
    tl.store(out_sf_ptr + rows64 * stride_osf + gcols, sf_byte.to(tl.uint8), mask=rmask)


@triton.jit
def _stage_per_token_row_kernel(x_ptr, out_x_ptr, out_sf_ptr, out_pts_ptr, T,
                                stride_xw, stride_ox, stride_osf,
                                CHUNKS: tl.constexpr, ROWS: tl.constexpr, BLOCK_H: tl.constexpr,
                                IS_BF16: tl.constexpr, HW: tl.constexpr):
    """ROWS whole tokens held in registers: one global read, row amax, then quantize.

    A row of ``H = CHUNKS * BLOCK_H`` values is loaded as a tuple of CHUNKS register
    tiles (Triton tiles are powers of two; 7168 = 7 * 1024 would waste 1/8 if padded),
    all loads issued before any arithmetic so that the whole row is in flight at once.
    The block amaxes are kept too, so the quantize pass touches no memory but the stores;
    the row amax is one reduction over their elementwise maximum. ``out_sf_ptr`` is the
    scale words viewed as bytes (``stride_osf`` in bytes).
    """
    G: tl.constexpr = BLOCK_H // K_GROUP
    W: tl.constexpr = BLOCK_H // 2
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    rmask1 = rows < T
    rmask = rmask1[:, None]
    rows64 = rows.to(tl.int64)[:, None]
    src = x_ptr + rows64 * stride_xw + tl.arange(0, W)[None, :]

    # Tuples grow by concatenation: Triton's frontend has no starred unpacking.
    words = ()
    for c in tl.static_range(CHUNKS):
        words = words + (tl.load(src + c * W, mask=rmask, other=0),)  # noqa: RUF005
    amaxes = ()
    acc = tl.zeros([ROWS, G], tl.float32)  # NaN propagates, like torch.amax
    for c in tl.static_range(CHUNKS):
        lo, hi = pair_to_f32(words[c], IS_BF16)
        a = _group_amax(lo, hi, ROWS, G, HW)
        amaxes = amaxes + (a,)  # noqa: RUF005
        acc = tl.maximum(acc, a, propagate_nan=tl.PropagateNan.ALL)
    row_amax = nan_max_reduce(acc, 1, HW)
    # formats: pts = max(row_amax, 1e-4) / 2688 (clamp keeps NaN, like torch.clamp)
    clamped = tl.maximum(row_amax, K_PER_TOKEN_AMAX_FLOOR, propagate_nan=tl.PropagateNan.ALL)
    pts = div_rn(clamped, tl.full([ROWS], K_GLOBAL_DIVISOR, tl.float32))
    tl.store(out_pts_ptr + rows, pts, mask=rmask1)
    six_pts = (pts * K_E2M1_MAX)[:, None]
    pts2 = pts[:, None]
    # Quotients x / (SF * pts) of a nonzero bf16 can round to zero only when SF * pts >= 2**16,
    # i.e. pts > 146; below that the reciprocal form is exact (see div_by_reciprocal). The
    # exact branch also takes rows with inf or NaN (pts inf/NaN: max(NaN) <= 128 is false).
    if tl.max(pts, axis=0) <= 128.0:
        rcp_six_pts = div_rn(tl.full([ROWS, 1], 1.0, tl.float32), six_pts)
        for c in tl.static_range(CHUNKS):
            sf_byte, packed = _quantize_chunk(words[c], amaxes[c], pts2, six_pts, rcp_six_pts,
                                              ROWS, G, IS_BF16, HW, False)
            _store_chunk(out_x_ptr, out_sf_ptr, rows64, rmask, stride_ox, stride_osf, c,
                         sf_byte, packed, ROWS, G)
    else:
        for c in tl.static_range(CHUNKS):
            sf_byte, packed = _quantize_chunk(words[c], amaxes[c], pts2, six_pts, six_pts,
                                              ROWS, G, IS_BF16, HW, True)
            _store_chunk(out_x_ptr, out_sf_ptr, rows64, rmask, stride_ox, stride_osf, c,
                         sf_byte, packed, ROWS, G)


@dataclass(frozen=True)
class _Staged:
    x: torch.Tensor  # input as launched: int32 words, two 16-bit values each
    is_bf16: bool
    out_x: torch.Tensor  # uint8 view
    out_x_sf: torch.Tensor
    tokens: int
    hidden: int


def _check_rows(name: str, t: torch.Tensor, shape: tuple[int, int], dtypes: tuple[torch.dtype, ...],
                device: torch.device) -> None:
    expect(isinstance(t, torch.Tensor), name, "a torch.Tensor", type(t).__name__)
    expect(t.dtype in dtypes, name, f"dtype {' or '.join(str(d) for d in dtypes)}", t.dtype)
    expect(tuple(t.shape) == shape, name, f"shape {shape}", tuple(t.shape))
    expect(t.device == device, name, f"device {device} (same as x)", t.device)
    expect(t.dim() < 2 or t.shape[-1] <= 1 or t.stride(-1) == 1, name,
           "unit stride along the last dimension", t.stride())


def _check_staging(x: torch.Tensor, out_x: torch.Tensor, out_x_sf: torch.Tensor) -> _Staged:
    expect(isinstance(x, torch.Tensor), "x", "a torch.Tensor", type(x).__name__)
    expect(x.dim() == 2, "x", "a 2-D tensor [T, H]", tuple(x.shape))
    expect(x.dtype in (torch.bfloat16, torch.float16), "x", "dtype torch.bfloat16 or torch.float16",
           x.dtype)
    tokens, hidden = x.shape
    expect(hidden > 0 and hidden % H_MULTIPLE == 0, "x",
           f"hidden size H a positive multiple of {H_MULTIPLE} (one int32 of four block-16 scales)",
           f"shape {tuple(x.shape)}")
    expect(x.shape[1] <= 1 or x.stride(1) == 1, "x", "unit stride along H", x.stride())
    _check_rows("out_x", out_x, (tokens, hidden // 2), (torch.uint8, torch.int8), x.device)
    _check_rows("out_x_sf", out_x_sf, (tokens, hidden // H_MULTIPLE), (torch.int32,), x.device)
    if out_x_sf.stride(1) != 1:  # one word per row (H = 64) with any stride: same memory
        out_x_sf = out_x_sf.as_strided(out_x_sf.shape, (out_x_sf.stride(0), 1))
    if (tokens > 1 and x.stride(0) % 2) or x.data_ptr() % 4:
        x = x.contiguous()  # a view at an odd element offset: copy so pairs form int32 words
    return _Staged(x.view(torch.int32), x.dtype == torch.bfloat16, out_x.view(torch.uint8),
                   out_x_sf, tokens, hidden)


def _launch_per_token(s: _Staged, out_x_scales: torch.Tensor, cfg: TileConfig) -> None:
    grid = (triton.cdiv(s.tokens, cfg.rows),)
    if row_fits(cfg, s.hidden, s.x.device):
        sf_bytes = s.out_x_sf.view(torch.uint8)  # [T, H/16]; row stride 4 * words
        _stage_per_token_row_kernel[grid](
            s.x, s.out_x, sf_bytes, out_x_scales, s.tokens,
            s.x.stride(0), s.out_x.stride(0), sf_bytes.stride(0),
            CHUNKS=s.hidden // cfg.block, ROWS=cfg.rows, BLOCK_H=cfg.block, IS_BF16=s.is_bf16,
            HW=s.x.is_cuda, num_warps=cfg.num_warps)
        return
    _stage_per_token_kernel[grid](
        s.x, s.out_x, s.out_x_sf, out_x_scales, s.tokens,
        s.x.stride(0), s.out_x.stride(0), s.out_x_sf.stride(0),
        H=s.hidden, ROWS=cfg.rows, BLOCK_H=cfg.block, IS_BF16=s.is_bf16, HW=s.x.is_cuda,
        num_warps=cfg.num_warps)


def stage_nvfp4_activations_per_token(x: torch.Tensor, out_x: torch.Tensor,
                                      out_x_sf: torch.Tensor, out_x_scales: torch.Tensor,
                                      *, config: TileConfig | None = None) -> None:
    """Quantize ``x [T, H]`` with the two-level per-token convention into caller buffers.

    Args:
        x: bf16 or fp16 ``[T, H]``, ``H % 64 == 0``, unit stride along H.
        out_x: uint8 (or int8) ``[T, H/2]``: packed E2M1, element 2i in the low nibble.
        out_x_sf: int32 ``[T, H/64]``: UE4M3 block scales, byte i of word j = group 4j+i.
        out_x_scales: fp32 ``[T]``: the per-token scale ``pts``.
        config: tile shape override (benchmarks and tests only; results do not depend on it).

    Numbers (``formats.quantize_nvfp4_activation_per_token``)::

        pts   = max(row_amax, 1e-4) / 2688
        SF    = e4m3(block_amax / (6 * pts))         (<= 448 by construction)
        codes = E2M1(x / (fp32(SF) * pts))           SF 0 → codes 0
        x    ≈ e2m1 * fp32(SF) * pts
    """
    s = _check_staging(x, out_x, out_x_sf)
    expect(isinstance(out_x_scales, torch.Tensor), "out_x_scales", "a torch.Tensor",
           type(out_x_scales).__name__)
    expect(out_x_scales.dtype == torch.float32, "out_x_scales", "dtype torch.float32",
           out_x_scales.dtype)
    expect(tuple(out_x_scales.shape) == (s.tokens,), "out_x_scales", f"shape {(s.tokens,)}",
           tuple(out_x_scales.shape))
    expect(out_x_scales.device == x.device, "out_x_scales", f"device {x.device} (same as x)",
           out_x_scales.device)
    expect(s.tokens <= 1 or out_x_scales.stride(0) == 1, "out_x_scales", "unit stride",
           out_x_scales.stride())
    if s.tokens == 0:
        return
    cfg = check_tile(config, s.hidden, H_MULTIPLE) if config else staging_tile(
        s.hidden, device=x.device)
    _launch_per_token(s, out_x_scales, cfg)

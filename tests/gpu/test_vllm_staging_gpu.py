"""vLLM 0.34.0's NVFP4 MegaMoE staging on the GPU against ``formats``: every byte accounted for.

vLLM stages the NVFP4 MegaMoE input itself (``_prepare_megamoe_nvfp4_inputs_kernel``,
loaded from the pinned wheel's file by ``vllm_staging``). Its numbers, read from
its source and restated in torch by :func:`vllm_numbers`, per token of ``x [T, H]``::

    xs    = max(row_amax, 1e-12) * fp32(1/2688)                        (x_scales, fp32)
    v     = x / xs                                                     (IEEE division)
    SF    = e4m3(clamp(max|v|_16 * fp32(1/6), 2**-9, 448))
    codes = RNE_e2m1(v / fp32(SF)), sign only on a nonzero magnitude

``formats.quantize_nvfp4_activation_per_token`` (ModelOpt's operation order)::

    pts   = max(row_amax, 1e-4) / 2688
    SF    = e4m3(block_amax / (6 * pts))
    codes = RNE_e2m1(x / (fp32(SF) * pts)), SF 0 → codes 0, sign of every negative x

First the kernel must equal :func:`vllm_numbers` bit for bit (codes, scale words
— four E4M3 bytes per int32, byte i of word j = group 4j+i — x_scales and the
top-k copies). Then every difference from ``formats`` must fall into one
category, each recomputed per element, and each count must equal the pinned
number in ``EXPECTED`` (established on an H200; the arithmetic is IEEE fp32
throughout, so the counts are those of any GPU and of the CPU):

* x_scales — ``floor``: rows with amax < 1e-4 (formats floors at 1e-4, vLLM at
  1e-12); ``rcp``: the other rows where ``amax * fp32(1/2688)`` and ``amax / 2688``
  round apart (one ulp).
* scale bytes, in the other rows — ``zero_block``: all-zero blocks, 0x01 (vLLM's
  2**-9 floor) vs 0x00; ``clamp``: nonzero blocks whose vLLM value lies at or
  below 2**-10, so vLLM clamps to 0x01 where formats rounds to 0x00; ``flip``:
  adjacent bytes whose two fp32 pre-cast values lie on either side of the E4M3
  rounding midpoint between them, the exact value within 2**-20 of it.
* codes, in blocks whose scale bytes agree — ``neg_zero``: a negative value that
  rounds to zero, 8 (-0, formats and ModelOpt) vs 0 (vLLM); ``flip``: adjacent
  magnitudes whose two fp32 quotients lie on either side of the E2M1 decision
  threshold between them, the exact quotient within 2**-20 of it; and codes in
  blocks whose scale bytes differ (``in_clamp_blocks``, ``in_flip_blocks``; none
  in zero blocks) or in floor rows (``floor_rows``), which follow from those.

Run: ``python scripts/fetch_vllm_source.py`` (once), then on the GPU machine, with the
checkout's ``.cache/``: ``PYTHONPATH=src python3 -m pytest tests/gpu/test_vllm_staging_gpu.py``;
``DSV4_GPU_REPORT=f.json`` keeps the counts.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from dsv4_nvfp4.formats import (
    decode_ue4m3,
    e2m1_encode,
    pack_sf_bytes_to_int32,
    quantize_nvfp4_activation_per_token,
    unpack_e2m1,
    unpack_sf_int32_to_bytes,
)

pytestmark = pytest.mark.h100
DEV = "cuda"
HIDDEN = 7168  # DeepSeek V4 Pro hidden size
TOP_K = 6
NUM_EXPERTS = 384
TOKENS = [1, 7, 64, 512, 4096, 16384]
CHUNK_ROWS = 2048  # classification works on row chunks (memory)
E2M1_BOUNDS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)  # between magnitudes m and m+1
NEAR = 2.0**-20  # "at the threshold": relative distance of the exact value


# --- inputs: bf16 bit patterns from an integer hash (the same bits on any device) -------------
M32 = 0xFFFFFFFF
ROW_KINDS = ("normal", "zeros", "subnormals", "huge", "tiny<1e-4", "tiny<1e-12", "all-zero",
             "wide-range", "only-subnormals", "tie-amax", "outlier", "small")


def _hash32(v: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mix on int64 (products stay below 2**59: no overflow anywhere)."""
    v = v & M32
    v = v ^ (v >> 16)
    v = (v * 0x45D9F3B) & M32
    v = v ^ (v >> 16)
    v = (v * 0x45D9F3B) & M32
    return v ^ (v >> 16)


def _bf16(sign: torch.Tensor, exp: torch.Tensor, mant: torch.Tensor) -> torch.Tensor:
    bits = (sign << 15) | (exp.clamp(0, 254) << 7) | mant
    bits = bits - ((bits >> 15) << 16)  # as a signed 16-bit value, so the cast is exact
    return bits.to(torch.int16).view(torch.bfloat16)


def make_hidden(t: int, h: int = HIDDEN, seed: int = 0, device: str = DEV) -> torch.Tensor:
    """bf16 ``[t, h]``; row r is of kind ``ROW_KINDS[r % 12]``.

    normal: random sign and mantissa, exponents over 13 binades below 2**(E_r + 3) (E_r a
    per-row offset in [-4, 4]), three quarters of them within the top 5; zeros: a fifth
    of the elements and a quarter of the blocks ±0; subnormals: a quarter of the
    elements and a fifth of the blocks bf16 subnormals; huge: amax the bf16 maximum
    (3.39e38) over values near 2**116; tiny<1e-4 / tiny<1e-12: amax about 2**-20 / 2**-47
    (below formats' / both floors); all-zero: ±0; wide-range: one block 2**24 above the
    rest; only-subnormals; tie-amax: amax 1.3125 * 2**k (formats' token scale is then a
    power of two); outlier: values near 2**12 and one 2**20; small: values near 2**-6.
    """
    r = torch.arange(t, dtype=torch.int64, device=device)[:, None]
    c = torch.arange(h, dtype=torch.int64, device=device)[None, :]
    h1 = _hash32((r * h + c) * 2 + seed * 0x1000193 + 1)
    h2 = _hash32(h1 ^ 0x5BD1E995)
    hr = _hash32(r * 0x2545F49 + seed + 7)  # per row
    hb = _hash32(r * 0x9E3779 + (c // 16) * 0x85EBCA6B + seed)  # per 16-block
    kind = r % len(ROW_KINDS)
    sign = h1 & 1
    mant = (h1 >> 1) & 0x7F
    u = (h1 >> 8) & 0xFF
    spread = torch.where(u < 192, (u % 5) - 4, (u % 13) - 9)
    base = 127 + (hr % 9) - 4
    base = torch.where(kind == 3, torch.full_like(base, 243), base)
    base = torch.where(kind == 4, torch.full_like(base, 127 - 24), base)
    base = torch.where(kind == 5, torch.full_like(base, 127 - 51), base)
    base = torch.where(kind == 10, torch.full_like(base, 127 + 12), base)
    base = torch.where(kind == 11, torch.full_like(base, 127 - 9), base)
    exp = base + spread
    exp = torch.where((kind == 7) & (c // 16 == (hr % (h // 16))), exp + 24, exp)
    x = _bf16(sign, exp, mant)
    w = (h2 >> 4) & 0xFFFF
    zero = (kind == 1) & ((w % 5 == 0) | (hb % 4 == 0))
    zero = zero | (kind == 6)
    x = torch.where(zero, _bf16(sign, torch.zeros_like(exp), torch.zeros_like(mant)), x)
    sub = ((kind == 2) & ((w % 4 == 0) | (hb % 5 == 0))) | (kind == 8)
    x = torch.where(sub, _bf16(sign, torch.zeros_like(exp), mant | 1), x)
    col = (r * 37 + (hr % 97)) % h  # one special element per row
    at = c == col
    x = torch.where((kind == 3) & at, _bf16(sign, torch.full_like(exp, 254), torch.full_like(
        mant, 0x7F)), x)
    x = torch.where((kind == 9) & at, _bf16(sign, base + 4, torch.full_like(mant, 0x28)), x)
    x = torch.where((kind == 10) & at, _bf16(sign, torch.full_like(exp, 127 + 20), mant), x)
    return x.contiguous()


def make_routing(t: int, device: str = DEV) -> tuple[torch.Tensor, torch.Tensor]:
    i = torch.arange(t * TOP_K, dtype=torch.int64, device=device).reshape(t, TOP_K)
    hsh = _hash32(i * 0x27D4EB2D + 11)
    ids = (hsh % NUM_EXPERTS).to(torch.int32)
    weights = (hsh >> 8).to(torch.float32) * 2.0**-24
    return ids, weights


# --- vLLM's arithmetic restated in torch (fp32, IEEE division) --------------------------------
def _f32(v: float, device: torch.device) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.float32, device=device)


def vllm_numbers(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """What ``_prepare_megamoe_nvfp4_inputs_kernel`` computes, as torch fp32 operations.

    Returns codes uint8 ``[T, H]``, SF bytes uint8 ``[T, H/16]`` and ``xs`` fp32 ``[T]``.
    """
    dev = x.device
    t, h = x.shape
    xf = x.float()
    amax = xf.abs().amax(dim=1)
    xs = torch.maximum(amax, _f32(1e-12, dev)) * _f32(1.0 / 2688.0, dev)
    v = (xf / xs[:, None]).reshape(t, h // 16, 16)
    pre = v.abs().amax(dim=-1) * _f32(1.0 / 6.0, dev)
    sf = pre.clamp(min=2.0**-9, max=448.0).to(torch.float8_e4m3fn)
    q = v / sf.float()[..., None]
    codes = e2m1_encode(q.reshape(t, h))
    codes = torch.where((codes & 7) == 0, torch.zeros_like(codes), codes)
    return {"codes": codes, "sf": sf.view(torch.uint8), "xs": xs}


def formats_numbers(x: torch.Tensor) -> dict[str, torch.Tensor]:
    packed, sf, pts = quantize_nvfp4_activation_per_token(x)
    return {"codes": unpack_e2m1(packed), "sf": sf.view(torch.uint8), "xs": pts}


# --- classification ---------------------------------------------------------------------------
def _near(a: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return (a - t).abs() <= NEAR * t


def _exact_sides(n: dict[str, int], what: str, same_xs: torch.Tensor, formats_ok: torch.Tensor,
                 vllm_ok: torch.Tensor) -> None:
    """Count the flips where each side's result is the rounding of the exact value."""
    for rows, tag in ((same_xs, "same_xs"), (~same_xs, "rcp_rows")):
        n[f"{what}_{tag}_formats_exact"] = int((formats_ok & rows).sum())
        n[f"{what}_{tag}_vllm_exact"] = int((vllm_ok & rows).sum())


def classify(x: torch.Tensor, got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]
             ) -> dict[str, int]:
    """Every difference between vLLM's output ``got`` and ``formats`` ``ref`` for the rows of
    ``x``, by category; raises AssertionError at the first unexplained one."""
    dev = x.device
    t, h = x.shape
    g = h // 16
    xf = x.float()
    amax = xf.abs().amax(dim=1)
    xs_v, xs_f = got["xs"], ref["xs"]
    n: dict[str, int] = {}

    # x_scales
    floor = amax < _f32(1e-4, dev)
    rcp_apart = (amax * _f32(1.0 / 2688.0, dev)) != (amax / _f32(2688.0, dev))
    xs_diff = xs_v.view(torch.int32) != xs_f.view(torch.int32)
    assert torch.equal(xs_diff & ~floor, rcp_apart & ~floor), "x_scales differ outside the cases"
    ulp = (xs_v.view(torch.int32).long() - xs_f.view(torch.int32).long()).abs()
    assert bool((ulp[xs_diff & ~floor] == 1).all()), "a token scale differs by more than 1 ulp"
    n["xs_floor"] = int((xs_diff & floor).sum())
    n["xs_rcp"] = int((xs_diff & ~floor).sum())
    n["floor_rows"] = int(floor.sum())

    # scale bytes (rows above the floor): recompute both pre-cast values
    keep = ~floor
    blocks = xf.reshape(t, g, 16)
    bamax = blocks.abs().amax(dim=-1)
    pre_v = (bamax / xs_v[:, None]) * _f32(1.0 / 6.0, dev)
    pre_f = bamax / (6.0 * xs_f[:, None])
    enc_v = pre_v.clamp(min=2.0**-9, max=448.0).to(torch.float8_e4m3fn).view(torch.uint8)
    enc_f = pre_f.clamp(max=448.0).to(torch.float8_e4m3fn).view(torch.uint8)
    rows = keep[:, None].expand(t, g)
    assert torch.equal(enc_v[rows], got["sf"][rows]), "vLLM's SF bytes not reproduced"
    assert torch.equal(enc_f[rows], ref["sf"][rows]), "formats' SF bytes not reproduced"
    sf_diff = got["sf"] != ref["sf"]
    zero_block = bamax == 0
    clamp = (bamax > 0) & (pre_v <= 2.0**-10)
    assert bool((got["sf"][zero_block & rows] == 1).all()), "zero block: vLLM SF byte not 0x01"
    assert bool((ref["sf"][zero_block & rows] == 0).all()), "zero block: formats SF byte not 0"
    assert bool((got["sf"][clamp & rows] == 1).all()), "clamped block: vLLM SF byte not 0x01"
    flip = sf_diff & rows & ~zero_block & ~clamp
    bv, bf = got["sf"][flip].long(), ref["sf"][flip].long()
    assert bool(((bv - bf).abs() == 1).all()), "a scale byte differs by more than one step"
    mid = (decode_ue4m3(got["sf"][flip]).double() + decode_ue4m3(ref["sf"][flip]).double()) / 2
    pv, pf = pre_v[flip].double(), pre_f[flip].double()
    assert bool(((torch.minimum(pv, pf) <= mid) & (mid <= torch.maximum(pv, pf))).all()), \
        "SF flip: the two values do not straddle the E4M3 midpoint"
    ba = bamax[flip].double()
    rv = xs_v[:, None].expand(t, g)[flip].double()
    rf = xs_f[:, None].expand(t, g)[flip].double()
    assert bool((_near(ba / (6 * rv), mid) & _near(ba / (6 * rf), mid)).all()), \
        "SF flip away from an E4M3 midpoint"
    same_xs_rows = (~xs_diff)[:, None].expand(t, g)
    n["sf_zero_block"] = int((sf_diff & rows & zero_block).sum())
    n["sf_clamp"] = int((sf_diff & rows & clamp).sum())
    n["sf_flip_same_xs"] = int((flip & same_xs_rows).sum())
    n["sf_flip_rcp_rows"] = int((flip & ~same_xs_rows).sum())
    # which byte the exact value (with each side's own token scale) rounds to
    ef, ev = ba / (6 * rf), ba / (6 * rv)
    n["sf_flip_exact_ties"] = int(((ef == mid) | (ev == mid)).sum())
    _exact_sides(n, "sf_flip", same_xs_rows[flip], (bf > bv) == (ef > mid), (bv > bf) == (ev > mid))
    n["sf_floor_rows"] = int((sf_diff & ~rows).sum())
    assert n["sf_zero_block"] + n["sf_clamp"] + int(flip.sum()) + n["sf_floor_rows"] == int(
        sf_diff.sum())

    # codes
    cv, cf = got["codes"], ref["codes"]
    code_diff = cv != cf
    erows = keep[:, None].expand(t, h)
    blk_diff = sf_diff.repeat_interleave(16, dim=1)
    same = code_diff & erows & ~blk_diff
    neg_zero = same & (cf == 8) & (cv == 0)
    assert bool((xf[neg_zero] < 0).all())
    other = same & ~neg_zero
    sf_e = decode_ue4m3(got["sf"]).repeat_interleave(16, dim=1)[other]  # == formats' there
    xo = xf[other]
    xs_vo = xs_v[:, None].expand(t, h)[other]
    xs_fo = xs_f[:, None].expand(t, h)[other]
    q1 = (xo / xs_vo) / sf_e  # vLLM
    q2 = xo / (sf_e * xs_fo)  # formats
    m1, m2 = (cv[other] & 7).long(), (cf[other] & 7).long()
    assert torch.equal(e2m1_encode(q1) & 7, m1.to(torch.uint8)), "vLLM's codes not reproduced"
    assert torch.equal(e2m1_encode(q2) & 7, m2.to(torch.uint8)), "formats' codes not reproduced"
    assert bool(((m1 - m2).abs() == 1).all()), "a code differs by more than one step"
    neg = xo < 0
    assert bool((((cv[other] >> 3) == 1) == (neg & (m1 > 0))).all()), "vLLM sign"
    assert bool((((cf[other] >> 3) == 1) == neg).all()), "formats sign"
    bounds = torch.tensor(E2M1_BOUNDS, dtype=torch.float64, device=dev)
    thr = bounds[torch.minimum(m1, m2)]
    a1, a2 = q1.abs().double(), q2.abs().double()
    assert bool(((torch.minimum(a1, a2) <= thr) & (thr <= torch.maximum(a1, a2))).all()), \
        "code flip: the two quotients do not straddle the E2M1 threshold"
    s64 = sf_e.double()
    e1 = (xo.double() / (s64 * xs_vo.double())).abs()
    e2 = (xo.double() / (s64 * xs_fo.double())).abs()
    assert bool((_near(e1, thr) & _near(e2, thr)).all()), "code flip away from a threshold"
    same_xs_e = (~xs_diff)[:, None].expand(t, h)[other]
    n["codes_neg_zero"] = int(neg_zero.sum())
    n["codes_flip_same_xs"] = int(same_xs_e.sum())
    n["codes_flip_rcp_rows"] = int((~same_xs_e).sum())
    n["codes_flip_exact_ties"] = int(((e1 == thr) | (e2 == thr)).sum())
    _exact_sides(n, "codes_flip", same_xs_e, (m2 > m1) == (e2 > thr), (m1 > m2) == (e1 > thr))
    in_blk = code_diff & erows & blk_diff
    assert not bool((in_blk & (bamax == 0).repeat_interleave(16, dim=1)).any()), "zero block"
    n["codes_in_clamp_blocks"] = int((in_blk & clamp.repeat_interleave(16, dim=1)).sum())
    n["codes_in_flip_blocks"] = int((in_blk & ~clamp.repeat_interleave(16, dim=1)).sum())
    n["codes_floor_rows"] = int((code_diff & ~erows).sum())
    n["codes_total"] = int(code_diff.sum())
    n["sf_total"] = int(sf_diff.sum())
    n["xs_total"] = int(xs_diff.sum())
    return n


def compare(t: int, stage, device: str = DEV) -> dict[str, int]:
    """Counts over ``t`` tokens, in row chunks; ``stage(x, ids, w)`` is vLLM's kernel
    (``vllm_staging.run``) returning (x, x_sf, x_scales, topk_idx, topk_weights)."""
    x = make_hidden(t, device=device)
    ids, weights = make_routing(t, device=device)
    px, sfw, xs, idx, w = stage(x, ids, weights)
    assert torch.equal(idx, ids.long()) and torch.equal(w, weights), "top-k copies"
    total: dict[str, int] = {}
    for r0 in range(0, t, CHUNK_ROWS):
        sl = slice(r0, min(t, r0 + CHUNK_ROWS))
        xc = x[sl]
        emu = vllm_numbers(xc)
        got = {"codes": unpack_e2m1(px[sl]), "sf": unpack_sf_int32_to_bytes(sfw[sl]),
               "xs": xs[sl]}
        for k in ("codes", "sf"):
            bad = got[k] != emu[k]
            assert not bool(bad.any()), (
                f"T={t}: vLLM kernel {k} differ from its stated arithmetic at "
                f"{int(bad.sum())} places, first {bad.nonzero()[0].tolist()} (+{r0} rows)")
        assert torch.equal(xs[sl].view(torch.int32), emu["xs"].view(torch.int32)), "x_scales"
        # the scale words: four E4M3 bytes per little-endian int32, byte i = group 4j+i
        assert torch.equal(sfw[sl], pack_sf_bytes_to_int32(emu["sf"]))
        for k, v in classify(xc, got, formats_numbers(xc)).items():
            total[k] = total.get(k, 0) + v
    total["n_rows"], total["n_sf"], total["n_codes"] = t, t * HIDDEN // 16, t * HIDDEN
    return total


# The counts at H = 7168 (make_hidden seed 0): the same on an H200 and on the CPU (the vLLM
# kernel replaced by vllm_numbers), since every step is IEEE fp32 (docs/kernels.md).
EXPECTED: dict[int, dict[str, int]] = {
    1: {"xs_floor": 0, "xs_rcp": 1, "floor_rows": 0, "sf_zero_block": 0, "sf_clamp": 0,
        "sf_flip_same_xs": 0, "sf_flip_rcp_rows": 0, "sf_flip_exact_ties": 0,
        "sf_flip_same_xs_formats_exact": 0, "sf_flip_same_xs_vllm_exact": 0,
        "sf_flip_rcp_rows_formats_exact": 0, "sf_flip_rcp_rows_vllm_exact": 0, "sf_floor_rows": 0,
        "codes_neg_zero": 1157, "codes_flip_same_xs": 0, "codes_flip_rcp_rows": 4,
        "codes_flip_exact_ties": 0, "codes_flip_same_xs_formats_exact": 0,
        "codes_flip_same_xs_vllm_exact": 0, "codes_flip_rcp_rows_formats_exact": 4,
        "codes_flip_rcp_rows_vllm_exact": 4, "codes_in_clamp_blocks": 0, "codes_in_flip_blocks": 0,
        "codes_floor_rows": 0, "codes_total": 1161, "sf_total": 0, "xs_total": 1, "n_rows": 1,
        "n_sf": 448, "n_codes": 7168},
    7: {"xs_floor": 3, "xs_rcp": 2, "floor_rows": 3, "sf_zero_block": 112, "sf_clamp": 93,
        "sf_flip_same_xs": 0, "sf_flip_rcp_rows": 0, "sf_flip_exact_ties": 0,
        "sf_flip_same_xs_formats_exact": 0, "sf_flip_same_xs_vllm_exact": 0,
        "sf_flip_rcp_rows_formats_exact": 0, "sf_flip_rcp_rows_vllm_exact": 0,
        "sf_floor_rows": 1344, "codes_neg_zero": 4319, "codes_flip_same_xs": 1,
        "codes_flip_rcp_rows": 7, "codes_flip_exact_ties": 0,
        "codes_flip_same_xs_formats_exact": 1, "codes_flip_same_xs_vllm_exact": 0,
        "codes_flip_rcp_rows_formats_exact": 7, "codes_flip_rcp_rows_vllm_exact": 7,
        "codes_in_clamp_blocks": 0, "codes_in_flip_blocks": 0, "codes_floor_rows": 6290,
        "codes_total": 10617, "sf_total": 1549, "xs_total": 5, "n_rows": 7, "n_sf": 3136,
        "n_codes": 50176},
    64: {"xs_floor": 20, "xs_rcp": 6, "floor_rows": 20, "sf_zero_block": 687, "sf_clamp": 2784,
        "sf_flip_same_xs": 0, "sf_flip_rcp_rows": 0, "sf_flip_exact_ties": 0,
        "sf_flip_same_xs_formats_exact": 0, "sf_flip_same_xs_vllm_exact": 0,
        "sf_flip_rcp_rows_formats_exact": 0, "sf_flip_rcp_rows_vllm_exact": 0,
        "sf_floor_rows": 8960, "codes_neg_zero": 43009, "codes_flip_same_xs": 32,
        "codes_flip_rcp_rows": 21, "codes_flip_exact_ties": 0,
        "codes_flip_same_xs_formats_exact": 32, "codes_flip_same_xs_vllm_exact": 0,
        "codes_flip_rcp_rows_formats_exact": 21, "codes_flip_rcp_rows_vllm_exact": 21,
        "codes_in_clamp_blocks": 407, "codes_in_flip_blocks": 0, "codes_floor_rows": 31795,
        "codes_total": 75264, "sf_total": 12431, "xs_total": 26, "n_rows": 64, "n_sf": 28672,
        "n_codes": 458752},
    512: {"xs_floor": 171, "xs_rcp": 60, "floor_rows": 171, "sf_zero_block": 4753,
        "sf_clamp": 23090, "sf_flip_same_xs": 0, "sf_flip_rcp_rows": 19, "sf_flip_exact_ties": 0,
        "sf_flip_same_xs_formats_exact": 0, "sf_flip_same_xs_vllm_exact": 0,
        "sf_flip_rcp_rows_formats_exact": 19, "sf_flip_rcp_rows_vllm_exact": 19,
        "sf_floor_rows": 76608, "codes_neg_zero": 330159, "codes_flip_same_xs": 313,
        "codes_flip_rcp_rows": 165, "codes_flip_exact_ties": 0,
        "codes_flip_same_xs_formats_exact": 312, "codes_flip_same_xs_vllm_exact": 1,
        "codes_flip_rcp_rows_formats_exact": 165, "codes_flip_rcp_rows_vllm_exact": 165,
        "codes_in_clamp_blocks": 3860, "codes_in_flip_blocks": 88, "codes_floor_rows": 271445,
        "codes_total": 606030, "sf_total": 104470, "xs_total": 231, "n_rows": 512, "n_sf": 229376,
        "n_codes": 3670016},
    4096: {"xs_floor": 1364, "xs_rcp": 491, "floor_rows": 1364, "sf_zero_block": 38200,
        "sf_clamp": 183247, "sf_flip_same_xs": 34, "sf_flip_rcp_rows": 79, "sf_flip_exact_ties": 0,
        "sf_flip_same_xs_formats_exact": 29, "sf_flip_same_xs_vllm_exact": 5,
        "sf_flip_rcp_rows_formats_exact": 79, "sf_flip_rcp_rows_vllm_exact": 79,
        "sf_floor_rows": 611072, "codes_neg_zero": 2651788, "codes_flip_same_xs": 2554,
        "codes_flip_rcp_rows": 1345, "codes_flip_exact_ties": 0,
        "codes_flip_same_xs_formats_exact": 2527, "codes_flip_same_xs_vllm_exact": 27,
        "codes_flip_rcp_rows_formats_exact": 1345, "codes_flip_rcp_rows_vllm_exact": 1345,
        "codes_in_clamp_blocks": 38152, "codes_in_flip_blocks": 453, "codes_floor_rows": 2147312,
        "codes_total": 4841604, "sf_total": 832632, "xs_total": 1855, "n_rows": 4096,
        "n_sf": 1835008, "n_codes": 29360128},
    16384: {"xs_floor": 5460, "xs_rcp": 1898, "floor_rows": 5460, "sf_zero_block": 153312,
        "sf_clamp": 732953, "sf_flip_same_xs": 116, "sf_flip_rcp_rows": 359,
        "sf_flip_exact_ties": 0, "sf_flip_same_xs_formats_exact": 97,
        "sf_flip_same_xs_vllm_exact": 19, "sf_flip_rcp_rows_formats_exact": 359,
        "sf_flip_rcp_rows_vllm_exact": 359, "sf_floor_rows": 2446080, "codes_neg_zero": 10596446,
        "codes_flip_same_xs": 10110, "codes_flip_rcp_rows": 5305, "codes_flip_exact_ties": 0,
        "codes_flip_same_xs_formats_exact": 10005, "codes_flip_same_xs_vllm_exact": 105,
        "codes_flip_rcp_rows_formats_exact": 5305, "codes_flip_rcp_rows_vllm_exact": 5305,
        "codes_in_clamp_blocks": 153558, "codes_in_flip_blocks": 1996, "codes_floor_rows": 8588700,
        "codes_total": 19356115, "sf_total": 3332820, "xs_total": 7358, "n_rows": 16384,
        "n_sf": 7340032, "n_codes": 117440512},
}


@pytest.mark.parametrize("t", TOKENS)
def test_vllm_staging_vs_formats(t: int, vllm, report: dict[str, Any]) -> None:
    counts = compare(t, vllm.run)
    report[f"vllm {vllm.VLLM_VERSION} staging vs formats T={t} H={HIDDEN}"] = counts
    assert counts == EXPECTED[t]


def test_scale_word_layout(vllm) -> None:
    """One row by hand: word j of x_sf holds SF bytes 4j..4j+3, lowest byte first."""
    x = make_hidden(12)
    ids, weights = make_routing(12)
    _, sfw, _, _, _ = vllm.run(x, ids, weights)
    sf = vllm_numbers(x)["sf"].cpu().long()
    words = sfw.cpu().long() & M32
    for r in range(12):
        for j in range(HIDDEN // 64):
            want = sum(int(sf[r, 4 * j + i]) << (8 * i) for i in range(4))
            assert int(words[r, j]) == want, (r, j)

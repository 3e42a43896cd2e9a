"""Exact bit-level building blocks shared by the Triton kernels.

Why integer arithmetic: Triton's interpreter (the CPU CI) converts float→fp8
inexactly (no carry into the exponent, subnormals truncated, ties rounded up),
and on the GPU Triton's ``/`` is an approximate division. Every rounding step
here is therefore spelled out on the IEEE bit patterns with integer operations,
which numpy (interpreter) and the GPU evaluate identically, so one code path is
bit-exact on both. Divisions use ``tl.math.div_rn`` (IEEE round-to-nearest on
the GPU, numpy's true division in the interpreter).

On the GPU the two conversions that the hardware does exactly (fp32 →
E4M3 with RNE and saturation, E4M3 → fp32) use its instructions instead
(``HW=True``, a few instructions fewer per element); the GPU tests compare
both forms with ``formats`` over every fp32 input.

All shifts are by constants or clamped amounts below 32 (a shift of an int32
by 32 or more is poison in LLVM).

The functions mirror :mod:`dsv4_nvfp4.formats`:

* :func:`e4m3_encode_bits` = ``formats.encode_ue4m3`` (clamp to 448, RNE,
  NaN → 0x7F) for non-negative inputs;
* :func:`e4m3_decode` = ``formats.decode_ue4m3``;
* :func:`e2m1_encode` = ``formats.e2m1_encode`` (RNE ties to even, saturate
  to ±6, NaN → 7, -0.0 → 0, negative values that round to zero → 8);
  :func:`e2m1_magnitude_bits` / :func:`e2m1_pair_byte` the same rounding with
  fewer integer instructions, for the per-token staging kernel;
* :func:`pack_sf_words` = ``formats.pack_sf_bytes_to_int32``.
"""

from __future__ import annotations

import triton
import triton.language as tl

# Constants appear as literals inside the jit functions (Triton reads only
# constexpr globals). fp32 bits: 448.0 = 0x43E00000, +inf = 0x7F800000,
# 0.25 = 0x3E800000, 0.75 = 0x3F400000, 1.25 = 0x3FA00000, 1.75 = 0x3FE00000,
# 2.5 = 0x40200000, 3.5 = 0x40600000, 5.0 = 0x40A00000, 0.5 = 0x3F000000.


@triton.jit
def f32_bits(x):
    """fp32 tensor → its int32 bit pattern."""
    return x.to(tl.int32, bitcast=True)


@triton.jit
def bits_f32(b):
    """int32 bit pattern → fp32 tensor."""
    return b.to(tl.float32, bitcast=True)


@triton.jit
def pair_to_f32(w, IS_BF16: tl.constexpr):
    """An int32 word holding two bf16/fp16 values → (element 2i, element 2i+1) as fp32, exactly.

    Reading the input as 32-bit words keeps each even/odd pair in one thread,
    so the two E2M1 codes of an output byte are formed without shuffles.
    bf16 → fp32 is a 16-bit shift of the bits (no float conversion involved).
    """
    if IS_BF16:
        lo = bits_f32(w << 16)
        hi = bits_f32(w & -65536)  # 0xFFFF0000
    else:
        lo = (w & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        hi = ((w >> 16) & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    return lo, hi


@triton.jit
def abs_max(a, b):
    """max(|a|, |b|) with NaN propagating, like torch's ``amax`` (on the GPU one FMNMX.NAN)."""
    return tl.maximum(tl.abs(a), tl.abs(b), propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _nan_max(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def nan_max_reduce(x, axis: tl.constexpr, HW: tl.constexpr):
    """``max`` of non-negative values (or NaN) along ``axis``, propagating NaN like torch.

    ``tl.max`` drops NaN. On the GPU a reduction with a NaN-propagating max;
    in the interpreter (where a custom combine function runs in Python, far too
    slowly) an integer max over the bits, which orders NaN above +inf.
    """
    if HW:
        return tl.reduce(x, axis, _nan_max)
    else:
        return bits_f32(tl.max(f32_bits(x), axis))


@triton.jit
def _rne_shift(sig, s):
    """``sig >> s`` rounded to nearest, ties to even; ``1 <= s <= 25``, ``sig < 2**25``."""
    q = sig >> s
    rem = sig & ((1 << s) - 1)
    half = 1 << (s - 1)
    up = (rem > half) | ((rem == half) & ((q & 1) == 1))
    return q + up.to(tl.int32)


@triton.jit
def e4m3_encode_bits(v):
    """Non-negative fp32 (or NaN) → UE4M3 byte (int32 0..0x7F), exactly ``formats.encode_ue4m3``.

    Values above 448 (and +inf) saturate to 0x7E; NaN gives 0x7F. Normal E4M3
    range (v >= 2**-6): keep the top 3 mantissa bits, round the other 20 to
    nearest even; a carry out of the mantissa moves into the exponent because
    exponent and mantissa are added as one integer. Subnormal range: round
    v / 2**-9 to an integer (shift 21..25), which may carry to 8 = 0x08 = 2**-6.
    """
    b = f32_bits(v) & 0x7FFFFFFF
    e = b >> 23
    m = b & 0x7FFFFF
    # Normal E4M3: biased exponent e-127+7 = e-120, in 1..15 once clamped to 448.
    normal = ((e - 120) << 3) + _rne_shift(m, 20)
    # Subnormal E4M3: value / 2**-9 = (2**23 + m) * 2**(e - 141); fp32 subnormals (e == 0) → 0.
    sig = tl.where(e > 0, m | 0x800000, m)
    s = tl.minimum(141 - e, 25)
    s = tl.maximum(s, 21)
    sub = _rne_shift(sig, s)
    code = tl.where(e >= 121, normal, sub)
    code = tl.where(b > 0x43E00000, 0x7E, code)
    code = tl.where(b > 0x7F800000, 0x7F, code)
    return code


@triton.jit
def e4m3_decode(code):
    """E4M3 byte (int32 0..0xFF) → fp32 exactly, like ``formats.decode_ue4m3``; 0x7F/0xFF → NaN.

    The sign bit is honoured so that any byte decodes as torch does, although
    block scales are never negative.
    """
    c = code & 0x7F
    exp = c >> 3
    man = c & 7
    normal = ((exp + 120) << 23) | (man << 20)
    sub = f32_bits(man.to(tl.float32) * 0.001953125)  # man * 2**-9, exact
    mag = tl.where(exp == 0, sub, normal)
    mag = tl.where(c == 0x7F, 0x7FC00000, mag)
    return bits_f32(mag | ((code & 0x80) << 24))


@triton.jit
def e4m3_encode(v, HW: tl.constexpr):
    """:func:`e4m3_encode_bits`, or on the GPU the hardware ``cvt.rn.satfinite.e4m3x2.f32``.

    The hardware conversion saturates at 448 and keeps NaN as 0x7F, which is
    ``formats.encode_ue4m3`` for non-negative inputs (checked on all of them).
    """
    if HW:
        return v.to(tl.float8e4nv).to(tl.uint8, bitcast=True).to(tl.int32)
    else:
        return e4m3_encode_bits(v)


@triton.jit
def e4m3_to_f32(code, HW: tl.constexpr):
    """:func:`e4m3_decode`, or on the GPU the hardware E4M3 → fp32 conversion."""
    if HW:
        return code.to(tl.uint8).to(tl.float8e4nv, bitcast=True).to(tl.float32)
    else:
        return e4m3_decode(code)


@triton.jit
def e2m1_encode(y):
    """fp32 → E2M1 code (int32 0..15), exactly ``formats.e2m1_encode``.

    Below 2 the E2M1 grid is the multiples of 0.5 and from 2 to 4 the integers,
    so the magnitude code is RNE(2|y|) (codes 0..4) or RNE(|y|) + 2 (codes 4..6).
    Adding 2**23 rounds to an integer with the FPU's own round-half-to-even
    (the product 2|y| is exact, so a fused multiply-add gives the same bits),
    and that integer is the low mantissa bits of the sum. From 4 up: 6 up to
    and including 5 (tie → 4.0), else 7: saturation, +inf, and NaN (every
    comparison with NaN is false, on the GPU as in numpy). The sign is set
    only for ``y < 0``: -0.0 and NaN
    stay positive, a negative value rounding to zero becomes 8 (as ModelOpt).
    About a dozen instructions instead of seven compare-and-adds.
    """
    m = tl.abs(y)  # folds into the instructions' |operand| modifiers on the GPU
    small = m < 2.0
    t = m * tl.where(small, 2.0, 1.0) + 8388608.0
    low = f32_bits(t) - tl.where(small, 0x4B000000, 0x4AFFFFFE)  # RNE(..) (+2 from 2 on)
    mag = tl.where(m < 4.0, low, tl.where(m <= 5.0, 6, 7))  # NaN fails both tests → 7
    return mag | tl.where(y < 0.0, 8, 0)


@triton.jit
def e2m1_magnitude_bits(m):
    """Non-negative fp32 (or NaN) → int32 whose low 3 bits are the E2M1 code of ``m``.

    The same rounding as :func:`e2m1_encode` on ``|y|``, in a form that keeps the
    GPU's integer/logic pipe free (the staging kernels are bound by it): three
    fused multiply-adds put RNE(2m), RNE(m) + 2 and RNE(m/2) + 4 into the low
    mantissa bits of 2**23 + k, and the smallest of them (and 2**23 + 7) is the code.
    Why the minimum: 2m <= m + 2 exactly when m <= 2, m + 2 <= m/2 + 4 when m <= 4
    and 2m <= m/2 + 4 when m <= 8/3, and RNE is monotone, so the minimum is
    RNE(2m) below 2 (codes 0..4), RNE(m) + 2 from 2 to 4 (4..6) and
    min(RNE(m/2) + 4, 7) from 4 (6 up to 5, tie 5 → 4.0, else 7). Each FMA rounds
    once, at the unit of 2**23, with the FPU's ties-to-even, and 2**23 + k has the
    parity of k. inf, NaN (``min`` ignores NaN) and large values give 7. The upper
    bits are 0x4B000000: callers keep the low bits only.
    """
    t1 = m * 2.0 + 8388608.0  # 2**23 + RNE(2m); 2m is exact, fused or not
    t2 = m + 8388610.0  # 2**23 + 2 + RNE(m)
    t3 = m * 0.5 + 8388612.0  # 2**23 + 4 + RNE(m/2) (m/2 exact wherever this term wins)
    return f32_bits(tl.minimum(tl.minimum(t1, t2), tl.minimum(t3, 8388615.0)))


@triton.jit
def e2m1_pair_byte(lo, hi, sign_mask):
    """Two fp32 → int32 whose low byte is ``code(lo) | code(hi) << 4`` (upper bits garbage).

    The sign nibble bit is the fp32 sign bit times ``sign_mask`` (8 or 0), taken
    with an unsigned high multiply (no shift, no compare: the logic pipe stays
    free). This equals :func:`e2m1_encode` for every value except -0.0 and NaN
    with the sign bit set (8 and 15 here, 0 and 7 there): callers pass
    ``sign_mask = 0`` wherever those can occur. The per-token kernel does: its
    quotients are +0 for ±0 inputs (RN(+0 + -0) = +0), and NaN only in blocks
    whose scale is 0 or NaN, where it passes 0.
    """
    a_lo = e2m1_magnitude_bits(tl.abs(lo))
    a_hi = e2m1_magnitude_bits(tl.abs(hi))
    s_lo = tl.umulhi(f32_bits(lo), 2)  # bit 31 → 0 or 1
    s_hi = tl.umulhi(f32_bits(hi), 2)
    return a_lo + s_lo * sign_mask + (a_hi + s_hi * sign_mask) * 16


@triton.jit
def pack_sf_words(sf_bytes, R: tl.constexpr, G: tl.constexpr):
    """Scale bytes ``[R, G]`` (int32 0..255) → int32 words ``[R, G/4]``.

    Byte i of word j is group 4j+i (little-endian, ``formats.pack_sf_bytes_to_int32``).

    Shifts are 0, 8, 16, 24 within one 32-bit word (never 32 or more); the
    bytes occupy disjoint bits, so the sum is an exact OR.
    """
    quads = tl.reshape(sf_bytes, [R, G // 4, 4]).to(tl.uint32)
    shifts = (tl.arange(0, 4) * 8).to(tl.uint32)
    words = tl.sum(quads << shifts[None, None, :], axis=2)
    return words.to(tl.int32, bitcast=True)


@triton.jit
def div_by_reciprocal(x, d, z):
    """``RN(x / d)`` given ``z = RN(1 / d)``: one multiply and two FMAs, no division.

    Markstein's correction: ``q = RN(x z)``, the remainder ``r = x - d q`` is
    exact with an FMA, and ``RN(q + r z)`` is the correctly rounded quotient
    (Muller, Raina, Brisebarre, IEEE Trans. Computers 53(8), 2004), provided
    the remainder does not underflow (x and the quotient above ~2**-100; tests
    check this on every bf16 x). Below that only the last bits of a quotient far
    under every E2M1 threshold can move, which cannot change its code; the
    per-token kernel still divides exactly wherever a quotient could round to 0.
    """
    q = x * z
    r = tl.fma(-d, q, x)
    return tl.fma(r, z, q)


@triton.jit
def div_rn(x, y):
    """IEEE round-to-nearest ``x / y`` with broadcasting (Triton's plain ``/`` is approximate)."""
    x, y = tl.broadcast(x, y)
    return tl.math.div_rn(x, y)

"""The kernels' bit-level rounding helpers vs formats, in Triton's CPU interpreter.

Why this proves the scale bytes on CPU: the interpreter's own float→fp8
casts are inexact, so the kernels never use them; they round on int32 bit
patterns (``kernels/_bits.py``), which numpy and the GPU evaluate identically.
Here those helpers are swept over every fp32 bit pattern of the upper 19/20
bits (all exponents and the mantissa bits that decide E4M3/E2M1 rounding)
with the low bits at 0, 1, just below and at the half-way point, and compared
byte for byte with ``formats`` (torch's exact casts). tests/gpu repeats the
sweeps exhaustively over all 2^32 patterns on the H100.
"""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
import torch
from bitwise import assert_bitwise_equal
from interpreted import interpreter_guard

from dsv4_nvfp4.formats import decode_ue4m3, e2m1_encode, encode_ue4m3
from dsv4_nvfp4.kernels.interpret import InterpreterUnavailable, load_interpreted

try:
    kernels = load_interpreted()
except InterpreterUnavailable:  # triton came first in this pytest process
    kernels = None

# Imported after load_interpreted(): triton's interpreter mode is fixed at its first import.
import triton
import triton.language as tl

from dsv4_nvfp4.kernels._bits import (
    div_by_reciprocal,
    div_rn,
    e2m1_magnitude_bits,
    e2m1_pair_byte,
    e4m3_encode_bits,
)
from dsv4_nvfp4.kernels._bits import e2m1_encode as k_e2m1_encode
from dsv4_nvfp4.kernels._bits import e4m3_decode as k_e4m3_decode

pytestmark = pytest.mark.cpu
KERNEL_DIR = Path(__file__).resolve().parents[1] / "src" / "dsv4_nvfp4" / "kernels"
BLOCK = 1 << 16
OP_E4M3_ENCODE, OP_E4M3_DECODE, OP_E2M1_ENCODE, OP_E2M1_MAG = range(4)


_interpreter, test_fresh_process = interpreter_guard(kernels, __file__)


@triton.jit
def _map_kernel(src_ptr, dst_ptr, n, OP: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    if OP == 0:
        tl.store(dst_ptr + offs, e4m3_encode_bits(tl.load(src_ptr + offs, mask=m)), mask=m)
    elif OP == 1:
        tl.store(dst_ptr + offs, k_e4m3_decode(tl.load(src_ptr + offs, mask=m)), mask=m)
    elif OP == 2:
        tl.store(dst_ptr + offs, k_e2m1_encode(tl.load(src_ptr + offs, mask=m)), mask=m)
    else:
        tl.store(dst_ptr + offs, e2m1_magnitude_bits(tl.load(src_ptr + offs, mask=m)) & 7, mask=m)


@triton.jit
def _pair_kernel(lo_ptr, hi_ptr, dst_ptr, n, SIGN: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    lo = tl.load(lo_ptr + offs, mask=m)
    hi = tl.load(hi_ptr + offs, mask=m)
    tl.store(dst_ptr + offs, e2m1_pair_byte(lo, hi, SIGN) & 0xFF, mask=m)


def run_pair(lo: torch.Tensor, hi: torch.Tensor, sign: int) -> torch.Tensor:
    dst = torch.empty(lo.shape, dtype=torch.int32)
    _pair_kernel[(triton.cdiv(lo.numel(), BLOCK),)](lo, hi, dst, lo.numel(), SIGN=sign,
                                                     BLOCK=BLOCK)
    return dst.to(torch.uint8)


def run_map(op: int, src: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    dst = torch.empty(src.shape, dtype=out_dtype)
    _map_kernel[(triton.cdiv(src.numel(), BLOCK),)](src, dst, src.numel(), OP=op, BLOCK=BLOCK)
    return dst


def fp32_patterns(high_bits: int, lows: tuple[int, ...]) -> torch.Tensor:
    """Non-negative fp32: every value of bits 30..(31-high_bits), each with every given low part."""
    hi = np.arange(1 << high_bits, dtype=np.uint32) << np.uint32(31 - high_bits)
    pats = (hi[:, None] | np.array(lows, dtype=np.uint32)[None, :]).reshape(-1)
    return torch.from_numpy(pats.view(np.int32).copy()).view(torch.float32)


def all_signs(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, (x.view(torch.int32) | torch.tensor(-(2**31), dtype=torch.int32))
                      .view(torch.float32)])


LOWS_E4M3 = (0x000, 0x001, 0x7FF, 0x800, 0x801, 0xFFF)  # rounding happens at bit 20 and above


def test_e4m3_encode_sweep_matches_formats() -> None:
    # bits 30..12 enumerated (2^19 values: every exponent incl. fp32 subnormals, inf, NaN)
    v = fp32_patterns(19, LOWS_E4M3)
    got = run_map(OP_E4M3_ENCODE, v, torch.int32).to(torch.uint8)
    want = encode_ue4m3(v).view(torch.uint8)
    assert_bitwise_equal(got, want, "e4m3 bytes over the fp32 sweep")


@pytest.mark.parametrize(("value", "byte"), [
    (0.0, 0x00), (2.0**-9, 0x01), (2.0**-10, 0x00), (2.0**-10 * 1.0000001, 0x01),
    (3 * 2.0**-10, 0x02), (2.0**-6 - 2.0**-10, 0x08), (2.0**-6, 0x08), (1.0, 0x38),
    (1.0625, 0x38), (1.0625 * 1.0000001, 0x39), (1.1875, 0x3A), (15.5, 0x58), (14.5, 0x56),
    (448.0, 0x7E), (460.0, 0x7E), (1e30, 0x7E), (float("inf"), 0x7E), (float("nan"), 0x7F),
])
def test_e4m3_encode_spelled_out(value: float, byte: int) -> None:
    got = run_map(OP_E4M3_ENCODE, torch.tensor([value], dtype=torch.float32), torch.int32)
    assert int(got[0]) == byte
    assert int(encode_ue4m3(torch.tensor([value])).view(torch.uint8)[0]) == byte


def test_e4m3_decode_every_byte() -> None:
    codes = torch.arange(256, dtype=torch.int32)
    got = run_map(OP_E4M3_DECODE, codes, torch.float32)
    want = decode_ue4m3(codes.to(torch.uint8))
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(got), nan)
    assert nan.nonzero().flatten().tolist() == [0x7F, 0xFF]
    assert_bitwise_equal(got[~nan].view(torch.int32), want[~nan].view(torch.int32), "e4m3 decode")


# Every E2M1 code point and every tie, as the value to round and its expected code.
E2M1_SPELLED = [
    (0.0, 0), (0.5, 1), (1.0, 2), (1.5, 3), (2.0, 4), (3.0, 5), (4.0, 6), (6.0, 7),
    (-0.0, 0), (-0.5, 9), (-1.0, 10), (-1.5, 11), (-2.0, 12), (-3.0, 13), (-4.0, 14), (-6.0, 15),
    # ties go to the even code
    (0.25, 0), (0.75, 2), (1.25, 2), (1.75, 4), (2.5, 4), (3.5, 6), (5.0, 6),
    (-0.25, 8), (-0.75, 10), (-1.25, 10), (-1.75, 12), (-2.5, 12), (-3.5, 14), (-5.0, 14),
    # one fp32 ulp beside each tie
    (0.25000003, 1), (0.74999994, 1), (1.2500001, 3), (1.7499999, 3), (2.5000002, 5),
    (3.4999998, 5), (5.0000005, 7), (0.24999999, 0), (0.75000006, 2), (4.9999995, 6),
    # saturation, specials, negatives that round to zero
    (6.5, 7), (1e30, 7), (float("inf"), 7), (float("-inf"), 15), (-7.0, 15), (float("nan"), 7),
    (-0.1, 8), (-1e-30, 8), (1e-30, 0),
]


def test_e2m1_encode_every_code_point_and_tie() -> None:
    vals = torch.tensor([v for v, _ in E2M1_SPELLED], dtype=torch.float32)
    want = torch.tensor([c for _, c in E2M1_SPELLED], dtype=torch.uint8)
    got = run_map(OP_E2M1_ENCODE, vals, torch.int32).to(torch.uint8)
    assert_bitwise_equal(got, want, "e2m1 codes (spelled out)")
    assert_bitwise_equal(e2m1_encode(vals), want, "formats e2m1 codes (spelled out)")


def test_e2m1_encode_sweep_matches_formats() -> None:
    v = all_signs(fp32_patterns(19, (0x000, 0x001, 0x800, 0xFFF)))  # bits 31..12
    got = run_map(OP_E2M1_ENCODE, v, torch.int32).to(torch.uint8)
    assert_bitwise_equal(got, e2m1_encode(v), "e2m1 codes over the fp32 sweep")


def test_e2m1_magnitude_sweep_matches_formats() -> None:
    """The min-of-three-FMAs magnitude code equals formats' on every |y| of the sweep
    (inf and NaN included), and on the spelled-out code points and ties."""
    v = fp32_patterns(19, (0x000, 0x001, 0x800, 0xFFF))  # bits 30..12, non-negative
    got = run_map(OP_E2M1_MAG, v, torch.int32).to(torch.uint8)
    assert_bitwise_equal(got, e2m1_encode(v), "e2m1 magnitude codes over the fp32 sweep")
    vals = torch.tensor([abs(v) for v, _ in E2M1_SPELLED], dtype=torch.float32)
    got = run_map(OP_E2M1_MAG, vals, torch.int32).to(torch.uint8)
    assert_bitwise_equal(got, e2m1_encode(vals), "e2m1 magnitude codes (spelled out)")


def test_e2m1_pair_byte_matches_formats() -> None:
    """code(lo) | code(hi) << 4 with the sign from the sign bit: formats' byte for every
    value but -0.0 and negative NaN (documented: callers mask the sign there); with sign
    mask 0 the magnitudes alone."""
    v = all_signs(fp32_patterns(17, (0x000, 0x001, 0x800, 0xFFF)))
    lo, hi = v, v.roll(12345)
    want = e2m1_encode(lo) | (e2m1_encode(hi) << 4)
    got = run_pair(lo, hi, 8)
    def negative_zero_or_nan(t: torch.Tensor) -> torch.Tensor:
        return ((t == 0) | torch.isnan(t)) & (t.view(torch.int32) < 0)

    ok = ~negative_zero_or_nan(lo) & ~negative_zero_or_nan(hi)
    assert int(ok.sum()) > 1_000_000
    assert_bitwise_equal(got[ok], want[ok], "e2m1 pair bytes (signed)")
    want0 = (e2m1_encode(lo) & 7) | ((e2m1_encode(hi) & 7) << 4)
    assert_bitwise_equal(run_pair(lo, hi, 0), want0, "e2m1 pair bytes (sign masked)")
    assert run_pair(torch.tensor([-0.0]), torch.tensor([-1.0]), 8).tolist() == [0xA8]


@triton.jit
def _division_kernel(x_ptr, d_ptr, exact_ptr, fast_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    x = tl.load(x_ptr + offs, mask=m, other=0.0)
    d = tl.load(d_ptr + offs, mask=m, other=1.0)
    tl.store(exact_ptr + offs, div_rn(x, d), mask=m)
    z = div_rn(tl.full([BLOCK], 1.0, tl.float32), d)
    tl.store(fast_ptr + offs, div_by_reciprocal(x, d, z), mask=m)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_reciprocal_division_matches_ieee_division() -> None:
    """The per-token kernel's x / (SF * pts) via RN(1/d) and two FMAs: every finite bf16 x
    over 12 divisors in [2**-34, 2**16), quotients up to 2**20: IEEE bits where x and the
    quotient are at least 2**-100 (below that the FMA remainder can underflow), and the
    same E2M1 code everywhere."""
    x = (torch.arange(0, 1 << 16, dtype=torch.int32) << 16).view(torch.float32)
    x = x[torch.isfinite(x)]
    d = torch.tensor([2.0**-34, 3.3e-9, 1.7154823e-3, 0.1, 0.75, 1.0, 1.5, 7.0, 1e3,
                      12345.678, 2.0**15, 65535.0])
    xs, ds = x.repeat(d.numel()), d.repeat_interleave(x.numel())
    exact, fast = torch.empty_like(xs), torch.empty_like(xs)
    _division_kernel[(triton.cdiv(xs.numel(), BLOCK),)](xs, ds, exact, fast, xs.numel(),
                                                        BLOCK=BLOCK)
    domain = (xs.double() / ds.double()).abs() <= 2.0**20
    normal = (exact.abs() >= 2.0**-100) & (xs.abs() >= 2.0**-100)
    assert int(domain.sum()) > 400_000
    assert_bitwise_equal(fast[domain & normal].view(torch.int32),
                         exact[domain & normal].view(torch.int32), "quotient bits")
    assert_bitwise_equal(e2m1_encode(fast[domain]), e2m1_encode(exact[domain]), "E2M1 codes")


def _widened_to_64_bits(operand: ast.expr) -> bool:
    """``x.to(tl.int64)`` / ``x.to(tl.uint64)``: the shifted value is visibly 64 bits wide."""
    return (isinstance(operand, ast.Call) and isinstance(operand.func, ast.Attribute)
            and operand.func.attr == "to" and len(operand.args) == 1
            and ast.unparse(operand.args[0]) in ("tl.int64", "tl.uint64"))


def _wide_shifts(source: str) -> list[int]:
    """Lines shifting by a literal >= 32 a value not visibly cast to 64 bits right there."""
    bad = []
    for node in ast.walk(ast.parse(source)):
        if (isinstance(node, ast.BinOp) and isinstance(node.op, (ast.LShift, ast.RShift))
                and isinstance(node.right, ast.Constant)):
            limit = 64 if _widened_to_64_bits(node.left) else 32
            if node.right.value >= limit:
                bad.append(node.lineno)
    return bad


def test_no_shift_by_32_or_more_in_kernel_sources() -> None:
    """A shift of an int32 by 32 or more is LLVM poison: a literal shift >= 32 is allowed
    only on a value cast to int64/uint64 in the same expression."""
    checked = 0
    for path in sorted(KERNEL_DIR.glob("*.py")):
        source = path.read_text()
        checked += sum(isinstance(n, ast.BinOp) and isinstance(n.op, (ast.LShift, ast.RShift))
                       for n in ast.walk(ast.parse(source)))  # fmt: skip
        assert _wide_shifts(source) == [], f"{path.name} shifts a 32-bit value by >= 32"
    assert checked > 10


def test_the_shift_rule_catches_an_int32_shifted_by_32() -> None:
    assert _wide_shifts("y = x << 32\nz = x.to(tl.int32) << 32\n") == [1, 2]
    assert _wide_shifts("y = x.to(tl.int64) << 32\nz = x.to(tl.uint64) >> 63\n") == []
    assert _wide_shifts("y = x.to(tl.int64) << 64\n") == [1]

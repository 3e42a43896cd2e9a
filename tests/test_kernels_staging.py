"""NVFP4 per-token activation staging vs formats, bit for bit, in Triton's CPU interpreter.

Every E2M1 code point and tie spelled out as literal bytes; zero, tiny, huge,
inf and NaN rows; T = 0 and odd T; fp16 input; tile shapes that do not divide
T; writes confined to [T, H/2] bytes, [T, H/64] words and [T] scales of the
caller's buffers; bad input rejected with one clear error.
"""

from __future__ import annotations

import pytest
import torch
from bitwise import assert_bitwise_equal
from hypothesis import given, settings
from hypothesis import strategies as st
from interpreted import interpreter_guard

from dsv4_nvfp4.formats import (
    FormatError,
    pack_sf_bytes_to_int32,
    quantize_nvfp4_activation_per_token,
)
from dsv4_nvfp4.kernels.interpret import InterpreterUnavailable, load_interpreted

try:
    kernels = load_interpreted()
except InterpreterUnavailable:  # triton came first in this pytest process
    kernels = None

pytestmark = pytest.mark.cpu
POISON_BYTE = 0xAB
POISON_WORD = 0x5A5A5A5A


_interpreter, test_fresh_process = interpreter_guard(kernels, __file__)


def buffers(t: int, h: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (torch.full((t, h // 2), POISON_BYTE, dtype=torch.uint8),
            torch.full((t, h // 64), POISON_WORD, dtype=torch.int32),
            torch.full((t,), float("nan"), dtype=torch.float32))


def stage_per_token(x: torch.Tensor, config=None):
    ox, osf, pts = buffers(*x.shape)
    kernels.stage_nvfp4_activations_per_token(x, ox, osf, pts, config=config)
    return ox, osf, pts


def assert_same_float(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(got), nan), f"{what}: NaN positions differ"
    assert_bitwise_equal(got[~nan], want[~nan], what)


def check_per_token(x: torch.Tensor, config=None) -> None:
    ox, osf, pts = stage_per_token(x, config)
    p, sf, rpts = quantize_nvfp4_activation_per_token(x)  # NaN scale bytes: 0x7F, as the kernel
    assert_bitwise_equal(ox, p, "x (packed E2M1)")
    assert_bitwise_equal(osf, pack_sf_bytes_to_int32(sf), "x_sf (int32 words)")
    assert_same_float(pts, rpts, "x_scales (per-token scale)")


def random_x(t: int, h: int, dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, h, generator=g) * torch.exp(torch.randn(t, 1, generator=g) * 2)
    # blocks at very different magnitudes within a row
    x = x * torch.exp(torch.randn(t, h // 16, 1, generator=g) * 1.5).repeat(1, 1, 16).reshape(t, h)
    if dtype == torch.float16:
        x = x.clamp(-6e4, 6e4)  # stay finite in fp16
    return x.to(dtype)


# --- every code point and tie as literal bytes ---------------------------------------------
# With pts = 2**-10 these blocks reach E2M1 exactly.
BLOCK_A = [6, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5, 0, 0.5, 1, 1.5, 2, 3, 4, -0.0]
BYTES_A = [0x07, 0x22, 0x44, 0x66, 0x10, 0x32, 0x54, 0x06]
BLOCK_B = [-6, -0.25, -0.75, -1.25, -1.75, -2.5, -3.5, -5, -0.1, -0.5, -1, -1.5, -2, -3, -4, 0.0]
BYTES_B = [0x8F, 0xAA, 0xCC, 0xEE, 0x98, 0xBA, 0xDC, 0x0E]
# One bf16 ulp beside each tie; 6.25 saturates (its SF rounds down to 1.0).
BLOCK_C = [6.25, 0.251953125, 0.74609375, 1.2578125, 1.7421875, 2.515625, 3.484375, 5.03125,
           -6.25, -0.251953125, -0.74609375, -1.2578125, -1.7421875, -2.515625, -3.484375,
           -5.03125]
BYTES_C = [0x17, 0x31, 0x53, 0x75, 0x9F, 0xB9, 0xDB, 0xFD]
# Block D has SF 448 (byte 0x7E, in byte 3 of the word): values/448 = 6, 3, -6, 0.5.
BYTES_D = [0x57, 0x1F, 0, 0, 0, 0, 0, 0]
WORD_ABCD = 0x7E383838  # SF bytes 0x38 (1.0), 0x38, 0x38, 0x7E (448)


def tie_row(unit: float) -> torch.Tensor:
    d = [448 * 6 * unit, 448 * 3 * unit, -448 * 6 * unit, 448 * 0.5 * unit] + [0.0] * 12
    vals = [v * unit for v in BLOCK_A + BLOCK_B + BLOCK_C] + d
    return torch.tensor([vals], dtype=torch.float32).to(torch.bfloat16)


def test_per_token_every_code_point_and_tie_spelled_out() -> None:
    x = tie_row(2.0**-10)  # row amax 2.625 = 2688 * 2**-10, so pts = 2**-10 exactly
    ox, osf, pts = stage_per_token(x)
    assert ox[0].tolist() == BYTES_A + BYTES_B + BYTES_C + BYTES_D
    assert osf.tolist() == [[WORD_ABCD]]
    assert pts.tolist() == [2.0**-10]
    check_per_token(x)


# --- bit-exact against formats -------------------------------------------------------------
@pytest.mark.parametrize(("t", "h"), [(1, 64), (7, 192), (33, 3072), (256, 7168)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_per_token_matches_formats(t: int, h: int, dtype: torch.dtype) -> None:
    check_per_token(random_x(t, h, dtype, seed=t * h))


def edge_rows(h: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    rows = torch.randn(10, h, generator=g)
    rows[0] = 0.0  # zero row
    rows[1, :16] = 0.0  # one zero block
    rows[1, 16:32] *= 1e-3  # tiny block beside normal ones
    rows[2] *= 1e-30  # row amax under the 1e-4 floor of pts
    rows[3] *= 1e4
    rows[4, 5] = float("inf")
    rows[5, 17] = float("-inf")
    rows[6, 33] = float("nan")
    rows[7] = -rows[7].abs() * 1e-3  # all negative, many round to -0 (code 8)
    rows[8] = torch.tensor(2.0**-133)  # bf16 subnormals
    rows[9, ::16] = 448.0 * 6
    return rows.to(torch.bfloat16)


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")
def test_per_token_edge_rows() -> None:
    check_per_token(edge_rows(128))


def test_per_token_huge_rows_take_the_exact_division() -> None:
    """Rows with pts > 128 (amax > ~3.4e5) divide exactly: there a bf16 subnormal's quotient
    can round to zero, where the reciprocal form could differ in the sign of a zero code."""
    g = torch.Generator().manual_seed(21)
    x = torch.randn(6, 256, generator=g)
    x[0] *= 1e7
    x[1] *= 1e30
    x[2, 7] = 1e6
    x[0, 3::16] = -(2.0**-133)  # negative bf16 subnormals beside huge values
    x[1, 5::16] = -(2.0**-130)
    x[2, 9::16] = 2.0**-133
    x = x.to(torch.bfloat16)
    check_per_token(x)
    check_per_token(x[3:])  # the same rows with only small values take the fast form


@settings(max_examples=15, deadline=None)
@given(t=st.integers(1, 9), groups=st.integers(1, 12), log_scale=st.floats(-40, 40),
       seed=st.integers(0, 2**31 - 1))
def test_per_token_property(t: int, groups: int, log_scale: float, seed: int) -> None:
    check_per_token((random_x(t, 64 * groups, seed=seed).float() * 2.0**log_scale)
                    .to(torch.bfloat16))


# --- shapes, tiles and buffer contract -----------------------------------------------------
CONFIGS = [(1, 64), (2, 128), (4, 256), (8, 64), (16, 128)]


@pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning")  # numpy, on the NaN row
@pytest.mark.parametrize("whole_row", [True, False], ids=["whole-row", "two-pass"])
@pytest.mark.parametrize(("rows", "block"), CONFIGS)
def test_results_do_not_depend_on_the_tile(rows: int, block: int, whole_row: bool) -> None:
    cfg = kernels.TileConfig(rows=rows, block=block, whole_row=whole_row)
    x = random_x(13, 256, seed=5)  # 13 is not a multiple of any tile's rows
    x[4, 7] = float("nan")
    x[6] *= 1e7  # pts > 128: the exact division
    check_per_token(x, cfg)


class _Spy:
    """Stands in for a jit kernel: counts launches, then launches the real one."""

    def __init__(self, kernel) -> None:
        self.kernel, self.calls = kernel, 0

    def __getitem__(self, grid):
        self.calls += 1
        return self.kernel[grid]


@pytest.mark.parametrize(("h", "config", "whole_row"), [
    (7168, None, True),  # 7 tiles of 1024 in the interpreter's default tile
    (64 * 17, None, False),  # 17 tiles of 64: more than MAX_ROW_CHUNKS, two passes
    (256, (2, 64, True), True),
    (256, (2, 64, False), False),
])
def test_per_token_kernel_choice(h: int, config, whole_row: bool,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Which per-token kernel runs (whole row in registers or two passes); both exact."""
    from dsv4_nvfp4.kernels import staging

    spies = {name: _Spy(getattr(staging, name))
             for name in ("_stage_per_token_row_kernel", "_stage_per_token_kernel")}
    for name, spy in spies.items():
        monkeypatch.setattr(staging, name, spy)
    cfg = None if config is None else kernels.TileConfig(*config[:2], whole_row=config[2])
    check_per_token(random_x(5, h, seed=h), cfg)
    assert spies["_stage_per_token_row_kernel"].calls == int(whole_row)
    assert spies["_stage_per_token_kernel"].calls == int(not whole_row)


def test_gpu_per_token_tiles_keep_rows_in_registers() -> None:
    """On the GPU the default per-token tile holds V4 Pro's 7168-wide row in registers
    (2 warps: one block-16 group per thread and tile, 56 words a thread), widens for
    16384, and leaves rows too long for registers to the two-pass kernel."""
    from dsv4_nvfp4.kernels._config import row_fits, staging_tile

    cuda = torch.device("cuda")
    cfg = staging_tile(7168, device=cuda)
    assert (cfg.rows, cfg.block, cfg.num_warps) == (1, 1024, 2) and row_fits(cfg, 7168, cuda)
    cfg = staging_tile(16384, device=cuda)
    assert cfg.num_warps == 4 and row_fits(cfg, 16384, cuda)
    cfg = staging_tile(3072, device=cuda)
    assert cfg.num_warps == 2 and row_fits(cfg, 3072, cuda)
    cfg = staging_tile(65536, device=cuda)
    assert not row_fits(cfg, 65536, cuda)  # 64 tiles
    assert not row_fits(kernels.TileConfig(1, 64, 4), 64 * 17, cuda)  # 17 tiles
    assert not row_fits(kernels.TileConfig(1, 1024, 4, whole_row=False), 7168, cuda)
    assert not row_fits(kernels.TileConfig(1, 1024, 1), 7168, cuda)  # 112 words a thread


def test_zero_tokens_touch_nothing() -> None:
    x = torch.empty(0, 7168, dtype=torch.bfloat16)
    ox, osf, pts = buffers(0, 7168)
    kernels.stage_nvfp4_activations_per_token(x, ox, osf, pts)
    assert ox.shape == (0, 3584) and osf.shape == (0, 112) and pts.shape == (0,)
    check_per_token(x)


@pytest.mark.parametrize("t", [1, 3, 5])
def test_odd_token_counts(t: int) -> None:
    check_per_token(random_x(t, 7168, seed=t))


def test_writes_stay_inside_the_callers_rows_and_columns() -> None:
    """Packed nibble pairs: exactly H/2 bytes per row and H/64 words, nothing beyond."""
    t, h = 5, 192
    x = random_x(t, h, seed=3)
    big_x = torch.full((t + 3, h // 2 + 16), POISON_BYTE, dtype=torch.uint8)
    big_sf = torch.full((t + 3, h // 64 + 4), POISON_WORD, dtype=torch.int32)
    big_pts = torch.full((t + 3,), -1.0)
    out_x, out_sf, out_pts = big_x[:t, : h // 2], big_sf[:t, : h // 64], big_pts[:t]
    kernels.stage_nvfp4_activations_per_token(x, out_x, out_sf, out_pts)
    p, sf, pts = quantize_nvfp4_activation_per_token(x)
    assert_bitwise_equal(out_pts, pts, "x_scales")
    assert_bitwise_equal(out_x, p, "x inside the caller's view")
    assert_bitwise_equal(out_sf, pack_sf_bytes_to_int32(sf), "x_sf inside the caller's view")
    assert bool((big_x[t:] == POISON_BYTE).all()) and bool((big_x[:, h // 2:] == POISON_BYTE)
                                                            .all())
    assert bool((big_sf[t:] == POISON_WORD).all()) and bool((big_sf[:, h // 64:]
                                                             == POISON_WORD).all())
    assert bool((big_pts[t:] == -1.0).all())
    assert bool(((out_x >> 4) != 0).any()), "high nibbles must carry the odd elements"


def test_one_scale_word_per_row_with_any_stride() -> None:
    """H = 64: the [T, 1] scale view may have any stride along its single column."""
    x = random_x(4, 64, seed=13)
    big = torch.full((4, 8), POISON_WORD, dtype=torch.int32)
    out_sf = big[:, 2::8]  # shape [4, 1], strides (8, 8)
    out_x = torch.zeros(4, 32, dtype=torch.uint8)
    pts = torch.zeros(4)
    kernels.stage_nvfp4_activations_per_token(x, out_x, out_sf, pts)
    p, sf, rpts = quantize_nvfp4_activation_per_token(x)
    assert_bitwise_equal(out_x, p, "x")
    assert_bitwise_equal(out_sf, pack_sf_bytes_to_int32(sf), "x_sf")
    assert_bitwise_equal(pts, rpts, "x_scales")
    assert bool((big[:, [0, 1, 3, 4, 5, 6, 7]] == POISON_WORD).all())


def test_int8_output_buffer_accepted() -> None:
    x = random_x(3, 128, seed=9)
    out_x = torch.zeros(3, 64, dtype=torch.int8)
    out_sf = torch.zeros(3, 2, dtype=torch.int32)
    kernels.stage_nvfp4_activations_per_token(x, out_x, out_sf, torch.zeros(3))
    p, _, _ = quantize_nvfp4_activation_per_token(x)
    assert_bitwise_equal(out_x.view(torch.uint8), p, "x via an int8 buffer")


def test_strided_input_rows() -> None:
    base = random_x(6, 256, seed=11)
    check_per_token(base[::2, :192])  # row stride 512, unit column stride


# --- bad input: one clear FormatError ------------------------------------------------------
def _call(x, out_x=None, out_sf=None):
    t, h = x.shape if x.dim() == 2 else (1, 64)
    ox = torch.zeros(t, h // 2, dtype=torch.uint8) if out_x is None else out_x
    osf = torch.zeros(t, max(h // 64, 1), dtype=torch.int32) if out_sf is None else out_sf
    kernels.stage_nvfp4_activations_per_token(x, ox, osf, torch.zeros(t))


@pytest.mark.parametrize("h", [16, 48, 96, 7160])
def test_hidden_not_a_multiple_of_64_is_rejected(h: int) -> None:
    with pytest.raises(FormatError, match=r"^x: expected hidden size H a positive multiple of 64"):
        _call(torch.zeros(2, h, dtype=torch.bfloat16))


@pytest.mark.parametrize(("kwargs", "pattern"), [
    ({"x": torch.zeros(128, dtype=torch.bfloat16)}, r"^x: expected a 2-D tensor"),
    ({"x": torch.zeros(2, 128)}, r"^x: expected dtype torch.bfloat16 or torch.float16"),
    ({"out_x": torch.zeros(2, 128, dtype=torch.uint8)}, r"^out_x: expected shape \(2, 64\)"),
    ({"out_sf": torch.zeros(2, 8, dtype=torch.uint8)}, r"^out_x_sf: expected dtype torch.int32"),
    ({"out_sf": torch.zeros(2, 8, dtype=torch.int32)}, r"^out_x_sf: expected shape \(2, 2\)"),
])
def test_bad_input(kwargs: dict, pattern: str) -> None:
    x = kwargs.pop("x", torch.zeros(2, 128, dtype=torch.bfloat16))
    with pytest.raises(FormatError, match=pattern):
        _call(x, **kwargs)


def test_non_unit_stride_along_h_is_rejected() -> None:
    x = torch.zeros(2, 256, dtype=torch.bfloat16)[:, ::2]
    with pytest.raises(FormatError, match=r"^x: expected unit stride along H"):
        _call(x)


def test_per_token_bad_scales_buffer() -> None:
    x = torch.zeros(3, 64, dtype=torch.bfloat16)
    ox, osf, _ = buffers(3, 64)
    with pytest.raises(FormatError, match=r"^out_x_scales: expected shape \(3,\)"):
        kernels.stage_nvfp4_activations_per_token(x, ox, osf, torch.zeros(3, 1))
    with pytest.raises(FormatError, match=r"^out_x_scales: expected dtype torch.float32"):
        kernels.stage_nvfp4_activations_per_token(x, ox, osf, torch.zeros(3, dtype=torch.float16))

"""E2M1 codec against ml_dtypes, ModelOpt and compressed-tensors, every code point and tie."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from oracles import modelopt_nvfp4

from dsv4_nvfp4.formats import (
    E2M1_VALUES,
    FormatError,
    dequant_e2m1_packed,
    e2m1_decode,
    e2m1_encode,
    pack_e2m1,
    unpack_e2m1,
)

pytestmark = pytest.mark.cpu


def ml_e2m1_codes(x: torch.Tensor) -> torch.Tensor:
    arr = x.float().numpy().astype(ml_dtypes.float4_e2m1fn)
    return torch.from_numpy(arr.view(np.uint8).copy()) & 0xF


def test_every_code_point_decodes_like_ml_dtypes():
    codes = torch.arange(16, dtype=torch.uint8)
    ours = e2m1_decode(codes)
    theirs = torch.from_numpy(codes.numpy().view(ml_dtypes.float4_e2m1fn).astype(np.float32))
    assert torch.equal(ours, theirs)
    assert ours.tolist() == list(E2M1_VALUES)
    assert torch.signbit(ours[8]) and ours[8] == 0  # code 8 is -0.0


# (value, code, why) — each tie of round-half-to-even spelled out
TIES = [
    (0.25, 0x0, "0.25 is midway 0|0.5: even code 0"),
    (0.75, 0x2, "0.75 is midway 0.5|1: even code 2 (1.0)"),
    (1.25, 0x2, "1.25 is midway 1|1.5: even code 2 (1.0)"),
    (1.75, 0x4, "1.75 is midway 1.5|2: even code 4 (2.0)"),
    (2.5, 0x4, "2.5 is midway 2|3: even code 4 (2.0)"),
    (3.5, 0x6, "3.5 is midway 3|4: even code 6 (4.0)"),
    (5.0, 0x6, "5 is midway 4|6: even code 6 (4.0)"),
    (-0.75, 0xA, "negative ties mirror positive ones"),
    (-5.0, 0xE, "negative ties mirror positive ones"),
    (6.0, 0x7, "max"),
    (7.0, 0x7, "saturate above 6"),
    (1e30, 0x7, "saturate"),
    (-1e30, 0xF, "saturate negative"),
    (float("inf"), 0x7, "+inf saturates to +6"),
    (float("-inf"), 0xF, "-inf saturates to -6"),
    (float("nan"), 0x7, "NaN -> +6, ModelOpt's policy (ml_dtypes gives 0x8)"),
    (0.0, 0x0, "+0"),
    (-0.0, 0x0, "-0.0 -> +0 code, as ModelOpt (ml_dtypes keeps 0x8)"),
    (-0.1, 0x8, "a negative that rounds to zero keeps its sign: -0"),
]


@pytest.mark.parametrize(("value", "code", "why"), TIES)
def test_ties_saturation_and_specials(value, code, why):
    assert int(e2m1_encode(torch.tensor([value]))[0]) == code, why


def test_ties_agree_with_ml_dtypes_and_modelopt():
    finite = torch.tensor([v for v, _, _ in TIES if abs(v) < float("inf") and v == v and v != 0],
                          dtype=torch.float32)
    assert torch.equal(e2m1_encode(finite), ml_e2m1_codes(finite))
    mo = modelopt_nvfp4()._cast_fp4(finite.clone())  # _cast_fp4 modifies its input
    assert torch.equal(e2m1_encode(finite), mo)


def test_dense_grid_matches_ml_dtypes_and_modelopt():
    # every multiple of 1/64 in [-8, 8] (covers all midpoints exactly) plus neighbours
    grid = torch.arange(-8 * 64, 8 * 64 + 1, dtype=torch.float32) / 64
    grid = torch.cat([grid, torch.nextafter(grid, torch.full_like(grid, 100)),
                      torch.nextafter(grid, torch.full_like(grid, -100))])
    grid = grid[grid != 0]  # ±0 handled in TIES (the references disagree on -0.0)
    ours = e2m1_encode(grid)
    assert torch.equal(ours, ml_e2m1_codes(grid))
    assert torch.equal(ours, modelopt_nvfp4()._cast_fp4(grid.clone()))


def test_pack_order_low_nibble_is_even_element():
    codes = e2m1_encode(torch.tensor([1.0, 6.0, 0.5, -2.0]))
    packed = pack_e2m1(codes)
    assert packed.tolist() == [0x72, 0xC1]  # [1.0, 6.0] -> 0x72 in ModelOpt, CT, torchao


def test_pack_matches_compressed_tensors():
    from compressed_tensors.compressors.nvfp4.helpers import (
        pack_fp4_to_uint8,
        unpack_fp4_from_uint8,
    )

    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (64, 128), generator=g, dtype=torch.uint8)
    # -0.0 (code 8) is a documented difference: CT packs it as 0x8 (signbit), we as 0x0
    codes[codes == 8] = 0
    on_grid = e2m1_decode(codes)
    ours = pack_e2m1(e2m1_encode(on_grid))
    assert torch.equal(ours, pack_fp4_to_uint8(on_grid))
    back = unpack_fp4_from_uint8(ours, 64, 128, dtype=torch.float32)
    assert torch.equal(back, dequant_e2m1_packed(ours))


def test_negative_zero_is_the_one_on_grid_difference_with_compressed_tensors():
    from compressed_tensors.compressors.nvfp4.helpers import pack_fp4_to_uint8

    x = torch.tensor([[-0.0, 1.0]])
    assert pack_fp4_to_uint8(x).tolist() == [[0x28]]  # CT: signbit -> -0 code
    assert pack_e2m1(e2m1_encode(x)).tolist() == [[0x20]]  # ours / ModelOpt: +0 code


def test_compressed_tensors_pack_rounds_ties_down_we_do_not():
    """CT's pack_fp4_to_uint8 takes argmin distance: off-grid ties go to the lower value.

    CT only packs values already rounded by its RNE ``cast_to_fp4``, so in its own
    pipeline this never shows; we round RNE like ModelOpt, ml_dtypes and PTX cvt.rn.
    """
    from compressed_tensors.compressors.nvfp4.helpers import pack_fp4_to_uint8

    x = torch.tensor([[0.75, 1.75, 3.5, 0.0]])
    assert unpack_e2m1(pack_fp4_to_uint8(x)).tolist() == [[1, 3, 5, 0]]
    assert unpack_e2m1(pack_e2m1(e2m1_encode(x))).tolist() == [[2, 4, 6, 0]]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 255), min_size=1, max_size=64))
def test_pack_unpack_round_trip(raw):
    packed = torch.tensor(raw, dtype=torch.uint8)
    codes = unpack_e2m1(packed)
    assert codes.shape[-1] == 2 * packed.shape[-1]
    assert torch.equal(pack_e2m1(codes), packed)


def test_output_is_packed_not_one_byte_per_value():
    """Regression: unpacked codes written into a packed buffer."""
    x = torch.randn(4, 64)
    packed = pack_e2m1(e2m1_encode(x))
    assert packed.shape == (4, 32) and packed.dtype == torch.uint8
    unpacked_as_bytes = e2m1_encode(x)  # what the bug stored: one code per byte
    wrong = dequant_e2m1_packed(unpacked_as_bytes[:, :32])
    right = dequant_e2m1_packed(packed)
    assert not torch.equal(wrong, right)


def test_odd_length_is_a_clear_error():
    with pytest.raises(FormatError, match="codes: expected an even last dimension"):
        pack_e2m1(torch.zeros(3, dtype=torch.uint8))


def test_float4_storage_dtype_unpacks():
    fp4 = getattr(torch, "float4_e2m1fn_x2", None)
    if fp4 is None:
        pytest.skip("torch without float4_e2m1fn_x2")
    packed = torch.tensor([0x72], dtype=torch.uint8)
    assert unpack_e2m1(packed.view(fp4)).tolist() == [2, 7]

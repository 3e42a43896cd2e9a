"""MXFP4, FP8 128x128 blocks and the conversions between formats."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from oracles import modelopt_mxfp4

from dsv4_nvfp4.formats import (
    FormatError,
    ScaleFormat,
    decode_ue4m3,
    decode_ue8m0,
    dequantize_fp8_block,
    dequantize_mxfp4,
    e2m1_decode,
    mxfp4_to_nvfp4_lossless,
    nvfp4_to_bf16,
    nvfp4_to_fp8_block,
    pack_e2m1,
    quantize_fp8_block,
    quantize_mxfp4,
    quantize_nvfp4_weight,
    unpack_e2m1,
)

pytestmark = pytest.mark.cpu


def test_mxfp4_scales_match_modelopt_and_values_match_off_ties():
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(7))
    qt, mo_scale = modelopt_mxfp4().quantize(w.clone(), 32)
    packed, scale = quantize_mxfp4(w)
    assert torch.equal(scale, mo_scale.reshape(scale.shape))
    ours = e2m1_decode(unpack_e2m1(packed))
    theirs = e2m1_decode(unpack_e2m1(qt._quantized_data))
    scaled = w / decode_ue8m0(scale).repeat_interleave(32, -1)
    on_tie = torch.isin(scaled.abs(), torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]))
    # ModelOpt's MXFP4 rounds ties down (strict >) and gives zeros the sign bit; values agree
    assert torch.equal(ours[~on_tie], theirs[~on_tie])
    assert torch.equal(dequantize_mxfp4(packed, scale), ours * decode_ue8m0(scale)
                       .repeat_interleave(32, -1))


def test_mxfp4_accepts_e8m0_dtype_and_checks_shapes():
    packed, scale = quantize_mxfp4(torch.randn(4, 64))
    a = dequantize_mxfp4(packed, scale)
    b = dequantize_mxfp4(packed.view(torch.int8).view(torch.uint8),
                         scale.view(torch.float8_e8m0fnu))
    assert torch.equal(a, b)
    with pytest.raises(FormatError, match=r"scale: expected shape \(4, 2\)"):
        dequantize_mxfp4(packed, scale[:, :1])


@pytest.mark.parametrize("fmt", list(ScaleFormat))
def test_fp8_block_round_trip(fmt):
    w = torch.randn(300, 200, generator=torch.Generator().manual_seed(8)) * 0.05
    w[:128, :128] = 0  # an all-zero tile
    q, s = quantize_fp8_block(w, scale_format=fmt)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (3, 2)
    if fmt is ScaleFormat.UE8M0:
        assert s.dtype == torch.uint8 and int(s[0, 0]) == 127  # zero tile -> 2^0
        scale = decode_ue8m0(s)
    else:
        assert s.dtype == torch.float32 and float(s[0, 0]) == 1.0
        scale = s
    # no element saturates: |w / scale| <= 448 in every tile
    full = scale.repeat_interleave(128, 0).repeat_interleave(128, 1)[:300, :200]
    assert float((w / full).abs().max()) <= 448
    deq = dequantize_fp8_block(q, s)
    # e4m3 has 3 mantissa bits: relative error per element <= 2^-4 (normals)
    normal = (w / full).abs() >= 2**-6
    assert bool(((deq - w).abs()[normal] <= (w.abs() * 2**-4)[normal] * (1 + 1e-6)).all())
    assert torch.equal(q.float() * full, deq)


def test_ue8m0_fp8_scale_is_the_round_up_power_of_two():
    w = torch.zeros(128, 128)
    w[0, 0] = 449.0  # needs 2^1
    q, s = quantize_fp8_block(w)
    assert int(s[0, 0]) == 128 and float(dequantize_fp8_block(q, s)[0, 0]) == 448.0


# --- the lossless MXFP4 -> NVFP4 cast ------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(st.integers(1, 6), st.integers(1, 4), st.integers(100, 140), st.integers(0, 17),
       st.integers(0, 2**31 - 1))
def test_lossless_cast_reproduces_mxfp4_exactly(rows, kblocks, base, spread, seed):
    g = torch.Generator().manual_seed(seed)
    packed = torch.randint(0, 256, (rows, 16 * kblocks), generator=g, dtype=torch.uint8)
    scale = (base - torch.randint(0, spread + 1, (rows, kblocks), generator=g)).to(torch.uint8)
    nv, lossy = mxfp4_to_nvfp4_lossless(packed, scale)
    assert lossy == 0
    assert torch.equal(nv.packed, packed)  # nibbles byte-identical
    assert torch.equal(nv.dequantize(), dequantize_mxfp4(packed, scale))
    ws = nv.block_scale.view(torch.uint8)
    assert int(ws.max()) <= 0x78  # powers of two <= 256
    mant, _ = torch.frexp(decode_ue4m3(ws))
    assert bool((mant == 0.5).all())  # every block scale an exact power of two
    assert float(nv.global_scale) == 2.0 ** (int(scale.max()) - 127 - 8)


def test_lossless_cast_counts_blocks_it_cannot_keep():
    packed = torch.full((1, 48), 0x11, dtype=torch.uint8)  # every value 0.5
    packed[0, 32:] = 0  # the third block is all zero
    scale = torch.tensor([[140, 140 - 20, 140 - 30]], dtype=torch.uint8)  # spreads 20, 30
    nv, lossy = mxfp4_to_nvfp4_lossless(packed, scale)
    # block 1: 0.5·2^-7 relative to the max needs scale 2^-12 < 2^-9 -> values halve.. lost
    # block 2: all zeros -> exact despite the spread
    assert lossy == 1
    assert decode_ue4m3(nv.block_scale)[0].tolist() == [256.0, 256.0] + [2.0**-9] * 4


def test_lossless_cast_rejects_nan_scales():
    with pytest.raises(FormatError, match="0xFF"):
        mxfp4_to_nvfp4_lossless(torch.zeros(1, 16, dtype=torch.uint8),
                                torch.tensor([[255]], dtype=torch.uint8))


def test_nvfp4_dense_conversions_report_their_error():
    w = torch.randn(256, 384, generator=torch.Generator().manual_seed(9)) * 0.02
    t = quantize_nvfp4_weight(w)
    ref = t.dequantize()
    q, s, err = nvfp4_to_fp8_block(t)
    assert s.dtype == torch.uint8 and s.shape == (2, 3)
    back = dequantize_fp8_block(q, s)
    assert err.max_abs == float((back - ref).abs().max())
    assert 0 < err.max_rel < 2**-4  # e4m3: 3 mantissa bits
    bf, err_bf = nvfp4_to_bf16(t)
    assert bf.dtype == torch.bfloat16
    assert 0 <= err_bf.max_rel <= 2**-8  # bf16: 7 mantissa bits, RNE
    assert err_bf.rel_l2 < 2**-8


def test_on_grid_codes_pack_to_the_same_bytes_after_the_cast():
    codes = torch.arange(16, dtype=torch.uint8).repeat(2)
    packed = pack_e2m1(codes).reshape(1, 16)
    nv, _ = mxfp4_to_nvfp4_lossless(packed, torch.tensor([[127]], dtype=torch.uint8))
    assert torch.equal(unpack_e2m1(nv.packed).flatten(), codes)


def test_pair_table_dequant_equals_nibble_decode():
    from dsv4_nvfp4.formats import dequant_e2m1_packed

    b = torch.arange(256, dtype=torch.uint8).reshape(16, 16)
    assert torch.equal(dequant_e2m1_packed(b), e2m1_decode(unpack_e2m1(b)))
    assert torch.equal(dequant_e2m1_packed(b.view(torch.int8)), e2m1_decode(unpack_e2m1(b)))


def test_tile_view_equals_an_expanded_scale():
    w = torch.randn(300, 200, generator=torch.Generator().manual_seed(13))
    q, s = quantize_fp8_block(w, scale_format=ScaleFormat.FP32)
    full = s.repeat_interleave(128, 0).repeat_interleave(128, 1)[:300, :200]
    assert torch.equal(q, (w / full).clamp(-448, 448).to(torch.float8_e4m3fn))
    assert torch.equal(dequantize_fp8_block(q, s), q.float() * full)

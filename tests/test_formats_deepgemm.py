"""DeepGEMM scale-factor/weight layouts, against sgl-deep-gemm's pure-torch helpers and
the published test vectors."""

from __future__ import annotations

import pytest
import torch
from bitwise import assert_bitwise_equal
from oracles import sgl_math, sgl_mega

from dsv4_nvfp4.formats import (
    FormatError,
    deinterleave_gate_up,
    encode_ue4m3,
    from_mn_major,
    interleave_gate_up,
    nvfp4_sf_to_deepgemm,
    pack_sf_bytes_to_int32,
    quantize_nvfp4_weight,
    to_mn_major_tma_aligned,
    transform_nvfp4_for_mega_moe,
    unpack_sf_int32_to_bytes,
    untransform_nvfp4_from_mega_moe,
    utccp_transpose_sf,
    utccp_untranspose_sf,
)

pytestmark = pytest.mark.cpu

E, H, I = 2, 7168, 3072  # noqa: E741 — DeepSeek V4 Pro expert shapes (2 experts)


def test_sf_word_byte_order():
    sf = encode_ue4m3(torch.tensor([[1.0, 0.0, 2.0, 0.1015625]]))
    word = pack_sf_bytes_to_int32(sf)
    assert word.dtype == torch.int32 and word.shape == (1, 1)
    assert int(word[0, 0]) & 0xFFFFFFFF == 0x1D400038  # byte i = group i, little-endian
    assert torch.equal(word, sgl_math().pack_ue4m3_to_int(sf.float()))


def test_eight_scale_bytes_fill_two_words_without_a_shift_by_32():
    """Regression: shifting byte 4 by 32 bits (poison / wrap) must be impossible."""
    b = torch.arange(1, 9, dtype=torch.uint8).reshape(1, 8)
    words = pack_sf_bytes_to_int32(b)
    assert [int(w) & 0xFFFFFFFF for w in words[0]] == [0x04030201, 0x08070605]
    wrapped = sum(int(v) << ((8 * i) % 32) for i, v in enumerate(b[0]))  # the buggy packing
    assert wrapped & 0xFFFFFFFF != 0x04030201
    assert torch.equal(unpack_sf_int32_to_bytes(words), b)


def test_group_count_not_multiple_of_four_is_zero_padded():
    b = torch.tensor([[1, 2, 3, 4, 5, 6]], dtype=torch.uint8)
    words = pack_sf_bytes_to_int32(b)
    assert [int(w) for w in words[0]] == [0x04030201, 0x00000605]
    assert torch.equal(unpack_sf_int32_to_bytes(words, 6), b)


def test_unpack_reads_a_one_word_mn_major_tensor():
    """K/64 == 1 (e.g. a 128-wide MXFP8 shared-expert down projection): [E, MN, 1] MN-major."""
    b = torch.arange(2 * 128 * 4, dtype=torch.int32).remainder(251).to(torch.uint8)
    b = b.reshape(2, 128, 4)
    mn = to_mn_major_tma_aligned(pack_sf_bytes_to_int32(b))
    assert mn.shape == (2, 128, 1) and mn.stride(-1) == 128 and mn.stride(-2) == 1
    assert torch.equal(unpack_sf_int32_to_bytes(mn), b)


def test_mn_major_tma_aligned_strides_and_inverse():
    sf = torch.arange(2 * 250 * 7, dtype=torch.int32).reshape(2, 250, 7)
    mn = to_mn_major_tma_aligned(sf)
    assert mn.shape == sf.shape and mn.stride() == (7 * 252, 1, 252)  # align(250, 4) = 252
    assert torch.equal(mn, sf) and torch.equal(from_mn_major(mn), sf)
    assert from_mn_major(mn).is_contiguous()


def test_sf_layout_matches_sgl_transform():
    w = torch.randn(E, 256, 7168, generator=torch.Generator().manual_seed(10)) * 0.02
    sf = quantize_nvfp4_weight(w).block_scale
    ours = nvfp4_sf_to_deepgemm(sf)
    theirs = sgl_math().transform_ue4m3_sf_into_required_layout(sf.float(), 256)
    assert_bitwise_equal(ours, theirs, "MN-major SF", check_strides=True)


def test_interleave_matches_upstream_gran8_and_round_trips():
    t = torch.arange(E * 2 * 64 * 3, dtype=torch.int32).reshape(E, 128, 3)
    ours = interleave_gate_up(t)
    assert torch.equal(ours, sgl_mega()._interleave_weights(t))  # same as upstream 0274ad7b
    rows = ours[0, :, 0] // 3
    assert rows[:16].tolist() == [*range(8), *range(64, 72)]
    assert torch.equal(deinterleave_gate_up(ours), t)


def test_sgl_nvfp4xnvfp4_interleave_differs_from_upstream():
    """sgl's fork interleaves even/odd rows for nvfp4xnvfp4; upstream (our pin) does not."""
    t = torch.arange(64, dtype=torch.int32).reshape(1, 64, 1)
    sgl_rows = sgl_mega()._interleave_weights_packed_fp4(t)[0, :16, 0].tolist()
    ours_rows = interleave_gate_up(t)[0, :16, 0].tolist()
    assert sgl_rows == [0, 2, 4, 6, 8, 10, 12, 14, 32, 34, 36, 38, 40, 42, 44, 46]
    assert ours_rows == [0, 1, 2, 3, 4, 5, 6, 7, 32, 33, 34, 35, 36, 37, 38, 39]


def test_utccp_transpose_matches_sgl_and_round_trips():
    sf = to_mn_major_tma_aligned(torch.arange(E * 256 * 5, dtype=torch.int32).reshape(E, 256, 5))
    ours = utccp_transpose_sf(sf)
    assert_bitwise_equal(ours, sgl_mega()._transpose_sf_for_utccp(sf), "UTCCP", check_strides=True)
    assert ours[0, :6, 0].tolist() == [0, 160, 320, 480, 5, 165]  # rows 0, 32, 64, 96, 1, 33
    assert torch.equal(utccp_untranspose_sf(ours), sf)
    with pytest.raises(FormatError, match="MN a multiple of 128"):
        utccp_transpose_sf(torch.zeros(1, 64, 1, dtype=torch.int32))


@pytest.fixture(scope="module")
def dsv4_experts():
    g = torch.Generator().manual_seed(11)
    w13 = quantize_nvfp4_weight(torch.randn(E, 2 * I, H, generator=g) * 0.02)
    w2 = quantize_nvfp4_weight(torch.randn(E, H, I, generator=g) * 0.02)
    return w13, w2


def test_mega_moe_transform_at_dsv4_pro_shapes_matches_sgl(dsv4_experts):
    w13, w2 = dsv4_experts
    (l1, l1_sf), (l2, l2_sf) = transform_nvfp4_for_mega_moe(
        w13.packed, w13.block_scale, w2.packed, w2.block_scale)
    assert l1.shape == (E, 2 * I, H // 2) and l1.dtype == torch.int8
    assert l1_sf.shape == (E, 2 * I, H // 64) and l1_sf.stride()[1] == 1
    assert l2_sf.shape == (E, H, I // 64) and l2_sf.stride()[1] == 1
    m = sgl_math()
    sf13 = m.transform_ue4m3_sf_into_required_layout(w13.block_scale.float(), 2 * I)
    sf2 = m.transform_ue4m3_sf_into_required_layout(w2.block_scale.float(), H)
    # the gran-8 ('fp8xfp4') branch of sgl's transform is upstream's only branch
    (r1, r1_sf), (r2, r2_sf) = sgl_mega().transform_weights_for_mega_moe(
        (w13.packed.view(torch.int8), sf13), (w2.packed.view(torch.int8), sf2),
        mma_type="fp8xfp4")
    assert_bitwise_equal(l1, r1, "L1 weights")
    assert_bitwise_equal(l1_sf, r1_sf, "L1 SF", check_strides=True)
    assert_bitwise_equal(l2, r2, "L2 weights")
    assert_bitwise_equal(l2_sf, r2_sf, "L2 SF", check_strides=True)
    # sgl's SF-only helper uses its even/odd interleave for L1, but L2 is the same
    _, s2 = sgl_mega().transform_scales_for_mega_moe(sf13, sf2)
    assert_bitwise_equal(l2_sf, s2, "L2 SF (transform_scales_for_mega_moe)")
    back = untransform_nvfp4_from_mega_moe((l1, l1_sf), (l2, l2_sf))
    for got, want, name in zip(back, (w13.packed, w13.block_scale, w2.packed, w2.block_scale),
                               ("w13", "w13_sf", "w2", "w2_sf"), strict=True):
        assert_bitwise_equal(got, want, f"inverse {name}")

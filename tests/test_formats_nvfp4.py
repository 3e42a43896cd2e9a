"""NVFP4 two-level quantization, bit-exact against ModelOpt and compressed-tensors."""

from __future__ import annotations

import pytest
import torch
from bitwise import assert_bitwise_equal
from hypothesis import given, settings
from hypothesis import strategies as st
from oracles import modelopt_nvfp4, sgl_math

from dsv4_nvfp4.formats import (
    E4M3_MAX,
    FormatError,
    decode_ue4m3,
    dequantize_nvfp4,
    e2m1_decode,
    encode_ue4m3,
    quantize_nvfp4_activation_per_token,
    quantize_nvfp4_activation_static,
    quantize_nvfp4_weight,
    unpack_e2m1,
)

pytestmark = pytest.mark.cpu


def adversarial_weights() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    gauss = torch.randn(128, 512, generator=g) * 0.02
    zeros_block = gauss.clone()
    zeros_block[3, 16:32] = 0  # one all-zero block -> ModelOpt scale 1.0 (0x38)
    zeros_block[7] = 0  # an all-zero row
    amax_last = gauss.clone()
    amax_last[-1, -1] = 1.0  # tensor amax in the very last block
    subnormal = gauss.clone()
    subnormal[5, :16] = 1e-7  # block scale far below 2^-6: subnormal / clamped to 2^-9
    subnormal[0, 0] = 10.0
    big = gauss * 1e5  # amax far above 2688
    # exact ties: a block whose values sit on E2M1 midpoints after scaling (amax 6 -> s=1)
    ties = torch.zeros(2, 32)
    ties[0, :16] = torch.tensor([6, .25, .75, 1.25, 1.75, 2.5, 3.5, 5, -.25, -.75, -1.25,
                                 -1.75, -2.5, -3.5, -5, 0.])
    ties[1, :16] = ties[0, :16] * 1.75
    return {"gaussian": gauss, "zero_block": zeros_block, "amax_in_last_block": amax_last,
            "subnormal_scales": subnormal, "amax_above_2688": big, "exact_ties": ties,
            "bf16": gauss.to(torch.bfloat16)}


@pytest.mark.parametrize("case", list(adversarial_weights()))
def test_weight_quantization_is_bit_exact_with_modelopt(case):
    w = adversarial_weights()[case]
    qt, ws, ws2 = modelopt_nvfp4().quantize(w.clone(), 16)
    ours = quantize_nvfp4_weight(w)
    assert_bitwise_equal(ours.packed, qt._quantized_data, f"{case}: packed")
    assert_bitwise_equal(ours.block_scale, ws, f"{case}: weight_scale")
    assert_bitwise_equal(ours.global_scale.reshape(()), ws2.float().reshape(()),
                         f"{case}: weight_scale_2")
    theirs = qt.dequantize(torch.float32, scale=ws, double_scale=ws2, block_sizes={-1: 16})
    # values equal; ModelOpt's table decodes code 8 as +0.0 where we give -0.0
    assert torch.equal(ours.dequantize(torch.float32), theirs), f"{case}: dequantized"


def test_modelopt_scale_facts():
    w = adversarial_weights()["zero_block"]
    t = quantize_nvfp4_weight(w)
    b = t.block_scale.view(torch.uint8)
    assert int(b[3, 1]) == 0x38  # all-zero block -> 1.0
    assert int(b.max()) == 0x7E  # the block holding the tensor amax -> 448
    assert torch.equal(t.global_scale, w.abs().amax().float() / 2688)


def test_tie_block_codes():
    w = adversarial_weights()["exact_ties"]
    t = quantize_nvfp4_weight(w)
    # tensor amax 10.5 -> ws2 = 10.5/2688 = 2^-8 exactly; row 0 block amax 6 -> scale 256,
    # so x/s = x: every E2M1 midpoint is hit exactly and must round half to even
    assert float(t.global_scale) == 2.0**-8
    assert decode_ue4m3(t.block_scale)[:, 0].tolist() == [256.0, 448.0]
    want = [6.0, 0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, -0.0, -1.0, -1.0, -2.0, -2.0, -4.0, -4.0, 0.0]
    for row in range(2):  # row 1 = row 0 x 1.75, scale 1.75: the same ties
        assert e2m1_decode(unpack_e2m1(t.packed))[row, :16].tolist() == want


def test_values_match_compressed_tensors():
    from compressed_tensors.quantization import preset_name_to_scheme
    from compressed_tensors.quantization.lifecycle.forward import quantize
    from compressed_tensors.quantization.utils import calculate_qparams, generate_gparam

    args = preset_name_to_scheme("NVFP4", ["Linear"]).weights
    w = adversarial_weights()["gaussian"]
    groups = w.view(w.shape[0], -1, 16)
    gs = generate_gparam(w.min(), w.max())
    scale, zp = calculate_qparams(groups.amin(-1), groups.amax(-1), args, global_scale=gs)
    q = quantize(w, scale, zp, args, global_scale=gs)
    ours = quantize_nvfp4_weight(w)
    assert torch.equal(scale, decode_ue4m3(ours.block_scale))
    # CT returns on-grid values (-0.0 for small negatives); compare values, not sign of zero
    assert torch.equal(e2m1_decode(unpack_e2m1(ours.packed)), q)
    # CT's global scale is 1/ws2 (computed as 2688/amax): equal up to one fp32 rounding
    assert torch.allclose(1 / gs, ours.global_scale, rtol=2**-23, atol=0)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 8), st.integers(1, 8), st.floats(1e-6, 1e4), st.integers(0, 2**31 - 1))
def test_dequant_error_is_within_one_step_of_the_block_scale(rows, kblocks, mag, seed):
    w = torch.randn(rows, 16 * kblocks, generator=torch.Generator().manual_seed(seed)) * mag
    t = quantize_nvfp4_weight(w)
    s = (decode_ue4m3(t.block_scale) * t.global_scale).repeat_interleave(16, dim=-1)
    err = (t.dequantize() - w).abs()
    # the E2M1 grid step is at most 2 (4 -> 6): RNE error <= 1 step/2 = 1·s; scale
    # rounding can push |x/s| to 6·(1+2^-4) and saturate, still within 1·s
    assert bool((err <= s * (1 + 1e-6)).all())


def test_folding_the_global_scale_into_block_scales_underflows():
    """Regression: storing e4m3(ws·ws2) loses whole blocks."""
    # small-magnitude weights (std 1e-3): block_amax/6 < 2^-9, E4M3's smallest subnormal
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(3)) * 1e-3
    t = quantize_nvfp4_weight(w)
    folded = encode_ue4m3(decode_ue4m3(t.block_scale) * t.global_scale)
    assert float(t.global_scale) < 2**-9
    zero_blocks = int((folded.view(torch.uint8) == 0).sum())
    assert zero_blocks > 0.5 * folded.numel()  # most blocks flushed to zero
    broken = dequantize_nvfp4(t.packed, folded, 1.0)
    rel_broken = float((broken - w).norm() / w.norm())
    rel_ours = float((t.dequantize() - w).norm() / w.norm())
    assert rel_ours < 0.12 and rel_broken > 0.5, (rel_ours, rel_broken)


def test_k_not_multiple_of_16_is_a_clear_error():
    with pytest.raises(FormatError, match=r"weight: expected last dimension a multiple of 16"):
        quantize_nvfp4_weight(torch.randn(4, 24))


def test_shape_mismatch_in_dequant_names_the_argument():
    t = quantize_nvfp4_weight(torch.randn(4, 32))
    with pytest.raises(FormatError, match=r"block_scale: expected shape \(4, 2\)"):
        dequantize_nvfp4(t.packed, t.block_scale[:, :1], t.global_scale)


# --- activations ---------------------------------------------------------------------

def test_static_activation_with_unit_scale_matches_sgl_single_level():
    """With input_scale = 1 the static convention is sgl's per_token_cast_to_nvfp4."""
    x = torch.randn(64, 7168, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    x[0, :16] = 0  # zero block: SF byte 0, codes 0
    q_ref, sf_ref = sgl_math().per_token_cast_to_nvfp4(x, 16)
    packed, sf = quantize_nvfp4_activation_static(x, 1.0)
    assert torch.equal(sf.float(), sf_ref)
    # sgl drops the sign of codes that round to zero (0x8 -> 0x0); we keep -0 like ModelOpt
    ours_codes = unpack_e2m1(packed)
    theirs_codes = unpack_e2m1(q_ref.view(torch.uint8))
    neg_zero = ours_codes == 0x8
    assert torch.equal(torch.where(neg_zero, torch.zeros_like(ours_codes), ours_codes),
                       theirs_codes)


def test_static_activation_scale_formula():
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(5))
    input_scale = float(x.abs().max()) / 2688  # a calibrated scale: amax maps to SF 448
    packed, sf = quantize_nvfp4_activation_static(x, input_scale)
    g = 1.0 / torch.tensor(input_scale)
    amax16 = x.view(8, 4, 16).abs().amax(-1)
    assert torch.equal(sf, encode_ue4m3((amax16 / 6) * g))
    assert decode_ue4m3(sf).max() <= E4M3_MAX
    deq = dequantize_nvfp4(packed, sf, input_scale)
    assert float((deq - x).norm() / x.norm()) < 0.12


def test_static_activation_saturates_instead_of_nan_above_calibration():
    x = torch.full((1, 16), 1000.0)
    packed, sf = quantize_nvfp4_activation_static(x, 0.01)  # G=100 -> G·amax/6 >> 448
    assert int(sf.view(torch.uint8)[0, 0]) == 0x7E
    assert unpack_e2m1(packed).unique().tolist() == [7]


def test_per_token_two_level_formula_and_edge_rows():
    x = torch.randn(6, 7168, generator=torch.Generator().manual_seed(6)).to(torch.bfloat16)
    x[1] = 0  # zero row: pts floor 1e-4/2688, SF 0, codes 0
    x[2, :16] = 1e-3  # a tiny block the single-level helper would wipe
    x[3] *= 100  # a row with amax far above 2688? (100·~4.5 = 450; still fine)
    x[4, 5] = 1e4  # amax > 2688
    packed, sf, pts = quantize_nvfp4_activation_per_token(x)
    xf = x.float()
    row_amax = xf.abs().amax(-1)
    assert torch.equal(pts, row_amax.clamp(min=1e-4) / 2688)
    blk = xf.view(6, -1, 16).abs().amax(-1)
    assert torch.equal(sf, encode_ue4m3(blk / (6 * pts[:, None])))
    assert int(sf.view(torch.uint8)[1].max()) == 0 and int(packed[1].max()) == 0
    assert int(sf.view(torch.uint8)[2, 0]) != 0  # tiny block kept (two-level)
    assert not torch.isnan(decode_ue4m3(sf)).any()
    deq = dequantize_nvfp4(packed, sf, 1.0) * pts[:, None]
    rel = (deq - xf).norm() / xf.norm()
    assert float(rel) < 0.12


def test_activation_h_not_multiple_of_16_is_a_clear_error():
    with pytest.raises(FormatError, match="x: expected last dimension a multiple of 16"):
        quantize_nvfp4_activation_per_token(torch.randn(2, 40))
    with pytest.raises(FormatError, match="input_scale: expected a finite value > 0"):
        quantize_nvfp4_activation_static(torch.randn(2, 32), 0.0)


def test_all_zero_tensor_quantizes_to_zeros_not_nan():
    """ModelOpt computes 0/0 here (NaN block scales); we pick global scale 1.0."""
    t = quantize_nvfp4_weight(torch.zeros(4, 32))
    assert float(t.global_scale) == 1.0
    assert t.block_scale.view(torch.uint8).unique().tolist() == [0x38]
    assert int(t.packed.max()) == 0
    assert torch.equal(t.dequantize(), torch.zeros(4, 32))

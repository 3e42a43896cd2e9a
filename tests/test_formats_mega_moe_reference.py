"""The exact pieces of ``formats.mega_moe_reference`` (vLLM 0.34.0's NVFP4 MegaMoE semantics).

Oracles: numpy float32 arithmetic with ml_dtypes' E4M3 and E2M1 casts (round to
nearest even, saturating), written from the formulas of vLLM's staging kernel and
DeepGEMM's L1 epilogue; transformers' own ``DeepseekV4Experts`` clamp; hand-built
rows whose every value is exact. The whole layer is checked against a float64
composition of the documented formula.
"""

from __future__ import annotations

import types

import ml_dtypes
import numpy as np
import pytest
import torch
from bitwise import assert_bitwise_equal

from dsv4_nvfp4.formats import (
    FormatError,
    dequantize_nvfp4,
    mega_moe_stage_tokens,
    nvfp4_mega_moe_reference,
    quantize_nvfp4_activation_per_token,
    quantize_nvfp4_weight,
    unpack_e2m1,
)
from dsv4_nvfp4.formats.mega_moe_reference import (
    mega_moe_l2_activation_scale,
    mega_moe_l2_alpha,
    mega_moe_quantize_fc2_input,
    mega_moe_swiglu,
)

pytestmark = pytest.mark.cpu
F32 = np.float32


def _e4m3(a: np.ndarray) -> np.ndarray:
    return a.astype(ml_dtypes.float8_e4m3fn)


def _e2m1_codes(a: np.ndarray) -> np.ndarray:
    return a.astype(ml_dtypes.float4_e2m1fn).view(np.uint8) & 0xF


def oracle_stage(x: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """vLLM's ``_prepare_megamoe_nvfp4_inputs_kernel`` numbers, in numpy float32."""
    a = x.float().numpy()
    t, h = a.shape
    xs = np.maximum(np.abs(a).max(axis=-1), F32(1e-12)) * F32(1 / 2688)
    v = (a / xs[:, None]).reshape(t, h // 16, 16)
    sf = _e4m3(np.clip(np.abs(v).max(axis=-1) * F32(1 / 6), F32(2**-9), F32(448)))
    codes = _e2m1_codes(v / sf.astype(F32)[..., None]).reshape(t, h)
    codes = np.where(codes == 8, 0, codes)   # vLLM: a value rounding to zero is code 0
    return codes, sf.view(np.uint8), xs


def oracle_fc2(a: torch.Tensor, l2s: float) -> tuple[np.ndarray, np.ndarray]:
    """DeepGEMM's L1-epilogue requantization of the SwiGLU output, in numpy float32."""
    x = a.numpy()
    t, i = x.shape
    blocks = x.reshape(t, i // 16, 16)
    quant_d = F32(6) * F32(l2s)
    sf = _e4m3(np.clip(np.abs(blocks).max(axis=-1) / quant_d, F32(2**-9), F32(448)))
    inv = F32(1) / (sf.astype(F32) * F32(l2s))
    return _e2m1_codes(blocks * inv[..., None]).reshape(t, i), sf.view(np.uint8)


def _rows(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 256, generator=g) * torch.exp(3 * torch.randn(256, 1, generator=g))
    x[0] = 0                      # all-zero row: the 1e-12 floor
    x[1] *= 1e-18                 # tiny row, still above the floor
    x[2, 32:48] = 0               # all-zero block: SF 2^-9
    x[3, 7] = -1e-4 * x[3].abs().max()   # a negative that rounds to zero
    return x.bfloat16()


# --- FC1 staging --------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
def test_staging_matches_numpy_oracle_bit_for_bit(seed):
    x = _rows(seed)
    packed, sf, xs = mega_moe_stage_tokens(x)
    codes, sf_o, xs_o = oracle_stage(x)
    assert_bitwise_equal(xs, torch.from_numpy(xs_o), "x_scales")
    assert_bitwise_equal(sf.view(torch.uint8), torch.from_numpy(sf_o), "SF bytes")
    assert_bitwise_equal(unpack_e2m1(packed), torch.from_numpy(codes.astype(np.uint8)), "codes")
    assert sf.dtype == torch.float8_e4m3fn and packed.shape == (256, 128) and sf.shape == (256, 16)


def test_staging_hand_row_every_code_point_and_tie():
    # amax 168 = 2688/16: x_scale is exactly 2^-4, so v = 16x and every quotient is exact.
    ties = [168, 7, 21, 35, 49, 70, 98, 140, -7, -21, -35, -49, -70, -98, -140, 0]
    points = [0, 1, 2, 3, 4, 6, 8, 12, -1, -2, -3, -4, -6, -8, -12, 0]   # /16: code values x 2
    tiny = [-1 / 256, 1 / 1024, -1 / 8192] + [0] * 13
    row = torch.tensor([ties, [p / 16 for p in points], [0] * 16, tiny]).reshape(1, 64)
    packed, sf, xs = mega_moe_stage_tokens(row.bfloat16())
    assert xs.tolist() == [0.0625]
    # 448 (0x7E); 2.0 (0x40); all-zero block 2^-9 (0x01); 0.0104 rounds down to 5·2^-9 (0x05)
    assert sf.view(torch.uint8).tolist() == [[0x7E, 0x40, 0x01, 0x05]]
    codes = unpack_e2m1(packed)[0].tolist()
    # x/28: 6, and the ties 0.25 0.75 1.25 1.75 2.5 3.5 5 -> even codes; -0.25 -> 0, not 8
    assert codes[:16] == [7, 0, 2, 2, 4, 4, 6, 6, 0, 0xA, 0xA, 0xC, 0xC, 0xE, 0xE, 0]
    assert codes[16:32] == [0, 1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 13, 14, 15, 0]
    assert codes[32:48] == [0] * 16
    # SF rounded down: -0.0625/(5·2^-9) = -6.4 saturates to -6; 1.6 -> 1.5; -0.2 -> 0 (not 8)
    assert codes[48:52] == [0xF, 3, 0, 0]


def test_zero_row_uses_the_1e12_floor():
    _, sf, xs = mega_moe_stage_tokens(torch.zeros(2, 32, dtype=torch.bfloat16))
    assert_bitwise_equal(xs, torch.full((2,), F32(1e-12) * F32(1 / 2688)), "x_scales")
    assert sf.view(torch.uint8).unique().tolist() == [0x01]


def test_staging_is_not_the_per_token_quantizer_of_formats():
    """vLLM's staging has its own arithmetic: the formats per-token quantizer (SGLang's
    DeepGEMM fork convention) is not bit-identical to it, so the reference does not reuse it."""
    x = _rows(0)
    packed, sf, xs = mega_moe_stage_tokens(x)
    p_sgl, sf_sgl, pts = quantize_nvfp4_activation_per_token(x)
    amax = x.float().abs().amax(dim=-1)
    # token scale: a multiply by fp32(1/2688) here, a division there (and floor 1e-4 vs 1e-12)
    assert torch.equal(xs[3:], amax[3:] * torch.tensor(1 / 2688, dtype=torch.float32))
    assert torch.equal(pts[3:], amax[3:] / 2688)
    assert int((xs[3:] != pts[3:]).sum()) > 0
    assert float(pts[0]) == pytest.approx(1e-4 / 2688) and float(xs[0]) < 1e-15
    # all-zero block: SF 0x01 here, 0x00 there; a negative rounding to zero: 0 here, 8 there
    assert int(sf.view(torch.uint8)[2, 2]) == 0x01 and int(sf_sgl.view(torch.uint8)[2, 2]) == 0
    assert int(unpack_e2m1(packed)[3, 7]) == 0 and int(unpack_e2m1(p_sgl)[3, 7]) == 8


@pytest.mark.parametrize(("shape", "what"), [((64,), "2-D"), ((2, 24), "multiple of 16")])
def test_staging_rejects_bad_shapes(shape, what):
    with pytest.raises(FormatError, match=what):
        mega_moe_stage_tokens(torch.zeros(shape, dtype=torch.bfloat16))


# --- layer-wide FC2 scale, alphas, FC2 requantization -------------------------------------


def test_l2_activation_scale_is_the_max_over_experts_and_alpha_is_one_fp32_product():
    w2_in = torch.tensor([1.25e-4, 3.1e-4, 2.0e-4], dtype=torch.float32)
    l2s = mega_moe_l2_activation_scale(w2_in)
    assert l2s == float(w2_in[1])                      # the fp32 value itself, exactly
    assert mega_moe_l2_activation_scale(torch.zeros(4)) == 1.0   # vLLM: `or 1.0`
    ws2 = torch.rand(3, generator=torch.Generator().manual_seed(2)) * 1e-3
    expect = torch.from_numpy(ws2.numpy() * F32(l2s))
    assert_bitwise_equal(mega_moe_l2_alpha(ws2, l2s), expect, "l2_alpha")
    with pytest.raises(FormatError, match="w2_input_scale"):
        mega_moe_l2_activation_scale(torch.tensor([1e-4, -1e-4]))


@pytest.mark.parametrize("shrink", [1.0, 8.0])
def test_fc2_requantization_matches_numpy_oracle(shrink):
    g = torch.Generator().manual_seed(3)
    a = torch.randn(128, 64, generator=g) * torch.exp(torch.randn(128, 1, generator=g))
    a[5, 16:32] = 0
    l2s = float(a.abs().max()) / 2688 / shrink         # shrink 8: the largest blocks saturate
    packed, sf = mega_moe_quantize_fc2_input(a, l2s)
    codes, sf_o = oracle_fc2(a, l2s)
    assert_bitwise_equal(sf.view(torch.uint8), torch.from_numpy(sf_o), "SF bytes")
    assert_bitwise_equal(unpack_e2m1(packed), torch.from_numpy(codes), "codes")
    assert int(sf.view(torch.uint8)[5, 1]) == 0x01
    beyond = a.abs() > 6 * 448 * l2s                    # larger than any NVFP4 value
    assert bool(beyond.any()) == (shrink > 1)
    deq = dequantize_nvfp4(packed, sf, l2s)
    assert float(deq.abs().max()) <= 6 * 448 * l2s * (1 + 1e-6)   # saturated, never beyond
    if shrink > 1:
        assert torch.equal(unpack_e2m1(packed)[beyond] & 7, torch.full_like(a[beyond], 7,
                                                                             dtype=torch.uint8))


# --- clamped SwiGLU -----------------------------------------------------------------------


def test_swiglu_clamps_gate_from_above_and_up_on_both_sides():
    gate = torch.tensor([20.0, -20.0, 9.9375, 0.5, 3.0], dtype=torch.bfloat16)
    up = torch.tensor([1.0, 1.0, 15.0, -15.0, 2.0], dtype=torch.bfloat16)
    out = mega_moe_swiglu(gate, up, 10.0)
    g = torch.tensor([10.0, -20.0, 9.9375, 0.5, 3.0], dtype=torch.float64)
    u = torch.tensor([1.0, 1.0, 10.0, -10.0, 2.0], dtype=torch.float64)
    assert torch.allclose(out.double(), g * torch.sigmoid(g) * u, rtol=1e-6, atol=0)
    assert abs(float(out[1])) < 1e-7      # silu(-20), not silu(-10) = -4.5e-4
    unclamped = mega_moe_swiglu(gate, up, None)
    assert float(unclamped[0]) == pytest.approx(20 * float(torch.sigmoid(torch.tensor(20.0))))


def test_swiglu_clamp_is_transformers_deepseek_v4():
    mod = pytest.importorskip("transformers.models.deepseek_v4.modeling_deepseek_v4")
    g = torch.Generator().manual_seed(4)
    gate_up = (torch.randn(64, 32, generator=g) * 8).bfloat16()
    this = types.SimpleNamespace(limit=10.0, act_fn=torch.nn.functional.silu)
    theirs = mod.DeepseekV4Experts._apply_gate(this, gate_up.float())
    ours = mega_moe_swiglu(gate_up[:, :16], gate_up[:, 16:], 10.0)
    assert int((gate_up.float().abs() > 10).sum()) > 20          # the clamp acts here
    assert torch.allclose(ours, theirs, rtol=2e-6, atol=1e-6)


# --- the whole layer ----------------------------------------------------------------------

T, H, INTER, E, K = 48, 64, 32, 4, 2


def _layer(seed: int = 5) -> dict:
    g = torch.Generator().manual_seed(seed)
    w13, s13, g13, w2, s2, g2 = [], [], [], [], [], []
    for e in range(E):
        w1, w3 = (torch.randn(INTER, H, generator=g) * 0.3 * (e + 1) for _ in range(2))
        glob = torch.cat([w1, w3]).abs().amax() / 2688          # w1 and w3 share ws2
        q13 = quantize_nvfp4_weight(torch.cat([w1, w3]), glob)
        q2 = quantize_nvfp4_weight(torch.randn(H, INTER, generator=g) * 0.1 / (e + 1))
        w13.append(q13.packed), s13.append(q13.block_scale), g13.append(q13.global_scale)
        w2.append(q2.packed), s2.append(q2.block_scale), g2.append(q2.global_scale)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    ids[3, 1] = -1                                                # an unrouted slot
    return {"hidden_states": (torch.randn(T, H, generator=g) * 2).bfloat16(),
            "topk_ids": ids, "topk_weights": torch.rand(T, K, generator=g) * 1.5,
            "w13": torch.stack(w13), "w13_weight_scale": torch.stack(s13),
            "w13_weight_scale_2": torch.stack(g13), "w2": torch.stack(w2),
            "w2_weight_scale": torch.stack(s2), "w2_weight_scale_2": torch.stack(g2),
            "w2_input_scale": torch.tensor([0.9, 1.3, 0.7, 1.1]) * 1e-3}


def _float64_composition(p: dict, limit: float) -> torch.Tensor:
    """The documented formula with float64 GEMMs and SwiGLU and ModelOpt-order dequant."""
    packed, sf, xs = mega_moe_stage_tokens(p["hidden_states"])
    x = dequantize_nvfp4(packed, sf, 1.0).double() * xs.double().unsqueeze(-1)
    l2s = float(p["w2_input_scale"].max())
    out = torch.zeros(T, H, dtype=torch.float64)
    for t in range(T):
        for k in range(K):
            e = int(p["topk_ids"][t, k])
            if e < 0:
                continue
            w13 = dequantize_nvfp4(p["w13"][e], p["w13_weight_scale"][e],
                                   p["w13_weight_scale_2"][e]).double()
            gu = (x[t] @ w13.T).bfloat16()                      # FC1 output in BF16
            gate = gu[:INTER].double().clamp(max=limit)
            up = gu[INTER:].double().clamp(-limit, limit)
            act = (gate * torch.sigmoid(gate) * up).float().unsqueeze(0)
            a_packed, a_sf = mega_moe_quantize_fc2_input(act, l2s)
            a = dequantize_nvfp4(a_packed, a_sf, l2s).double()
            w2 = dequantize_nvfp4(p["w2"][e], p["w2_weight_scale"][e],
                                  p["w2_weight_scale_2"][e]).double()
            out[t] += float(p["topk_weights"][t, k]) * (a @ w2.T)[0]
    return out


def test_layer_equals_float64_composition_of_the_formula():
    p = _layer()
    ours = nvfp4_mega_moe_reference(**p, swiglu_limit=10.0)
    assert ours.dtype == torch.bfloat16 and ours.shape == (T, H)
    ref = _float64_composition(p, 10.0)
    # Remaining differences: BF16 rounding of each expert's output and of the sum
    # (2^-9 relative each) and, rarely, an FC2 E2M1 code flipped by the fp32 vs float64
    # SwiGLU and the rounding of x_scale·alpha. A wrong gate/up split, alpha or
    # l2_activation_scale gives errors of 10 % to 100 %.
    rel = float((ours.double() - ref).norm() / ref.norm())
    assert rel < 5e-3, rel
    close = (ours.double() - ref).abs() <= 2**-7 * ref.abs() + 1e-3 * ref.abs().max()
    assert float(close.float().mean()) > 0.99


def test_unrouted_slot_and_expert_order_and_default_l2_scale():
    p = _layer()
    out = nvfp4_mega_moe_reference(**p, swiglu_limit=10.0)
    # a negative id contributes nothing: the same as routing that slot with weight 0
    q = dict(p, topk_ids=p["topk_ids"].clone(), topk_weights=p["topk_weights"].clone())
    q["topk_ids"][3, 1], q["topk_weights"][3, 1] = 0, 0.0
    assert torch.equal(nvfp4_mega_moe_reference(**q, swiglu_limit=10.0), out)
    # experts renumbered (tensors and ids together): bit-identical output
    perm = torch.tensor([2, 0, 3, 1])
    inv = torch.argsort(perm)
    r = {k: (v[perm] if k.startswith("w") else v) for k, v in p.items()}
    r["topk_ids"] = torch.where(p["topk_ids"] >= 0, inv[p["topk_ids"].clamp(min=0)], -1)
    assert torch.equal(nvfp4_mega_moe_reference(**r, swiglu_limit=10.0), out)
    # one FC2 scale for the layer: the max over experts unless given
    l2s = float(p["w2_input_scale"].max())
    assert torch.equal(nvfp4_mega_moe_reference(**p, swiglu_limit=10.0,
                                                activation_scale=l2s), out)
    other = nvfp4_mega_moe_reference(**p, swiglu_limit=10.0, activation_scale=l2s / 64)
    assert not torch.equal(other, out)


@pytest.mark.parametrize(("key", "bad", "name"), [
    ("w13_weight_scale", lambda t: t[:, :, :2], "w13_weight_scale"),
    ("w2", lambda t: t[:, :, :8], "w2"),
    ("w2_input_scale", lambda t: t[:3], "w2_input_scale"),
    ("topk_ids", lambda t: t + E, "topk_ids"),
    ("topk_weights", lambda t: t[:, :1], "topk_weights"),
])
def test_layer_rejects_bad_operands(key, bad, name):
    p = _layer()
    p[key] = bad(p[key])
    with pytest.raises(FormatError, match=f"^{name}: expected"):
        nvfp4_mega_moe_reference(**p, swiglu_limit=10.0)

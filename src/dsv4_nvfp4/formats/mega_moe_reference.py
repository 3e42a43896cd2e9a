"""Reference semantics of vLLM 0.34.0's NVFP4 MegaMoE (``nvfp4_mega_moe``), in plain torch.

What is emulated: the routed experts of ``DeepGemmMegaMoEExperts`` with
``weight_format=MEGA_MOE_NVFP4`` — vLLM's input staging
(``vllm/model_executor/layers/fused_moe/prepare_megamoe.py``,
``_prepare_megamoe_nvfp4_inputs_kernel``), the scalars the layer hands the kernel
(``deep_gemm_mega_moe.py``: ``l1_alpha``, ``l2_alpha``, ``l2_activation_scale``,
``use_x_scales=True``) and the vendored DeepGEMM 2.8.1 kernel's epilogues
(``third_party/deep_gemm/include/deep_gemm/impls/sm100_nvfp4_mega_moe.cuh``),
read from the released wheel and re-derived here on top of this package's codecs.
Inputs are checkpoint-layout tensors (the bytes of a layout-B checkpoint, or the
kernel operands decoded with :func:`untransform_nvfp4_from_mega_moe`).

The computation, for token ``t`` routed to expert ``e`` with weight ``w``::

    FC1 staging, per token (the calibrated w1/w3 input_scale plays no part):
        x_scale[t] = max(amax(x[t]), 1e-12) · fp32(1/2688)
        v          = x[t] / x_scale[t]
        SF         = e4m3(clamp(amax16(v) · fp32(1/6), 2⁻⁹, 448))
        codes      = E2M1_RNE(v / SF)
    FC1:   acc     = Σ_k e2m1·SF (x) · e2m1·SF (w13[e])          (fp32 accumulator)
           gate|up = bf16(acc · fp32(x_scale[t] · l1_alpha[e]))   l1_alpha = w13 weight_scale_2
    clamp (bf16):  gate = min(gate, L); up = clamp(up, -L, L)    L = swiglu_limit
    SwiGLU (fp32): a = gate / (1 + exp(-gate)) · up              (unweighted)
    FC2 input, one layer-wide global scale:
        l2s   = max over all experts of w2 input_scale            (l2_activation_scale)
        SF    = e4m3(clamp(amax16(a) / fp32(6 · l2s), 2⁻⁹, 448))
        codes = E2M1_RNE_satfinite(a · fp32(1 / (SF · l2s)))
    FC2:   y_e     = bf16(acc2 · l2_alpha[e])                    l2_alpha = fp32(w2 ws2 · l2s)
    combine:       out[t] = bf16(Σ_j fma(y_{e_j}, w_j, ·))      fp32, in top-k order

The clamp is DeepSeek V4's (transformers ``DeepseekV4Experts._apply_gate``, vLLM
``MegaMoEActivation(clamp=swiglu_limit)``): the gate is clamped from above only,
the up projection on both sides, both before the SiLU.

Exact, bit for bit, by construction: the staging (codes, SF bytes, ``x_scales``),
``l2_activation_scale`` and ``l2_alpha``, the FC2 input's SF bytes and codes for a
given SwiGLU output. Not bit-exact against the GPU kernel, and why: the
accumulators are summed here in float64 and rounded once to fp32 (the tensor
cores sum in fp32 in their own order), the SwiGLU uses torch's ``exp`` and IEEE
division where vLLM's default ``fast_math=True`` uses ``__expf`` and an
approximate reciprocal, and the combine's fused multiply-add is emulated in
float64. Each can move a BF16 rounding or an E2M1 tie by one step; a comparison
against the kernel needs a tolerance of that size, not a bitwise one.
"""

from __future__ import annotations

import torch

from .constants import (
    E2M1_MAX,
    E2M1_SIGN_BIT,
    E4M3_MAX,
    E4M3_MIN_SUBNORMAL,
    MEGA_MOE_TOKEN_AMAX_FLOOR,
    NVFP4_GLOBAL_DIVISOR,
    NVFP4_GROUP,
)
from .deepgemm import pack_sf_bytes_to_int32
from .e2m1 import e2m1_encode, pack_e2m1
from .errors import expect
from .nvfp4 import dequantize_nvfp4
from .scales import as_e4m3, encode_ue4m3

# vLLM 0.34.0 staging: x_scale = max(row_amax, MEGA_MOE_TOKEN_AMAX_FLOOR) * fp32(1/2688).
# (The per-token quantizer of formats.nvfp4 floors at 1e-4 and divides; see
# mega_moe_stage_tokens.)
# fp32(1/2688) = 3.7202381e-04 and fp32(1/6) = 0.16666667: the staging multiplies by
# these rounded reciprocals (Triton constants), it does not divide.
_RCP_GLOBAL_DIVISOR = 1.0 / NVFP4_GLOBAL_DIVISOR
_RCP_E2M1_MAX = 1.0 / E2M1_MAX


def _f32(value: float, like: torch.Tensor) -> torch.Tensor:
    return torch.full((), value, dtype=torch.float32, device=like.device)


def _groups(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(*x.shape[:-1], x.shape[-1] // NVFP4_GROUP, NVFP4_GROUP)


def _nan_to_zero(a: torch.Tensor) -> torch.Tensor:
    """``a`` with NaN replaced by 0: the GPU kernel's ``tl.max`` / ``tl.maximum`` skip NaN."""
    return torch.where(torch.isnan(a), torch.zeros_like(a), a)


def mega_moe_stage_tokens(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """vLLM 0.34.0's per-token NVFP4 staging of the FC1 input (``kNvfp4DynamicToken``).

    Transcribed from vLLM 0.34.0, ``vllm/model_executor/layers/fused_moe/prepare_megamoe.py``,
    ``_prepare_megamoe_nvfp4_inputs_kernel`` (launched by ``prepare_megamoe_nvfp4_inputs``),
    as it runs on an NVIDIA GPU: byte-identical to that kernel for every input, inf and
    NaN included (``tests/gpu/test_megamoe_staging_gpu.py`` compares them).

    ``x`` is ``[T, H]`` (bf16 in vLLM), ``H % 16 == 0``. Returns packed E2M1 uint8
    ``[T, H/2]`` (element ``2i`` in the low nibble), E4M3 block scales ``[T, H/16]``
    (row-major; vLLM packs four per int32) and ``x_scales`` fp32 ``[T]``, with
    ``x[t] ≈ e2m1 · fp32(SF) · x_scales[t]``::

        x_scales = max(amax(|x|), 1e-12) · fp32(1/2688)
        v        = x / x_scales                                (IEEE division)
        SF       = e4m3(clamp(amax16(|v|) · fp32(1/6), 2⁻⁹, 448))
        codes    = E2M1_RNE(v / fp32(SF)), sign only on a nonzero magnitude, NaN → 0

    The kernel's maxima (``tl.max``, ``tl.maximum``) skip NaN, so NaN elements take no
    part in ``amax`` and ``amax16``; a row holding ±inf gets ``x_scales`` inf, every
    ``v`` 0 or NaN, every SF 2⁻⁹ and every code 0.

    This is not the arithmetic of :func:`quantize_nvfp4_activation_per_token` (the
    SGLang-fork convention): the token scale multiplies by ``fp32(1/2688)`` with a
    ``1e-12`` floor (there: divides, ``1e-4`` floor); ``x`` is divided by the token
    scale first and the block scale is ``max|v| · fp32(1/6)`` floored at ``2⁻⁹``
    (there: ``block_amax / (6·pts)``, zero allowed); codes are ``(x / x_scale) / SF``
    (there: ``x / (SF·pts)``). A value that rounds to zero gets code 0 whatever its sign
    (there: 8), and NaN gets code 0 (there: 7).
    """
    expect(x.dim() == 2, "x", "a 2-D tensor [T, H]", tuple(x.shape))
    expect(x.is_floating_point(), "x", "a floating-point tensor", x.dtype)
    expect(x.shape[-1] % NVFP4_GROUP == 0 and x.shape[-1] > 0, "x",
           f"a last dimension that is a positive multiple of {NVFP4_GROUP}", tuple(x.shape))
    xf = x.float()
    amax = _nan_to_zero(xf.abs()).amax(dim=-1)
    x_scales = amax.clamp(min=MEGA_MOE_TOKEN_AMAX_FLOOR) * _f32(_RCP_GLOBAL_DIVISOR, xf)
    v = _groups(xf / x_scales.unsqueeze(-1))
    block = (_nan_to_zero(v.abs()).amax(dim=-1) * _f32(_RCP_E2M1_MAX, xf)).clamp(
        E4M3_MIN_SUBNORMAL, E4M3_MAX)
    sf = encode_ue4m3(block)
    q = (v / sf.float().unsqueeze(-1)).reshape(xf.shape)
    codes = e2m1_encode(q)
    codes = torch.where((codes == E2M1_SIGN_BIT) | torch.isnan(q), 0, codes)
    return pack_e2m1(codes), sf, x_scales


def mega_moe_stage_inputs(
    hidden_states: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    *,
    is_padding: torch.Tensor | None = None,
    w2_global_scale: torch.Tensor | None = None,
    l2_activation_scale: float = 1.0,
) -> dict[str, torch.Tensor | None]:
    """Everything vLLM 0.34.0's ``prepare_megamoe_nvfp4_inputs`` writes without EPLB or a
    fused shared expert, as tensors in the layout of its output buffers.

    Transcribed from vLLM 0.34.0, ``vllm/model_executor/layers/fused_moe/prepare_megamoe.py``
    (``prepare_megamoe_nvfp4_inputs``, ``_prepare_megamoe_nvfp4_inputs_kernel``,
    ``_store_topk``). Returns:

    * ``x`` uint8 ``[T, H/2]``, ``x_sf`` int32 ``[T, H/64]`` (four E4M3 bytes per
      little-endian word, byte ``i`` of word ``j`` = block ``4j+i``), ``x_scales`` fp32
      ``[T]``: :func:`mega_moe_stage_tokens`;
    * ``topk_idx`` int64 ``[T, K]``: ``topk_ids`` widened, ``-1`` on padded tokens;
    * ``topk_weights`` fp32 ``[T, K]``: ``topk_weights``, ``0.0`` on padded tokens;
    * ``l2_alpha`` fp32 ``[E]`` = ``fp32(w2_global_scale · fp32(l2_activation_scale))``
      (``None`` without ``w2_global_scale``); vLLM writes it even for ``T = 0``.
    """
    t = hidden_states.shape[0]
    expect(topk_ids.dim() == 2 and topk_ids.shape[0] == t, "topk_ids", f"[{t}, K]",
           tuple(topk_ids.shape))
    expect(tuple(topk_weights.shape) == tuple(topk_ids.shape), "topk_weights",
           f"shape {tuple(topk_ids.shape)}", tuple(topk_weights.shape))
    if t:
        x, sf, x_scales = mega_moe_stage_tokens(hidden_states)
        x_sf = pack_sf_bytes_to_int32(sf)
    else:
        h = hidden_states.shape[1]
        dev = hidden_states.device
        x = torch.empty(0, h // 2, dtype=torch.uint8, device=dev)
        x_sf = torch.empty(0, h // 64, dtype=torch.int32, device=dev)
        x_scales = torch.empty(0, dtype=torch.float32, device=dev)
    ids = topk_ids.long()
    weights = topk_weights.float()
    if is_padding is not None:
        pad = is_padding[:t].bool().unsqueeze(-1)
        ids = torch.where(pad, torch.full_like(ids, -1), ids)
        weights = torch.where(pad, torch.zeros_like(weights), weights)
    l2_alpha = None
    if w2_global_scale is not None:
        gs = w2_global_scale.float().reshape(-1)
        l2_alpha = gs * _f32(float(l2_activation_scale), gs)
    return {"x": x, "x_sf": x_sf, "x_scales": x_scales, "topk_idx": ids,
            "topk_weights": weights, "l2_alpha": l2_alpha}


def mega_moe_l2_activation_scale(w2_input_scale: torch.Tensor) -> float:
    """The layer's FC2 activation global scale: the max of ``w2`` ``input_scale`` over experts.

    vLLM keeps the max over every logical expert of the layer (all ranks), and
    1.0 when that max is 0. Pass the scales of all experts, not one rank's.
    """
    s = torch.as_tensor(w2_input_scale).float().reshape(-1)
    expect(s.numel() > 0, "w2_input_scale", "at least one expert", tuple(s.shape))
    expect(bool(torch.isfinite(s).all()) and bool((s >= 0).all()), "w2_input_scale",
           "finite values >= 0", s.tolist()[:4])
    return float(s.max()) or 1.0


def mega_moe_l2_alpha(w2_weight_scale_2: torch.Tensor, activation_scale: float) -> torch.Tensor:
    """Per-expert FC2 alpha: ``fp32(w2 weight_scale_2 · l2_activation_scale)``."""
    ws2 = torch.as_tensor(w2_weight_scale_2).float().reshape(-1)
    return ws2 * _f32(activation_scale, ws2)


def mega_moe_quantize_fc2_input(a: torch.Tensor, activation_scale: float
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's requantization of the SwiGLU output with one global scale ``l2s``.

    ``a`` fp32 ``[T, I]``. ``SF = e4m3(clamp(amax16 / fp32(6·l2s), 2⁻⁹, 448))``,
    ``codes = E2M1(a · fp32(1/(fp32(SF)·l2s)))``, saturating at ±6 (an all-zero
    block gets SF byte 0x01, codes 0). Returns packed uint8 ``[T, I/2]`` and E4M3
    ``[T, I/16]``; ``a ≈ e2m1 · fp32(SF) · l2s``.
    """
    expect(a.is_floating_point() and a.dim() == 2, "a", "a 2-D floating-point tensor",
           (a.dtype, tuple(a.shape)))
    expect(a.shape[-1] % NVFP4_GROUP == 0, "a", f"a last dimension multiple of {NVFP4_GROUP}",
           tuple(a.shape))
    expect(activation_scale > 0 and activation_scale != float("inf"), "activation_scale",
           "a finite value > 0", activation_scale)
    af = a.float()
    l2s = _f32(activation_scale, af)
    blocks = _groups(af)
    quant_d = _f32(E2M1_MAX, af) * l2s
    sf = encode_ue4m3((blocks.abs().amax(dim=-1) / quant_d).clamp(E4M3_MIN_SUBNORMAL, E4M3_MAX))
    inv = 1.0 / (sf.float() * l2s)
    codes = e2m1_encode((blocks * inv.unsqueeze(-1)).reshape(af.shape))
    return pack_e2m1(codes), sf


def mega_moe_swiglu(gate: torch.Tensor, up: torch.Tensor, limit: float | None) -> torch.Tensor:
    """DeepSeek V4's clamped SwiGLU on BF16 FC1 outputs, as the kernel's L1 epilogue runs it.

    Clamp in BF16 (gate from above to ``bf16(limit)``, up to ``±bf16(limit)``),
    then ``gate / (1 + exp(-gate)) · up`` in fp32. ``limit=None``: no clamp.
    """
    expect(gate.dtype == torch.bfloat16 and up.dtype == torch.bfloat16, "gate/up", "bfloat16",
           (gate.dtype, up.dtype))
    if limit is not None:
        lim = torch.full((), limit, dtype=torch.bfloat16, device=gate.device)
        gate = torch.minimum(gate, lim)
        up = torch.minimum(torch.maximum(up, -lim), lim)
    g = gate.float()
    return g / (1.0 + torch.exp(-g)) * up.float()


def _check_experts(w13, w13_sf, w13_ws2, w2, w2_sf, w2_ws2, w2_in, hidden: int
                   ) -> tuple[int, int]:
    expect(w13.dim() == 3 and w13.dtype == torch.uint8, "w13", "uint8 [E, 2I, H/2]",
           (w13.dtype, tuple(w13.shape)))
    e, two_i, half_h = w13.shape
    expect(half_h * 2 == hidden, "w13", f"[E, 2I, {hidden // 2}] (H = {hidden})",
           tuple(w13.shape))
    expect(two_i % (2 * NVFP4_GROUP) == 0, "w13", "2I with I a multiple of 16",
           tuple(w13.shape))
    i = two_i // 2
    expect(tuple(w2.shape) == (e, hidden, i // 2) and w2.dtype == torch.uint8, "w2",
           f"uint8 {(e, hidden, i // 2)}", (w2.dtype, tuple(w2.shape)))
    expect(tuple(w13_sf.shape) == (e, two_i, hidden // NVFP4_GROUP), "w13_weight_scale",
           f"shape {(e, two_i, hidden // NVFP4_GROUP)}", tuple(w13_sf.shape))
    expect(tuple(w2_sf.shape) == (e, hidden, i // NVFP4_GROUP), "w2_weight_scale",
           f"shape {(e, hidden, i // NVFP4_GROUP)}", tuple(w2_sf.shape))
    for name, t in (("w13_weight_scale_2", w13_ws2), ("w2_weight_scale_2", w2_ws2),
                    ("w2_input_scale", w2_in)):
        expect(torch.as_tensor(t).numel() == e, name, f"{e} values (one per expert)",
               tuple(torch.as_tensor(t).shape))
    return e, i


def _gemm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b.T`` of exactly representable products, summed in float64, rounded to fp32."""
    return (a.double() @ b.double().T).float()


def nvfp4_mega_moe_reference(
    hidden_states: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    w13: torch.Tensor,
    w13_weight_scale: torch.Tensor,
    w13_weight_scale_2: torch.Tensor,
    w2: torch.Tensor,
    w2_weight_scale: torch.Tensor,
    w2_weight_scale_2: torch.Tensor,
    w2_input_scale: torch.Tensor,
    *,
    swiglu_limit: float | None,
    activation_scale: float | None = None,
) -> torch.Tensor:
    """Routed-expert output of vLLM 0.34.0's NVFP4 MegaMoE, ``[T, H]`` BF16 (see module doc).

    Checkpoint layout, experts stacked on dim 0 (``E`` experts, ``I`` intermediate):

    * ``hidden_states`` ``[T, H]`` (bf16); ``topk_ids`` ``[T, K]`` expert ids
      (negative: not routed); ``topk_weights`` ``[T, K]`` (routed scaling included);
    * ``w13`` uint8 ``[E, 2I, H/2]`` = [w1 (gate); w3 (up)], ``w13_weight_scale``
      e4m3 ``[E, 2I, H/16]``, ``w13_weight_scale_2`` fp32 ``[E]`` (w1's = w3's);
    * ``w2`` uint8 ``[E, H, I/2]``, ``w2_weight_scale`` e4m3 ``[E, H, I/16]``,
      ``w2_weight_scale_2`` fp32 ``[E]``, ``w2_input_scale`` fp32 ``[E]``.

    ``activation_scale``: the layer's ``l2_activation_scale``; by default
    :func:`mega_moe_l2_activation_scale` of ``w2_input_scale`` (right when all the layer's
    experts are passed). Shared experts are not included.
    """
    expect(hidden_states.dim() == 2, "hidden_states", "[T, H]", tuple(hidden_states.shape))
    t, h = hidden_states.shape
    e, i = _check_experts(w13, w13_weight_scale, w13_weight_scale_2, w2, w2_weight_scale,
                          w2_weight_scale_2, w2_input_scale, h)
    expect(topk_ids.dim() == 2 and topk_ids.shape[0] == t, "topk_ids", f"[{t}, K]",
           tuple(topk_ids.shape))
    expect(tuple(topk_weights.shape) == tuple(topk_ids.shape), "topk_weights",
           f"shape {tuple(topk_ids.shape)}", tuple(topk_weights.shape))
    expect(bool((topk_ids < e).all()), "topk_ids", f"ids < {e}", int(topk_ids.max()))
    l2s = (mega_moe_l2_activation_scale(w2_input_scale) if activation_scale is None
           else activation_scale)
    l1a = torch.as_tensor(w13_weight_scale_2).float().reshape(-1)
    l2a = mega_moe_l2_alpha(w2_weight_scale_2, l2s)
    w13_sf, w2_sf = as_e4m3(w13_weight_scale, "w13_weight_scale"), as_e4m3(
        w2_weight_scale, "w2_weight_scale")

    x_packed, x_sf, x_scales = mega_moe_stage_tokens(hidden_states)
    xq = dequantize_nvfp4(x_packed, x_sf, 1.0)            # e2m1 · SF, exact in fp32
    # One BF16 output row per (token, slot); unrouted slots stay zero with weight 0.
    ids = topk_ids.long()
    y = torch.zeros(t, ids.shape[1], h, dtype=torch.bfloat16, device=hidden_states.device)
    for expert in range(e):
        tok, slot = torch.nonzero(ids == expert, as_tuple=True)
        if tok.numel() == 0:
            continue
        w1q = dequantize_nvfp4(w13[expert], w13_sf[expert], 1.0)
        acc = _gemm(xq[tok], w1q)
        scale = x_scales[tok] * l1a[expert]
        gate_up = (acc * scale.unsqueeze(-1)).to(torch.bfloat16)
        act = mega_moe_swiglu(gate_up[:, :i], gate_up[:, i:], swiglu_limit)
        a_packed, a_sf = mega_moe_quantize_fc2_input(act, l2s)
        aq = dequantize_nvfp4(a_packed, a_sf, 1.0)
        w2q = dequantize_nvfp4(w2[expert], w2_sf[expert], 1.0)
        y[tok, slot] = (_gemm(aq, w2q) * l2a[expert]).to(torch.bfloat16)
    # Combine: fp32 fused multiply-add over the top-k slots in order, then BF16.
    weights = topk_weights.float() * (ids >= 0)
    out = torch.zeros(t, h, dtype=torch.float32, device=hidden_states.device)
    for slot in range(ids.shape[1]):
        prod = y[:, slot].double() * weights[:, slot].double().unsqueeze(-1)
        out = (prod + out.double()).float()
    return out.to(torch.bfloat16)

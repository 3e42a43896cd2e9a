"""NVFP4 mega-MoE experts on CPU: vLLM's own loader loop, finalize, staging — up to the B200 call.

A layout-B expert set (ModelOpt-exact NVFP4 from :mod:`dsv4_nvfp4.formats`)
goes through vLLM 0.32.0's NVIDIA weight mapper, its mega-MoE expert mapping
and its ``DeepseekV4Model.load_weights`` loop, into
``NvFp4MegaMoEExperts`` (EP rank 1 of 2: logical experts 4..7 are local).
Then ``finalize_weights`` and ``prepare_call`` build exactly what
``deep_gemm.fp4_fp4_mega_moe`` receives; the tests check those bytes and
numbers. Only that call itself is left to the B200 runbook.
"""

from __future__ import annotations

import types

import pytest
import torch
from test_plugin_helpers import (
    layout_b_engine_config,
)

from dsv4_nvfp4.formats import (
    dequantize_nvfp4,
    pack_sf_bytes_to_int32,
    quantize_nvfp4_activation_static,
    quantize_nvfp4_weight,
    untransform_nvfp4_from_mega_moe,
)

pytestmark = pytest.mark.cpu

N_EXPERTS, TOP_K, H, INTER = 8, 2, 512, 256
EP_SIZE, EP_RANK = 2, 1
LOCAL = range(EP_RANK * N_EXPERTS // EP_SIZE, (EP_RANK + 1) * N_EXPERTS // EP_SIZE)
LAYER = 1
T_MAX = 8


@pytest.fixture(scope="module")
def vllm_env(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """A real VllmConfig for a layout-B tiny config, current, with a 1-process gloo world."""
    from vllm.config import set_current_vllm_config

    vc = layout_b_engine_config(tmp_path_factory.mktemp("layout_b"))
    with set_current_vllm_config(vc):
        yield vc


@pytest.fixture(scope="module")
def checkpoint() -> dict[str, torch.Tensor]:
    """Layout-B tensors of one MoE layer under DeepSeek names, sorted like a shard's keys."""
    gen = torch.Generator().manual_seed(11)
    out: dict[str, torch.Tensor] = {}
    for e in range(N_EXPERTS):
        for w, shape in (("w1", (INTER, H)), ("w3", (INTER, H)), ("w2", (H, INTER))):
            t = quantize_nvfp4_weight(torch.randn(*shape, generator=gen) * (0.01 + 0.01 * e))
            p = f"layers.{LAYER}.ffn.experts.{e}.{w}."
            out[p + "weight"] = t.packed
            out[p + "weight_scale"] = t.block_scale
            out[p + "weight_scale_2"] = t.global_scale.reshape(())
            # calibrated FC input scales differ per expert (w1 and w3 see the same input)
            scale = 0.5 + 0.25 * e if w != "w2" else 0.01 * (e + 1)
            out[p + "input_scale"] = torch.tensor(scale / 2688.0)
    return dict(sorted(out.items()))


def _container(experts: torch.nn.Module, hf_config) -> torch.nn.Module:  # type: ignore[no-untyped-def]
    """The attribute path vLLM's DeepseekV4Model gives: layers.<L>.ffn.experts."""
    from vllm.models.deepseek_v4.nvidia.model import make_deepseek_v4_expert_params_mapping

    ffn = torch.nn.Module()
    ffn.experts = experts
    layer = torch.nn.Module()
    layer.ffn = ffn
    m = torch.nn.Module()
    m.layers = torch.nn.ModuleDict({str(LAYER): layer})
    m.config = hf_config
    m.quant_config = None
    m.use_sequence_parallel = False
    m.get_expert_mapping = lambda: make_deepseek_v4_expert_params_mapping(N_EXPERTS)
    return m


def _load(experts: torch.nn.Module, vc, checkpoint) -> set[str]:  # type: ignore[no-untyped-def]
    """vLLM's NVIDIA V4 mapper + DeepseekV4Model.load_weights, as the model runs them."""
    from vllm.models.deepseek_v4.nvidia.model import (
        DeepseekV4Model,
        _make_deepseek_v4_weights_mapper,
    )

    mapper = _make_deepseek_v4_weights_mapper("fp4")
    weights = []
    for name, t in checkpoint.items():
        mapped = mapper.map_name(name)
        assert mapped is not None and mapped.startswith("model.")
        weights.append((mapped.removeprefix("model."), t))  # AutoWeightsLoader strips "model."
    m = _container(experts, vc.model_config.hf_config)
    return DeepseekV4Model.load_weights(m, weights)


def _experts(cls, vc, tag: str):  # type: ignore[no-untyped-def]
    return cls(vc, num_experts=N_EXPERTS, num_local_experts=len(LOCAL),
               experts_start_idx=LOCAL.start, top_k=TOP_K, hidden_size=H,
               intermediate_size=INTER, num_shared_experts=1,
               prefix=f"model.layers.{LAYER}.ffn.experts#{tag}")


def test_stock_mega_experts_fail_like_vllm_43454(vllm_env, checkpoint) -> None:  # type: ignore[no-untyped-def]
    from vllm.models.deepseek_v4.nvidia.model import DeepseekV4MegaMoEExperts

    stock = _experts(DeepseekV4MegaMoEExperts, vllm_env, "stock")
    with pytest.raises(KeyError, match=r"experts\.w13_input_scale"):
        _load(stock, vllm_env, checkpoint)


@pytest.fixture(scope="module")
def loaded(vllm_env, checkpoint):  # type: ignore[no-untyped-def]
    from dsv4_nvfp4.vllm_plugin.nvfp4_mega_experts import classes

    backend_cls, experts_cls = classes()
    ex = _experts(experts_cls, vllm_env, "ours")
    names = _load(ex, vllm_env, checkpoint)
    ex._backend = backend_cls()  # the SM100 factory is tested separately; no GPU here
    ex.finalize_weights()
    return ex, names


def test_every_layout_b_tensor_lands_in_a_parameter(loaded) -> None:  # type: ignore[no-untyped-def]
    _, names = loaded
    prefix = f"layers.{LAYER}.ffn.experts."
    assert names == {prefix + n for n in (
        "w13_weight", "w13_weight_scale", "w13_weight_scale_2", "w13_input_scale",
        "w2_weight", "w2_weight_scale", "w2_weight_scale_2", "w2_input_scale")}


def test_finalized_weights_are_the_checkpoint_bytes(loaded, checkpoint) -> None:  # type: ignore[no-untyped-def]
    ex, _ = loaded
    assert ex.num_shared_experts == 0  # FP8 shared experts are never fused into fp4xfp4
    w13, w13_sf, w2, w2_sf = untransform_nvfp4_from_mega_moe(ex._transformed_l1_weights,
                                                             ex._transformed_l2_weights)
    for slot, e in enumerate(LOCAL):
        p = f"layers.{LAYER}.ffn.experts.{e}."
        assert torch.equal(w13[slot], torch.cat([checkpoint[p + "w1.weight"],
                                                 checkpoint[p + "w3.weight"]]))
        assert torch.equal(w13_sf[slot].view(torch.uint8), torch.cat(
            [checkpoint[p + "w1.weight_scale"], checkpoint[p + "w3.weight_scale"]]).view(
                torch.uint8))
        assert torch.equal(w2[slot], checkpoint[p + "w2.weight"])
        assert torch.equal(w2_sf[slot].view(torch.uint8),
                           checkpoint[p + "w2.weight_scale"].view(torch.uint8))
    # the loader-side parameters are released: only the kernel operands remain
    assert ex.w13_weight is None and ex.w13_input_scale is None


def test_alphas(loaded, checkpoint) -> None:  # type: ignore[no-untyped-def]
    ex, _ = loaded
    a = ex._alphas
    # a1: ONE staging scale per layer = max FC1 input_scale over ALL logical experts
    # (expert 7 here, local; the max must also see remote experts in general).
    all_in = [checkpoint[f"layers.{LAYER}.ffn.experts.{e}.{w}.input_scale"]
              for e in range(N_EXPERTS) for w in ("w1", "w3")]
    assert a.a1.item() == max(t.item() for t in all_in)
    for slot, e in enumerate(LOCAL):
        p = f"layers.{LAYER}.ffn.experts.{e}."
        assert a.l1_alphas[slot].tolist() == [
            (checkpoint[p + "w1.weight_scale_2"] * a.a1).item(),
            (checkpoint[p + "w3.weight_scale_2"] * a.a1).item()]
        assert a.l2_alphas[slot].item() == checkpoint[p + "w2.weight_scale_2"].item()
        assert a.a2_scales[slot].item() == checkpoint[p + "w2.input_scale"].item()
    for t in (a.l1_alphas, a.l2_alphas, a.a2_scales):
        assert t.dtype == torch.float32 and t.is_contiguous()
    assert tuple(a.l1_alphas.shape) == (len(LOCAL), 2)


def _buffer() -> types.SimpleNamespace:
    """Host tensors with the field layout of upstream's fp4xfp4 SymmBuffer (fresh garbage)."""
    return types.SimpleNamespace(
        x=torch.full((T_MAX, H // 2), 0xAB, dtype=torch.uint8),
        x_sf=torch.full((T_MAX, H // 64), 7, dtype=torch.int32),
        topk_idx=torch.full((T_MAX, TOP_K), 99, dtype=torch.int64),
        topk_weights=torch.full((T_MAX, TOP_K), 9.0, dtype=torch.float32))


@pytest.fixture(scope="module")
def step(loaded):  # type: ignore[no-untyped-def]
    ex, _ = loaded
    gen = torch.Generator().manual_seed(3)
    t = 5
    x = (torch.randn(t, H, generator=gen) * 0.1).to(torch.bfloat16)
    ids = torch.tensor([[4, 5], [6, 7], [7, 4], [5, 6], [4, 7]], dtype=torch.int32)
    weights = torch.rand(t, TOP_K, generator=gen)
    pad = torch.tensor([False, False, False, False, True])
    buf = _buffer()
    call = ex.prepare_call(x, weights, ids, activation_clamp=10.0, symm_buffer=buf,
                           is_padding=pad)
    return ex, x, ids, weights, pad, buf, call


def test_staged_buffer(step) -> None:  # type: ignore[no-untyped-def]
    ex, x, ids, weights, pad, buf, _ = step
    t = x.shape[0]
    packed, sf = quantize_nvfp4_activation_static(x, ex._alphas.a1)
    assert torch.equal(buf.x[:t], packed)
    assert torch.equal(buf.x_sf[:t], pack_sf_bytes_to_int32(sf))
    assert torch.equal(buf.topk_idx[:t], torch.where(pad[:, None], -1, ids.long()))
    assert torch.equal(buf.topk_weights[:t], torch.where(pad[:, None], 0.0, weights))
    # rows past the step are not touched
    assert bool((buf.x[t:] == 0xAB).all()) and bool((buf.topk_idx[t:] == 99).all())


def test_call_arguments(step) -> None:  # type: ignore[no-untyped-def]
    ex, x, *_, buf, call = step
    kw = call.kwargs()
    assert kw["recipe"] == (1, 1, 16) and kw["activation"] == "swiglu"
    assert kw["activation_clamp"] == 10.0 and kw["fast_math"] is True
    # vLLM's V4 router already scaled the top-k weights by routed_scaling_factor
    assert kw["routed_scaling_factor"] == 1.0
    assert kw["l1_alphas"] is ex._alphas.l1_alphas and kw["a2_scales"] is ex._alphas.a2_scales
    assert call.sym_buffer is buf and call.l1_weights is ex._transformed_l1_weights
    assert call.y.dtype == torch.bfloat16 and call.y.shape == x.shape


def _decode(l1, l2):  # type: ignore[no-untyped-def]
    """fp32 (codes x block scale) of the kernel operands, no global scale: what the MMA sees."""
    w13, w13_sf, w2, w2_sf = untransform_nvfp4_from_mega_moe(l1, l2)
    one = torch.tensor(1.0)
    return ([dequantize_nvfp4(w13[e], w13_sf[e], one) for e in range(w13.shape[0])],
            [dequantize_nvfp4(w2[e], w2_sf[e], one) for e in range(w2.shape[0])])


def test_alphas_reproduce_modelopt_dequantization(step, checkpoint) -> None:  # type: ignore[no-untyped-def]
    """Kernel-side math (MMA of codes x block scales, then alphas) == ModelOpt dequant GEMMs.

    Emulates fp4_fp4_mega_moe's FC1 epilogue and FC2 from the call's operands
    (FC2 input kept in fp32, i.e. without the kernel's in-flight NVFP4 requant),
    and compares with the same MoE computed from ModelOpt-dequantized weights
    (e2m1 x block scale x weight_scale_2) and the dequantized staged input (x a1).
    A global scale folded into the block scales, a swapped gate/up alpha, or a
    per-expert FC1 input scale would each break the equality.
    """
    _, x, _, weights, _, buf, call = step
    t = x.shape[0]
    a = call.alphas
    w13_mma, w2_mma = _decode(call.l1_weights, call.l2_weights)
    x_mma = dequantize_nvfp4(buf.x[:t], buf.x_sf[:t].contiguous().view(torch.float8_e4m3fn),
                             torch.tensor(1.0))
    y_kernel = torch.zeros(t, H)
    y_ref = torch.zeros(t, H)
    x_ref = x_mma * a.a1
    for i in range(t):
        for k in range(TOP_K):
            e = int(buf.topk_idx[i, k])
            if e < 0:
                continue
            slot, p = e - LOCAL.start, f"layers.{LAYER}.ffn.experts.{e}."
            acc = w13_mma[slot] @ x_mma[i]
            gate = acc[:INTER] * a.l1_alphas[slot, 0]
            up = acc[INTER:] * a.l1_alphas[slot, 1]
            h = torch.nn.functional.silu(gate.clamp(max=10.0)) * up.clamp(-10.0, 10.0)
            y_kernel[i] += buf.topk_weights[i, k] * (w2_mma[slot] @ h) * a.l2_alphas[slot]

            def deq(w: str, p: str = p) -> torch.Tensor:
                return dequantize_nvfp4(checkpoint[p + w + ".weight"],
                                        checkpoint[p + w + ".weight_scale"],
                                        checkpoint[p + w + ".weight_scale_2"])
            g_ref, u_ref = deq("w1") @ x_ref[i], deq("w3") @ x_ref[i]
            h_ref = (torch.nn.functional.silu(g_ref.clamp(max=10.0))
                     * u_ref.clamp(-10.0, 10.0))
            y_ref[i] += weights[i, k] * (deq("w2") @ h_ref)
    assert bool((y_ref[-1] == 0).all())  # the padded token reaches no expert
    torch.testing.assert_close(y_kernel, y_ref, rtol=1e-5, atol=1e-7)
    assert y_ref.abs().max() > 1e-4  # not a vacuous comparison


def test_sm100_factory_refuses_this_machine(vllm_env) -> None:  # type: ignore[no-untyped-def]
    from dsv4_nvfp4.vllm_plugin.nvfp4_mega_experts import get_nvfp4_mega_moe_backend

    with pytest.raises(NotImplementedError, match="DeepGEMM MegaMoE requires SM100 GPUs"):
        get_nvfp4_mega_moe_backend(torch.device("cpu"), 7168, 3072)


def test_eplb_is_refused(vllm_env) -> None:  # type: ignore[no-untyped-def]
    import copy

    from dsv4_nvfp4.vllm_plugin.nvfp4_mega_experts import classes

    vc = copy.copy(vllm_env)
    par = copy.copy(vllm_env.parallel_config)
    object.__setattr__(par, "enable_eplb", True)
    object.__setattr__(vc, "parallel_config", par)
    with pytest.raises(NotImplementedError, match="EPLB is not supported"):
        _experts(classes()[1], vc, "eplb")


def _raw(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def _finalized(vc, tensors: dict[str, torch.Tensor], tag: str):  # type: ignore[no-untyped-def]
    from dsv4_nvfp4.vllm_plugin.nvfp4_mega_experts import classes

    backend_cls, experts_cls = classes()
    ex = _experts(experts_cls, vc, tag)
    names = _load(ex, vc, tensors)
    ex._backend = backend_cls()
    ex.finalize_weights()
    return ex, names


def test_layout_c_experts_load_into_the_same_kernel_operands(vllm_env, checkpoint) -> None:  # type: ignore[no-untyped-def]
    """The same experts exported as layout C, streamed C -> B at load: identical operands.

    A layout-C export shares one ``weight_scale_2`` between gate and up (ModelOpt
    fuses their amax; the stream refuses anything else, as ``convert`` does), so
    the layout-B reference here takes w1's for w3 too.
    """
    from dsv4_nvfp4.checkpoint.c_stream import LayoutCStream
    from dsv4_nvfp4.checkpoint.names import deepseek_to_c
    from dsv4_nvfp4.checkpoint.quant_config import c_quantization_config

    b = {n: (checkpoint[n.replace(".w3.", ".w1.")] if n.endswith("w3.weight_scale_2") else t)
         for n, t in checkpoint.items()}
    c = dict(sorted((deepseek_to_c(n), t) for n, t in b.items()))
    assert next(iter(c)).startswith(f"model.layers.{LAYER}.mlp.experts.")
    stream = LayoutCStream.from_config({"quantization_config": c_quantization_config([])},
                                       None, c)
    from_c = dict(stream.convert(c.items()))
    assert from_c.keys() == b.keys()
    assert all(torch.equal(_raw(from_c[n]), _raw(b[n])) for n in b)
    ex, names = _finalized(vllm_env, from_c, "from-c")
    ref, ref_names = _finalized(vllm_env, b, "from-b")
    assert names == ref_names and len(names) == 8
    for x, y in ((ex._transformed_l1_weights, ref._transformed_l1_weights),
                 (ex._transformed_l2_weights, ref._transformed_l2_weights)):
        assert all(torch.equal(_raw(p), _raw(q)) for p, q in zip(x, y, strict=True))
    for field in ("a1", "l1_alphas", "l2_alphas", "a2_scales"):
        assert torch.equal(getattr(ex._alphas, field), getattr(ref._alphas, field)), field

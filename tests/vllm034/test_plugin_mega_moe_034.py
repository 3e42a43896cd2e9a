"""DeepSeek V4's NVFP4 experts on vLLM 0.34.0's own NVFP4 MegaMoE, in vLLM 0.34.0's Python.

Everything here is vLLM's code running on the CPU platform: the DeepSeek V4
``_init_mega_moe_experts`` that builds the layer, ``DeepGemmMegaMoEExperts`` and
its weight loader (which writes the kernel layout), vLLM's checkpoint-name mapper
and ``DeepseekV4Model.load_weights`` loop. Only the SM100 capability check is
patched (the kernel itself needs a B200; the B200 runbook runs it). What is
checked:

* inside the plugin's scope NVFP4 layers get ``MEGA_MOE_NVFP4``, the MTP draft
  layer (excluded by the checkpoint) keeps ``MEGA_MOE_MXFP4``, nothing leaks out;
* stock vLLM's loader fails on a layout-B expert set (``w13_input_scale``), with
  the plugin's stream every tensor lands;
* the kernel operands decode back to the checkpoint's bytes through our own
  ``formats`` inverse transforms (two independent implementations agree), the
  per-expert scalars are the checkpoint's, and ``l2_activation_scale`` is the
  max of w2 ``input_scale``;
* the kernel math emulated from the decoded operands equals the same math on the
  checkpoint's tensors (ModelOpt-exact dequantization, ``formats``);
* DeepSeek's FP8 128×128 UE8M0 shared experts become the fused MXFP8 operands
  losslessly.
"""

from __future__ import annotations

import inspect
import json
import types
from pathlib import Path

import pytest
import torch

from dsv4_nvfp4.checkpoint.layouts import Layout
from dsv4_nvfp4.checkpoint.tiny import build, tiny_dims_config
from dsv4_nvfp4.formats import (
    dequantize_fp8_block,
    dequantize_nvfp4,
    unpack_sf_int32_to_bytes,
    untransform_nvfp4_from_mega_moe,
)
from dsv4_nvfp4.vllm_plugin.mega_moe import nvfp4_scope, without_unused_input_scales

pytestmark = pytest.mark.cpu

# MegaMoE needs hidden and intermediate sizes that are multiples of 128.
DIMS = {"hidden_size": 256, "moe_intermediate_size": 128, "n_routed_experts": 8,
        "num_experts_per_tok": 2, "q_lora_rank": 128, "o_lora_rank": 128}
LAYER = 1  # a non-hash MoE layer (layer 0 is the hash layer of the tiny model)


@pytest.fixture(scope="module")
def layout_b(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict, Path]:
    """Tensors and config of a tiny layout-B checkpoint with MTP, at MegaMoE-legal sizes."""
    cfg = tiny_dims_config(mtp=True, cpu_servable=True)
    cfg.update(DIMS)
    tensors, config, side = build(Layout.B, cfg, seed=3)
    d = tmp_path_factory.mktemp("layout_b")
    (d / "config.json").write_text(json.dumps(config))
    for name, content in side.items():
        (d / name).write_text(json.dumps(content))
    return tensors, config, d


@pytest.fixture(scope="module")
def vc(layout_b, single_process_world):  # type: ignore[no-untyped-def]
    """vLLM 0.34.0's engine config of the tiny layout-B checkpoint, MegaMoE backend."""
    from vllm.config import set_current_vllm_config
    from vllm.engine.arg_utils import EngineArgs

    import dsv4_nvfp4.vllm_plugin as plugin

    plugin.register()
    config = EngineArgs(model=str(layout_b[2]), skip_tokenizer_init=True, max_model_len=512,
                        enable_expert_parallel=True,
                        moe_backend="deep_gemm_mega_moe").create_engine_config()
    assert config.kernel_config.moe_backend == "deep_gemm_mega_moe"
    with set_current_vllm_config(config):
        single_process_world(config)
        yield config


@pytest.fixture
def sm100(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the SM100 capability check is skipped; the shape checks stay vLLM's."""
    import vllm.model_executor.layers.fused_moe.deep_gemm_mega_moe as dgm

    def shapes_only(device: torch.device, hidden: int, inter: int) -> None:
        if hidden % 128 or inter % 128:
            raise ValueError("DeepGEMM MegaMoE requires multiples of 128")

    monkeypatch.setattr(dgm, "check_deep_gemm_mega_moe_supported", shapes_only)


def _moe_self(vc, shared=None):  # type: ignore[no-untyped-def]
    """The attributes vLLM's ``_init_mega_moe_experts`` reads from its ``DeepseekV4MoE``."""
    hf = vc.model_config.hf_config
    return types.SimpleNamespace(
        n_routed_experts=hf.n_routed_experts, n_activated_experts=hf.num_experts_per_tok,
        shared_experts=shared, use_sequence_parallel=True, tp_size=1,
        swiglu_limit=hf.swiglu_limit)


def _build_experts(vc, layer: int, shared=None):  # type: ignore[no-untyped-def]
    from vllm.models.deepseek_v4.nvidia.model import DeepseekV4MoE

    moe = _moe_self(vc, shared)
    hf = vc.model_config.hf_config
    vc.compilation_config.static_forward_context.pop(f"model.layers.{layer}.ffn.experts", None)
    DeepseekV4MoE._init_mega_moe_experts(moe, vc, hf, f"model.layers.{layer}.ffn")
    return moe


def test_vllm_still_hard_codes_mxfp4_where_the_plugin_substitutes() -> None:
    """Tripwire: the seam the plugin uses is still there, as the plugin expects it."""
    from vllm.models.deepseek_v4.nvidia.model import DeepseekV4MoE

    src = inspect.getsource(DeepseekV4MoE._init_mega_moe_experts)
    assert "self.experts = DeepGemmMegaMoEExperts(" in src
    assert "weight_format=MEGA_MOE_MXFP4," in src


def test_scope_gives_nvfp4_layers_nvfp4_and_keeps_mtp_mxfp4(vc, sm100) -> None:  # type: ignore[no-untyped-def]
    import vllm.models.deepseek_v4.nvidia.model as nv
    from vllm.model_executor.layers.fused_moe.deep_gemm_mega_moe import (
        MEGA_MOE_MXFP4,
        MEGA_MOE_NVFP4,
        DeepGemmMegaMoEExperts,
    )

    n_layers = vc.model_config.hf_text_config.num_hidden_layers
    with nvfp4_scope(vc, "test") as chosen:
        main = _build_experts(vc, LAYER).experts
        mtp = _build_experts(vc, n_layers).experts
    outside = _build_experts(vc, LAYER).experts
    assert type(main) is DeepGemmMegaMoEExperts and main.weight_format is MEGA_MOE_NVFP4
    assert type(mtp) is DeepGemmMegaMoEExperts and mtp.weight_format is MEGA_MOE_MXFP4
    assert outside.weight_format is MEGA_MOE_MXFP4  # stock vLLM outside the scope
    assert nv.DeepGemmMegaMoEExperts is DeepGemmMegaMoEExperts  # restored
    assert chosen == {f"layers.{LAYER}.ffn.experts": "nvfp4", "mtp.0.ffn.experts": "mxfp4"}
    h, i, e = DIMS["hidden_size"], DIMS["moe_intermediate_size"], DIMS["n_routed_experts"]
    assert tuple(main.w13_weight.shape) == (e, 2 * i, h // 2)
    assert tuple(main.w13_weight_scale.shape) == (e, 2 * i, h // 64)  # 4 E4M3 per int32
    assert {n for n, _ in main.named_parameters()} >= {
        "w13_weight_scale_2", "w2_weight_scale_2", "w2_input_scale"}
    assert "w13_input_scale" not in dict(main.named_parameters())


def _stand_in_model(vc, experts):  # type: ignore[no-untyped-def]
    """The attributes ``DeepseekV4Model.load_weights`` reads, around one real experts layer."""
    from vllm.models.deepseek_v4.nvidia.model import DeepseekV4Model

    class OneLayerModel(torch.nn.Module):
        load_weights = DeepseekV4Model.load_weights
        get_expert_mapping = DeepseekV4Model.get_expert_mapping

        def __init__(self) -> None:
            super().__init__()
            ffn = torch.nn.Module()
            ffn.experts, ffn.use_native_mega_moe, ffn.n_redundant_experts = experts, True, 0
            layer = torch.nn.Module()
            layer.ffn = ffn
            self.layers = torch.nn.ModuleList([torch.nn.Identity()] * LAYER + [layer])
            self.start_layer, self.end_layer = LAYER, LAYER + 1
            self.config = vc.model_config.hf_config
            self.quant_config = None
            self.use_sequence_parallel = True

    return OneLayerModel()


def _layer_stream(tensors: dict, layer: int, part: str = ".ffn.experts.") -> list:
    """Checkpoint tensors of one layer's routed experts, renamed by vLLM's own mapper."""
    from vllm.models.deepseek_v4.nvidia.model import _make_deepseek_v4_weights_mapper

    mapper = _make_deepseek_v4_weights_mapper("fp4")
    raw = [(n, t) for n, t in tensors.items() if n.startswith(f"layers.{layer}{part}")]
    return [(n.removeprefix("model."), t) for n, t in mapper.apply(raw)]


def test_stock_loader_fails_on_layout_b_and_loads_through_the_plugin(
        vc, sm100, layout_b) -> None:  # type: ignore[no-untyped-def]
    tensors, config, _ = layout_b
    with nvfp4_scope(vc, "test"):
        experts = _build_experts(vc, LAYER).experts
    model = _stand_in_model(vc, experts)
    stream = _layer_stream(tensors, LAYER)
    assert sum(n.endswith(".w1.input_scale") for n, _ in stream) == DIMS["n_routed_experts"]
    with pytest.raises(KeyError, match=r"experts\.w13_input_scale"):
        model.load_weights(iter(stream))  # stock vLLM 0.34.0 on layout B

    experts = _build_fresh(vc)
    model = _stand_in_model(vc, experts)
    kept = list(without_unused_input_scales(iter(stream), config["quantization_config"]))
    assert len(stream) - len(kept) == 2 * DIMS["n_routed_experts"]  # w1 + w3 input_scale
    loaded = model.load_weights(iter(kept))
    prefix = f"layers.{LAYER}.ffn.experts."
    assert loaded == {prefix + n for n, _ in experts.named_parameters()}


def _build_fresh(vc):  # type: ignore[no-untyped-def]
    with nvfp4_scope(vc, "test"):
        return _build_experts(vc, LAYER).experts


def _stacked(tensors: dict, layer: int, w: str, part: str) -> torch.Tensor:
    e = DIMS["n_routed_experts"]
    return torch.stack([tensors[f"layers.{layer}.ffn.experts.{j}.{w}.{part}"] for j in range(e)])


def _load(vc, tensors: dict, quant_cfg: dict):  # type: ignore[no-untyped-def]
    """One NVFP4 MegaMoE layer built by vLLM in the plugin's scope, loaded from ``tensors``."""
    import vllm.model_executor.layers.fused_moe.deep_gemm_mega_moe as dgm

    original = dgm.check_deep_gemm_mega_moe_supported
    dgm.check_deep_gemm_mega_moe_supported = lambda device, h, i: None
    try:
        experts = _build_fresh(vc)
    finally:
        dgm.check_deep_gemm_mega_moe_supported = original
    stream = without_unused_input_scales(iter(_layer_stream(tensors, LAYER)), quant_cfg)
    _stand_in_model(vc, experts).load_weights(stream)
    return experts


@pytest.fixture(scope="module")
def loaded_experts(vc, layout_b):  # type: ignore[no-untyped-def]
    tensors, config, _ = layout_b
    return _load(vc, tensors, config["quantization_config"])


@pytest.fixture(scope="module")
def layout_c_as_b(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict]:
    """A tiny layout-C export streamed through the plugin's load-time C -> B conversion."""
    from dsv4_nvfp4.checkpoint.c_stream import LayoutCStream
    from dsv4_nvfp4.checkpoint.tiny import write_checkpoint
    from dsv4_nvfp4.checkpoint.transforms import c_to_b_config

    cfg = tiny_dims_config(mtp=False, cpu_servable=True)
    cfg.update(DIMS)
    tensors, config, side = build(Layout.C, cfg, seed=5)
    d = write_checkpoint(tmp_path_factory.mktemp("layout_c") / "c", tensors, config, side,
                         1 << 20)
    b_tensors = dict(LayoutCStream.open(d).convert(iter(tensors.items())))
    return b_tensors, c_to_b_config(config)[0]["quantization_config"]


def test_layout_c_streamed_at_load_lands_in_the_megamoe_layer(vc, layout_c_as_b) -> None:  # type: ignore[no-untyped-def]
    tensors, quant_cfg = layout_c_as_b
    _check_operands(_load(vc, tensors, quant_cfg), tensors)


def test_kernel_operands_decode_to_the_checkpoint_bytes(loaded_experts, layout_b) -> None:  # type: ignore[no-untyped-def]
    _check_operands(loaded_experts, layout_b[0])


def _check_operands(x, tensors: dict) -> None:  # type: ignore[no-untyped-def]
    w13, sf13, w2, sf2 = untransform_nvfp4_from_mega_moe(
        (x.w13_weight.data, x.w13_weight_scale.data), (x.w2_weight.data, x.w2_weight_scale.data))
    want_w13 = torch.cat([_stacked(tensors, LAYER, "w1", "weight"),
                          _stacked(tensors, LAYER, "w3", "weight")], dim=1)
    want_sf13 = torch.cat([_stacked(tensors, LAYER, "w1", "weight_scale"),
                           _stacked(tensors, LAYER, "w3", "weight_scale")], dim=1)
    assert torch.equal(w13, want_w13.view(torch.uint8))
    assert torch.equal(sf13.view(torch.uint8), want_sf13.view(torch.uint8))
    assert torch.equal(w2, _stacked(tensors, LAYER, "w2", "weight").view(torch.uint8))
    assert torch.equal(sf2.view(torch.uint8),
                       _stacked(tensors, LAYER, "w2", "weight_scale").view(torch.uint8))
    # MN-major int32 scale words, as the kernel reads them
    assert x.w13_weight_scale.dtype == torch.int32 and x.w13_weight_scale.stride(-2) == 1
    # per-expert scalars and the layer-wide FC2 activation scale
    assert torch.equal(x.w13_weight_scale_2.data, _stacked(tensors, LAYER, "w1", "weight_scale_2"))
    assert torch.equal(x.w13_weight_scale_2.data, _stacked(tensors, LAYER, "w3", "weight_scale_2"))
    assert torch.equal(x.w2_weight_scale_2.data, _stacked(tensors, LAYER, "w2", "weight_scale_2"))
    w2_in = _stacked(tensors, LAYER, "w2", "input_scale")
    assert torch.equal(x.w2_input_scale.data, w2_in)
    assert x.l2_activation_scale == float(w2_in.max())


def test_operand_weights_dequantize_like_the_checkpoint(loaded_experts, layout_b) -> None:  # type: ignore[no-untyped-def]
    """Decoded operand × per-expert alpha == ModelOpt-exact dequantization of the checkpoint."""
    tensors = layout_b[0]
    x = loaded_experts
    w13, sf13, w2, sf2 = untransform_nvfp4_from_mega_moe(
        (x.w13_weight.data, x.w13_weight_scale.data), (x.w2_weight.data, x.w2_weight_scale.data))
    i = DIMS["moe_intermediate_size"]
    for e in range(DIMS["n_routed_experts"]):
        got13 = dequantize_nvfp4(w13[e], sf13[e], x.w13_weight_scale_2.data[e])
        got2 = dequantize_nvfp4(w2[e], sf2[e], x.w2_weight_scale_2.data[e])
        for w, rows in (("w1", slice(0, i)), ("w3", slice(i, 2 * i))):
            base = f"layers.{LAYER}.ffn.experts.{e}.{w}"
            want = dequantize_nvfp4(tensors[f"{base}.weight"].view(torch.uint8),
                                    tensors[f"{base}.weight_scale"],
                                    tensors[f"{base}.weight_scale_2"])
            assert torch.equal(got13[rows], want), (e, w)
        base = f"layers.{LAYER}.ffn.experts.{e}.w2"
        want = dequantize_nvfp4(tensors[f"{base}.weight"].view(torch.uint8),
                                tensors[f"{base}.weight_scale"], tensors[f"{base}.weight_scale_2"])
        assert torch.equal(got2, want), (e, "w2")


class _Fp8Linear(torch.nn.Module):
    """What ``_fusable_shared_experts`` reads of vLLM's FP8 block linear: weight + UE8M0 scale."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(weight, requires_grad=False)
        self.weight_scale_inv = torch.nn.Parameter(scale, requires_grad=False)


def test_fp8_ue8m0_shared_experts_fuse_as_mxfp8_losslessly(vc, sm100, layout_b) -> None:  # type: ignore[no-untyped-def]
    from vllm.model_executor.layers.fused_moe.deep_gemm_mega_moe import _MXFP8_WEIGHT

    tensors = layout_b[0]
    base = f"layers.{LAYER}.ffn.shared_experts"
    w1, w3, w2 = (tensors[f"{base}.{w}.weight"] for w in ("w1", "w3", "w2"))
    s1, s3, s2 = (tensors[f"{base}.{w}.scale"] for w in ("w1", "w3", "w2"))
    assert w1.dtype == torch.float8_e4m3fn and s1.dtype == torch.float8_e8m0fnu
    shared = torch.nn.Module()
    shared.gate_up_proj = _Fp8Linear(torch.cat([w1, w3]), torch.cat([s1, s3]))
    shared.down_proj = _Fp8Linear(w2, s2)
    with nvfp4_scope(vc, "test"):
        moe = _build_experts(vc, LAYER, shared=shared)
    x = moe.experts
    assert x.has_fused_shared_experts and x.shared_spec is _MXFP8_WEIGHT
    assert moe.shared_experts is None  # vLLM drops its own shared MLP when fused

    for name, t in _layer_stream(tensors, LAYER, ".ffn.shared_experts."):
        x.load_shared_expert_weight(name, t)
    l1_w = x.shared_l1_weight.data.unsqueeze(0)
    l1_sf = x.shared_l1_weight_scale.data.unsqueeze(0)
    l2_w = x.shared_l2_weight.data.unsqueeze(0)
    l2_sf = x.shared_l2_weight_scale.data.unsqueeze(0)
    # The same layout transforms as the routed experts (formats' inverses), 1x32 UE8M0 scales.
    from dsv4_nvfp4.formats import deinterleave_gate_up, from_mn_major, utccp_untranspose_sf

    h, s = DIMS["hidden_size"], DIMS["moe_intermediate_size"]
    gate_up = deinterleave_gate_up(l1_w.view(torch.uint8))[0]
    assert torch.equal(gate_up, torch.cat([w1, w3]).view(torch.uint8))
    assert torch.equal(l2_w[0].view(torch.uint8), w2.view(torch.uint8))
    sf13 = unpack_sf_int32_to_bytes(from_mn_major(deinterleave_gate_up(
        utccp_untranspose_sf(l1_sf))), h // 32)[0]
    sf2 = unpack_sf_int32_to_bytes(from_mn_major(utccp_untranspose_sf(l2_sf)), s // 32)[0]

    def mxfp8(w: torch.Tensor, sf: torch.Tensor) -> torch.Tensor:
        scale = torch.exp2(sf.to(torch.float32) - 127).repeat_interleave(32, dim=1)
        return w.to(torch.float32) * scale

    want13 = torch.cat([dequantize_fp8_block(w1, s1), dequantize_fp8_block(w3, s3)])
    assert torch.equal(mxfp8(torch.cat([w1, w3]), sf13), want13.to(torch.float32))
    assert torch.equal(mxfp8(w2, sf2), dequantize_fp8_block(w2, s2).to(torch.float32))
    assert sf13.shape == (2 * s, h // 32)


def test_kernel_math_from_the_loaded_operands_equals_the_checkpoints(
        loaded_experts, layout_b, vc) -> None:  # type: ignore[no-untyped-def]
    """vLLM's NVFP4 MegaMoE semantics (``formats.nvfp4_mega_moe_reference``, per-token FC1,
    layer-wide FC2 scale) run on what vLLM loaded gives the same output, bit for bit, as on
    the checkpoint's own tensors — and it is not a trivial output."""
    from dsv4_nvfp4.formats import nvfp4_mega_moe_reference

    tensors = layout_b[0]
    x = loaded_experts
    hf = vc.model_config.hf_config
    gen = torch.Generator().manual_seed(11)
    t, k, e = 24, hf.num_experts_per_tok, DIMS["n_routed_experts"]
    hidden = (torch.randn(t, DIMS["hidden_size"], generator=gen) * 3).to(torch.bfloat16)
    ids = torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(t)])
    weights = torch.rand(t, k, generator=gen)
    w13, sf13, w2, sf2 = untransform_nvfp4_from_mega_moe(
        (x.w13_weight.data, x.w13_weight_scale.data), (x.w2_weight.data, x.w2_weight_scale.data))
    from_vllm = nvfp4_mega_moe_reference(
        hidden, ids, weights, w13, sf13, x.w13_weight_scale_2.data, w2, sf2,
        x.w2_weight_scale_2.data, x.w2_input_scale.data, swiglu_limit=hf.swiglu_limit,
        activation_scale=x.l2_activation_scale)
    from_checkpoint = nvfp4_mega_moe_reference(
        hidden, ids, weights,
        torch.cat([_stacked(tensors, LAYER, "w1", "weight"),
                   _stacked(tensors, LAYER, "w3", "weight")], dim=1).view(torch.uint8),
        torch.cat([_stacked(tensors, LAYER, "w1", "weight_scale"),
                   _stacked(tensors, LAYER, "w3", "weight_scale")], dim=1),
        _stacked(tensors, LAYER, "w1", "weight_scale_2"),
        _stacked(tensors, LAYER, "w2", "weight").view(torch.uint8),
        _stacked(tensors, LAYER, "w2", "weight_scale"),
        _stacked(tensors, LAYER, "w2", "weight_scale_2"),
        _stacked(tensors, LAYER, "w2", "input_scale"), swiglu_limit=hf.swiglu_limit)
    assert torch.equal(from_vllm, from_checkpoint)
    assert from_vllm.shape == hidden.shape and bool(from_vllm.float().abs().amax() > 0)

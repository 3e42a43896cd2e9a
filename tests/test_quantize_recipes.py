"""Recipe → ModelOpt config: the rules, and what they do to a real DeepSeek V4 module tree."""

from __future__ import annotations

import copy

import pytest
import torch

from dsv4_nvfp4.quantize.recipes import (
    ALWAYS_OFF,
    Recipe,
    check_nvfp4_attributes,
    expects_quantized,
    modelopt_config,
    nvfp4_attributes,
    nvfp4_attributes_from_modelopt,
)

pytestmark = pytest.mark.cpu

mtq = pytest.importorskip("modelopt.torch.quantization")


def test_nvfp4_attributes_are_nvfp4() -> None:
    attrs = nvfp4_attributes_from_modelopt()
    assert tuple(attrs["num_bits"]) == (2, 1)          # E2M1
    assert attrs["block_sizes"][-1] == 16              # 16 values per block, along K
    assert attrs["block_sizes"]["type"] == "dynamic"   # block scales from the data
    assert tuple(attrs["block_sizes"]["scale_bits"]) == (4, 3)  # E4M3 block scales


def test_changed_modelopt_default_is_refused() -> None:
    cfg = copy.deepcopy(mtq.NVFP4_DEFAULT_CFG)
    for e in cfg["quant_cfg"]:
        if e.get("quantizer_name") == "*weight_quantizer":
            e["cfg"]["block_sizes"]["scale_bits"] = (8, 0)   # MXFP4-style UE8M0 scales
    with pytest.raises(RuntimeError, match="scale_bits"):
        nvfp4_attributes(cfg)
    with pytest.raises(RuntimeError, match="expected"):
        check_nvfp4_attributes({"num_bits": 8})


def test_experts_config_shape() -> None:
    cfg = modelopt_config(Recipe.EXPERTS, nvfp4_attributes_from_modelopt())
    rules = cfg["quant_cfg"]
    assert cfg["algorithm"] == "max"
    assert rules[0] == {"quantizer_name": "*", "enable": False}
    assert [r["quantizer_name"] for r in rules[1:]] == ["*mlp.experts.*weight_quantizer",
                                                        "*mlp.experts.*input_quantizer"]
    assert all(r["enable"] and tuple(r["cfg"]["num_bits"]) == (2, 1) for r in rules[1:])


def test_full_config_is_modelopt_default_plus_always_off() -> None:
    cfg = modelopt_config(Recipe.FULL, nvfp4_attributes_from_modelopt())
    base = mtq.NVFP4_DEFAULT_CFG["quant_cfg"]
    assert cfg["quant_cfg"][:len(base)] == base
    assert cfg["quant_cfg"][len(base):] == [{"quantizer_name": p, "enable": False}
                                            for p in ALWAYS_OFF]


@pytest.mark.parametrize("name, experts, full", [
    ("model.layers.3.mlp.experts", True, True),
    ("model.layers.3.mlp.shared_experts.gate_proj", False, True),
    ("model.layers.3.self_attn.q_a_proj", False, True),
    ("model.layers.3.self_attn.o_a_proj", False, True),
    ("model.layers.3.self_attn.compressor.indexer.scorer.weights_proj", False, True),
    ("model.layers.3.mlp.gate", False, False),
    ("lm_head", False, False),
])
def test_expects_quantized(name: str, experts: bool, full: bool) -> None:
    assert expects_quantized(Recipe.EXPERTS, name) is experts
    assert expects_quantized(Recipe.FULL, name) is full


def _small_model():
    import transformers
    from test_quantize_support import small_config

    cfg = transformers.DeepseekV4Config(**small_config(mtp=False))
    torch.manual_seed(0)
    return transformers.DeepseekV4ForCausalLM(cfg).to(torch.bfloat16).eval()


def _enabled(model) -> set[str]:
    from modelopt.torch.quantization.nn import TensorQuantizer

    return {n for n, m in model.named_modules() if isinstance(m, TensorQuantizer) and m.is_enabled}


@pytest.mark.parametrize("recipe", list(Recipe))
def test_config_on_real_module_tree(recipe: Recipe) -> None:
    """Which quantizers each recipe turns on in transformers' DeepseekV4ForCausalLM."""
    model = _small_model()
    mtq.quantize(model, modelopt_config(recipe, nvfp4_attributes_from_modelopt()), None)
    on = _enabled(model)
    n_exp = model.config.n_routed_experts
    expert_q = {f"model.layers.{layer}.mlp.experts.{kind}" for layer in range(3)
                for kind in ["gate_up_proj_input_quantizer", "down_proj_input_quantizer"]
                + [f"{p}_weight_quantizers.{e}" for p in ("gate_up_proj", "down_proj")
                   for e in range(n_exp)]}
    assert expert_q <= on                                   # every expert, every layer
    if recipe is Recipe.EXPERTS:
        assert on == expert_q                               # and nothing else
        return
    dense = {n for n in on if n not in expert_q}
    assert "model.layers.1.self_attn.q_a_proj.weight_quantizer" in dense
    assert "model.layers.1.self_attn.compressor.indexer.scorer.weights_proj.input_quantizer" \
        in dense
    assert "model.layers.0.mlp.shared_experts.down_proj.weight_quantizer" in dense
    assert not any(".mlp.gate." in n or "lm_head" in n for n in dense)   # router, head off
    assert not any("o_a_proj" in n for n in dense)   # trap 3: ModelOpt gives it no quantizer

"""Layout B's tensor names against vLLM 0.32.0's own loader code (mapper + expert mapping).

The converter's output is only useful if the pinned vLLM loads it; this runs every tensor name
of a tiny layout-B checkpoint through ``_make_deepseek_v4_weights_mapper`` (the WeightsMapper
DeepseekV4ForCausalLM applies), then the expert mapping its ``load_weights`` uses, and checks
the parameter each lands on is one ``ModelOptNvFp4FusedMoE.create_weights`` registers.
"""

from __future__ import annotations

import inspect
import re

import pytest

from dsv4_nvfp4.checkpoint.layouts import Layout
from dsv4_nvfp4.checkpoint.names import is_mtp
from dsv4_nvfp4.checkpoint.schema import expert_key
from dsv4_nvfp4.checkpoint.tiny import build, tiny_dims_config

pytestmark = pytest.mark.cpu


def test_layout_b_names_land_on_vllm_parameters() -> None:
    model = pytest.importorskip("vllm.models.deepseek_v4.nvidia.model")
    from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts
    from vllm.model_executor.layers.quantization.modelopt import ModelOptNvFp4FusedMoE

    cfg = tiny_dims_config(mtp=True, cpu_servable=False)
    tensors, config, _ = build(Layout.B, cfg)
    mapper = model._make_deepseek_v4_weights_mapper(config.get("expert_dtype", "fp4"))
    nvfp4_params = set(re.findall(r'register_parameter\(\s*"(\w+)"',
                                  inspect.getsource(ModelOptNvFp4FusedMoE.create_weights)))
    assert {"w13_weight", "w13_weight_scale", "w13_weight_scale_2", "w13_input_scale",
            "w2_weight", "w2_weight_scale", "w2_weight_scale_2", "w2_input_scale"} <= nvfp4_params
    mapping = RoutedExperts.build_expert_params_mapping(
        "w1", "w2", "w3", num_experts=cfg["n_routed_experts"], routed_experts_prefix="")
    landed = set()
    for name in tensors:
        mapped = mapper._map_name(name)
        if is_mtp(name):
            assert mapped is None, name  # the main model's mapper drops mtp.* (MTP loads it)
            continue
        assert mapped is not None and mapped.startswith(("model.", "lm_head.")), name
        mod = name.rpartition(".")[0]
        if expert_key(mod) is not None:
            hits = [(p, w) for p, w, _, _ in mapping if w in mapped]
            assert len(hits) == 1, (name, hits)
            param = mapped.replace(hits[0][1], hits[0][0])
            leaf = param.rsplit(".", 1)[1]
            assert leaf in nvfp4_params, (name, param)
            landed.add(leaf)
        elif name.endswith(".scale"):
            assert mapped.endswith(".weight_scale_inv"), (name, mapped)  # FP8 block scale
    assert landed == {"w13_weight", "w13_weight_scale", "w13_weight_scale_2", "w13_input_scale",
                      "w2_weight", "w2_weight_scale", "w2_weight_scale_2", "w2_input_scale"}
    assert mapper._map_name("head.weight") == "lm_head.weight"
    assert mapper._map_name("layers.1.ffn.gate.bias") == \
        "model.layers.1.ffn.gate.e_score_correction_bias"

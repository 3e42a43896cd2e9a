"""MTP on NVFP4: which MoE method vLLM 0.32.0 gives each routed-expert layer of a layout-B model.

Layout B keeps the MTP draft layer's experts in native MXFP4 (``mtp.*`` is
excluded from quantization) while ``moe_quant_algo: NVFP4`` is global. The
draft is built as ``model.layers.{num_hidden_layers}`` with the target's quant
config (``vllm/models/deepseek_v4/nvidia/mtp.py``). These tests run vLLM's own
config objects (a real ``VllmConfig`` from ``EngineArgs`` for a tiny layout-B
config.json) and vLLM's own ``get_quant_method``.
"""

from __future__ import annotations

import inspect

import pytest
from test_plugin_helpers import (
    engine_config,
    expert_methods,
    layout_b_quant_config,
    routed_experts_layer,
    write_layout_b_config,
)

pytestmark = pytest.mark.cpu

NVFP4 = "ModelOptNvFp4FusedMoE"
MXFP4 = "Mxfp4MoEMethod"


@pytest.fixture(scope="module")
def vllm_config(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    return engine_config(write_layout_b_config(tmp_path_factory.mktemp("layout_b"),
                                               layout_b_quant_config(ignore=None)))


@pytest.fixture(scope="module")
def experts_layer(vllm_config):  # type: ignore[no-untyped-def]
    return routed_experts_layer(vllm_config)


def methods(quant_config, layer, vllm_config, quant_cfg: dict) -> list[str]:  # type: ignore[no-untyped-def]
    """Method class per experts layer: target layers 0..L-1, then the MTP layer L."""
    return [type(m).__name__ for m in expert_methods(quant_config, layer, vllm_config, quant_cfg)]


def test_mtp_layer_prefix_is_what_the_rules_assume() -> None:
    """Tripwire: vLLM names MTP layer k ``{prefix}.layers.{num_hidden_layers + k}``."""
    from vllm.models.deepseek_v4.nvidia import mtp

    src = inspect.getsource(mtp.DeepSeekV4MultiTokenPredictor.__init__)
    assert 'f"{prefix}.layers.{idx}"' in src
    assert "self.mtp_start_layer_idx = config.num_hidden_layers" in src
    assert "quant_config = vllm_config.quant_config" in inspect.getsource(
        mtp.DeepSeekV4MultiTokenPredictorLayer.__init__)


def test_vllm_builds_our_quant_config(vllm_config) -> None:  # type: ignore[no-untyped-def]
    from vllm.models.deepseek_v4.quant_config import DeepseekV4FP8Config

    qc = vllm_config.quant_config
    assert type(qc).__name__ == "Dsv4Nvfp4DeepseekV4FP8Config"
    assert type(qc).__mro__[1] is DeepseekV4FP8Config  # the class vLLM picks on CPU
    assert qc.get_name() == "deepseek_v4_fp8"
    # spawned engine processes receive the VllmConfig pickled: the class is importable
    import pickle

    assert type(pickle.loads(pickle.dumps(qc))) is type(qc)


@pytest.mark.parametrize("quant_cfg", [
    layout_b_quant_config(ignore=None),  # exclude_modules only
    layout_b_quant_config(exclude_modules=None),  # ignore only
    layout_b_quant_config(ignore=None, exclude_modules=None, quantized_layers={
        f"layers.{i}.ffn.experts.{e}.w{w}": {"quant_algo": "NVFP4", "group_size": 16}
        for i in range(3) for e in range(2) for w in (1, 2, 3)}),
], ids=["exclude_modules", "ignore", "quantized_layers"])
def test_plugin_gives_the_draft_its_native_method(vllm_config, experts_layer, quant_cfg) -> None:  # type: ignore[no-untyped-def]
    got = methods(vllm_config.quant_config, experts_layer, vllm_config, quant_cfg)
    assert got == [NVFP4, NVFP4, NVFP4, MXFP4]


def test_stock_cpu_class_gives_the_draft_nvfp4(vllm_config, experts_layer) -> None:  # type: ignore[no-untyped-def]
    """vllm/models/deepseek_v4/quant_config.py: every fp4 RoutedExperts → NVFP4 (the bug)."""
    from vllm.models.deepseek_v4.quant_config import DeepseekV4FP8Config

    cfg = layout_b_quant_config()
    stock = DeepseekV4FP8Config.from_config(cfg)
    assert methods(stock, experts_layer, vllm_config, cfg) == [NVFP4] * 4


@pytest.mark.parametrize(("quant_cfg", "stock_mtp"), [
    (layout_b_quant_config(exclude_modules=None), MXFP4),  # 0.32.0 handles `ignore`
    (layout_b_quant_config(ignore=None), NVFP4),  # ... but not exclude_modules
    (layout_b_quant_config(ignore=None, exclude_modules=None, quantized_layers={
        "layers.0.ffn.experts.0.w1": {"quant_algo": "NVFP4"}}), NVFP4),  # nor quantized_layers
], ids=["ignore", "exclude_modules", "quantized_layers"])
def test_cuda_class_stock_and_plugin(vllm_config, experts_layer, quant_cfg, stock_mtp) -> None:  # type: ignore[no-untyped-def]
    """The class CUDA uses (deepseek_v41/quant_config.py): stock vs our subclass of it."""
    from vllm.models.deepseek_v41.quant_config import DeepseekV4FP8Config as CudaConfig

    from dsv4_nvfp4.vllm_plugin.quant_config import checkpoint_aware_config_class

    stock = CudaConfig.from_config(quant_cfg)
    assert methods(stock, experts_layer, vllm_config, quant_cfg)[-1] == stock_mtp
    ours = checkpoint_aware_config_class(CudaConfig).from_config(quant_cfg)
    got = methods(ours, experts_layer, vllm_config, quant_cfg)
    want_main = NVFP4 if "quantized_layers" not in quant_cfg else None
    assert got[-1] == MXFP4
    if want_main:
        assert got[:-1] == [NVFP4] * 3
    else:  # only layers.0 is listed as NVFP4
        assert got[:-1] == [NVFP4, MXFP4, MXFP4]


def test_non_nvfp4_checkpoint_is_untouched(vllm_config, experts_layer) -> None:  # type: ignore[no-untyped-def]
    cfg = layout_b_quant_config(moe_quant_algo=None)
    assert methods(vllm_config.quant_config, experts_layer, vllm_config, cfg) == [MXFP4] * 4

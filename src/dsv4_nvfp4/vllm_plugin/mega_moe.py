"""DeepSeek V4's NVFP4 routed experts on vLLM's own NVFP4 MegaMoE (vLLM 0.34.0).

vLLM 0.34.0 ships a generic NVFP4 MegaMoE layer: ``DeepGemmMegaMoEExperts`` with
``weight_format=MEGA_MOE_NVFP4`` (``vllm/model_executor/layers/fused_moe/
deep_gemm_mega_moe.py``) runs the vendored DeepGEMM ``nvfp4_mega_moe`` kernel with
vLLM's own per-token NVFP4 staging, EPLB and fused shared experts. DeepSeek V4 does
not select it: ``DeepseekV4MoE._init_mega_moe_experts``
(``vllm/models/deepseek_v4/nvidia/model.py``) always passes ``MEGA_MOE_MXFP4``, so a
layout-B checkpoint with ``--moe-backend deep_gemm_mega_moe`` dies at load with
``KeyError: ...experts.w13_input_scale``.

What this module adds, and nothing else:

* :func:`experts_factory` — a stand-in for the ``DeepGemmMegaMoEExperts`` name inside
  the NVIDIA model module while OUR model constructors run (:func:`nvfp4_scope`). It
  passes every argument through to vLLM's class and changes one: layers whose
  checkpoint experts are NVFP4 (:func:`dsv4_nvfp4.checkpoint.expert_quant.experts_are_nvfp4`,
  the rule ``verify`` and ``inspect`` use) get ``MEGA_MOE_NVFP4``; the rest (the MTP
  draft layer, whose experts stay MXFP4) keep vLLM's ``MEGA_MOE_MXFP4``.
* :func:`without_unused_input_scales` — drops the w1/w3 ``input_scale`` of NVFP4
  experts from the weight stream. vLLM's NVFP4 MegaMoE scales FC1 inputs per token
  and registers no ``w13_input_scale`` (its docstring says so); MiniMax M3's loader
  drops them the same way. w2 ``input_scale`` stays: vLLM keeps its maximum over all
  experts as the FC2 activation scale.

The choice itself is vLLM's flag: ``--moe-backend deep_gemm_mega_moe`` (with expert
parallel, which vLLM enforces) puts NVFP4 layers here; any other value leaves them on
vLLM's FusedMoE NVFP4 path. No environment variable of ours takes part.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from types import ModuleType
from typing import Any

from dsv4_nvfp4.checkpoint.expert_quant import (
    checkpoint_experts_name,
    experts_are_nvfp4,
    experts_module_of,
)
from dsv4_nvfp4.vllm_plugin.patch_register import MEGA_MOE_FORMAT_SUBSTITUTION

logger = logging.getLogger("vllm.dsv4_nvfp4.mega_moe")

#: vLLM's ``--moe-backend`` value of its native DeepGEMM MegaMoE.
MEGA_MOE_BACKEND = "deep_gemm_mega_moe"
NVIDIA_MODEL_MODULE = MEGA_MOE_FORMAT_SUBSTITUTION.module
EXPERTS_SYMBOL = MEGA_MOE_FORMAT_SUBSTITUTION.symbol
FORMATS_MODULE = "vllm.model_executor.layers.fused_moe.deep_gemm_mega_moe"
NVFP4_FORMAT_SYMBOL = "MEGA_MOE_NVFP4"
MXFP4_FORMAT_SYMBOL = "MEGA_MOE_MXFP4"

# Suffixes of the FC1 activation scales of one routed expert (DeepSeek names).
_FC1_INPUT_SCALES = (".w1.input_scale", ".w3.input_scale")


class MegaMoEUnavailable(RuntimeError):
    """The installed vLLM lacks the NVFP4 MegaMoE this plugin selects (message says what)."""


def quant_cfg_of(hf_config: Any) -> dict[str, Any]:
    """The checkpoint's ``quantization_config`` as a plain dict ({} when absent)."""
    cfg = getattr(hf_config, "quantization_config", None) or {}
    return cfg if isinstance(cfg, dict) else dict(cfg)


def uses_mega_moe(vllm_config: Any) -> bool:
    """True when vLLM was asked for its native DeepGEMM MegaMoE (``--moe-backend``)."""
    return str(vllm_config.kernel_config.moe_backend) == MEGA_MOE_BACKEND


def experts_factory(original: type, nvfp4_format: Any, mxfp4_format: Any,
                    quant_cfg: Mapping[str, Any], num_hidden_layers: int,
                    chosen: dict[str, str]) -> Callable[..., Any]:
    """Stand-in for ``DeepGemmMegaMoEExperts(vllm_config, **kwargs)``.

    NVFP4 layers get ``weight_format=nvfp4_format``; every other argument, and every
    other layer, goes to vLLM's class unchanged. ``chosen`` records
    ``{checkpoint experts name: format name}`` for the log line and the tests.
    """

    def build(vllm_config: Any, **kwargs: Any) -> Any:
        prefix = kwargs.get("prefix", "")
        name = checkpoint_experts_name(prefix, num_hidden_layers)
        if (name is not None and kwargs.get("weight_format") is mxfp4_format
                and experts_are_nvfp4(name, quant_cfg)):
            kwargs["weight_format"] = nvfp4_format
        fmt = kwargs.get("weight_format")
        chosen[name or prefix] = getattr(fmt, "name", str(fmt))
        return original(vllm_config, **kwargs)

    build.__dsv4_nvfp4_wraps__ = original  # type: ignore[attr-defined]
    return build


def _require(module: ModuleType, symbol: str) -> Any:
    value = getattr(module, symbol, None)
    if value is None:
        import vllm

        raise MegaMoEUnavailable(
            f"dsv4_nvfp4: {module.__name__}.{symbol} not found in vLLM {vllm.__version__}; "
            "the NVFP4 MegaMoE needs vLLM 0.34.0 (the pinned image)")
    return value


@contextlib.contextmanager
def substituted(module: ModuleType, symbol: str, replacement: Any) -> Iterator[None]:
    """Swap ``module.symbol`` for the duration of a model constructor, then restore it."""
    original = getattr(module, symbol)
    setattr(module, symbol, replacement)
    try:
        yield
    finally:
        setattr(module, symbol, original)


@contextlib.contextmanager
def nvfp4_scope(vllm_config: Any, what: str) -> Iterator[dict[str, str]]:
    """Inside it, vLLM's NVIDIA DeepSeek V4 builds NVFP4 MegaMoE experts for NVFP4 layers.

    Yields the ``{experts name: format}`` record; logs one line when the scope ends.
    """
    import importlib

    model_module = importlib.import_module(NVIDIA_MODEL_MODULE)
    formats = importlib.import_module(FORMATS_MODULE)
    original = _require(model_module, EXPERTS_SYMBOL)
    mxfp4 = _require(model_module, MXFP4_FORMAT_SYMBOL)
    nvfp4 = _require(formats, NVFP4_FORMAT_SYMBOL)
    chosen: dict[str, str] = {}
    factory = experts_factory(
        original, nvfp4, mxfp4, quant_cfg_of(vllm_config.model_config.hf_config),
        int(vllm_config.model_config.hf_text_config.num_hidden_layers), chosen)
    with substituted(model_module, EXPERTS_SYMBOL, factory):
        yield chosen
    logger.info(summary_line(what, chosen))


def summary_line(what: str, chosen: Mapping[str, str]) -> str:
    """One log line: how many MegaMoE layers run which format, e.g. ``nvfp4: 61``."""
    counts: dict[str, int] = {}
    for fmt in chosen.values():
        counts[fmt] = counts.get(fmt, 0) + 1
    parts = ", ".join(f"{fmt}: {n}" for fmt, n in sorted(counts.items())) or "none"
    return (f"dsv4_nvfp4: {what} routed experts on vLLM's DeepGEMM MegaMoE, "
            f"layers per format: {parts}")


def without_unused_input_scales(weights: Iterable[tuple[str, Any]],
                                quant_cfg: Mapping[str, Any]) -> Iterator[tuple[str, Any]]:
    """The checkpoint stream minus w1/w3 ``input_scale`` of NVFP4 experts (see module doc)."""
    verdict: dict[str, bool] = {}
    for name, tensor in weights:
        experts = experts_module_of(name) if name.endswith(_FC1_INPUT_SCALES) else None
        if experts is not None:
            if experts not in verdict:
                verdict[experts] = experts_are_nvfp4(experts, quant_cfg)
            if verdict[experts]:
                continue
        yield name, tensor

"""Which routed-expert layers of a checkpoint are NVFP4: the one rule, read from its config.

``verify``, ``inspect``, ``convert`` (through :mod:`.layouts`) and the vLLM plugin (its
quantization config and its MegaMoE selection) all ask :func:`experts_are_nvfp4`, so
the linter and the server can never disagree about one checkpoint.

Why a rule of our own: a layout-B checkpoint (NVIDIA ModelOpt, experts-only NVFP4)
quantizes the routed experts of ``layers.*`` but keeps the MTP draft layer
(``mtp.*``) in its native MXFP4. vLLM decides the expert method from the global
``moe_quant_algo: NVFP4``; vLLM 0.34.0's CUDA config class
(``vllm/models/deepseek_v41/quant_config.py``) consults ``ignore`` only, and the
CPU/XPU class (``vllm/models/deepseek_v4/quant_config.py``) nothing at all. A
checkpoint that states its exclusions in ``exclude_modules`` or lists
``quantized_layers`` (ModelOpt MIXED_PRECISION) then gets NVFP4 kernels on MXFP4
bytes: the draft produces garbage and the MTP acceptance length collapses to ~1.2.

Pure functions on names and dicts (no vLLM import). Names are DeepSeek
checkpoint names (``layers.3.ffn.experts``, ``mtp.0.ffn.experts``), the names
the checkpoint's own lists use.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping
from typing import Any

_VLLM_EXPERTS_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.ffn\.experts$")
_EXCLUDE_KEYS = ("ignore", "exclude_modules")


def checkpoint_experts_name(vllm_prefix: str, num_hidden_layers: int) -> str | None:
    """``model.layers.61.ffn.experts`` → ``mtp.0.ffn.experts`` (61 layers); None if not experts.

    vLLM builds the MTP draft layers as ``layers.{num_hidden_layers + k}``
    (``vllm/models/deepseek_v4/nvidia/mtp.py``); the checkpoint names them ``mtp.{k}``.
    """
    m = _VLLM_EXPERTS_RE.search(vllm_prefix)
    if m is None:
        return None
    idx = int(m.group(1))
    layer = f"mtp.{idx - num_hidden_layers}" if idx >= num_hidden_layers else f"layers.{idx}"
    return f"{layer}.ffn.experts"


def exclusion_patterns(quant_cfg: Mapping[str, Any]) -> tuple[str, ...]:
    """The union of ``ignore`` and ``exclude_modules`` (fnmatch patterns, DeepSeek names)."""
    out: list[str] = []
    for key in _EXCLUDE_KEYS:
        value = quant_cfg.get(key) or []
        if isinstance(value, str):
            value = [value]
        out.extend(p for p in value if isinstance(p, str) and p not in out)
    return tuple(out)


def _excluded(experts_name: str, patterns: tuple[str, ...]) -> bool:
    # Test the module itself and a representative linear inside it, so both
    # "mtp.*" and "*.experts.*.w1" style patterns match.
    probes = (experts_name, f"{experts_name}.0", f"{experts_name}.0.w1")
    return any(fnmatch.fnmatchcase(n, p) for n in probes for p in patterns)


def _listed_nvfp4(experts_name: str, quantized_layers: Mapping[str, Any] | list[str]) -> bool:
    prefix = experts_name + "."
    if not isinstance(quantized_layers, Mapping):  # a plain list names NVFP4 modules
        return any(n == experts_name or n.startswith(prefix) for n in quantized_layers)
    for name, spec in quantized_layers.items():
        if name == experts_name or name.startswith(prefix):
            algo = spec.get("quant_algo", "") if isinstance(spec, Mapping) else spec
            if str(algo).upper() == "NVFP4":
                return True
    return False


def experts_are_nvfp4(experts_name: str, quant_cfg: Mapping[str, Any]) -> bool:
    """True when the checkpoint stores ``experts_name``'s routed experts as NVFP4.

    NVFP4 needs all of: global ``moe_quant_algo`` NVFP4; not matched by
    ``ignore``/``exclude_modules``; and, when ``quantized_layers`` is present,
    listed there with ``quant_algo`` NVFP4 (ModelOpt omits unquantized layers
    from that map). A layer failing any test keeps the native expert format.
    """
    if str(quant_cfg.get("moe_quant_algo") or "").upper() != "NVFP4":
        return False
    if _excluded(experts_name, exclusion_patterns(quant_cfg)):
        return False
    quantized_layers = quant_cfg.get("quantized_layers")
    if isinstance(quantized_layers, Mapping | list) and quantized_layers:
        return _listed_nvfp4(experts_name, quantized_layers)
    return True


_EXPERTS_OF = re.compile(r"^((?:layers|mtp)\.\d+\.ffn\.experts)(?:\.|$)")


def experts_module_of(name: str) -> str | None:
    """``layers.3.ffn.experts.7.w1(.weight)`` → ``layers.3.ffn.experts``; None if not experts."""
    m = _EXPERTS_OF.match(name)
    return None if m is None else m.group(1)

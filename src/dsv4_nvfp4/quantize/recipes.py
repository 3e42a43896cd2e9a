"""Recipes: which DeepSeek V4 linears become NVFP4, as ModelOpt quantizer configs.

Two recipes, named by what they quantize:

``experts`` (default)
    Only the routed experts, NVFP4 W4A4 (weights and a calibrated static
    ``input_scale``), like NVIDIA's published DeepSeek-V4-Pro-NVFP4. Attention,
    shared experts, router, embeddings and head stay BF16 in the export and
    ``convert`` turns the dense linears into FP8 128x128 (layout B).
``full``
    Every linear ModelOpt's ``NVFP4_DEFAULT_CFG`` quantizes (what the earlier
    attempt ran); ``convert`` then requantizes attention and shared experts to
    FP8 and dequantizes the compressors to BF16, as vLLM needs.

This module owns the *which*: ordered (wildcard, on/off) rules in ModelOpt's
0.47 list format. The NVFP4 attributes themselves (E2M1 values, dynamic
16-blocks, E4M3 scales) are taken from ModelOpt's own ``NVFP4_DEFAULT_CFG`` at
run time so they can never drift from the exporter that reads them; a test
pins what they must be.

Quantizer names ModelOpt gives transformers' ``DeepseekV4ForCausalLM``:
``model.layers.L.mlp.experts.gate_up_proj_weight_quantizers.E`` and
``...down_proj_weight_quantizers.E`` (one per expert; ModelOpt strips the
``s.E`` before matching), ``...gate_up_proj_input_quantizer`` and
``...down_proj_input_quantizer`` (one per layer, shared by all experts), and
``<linear>.weight_quantizer`` / ``<linear>.input_quantizer`` for nn.Linear.
"""

from __future__ import annotations

import copy
import enum
import fnmatch
from typing import Any


class Recipe(enum.Enum):
    EXPERTS = "experts"
    FULL = "full"


# Routed experts only. "*mlp.experts.*" cannot match "mlp.shared_experts.*".
ROUTED_EXPERT_PATTERNS = ("*mlp.experts.*weight_quantizer", "*mlp.experts.*input_quantizer")

# Linears that stay unquantized in every recipe (ModelOpt's defaults say the
# same for lm_head and the router; listed here so the audit knows them).
ALWAYS_OFF = ("*lm_head*", "*mlp.gate.*", "*embed_tokens*", "mtp.*")

def nvfp4_attributes_from_modelopt() -> dict[str, Any]:
    """The ``cfg`` of ModelOpt's NVFP4 weight quantizer, checked to be NVFP4.

    Raises RuntimeError if ModelOpt's default changed format (then the
    recipe would silently produce something that is not NVFP4).
    """
    import modelopt.torch.quantization as mtq

    return nvfp4_attributes(mtq.NVFP4_DEFAULT_CFG)


def nvfp4_attributes(default_cfg: dict) -> dict[str, Any]:
    """Pick the ``*weight_quantizer`` attributes out of an NVFP4_DEFAULT_CFG-shaped dict."""
    entries = [e for e in default_cfg["quant_cfg"]
               if isinstance(e, dict) and e.get("quantizer_name") == "*weight_quantizer"]
    if len(entries) != 1 or not isinstance(entries[0].get("cfg"), dict):
        raise RuntimeError("ModelOpt NVFP4_DEFAULT_CFG: expected one '*weight_quantizer' entry "
                           f"with a cfg dict, found {entries!r}")
    attrs = copy.deepcopy(entries[0]["cfg"])
    check_nvfp4_attributes(attrs)
    return attrs


def check_nvfp4_attributes(attrs: dict[str, Any]) -> None:
    nb = attrs.get("num_bits", ())
    num_bits = tuple(nb) if isinstance(nb, list | tuple) else nb
    blocks = attrs.get("block_sizes") or {}
    block = blocks.get(-1, blocks.get("-1"))
    found = (num_bits, block, blocks.get("type"), tuple(blocks.get("scale_bits", ())))
    want = ((2, 1), 16, "dynamic", (4, 3))
    if found != want:
        raise RuntimeError("ModelOpt NVFP4 quantizer: expected (num_bits, block, type, "
                           f"scale_bits) = {want}, found {found}")


def modelopt_config(recipe: Recipe, nvfp4: dict[str, Any],
                    default_cfg: dict | None = None) -> dict[str, Any]:
    """The ``mtq.quantize`` config for ``recipe``.

    ``nvfp4`` is the quantizer attribute dict (from
    :func:`nvfp4_attributes_from_modelopt`). ``full`` starts from ModelOpt's
    ``NVFP4_DEFAULT_CFG`` (``default_cfg``; read from ModelOpt when None) so it
    is exactly ModelOpt's "every linear", plus our always-off rules.
    """
    check_nvfp4_attributes(nvfp4)
    if recipe is Recipe.EXPERTS:
        rules: list[dict[str, Any]] = [{"quantizer_name": "*", "enable": False}]
        rules += [{"quantizer_name": p, "cfg": copy.deepcopy(nvfp4), "enable": True}
                  for p in ROUTED_EXPERT_PATTERNS]
        return {"quant_cfg": rules, "algorithm": "max"}
    if default_cfg is None:
        import modelopt.torch.quantization as mtq

        default_cfg = mtq.NVFP4_DEFAULT_CFG
    cfg = copy.deepcopy(default_cfg)
    cfg["quant_cfg"] = list(cfg["quant_cfg"]) + [
        {"quantizer_name": p, "enable": False} for p in ALWAYS_OFF]
    cfg["algorithm"] = "max"
    return cfg


def expects_quantized(recipe: Recipe, module_name: str) -> bool:
    """Should the linear ``module_name`` (transformers name) be NVFP4 under ``recipe``?

    The audit compares this against what ModelOpt actually did, so a linear
    ModelOpt skipped silently (``o_a_proj``) is found by name, not by luck.
    """
    probe = module_name + ".weight_quantizer"
    if any(fnmatch.fnmatchcase(probe, p) for p in ALWAYS_OFF):
        return False
    if recipe is Recipe.EXPERTS:
        return ".mlp.experts" in module_name and ".shared_experts" not in module_name
    return True

"""Tensor names: DeepSeek (layouts A, B, BF16) ↔ transformers/ModelOpt (layout C) ↔ vLLM modules.

One table, read in both directions, so the converter and the vLLM plugin's
load-time path cannot disagree on a rename. Each row maps a DeepSeek *prefix*
(a module, or a leaf tensor) to its transformers name; a tensor matches a row
when its name is the prefix itself or the prefix followed by ``.`` and a
suffix (``weight``, ``weight_scale``, ...), which is carried over unchanged.
The first matching row wins.

Sources for the rows: transformers 5.19 ``conversion_mapping.py`` entry
``deepseek_v4`` (the renames ``save_pretrained`` reverts; ModelOpt's export
keeps the transformers side), plus ModelOpt's per-expert split of the fused
experts into ``experts.E.{gate,up,down}_proj`` (as a real ModelOpt 0.45.0
export names them; ``tests/test_checkpoint_names.py`` holds that export's
names). ``mtp.*`` has no
transformers name: transformers never builds the MTP layer.

Pure functions of names, no I/O.
"""

from __future__ import annotations

import re
from functools import cache

# (DeepSeek prefix, transformers prefix); {L} = layer index, {E} = expert index.
C_NAME_RULES: tuple[tuple[str, str], ...] = (
    ("embed", "model.embed_tokens"),
    ("head", "lm_head"),
    ("norm", "model.norm"),
    ("hc_head_fn", "model.hc_head.hc_fn"),
    ("hc_head_base", "model.hc_head.hc_base"),
    ("hc_head_scale", "model.hc_head.hc_scale"),
    ("layers.{L}.attn_norm", "model.layers.{L}.input_layernorm"),
    ("layers.{L}.ffn_norm", "model.layers.{L}.post_attention_layernorm"),
    ("layers.{L}.hc_attn_fn", "model.layers.{L}.attn_hc.fn"),
    ("layers.{L}.hc_attn_base", "model.layers.{L}.attn_hc.base"),
    ("layers.{L}.hc_attn_scale", "model.layers.{L}.attn_hc.scale"),
    ("layers.{L}.hc_ffn_fn", "model.layers.{L}.ffn_hc.fn"),
    ("layers.{L}.hc_ffn_base", "model.layers.{L}.ffn_hc.base"),
    ("layers.{L}.hc_ffn_scale", "model.layers.{L}.ffn_hc.scale"),
    ("layers.{L}.attn.wq_a", "model.layers.{L}.self_attn.q_a_proj"),
    ("layers.{L}.attn.q_norm", "model.layers.{L}.self_attn.q_a_norm"),
    ("layers.{L}.attn.wq_b", "model.layers.{L}.self_attn.q_b_proj"),
    ("layers.{L}.attn.wkv", "model.layers.{L}.self_attn.kv_proj"),
    ("layers.{L}.attn.kv_norm", "model.layers.{L}.self_attn.kv_norm"),
    ("layers.{L}.attn.wo_a", "model.layers.{L}.self_attn.o_a_proj"),
    ("layers.{L}.attn.wo_b", "model.layers.{L}.self_attn.o_b_proj"),
    ("layers.{L}.attn.attn_sink", "model.layers.{L}.self_attn.sinks"),
    ("layers.{L}.attn.compressor.wkv", "model.layers.{L}.self_attn.compressor.kv_proj"),
    ("layers.{L}.attn.compressor.wgate", "model.layers.{L}.self_attn.compressor.gate_proj"),
    ("layers.{L}.attn.compressor.ape", "model.layers.{L}.self_attn.compressor.position_bias"),
    ("layers.{L}.attn.compressor.norm", "model.layers.{L}.self_attn.compressor.kv_norm"),
    ("layers.{L}.attn.indexer.wq_b", "model.layers.{L}.self_attn.compressor.indexer.q_b_proj"),
    ("layers.{L}.attn.indexer.weights_proj",
     "model.layers.{L}.self_attn.compressor.indexer.scorer.weights_proj"),
    ("layers.{L}.attn.indexer.compressor.wkv",
     "model.layers.{L}.self_attn.compressor.indexer.kv_proj"),
    ("layers.{L}.attn.indexer.compressor.wgate",
     "model.layers.{L}.self_attn.compressor.indexer.gate_proj"),
    ("layers.{L}.attn.indexer.compressor.ape",
     "model.layers.{L}.self_attn.compressor.indexer.position_bias"),
    ("layers.{L}.attn.indexer.compressor.norm",
     "model.layers.{L}.self_attn.compressor.indexer.kv_norm"),
    # leaves of the router first: the module row below would otherwise claim them
    ("layers.{L}.ffn.gate.bias", "model.layers.{L}.mlp.gate.e_score_correction_bias"),
    ("layers.{L}.ffn.gate.tid2eid", "model.layers.{L}.mlp.gate.tid2eid"),
    ("layers.{L}.ffn.gate", "model.layers.{L}.mlp.gate"),
    ("layers.{L}.ffn.experts.{E}.w1", "model.layers.{L}.mlp.experts.{E}.gate_proj"),
    ("layers.{L}.ffn.experts.{E}.w2", "model.layers.{L}.mlp.experts.{E}.down_proj"),
    ("layers.{L}.ffn.experts.{E}.w3", "model.layers.{L}.mlp.experts.{E}.up_proj"),
    ("layers.{L}.ffn.shared_experts.w1", "model.layers.{L}.mlp.shared_experts.gate_proj"),
    ("layers.{L}.ffn.shared_experts.w2", "model.layers.{L}.mlp.shared_experts.down_proj"),
    ("layers.{L}.ffn.shared_experts.w3", "model.layers.{L}.mlp.shared_experts.up_proj"),
)

# The vLLM 0.32.0 module a DeepSeek dense linear loads into (Fp8Config.ignored_layers
# names modules, and fused modules are matched by their fused name): attention.py
# ``fused_wqa_wkv`` (wq_a + wkv), ``wq_b``, ``wo_a``, ``wo_b``, ``indexer.wq_b``;
# nvidia/model.py shared experts ``gate_up_proj`` (w1 + w3) and ``down_proj`` (w2).
VLLM_MODULE_RULES: tuple[tuple[str, str], ...] = (
    ("layers.{L}.attn.wq_a", "model.layers.{L}.attn.fused_wqa_wkv"),
    ("layers.{L}.attn.wkv", "model.layers.{L}.attn.fused_wqa_wkv"),
    ("layers.{L}.attn.wq_b", "model.layers.{L}.attn.wq_b"),
    ("layers.{L}.attn.wo_a", "model.layers.{L}.attn.wo_a"),
    ("layers.{L}.attn.wo_b", "model.layers.{L}.attn.wo_b"),
    ("layers.{L}.attn.indexer.wq_b", "model.layers.{L}.attn.indexer.wq_b"),
    ("layers.{L}.ffn.shared_experts.w1", "model.layers.{L}.ffn.shared_experts.gate_up_proj"),
    ("layers.{L}.ffn.shared_experts.w3", "model.layers.{L}.ffn.shared_experts.gate_up_proj"),
    ("layers.{L}.ffn.shared_experts.w2", "model.layers.{L}.ffn.shared_experts.down_proj"),
)


def _pattern(template: str) -> str:
    out = re.escape(template)
    return out.replace(re.escape("{L}"), r"(?P<L>\d+)").replace(re.escape("{E}"), r"(?P<E>\d+)")


@cache
def _compiled(rules: tuple[tuple[str, str], ...], reverse: bool
              ) -> list[tuple[re.Pattern[str], str]]:
    out = []
    for ds, c in rules:
        src, dst = (c, ds) if reverse else (ds, c)
        out.append((re.compile(_pattern(src) + r"(?P<rest>\..+)?$"), dst))
    return out


# Dot-delimited numbers (layer and expert indices) only ever match a rule's {L} / {E}: no
# rule has a purely numeric literal component. So which rule a name matches depends only on
# its shape with those numbers zeroed, and the first-match search runs once per shape
# (a few hundred in V4 Pro) instead of once per tensor (~280 k: ~45 regexes each).
_INDEX = re.compile(r"(?<=\.)\d+(?=\.|$)")


def index_shape(name: str) -> str:
    """``name`` with every dot-delimited number (layer, expert index) replaced by 0."""
    return _INDEX.sub("0", name)


@cache
def _rule_for_shape(rules: tuple[tuple[str, str], ...], reverse: bool, shape: str) -> int | None:
    for i, (pat, _) in enumerate(_compiled(rules, reverse)):
        if pat.match(shape):
            return i
    return None


def _apply(rules: tuple[tuple[str, str], ...], reverse: bool, name: str) -> str | None:
    i = _rule_for_shape(rules, reverse, index_shape(name))
    if i is None:
        return None
    pat, dst = _compiled(rules, reverse)[i]
    m = pat.match(name)
    assert m is not None, name  # same shape, same rule
    g = m.groupdict()
    out = dst.replace("{L}", g.get("L") or "").replace("{E}", g.get("E") or "")
    return out + (g.get("rest") or "")


def deepseek_to_c(name: str) -> str | None:
    """The layout-C (transformers) name of a DeepSeek tensor or module; None for ``mtp.*``."""
    return _apply(C_NAME_RULES, False, name)


def c_to_deepseek(name: str) -> str | None:
    """The DeepSeek name of a layout-C tensor or module; None if no row matches."""
    return _apply(C_NAME_RULES, True, name)


def vllm_module(ds_module: str) -> str | None:
    """The vLLM module that loads a DeepSeek dense linear (for ``ignored_layers``), or None."""
    return _apply(VLLM_MODULE_RULES, False, ds_module)


def layer_of(name: str) -> str:
    """``layers.N`` / ``mtp.N`` / ``""`` (top level): the block a DeepSeek name belongs to."""
    m = re.match(r"^((?:layers|mtp)\.\d+)\.", name)
    return m.group(1) if m else ""


def is_mtp(name: str) -> bool:
    return name.startswith("mtp.")

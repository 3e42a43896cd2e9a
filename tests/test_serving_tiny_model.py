"""The tiny BF16 DeepSeek V4 (checkpoint/tiny_bf16.py): reproducible, complete, servable dims.

That vLLM loads and serves it is proven by the real-server tests (conftest's
``tiny_server``); these check what a loader cannot: determinism, the MTP
block's exact extent, the tokenizer's special ids, and the written files.
"""

from __future__ import annotations

import json

import pytest
import torch

from dsv4_nvfp4.checkpoint import tiny_bf16 as tm


@pytest.mark.cpu
def test_same_seed_same_bytes_other_seed_other_bytes() -> None:
    a, b, c = tm.tiny_state_dict(seed=0), tm.tiny_state_dict(seed=0), tm.tiny_state_dict(seed=1)
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["embed.weight"], c["embed.weight"])


@pytest.mark.cpu
def test_mtp_adds_exactly_one_mtp_block() -> None:
    plain = tm.tiny_state_dict(tm.tiny_config(mtp=False))
    with_mtp = tm.tiny_state_dict(tm.tiny_config(mtp=True))
    extra = set(with_mtp) - set(plain)
    assert set(plain) <= set(with_mtp) and all(k.startswith("mtp.0.") for k in extra)
    # the MTP block is layer-shaped (sliding-window attention, non-hash router) plus its head
    layer2 = {k.removeprefix("layers.2.") for k in plain if k.startswith("layers.2.")}
    compressor = {k for k in layer2 if ".compressor." in k}
    block = {k.removeprefix("mtp.0.") for k in extra}
    assert block == (layer2 - compressor) | {
        "e_proj.weight",
        "h_proj.weight",
        "enorm.weight",
        "hnorm.weight",
        "norm.weight",
        "hc_head_fn",
        "hc_head_base",
        "hc_head_scale",
    }
    assert tm.tiny_config(mtp=True)["compress_ratios"] == [0, 4, 128, 0]


@pytest.mark.cpu
def test_dtypes_and_cpu_kernel_dims() -> None:
    cfg = tm.tiny_config()
    sd = tm.tiny_state_dict(cfg)
    assert sd["layers.0.ffn.gate.tid2eid"].dtype == torch.int64
    assert sd["layers.0.ffn.gate.tid2eid"].shape == (1024, 6)
    rows = sd["layers.0.ffn.gate.tid2eid"]
    assert all(len(set(r.tolist())) == 6 for r in rows)  # distinct experts per token
    fp32 = {k for k, v in sd.items() if v.dtype == torch.float32}
    assert fp32 == {
        k
        for k in sd
        if k.rsplit(".", 1)[-1]
        in {
            "hc_attn_fn",
            "hc_attn_base",
            "hc_attn_scale",
            "hc_ffn_fn",
            "hc_ffn_base",
            "hc_ffn_scale",
            "hc_head_fn",
            "hc_head_base",
            "hc_head_scale",
            "attn_sink",
            "ape",
            "bias",
        }
    }
    assert sd["layers.1.attn.compressor.wkv.weight"].shape == (2 * 512, 64)  # ratio 4: overlap
    assert sd["layers.2.attn.compressor.wkv.weight"].shape == (512, 64)  # ratio 128
    assert "layers.2.attn.indexer.wq_b.weight" not in sd  # only ratio-4 layers index
    assert (cfg["head_dim"], cfg["index_topk"], cfg["n_routed_experts"]) == (512, 512, 64)
    assert cfg["moe_intermediate_size"] % 32 == 0  # whole MXFP4 (32) and NVFP4 (16) blocks


@pytest.mark.cpu
def test_tokenizer_special_ids_and_markup_survive_decoding() -> None:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(tm.tokenizer_files()["tokenizer.json"])
    assert tok.get_vocab_size() == 1024
    assert [tok.token_to_id(t) for t in (tm.BOS, tm.EOS, tm.PAD)] == [0, 1, 2]
    ids = tok.encode(f"{tm.BOS}<｜User｜>hi<｜Assistant｜><think>x</think>｜DSML｜").ids
    text = tok.decode(ids, skip_special_tokens=True)
    assert text == "hi<think>x</think>｜DSML｜"  # turn markers skipped, parser markup kept


@pytest.mark.cpu
def test_the_tiny_command_writes_this_model(tmp_path) -> None:
    """``dsv4-nvfp4 tiny --layout bf16 --cpu-servable`` writes exactly this model."""
    from safetensors.torch import load_file

    from dsv4_nvfp4.checkpoint.layouts import Layout
    from dsv4_nvfp4.checkpoint.tiny import write_tiny

    out = write_tiny(tmp_path / "t", Layout.BF16, mtp=True, cpu_servable=True, seed=3)
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json"} <= names
    assert json.loads((out / "config.json").read_text()) == tm.tiny_config(mtp=True)
    loaded = {k: v for f in sorted(out.glob("*.safetensors")) for k, v in load_file(f).items()}
    expected = tm.tiny_state_dict(tm.tiny_config(mtp=True), seed=3)
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)

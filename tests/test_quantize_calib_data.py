"""Calibration data: JSON-lines parsing, thinking-mode choice, tokenization, packing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dsv4_nvfp4.checkpoint.tiny_bf16 import tokenizer_files
from dsv4_nvfp4.quantize.calib_data import (
    build_calibration,
    conversation_mode,
    pack,
    read_conversations,
)
from dsv4_nvfp4.quantize.chat_encoding import render_chat
from dsv4_nvfp4.quantize.errors import QuantizeInputError

pytestmark = pytest.mark.cpu


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tok")
    for name, text in tokenizer_files().items():
        (d / name).write_text(text, encoding="utf-8")
    return d


def test_pack_exact_lengths_and_tail() -> None:
    samples = pack([[1, 2, 3], [4, 5, 6, 7], [8]], seq_len=3, num_samples=10)
    assert [s.tolist() for s in samples] == [[1, 2, 3], [4, 5, 6], [7, 8]]
    assert [s.tolist() for s in pack([[1, 2, 3, 4, 5]], 2, 2)] == [[1, 2], [3, 4]]


def test_mode_from_reasoning() -> None:
    assert conversation_mode({"messages": [{"role": "assistant", "reasoning": "r"}]}) == \
        "thinking"
    assert conversation_mode({"messages": [{"role": "assistant", "content": "c"}]}) == "chat"
    assert conversation_mode({"messages": [], "thinking_mode": "thinking"}) == "thinking"


def test_file_tokens_are_the_rendered_text(tmp_path: Path, tok_dir: Path) -> None:
    convs = [{"messages": [{"role": "user", "content": "two plus three"},
                           {"role": "assistant", "content": "five"}]},
             [{"role": "user", "content": "hello"},
              {"role": "assistant", "content": "world", "reasoning": "think"}]]
    f = tmp_path / "c.jsonl"
    f.write_text("\n".join(json.dumps(c) for c in convs) + "\n\n", encoding="utf-8")
    cs = build_calibration(tok_dir, f, seq_len=1000, num_samples=5, vocab_size=1024)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    texts = [render_chat(convs[0]["messages"], "chat"), render_chat(convs[1], "thinking")]
    want = [i for t in texts for i in tok.encode(t, add_special_tokens=False).ids]
    assert cs.conversations == 2 and len(cs.samples) == 1
    assert cs.samples[0].tolist() == want
    assert want[0] == tok.token_to_id("<｜begin▁of▁sentence｜>")
    # deterministic digest; batches stack equal-length samples
    again = build_calibration(tok_dir, f, seq_len=1000, num_samples=5, vocab_size=1024)
    assert again.digest == cs.digest
    short = build_calibration(tok_dir, f, seq_len=4, num_samples=3, vocab_size=1024)
    b = short.batches(2)
    assert [tuple(x.shape) for x in b] == [(2, 4), (1, 4)]
    assert torch.equal(torch.cat([x.flatten() for x in b]), torch.tensor(want[:12]))


def test_builtin_set(tok_dir: Path) -> None:
    cs = build_calibration(tok_dir, None, seq_len=256, num_samples=1000, vocab_size=1024)
    assert cs.source == "built-in" and cs.conversations == 24
    assert cs.tokens > 2000 and all(s.numel() == 256 for s in cs.samples[:-1])


@pytest.mark.parametrize("content, match", [
    ("{not json\n", "line 1: expected JSON"),
    ('{"text": "x"}\n', "line 1: expected an object with a 'messages' list"),
    ("\n\n", "at least one conversation"),
    ('{"messages": [{"role": "robot", "content": "x"}]}\n', "conversation 1: message 0"),
])
def test_bad_files(tmp_path: Path, tok_dir: Path, content: str, match: str) -> None:
    f = tmp_path / "bad.jsonl"
    f.write_text(content, encoding="utf-8")
    with pytest.raises(QuantizeInputError, match=match):
        build_calibration(tok_dir, f, 16, 4, 1024)


def test_missing_tokenizer_and_vocab_mismatch(tmp_path: Path, tok_dir: Path) -> None:
    with pytest.raises(QuantizeInputError, match=r"tokenizer\.json"):
        build_calibration(tmp_path, None, 16, 4, 1024)
    with pytest.raises(QuantizeInputError, match="vocab_size 100"):
        build_calibration(tok_dir, None, 16, 4, 100)


def test_read_conversations_missing_file(tmp_path: Path) -> None:
    with pytest.raises(QuantizeInputError, match="readable"):
        read_conversations(tmp_path / "nope.jsonl")

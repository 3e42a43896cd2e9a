"""Calibration data: chat conversations → DeepSeek V4 token streams → fixed-length samples.

Input is JSON lines, one conversation per line: ``{"messages": [...]}`` (or
a bare list of messages), optionally with ``"thinking_mode": "chat" |
"thinking"``; without it a conversation whose assistant turns carry
``reasoning`` is rendered in thinking mode, any other in chat mode.

Conversations are rendered (:mod:`.chat_encoding`), tokenized with the
checkpoint's own ``tokenizer.json``, concatenated and cut into samples of
exactly ``seq_len`` tokens. Why pack instead of pad: a pad token would still
flow through every linear and be routed to experts, so it would enter the
activation amax that becomes ``input_scale``; packed samples have no pads and
batch without an attention mask. The last, shorter remainder is kept as its
own sample so short data sets are not thrown away.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .chat_encoding import ChatFormatError, render_chat
from .default_calib import DEFAULT_CONVERSATIONS
from .errors import QuantizeInputError


@dataclass(frozen=True)
class CalibrationSet:
    """Samples ready for the forward loop, and where they came from."""

    samples: list[torch.Tensor]   # each int64 [L], L == seq_len except maybe the last
    source: str                   # file path or "built-in"
    conversations: int
    tokens: int
    digest: str                   # sha256 of the token ids (part of the resume stamp)

    def batches(self, batch_size: int) -> list[torch.Tensor]:
        """Stack equal-length samples into ``[B, L]`` batches (the short tail alone)."""
        full = [s for s in self.samples if s.numel() == self.samples[0].numel()]
        rest = [s for s in self.samples if s.numel() != self.samples[0].numel()]
        out = [torch.stack(full[i:i + batch_size]) for i in range(0, len(full), batch_size)]
        out += [s.unsqueeze(0) for s in rest]
        return out


def read_conversations(path: Path) -> list[dict]:
    """Parse a JSON-lines file; one clear error naming the line on bad input."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise QuantizeInputError(f"--calib {path}: expected a readable JSON-lines file, found "
                                 f"{e.strerror}") from None
    except UnicodeDecodeError:
        raise QuantizeInputError(f"--calib {path}: expected UTF-8 text, found binary data"
                                 ) from None
    convs = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise QuantizeInputError(f"--calib {path}: line {n}: expected JSON, found {e.msg}"
                                     ) from None
        if isinstance(obj, list):
            obj = {"messages": obj}
        if not isinstance(obj, dict) or not isinstance(obj.get("messages"), list):
            raise QuantizeInputError(f"--calib {path}: line {n}: expected an object with a "
                                     "'messages' list (or a list of messages)")
        convs.append(obj)
    if not convs:
        raise QuantizeInputError(f"--calib {path}: expected at least one conversation, "
                                 "found none")
    return convs


def conversation_mode(conv: dict) -> str:
    mode = conv.get("thinking_mode")
    if mode is not None:
        return mode
    has_reasoning = any(m.get("role") == "assistant" and m.get("reasoning")
                        for m in conv["messages"] if isinstance(m, dict))
    return "thinking" if has_reasoning else "chat"


def render_all(convs: list[dict], where: str) -> list[str]:
    texts = []
    for i, conv in enumerate(convs, 1):
        try:
            texts.append(render_chat(conv["messages"], conversation_mode(conv)))
        except ChatFormatError as e:
            raise QuantizeInputError(f"{where}: conversation {i}: {e}") from None
    return texts


def load_tokenizer(checkpoint: Path):
    """The checkpoint's fast tokenizer (``tokenizer.json``), without transformers' hub logic."""
    from tokenizers import Tokenizer

    path = checkpoint / "tokenizer.json"
    if not path.is_file():
        raise QuantizeInputError(f"{checkpoint}: expected tokenizer.json (calibration text is "
                                 "tokenized with the model's own tokenizer), found none")
    return Tokenizer.from_file(str(path))


def pack(token_lists: list[list[int]], seq_len: int, num_samples: int) -> list[torch.Tensor]:
    """Concatenate token streams and cut ``num_samples`` samples of ``seq_len`` tokens."""
    if seq_len < 1 or num_samples < 1:
        raise QuantizeInputError(f"--seq-len/--num-samples: expected >= 1, found {seq_len}/"
                                 f"{num_samples}")
    stream = torch.tensor([t for toks in token_lists for t in toks], dtype=torch.int64)
    samples = list(torch.split(stream, seq_len))[:num_samples]
    return [s.clone() for s in samples if s.numel() > 0]


def build_calibration(checkpoint: Path, calib: Path | None, seq_len: int,
                      num_samples: int, vocab_size: int) -> CalibrationSet:
    convs = read_conversations(calib) if calib else list(DEFAULT_CONVERSATIONS)
    where = f"--calib {calib}" if calib else "built-in calibration set"
    texts = render_all(convs, where)
    tok = load_tokenizer(checkpoint)
    ids = [enc.ids for enc in tok.encode_batch(texts, add_special_tokens=False)]
    top = max((max(x) for x in ids if x), default=0)
    if top >= vocab_size:
        raise QuantizeInputError(f"{checkpoint}/tokenizer.json: expected token ids < "
                                 f"vocab_size {vocab_size}, found {top}")
    samples = pack(ids, seq_len, num_samples)
    digest = hashlib.sha256()
    for s in samples:
        digest.update(s.numpy().tobytes())
    return CalibrationSet(samples, str(calib) if calib else "built-in", len(convs),
                          sum(s.numel() for s in samples), digest.hexdigest())

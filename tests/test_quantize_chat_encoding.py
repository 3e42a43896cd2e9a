"""Our DeepSeek V4 chat renderer against vLLM 0.32.0's own encoder, string for string.

vLLM's ``deepseek_v4_encoding.py`` is pure Python (stdlib only); it is loaded
from the installed vLLM by file path so the test does not import the vLLM
package (our package never imports vLLM outside the plugin).
"""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest

from dsv4_nvfp4.quantize.chat_encoding import ChatFormatError, render_chat
from dsv4_nvfp4.quantize.default_calib import DEFAULT_CONVERSATIONS

pytestmark = pytest.mark.cpu


def _vllm_encoder():
    spec = importlib.util.find_spec("vllm")
    assert spec is not None and spec.submodule_search_locations
    path = Path(next(iter(spec.submodule_search_locations))) / "tokenizers" / \
        "deepseek_v4_encoding.py"
    mod_spec = importlib.util.spec_from_file_location("_vllm_dsv4_encoding", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    return mod


VLLM = _vllm_encoder()

_TOOL = {"type": "function", "function": {"name": "lookup", "description": "d",
                                          "parameters": {"type": "object", "properties": {}}}}

EXTRA = [
    # multi-turn with reasoning on an early turn (dropped in thinking mode)
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "reasoning": "r1"},
     {"role": "user", "content": "c"}, {"role": "assistant", "content": "d", "reasoning": "r2"}],
    # open generation turn (no final assistant)
    [{"role": "system", "content": "sys"}, {"role": "user", "content": "q?"}],
    # developer turn, latest reminder, text blocks
    [{"role": "developer", "content": "dev rules"},
     {"role": "user", "content": [{"type": "text", "text": "x"}, {"type": "text", "text": "y"}]},
     {"role": "latest_reminder", "content": "be brief"},
     {"role": "assistant", "content": "ok"}],
    # two tool results answered out of call order, non-string arguments
    [{"role": "system", "content": "", "tools": [_TOOL]},
     {"role": "user", "content": "go"},
     {"role": "assistant", "content": "", "reasoning": "call both", "tool_calls": [
         {"id": "a", "type": "function", "function": {"name": "lookup",
                                                      "arguments": {"k": [1, 2], "s": "v"}}},
         {"id": "b", "type": "function", "function": {"name": "lookup",
                                                      "arguments": "{\"n\": 3.5}"}}]},
     {"role": "tool", "tool_call_id": "b", "content": "B"},
     {"role": "tool", "tool_call_id": "a", "content": "A"},
     {"role": "assistant", "content": "done", "reasoning": "both back"}],
    # system followed directly by an assistant turn
    [{"role": "system", "content": "s"}, {"role": "assistant", "content": "hello"}],
    # response format on a system turn, unicode
    [{"role": "system", "content": "json", "response_format": {"type": "json_object"}},
     {"role": "user", "content": "名前は？"}, {"role": "assistant", "content": "{\"名\": 1}"}],
]

CASES = [c["messages"] for c in DEFAULT_CONVERSATIONS] + EXTRA


@pytest.mark.parametrize("mode", ["chat", "thinking"])
@pytest.mark.parametrize("idx", range(len(CASES)))
def test_matches_vllm_encoder(idx: int, mode: str) -> None:
    messages = CASES[idx]
    want = VLLM.encode_messages(copy.deepcopy(messages), thinking_mode=mode)
    got = render_chat(copy.deepcopy(messages), mode)
    assert got == want


def test_render_does_not_modify_input() -> None:
    messages = copy.deepcopy(EXTRA[3])
    before = copy.deepcopy(messages)
    render_chat(messages, "thinking")
    assert messages == before


def test_known_string() -> None:
    # Spelled out once so a change in both encoders at the same time is still caught.
    got = render_chat([{"role": "user", "content": "hi"},
                       {"role": "assistant", "content": "yo", "reasoning": "r"}], "thinking")
    assert got == ("<｜begin▁of▁sentence｜><｜User｜>hi<｜Assistant｜><think>r</think>yo"
                   "<｜end▁of▁sentence｜>")
    got = render_chat([{"role": "user", "content": "hi"},
                       {"role": "assistant", "content": "yo"}], "chat")
    assert got == ("<｜begin▁of▁sentence｜><｜User｜>hi<｜Assistant｜></think>yo"
                   "<｜end▁of▁sentence｜>")


@pytest.mark.parametrize("messages, match", [
    ([{"role": "narrator", "content": "x"}], "expected role"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], "image_url"),
    ([{"role": "user", "content": "x", "task": "query"}], "task"),
    ([], "non-empty"),
    ([{"role": "developer", "content": ""}], "non-empty content"),
])
def test_refuses_what_it_cannot_render_exactly(messages, match) -> None:
    with pytest.raises(ChatFormatError, match=match):
        render_chat(messages, "chat")


def test_bad_mode() -> None:
    with pytest.raises(ChatFormatError, match="thinking mode"):
        render_chat([{"role": "user", "content": "x"}], "fast")

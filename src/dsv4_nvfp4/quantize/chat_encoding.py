"""Render chat messages as DeepSeek V4 prompt text, for calibration.

Why our own: calibration should see the token streams the served model sees,
and vLLM builds DeepSeek V4 prompts with its own encoder
(``vllm/tokenizers/deepseek_v4_encoding.py``, tokenizer mode ``deepseek_v4``),
not a Jinja chat template. The package may import vLLM only inside the
plugin, so this module re-states that format for the message shapes a
calibration set uses; ``tests/test_quantize_chat_encoding.py`` renders the same
conversations with vLLM 0.32.0's encoder and requires identical strings.

The format (one string, BOS once at the start)::

    <bos>{system}[\\n\\n## Tools ...]<｜User｜>{user}<｜Assistant｜></think>{answer}<eos>

* ``chat`` mode closes the (empty) reasoning with ``</think>`` after
  ``<｜Assistant｜>``; ``thinking`` mode opens ``<think>`` there and the
  assistant turn is ``{reasoning}</think>{answer}<eos>``. Reasoning of
  assistant turns before the last user turn is dropped (unless tools are
  defined), as DeepSeek's encoder does.
* Tool results (role ``tool``) become ``<tool_result>...</tool_result>`` blocks
  of a user turn; tool calls are DSML ``<｜DSML｜invoke>`` blocks.

Supported: roles system (content, tools, response_format), developer, user
(string or text blocks), assistant (content, reasoning, tool_calls), tool,
latest_reminder. Anything else (images, task tokens) is refused with a clear
error rather than rendered differently from vLLM.
"""

from __future__ import annotations

import json
from typing import Any

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
LATEST_REMINDER = "<｜latest_reminder｜>"
THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
DSML = "｜DSML｜"

MODES = ("chat", "thinking")

_TOOLS_HEADER = f"""## Tools

You have access to a set of tools to help answer the user's question. \
You can invoke tools by writing a "<{DSML}tool_calls>" block like the following:

<{DSML}tool_calls>
<{DSML}invoke name="$TOOL_NAME">
<{DSML}parameter name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE</{DSML}parameter>
...
</{DSML}invoke>
<{DSML}invoke name="$TOOL_NAME2">
...
</{DSML}invoke>
</{DSML}tool_calls>

String parameters should be specified as is and set `string="true"`. For all other types \
(numbers, booleans, arrays, objects), pass the value in JSON format and set `string="false"`.

If thinking_mode is enabled (triggered by {THINK_OPEN}), you MUST output your complete \
reasoning inside {THINK_OPEN}...{THINK_CLOSE} BEFORE any tool calls or final response.

Otherwise, output directly after {THINK_CLOSE} with tool calls or final response.

### Available Tool Schemas

"""
_TOOLS_FOOTER = ("\n\nYou MUST strictly follow the above defined tool name and parameter "
                 "schemas to invoke tool calls.\n")
_RESPONSE_FORMAT = ("## Response Format:\n\nYou MUST strictly adhere to the following schema "
                    "to reply:\n")


# DeepSeek-internal fields (task tokens, training masks) the calibration renderer refuses.
_UNSUPPORTED_FIELDS = ("task", "wo_eos", "content_blocks", "mask")


class ChatFormatError(ValueError):
    """A message the renderer cannot express exactly as DeepSeek V4 would."""


def _json(value: Any) -> str:
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        return json.dumps(value, ensure_ascii=True)


def _text(content: Any, where: str) -> str:
    """Plain text of a message's content: a string, or OpenAI text blocks joined by blank lines."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for block in content:
            if isinstance(block, dict) and block.get("type") == "text":
                parts.append(block.get("text", ""))
            elif not isinstance(block, dict):
                parts.append(str(block))
            else:
                raise ChatFormatError(f"{where}: expected text content blocks, found a "
                                      f"{block.get('type')!r} block")
        return "\n\n".join(parts)
    raise ChatFormatError(f"{where}: expected string or list content, "
                          f"found {type(content).__name__}")


def _tools_section(tools: list[dict]) -> str:
    schemas = [_json(t.get("function", t)) for t in tools]
    return _TOOLS_HEADER + "\n".join(schemas) + _TOOLS_FOOTER


def _dsml_arguments(arguments: Any) -> str:
    args = json.loads(arguments) if isinstance(arguments, str) else arguments
    lines = []
    for key, value in args.items():
        is_str = isinstance(value, str)
        shown = value if is_str else _json(value)
        lines.append(f'<{DSML}parameter name="{key}" string="{"true" if is_str else "false"}">'
                     f"{shown}</{DSML}parameter>")
    return "\n".join(lines)


def _tool_calls(calls: list[dict]) -> str:
    invokes = []
    for call in calls:
        fn = call.get("function", call)
        invokes.append(f'<{DSML}invoke name="{fn.get("name")}">\n'
                       f"{_dsml_arguments(fn.get('arguments', {}))}\n</{DSML}invoke>")
    return f"\n\n<{DSML}tool_calls>\n" + "\n".join(invokes) + f"\n</{DSML}tool_calls>"


def _merge_tools(messages: list[dict]) -> list[dict]:
    """Fold ``tool`` messages into user turns of ``<tool_result>`` blocks, in call order."""
    out: list[dict] = []
    call_order: dict[str, int] = {}
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise ChatFormatError(f"message {i}: expected an object, found "
                                  f"{type(msg).__name__}")
        role = msg.get("role")
        for unsupported in _UNSUPPORTED_FIELDS:
            if unsupported in msg:
                raise ChatFormatError(f"message {i} ({role}): field {unsupported!r} is not "
                                      "supported by the calibration renderer")
        if role == "assistant" and msg.get("tool_calls"):
            call_order = {}
            for j, tc in enumerate(msg["tool_calls"]):
                tc_id = tc.get("id") or tc.get("function", {}).get("id", "")
                if tc_id:
                    call_order[tc_id] = j
        if role == "tool":
            block = {"kind": "tool", "text": _text(msg.get("content", ""), f"message {i}"),
                     "id": msg.get("tool_call_id", "")}
            if out and out[-1]["role"] == "user" and "blocks" in out[-1]:
                out[-1]["blocks"].append(block)
            else:
                out.append({"role": "user", "blocks": [block]})
        elif role == "user":
            block = {"kind": "text", "text": _text(msg.get("content", ""), f"message {i}")}
            if out and out[-1]["role"] == "user" and "blocks" in out[-1]:
                out[-1]["blocks"].append(block)
            else:
                out.append({"role": "user", "blocks": [block]})
        else:
            out.append(dict(msg))
    for msg in out:
        tools = [b for b in msg.get("blocks", ()) if b["kind"] == "tool"]
        if len(tools) > 1 and call_order:
            ordered = iter(sorted(tools, key=lambda b: call_order.get(b["id"], 0)))
            msg["blocks"] = [next(ordered) if b["kind"] == "tool" else b for b in msg["blocks"]]
    return out


def _last_user(messages: list[dict]) -> int:
    for i in range(len(messages) - 1, -1, -1):
        if messages[i].get("role") in ("user", "developer"):
            return i
    return -1


def _render_one(i: int, msgs: list[dict], mode: str, drop: bool, last_user: int) -> str:
    msg = msgs[i]
    role = msg.get("role")
    where = f"message {i} ({role})"
    out = ""
    if role == "system":
        out += _text(msg.get("content"), where)
        if msg.get("tools"):
            out += "\n\n" + _tools_section(msg["tools"])
        if msg.get("response_format"):
            out += "\n\n" + _RESPONSE_FORMAT + _json(msg["response_format"])
    elif role == "developer":
        text = _text(msg.get("content"), where)
        if not text:
            raise ChatFormatError(f"{where}: expected non-empty content")
        out += USER + text
        if msg.get("tools"):
            out += "\n\n" + _tools_section(msg["tools"])
        if msg.get("response_format"):
            out += "\n\n" + _RESPONSE_FORMAT + _json(msg["response_format"])
    elif role == "user":
        parts = [b["text"] if b["kind"] == "text" else f"<tool_result>{b['text']}</tool_result>"
                 for b in msg["blocks"]]
        out += USER + "\n\n".join(parts)
    elif role == "latest_reminder":
        out += LATEST_REMINDER + _text(msg.get("content"), where)
    elif role == "assistant":
        calls = _tool_calls(msg["tool_calls"]) if msg.get("tool_calls") else ""
        think = ""
        if mode == "thinking" and (not drop or i > last_user):
            think = (msg.get("reasoning") or "") + THINK_CLOSE
        out += think + _text(msg.get("content"), where) + calls + EOS
    else:
        raise ChatFormatError(f"{where}: expected role system, developer, user, assistant, "
                              "tool or latest_reminder")
    nxt = msgs[i + 1].get("role") if i + 1 < len(msgs) else None
    if nxt is not None and nxt not in ("assistant", "latest_reminder"):
        return out
    opens_turn = role in ("user", "developer") or (
        role == "system" and (nxt is None or nxt == "assistant"))
    if opens_turn:
        out += ASSISTANT
        if mode == "thinking" and (not drop or i >= last_user):
            out += THINK_OPEN
        else:
            out += THINK_CLOSE
    return out


def _drop_old_reasoning(messages: list[dict]) -> list[dict]:
    last_user = _last_user(messages)
    kept = []
    for i, msg in enumerate(messages):
        role = msg.get("role")
        if role in ("user", "system", "latest_reminder") or i >= last_user:
            kept.append(msg)
        elif role == "assistant":
            kept.append({k: v for k, v in msg.items() if k != "reasoning"})
        # developer turns before the last user turn are dropped, as DeepSeek's encoder does
    return kept


def render_chat(messages: list[dict], mode: str = "chat", add_bos: bool = True) -> str:
    """The DeepSeek V4 prompt text of ``messages`` (``mode``: "chat" or "thinking")."""
    if mode not in MODES:
        raise ChatFormatError(f"thinking mode: expected one of {MODES}, found {mode!r}")
    if not isinstance(messages, list) or not messages:
        raise ChatFormatError("messages: expected a non-empty list")
    msgs = _merge_tools(messages)
    drop = not any(m.get("tools") for m in msgs)
    if mode == "thinking" and drop:
        msgs = _drop_old_reasoning(msgs)
    last_user = _last_user(msgs)
    text = BOS if add_bos else ""
    for i in range(len(msgs)):
        text += _render_one(i, msgs, mode, drop, last_user)
    return text

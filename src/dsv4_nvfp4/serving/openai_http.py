"""Small HTTP helpers shared by the smoke test, bench, eval and acceptance (httpx only).

Why: every client here needs the same three things — the bearer token from
``VLLM_API_KEY``, the served model name (the first one ``/v1/models`` lists
unless told), and a reader for vLLM's server-sent events that tells a stream
that ended with ``data: [DONE]`` from one that was cut off.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import httpx

DEFAULT_URL = "http://127.0.0.1:8000"


def api_key_from_env(explicit: str | None = None) -> str | None:
    return explicit if explicit is not None else os.environ.get("VLLM_API_KEY") or None


def headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def client(url: str, api_key: str | None, timeout: float = 120.0) -> httpx.Client:
    return httpx.Client(base_url=url.rstrip("/"), headers=headers(api_key), timeout=timeout)


def served_models(http: httpx.Client) -> list[str]:
    resp = http.get("/v1/models")
    resp.raise_for_status()
    return [str(m["id"]) for m in resp.json()["data"]]


def resolve_model(http: httpx.Client, model: str | None) -> str:
    """The model to talk to: ``model`` if given and served, else the first one listed."""
    models = served_models(http)
    if not models:
        raise RuntimeError("/v1/models lists no model")
    if model is None:
        return models[0]
    if model not in models:
        raise RuntimeError(f"model {model!r} not served; /v1/models lists {models}")
    return model


@dataclass
class StreamResult:
    """A reassembled streaming answer; ``done`` is True only if ``data: [DONE]`` arrived."""

    done: bool = False
    n_chunks: int = 0
    content: str = ""
    reasoning: str = ""
    text: str = ""  # /v1/completions streams
    finish_reason: str | None = None
    usage: dict | None = None
    tool_calls: list = field(default_factory=list)
    error: str | None = None


def iter_sse(lines: Iterable[str]) -> Iterator[str]:
    """The ``data:`` payloads of a server-sent-event stream, in order."""
    for line in lines:
        if line.startswith("data:"):
            yield line[5:].strip()


def reasoning_of(obj: dict) -> str:
    """vLLM 0.32 names the field ``reasoning``; older builds ``reasoning_content``."""
    return obj.get("reasoning") or obj.get("reasoning_content") or ""


def reassemble(payloads: Iterable[str]) -> StreamResult:
    """Fold chat or completion chunks into one answer; stops at ``[DONE]``."""
    out = StreamResult()
    for data in payloads:
        if data == "[DONE]":
            out.done = True
            break
        try:
            chunk = json.loads(data)
        except ValueError:
            out.error = f"undecodable chunk {data[:80]!r}"
            continue
        if "error" in chunk:
            out.error = str(chunk["error"])
            continue
        out.n_chunks += 1
        if chunk.get("usage"):
            out.usage = chunk["usage"]
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            out.content += delta.get("content") or ""
            out.reasoning += reasoning_of(delta)
            out.text += choice.get("text") or ""
            out.tool_calls.extend(delta.get("tool_calls") or [])
            if choice.get("finish_reason"):
                out.finish_reason = choice["finish_reason"]
    return out

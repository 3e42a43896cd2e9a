"""Small HTTP helpers shared by the smoke test, bench, eval and acceptance (httpx only).

Why: every client here needs the same things — the bearer token from
``VLLM_API_KEY``, the served model name (the first one ``/v1/models`` lists
unless told), a reader for vLLM's server-sent events that tells a stream that
ended with ``data: [DONE]`` from one that was cut off, and the same guarantees
against a server (or something posing as one) that misbehaves:

* **no redirects**: a client made here never follows one, and a 3xx answer is
  an error (:class:`RedirectRefused`) naming where it pointed, so the API key
  is only ever sent to ``--url``;
* **a size cap**: :func:`fetch` and :func:`served_models` read at most
  ``MAX_RESPONSE_BYTES`` of an answer (:class:`ResponseTooLarge`);
* **one line** for every failure (:func:`describe`).

Overall deadlines belong to the caller (the smoke test runs each check under
``asyncio.timeout``); httpx's own timeouts bound each socket operation only.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import httpx

DEFAULT_URL = "http://127.0.0.1:8000"
# The largest answer read: vLLM's /metrics of 8 GPUs is well under 1 MiB, a
# smoke-test answer a few KiB.
MAX_RESPONSE_BYTES = 4 * 1024 * 1024


class RedirectRefused(httpx.HTTPError):
    """The server answered 3xx; clients made here never follow a redirect."""


class ResponseTooLarge(httpx.HTTPError):
    """An answer went past the size cap; reading stopped there."""


class AnswerError(httpx.HTTPError):
    """An answer that is not what the OpenAI API returns (status or body)."""


def api_key_from_env(explicit: str | None = None) -> str | None:
    return explicit if explicit is not None else os.environ.get("VLLM_API_KEY") or None


def headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def one_line(text: str, limit: int = 200) -> str:
    """``text`` with its whitespace runs (newlines too) collapsed, cut at ``limit``."""
    text = " ".join(text.split())
    return text[:limit] + ("..." if len(text) > limit else "")


def check_base_url(url: str) -> str:
    """``url`` if it is a usable server base URL; ValueError says what is wrong (one line)."""
    expected = "expected http://HOST[:PORT] or https://HOST[:PORT]"
    if any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in url):
        raise ValueError(f"--url {url!r}: contains whitespace or control characters")
    try:
        parts = urlsplit(url)
        host = parts.hostname
    except ValueError:
        raise ValueError(f"--url {url!r}: {expected}") from None
    if parts.scheme not in ("http", "https") or not host:
        raise ValueError(f"--url {url!r}: {expected}")
    if parts.username is not None or parts.password is not None:
        raise ValueError(f"--url {url!r}: credentials in the URL are never sent; set VLLM_API_KEY")
    if parts.query or parts.fragment:
        raise ValueError(f"--url {url!r}: a base URL has no query or fragment")
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port is not None and not 1 <= port <= 65535:
        raise ValueError(f"--url {url!r}: the port is not a number from 1 to 65535")
    return url


def positive_seconds(text: str | float, option: str = "--timeout") -> float:
    """A positive, finite number of seconds; ValueError names the option and the value."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{option}: expected a positive number of seconds, got {str(text)!r}")
    return value


def redirect_message(method: str, path: str, status: int, location: str | None) -> str:
    where = f"Location {one_line(location)}" if location else "no Location"
    return (
        f"{method} {path} answered HTTP {status} with {where}; redirects are not followed "
        "(the API key goes to --url only)"
    )


def _redirect(resp: httpx.Response) -> RedirectRefused | None:
    if not 300 <= resp.status_code < 400:
        return None
    req = resp.request
    return RedirectRefused(
        redirect_message(req.method, req.url.path, resp.status_code, resp.headers.get("location"))
    )


def _refuse_redirect(resp: httpx.Response) -> None:
    err = _redirect(resp)
    if err is not None:
        raise err


async def _arefuse_redirect(resp: httpx.Response) -> None:
    _refuse_redirect(resp)


def client(url: str, api_key: str | None, timeout: float = 120.0) -> httpx.Client:
    """A client for ``url`` that sends the key and refuses redirects (RedirectRefused)."""
    return httpx.Client(
        base_url=url.rstrip("/"),
        headers=headers(api_key),
        timeout=timeout,
        follow_redirects=False,
        event_hooks={"response": [_refuse_redirect]},
    )


def async_client(
    url: str, api_key: str | None, timeout: float, limits: httpx.Limits | None = None
) -> httpx.AsyncClient:
    """The asyncio twin of :func:`client`: same key, same refusal of redirects."""
    return httpx.AsyncClient(
        base_url=url.rstrip("/"),
        headers=headers(api_key),
        timeout=timeout,
        limits=limits or httpx.Limits(),
        follow_redirects=False,
        event_hooks={"response": [_arefuse_redirect]},
    )


def _what(resp: httpx.Response) -> str:
    return f"{resp.request.method} {resp.request.url.path}"


def _too_large(resp: httpx.Response, limit: int) -> ResponseTooLarge:
    return ResponseTooLarge(
        f"{_what(resp)}: answer larger than {limit / 2**20:g} MiB; stopped reading"
    )


def _declared_too_large(resp: httpx.Response, limit: int) -> bool:
    length = resp.headers.get("content-length", "")
    return length.isdigit() and int(length) > limit


def read_capped(resp: httpx.Response, limit: int = MAX_RESPONSE_BYTES) -> bytes:
    """The (decoded) body of a streamed response, at most ``limit`` bytes."""
    if _declared_too_large(resp, limit):
        raise _too_large(resp, limit)
    body = bytearray()
    for chunk in resp.iter_bytes():
        body += chunk
        if len(body) > limit:
            raise _too_large(resp, limit)
    return bytes(body)


async def aread_capped(resp: httpx.Response, limit: int = MAX_RESPONSE_BYTES) -> bytes:
    """:func:`read_capped` for an asyncio client's response."""
    if _declared_too_large(resp, limit):
        raise _too_large(resp, limit)
    body = bytearray()
    async for chunk in resp.aiter_bytes():
        body += chunk
        if len(body) > limit:
            raise _too_large(resp, limit)
    return bytes(body)


@dataclass
class Answer:
    """A complete (capped) HTTP answer: what the checks read instead of an httpx.Response."""

    method: str
    path: str
    status_code: int
    content: bytes

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", "replace")

    def json(self) -> object:
        try:
            return json.loads(self.content)
        except ValueError:
            raise ValueError(
                f"{self.method} {self.path}: answer is not JSON: {one_line(self.text, 120)!r}"
            ) from None

    def json_object(self) -> dict:
        obj = self.json()
        if not isinstance(obj, dict):
            raise ValueError(f"{self.method} {self.path}: answer is not a JSON object")
        return obj


async def fetch(
    http: httpx.AsyncClient, method: str, path: str, limit: int = MAX_RESPONSE_BYTES, **kw: object
) -> Answer:
    """One request, its answer read to the end but at most ``limit`` bytes, never redirected."""
    async with http.stream(method, path, **kw) as resp:  # type: ignore[arg-type]
        content = await aread_capped(resp, limit)
    return Answer(method, resp.request.url.path, resp.status_code, content)


def model_ids(method_path: str, status: int, body: bytes) -> list[str]:
    """The ids of an OpenAI ``/v1/models`` answer; AnswerError if it is not one."""
    text = one_line(body.decode("utf-8", "replace"), 120)
    if status != 200:
        raise AnswerError(f"{method_path} answered HTTP {status}: {text}")
    try:
        return [str(m["id"]) for m in json.loads(body)["data"]]
    except (ValueError, KeyError, TypeError):
        raise AnswerError(f"{method_path}: not an OpenAI model list: {text!r}") from None


def served_models(http: httpx.Client) -> list[str]:
    with http.stream("GET", "/v1/models") as resp:
        body = read_capped(resp)
    return model_ids("GET /v1/models", resp.status_code, body)


def pick_model(models: list[str], model: str | None) -> str:
    """``model`` if given and listed, else the first listed; RuntimeError says why not."""
    if not models:
        raise RuntimeError("/v1/models lists no model")
    if model is None:
        return models[0]
    if model not in models:
        raise RuntimeError(f"model {model!r} not served; /v1/models lists {models}")
    return model


def resolve_model(http: httpx.Client, model: str | None) -> str:
    """The model to talk to: ``model`` if given and served, else the first one listed."""
    return pick_model(served_models(http), model)


def refused(err: BaseException) -> bool:
    """Whether ``err`` (or what caused it) is a refused TCP connection."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, ConnectionRefusedError):
            return True
        seen = seen.__cause__ or seen.__context__
    return "connection refused" in str(err).lower()


def describe(err: BaseException) -> str:
    """One line for a failed exchange: what was asked and what went wrong."""
    if isinstance(err, RedirectRefused | ResponseTooLarge | AnswerError):
        return one_line(str(err), 500)
    what = ""
    if isinstance(err, httpx.RequestError):
        try:
            what = f"{err.request.method} {err.request.url.path}: "
        except RuntimeError:  # an error raised before a request existed
            what = ""
    text = one_line(str(err), 200) or type(err).__name__
    if isinstance(err, httpx.ProtocolError):
        return f"{what}not an HTTP answer ({text})"
    if isinstance(err, httpx.ConnectError):
        return f"{what}cannot connect ({'connection refused' if refused(err) else text})"
    if isinstance(err, httpx.TimeoutException):
        return f"{what}no answer in time ({type(err).__name__})"
    if isinstance(err, httpx.NetworkError):
        return f"{what}connection lost ({text})"
    if isinstance(err, ValueError | RuntimeError):
        return one_line(str(err), 500)
    return f"{what}{type(err).__name__}: {text}"


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
        if not isinstance(chunk, dict):
            out.error = f"chunk is not a JSON object: {data[:80]!r}"
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

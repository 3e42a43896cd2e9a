#!/usr/bin/env python3
"""Liveness and readiness probe for the vLLM OpenAI server (standard library only).

Why two probes, and why three kinds of "unhealthy":

* vLLM opens its HTTP port only after the weights are loaded, the KV cache is
  profiled and the graphs are captured (15-90 min for DeepSeek V4 Pro). Until
  then a probe gets *connection refused*: the server is **still loading**, and an
  orchestrator must keep waiting (compose ``start_period``), not restart it.
* ``/health`` answers 503 once the engine core has died (``EngineDeadError``):
  the **engine is dead**, restart the container.
* ``/health`` can stay 200 after a GPU fault (vllm#36960), so ``ready`` also
  asks ``/v1/models`` for the served model and generates one token: a server
  that **answers but cannot generate** is not ready.

Usage: ``healthcheck.py live|ready [--url URL] [--model NAME] [--timeout S]``.
``VLLM_API_KEY`` (or ``--api-key``) is sent as a bearer token. Exit 0 healthy,
1 not; one line on stdout says which state and why. Runs under the image's
Python 3.12 with nothing but the standard library.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

DEFAULT_URL = "http://127.0.0.1:8000"

# The states a probe reports; the first word of every message.
HEALTHY = "healthy"
LOADING = "still loading"
DEAD = "engine dead"
NO_GENERATION = "answers but cannot generate"
UNREACHABLE = "unreachable"
UNAUTHORIZED = "unauthorized"


@dataclass(frozen=True)
class ProbeResult:
    """Outcome of one probe: ``ok`` decides the exit code, ``state`` the kind of failure."""

    ok: bool
    state: str
    detail: str

    @property
    def message(self) -> str:
        return f"{self.state}: {self.detail}"

    @property
    def exit_code(self) -> int:
        return 0 if self.ok else 1


@dataclass(frozen=True)
class _Response:
    status: int
    body: bytes


class _Refused(Exception):
    """Nothing listens on the port (yet)."""


class _NoAnswer(Exception):
    """Connected or tried to, but got no HTTP answer in time (or a network error)."""


def _request(
    url: str, timeout: float, api_key: str | None, payload: dict | None = None
) -> _Response:
    """One HTTP request; refusals and timeouts become exceptions, HTTP errors a status."""
    data = None if payload is None else json.dumps(payload).encode()
    req = urllib.request.Request(url, data=data, method="GET" if data is None else "POST")
    if data is not None:
        req.add_header("Content-Type", "application/json")
    if api_key:
        req.add_header("Authorization", f"Bearer {api_key}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return _Response(resp.status, resp.read())
    except urllib.error.HTTPError as err:
        return _Response(err.code, err.read() or b"")
    except urllib.error.URLError as err:
        reason = err.reason
        if isinstance(reason, ConnectionRefusedError):
            raise _Refused(str(reason)) from None
        if isinstance(reason, TimeoutError):
            raise _NoAnswer(f"no answer within {timeout:g} s") from None
        raise _NoAnswer(str(reason)) from None
    except ConnectionRefusedError as err:
        raise _Refused(str(err)) from None
    except TimeoutError:
        raise _NoAnswer(f"no answer within {timeout:g} s") from None
    except (ConnectionError, OSError) as err:
        raise _NoAnswer(str(err)) from None


def _snippet(body: bytes, limit: int = 200) -> str:
    text = body.decode("utf-8", "replace").strip().replace("\n", " ")
    return text[:limit] + ("..." if len(text) > limit else "")


def probe_live(url: str = DEFAULT_URL, timeout: float = 5.0) -> ProbeResult:
    """``GET /health``: 200 live, connection refused = loading, 503 = engine dead."""
    base = url.rstrip("/")
    t0 = time.monotonic()
    try:
        resp = _request(f"{base}/health", timeout, api_key=None)
    except _Refused:
        return ProbeResult(
            False,
            LOADING,
            f"connection refused at {base} (the server opens its port "
            "only after loading weights and starting the engine)",
        )
    except _NoAnswer as err:
        return ProbeResult(False, UNREACHABLE, f"GET {base}/health: {err}")
    ms = (time.monotonic() - t0) * 1000
    if resp.status == 200:
        return ProbeResult(True, HEALTHY, f"GET /health 200 in {ms:.0f} ms")
    if resp.status == 503:
        return ProbeResult(
            False, DEAD, "GET /health 503: the engine core has died; restart the server"
        )
    return ProbeResult(
        False, UNREACHABLE, f"GET /health answered HTTP {resp.status}: {_snippet(resp.body)}"
    )


def _listed_models(body: bytes) -> list[str]:
    try:
        data = json.loads(body)
        return [str(m["id"]) for m in data["data"]]
    except (ValueError, KeyError, TypeError):
        return []


def probe_ready(
    url: str = DEFAULT_URL,
    model: str | None = None,
    timeout: float = 30.0,
    api_key: str | None = None,
) -> ProbeResult:
    """Live, the model listed by ``/v1/models``, and a 1-token completion that succeeds."""
    live = probe_live(url, timeout)
    if not live.ok:
        return live
    base = url.rstrip("/")
    try:
        resp = _request(f"{base}/v1/models", timeout, api_key)
    except _Refused:
        return ProbeResult(False, LOADING, f"connection refused at {base}/v1/models")
    except _NoAnswer as err:
        return ProbeResult(False, NO_GENERATION, f"GET /v1/models: {err}")
    if resp.status == 401:
        return ProbeResult(
            False, UNAUTHORIZED, "GET /v1/models 401: set VLLM_API_KEY to the server's API key"
        )
    if resp.status != 200:
        return ProbeResult(
            False, NO_GENERATION, f"GET /v1/models HTTP {resp.status}: {_snippet(resp.body)}"
        )
    models = _listed_models(resp.body)
    if not models:
        return ProbeResult(False, NO_GENERATION, "GET /v1/models lists no model")
    if model is None:
        model = models[0]
    elif model not in models:
        return ProbeResult(
            False, NO_GENERATION, f"model {model!r} not served; /v1/models lists {models}"
        )
    payload = {"model": model, "prompt": "Hello", "max_tokens": 1, "temperature": 0}
    t0 = time.monotonic()
    try:
        resp = _request(f"{base}/v1/completions", timeout, api_key, payload)
    except _Refused:
        return ProbeResult(False, LOADING, f"connection refused at {base}/v1/completions")
    except _NoAnswer as err:
        return ProbeResult(False, NO_GENERATION, f"1-token completion: {err}")
    ms = (time.monotonic() - t0) * 1000
    if resp.status == 503:
        return ProbeResult(False, DEAD, "1-token completion answered 503: the engine has died")
    if resp.status != 200:
        return ProbeResult(
            False,
            NO_GENERATION,
            f"1-token completion HTTP {resp.status}: {_snippet(resp.body)}",
        )
    try:
        out = json.loads(resp.body)
        text = out["choices"][0]["text"]
        n_tokens = out["usage"]["completion_tokens"]
    except (ValueError, KeyError, IndexError, TypeError):
        return ProbeResult(
            False, NO_GENERATION, f"1-token completion: malformed answer {_snippet(resp.body)}"
        )
    if n_tokens != 1 or not isinstance(text, str):
        return ProbeResult(
            False, NO_GENERATION, f"1-token completion produced {n_tokens} tokens, text {text!r}"
        )
    return ProbeResult(
        True, HEALTHY, f"model {model!r} listed and generated 1 token in {ms:.0f} ms"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="healthcheck.py", description="Probe a vLLM OpenAI server (exit 0 healthy, 1 not)."
    )
    parser.add_argument("probe", choices=["live", "ready"])
    parser.add_argument("--url", default=DEFAULT_URL, help=f"server base URL ({DEFAULT_URL})")
    parser.add_argument("--model", default=None, help="served model name (default: first listed)")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per request")
    parser.add_argument(
        "--api-key", default=os.environ.get("VLLM_API_KEY"), help="default: $VLLM_API_KEY"
    )
    args = parser.parse_args(argv)
    if args.probe == "live":
        result = probe_live(args.url, args.timeout or 5.0)
    else:
        result = probe_ready(args.url, args.model, args.timeout or 30.0, args.api_key)
    print(f"{args.probe} {result.message}")
    return result.exit_code


if __name__ == "__main__":
    sys.exit(main())

"""``dsv4-nvfp4 health live|ready``: the liveness and readiness probe compose runs (stdlib only).

Why two probes, and why three kinds of "unhealthy":

* vLLM opens its HTTP port only after the weights are loaded, the KV cache is
  profiled and the graphs are captured (15-90 min for DeepSeek V4 Pro). Until
  then a probe gets *connection refused*: the server is **still loading**, and an
  orchestrator must keep waiting (compose ``start_period``), not restart it.
  The line then names the start-up stage (weights being read, shard i of n;
  or no checkpoint file open: compiling, profiling, capturing graphs), read
  from the server's processes (:mod:`dsv4_nvfp4.serving.loading_stage`).
* ``/health`` answers 503 once the engine core has died (``EngineDeadError``):
  the **engine is dead**, restart the container.
* ``/health`` can stay 200 after a GPU fault (reported upstream against vLLM),
  so ``ready`` also asks ``/v1/models`` for the served model and generates one
  token: a server that **answers but cannot generate** is not ready.

Why a deadline and not a socket timeout: a per-read timeout never fires against
a peer that sends one byte a second, so the whole probe (every request of it)
has one deadline, which bounds every socket operation, and reads at most
``MAX_BODY_BYTES`` of any answer (name resolution and a TLS handshake are
bounded per operation only). ``ready``'s default deadline (25 s) ends before
compose's healthcheck ``timeout`` (30 s), so the message is printed before
compose kills the probe. Redirects are never followed: the API key goes to
``--url`` only.

Usage: ``dsv4-nvfp4 health live|ready [--url URL] [--model NAME] [--timeout S]``;
compose runs the same command as ``python3 -m dsv4_nvfp4 health ready``.
``VLLM_API_KEY`` (or ``--api-key``) is sent as a bearer token. Exit 0 healthy
(one line on stdout), 1 not (one line on stderr naming the state and why), 2
unusable input (one line on stderr).

Why standard library only: the probe runs every 30 s inside the serving
container, next to a server that may be wedged; it must start in milliseconds
and must not depend on torch, httpx or vLLM importing cleanly.
``dsv4_nvfp4``, ``dsv4_nvfp4.cli`` and ``dsv4_nvfp4.serving`` import nothing at
import time, so ``python3 -I -S`` (no site-packages at all) runs it;
``tests/test_import_rules.py`` checks that.
"""

from __future__ import annotations

import argparse
import functools
import http.client
import io
import json
import math
import os
import socket
import sys
import time
import urllib.parse
from dataclasses import dataclass

from dsv4_nvfp4.serving import loading_stage

DEFAULT_URL = "http://127.0.0.1:8000"
# Whole-probe deadlines in seconds. ready's must end before compose's healthcheck
# timeout (30 s) with room for the interpreter to start and print.
DEFAULT_DEADLINE_S = {"live": 5.0, "ready": 25.0}
# The largest answer read; /health is empty, /v1/models and a 1-token completion < 4 KiB.
MAX_BODY_BYTES = 1024 * 1024
_READ_SIZE = 64 * 1024

# The states a probe reports; the first word(s) of every message.
HEALTHY = "healthy"
LOADING = "still loading"
DEAD = "engine dead"
NO_GENERATION = "answers but cannot generate"
UNREACHABLE = "unreachable"
UNAUTHORIZED = "unauthorized"
INVALID = "invalid answer"
REDIRECTED = "redirected"


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
class BaseURL:
    """Where the server is: ``scheme://host:port`` and an optional path prefix."""

    scheme: str
    host: str
    port: int
    prefix: str


def parse_base_url(url: str) -> BaseURL:
    """The parts of ``--url``; ValueError says what is wrong with it (one line)."""
    expected = "expected http://HOST[:PORT] or https://HOST[:PORT]"
    if any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in url):
        raise ValueError("contains whitespace or control characters")
    try:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname
    except ValueError:
        raise ValueError(expected) from None
    if parts.scheme not in ("http", "https") or not host:
        raise ValueError(expected)
    if parts.username is not None or parts.password is not None:
        raise ValueError("credentials in the URL are never sent; set VLLM_API_KEY")
    if parts.query or parts.fragment:
        raise ValueError("a base URL has no query or fragment")
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port is None:
        port = 443 if parts.scheme == "https" else 80
    if not 1 <= port <= 65535:
        raise ValueError("the port is not a number from 1 to 65535")
    return BaseURL(parts.scheme, host, port, parts.path.rstrip("/"))


@dataclass(frozen=True)
class _Response:
    status: int
    body: bytes
    location: str | None


class _Refused(Exception):
    """Nothing listens on the port (yet)."""


class _NoAnswer(Exception):
    """No complete answer before the deadline, or a network error."""


class _BadAnswer(Exception):
    """Something answered, but not a usable HTTP answer (garbage, cut short, too large)."""


class _Deadline:
    """One deadline for every request of a probe."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    @property
    def message(self) -> str:
        return f"no complete answer within the {self.seconds:g} s deadline"


def _read_body(resp: http.client.HTTPResponse) -> bytes:
    """The body, at most MAX_BODY_BYTES; _BadAnswer if larger or cut short."""
    too_large = f"answer larger than {MAX_BODY_BYTES >> 20} MiB; stopped reading"
    declared = resp.length
    if declared is not None and declared > MAX_BODY_BYTES:
        raise _BadAnswer(too_large)
    chunks: list[bytes] = []
    total = 0
    while True:
        try:
            chunk = resp.read1(_READ_SIZE)
        except http.client.IncompleteRead:
            raise _BadAnswer(f"answer cut short (chunked body ended after {total} bytes)") from None
        if not chunk:
            break
        total += len(chunk)
        if total > MAX_BODY_BYTES:
            raise _BadAnswer(too_large)
        chunks.append(chunk)
    if resp.length:  # bytes that Content-Length promised and the peer never sent
        raise _BadAnswer(f"answer cut short ({total} of {declared} bytes)")
    return b"".join(chunks)


def _failure(err: BaseException) -> Exception:
    """The probe's exception for an error while talking HTTP to a connected peer."""
    if isinstance(err, http.client.RemoteDisconnected):
        return _BadAnswer("not an HTTP answer (the server closed the connection without one)")
    if isinstance(err, http.client.BadStatusLine):
        line = str(err.args[0] if err.args else "").strip()
        return _BadAnswer(f"not an HTTP answer (first line {_one_line(line, 60)!r})")
    if isinstance(err, http.client.HTTPException):
        return _BadAnswer(f"not an HTTP answer ({_one_line(str(err), 120)})")
    return _NoAnswer(f"connection lost: {_one_line(str(err), 120)}")


class _DeadlineReader(io.RawIOBase):
    """The socket as a raw stream whose every read waits at most until the deadline."""

    def __init__(self, sock: socket.socket, deadline: _Deadline) -> None:
        super().__init__()
        self._sock = sock
        # Like http.client's own reader, a socket file keeps the socket open until closed.
        self._raw = sock.makefile("rb", buffering=0)
        self._deadline = deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:
        left = self._deadline.left()
        if left <= 0:
            raise TimeoutError(self._deadline.message)
        self._sock.settimeout(left)
        return self._raw.readinto(buffer)  # type: ignore[no-any-return]

    def close(self) -> None:
        if not self.closed:
            self._raw.close()
        super().close()


class _DeadlineResponse(http.client.HTTPResponse):
    """http.client's response parser reading through a _DeadlineReader."""

    def __init__(self, sock: socket.socket, *args: object, deadline: _Deadline, **kw: object):
        super().__init__(sock, *args, **kw)  # type: ignore[arg-type]
        self.fp.close()
        self.fp = io.BufferedReader(_DeadlineReader(sock, deadline))


def _request(
    base: BaseURL,
    path: str,
    deadline: _Deadline,
    api_key: str | None = None,
    payload: dict | None = None,
) -> _Response:
    """One HTTP request, never redirected, finished before ``deadline`` or abandoned.

    Every socket operation waits at most for the time left, and the status
    line, headers and body are read through a _DeadlineReader, so a peer that
    drips bytes (each read on time, the answer never complete) cannot hold the
    probe past its deadline. Refusals become _Refused; everything else
    _NoAnswer or _BadAnswer.
    """
    left = deadline.left()
    if left <= 0:
        raise _NoAnswer(deadline.message)
    data = None if payload is None else json.dumps(payload).encode()
    headers = {"Accept": "application/json"}
    if data is not None:
        headers["Content-Type"] = "application/json"
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    cls = http.client.HTTPSConnection if base.scheme == "https" else http.client.HTTPConnection
    conn = cls(base.host, base.port, timeout=left)
    conn.response_class = functools.partial(_DeadlineResponse, deadline=deadline)  # type: ignore[assignment]
    try:
        try:
            conn.connect()
        except ConnectionRefusedError as err:
            raise _Refused(str(err)) from None
        except TimeoutError:
            raise _NoAnswer(deadline.message) from None
        except OSError as err:  # DNS, TLS, unreachable networks
            raise _NoAnswer(f"cannot connect: {_one_line(str(err), 120)}") from None
        try:
            left = deadline.left()
            if left <= 0:
                raise TimeoutError
            conn.sock.settimeout(left)  # bounds the sends; reads go through _DeadlineReader
            conn.request("GET" if data is None else "POST", base.prefix + path, data, headers)
            resp = conn.getresponse()
            body = _read_body(resp)
        except (http.client.HTTPException, OSError) as err:
            if isinstance(err, TimeoutError) or deadline.left() <= 0:
                raise _NoAnswer(deadline.message) from None
            raise _failure(err) from None
        return _Response(resp.status, body, resp.getheader("Location"))
    finally:
        conn.close()


def _one_line(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text[:limit] + ("..." if len(text) > limit else "")


def _snippet(body: bytes, limit: int = 200) -> str:
    return _one_line(body.decode("utf-8", "replace"), limit)


def _redirected(what: str, resp: _Response) -> ProbeResult:
    where = f"Location {_one_line(resp.location, 200)}" if resp.location else "no Location"
    return ProbeResult(
        False,
        REDIRECTED,
        f"{what} answered HTTP {resp.status} with {where}; redirects are not followed "
        "(the API key goes to --url only)",
    )


def _live(url: str, deadline: _Deadline) -> ProbeResult:
    base = url.rstrip("/")
    where = parse_base_url(url)
    t0 = time.monotonic()
    try:
        resp = _request(where, "/health", deadline)
    except _Refused:
        stage = loading_stage.describe(loading_stage.vllm_processes())
        return ProbeResult(
            False,
            LOADING,
            f"connection refused at {base} (the server opens its port "
            f"only after loading weights and starting the engine); stage: {stage}",
        )
    except _NoAnswer as err:
        return ProbeResult(False, UNREACHABLE, f"GET /health: {err}")
    except _BadAnswer as err:
        return ProbeResult(False, INVALID, f"GET /health: {err}")
    ms = (time.monotonic() - t0) * 1000
    if resp.status == 200:
        return ProbeResult(True, HEALTHY, f"GET /health 200 in {ms:.0f} ms")
    if resp.status == 503:
        return ProbeResult(
            False, DEAD, "GET /health 503: the engine core has died; restart the server"
        )
    if 300 <= resp.status < 400:
        return _redirected("GET /health", resp)
    return ProbeResult(
        False, UNREACHABLE, f"GET /health answered HTTP {resp.status}: {_snippet(resp.body)}"
    )


def probe_live(url: str = DEFAULT_URL, timeout: float = DEFAULT_DEADLINE_S["live"]) -> ProbeResult:
    """``GET /health`` within ``timeout`` s: 200 live, refused = loading, 503 = engine dead."""
    return _live(url, _Deadline(timeout))


def _listed_models(body: bytes) -> list[str]:
    try:
        data = json.loads(body)
        return [str(m["id"]) for m in data["data"]]
    except (ValueError, KeyError, TypeError):
        return []


def probe_ready(
    url: str = DEFAULT_URL,
    model: str | None = None,
    timeout: float = DEFAULT_DEADLINE_S["ready"],
    api_key: str | None = None,
) -> ProbeResult:
    """Live, the model listed by ``/v1/models`` and a 1-token completion, within ``timeout`` s."""
    deadline = _Deadline(timeout)
    live = _live(url, deadline)
    if not live.ok:
        return live
    base = url.rstrip("/")
    where = parse_base_url(url)
    try:
        resp = _request(where, "/v1/models", deadline, api_key)
    except _Refused:
        return ProbeResult(False, LOADING, f"connection refused at {base}/v1/models")
    except _NoAnswer as err:
        return ProbeResult(False, NO_GENERATION, f"GET /v1/models: {err}")
    except _BadAnswer as err:
        return ProbeResult(False, INVALID, f"GET /v1/models: {err}")
    if resp.status == 401:
        return ProbeResult(
            False, UNAUTHORIZED, "GET /v1/models 401: set VLLM_API_KEY to the server's API key"
        )
    if 300 <= resp.status < 400:
        return _redirected("GET /v1/models", resp)
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
        resp = _request(where, "/v1/completions", deadline, api_key, payload)
    except _Refused:
        return ProbeResult(False, LOADING, f"connection refused at {base}/v1/completions")
    except _NoAnswer as err:
        return ProbeResult(False, NO_GENERATION, f"1-token completion: {err}")
    except _BadAnswer as err:
        return ProbeResult(False, INVALID, f"POST /v1/completions: {err}")
    ms = (time.monotonic() - t0) * 1000
    if resp.status == 503:
        return ProbeResult(False, DEAD, "1-token completion answered 503: the engine has died")
    if 300 <= resp.status < 400:
        return _redirected("POST /v1/completions", resp)
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
            False,
            NO_GENERATION,
            f"1-token completion produced {_one_line(repr(n_tokens), 40)} tokens, "
            f"text {_one_line(repr(text), 80)}",
        )
    return ProbeResult(
        True, HEALTHY, f"model {model!r} listed and generated 1 token in {ms:.0f} ms"
    )


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise ValueError(text)
    return value


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "health",
        help="liveness / readiness probe (exit 0 healthy, 1 not, 2 bad input)",
        description=__doc__,
    )
    p.add_argument("probe", choices=["live", "ready"])
    p.add_argument("--url", default=DEFAULT_URL, help=f"server base URL ({DEFAULT_URL})")
    p.add_argument("--model", default=None, help="served model name (default: first listed)")
    p.add_argument(
        "--timeout",
        default=None,
        help="deadline in seconds for the whole probe, every request of it "
        f"(live {DEFAULT_DEADLINE_S['live']:g}, ready {DEFAULT_DEADLINE_S['ready']:g})",
    )
    p.add_argument("--api-key", default=None, help="default: $VLLM_API_KEY")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Probe once; one line on stdout (healthy) or stderr (not, or bad input)."""
    prog = "dsv4-nvfp4 health"
    try:
        parse_base_url(args.url)
    except ValueError as err:
        print(f"{prog}: --url {args.url!r}: {err}", file=sys.stderr)
        return 2
    deadline = DEFAULT_DEADLINE_S[args.probe]
    if args.timeout is not None:
        try:
            deadline = _positive_seconds(args.timeout)
        except ValueError:
            print(
                f"{prog}: --timeout: expected a positive number of seconds, got {args.timeout!r}",
                file=sys.stderr,
            )
            return 2
    api_key = args.api_key or os.environ.get("VLLM_API_KEY")
    if args.probe == "live":
        result = probe_live(args.url, deadline)
    else:
        result = probe_ready(args.url, args.model, deadline, api_key)
    print(f"{args.probe} {result.message}", file=sys.stdout if result.ok else sys.stderr)
    return result.exit_code

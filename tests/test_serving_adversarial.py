"""The probes and HTTP clients against loopback peers that misbehave on purpose.

Each peer is a real TCP server on 127.0.0.1 (a thread per connection) that
answers every request the same wrong way: never, with bytes that are not
HTTP, with a body cut short, one byte at a time for ever, with an endless
body, with HTTP 500, or with a redirect to a second server that records
whatever reaches it. What must hold against each:

* every probe and every smoke check ends within its overall deadline and
  reads at most its size cap, however the peer drips or floods;
* no client follows a redirect, so the API key only ever goes to ``--url``;
* a bad answer or bad input gives exit code 1 (not ready / findings) or 2
  (unusable input) and exactly one line on stderr, never a traceback; the
  smoke test still writes its table and JSON report, every check failed
  with its reason.

The probes run as the user runs them, in their own interpreter
(``dsv4-nvfp4 health`` with ``-I -S``: standard library only), so a probe that
hangs is killed by the test's own timeout and reported as a failure.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from probe_cli import isolated_health_argv

from dsv4_nvfp4.cli import main as cli_main
from dsv4_nvfp4.deploy import compose
from dsv4_nvfp4.launch import serve
from dsv4_nvfp4.serving import openai_http
from dsv4_nvfp4.serving import probe as health_probe

REPO_ROOT = Path(__file__).resolve().parents[1]
COMPOSE = REPO_ROOT / "compose.yaml"
KEY = "secret-key-for-the-test"
ALL_CHECKS = (
    "health, models, version, chat, chat_stream, completions, tool_call, reasoning, "
    "determinism, concurrency, malformed, mtp"
)

Handler = Callable[["Peer", socket.socket, bytes], None]


# --- loopback peers -------------------------------------------------------------------


def _read_request(conn: socket.socket) -> bytes:
    """One HTTP request (head and Content-Length body), as raw bytes."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
    want = int(length.group(1)) if length else 0
    while len(body) < want:
        chunk = conn.recv(65536)
        if not chunk:
            break
        body += chunk
    return head + b"\r\n\r\n" + body


class Peer:
    """A loopback TCP server; ``handler(peer, conn, request)`` answers each connection."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.stop = threading.Event()
        self.requests: list[bytes] = []
        self._conns: list[socket.socket] = []
        self._sock = socket.create_server(("127.0.0.1", 0))
        self._sock.settimeout(0.1)
        self.port = self._sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(10)
            self._conns.append(conn)
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError):
            request = _read_request(conn)
            self.requests.append(request)
            self.handler(self, conn, request)
        with contextlib.suppress(OSError):
            conn.close()

    def paths(self) -> list[str]:
        return [r.split(b" ", 2)[1].decode() for r in self.requests if r.count(b" ") >= 2]

    def close(self) -> None:
        self.stop.set()
        self._sock.close()
        for conn in self._conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                conn.close()
        self._thread.join(5)


@pytest.fixture
def peer() -> Iterator[Callable[[Handler], Peer]]:
    started: list[Peer] = []

    def start(handler: Handler) -> Peer:
        started.append(Peer(handler))
        return started[-1]

    yield start
    for p in started:
        p.close()


def _respond(conn: socket.socket, status: str, body: bytes, *extra: str) -> None:
    head = [f"HTTP/1.1 {status}", f"Content-Length: {len(body)}", "Connection: close", *extra]
    conn.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + body)


def silent(peer: Peer, conn: socket.socket, request: bytes) -> None:
    """Accepts, reads the request, never answers."""
    peer.stop.wait()


def garbage(peer: Peer, conn: socket.socket, request: bytes) -> None:
    conn.sendall(b"this is not HTTP\r\n\r\n")


SHORT_BODY = b'{"data": ['  # 10 of the 100 bytes promised


def short_body(peer: Peer, conn: socket.socket, request: bytes) -> None:
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 100\r\n\r\n" + SHORT_BODY)


def drip_body(peer: Peer, conn: socket.socket, request: bytes) -> None:
    """Headers at once, then one byte every 0.1 s for ever: no read ever times out."""
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n")
    while not peer.stop.wait(0.1):
        conn.sendall(b" ")


def drip_head(peer: Peer, conn: socket.socket, request: bytes) -> None:
    """The status line and then one endless header, one byte every 0.1 s."""
    for byte in b"HTTP/1.1 200 OK\r\nX-Drip: ":
        if peer.stop.wait(0.1):
            return
        conn.sendall(bytes([byte]))
    while not peer.stop.wait(0.1):
        conn.sendall(b"a")


def endless_body(peer: Peer, conn: socket.socket, request: bytes) -> None:
    """A body without end at ~13 MB/s (throttled so a client without a cap grows slowly)."""
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n")
    block = b"x" * 65536
    while not peer.stop.is_set():
        conn.sendall(block)
        time.sleep(0.005)


def error_500(peer: Peer, conn: socket.socket, request: bytes) -> None:
    _respond(conn, "500 Internal Server Error", b"Internal Server Error")


MODELS = json.dumps({"object": "list", "data": [{"id": "m", "root": "/nowhere"}]}).encode()


def trap(peer: Peer, conn: socket.socket, request: bytes) -> None:
    """Where the redirects point: answers like vLLM, so a client that follows would succeed."""
    _respond(conn, "200 OK", MODELS, "Content-Type: application/json")


def redirector(to: Peer) -> Handler:
    """``/health`` 200; every other path 302 to the same path on ``to`` (another port)."""

    def handler(peer: Peer, conn: socket.socket, request: bytes) -> None:
        path = request.split(b" ", 2)[1].decode()
        if path == "/health":
            _respond(conn, "200 OK", b"")
        else:
            _respond(conn, "302 Found", b"", f"Location: {to.url}{path}")

    return handler


# --- running the commands -------------------------------------------------------------


@dataclass
class Outcome:
    code: int
    out: str
    err: str
    seconds: float


def _run(argv: list[str], timeout: float, api_key: str | None = None) -> Outcome:
    env = {k: v for k, v in os.environ.items() if k not in ("VLLM_API_KEY", "OPENAI_API_KEY")}
    if api_key is not None:
        env["VLLM_API_KEY"] = api_key
    t0 = time.monotonic()
    try:
        proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{argv[2:]} still running after {timeout} s: no overall deadline")
    return Outcome(proc.returncode, proc.stdout, proc.stderr, time.monotonic() - t0)


def probe(*args: str, timeout: float = 15, api_key: str | None = None) -> Outcome:
    """``dsv4-nvfp4 health`` the way compose runs it (isolated, standard library only)."""
    return _run(isolated_health_argv(*args), timeout, api_key)


def module(name: str, *args: str, timeout: float = 20, api_key: str | None = None) -> Outcome:
    return _run([sys.executable, "-m", "dsv4_nvfp4", name, *args], timeout, api_key)


def one_line(text: str) -> str:
    """The single line of ``text``; fails on more lines or a traceback."""
    assert "Traceback" not in text, text
    assert text.endswith("\n") and text.count("\n") == 1, repr(text)
    return text[:-1]


# --- the probe: overall deadline and size cap -------------------------------------


@pytest.mark.cpu
@pytest.mark.parametrize("drip", [drip_body, drip_head], ids=["body", "head"])
@pytest.mark.parametrize("kind", ["live", "ready"])
def test_probe_stops_a_dripping_peer_at_its_deadline(peer, drip, kind) -> None:
    p = peer(drip)
    res = probe(kind, "--url", p.url, "--timeout", "1", api_key=KEY)
    assert res.code == 1 and res.out == ""
    assert one_line(res.err) == (
        f"{kind} unreachable: GET /health: no complete answer within the 1 s deadline"
    )
    assert res.seconds < 4.0  # 1 s deadline + interpreter start on a busy 2-core machine


@pytest.mark.cpu
def test_probe_caps_an_endless_body(peer) -> None:
    p = peer(endless_body)
    res = probe("live", "--url", p.url, "--timeout", "10")
    assert res.code == 1 and res.out == ""
    assert one_line(res.err) == (
        "live invalid answer: GET /health: answer larger than 1 MiB; stopped reading"
    )
    assert res.seconds < 5.0  # 1 MiB at ~13 MB/s, not the 10 s deadline


@pytest.mark.cpu
@pytest.mark.parametrize(
    ("handler", "detail"),
    [
        (garbage, "not an HTTP answer (first line 'this is not HTTP')"),
        (short_body, "answer cut short (10 of 100 bytes)"),
    ],
    ids=["garbage", "short-body"],
)
def test_probe_bad_answer_is_one_line(peer, handler, detail) -> None:
    p = peer(handler)
    res = probe("ready", "--url", p.url, "--timeout", "5", api_key=KEY)
    assert res.code == 1 and res.out == ""
    assert one_line(res.err) == f"ready invalid answer: GET /health: {detail}"


@pytest.mark.cpu
def test_probe_never_follows_a_redirect_with_the_key(peer) -> None:
    target = peer(trap)
    p = peer(redirector(target))
    res = probe("ready", "--url", p.url, "--timeout", "5", api_key=KEY)
    assert res.code == 1 and res.out == ""
    assert one_line(res.err) == (
        f"ready redirected: GET /v1/models answered HTTP 302 with Location "
        f"{target.url}/v1/models; redirects are not followed (the API key goes to --url only)"
    )
    assert p.paths() == ["/health", "/v1/models"]
    assert target.requests == []  # neither the key nor anything else reached the other port


@pytest.mark.cpu
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ("--timeout", "-1"),
            "dsv4-nvfp4 health: --timeout: expected a positive number of seconds, got '-1'",
        ),
        (
            ("--timeout", "nan"),
            "dsv4-nvfp4 health: --timeout: expected a positive number of seconds, got 'nan'",
        ),
        (
            ("--url", "127.0.0.1:8000"),
            "dsv4-nvfp4 health: --url '127.0.0.1:8000': expected http://HOST[:PORT] or "
            "https://HOST[:PORT]",
        ),
        (
            ("--url", "http://127.0.0.1:port"),
            "dsv4-nvfp4 health: --url 'http://127.0.0.1:port': the port is not a number "
            "from 1 to 65535",
        ),
        (
            ("--url", "http://127.0.0.1:99999"),
            "dsv4-nvfp4 health: --url 'http://127.0.0.1:99999': the port is not a number "
            "from 1 to 65535",
        ),
        (("alive",), None),  # argparse's own error, on one line
    ],
    ids=["negative-timeout", "nan-timeout", "no-scheme", "port-word", "port-range", "probe"],
)
def test_probe_unusable_input_exits_2_with_one_line(args, message) -> None:
    res = probe(*(args if args == ("alive",) else ("ready", *args)))
    assert res.code == 2 and res.out == ""
    line = one_line(res.err)
    if message is None:
        assert line.startswith("dsv4-nvfp4 health: argument probe: invalid choice: 'alive'")
    else:
        assert line == message


def _go_duration_s(text: str) -> float:
    """Compose durations (``30s``, ``1m30s``, ``500ms``) in seconds."""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", text)
    assert parts and "".join(n + u for n, u in parts) == text, text
    return sum(float(n) * units[u] for n, u in parts)


@pytest.mark.cpu
def test_ready_default_deadline_fits_compose_healthcheck_timeout() -> None:
    """Compose kills the probe at ``timeout`` and keeps no message; ours must end first."""
    check = compose.load_compose(COMPOSE)["services"]["vllm"]["healthcheck"]
    assert "ready" in check["test"] and "--timeout" not in check["test"]  # runs the default
    hc = health_probe
    assert hc.DEFAULT_DEADLINE_S == {"live": 5.0, "ready": 25.0}
    # 2 s for the interpreter to start and print, under load.
    assert hc.DEFAULT_DEADLINE_S["ready"] + 2.0 <= _go_duration_s(check["timeout"])
    assert hc.MAX_BODY_BYTES == 1024 * 1024


# --- dsv4-nvfp4 health: the same probe, the same guarantees -------------------------------


@pytest.mark.cpu
def test_cli_health_deadline_and_bad_input(peer) -> None:
    p = peer(drip_body)
    res = module("health", "ready", "--url", p.url, "--timeout", "1")
    assert res.code == 1 and res.out == ""
    assert one_line(res.err) == (
        "ready unreachable: GET /health: no complete answer within the 1 s deadline"
    )
    assert res.seconds < 5.0
    res = module("health", "live", "--timeout", "-1")
    assert res.code == 2 and res.out == ""
    assert one_line(res.err) == (
        "dsv4-nvfp4 health: --timeout: expected a positive number of seconds, got '-1'"
    )


# --- smoke: every check bounded, a report whatever the peer does -----------------------


def _smoke(url: str, tmp_path: Path, *args: str, timeout: float = 40) -> tuple[Outcome, dict]:
    report = tmp_path / "smoke.json"
    res = module(
        "smoke", "--url", url, "--json", str(report), "--expect-version", "",
        "--concurrency", "4", *args, timeout=timeout,
    )
    assert report.is_file(), res.err
    return res, json.loads(report.read_text())


def _all_failed(res: Outcome, rep: dict, names: str = ALL_CHECKS) -> dict[str, str]:
    assert res.code == 1
    assert one_line(res.err) == f"smoke FAILED: {names}"
    assert rep["passed"] is False and rep["failed"] == names.split(", ")
    details = {c["name"]: c["detail"] for c in rep["checks"]}
    for name, detail in details.items():
        assert detail and "\n" not in detail, (name, detail)
    table = res.out.splitlines()
    assert table[0].split() == ["check", "status", "seconds", "detail"]
    assert [line.split()[1] for line in table[2:2 + len(details)]] == ["FAIL"] * len(details)
    return details


@pytest.mark.cpu
def test_smoke_against_a_silent_peer(peer, tmp_path) -> None:
    p = peer(silent)
    res, rep = _smoke(p.url, tmp_path, "--timeout", "0.5")
    details = _all_failed(res, rep)
    for name, detail in details.items():
        assert "no complete answer within the check's 0.5 s deadline" in detail, (name, detail)
    assert details["health"] == "no complete answer within the check's 0.5 s deadline (GET /health)"
    # 12 checks of 0.5 s, the preflight and the /metrics baseline: ~7 s, never minutes.
    assert res.seconds < 20.0


@pytest.mark.cpu
def test_smoke_against_a_garbage_peer(peer, tmp_path) -> None:
    p = peer(garbage)
    res, rep = _smoke(p.url, tmp_path, "--timeout", "5")
    details = _all_failed(res, rep)
    for name, detail in details.items():
        assert "not an HTTP answer" in detail, (name, detail)
    assert details["health"].startswith("GET /health: not an HTTP answer (")


@pytest.mark.cpu
def test_smoke_against_500_everywhere(peer, tmp_path) -> None:
    p = peer(error_500)
    res, rep = _smoke(p.url, tmp_path, "--timeout", "5")
    details = _all_failed(res, rep)
    for name, detail in details.items():
        assert "HTTP 500" in detail, (name, detail)
    assert details["health"] == "GET /health answered HTTP 500: Internal Server Error"
    assert details["models"] == "GET /v1/models answered HTTP 500: Internal Server Error"


@pytest.mark.cpu
@pytest.mark.parametrize("handler", [drip_body, drip_head], ids=["body", "head"])
def test_smoke_stops_each_check_of_a_dripping_peer_at_its_deadline(
    peer, tmp_path, handler
) -> None:
    p = peer(handler)
    res, rep = _smoke(p.url, tmp_path, "--timeout", "1", "--checks", "health,models")
    details = _all_failed(res, rep, "health, models")
    assert details == {
        "health": "no complete answer within the check's 1 s deadline (GET /health)",
        "models": "no complete answer within the check's 1 s deadline (GET /v1/models)",
    }
    assert all(c["seconds"] < 1.5 for c in rep["checks"])
    assert res.seconds < 10.0


@pytest.mark.cpu
def test_smoke_caps_an_endless_body(peer, tmp_path) -> None:
    p = peer(endless_body)
    res, rep = _smoke(p.url, tmp_path, "--timeout", "10", "--checks", "health,models")
    details = _all_failed(res, rep, "health, models")
    assert details == {
        "health": "GET /health: answer larger than 4 MiB; stopped reading",
        "models": "GET /v1/models: answer larger than 4 MiB; stopped reading",
    }
    assert res.seconds < 10.0  # 4 MiB at ~13 MB/s per request, not the 10 s deadlines


@pytest.mark.cpu
def test_smoke_never_follows_a_redirect_with_the_key(peer, tmp_path) -> None:
    target = peer(trap)
    p = peer(redirector(target))
    res, rep = _smoke(
        p.url, tmp_path, "--timeout", "5", "--checks", "health,models", "--api-key", KEY
    )
    assert res.code == 1
    assert one_line(res.err) == "smoke FAILED: models"
    details = {c["name"]: c["detail"] for c in rep["checks"]}
    assert details["models"] == (
        f"GET /v1/models answered HTTP 302 with Location {target.url}/v1/models; "
        "redirects are not followed (the API key goes to --url only)"
    )
    assert target.requests == []


@pytest.mark.cpu
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ("--timeout", "-1"),
            "smoke: --timeout: expected a positive number of seconds, got '-1'",
        ),
        (
            ("--url", "localhost:8000"),
            "smoke: --url 'localhost:8000': expected http://HOST[:PORT] or https://HOST[:PORT]",
        ),
    ],
    ids=["timeout", "url"],
)
def test_smoke_unusable_input_exits_2_with_one_line(args, message) -> None:
    res = module("smoke", "--json", "", *args)
    assert res.code == 2 and res.out == ""
    assert one_line(res.err) == message


# --- the shared client, bench and eval: no redirect is followed ----------------------------


@pytest.mark.cpu
def test_shared_client_refuses_redirects(peer) -> None:
    target = peer(trap)
    p = peer(redirector(target))
    with openai_http.client(p.url, KEY, timeout=5) as http, pytest.raises(
        openai_http.RedirectRefused
    ) as err:
        openai_http.served_models(http)
    assert str(err.value) == (
        f"GET /v1/models answered HTTP 302 with Location {target.url}/v1/models; "
        "redirects are not followed (the API key goes to --url only)"
    )
    assert target.requests == []


@pytest.mark.cpu
@pytest.mark.parametrize("command", ["eval", "bench"])
def test_eval_and_bench_stop_at_a_redirect_with_one_line(peer, tmp_path, capsys, command) -> None:
    target = peer(trap)
    p = peer(redirector(target))
    code = cli_main([command, "--url", p.url, "--api-key", KEY, "--out-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 1
    assert one_line(err) == (
        f"{command}: GET /v1/models answered HTTP 302 with Location {target.url}/v1/models; "
        "redirects are not followed (the API key goes to --url only)"
    )
    assert target.requests == []


@pytest.mark.cpu
def test_eval_garbage_model_list_is_one_line(peer, tmp_path, capsys) -> None:
    p = peer(garbage)
    code = cli_main(["eval", "--url", p.url, "--out-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 1
    assert one_line(err).startswith("eval: GET /v1/models: not an HTTP answer (")


# --- serve: .env.example's placeholder key is refused ---------------------------------------


@pytest.mark.cpu
def test_env_example_placeholder_key_is_known_to_serve() -> None:
    placeholder = compose.read_env_file(REPO_ROOT / ".env.example")["VLLM_API_KEY"]
    assert placeholder in serve.PLACEHOLDER_API_KEYS


@pytest.mark.cpu
def test_serve_refuses_the_placeholder_key(tmp_path, capsys, monkeypatch) -> None:
    (tmp_path / "config.json").write_text("{}")
    env_file = tmp_path / "empty.env"
    env_file.write_text("")
    placeholder = compose.read_env_file(REPO_ROOT / ".env.example")["VLLM_API_KEY"]
    with pytest.raises(serve.ServeError) as err:
        serve.build_server_config(
            tmp_path, compose_file=COMPOSE, env_file=env_file,
            environ={"VLLM_API_KEY": placeholder, "SERVED_MODEL_NAME": "m"},
        )
    message = (
        f"VLLM_API_KEY is {placeholder!r}, the placeholder of .env.example: set a secret key "
        """in .env (python3 -c "import secrets; print(secrets.token_urlsafe(32))")"""
    )
    assert str(err.value) == message
    monkeypatch.setenv("VLLM_API_KEY", placeholder)
    code = cli_main(["serve",
        "--model-dir", str(tmp_path), "--compose-file", str(COMPOSE),
        "--env-file", str(env_file), "--dry-run",
    ])
    out, err_text = capsys.readouterr()
    assert code == 2 and out == ""
    assert one_line(err_text) == f"serve: {message}"


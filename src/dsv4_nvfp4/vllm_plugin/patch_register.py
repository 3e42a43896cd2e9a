"""The one register of runtime patches the plugin applies to vLLM (vllm-ascend style).

Why a register: every patch is a debt against a pinned vLLM release. Each entry
says which symbol it touches, why, the upstream issue, and when it can be
deleted; each has its own test (``tests/test_plugin_patches.py``). A patch
wraps the original and delegates to it (the original stays reachable as
``__wrapped__``); it never replaces a file.

Patches are applied when their target module is imported, not at plugin load:
importing a vLLM model module costs seconds, and vLLM loads general plugins in
every process (API server, engine core, workers), most of which never touch the
target. If the module is already imported, the patch is applied at once.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import logging
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

from dsv4_nvfp4.vllm_plugin.cpu_fixes import CPU_TILE_SCHEDULER_PATCH
from dsv4_nvfp4.vllm_plugin.runtime_patch import Patch, is_patched
from dsv4_nvfp4.vllm_plugin.staging_patch import MEGAMOE_STAGING_PATCH

logger = logging.getLogger("vllm.dsv4_nvfp4.patches")

def _apply_now(patch: Patch, module: ModuleType) -> bool:
    """Apply ``patch`` to an imported module; returns True if it is (now) in place."""
    if not patch.active():
        logger.debug("dsv4_nvfp4: patch %s inactive here, skipped", patch.name)
        return False
    if is_patched(module, patch.symbol):
        return True
    patch.apply(module)
    logger.debug("dsv4_nvfp4: patched %s.%s (%s)", patch.module, patch.symbol, patch.name)
    return True


class _PostImportHook(importlib.abc.MetaPathFinder):
    """Runs callbacks right after a named module finishes executing.

    It finds the real spec with the other finders and wraps the loader's
    ``exec_module``; it never loads anything itself.
    """

    def __init__(self) -> None:
        self.callbacks: dict[str, list[Callable[[ModuleType], None]]] = {}
        self._busy = threading.local()

    def find_spec(self, fullname, path, target=None):  # type: ignore[no-untyped-def]
        if fullname not in self.callbacks or getattr(self._busy, "on", False):
            return None
        self._busy.on = True
        try:
            spec = None
            for finder in sys.meta_path:
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(fullname, path, target)
                if spec is not None:
                    break
        finally:
            self._busy.on = False
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        real_exec = spec.loader.exec_module
        callbacks = self.callbacks.pop(fullname)

        def exec_module(module: ModuleType) -> None:
            real_exec(module)
            for callback in callbacks:
                callback(module)

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


_HOOK = _PostImportHook()
_HOOK_LOCK = threading.Lock()


def when_imported(module_name: str, callback: Callable[[ModuleType], None]) -> None:
    """Call ``callback(module)`` now if ``module_name`` is imported, else right after import."""
    with _HOOK_LOCK:
        module = sys.modules.get(module_name)
        if module is None:
            _HOOK.callbacks.setdefault(module_name, []).append(callback)
            if _HOOK not in sys.meta_path:
                sys.meta_path.insert(0, _HOOK)
            return
    callback(module)


def install(patches: tuple[Patch, ...]) -> list[str]:
    """Arrange for each patch to be applied when its module is imported; returns the names."""
    for patch in patches:
        when_imported(patch.module, lambda module, p=patch: _apply_now(p, module))
    return [p.name for p in patches]


@dataclass(frozen=True)
class ScopedSubstitution:
    """A vLLM module global swapped only while one of OUR constructors runs, then restored.

    Not a patch of vLLM's behaviour for anyone else: outside the ``with`` block
    the original object is back (also on error). Listed here because it still
    depends on a vLLM internal name.
    """

    name: str
    module: str
    symbol: str
    scope: str
    why: str
    upstream: str
    remove_when: str


MEGA_MOE_FORMAT_SUBSTITUTION = ScopedSubstitution(
    name="nvfp4_mega_moe_format",
    module="vllm.models.deepseek_v4.nvidia.model",
    symbol="DeepGemmMegaMoEExperts",
    scope=("dsv4_nvfp4.vllm_plugin.deepseek_v4 DeepseekV4ForCausalLM/DeepSeekV4MTP __init__, "
           "only with --moe-backend deep_gemm_mega_moe"),
    why=(
        "DeepseekV4MoE._init_mega_moe_experts passes weight_format=MEGA_MOE_MXFP4 to "
        "vLLM's DeepGemmMegaMoEExperts for every layer; NVFP4 layers need "
        "MEGA_MOE_NVFP4 (else KeyError experts.w13_input_scale at load). The stand-in "
        "calls vLLM's own class with that one argument changed"
    ),
    upstream="not filed from here; vLLM 0.34.0 vllm/models/deepseek_v4/nvidia/model.py",
    remove_when=(
        "vLLM's DeepSeek V4 picks the MegaMoE weight format from the checkpoint's "
        "quantization config (as MiniMax M3 does)"
    ),
)


def all_patches() -> tuple[Patch, ...]:
    """Every patch the plugin knows, in application order."""
    return (CPU_TILE_SCHEDULER_PATCH, MEGAMOE_STAGING_PATCH)

"""What :func:`dsv4_nvfp4.vllm_plugin.register` registers, in one place."""

from __future__ import annotations

from dsv4_nvfp4.vllm_plugin.patch_register import all_patches, install


def register_all() -> list[str]:
    """Install the runtime patches (applied when their module is imported).

    Returns one label per registered item, e.g. ``patch:cpu_tile_scheduler_keys``.
    """
    names = [f"patch:{name}" for name in install(all_patches())]
    return names

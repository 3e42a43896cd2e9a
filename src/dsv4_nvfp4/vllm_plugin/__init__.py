"""vLLM general plugin of dsv4-nvfp4 (entry point ``vllm.general_plugins: dsv4_nvfp4``).

vLLM calls :func:`register` in every process it starts (API server, engine
core, each worker), possibly more than once. So this module imports nothing
from vLLM at import time, and :func:`register` is idempotent: the first call
does the work and logs one line; later calls return at once.
"""

from __future__ import annotations

import logging
import threading

# A child of vLLM's "vllm" logger, so the line shows in vLLM's own log format.
logger = logging.getLogger("vllm.dsv4_nvfp4")

_LOCK = threading.Lock()
_REGISTERED: list[str] | None = None


def register() -> list[str]:
    """Register the plugin's pieces with vLLM; safe to call any number of times.

    Returns the names of what was registered (the same list on every call), so
    tests and the log can say exactly what this process got.
    """
    global _REGISTERED
    with _LOCK:
        if _REGISTERED is not None:
            return list(_REGISTERED)
        from dsv4_nvfp4.vllm_plugin.registration import register_all

        _REGISTERED = register_all()
    logger.info("dsv4_nvfp4 plugin registered: %s", ", ".join(_REGISTERED))
    return list(_REGISTERED)

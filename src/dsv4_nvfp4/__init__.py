"""dsv4-nvfp4: serve DeepSeek V4 Pro with NVFP4 routed experts through vLLM.

Importing the package needs torch only for the numeric modules; it never
imports vLLM (only :mod:`dsv4_nvfp4.vllm_plugin` does, lazily, inside the
functions vLLM calls).
"""

__version__ = "0.1.0"

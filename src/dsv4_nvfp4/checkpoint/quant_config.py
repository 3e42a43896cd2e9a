"""The ``quantization_config`` / ``hf_quant_config.json`` each layout carries.

* A: DeepSeek's ``quant_method: fp8`` block config (``scale_fmt: ue8m0`` also
  makes vLLM enable DeepGEMM's UE8M0 path).
* B: A's config plus what ModelOpt's DS-V4 recipe adds
  (ModelOpt's ``examples/deepseek/deepseek_v4/quantize_to_nvfp4.py``; the published
  nvidia/DeepSeek-V4-Pro-NVFP4 ``config.json``):
  ``moe_quant_algo: NVFP4`` — the key vLLM's ``DeepseekV4FP8Config``
  switches the experts to ``ModelOptNvFp4FusedMoE`` on — plus ``quant_algo``,
  ``group_size``, ``ignore``/``exclude_modules`` and ``quantized_layers``.
* C: ModelOpt's generic ``quant_method: modelopt`` export (``hf_quant_config.json``
  beside a transformers-dialect ``config.json``).
"""

from __future__ import annotations

import copy

from dsv4_nvfp4 import __version__
from dsv4_nvfp4.formats.constants import NVFP4_GROUP
from dsv4_nvfp4.versions import pin

from .layouts import B_EXCLUDE_MODULES

PRODUCER = {"name": "dsv4-nvfp4", "version": __version__}


def a_quantization_config() -> dict:
    return {"quant_method": "fp8", "fmt": "e4m3", "scale_fmt": "ue8m0",
            "weight_block_size": [128, 128], "activation_scheme": "dynamic"}


def _nvfp4_groups() -> dict:
    fp4 = {"dynamic": False, "num_bits": 4, "type": "float", "group_size": NVFP4_GROUP}
    return {"group_0": {"input_activations": dict(fp4), "weights": dict(fp4),
                        "targets": ["Linear"]}}


def b_quantization_config(base: dict | None, quantized: list[str],
                          ignored_layers: list[str] | None = None,
                          producer: dict | None = None) -> dict:
    """Layout B's ``quantization_config``: ``base`` (A's) plus the NVFP4-experts keys."""
    qc = copy.deepcopy(base) if base else a_quantization_config()
    qc.update({
        "quant_method": "fp8",
        "moe_quant_algo": "NVFP4",
        "quant_algo": "MIXED_PRECISION",
        "group_size": NVFP4_GROUP,
        "producer": dict(producer or PRODUCER),
        "config_groups": _nvfp4_groups(),
        "ignore": list(B_EXCLUDE_MODULES),
        "exclude_modules": list(B_EXCLUDE_MODULES),
        "quantized_layers": {n: {"quant_algo": "NVFP4", "group_size": NVFP4_GROUP}
                             for n in quantized},
    })
    qc.setdefault("activation_scheme", "dynamic")
    qc.setdefault("weight_block_size", [128, 128])
    if ignored_layers:
        qc["ignored_layers"] = sorted(ignored_layers)
    else:
        qc.pop("ignored_layers", None)
    return qc


def b_hf_quant_config(quantized: list[str], producer: dict | None = None) -> dict:
    return {"producer": dict(producer or PRODUCER),
            "quantization": {"quant_algo": "MIXED_PRECISION", "kv_cache_quant_algo": None,
                             "group_size": NVFP4_GROUP,
                             "exclude_modules": list(B_EXCLUDE_MODULES),
                             "quantized_layers": {n: {"quant_algo": "NVFP4",
                                                      "group_size": NVFP4_GROUP}
                                                  for n in quantized}}}


def modelopt_producer() -> dict:
    return {"name": "modelopt", "version": pin("MODELOPT_VERSION")}


def c_quantization_config(exclude: list[str]) -> dict:
    return {"config_groups": _nvfp4_groups(), "ignore": list(exclude), "quant_algo": "NVFP4",
            "producer": modelopt_producer(), "quant_method": "modelopt"}


def c_hf_quant_config(exclude: list[str]) -> dict:
    return {"producer": modelopt_producer(),
            "quantization": {"quant_algo": "NVFP4", "kv_cache_quant_algo": None,
                             "group_size": NVFP4_GROUP, "exclude_modules": list(exclude)}}

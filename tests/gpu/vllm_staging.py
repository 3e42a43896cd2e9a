"""vLLM's NVFP4 MegaMoE activation staging kernel, loaded from the pinned wheel's own file.

``_prepare_megamoe_nvfp4_inputs_kernel`` and its host wrapper
``prepare_megamoe_nvfp4_inputs`` live in
``vllm/model_executor/layers/fused_moe/prepare_megamoe.py`` of the ``vllm`` wheel
pinned in ``versions.env``. Nothing of it is committed here:
``scripts/fetch_vllm_source.py`` downloads the public wheel and extracts that one
file into the git-ignored ``.cache/vllm-<version>/``; this module executes it
with its five vLLM imports replaced by the stand-ins below (the GPU machine has
no vLLM, and the file needs none of vLLM at run time on the path we call):

* ``vllm.triton_utils``: ``tl``, ``triton`` — the installed Triton;
* ``...quantization.utils.quant_utils``: ``FP8_DTYPE`` (``torch.float8_e4m3fn``, what
  vLLM's CUDA platform returns), and ``QuantKey`` / ``kMxfp8Dynamic``, which only the
  FP8 staging path reads (annotations and a default argument here);
* ``vllm.distributed.eplb.eplb_state.EplbLayerState``: an annotation;
* ``...fused_moe.eplb_triton.eplb_map_and_record``: a Triton function that fails
  compilation if it is ever reached — it is called only under
  ``if logical_to_physical is not None``, a branch Triton drops at compile time
  when no EPLB state is given (always, here);
* ``vllm.v1.worker.ubatching.dbo_current_ubatch_id``: read only with an EPLB state.

The stand-ins live in ``sys.modules`` only while the file executes; the loaded
module keeps references to them.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from functools import cache
from pathlib import Path

import torch
import triton
import triton.language as tl

from dsv4_nvfp4.versions import pin

REPO = Path(__file__).resolve().parents[2]
VLLM_VERSION = pin("VLLM_VERSION")
SOURCE = (REPO / ".cache" / f"vllm-{VLLM_VERSION}" / "vllm" / "model_executor" / "layers"
          / "fused_moe" / "prepare_megamoe.py")
MODULE_NAME = f"_vllm_{VLLM_VERSION.replace('.', '_')}_prepare_megamoe"


class VllmSourceMissing(FileNotFoundError):
    """The wheel's file has not been fetched (run ``scripts/fetch_vllm_source.py``)."""


@triton.jit
def _eplb_map_and_record_unavailable(logical_ids, token_idx, mask, logical_to_physical,
                                     replica_count, num_logical, map_stride, expert_load,
                                     num_physical, record_enabled, num_unpadded_tokens):
    tl.static_assert(False, "EPLB replica mapping is not available outside vLLM")
    return logical_ids


class _QuantKeyStandIn:
    """Stand-in for vLLM's ``QuantKey``: the NVFP4 path never reads one."""


class _EplbLayerStateStandIn:
    """Stand-in for vLLM's ``EplbLayerState``: we never pass one."""


def _dbo_current_ubatch_id() -> int:
    return 0


def _stand_ins() -> dict[str, types.ModuleType]:
    def module(name: str, **attrs: object) -> types.ModuleType:
        m = types.ModuleType(name)
        m.__dict__.update(attrs)
        return m

    leaves = {
        "vllm.triton_utils": module("vllm.triton_utils", tl=tl, triton=triton),
        "vllm.model_executor.layers.quantization.utils.quant_utils": module(
            "vllm.model_executor.layers.quantization.utils.quant_utils",
            FP8_DTYPE=torch.float8_e4m3fn, QuantKey=_QuantKeyStandIn,
            kMxfp8Dynamic=_QuantKeyStandIn()),
        "vllm.distributed.eplb.eplb_state": module(
            "vllm.distributed.eplb.eplb_state", EplbLayerState=_EplbLayerStateStandIn),
        "vllm.model_executor.layers.fused_moe.eplb_triton": module(
            "vllm.model_executor.layers.fused_moe.eplb_triton",
            eplb_map_and_record=_eplb_map_and_record_unavailable),
        "vllm.v1.worker.ubatching": module(
            "vllm.v1.worker.ubatching", dbo_current_ubatch_id=_dbo_current_ubatch_id),
    }
    out = dict(leaves)
    for name in leaves:  # the parent packages, so `from a.b.c import x` resolves
        parts = name.split(".")
        for i in range(1, len(parts)):
            parent = ".".join(parts[:i])
            out.setdefault(parent, module(parent, __path__=[]))
    return out


@cache
def load() -> types.ModuleType:
    """Execute the fetched ``prepare_megamoe.py`` with the stand-ins; returns the module."""
    if not SOURCE.is_file():
        raise VllmSourceMissing(f"{SOURCE.relative_to(REPO)} missing: run "
                                "`python scripts/fetch_vllm_source.py` (and copy .cache/ here)")
    stand_ins = _stand_ins()
    saved = {name: sys.modules.get(name) for name in stand_ins}
    spec = importlib.util.spec_from_file_location(MODULE_NAME, SOURCE)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules.update(stand_ins)
    try:
        sys.modules[MODULE_NAME] = mod
        spec.loader.exec_module(mod)
    finally:
        for name, old in saved.items():
            if old is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = old
    return mod


def stage(hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
          x: torch.Tensor, x_sf: torch.Tensor, x_scales: torch.Tensor,
          topk_idx_out: torch.Tensor, topk_weights_out: torch.Tensor) -> None:
    """One call of vLLM's ``prepare_megamoe_nvfp4_inputs`` (no EPLB, no padding mask, no fused
    shared expert, no ``l2_alpha``): the kernel launch that vLLM makes for each MoE layer.

    ``x`` uint8 ``[T, H/2]``, ``x_sf`` int32 ``[T, H/64]``, ``x_scales`` fp32 ``[T]``,
    ``topk_idx_out`` int64 and ``topk_weights_out`` fp32 ``[T, top_k]``.
    """
    load().prepare_megamoe_nvfp4_inputs(hidden, topk_weights, topk_ids, x, x_sf, x_scales,
                                        topk_idx_out, topk_weights_out)


def run(hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor
        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """vLLM's staging into fresh buffers pre-filled with a pattern (so unwritten bytes show):
    ``(x, x_sf, x_scales, topk_idx, topk_weights)``."""
    t, h = hidden.shape
    k = topk_ids.shape[1]
    dev = hidden.device
    x = torch.full((t, h // 2), 0xAB, dtype=torch.uint8, device=dev)
    x_sf = torch.full((t, h // 64), 0x5A5A5A5A, dtype=torch.int32, device=dev)
    x_scales = torch.full((t,), float("nan"), dtype=torch.float32, device=dev)
    idx = torch.full((t, k), -7, dtype=torch.int64, device=dev)
    w = torch.full((t, k), float("nan"), dtype=torch.float32, device=dev)
    stage(hidden, topk_ids, topk_weights, x, x_sf, x_scales, idx, w)
    return x, x_sf, x_scales, idx, w

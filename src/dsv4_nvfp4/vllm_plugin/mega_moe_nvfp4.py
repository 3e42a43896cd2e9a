"""Everything the NVFP4 DeepGEMM mega-MoE needs up to the kernel call, in plain torch.

No vLLM import: the vLLM-facing experts module
(:mod:`dsv4_nvfp4.vllm_plugin.nvfp4_mega_experts`) calls these, and the CPU
tests check them. The one function that needs a B200 is
:func:`run_fp4_fp4_mega_moe`.

Contract (upstream DeepGEMM 2.8.0 @ 0274ad7b, ``deep_gemm/mega/__init__.py``
``fp4_fp4_mega_moe`` and ``csrc/apis/mega_moe.hpp``):

* weights: int8 packed E2M1 ``[E, N, K/2]`` + int32 SF ``[E, N, K/64]`` (four
  UE4M3 per word, MN-major), L1 gate/up interleaved, SFs UTCCP-transposed —
  produced by :func:`dsv4_nvfp4.formats.transform_nvfp4_for_mega_moe`;
* symmetric buffer (``mma_type='fp4xfp4'``): ``x`` uint8 ``[T, H/2]``,
  ``x_sf`` int32 ``[T, H/64]`` K-major, ``topk_idx`` int64, ``topk_weights`` fp32;
* activations carry only the per-16 block scales: the FC1 input global scale
  (``input_scale``) is folded into ``l1_alphas`` — never into the E4M3 block
  scales (folding ~1e-4 globals into E4M3 sinks them below 2^-9 → zeros);
* ``l1_alphas`` fp32 ``[E_local, 2]`` = (gate, up) ``weight_scale_2`` × a1;
  ``l2_alphas`` fp32 ``[E_local]`` = w2 ``weight_scale_2``; ``a2_scales`` fp32
  ``[E_local]`` = w2 ``input_scale`` (the kernel requantizes the FC2 input per
  expert and applies ``l2_alpha · a2_scale``).

a1 is ONE value for the whole layer: a token is quantized once, before
dispatch, and the same bytes reach every expert it is routed to (on any rank).
So a1 = max of ``w13_input_scale`` over all logical experts — the same
reduction vLLM's own NVFP4 MoE applies (``amax_for_moe_activation_quant``).
Using each expert's own input_scale in its alpha would mis-scale every expert
whose calibrated scale is not the maximum.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from dsv4_nvfp4.formats import (
    FormatError,
    pack_sf_bytes_to_int32,
    quantize_nvfp4_activation_static,
)

logger = logging.getLogger("vllm.dsv4_nvfp4.mega_moe")

RECIPE = (1, 1, 16)  # (gran_m of SFA, gran_n of SFB, gran_k): NVFP4 block 16
MMA_TYPE = "fp4xfp4"


def _positive_finite(name: str, t: torch.Tensor) -> torch.Tensor:
    t = t.to(torch.float32)
    bad = ~(torch.isfinite(t) & (t > 0))
    if bool(bad.any()):
        idx = tuple(int(i) for i in bad.nonzero()[0])
        raise FormatError(f"{name}: expected finite values > 0, found {t[idx].item()} at {idx}")
    return t


def input_global_scale(w13_input_scale: torch.Tensor) -> torch.Tensor:
    """a1: the one FC1 input scale of a layer = max over all logical experts (and w1/w3)."""
    return _positive_finite("w13_input_scale", w13_input_scale).amax().reshape(())


@dataclass(frozen=True)
class MegaMoEAlphas:
    """Per-expert scalars ``fp4_fp4_mega_moe`` applies in its epilogues (fp32, contiguous)."""

    l1_alphas: torch.Tensor  # [E_local, 2]  (gate, up)
    l2_alphas: torch.Tensor  # [E_local]
    a2_scales: torch.Tensor  # [E_local]
    a1: torch.Tensor  # 0-d: the staging kernel's input_scale


def mega_moe_alphas(
    w13_weight_scale_2: torch.Tensor,
    w13_input_scale_all: torch.Tensor,
    w2_weight_scale_2: torch.Tensor,
    w2_input_scale: torch.Tensor,
) -> MegaMoEAlphas:
    """Build the kernel's alphas from ModelOpt's per-expert scalars.

    Args:
        w13_weight_scale_2: fp32 ``[E_local, 2]``, (w1, w3) ``weight_scale_2``.
        w13_input_scale_all: fp32 ``[E_logical, 2]``, (w1, w3) ``input_scale`` of
            every logical expert (not only local ones; see the module docstring).
        w2_weight_scale_2: fp32 ``[E_local]``.
        w2_input_scale: fp32 ``[E_local]``.
    """
    e = w13_weight_scale_2.shape[0]
    for name, t, shape in (("w13_weight_scale_2", w13_weight_scale_2, (e, 2)),
                           ("w2_weight_scale_2", w2_weight_scale_2, (e,)),
                           ("w2_input_scale", w2_input_scale, (e,))):
        if tuple(t.shape) != shape:
            raise FormatError(f"{name}: expected shape {shape}, found {tuple(t.shape)}")
    a1 = input_global_scale(w13_input_scale_all)
    l1 = (_positive_finite("w13_weight_scale_2", w13_weight_scale_2) * a1).contiguous()
    l2 = _positive_finite("w2_weight_scale_2", w2_weight_scale_2).clone().contiguous()
    a2 = _positive_finite("w2_input_scale", w2_input_scale).clone().contiguous()
    return MegaMoEAlphas(l1_alphas=l1, l2_alphas=l2, a2_scales=a2, a1=a1)


def _stage_activations_reference(x: torch.Tensor, a1: torch.Tensor, out_x: torch.Tensor,
                                 out_x_sf: torch.Tensor) -> None:
    packed, sf = quantize_nvfp4_activation_static(x, a1)
    out_x.copy_(packed)
    out_x_sf.copy_(pack_sf_bytes_to_int32(sf))


def stage_activations(x: torch.Tensor, a1: torch.Tensor, out_x: torch.Tensor,
                      out_x_sf: torch.Tensor) -> None:
    """BF16 ``x [T, H]`` → ``out_x`` uint8 ``[T, H/2]`` (E2M1) and ``out_x_sf`` int32 ``[T, H/64]``.

    On a GPU: the Triton kernel ``dsv4_nvfp4.kernels.stage_nvfp4_activations_static``
    (bit-exact with the formats reference, one pass, CUDA-graph capturable). On CPU
    (tests): the torch reference from :mod:`dsv4_nvfp4.formats` — same bytes. A GPU
    without the kernel is an error, never a silent fallback to a slow,
    uncapturable path.
    """
    if x.device.type != "cpu":
        try:
            from dsv4_nvfp4.kernels import stage_nvfp4_activations_static
        except ImportError as err:
            raise RuntimeError(
                f"dsv4_nvfp4: the Triton NVFP4 staging kernel cannot be imported on "
                f"{x.device} ({err}); the DeepGEMM NVFP4 mega-MoE needs it"
            ) from err
        stage_nvfp4_activations_static(x, a1, out_x, out_x_sf)
        return
    _stage_activations_reference(x, a1, out_x, out_x_sf)


def stage_routing(topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                  out_idx: torch.Tensor, out_weights: torch.Tensor,
                  is_padding: torch.Tensor | None = None) -> None:
    """Copy routing into the buffer: int64 expert ids (-1 = not routed), fp32 weights.

    Padded tokens (``is_padding``) are not routed: id -1, weight 0.
    """
    if topk_ids.shape != topk_weights.shape:
        raise FormatError(f"topk_weights: expected shape {tuple(topk_ids.shape)}, "
                          f"found {tuple(topk_weights.shape)}")
    ids = topk_ids.to(torch.int64)
    w = topk_weights.to(torch.float32)
    if is_padding is not None:
        pad = is_padding.reshape(-1, 1).to(torch.bool)
        ids = torch.where(pad, torch.full_like(ids, -1), ids)
        w = torch.where(pad, torch.zeros_like(w), w)
    out_idx.copy_(ids)
    out_weights.copy_(w)


@dataclass(frozen=True)
class MegaMoECall:
    """The complete argument set of one ``deep_gemm.fp4_fp4_mega_moe`` call."""

    y: torch.Tensor
    l1_weights: tuple[torch.Tensor, torch.Tensor]
    l2_weights: tuple[torch.Tensor, torch.Tensor]
    sym_buffer: Any
    alphas: MegaMoEAlphas
    activation_clamp: float | None
    fast_math: bool = True
    # vLLM's V4 router (fused_topk_bias) already multiplied the top-k weights by
    # routed_scaling_factor, as for its MXFP4 mega path: the kernel must not
    # apply it a second time.
    routed_scaling_factor: float = 1.0

    def kwargs(self) -> dict[str, Any]:
        return {
            "recipe": RECIPE,
            "activation": "swiglu",
            "activation_clamp": self.activation_clamp,
            "fast_math": self.fast_math,
            "l1_alphas": self.alphas.l1_alphas,
            "l2_alphas": self.alphas.l2_alphas,
            "a2_scales": self.alphas.a2_scales,
            "routed_scaling_factor": self.routed_scaling_factor,
        }


def run_fp4_fp4_mega_moe(deep_gemm: Any, call: MegaMoECall) -> None:
    """THE B200-only step: hand the prepared call to DeepGEMM (writes ``call.y``).

    Everything before it (weights, scales, alphas, buffer contents) is built and
    tested on CPU; this line is exercised only by the README's B200 runbook.
    """
    deep_gemm.fp4_fp4_mega_moe(call.y, call.l1_weights, call.l2_weights, call.sym_buffer,
                               **call.kwargs())

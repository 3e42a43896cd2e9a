"""NVFP4 routed experts on DeepGEMM's ``fp4_fp4_mega_moe``, through vLLM 0.32.0's own seams.

vLLM seams used (nothing copied, nothing overwritten):

* ``DeepGemmMegaMoEBackend`` (``vllm/model_executor/layers/fused_moe/
  deep_gemm_mega_moe.py``) — the abstract backend whose docstring invites
  plugins; :class:`NvFp4MegaMoEBackend` is its ``fp4xfp4`` implementation.
* ``get_deep_gemm_mega_moe_backend`` (same file) — vLLM's capability checks
  (SM100, shapes); :func:`get_nvfp4_mega_moe_backend` calls it first, then adds
  the NVFP4 requirements.
* ``DeepseekV4MegaMoEExperts`` (``vllm/models/deepseek_v4/nvidia/model.py``) —
  built for MXFP4 (uint8 UE8M0 per-32 scales); :class:`NvFp4MegaMoEExperts`
  subclasses it with the four NVFP4 tensors per weight (packed E2M1, E4M3
  per-16 block scale, fp32 ``weight_scale_2``, fp32 ``input_scale``). Its
  loader, local-expert mapping, symmetric-buffer cache and registration in the
  forward context are vLLM's.

The classes subclass vLLM classes, so they are built on first use
(:func:`classes`), never at import. Numbers come from :mod:`dsv4_nvfp4.formats`
and :mod:`.mega_moe_nvfp4`.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import torch

from dsv4_nvfp4.formats import NVFP4_GROUP, FormatError, transform_nvfp4_for_mega_moe
from dsv4_nvfp4.vllm_plugin.mega_moe_nvfp4 import (
    MMA_TYPE,
    MegaMoEAlphas,
    MegaMoECall,
    mega_moe_alphas,
    run_fp4_fp4_mega_moe,
    stage_activations,
    stage_routing,
)
from dsv4_nvfp4.vllm_plugin.moe_selection import NVFP4_MEGA_MOE_ALIGN


def deep_gemm_module() -> Any | None:
    """vLLM's DeepGEMM import (site-packages first, then its vendored copy), or None."""
    from vllm.utils.deep_gemm import _import_deep_gemm

    try:
        return _import_deep_gemm()
    except ImportError:
        return None


def has_fp4_fp4_mega_moe() -> bool:
    """True when the DeepGEMM vLLM would use exports ``fp4_fp4_mega_moe``."""
    dg = deep_gemm_module()
    return dg is not None and hasattr(dg, "fp4_fp4_mega_moe")


def _scalar(name: str, t: torch.Tensor) -> torch.Tensor:
    if t.numel() != 1:
        raise FormatError(f"{name}: expected a scalar, found shape {tuple(t.shape)}")
    return t.reshape(()).to(torch.float32)


@cache
def classes() -> tuple[type, type]:
    """Build ``(NvFp4MegaMoEBackend, NvFp4MegaMoEExperts)`` against the installed vLLM."""
    import torch.nn as nn
    from vllm.model_executor.layers.fused_moe.deep_gemm_mega_moe import DeepGemmMegaMoEBackend
    from vllm.model_executor.layers.quantization.utils.quant_utils import kNvfp4Static
    from vllm.model_executor.utils import set_weight_attrs
    from vllm.models.deepseek_v4.nvidia.model import DeepseekV4MegaMoEExperts

    class NvFp4MegaMoEBackend(DeepGemmMegaMoEBackend):
        """``fp4xfp4`` MegaMoE: NVFP4 weights and activations, per-expert alphas."""

        mma_type = MMA_TYPE
        hidden_quant = kNvfp4Static

        def transform_weights(self, *, w13_weight, w13_weight_scale, w2_weight,
                              w2_weight_scale, num_local_experts, hidden_size,
                              intermediate_size, activation=None):  # type: ignore[no-untyped-def]
            if activation not in (None, "swiglu"):
                raise ValueError(f"NVFP4 mega-MoE supports swiglu only, got {activation!r}")
            return transform_nvfp4_for_mega_moe(w13_weight, w13_weight_scale, w2_weight,
                                                w2_weight_scale)

        def supports_shared_experts(self, deep_gemm) -> bool:  # type: ignore[no-untyped-def]
            # fp4_fp4_mega_moe fuses BF16 shared experts only; layout B keeps
            # them FP8, so they run as vLLM's separate shared MLP.
            return False

        def run_mega_moe(self, *, y, l1_weights, l2_weights, symm_buffer, activation_clamp,
                         fast_math, activation=None, activation_alpha=None,
                         activation_beta=None, shared_l1_weights=None, shared_l2_weights=None,
                         alphas: MegaMoEAlphas | None = None):  # type: ignore[no-untyped-def]
            if alphas is None:
                raise ValueError("NVFP4 mega-MoE needs the per-expert alphas")
            if shared_l1_weights is not None or shared_l2_weights is not None:
                raise ValueError("NVFP4 mega-MoE: shared-expert fusion is not supported")
            call = MegaMoECall(y=y, l1_weights=l1_weights, l2_weights=l2_weights,
                               sym_buffer=symm_buffer, alphas=alphas,
                               activation_clamp=activation_clamp, fast_math=fast_math)
            run_fp4_fp4_mega_moe(deep_gemm_module(), call)

    class NvFp4MegaMoEExperts(DeepseekV4MegaMoEExperts):
        """DeepSeek V4 MegaMoE experts holding ModelOpt NVFP4 tensors (layout B)."""

        def __init__(self, vllm_config, **kwargs):  # type: ignore[no-untyped-def]
            if vllm_config.parallel_config.enable_eplb:
                raise NotImplementedError(
                    "dsv4_nvfp4: EPLB is not supported with the NVFP4 DeepGEMM experts "
                    "(per-expert alphas are not rebalanced); drop --enable-eplb or set "
                    "DSV4_NVFP4_MOE_BACKEND=vllm")
            kwargs["num_shared_experts"] = 0  # never fused (see supports_shared_experts)
            super().__init__(vllm_config, **kwargs)
            e, h, i = self.num_local_experts, self.hidden_size, self.intermediate_size
            for size, what in ((h, "hidden_size"), (i, "moe_intermediate_size")):
                if size % NVFP4_GROUP:
                    raise ValueError(f"{what}={size}: NVFP4 needs a multiple of {NVFP4_GROUP}")
            attrs = {"weight_loader": self.weight_loader}

            def param(name: str, t: torch.Tensor) -> None:
                p = nn.Parameter(t, requires_grad=False)
                set_weight_attrs(p, attrs)
                setattr(self, name, p)  # replaces vLLM's MXFP4 parameter of that name

            e4m3 = torch.float8_e4m3fn
            param("w13_weight_scale", torch.zeros(e, 2 * i, h // NVFP4_GROUP, dtype=e4m3))
            param("w2_weight_scale", torch.zeros(e, h, i // NVFP4_GROUP, dtype=e4m3))
            # Zeros: a scale the checkpoint failed to provide stops finalize
            # with a clear error instead of producing a silent zero alpha.
            param("w13_weight_scale_2", torch.zeros(e, 2, dtype=torch.float32))
            param("w2_weight_scale_2", torch.zeros(e, dtype=torch.float32))
            # Every logical expert's FC1 input scale (not only local ones): the
            # staging scale is their max (mega_moe_nvfp4 module docstring).
            param("w13_input_scale",
                  torch.zeros(self.num_logical_experts, 2, dtype=torch.float32))
            param("w2_input_scale", torch.zeros(e, dtype=torch.float32))
            self._alphas: MegaMoEAlphas | None = None

        def weight_loader(self, param, loaded_weight, weight_name, shard_id, expert_id,
                          return_success=False):  # type: ignore[no-untyped-def]
            col = {"w1": 0, "w3": 1}.get(shard_id)
            if weight_name.endswith("w13_input_scale"):
                param.data[expert_id, col] = _scalar(weight_name, loaded_weight)
                return True if return_success else None
            if weight_name.endswith(("w13_weight_scale_2", "w2_weight_scale_2",
                                     "w2_input_scale")):
                local = self._map_global_expert_id(expert_id)
                for slot in local:
                    value = _scalar(weight_name, loaded_weight)
                    if col is None:
                        param.data[slot] = value
                    else:
                        param.data[slot, col] = value
                return bool(local) if return_success else None
            return super().weight_loader(param, loaded_weight, weight_name, shard_id,
                                         expert_id, return_success=return_success)

        weight_loader.supports_moe_loading = True  # type: ignore[attr-defined]

        def _ensure_backend(self):  # type: ignore[no-untyped-def]
            if self._backend is None:
                self._backend = get_nvfp4_mega_moe_backend(
                    self.w13_weight.device, self.hidden_size, self.intermediate_size)
            return self._backend

        def finalize_weights(self, shared_experts=None) -> None:  # type: ignore[no-untyped-def]
            if self._transformed_l1_weights is not None:
                return
            backend = self._ensure_backend()
            self._alphas = mega_moe_alphas(self.w13_weight_scale_2.data,
                                           self.w13_input_scale.data,
                                           self.w2_weight_scale_2.data,
                                           self.w2_input_scale.data)
            self._transformed_l1_weights, self._transformed_l2_weights = (
                backend.transform_weights(
                    w13_weight=self.w13_weight.data, w13_weight_scale=self.w13_weight_scale.data,
                    w2_weight=self.w2_weight.data, w2_weight_scale=self.w2_weight_scale.data,
                    num_local_experts=self.num_local_experts, hidden_size=self.hidden_size,
                    intermediate_size=self.intermediate_size))
            # The kernel reads only the transformed tensors and the alphas.
            for name in ("w13_weight", "w13_weight_scale", "w2_weight", "w2_weight_scale",
                         "w13_weight_scale_2", "w2_weight_scale_2", "w13_input_scale",
                         "w2_input_scale"):
                setattr(self, name, None)

        def get_expert_weights(self):  # type: ignore[no-untyped-def]
            raise NotImplementedError("dsv4_nvfp4: EPLB is not supported with NVFP4 experts")

        def prepare_call(self, hidden_states, topk_weights, topk_ids, *, activation_clamp,
                         fast_math=True, symm_buffer=None, is_padding=None):  # type: ignore[no-untyped-def]
            """Stage one step into the symmetric buffer; returns the kernel call (no GPU needed)."""
            if self._alphas is None or self._transformed_l1_weights is None:
                raise RuntimeError("NVFP4 mega-MoE: finalize_weights() has not run")
            t = hidden_states.shape[0]
            if t > self.max_num_tokens:
                raise ValueError(f"DeepSeek V4 MegaMoE got {t} tokens, but the symmetric "
                                 f"buffer was sized for {self.max_num_tokens}.")
            buf = self.get_symm_buffer() if symm_buffer is None else symm_buffer
            stage_activations(hidden_states, self._alphas.a1, buf.x[:t], buf.x_sf[:t])
            stage_routing(topk_ids, topk_weights, buf.topk_idx[:t], buf.topk_weights[:t],
                          is_padding)
            y = torch.empty_like(hidden_states, dtype=torch.bfloat16)
            return MegaMoECall(y=y, l1_weights=self._transformed_l1_weights,
                               l2_weights=self._transformed_l2_weights, sym_buffer=buf,
                               alphas=self._alphas, activation_clamp=activation_clamp,
                               fast_math=fast_math)

        def forward(self, hidden_states, topk_weights, topk_ids, *, activation_clamp,
                    fast_math=True):  # type: ignore[no-untyped-def]
            import vllm.envs as envs
            from vllm.forward_context import get_forward_context, is_forward_context_available

            is_padding = None
            if envs.VLLM_MOE_SKIP_PADDING and is_forward_context_available():
                is_padding = get_forward_context().is_padding
                if is_padding is not None:
                    is_padding = is_padding[: hidden_states.shape[0]]
            if self.capture_fn is not None:
                self.capture_fn(topk_ids)
            backend = self._ensure_backend()
            call = self.prepare_call(hidden_states, topk_weights, topk_ids,
                                     activation_clamp=activation_clamp, fast_math=fast_math,
                                     is_padding=is_padding)
            backend.run_mega_moe(y=call.y, l1_weights=call.l1_weights,
                                 l2_weights=call.l2_weights, symm_buffer=call.sym_buffer,
                                 activation_clamp=activation_clamp, fast_math=fast_math,
                                 alphas=call.alphas)
            return call.y

    for cls in (NvFp4MegaMoEBackend, NvFp4MegaMoEExperts):  # importable by reference
        cls.__module__ = __name__
        cls.__qualname__ = cls.__name__
    return NvFp4MegaMoEBackend, NvFp4MegaMoEExperts


def get_nvfp4_mega_moe_backend(device: torch.device, hidden_size: int,
                               intermediate_size: int) -> Any:
    """vLLM's MegaMoE capability checks, then the NVFP4 ones; returns our backend or raises."""
    from vllm.model_executor.layers.fused_moe.deep_gemm_mega_moe import (
        get_deep_gemm_mega_moe_backend,
    )

    get_deep_gemm_mega_moe_backend(device, hidden_size, intermediate_size)
    for size, what in ((hidden_size, "hidden_size"), (intermediate_size, "intermediate_size")):
        if size % NVFP4_MEGA_MOE_ALIGN:
            raise ValueError(f"DeepGEMM NVFP4 mega-MoE needs {what} % "
                             f"{NVFP4_MEGA_MOE_ALIGN} == 0, got {size}")
    if not has_fp4_fp4_mega_moe():
        raise NotImplementedError("deep_gemm.fp4_fp4_mega_moe is not available "
                                  "(needs upstream DeepGEMM >= 2.8)")
    return classes()[0]()


def __getattr__(name: str) -> type:
    # Pickle/import by reference: NvFp4MegaMoEBackend / NvFp4MegaMoEExperts.
    names = ("NvFp4MegaMoEBackend", "NvFp4MegaMoEExperts")
    if name in names:
        return classes()[names.index(name)]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

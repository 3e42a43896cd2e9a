"""Which engine runs the NVFP4 routed experts: DeepGEMM mega-MoE or vLLM's own NVFP4 MoE.

Pure logic on plain facts (no vLLM import), so every branch is tested on CPU;
:mod:`dsv4_nvfp4.vllm_plugin.deepseek_v4` gathers the facts from vLLM.

Rules (``DSV4_NVFP4_MOE_BACKEND``, see :mod:`.envs`):

* The checkpoint's routed experts are not NVFP4 → vLLM (nothing for us to do).
* ``vllm`` → vLLM's NVFP4 MoE. If the user also asked vLLM for
  ``--moe-backend deep_gemm_mega_moe`` that is an error: vLLM 0.32.0's own
  mega-MoE experts are MXFP4-only (they fail with the ``w13_input_scale``
  KeyError of vllm#43454 on NVFP4 tensors).
* ``deepgemm``, or ``--moe-backend deep_gemm_mega_moe`` → DeepGEMM, or an error
  that names every missing requirement.
* ``auto`` → DeepGEMM when every requirement holds and ``--moe-backend`` is
  ``auto``; otherwise vLLM, with the first unmet requirement as the reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from dsv4_nvfp4.vllm_plugin.envs import MOE_BACKEND_VAR, MoeBackendChoice

MEGA_MOE_BACKEND = "deep_gemm_mega_moe"  # vLLM's --moe-backend value for the mega path
NVFP4_MEGA_MOE_ALIGN = 512  # fp4_fp4_mega_moe: hidden and intermediate multiples of 512


class MoeBackendUnavailable(ValueError):
    """DeepGEMM was requested explicitly but cannot run here (the message says why)."""


@dataclass(frozen=True)
class MoeFacts:
    """What the decision depends on, gathered from vLLM and the hardware."""

    nvfp4_experts: bool  # moe_quant_algo NVFP4 and expert_dtype fp4
    has_fp4_fp4_mega_moe: bool  # deep_gemm imports and exports fp4_fp4_mega_moe
    is_sm100: bool  # device capability family 100 (B200/GB200)
    expert_parallel: bool  # --enable-expert-parallel
    user_moe_backend: str  # vLLM's --moe-backend value
    hidden_size: int
    intermediate_size: int


@dataclass(frozen=True)
class MoeDecision:
    backend: Literal["deepgemm", "vllm"]
    reason: str

    @property
    def use_deepgemm(self) -> bool:
        return self.backend == "deepgemm"

    def log_line(self) -> str:
        """The one line the plugin logs about the choice."""
        return f"dsv4_nvfp4: NVFP4 routed experts on {self.backend}: {self.reason}"


def unmet_requirements(facts: MoeFacts) -> list[str]:
    """Every reason DeepGEMM's NVFP4 mega-MoE cannot run, in check order (empty: it can)."""
    out = []
    if not facts.has_fp4_fp4_mega_moe:
        out.append("deep_gemm.fp4_fp4_mega_moe is not available (needs upstream DeepGEMM >= 2.8)")
    if not facts.is_sm100:
        out.append("the GPU is not SM100 (B200/GB200)")
    if not facts.expert_parallel:
        out.append("expert parallel is off (--enable-expert-parallel)")
    for name, size in (("hidden_size", facts.hidden_size),
                       ("moe_intermediate_size", facts.intermediate_size)):
        if size % NVFP4_MEGA_MOE_ALIGN:
            out.append(f"{name}={size} is not a multiple of {NVFP4_MEGA_MOE_ALIGN}")
    return out


def select_moe_backend(choice: MoeBackendChoice, facts: MoeFacts) -> MoeDecision:
    """Apply the rules in the module docstring; raises MoeBackendUnavailable for a forced choice."""
    if not facts.nvfp4_experts:
        return MoeDecision("vllm", "the checkpoint's routed experts are not NVFP4")
    user_mega = facts.user_moe_backend == MEGA_MOE_BACKEND
    if choice == "vllm":
        if user_mega:
            raise MoeBackendUnavailable(
                f"{MOE_BACKEND_VAR}=vllm with --moe-backend {MEGA_MOE_BACKEND}: vLLM's own "
                "mega-MoE experts are MXFP4-only; drop one of the two"
            )
        return MoeDecision("vllm", f"{MOE_BACKEND_VAR}=vllm")
    unmet = unmet_requirements(facts)
    if choice == "deepgemm" or user_mega:
        if unmet:
            asked = f"{MOE_BACKEND_VAR}=deepgemm" if choice == "deepgemm" else (
                f"--moe-backend {MEGA_MOE_BACKEND}")
            raise MoeBackendUnavailable(
                f"{asked} but DeepGEMM NVFP4 mega-MoE cannot run: {'; '.join(unmet)}"
            )
        return MoeDecision("deepgemm", f"requested ({MOE_BACKEND_VAR}={choice}, "
                           f"--moe-backend {facts.user_moe_backend})")
    if facts.user_moe_backend != "auto":
        return MoeDecision("vllm", f"--moe-backend {facts.user_moe_backend} was requested")
    if unmet:
        return MoeDecision("vllm", unmet[0])
    return MoeDecision("deepgemm", "fp4_fp4_mega_moe available, SM100, expert parallel on")

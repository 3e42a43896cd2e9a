"""Backend selection for NVFP4 routed experts: auto/forced, and every fallback reason."""

from __future__ import annotations

import dataclasses

import pytest

from dsv4_nvfp4.vllm_plugin import envs
from dsv4_nvfp4.vllm_plugin.moe_selection import (
    MoeBackendUnavailable,
    MoeFacts,
    select_moe_backend,
    unmet_requirements,
)

pytestmark = pytest.mark.cpu

# DeepSeek V4 Pro on 8xB200 with EP and upstream DeepGEMM 2.8: everything holds.
B200 = MoeFacts(nvfp4_experts=True, has_fp4_fp4_mega_moe=True, is_sm100=True,
                expert_parallel=True, user_moe_backend="auto", hidden_size=7168,
                intermediate_size=3072)


def facts(**kw: object) -> MoeFacts:
    return dataclasses.replace(B200, **kw)


def test_auto_picks_deepgemm_when_everything_holds() -> None:
    d = select_moe_backend("auto", B200)
    assert (d.backend, d.use_deepgemm) == ("deepgemm", True)
    assert d.log_line() == ("dsv4_nvfp4: NVFP4 routed experts on deepgemm: "
                            "fp4_fp4_mega_moe available, SM100, expert parallel on")


@pytest.mark.parametrize(("change", "reason"), [
    ({"has_fp4_fp4_mega_moe": False},
     "deep_gemm.fp4_fp4_mega_moe is not available (needs upstream DeepGEMM >= 2.8)"),
    ({"is_sm100": False}, "the GPU is not SM100 (B200/GB200)"),
    ({"expert_parallel": False}, "expert parallel is off (--enable-expert-parallel)"),
    ({"hidden_size": 7168 + 128}, "hidden_size=7296 is not a multiple of 512"),
    ({"intermediate_size": 2048 + 256},
     "moe_intermediate_size=2304 is not a multiple of 512"),
    ({"user_moe_backend": "flashinfer_cutedsl"}, "--moe-backend flashinfer_cutedsl was requested"),
    ({"nvfp4_experts": False}, "the checkpoint's routed experts are not NVFP4"),
])
def test_auto_falls_back_to_vllm_with_the_reason(change: dict, reason: str) -> None:
    d = select_moe_backend("auto", facts(**change))
    assert (d.backend, d.reason) == ("vllm", reason)


def test_auto_reports_the_first_unmet_requirement() -> None:
    f = facts(has_fp4_fp4_mega_moe=False, is_sm100=False, expert_parallel=False)
    assert len(unmet_requirements(f)) == 3
    assert select_moe_backend("auto", f).reason.startswith("deep_gemm.fp4_fp4_mega_moe")


def test_forced_vllm() -> None:
    d = select_moe_backend("vllm", B200)
    assert (d.backend, d.reason) == ("vllm", "DSV4_NVFP4_MOE_BACKEND=vllm")


def test_forced_vllm_with_vllm_mega_flag_is_an_error() -> None:
    with pytest.raises(MoeBackendUnavailable, match="MXFP4-only"):
        select_moe_backend("vllm", facts(user_moe_backend="deep_gemm_mega_moe"))


def test_forced_deepgemm() -> None:
    assert select_moe_backend("deepgemm", B200).use_deepgemm
    # the user's --moe-backend does not stop a forced choice ...
    assert select_moe_backend("deepgemm", facts(user_moe_backend="flashinfer_cutedsl")).use_deepgemm


def test_forced_deepgemm_names_every_missing_requirement() -> None:
    with pytest.raises(MoeBackendUnavailable) as err:
        select_moe_backend("deepgemm", facts(is_sm100=False, expert_parallel=False))
    assert str(err.value) == (
        "DSV4_NVFP4_MOE_BACKEND=deepgemm but DeepGEMM NVFP4 mega-MoE cannot run: "
        "the GPU is not SM100 (B200/GB200); expert parallel is off (--enable-expert-parallel)")


def test_vllm_mega_flag_means_deepgemm_or_error_under_auto() -> None:
    assert select_moe_backend("auto", facts(user_moe_backend="deep_gemm_mega_moe")).use_deepgemm
    with pytest.raises(MoeBackendUnavailable, match=r"^--moe-backend deep_gemm_mega_moe but"):
        select_moe_backend("auto", facts(user_moe_backend="deep_gemm_mega_moe", is_sm100=False))


def test_not_nvfp4_is_never_our_business() -> None:
    for choice in ("auto", "deepgemm", "vllm"):
        d = select_moe_backend(choice, facts(nvfp4_experts=False,
                                             user_moe_backend="deep_gemm_mega_moe"))
        assert d.backend == "vllm"


def test_env_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(envs.MOE_BACKEND_VAR, raising=False)
    assert envs.moe_backend_choice() == "auto"
    monkeypatch.setenv(envs.MOE_BACKEND_VAR, " DeepGEMM ")
    assert envs.moe_backend_choice() == "deepgemm"
    monkeypatch.setenv(envs.MOE_BACKEND_VAR, "cutlass")
    with pytest.raises(ValueError, match=r"^DSV4_NVFP4_MOE_BACKEND='cutlass': expected one of "
                                         r"auto, deepgemm, vllm$"):
        envs.moe_backend_choice()

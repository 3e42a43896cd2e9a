"""The NVFP4 MegaMoE staging seam on vLLM 0.34.0's own module (tier 2, CPU platform forced).

``staging_patch.MEGAMOE_STAGING_PATCH`` replaces the module global
``prepare_megamoe_nvfp4_inputs`` of ``vllm.model_executor.layers.fused_moe.deep_gemm_mega_moe``,
the name ``DeepGemmMegaMoEExperts.forward`` calls. Checked here on the real module: the
wrapper installs (only where the platform is CUDA; the CPU platform is tested as it is and
with ``is_cuda`` forced), keeps vLLM's function as ``__wrapped__``, has vLLM's signature,
routes calls our kernel accepts to it and every other call (active EPLB, fused shared
expert, other dtypes) to vLLM's function with the same arguments, logs each path once,
and ``DSV4_NVFP4_VLLM_STAGING=1`` leaves vLLM's function in place. (That both functions
write the same bytes is the GPU test ``tests/gpu/test_megamoe_staging_gpu.py``.)
"""

from __future__ import annotations

import importlib
import inspect
import logging
from collections.abc import Iterator

import pytest
import torch

from dsv4_nvfp4.kernels import megamoe_staging
from dsv4_nvfp4.vllm_plugin import staging_patch
from dsv4_nvfp4.vllm_plugin.patch_register import _apply_now, all_patches
from dsv4_nvfp4.vllm_plugin.runtime_patch import PATCH_MARKER


@pytest.fixture
def dgm(monkeypatch: pytest.MonkeyPatch) -> Iterator:
    """vLLM's deep_gemm_mega_moe module, its staging global restored afterwards."""
    module = importlib.import_module(staging_patch.MEGAMOE_STAGING_PATCH.module)
    original = module.prepare_megamoe_nvfp4_inputs
    monkeypatch.delenv(staging_patch.ENV_SWITCH, raising=False)
    yield module
    module.prepare_megamoe_nvfp4_inputs = original


@pytest.fixture
def on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    from vllm.platforms import current_platform

    monkeypatch.setattr(current_platform, "is_cuda", lambda: True)


def call_args(t: int = 3, h: int = 256, k: int = 6, **extra: object) -> tuple[tuple, dict]:
    args = (torch.zeros(t, h, dtype=torch.bfloat16), torch.zeros(t, k),
            torch.zeros(t, k, dtype=torch.int32), torch.empty(t, h // 2, dtype=torch.uint8),
            torch.empty(t, h // 64, dtype=torch.int32), torch.empty(t),
            torch.empty(t, k, dtype=torch.int64), torch.empty(t, k))
    kwargs = {"w2_global_scale": torch.ones(4), "l2_alpha": torch.empty(4),
              "l2_activation_scale": 0.5, **extra}
    return args, kwargs


def test_the_seam_is_the_global_forward_calls(dgm) -> None:
    from vllm.model_executor.layers.fused_moe import prepare_megamoe

    assert dgm.prepare_megamoe_nvfp4_inputs is prepare_megamoe.prepare_megamoe_nvfp4_inputs
    forward = dgm.DeepGemmMegaMoEExperts.forward
    assert forward.__globals__ is vars(dgm)
    assert "prepare_megamoe_nvfp4_inputs" in forward.__code__.co_names
    # our function takes vLLM's parameters, by name and in order, with vLLM's defaults
    theirs = inspect.signature(prepare_megamoe.prepare_megamoe_nvfp4_inputs).parameters
    ours = inspect.signature(megamoe_staging.stage_megamoe_nvfp4_inputs).parameters
    assert list(ours)[:len(theirs)] == list(theirs)
    assert [p.default for p in list(ours.values())[:len(theirs)]] == [
        p.default for p in theirs.values()]
    assert list(ours)[len(theirs):] == ["config", "split"]


def test_registered_and_inactive_on_the_cpu_platform(dgm) -> None:
    assert staging_patch.MEGAMOE_STAGING_PATCH in all_patches()
    original = dgm.prepare_megamoe_nvfp4_inputs
    assert _apply_now(staging_patch.MEGAMOE_STAGING_PATCH, dgm) is False
    assert dgm.prepare_megamoe_nvfp4_inputs is original


def test_installs_on_cuda_once_and_wraps_vllms_function(dgm, on_cuda) -> None:
    original = dgm.prepare_megamoe_nvfp4_inputs
    assert _apply_now(staging_patch.MEGAMOE_STAGING_PATCH, dgm) is True
    wrapper = dgm.prepare_megamoe_nvfp4_inputs
    assert getattr(wrapper, PATCH_MARKER) == "megamoe_nvfp4_staging"
    assert wrapper.__wrapped__ is original
    assert wrapper.__name__ == "prepare_megamoe_nvfp4_inputs"
    assert _apply_now(staging_patch.MEGAMOE_STAGING_PATCH, dgm) is True
    assert dgm.prepare_megamoe_nvfp4_inputs is wrapper  # idempotent


def test_env_switch_keeps_vllms_function(dgm, on_cuda, monkeypatch) -> None:
    original = dgm.prepare_megamoe_nvfp4_inputs
    monkeypatch.setenv(staging_patch.ENV_SWITCH, "1")
    assert _apply_now(staging_patch.MEGAMOE_STAGING_PATCH, dgm) is False
    assert dgm.prepare_megamoe_nvfp4_inputs is original


def test_routes_and_delegates(dgm, on_cuda, monkeypatch, caplog) -> None:
    """Accepted calls reach our kernel; the rest reach vLLM's function, arguments untouched."""
    from vllm.distributed.eplb.eplb_state import EplbLayerState

    seen: list[tuple[str, tuple, dict]] = []

    def vllm_fn(*args, **kwargs):
        seen.append(("vllm", args, kwargs))

    def our_fn(*args, **kwargs):
        seen.append(("ours", args, kwargs))

    monkeypatch.setattr(dgm, "prepare_megamoe_nvfp4_inputs", vllm_fn)
    monkeypatch.setattr(megamoe_staging, "stage_megamoe_nvfp4_inputs", our_fn)
    _apply_now(staging_patch.MEGAMOE_STAGING_PATCH, dgm)
    wrapper = dgm.prepare_megamoe_nvfp4_inputs
    assert wrapper.__wrapped__ is vllm_fn

    inert = EplbLayerState()  # what every layer passes without EPLB: no mapping
    active = EplbLayerState()
    active.logical_to_physical_map = torch.zeros(8, 1, dtype=torch.int64)
    cases = [
        ("ours", call_args(eplb_state=inert)),
        ("ours", call_args(t=0)),
        ("ours", call_args(is_padding=torch.zeros(3, dtype=torch.bool))),
        ("vllm", call_args(eplb_state=active)),
        ("vllm", call_args(shared_x=torch.empty(3, 256, dtype=torch.float8_e4m3fn),
                           shared_x_sf=torch.empty(128, 2, dtype=torch.int32),
                           shared_block_m=64)),
        ("vllm", call_args(h=192)),
        ("vllm", ((torch.zeros(3, 256), *call_args()[0][1:]), call_args()[1])),
    ]
    with caplog.at_level(logging.INFO, logger="vllm.dsv4_nvfp4.staging"):
        for _, (args, kwargs) in cases:
            wrapper(*args, **kwargs)
        wrapper(*cases[0][1][0], **cases[0][1][1])  # a second accepted call logs nothing
    assert [s[0] for s in seen] == [c[0] for c in cases] + ["ours"]
    for (_, args, kwargs), (_, (want_args, want_kwargs)) in zip(seen, cases, strict=False):
        assert all(a is b for a, b in zip(args, want_args, strict=True))
        assert kwargs == want_kwargs
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 5  # ours once; EPLB, shared expert, H, dtype once each
    assert "stage_megamoe_nvfp4_inputs" in lines[0]
    assert "EPLB" in lines[1] and "shared expert" in lines[2]

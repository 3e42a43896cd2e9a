"""The NVFP4 mega-MoE weight/scale transforms the plugin applies, bit-exact against oracles.

At DeepSeek V4 Pro shapes (H=7168, I=3072; 2 experts): the plugin's backend
(``NvFp4MegaMoEBackend.transform_weights``, which calls
``dsv4_nvfp4.formats.transform_nvfp4_for_mega_moe``) against

* sgl-deep-gemm 0.2.5's pure-torch helpers (``transform_ue4m3_sf_into_required_layout``
  and ``transform_weights_for_mega_moe`` with its gran-8 interleave, the part
  that matches upstream), and the documented difference of its
  ``nvfp4xnvfp4`` even/odd interleave, which we do not follow;
* upstream DeepGEMM's own ``transform_weights_for_mega_moe`` at the pinned ref,
  when ``DSV4_DEEPGEMM_SRC`` points at a checkout (the image build has one).
"""

from __future__ import annotations

import ast
import os
import types
from pathlib import Path

import pytest
import torch
from bitwise import assert_bitwise_equal
from oracles import sgl_math, sgl_mega

pytestmark = pytest.mark.cpu

E, H, INTER = 2, 7168, 3072  # DeepSeek V4 Pro: hidden_size, moe_intermediate_size
UPSTREAM_ENV = "DSV4_DEEPGEMM_SRC"


def _e4m3_bytes(*shape: int, gen: torch.Generator) -> torch.Tensor:
    """Random valid UE4M3 scale bytes (0x00..0x7E: positive, never the NaN code 0x7F)."""
    return torch.randint(0, 0x7F, shape, generator=gen, dtype=torch.uint8).view(
        torch.float8_e4m3fn)


@pytest.fixture(scope="module")
def experts() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    return {
        "w13": torch.randint(0, 256, (E, 2 * INTER, H // 2), generator=gen, dtype=torch.uint8),
        "w13_sf": _e4m3_bytes(E, 2 * INTER, H // 16, gen=gen),
        "w2": torch.randint(0, 256, (E, H, INTER // 2), generator=gen, dtype=torch.uint8),
        "w2_sf": _e4m3_bytes(E, H, INTER // 16, gen=gen),
    }


@pytest.fixture(scope="module")
def ours(experts: dict[str, torch.Tensor]):  # type: ignore[no-untyped-def]
    from dsv4_nvfp4.vllm_plugin.nvfp4_mega_experts import classes

    backend = classes()[0]()
    assert backend.mma_type == "fp4xfp4"
    return backend.transform_weights(
        w13_weight=experts["w13"], w13_weight_scale=experts["w13_sf"], w2_weight=experts["w2"],
        w2_weight_scale=experts["w2_sf"], num_local_experts=E, hidden_size=H,
        intermediate_size=INTER)


def _sgl_canonical_sf(sf: torch.Tensor) -> torch.Tensor:
    """sgl-deep-gemm's packed, MN-major UE4M3 SF from fp32 scale values."""
    return sgl_math().transform_ue4m3_sf_into_required_layout(sf.float(), sf.shape[-2])


def _sgl_transform(experts: dict[str, torch.Tensor], mma_type: str):  # type: ignore[no-untyped-def]
    return sgl_mega().transform_weights_for_mega_moe(
        (experts["w13"].view(torch.int8), _sgl_canonical_sf(experts["w13_sf"])),
        (experts["w2"].view(torch.int8), _sgl_canonical_sf(experts["w2_sf"])),
        mma_type=mma_type)


def test_shapes_dtypes_strides(ours) -> None:  # type: ignore[no-untyped-def]
    (l1, l1_sf), (l2, l2_sf) = ours
    assert (l1.dtype, tuple(l1.shape)) == (torch.int8, (E, 2 * INTER, H // 2))
    assert (l2.dtype, tuple(l2.shape)) == (torch.int8, (E, H, INTER // 2))
    # four UE4M3 per int32, MN-major with stride(-1) == align(MN, 4)
    assert (l1_sf.dtype, tuple(l1_sf.shape), l1_sf.stride()) == (
        torch.int32, (E, 2 * INTER, H // 64), (2 * INTER * H // 64, 1, 2 * INTER))
    assert (l2_sf.dtype, tuple(l2_sf.shape), l2_sf.stride()) == (
        torch.int32, (E, H, INTER // 64), (H * INTER // 64, 1, H))


def test_bit_exact_vs_sgl_deep_gemm_gran8(experts, ours) -> None:  # type: ignore[no-untyped-def]
    (l1, l1_sf), (l2, l2_sf) = ours
    (s_l1, s_l1_sf), (s_l2, s_l2_sf) = _sgl_transform(experts, "fp8xfp4")
    assert_bitwise_equal(l1, s_l1, "L1 weight", check_strides=True)
    assert_bitwise_equal(l1_sf, s_l1_sf, "L1 SF", check_strides=True)
    assert_bitwise_equal(l2, s_l2, "L2 weight", check_strides=True)
    assert_bitwise_equal(l2_sf, s_l2_sf, "L2 SF", check_strides=True)
    # sgl's scale-only helper agrees on L2 (same UTCCP transpose as upstream)
    _, s2 = sgl_mega().transform_scales_for_mega_moe(_sgl_canonical_sf(experts["w13_sf"]),
                                                     _sgl_canonical_sf(experts["w2_sf"]))
    assert_bitwise_equal(l2_sf, s2, "L2 SF (transform_scales_for_mega_moe)")


def test_sgl_nvfp4xnvfp4_interleave_differs_from_upstream(experts, ours) -> None:  # type: ignore[no-untyped-def]
    """sgl's nvfp4xnvfp4 kind interleaves even/odd rows; upstream (our pin) uses blocks of 8."""
    (l1, l1_sf), (l2, l2_sf) = ours
    (n_l1, n_l1_sf), (n_l2, n_l2_sf) = _sgl_transform(experts, "nvfp4xnvfp4")
    assert not torch.equal(l1, n_l1)
    assert not torch.equal(l1_sf, n_l1_sf)
    assert torch.equal(l2, n_l2) and torch.equal(l2_sf, n_l2_sf)  # L2 is not interleaved
    w13 = experts["w13"].view(torch.int8)
    # Output rows 0..15 of expert 0: upstream = gate 0..7, up 0..7;
    # sgl nvfp4xnvfp4 = gate 0,2,..,14, up 0,2,..,14.
    up = INTER
    ours_rows = [*range(8), *range(up, up + 8)]
    sgl_rows = [*range(0, 16, 2), *range(up, up + 16, 2)]
    assert torch.equal(l1[0, :16], w13[0, ours_rows])
    assert torch.equal(n_l1[0, :16], w13[0, sgl_rows])


def _load_upstream(src: Path) -> types.ModuleType:
    """Only the pure layout functions of upstream ``deep_gemm/mega/__init__.py`` (no _C)."""
    path = src / "deep_gemm" / "mega" / "__init__.py"
    tree = ast.parse(path.read_text())
    wanted = {"_interleave_weights", "_transpose_sf_for_utccp", "transform_weights_for_mega_moe"}
    body = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in wanted]
    assert {n.name for n in body} == wanted, f"{path}: layout functions not found"
    import typing

    mod = types.ModuleType("upstream_deep_gemm_mega_pure")
    mod.__dict__.update(torch=torch, Tuple=tuple, Union=typing.Union, Optional=typing.Optional)
    exec(compile(ast.Module(body=body, type_ignores=[]), str(path), "exec"), mod.__dict__)
    return mod


@pytest.mark.skipif(UPSTREAM_ENV not in os.environ,
                    reason=f"set {UPSTREAM_ENV} to a DeepSeek DeepGEMM checkout at DEEPGEMM_REF")
def test_bit_exact_vs_upstream_deepgemm(experts, ours) -> None:  # type: ignore[no-untyped-def]
    up = _load_upstream(Path(os.environ[UPSTREAM_ENV]))
    (u_l1, u_l1_sf), (u_l2, u_l2_sf) = up.transform_weights_for_mega_moe(
        (experts["w13"].view(torch.int8), _sgl_canonical_sf(experts["w13_sf"])),
        (experts["w2"].view(torch.int8), _sgl_canonical_sf(experts["w2_sf"])))
    (l1, l1_sf), (l2, l2_sf) = ours
    assert_bitwise_equal(l1, u_l1, "L1 weight vs upstream", check_strides=True)
    assert_bitwise_equal(l1_sf, u_l1_sf, "L1 SF vs upstream", check_strides=True)
    assert_bitwise_equal(l2, u_l2, "L2 weight vs upstream", check_strides=True)
    assert_bitwise_equal(l2_sf, u_l2_sf, "L2 SF vs upstream", check_strides=True)

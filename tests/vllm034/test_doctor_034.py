"""The doctor's build-time checks against the real vLLM 0.34.0 install (the image's wheel).

Tier 1 (tests/test_doctor.py) proves each check's pass and fail branches on
trees written for the purpose; here the same checks read the real thing:

* the vendored DeepGEMM 2.8.1 inside the vLLM 0.34.0 wheel passes every
  file check (version, the NVFP4 MegaMoE API traced to its definitions, the
  compiled extension whose size the wheel's RECORD states, the JIT headers);
* the premise of the shadow check holds in vLLM's own code: with a top-level
  `deep_gemm` on the path, vLLM 0.34.0's `_import_deep_gemm` returns it, and
  the doctor fails on exactly that path;
* the names the doctor requires are the ones vLLM 0.34.0's NVFP4 MegaMoE calls,
  and the `--gpu` warm-up calls the vendored API with parameters it has;
* the doctor finds nvcc where vLLM 0.34.0's `_deep_gemm_nvcc_path` finds it;
* every `patches/*.diff` applies with --fuzz=0 to the 0.34.0 sources.
"""

from __future__ import annotations

import ast
import importlib.metadata
import sys
from pathlib import Path

import pytest

from dsv4_nvfp4.deploy import doctor
from dsv4_nvfp4.versions import pins

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def vllm_dir() -> Path:
    found = doctor.vllm_package_dir()
    assert found is not None
    return found


@pytest.fixture(scope="module")
def vendored(vllm_dir: Path) -> Path:
    return doctor.vendored_deep_gemm_dir(vllm_dir)


def _parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def _function(tree: ast.AST, name: str) -> ast.FunctionDef:
    (found,) = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == name]
    return found


def _params(fn: ast.FunctionDef) -> list[str]:
    return [a.arg for a in (*fn.args.posonlyargs, *fn.args.args, *fn.args.kwonlyargs)]


# ------------------------------------------------------------- versions, plugin


def test_the_image_pins_pass_here():
    assert doctor.check_vllm_version(pins()["VLLM_VERSION"]).line() == (
        "[ok  ] vllm version: expected vllm 0.34.0, found vllm 0.34.0")
    torch_check = doctor.check_version("torch version", "torch", pins()["VLLM_TORCH_VERSION"])
    assert torch_check.ok, torch_check.line()
    assert doctor.check_plugin().ok


# ------------------------------------------------------ the vendored DeepGEMM


def test_the_real_vendored_deep_gemm_passes_every_file_check(vendored: Path):
    record = {str(f): f.size for f in importlib.metadata.files("vllm")}
    so_size = record["vllm/third_party/deep_gemm/_C_extension.abi3.so"]
    assert so_size == 29986416  # the 0.34.0 wheel's RECORD
    lines = [c.line() for c in doctor.check_vendored_deep_gemm(
        vendored, pins()["VENDORED_DEEPGEMM_VERSION"])]
    assert lines == [
        f"[ok  ] vendored deep_gemm version: expected 2.8.1, found 2.8.1 in {vendored}/__init__.py",
        "[ok  ] deep_gemm.nvfp4_mega_moe: defined at mega/nvfp4.py:82 (def)",
        "[ok  ] deep_gemm.NVFP4SymmBuffer: defined at mega/nvfp4.py:13 (class)",
        "[ok  ] deep_gemm.get_block_m_for_nvfp4_mega_moe: defined at _C.py:437 (def)",
        f"[ok  ] deep_gemm extension: _C_extension.abi3.so, {so_size} bytes",
        "[ok  ] deep_gemm JIT headers: include/deep_gemm, include/cutlass, include/cute and "
        "include/deep_gemm/impls/sm100_nvfp4_mega_moe.cuh",
    ]
    # The previous design's entry point is there too, but it is not what vLLM 0.34 calls.
    assert doctor.trace_export(vendored, "fp4_fp4_mega_moe") == "mega/__init__.py:205 (def)"


def test_the_required_names_are_what_vllms_nvfp4_megamoe_calls(vllm_dir: Path):
    """deep_gemm_mega_moe.py: MEGA_MOE_NVFP4's kernel, and the buffer and BLOCK_M APIs
    its NVFP4 branch reads off the imported deep_gemm module."""
    path = vllm_dir / "model_executor" / "layers" / "fused_moe" / "deep_gemm_mega_moe.py"
    tree = _parse(path)
    (nvfp4,) = [n for n in ast.walk(tree) if isinstance(n, ast.Assign)
                and any(isinstance(t, ast.Name) and t.id == "MEGA_MOE_NVFP4" for t in n.targets)]
    kernel = {kw.arg: kw.value.value for kw in nvfp4.value.keywords
              if isinstance(kw.value, ast.Constant)}["kernel"]
    read_off_module = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)
                       and isinstance(n.value, ast.Name) and n.value.id == "deep_gemm"}
    assert kernel == "nvfp4_mega_moe"
    assert {"NVFP4SymmBuffer", "get_block_m_for_nvfp4_mega_moe"} <= read_off_module
    assert set(doctor.NVFP4_MEGA_MOE_API) == {kernel, "NVFP4SymmBuffer",
                                              "get_block_m_for_nvfp4_mega_moe"}


def test_the_gpu_warm_up_calls_the_vendored_api_as_it_is(vendored: Path):
    """What `run_nvfp4_mega_moe` and `fill_symm_buffer` assume, read from the 2.8.1 sources:
    positional order of the buffer and BLOCK_M calls, the kernel's keyword parameters,
    and the buffer attributes written and read."""
    nvfp4 = _parse(vendored / "mega" / "nvfp4.py")
    c_api = _parse(vendored / "_C.py")
    buffer_init = _function(nvfp4, "__init__")
    assert _params(buffer_init)[:7] == ["self", "group", "num_experts", "num_max_tokens_per_rank",
                                        "num_topk", "hidden", "intermediate_hidden"]
    kernel = _params(_function(nvfp4, "nvfp4_mega_moe"))
    assert kernel[:4] == ["y", "l1_weights", "l2_weights", "sym_buffer"]
    case_kwargs = ("l1_alpha", "l2_alpha", "l2_activation_scale", "use_x_scales")
    assert set(case_kwargs) <= set(kernel)
    assert _params(_function(c_api, "get_block_m_for_nvfp4_mega_moe")) == [
        "num_ranks", "num_experts", "num_max_tokens_per_rank", "num_tokens", "num_topk"]
    attributes = {t.attr for n in ast.walk(buffer_init) if isinstance(n, ast.Assign)
                  for e in n.targets for t in ast.walk(e)
                  if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name)
                  and t.value.id == "self"}
    assert {"x", "x_sf", "x_scales", "topk_idx", "topk_weights",
            "num_max_tokens_per_rank"} <= attributes
    assert [n.name for n in ast.walk(nvfp4) if isinstance(n, ast.FunctionDef)
            and n.name == "destroy"] == ["destroy"]


# --------------------------------------------- a site-packages deep_gemm shadows it


def test_nothing_shadows_the_vendored_copy_here():
    assert doctor.check_no_deep_gemm_shadow().ok


def test_vllms_import_prefers_a_site_packages_deep_gemm(tmp_path, monkeypatch):
    """The reason for the shadow check, run in vLLM 0.34.0's own code: a top-level
    `deep_gemm` on the path is what `_import_deep_gemm` returns, and the doctor
    fails on exactly that path."""
    from vllm.utils.deep_gemm import _import_deep_gemm

    site = tmp_path / "site"
    (site / "deep_gemm").mkdir(parents=True)
    (site / "deep_gemm" / "__init__.py").write_text("__version__ = 'shadow-2.8.0'\n")
    monkeypatch.syspath_prepend(str(site))
    # setitem, not delitem: on teardown the fake leaves sys.modules again, so later
    # tests' _import_deep_gemm() finds vLLM's vendored copy, not this one.
    monkeypatch.setitem(sys.modules, "deep_gemm", None)
    del sys.modules["deep_gemm"]
    module = _import_deep_gemm.__wrapped__()  # past its functools.cache
    assert (module.__name__, module.__version__) == ("deep_gemm", "shadow-2.8.0")
    assert module.__file__ == str(site / "deep_gemm" / "__init__.py")
    check = doctor.check_no_deep_gemm_shadow()
    assert check.ok is False
    assert check.detail.startswith(f"module deep_gemm at {site}/deep_gemm/__init__.py")


# ------------------------------------------------------------------------ nvcc


def _toolkit(root: Path, release: str) -> Path:
    nvcc = root / "bin" / "nvcc"
    nvcc.parent.mkdir(parents=True)
    nvcc.write_text(f"#!/bin/sh\necho 'Cuda compilation tools, release {release}, V{release}.1'\n")
    nvcc.chmod(0o755)
    return nvcc


def test_nvcc_is_found_where_vllm_looks(tmp_path, monkeypatch):
    from vllm.utils.deep_gemm import _deep_gemm_nvcc_path

    cuda = tmp_path / "cuda-13.0"
    nvcc = _toolkit(cuda, "13.0")
    other = _toolkit(tmp_path / "other", "12.9")
    scenarios = {
        "CUDA_HOME": ({"CUDA_HOME": str(cuda)}, str(nvcc)),
        "CUDA_PATH": ({"CUDA_PATH": str(cuda)}, str(nvcc)),
        "PATH only": ({"PATH": f"{cuda / 'bin'}:/usr/bin:/bin"}, str(nvcc)),
        "DG_JIT_NVCC_COMPILER": ({"CUDA_HOME": str(cuda), "DG_JIT_NVCC_COMPILER": str(other)},
                                 str(other)),
        "DJ_JIT_NVCC_COMPILER": ({"CUDA_HOME": str(cuda), "DJ_JIT_NVCC_COMPILER": str(other)},
                                 str(other)),
        "missing toolkit": ({"CUDA_HOME": str(tmp_path / "absent"),
                             "DG_JIT_NVCC_COMPILER": str(other)}, None),
        "toolkit without nvcc": ({"CUDA_HOME": str(tmp_path)}, None),
    }
    for name, (env, expected) in scenarios.items():
        for var in ("CUDA_HOME", "CUDA_PATH", "DG_JIT_NVCC_COMPILER", "DJ_JIT_NVCC_COMPILER"):
            monkeypatch.delenv(var, raising=False)
        monkeypatch.setenv("PATH", "/usr/bin:/bin")
        for var, value in env.items():
            monkeypatch.setenv(var, value)
        assert _deep_gemm_nvcc_path() == expected, name
        assert doctor.deep_gemm_nvcc() == expected, name


# --------------------------------------------------------------------- patches


def test_patches_apply_to_the_vllm_034_sources(vllm_dir: Path):
    """Each patches/*.diff applies with --fuzz=0 to the installed vLLM 0.34.0 (never
    edited here, so each must be applicable, not yet applied). Zero diffs is valid."""
    patch_dir = ROOT / "patches"
    diffs = sorted(patch_dir.glob(doctor.PATCH_GLOB)) if patch_dir.is_dir() else []
    states = {d.name: doctor.patch_state(d, vllm_dir.parent) for d in diffs}
    assert all(s == "applicable" for s in states.values()), states
    checks = doctor.check_patches(patch_dir, vllm_dir.parent, accept_applicable=True)
    assert all(c.ok for c in checks), [c.line() for c in checks]

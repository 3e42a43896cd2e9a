"""The `dsv4-nvfp4` command line: every registered subcommand imports and parses."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from dsv4_nvfp4.cli import COMMANDS, build_parser, main

pytestmark = pytest.mark.cpu


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_subcommand_has_help_and_a_run_function(name, capsys):
    with pytest.raises(SystemExit) as exc:
        main([name, "--help"])
    assert exc.value.code == 0
    assert f"dsv4-nvfp4 {name}" in capsys.readouterr().out


def test_top_level_help_lists_every_command():
    text = build_parser().format_help()
    for name in COMMANDS:
        assert name in text


def test_unknown_command_exits_2():
    with pytest.raises(SystemExit) as exc:
        main(["no-such-command"])
    assert exc.value.code == 2


def test_http_commands_do_not_import_torch():
    """`smoke`, `health`, `bench`, `eval` are HTTP clients: they must start without torch."""
    code = ("import sys\n"
            "from dsv4_nvfp4.cli import build_parser\n"
            "for name in ('smoke', 'health', 'bench', 'eval', 'acceptance'):\n"
            "    build_parser(name)\n"
            "print('torch' in sys.modules, 'vllm' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_console_script_is_installed():
    out = subprocess.run([sys.executable, "-m", "dsv4_nvfp4.cli", "verify", "--help"],
                         capture_output=True, text=True)
    assert out.returncode == 0 and "verify" in out.stdout


def test_one_entry_point_every_command_is_a_module_with_add_parser_and_run() -> None:
    """`dsv4-nvfp4 X` = `python -m dsv4_nvfp4 X` is the only way in: no module has its own
    `main` or `__main__` block, and every command module exposes add_parser and run."""
    import ast
    import importlib
    from pathlib import Path

    from dsv4_nvfp4.cli import COMMANDS

    pkg = Path(__file__).resolve().parents[1] / "src" / "dsv4_nvfp4"
    own_entry = []
    for path in sorted(pkg.rglob("*.py")):
        if path.name in ("cli.py", "__main__.py"):
            continue
        tree = ast.parse(path.read_text())
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and node.name == "main":
                own_entry.append(f"{path.relative_to(pkg)}: def main")
            if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test):
                own_entry.append(f"{path.relative_to(pkg)}: __main__ block")
    assert own_entry == []
    for name, module in COMMANDS.items():
        mod = importlib.import_module(module)
        assert callable(mod.add_parser) and callable(mod.run), name
        # the parser dispatches to that module's run (a missing set_defaults once
        # left `dsv4-nvfp4 quantize` parsing its arguments and then failing)
        sub = argparse.ArgumentParser().add_subparsers()
        assert mod.add_parser(sub).get_default("func") is mod.run, name

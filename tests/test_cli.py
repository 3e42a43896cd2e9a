"""The `dsv4-nvfp4` command line: every registered subcommand imports and parses."""

from __future__ import annotations

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

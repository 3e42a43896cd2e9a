"""Fetch the pinned vLLM wheel's own Python file(s) that the GPU comparison tests import.

A fetcher, not a copy: nothing of vLLM is committed. It downloads the public
``vllm`` wheel of the version pinned in ``src/dsv4_nvfp4/versions.env``
(``VLLM_VERSION``) with ``pip download --no-deps --only-binary=:all:``, extracts
only the files in ``FILES`` into ``.cache/vllm-<version>/`` (git-ignored; the
paths inside keep the wheel's ``vllm/...`` layout), records the wheel's name and
the SHA-256 of the wheel and of each file in ``SOURCE.json`` beside them, and
deletes the wheel. A second run with the files present does nothing.

Usage::

    python scripts/fetch_vllm_source.py                 # download (~240 MB) and extract
    python scripts/fetch_vllm_source.py --wheel W.whl   # extract from a wheel already here

The cache directory is what ``tests/gpu/vllm_staging.py`` and
``benchmarks/vllm_staging_bench.py`` load; copy it to the GPU machine with the checkout.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PIN_FILE = REPO / "src" / "dsv4_nvfp4" / "versions.env"
# vLLM's Triton staging kernels for DeepGEMM MegaMoE (NVFP4: _prepare_megamoe_nvfp4_inputs_kernel).
FILES = ("vllm/model_executor/layers/fused_moe/prepare_megamoe.py",)
MANIFEST = "SOURCE.json"
# The vLLM wheel is published for x86-64 Linux only; its Python files are the same for any host.
PLATFORM = "manylinux_2_28_x86_64"


def pinned_version(pin_file: Path = PIN_FILE) -> str:
    for raw in pin_file.read_text().splitlines():
        key, sep, value = raw.strip().partition("=")
        if sep and key.strip() == "VLLM_VERSION":
            return value.strip()
    raise SystemExit(f"{pin_file}: VLLM_VERSION is not pinned")


def cache_dir(version: str) -> Path:
    return REPO / ".cache" / f"vllm-{version}"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download(version: str, into: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--platform", PLATFORM, "--dest", str(into), f"vllm=={version}"]
    print("+ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    wheels = sorted(into.glob(f"vllm-{version}-*.whl"))
    if len(wheels) != 1:
        raise SystemExit(f"pip download left {len(wheels)} vllm-{version} wheels in {into}")
    return wheels[0]


def extract(wheel: Path, version: str, dest: Path) -> dict:
    if not wheel.name.startswith(f"vllm-{version}-"):
        raise SystemExit(f"{wheel}: expected a vllm-{version} wheel (pinned VLLM_VERSION)")
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    files = {}
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        for name in FILES:
            if name not in names:
                raise SystemExit(f"{wheel.name}: {name} not in the wheel")
            out = tmp / name
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(zf.read(name))
            files[name] = sha256(out)
    manifest = {"package": "vllm", "version": version, "wheel": wheel.name,
                "wheel_sha256": sha256(wheel), "files": files}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    shutil.rmtree(dest, ignore_errors=True)
    tmp.replace(dest)
    return manifest


def present(dest: Path, version: str) -> bool:
    try:
        manifest = json.loads((dest / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return (manifest.get("version") == version and set(manifest.get("files", {})) == set(FILES)
            and all(sha256(dest / n) == h for n, h in manifest["files"].items()
                    if (dest / n).is_file())
            and all((dest / n).is_file() for n in FILES))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--wheel", type=Path, help="use this vllm wheel instead of downloading it")
    ap.add_argument("--force", action="store_true", help="extract again even if present")
    a = ap.parse_args(argv)
    version = pinned_version()
    dest = cache_dir(version)
    if not a.force and present(dest, version):
        print(f"{dest.relative_to(REPO)}: vllm {version} files present")
        return 0
    dest.parent.mkdir(parents=True, exist_ok=True)
    if a.wheel is not None:
        manifest = extract(a.wheel, version, dest)
    else:
        with tempfile.TemporaryDirectory(prefix="vllm-wheel-", dir=dest.parent) as d:
            manifest = extract(download(version, Path(d)), version, dest)
    for name in manifest["files"]:
        print(f"{(dest / name).relative_to(REPO)}  (from {manifest['wheel']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

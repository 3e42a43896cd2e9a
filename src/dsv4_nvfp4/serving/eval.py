"""``dsv4-nvfp4 eval``: GSM8K 8-shot through lm-eval's ``local-completions`` against the server.

Why GSM8K 8-shot on ``/v1/completions``: it is the accuracy number the anchors
report for this model family — native DeepSeek V4 Pro 0.954 in vLLM's recipe;
DeepSeek R1 FP4 96.1 vs FP8 96.3 (NVIDIA) — so a format bug in the NVFP4
experts shows up as a gap to them, not as a guess.

lm-eval runs as a child process (``python -m lm_eval run``), never imported:
it pulls in torch, and this package's ``serving`` speaks HTTP only. The API key
reaches it as ``OPENAI_API_KEY`` (what ``local-completions`` sends as a bearer
token). Before lm-eval starts, the model is resolved through our own client,
which follows no redirect: a ``--url`` that redirects stops here, with one line.
lm-eval's own clients (``requests``, and ``aiohttp`` when ``num_concurrent`` >
1) do follow redirects, which we cannot switch off from outside; both drop the
``Authorization`` header when a redirect leaves the origin (scheme, host, port).

``--local-task DIR`` evaluates a GSM8K-format task from ``DIR/train.jsonl`` and
``DIR/test.jsonl`` (fields ``question``, ``answer`` ending ``#### N``) with
lm-eval's own gsm8k prompt, filters and metric: CI uses a two-question set
(``tests/data/gsm8k_tiny``) because GSM8K cannot be downloaded there.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from dsv4_nvfp4.serving.openai_http import (
    DEFAULT_URL,
    api_key_from_env,
    client,
    describe,
    resolve_model,
)

ANCHORS = {
    "deepseek-v4-pro native (vLLM recipe, gsm8k 8-shot)": 0.954,
    "deepseek-r1 FP4 (NVIDIA)": 0.961,
    "deepseek-r1 FP8 (NVIDIA)": 0.963,
}
LOCAL_TASK = "gsm8k_local"
STRICT = "exact_match,strict-match"
FLEXIBLE = "exact_match,flexible-extract"


class EvalError(RuntimeError):
    """lm-eval could not run or produced no result; one line plus a log tail."""


@dataclass
class EvalConfig:
    url: str = DEFAULT_URL
    model: str | None = None
    api_key: str | None = None
    task: str = "gsm8k"
    num_fewshot: int = 8
    num_concurrent: int = 32
    max_gen_toks: int = 256
    limit: int | None = None
    local_task: Path | None = None
    out_dir: Path = Path("reports/eval")
    min_score: float | None = None
    lm_eval_cmd: tuple[str, ...] = (sys.executable, "-m", "lm_eval")
    timeout_s: float = 6 * 3600


def _gsm8k_yaml() -> Path:
    """lm-eval's own gsm8k task file, found without importing lm_eval (it imports torch)."""
    spec = importlib.util.find_spec("lm_eval")
    if spec is None or not spec.submodule_search_locations:
        raise EvalError("lm-eval is not installed (scripts/setup_venv.sh installs the pinned one)")
    path = Path(next(iter(spec.submodule_search_locations))) / "tasks" / "gsm8k" / "gsm8k.yaml"
    if not path.is_file():
        raise EvalError(f"{path}: lm-eval's gsm8k task file not found")
    return path


def write_local_task(data_dir: Path, task_dir: Path) -> str:
    """A task yaml that is lm-eval's gsm8k with the data swapped for local JSONL files."""
    for split in ("train", "test"):
        f = data_dir / f"{split}.jsonl"
        if not f.is_file():
            raise EvalError(f"{f}: missing (a local task needs train.jsonl and test.jsonl)")
        for n, line in enumerate(f.read_text().splitlines(), start=1):
            row = json.loads(line)
            if not {"question", "answer"} <= row.keys() or "####" not in row["answer"]:
                raise EvalError(f"{f}:{n}: expected question and answer ending '#### N'")
    task_dir.mkdir(parents=True, exist_ok=True)
    yaml_text = "\n".join(
        [
            f"include: {json.dumps(str(_gsm8k_yaml()))}",
            f"task: {LOCAL_TASK}",
            "tag: []",
            "dataset_path: json",
            "dataset_name: null",
            "dataset_kwargs:",
            "  data_files:",
            f"    train: {json.dumps(str((data_dir / 'train.jsonl').resolve()))}",
            f"    test: {json.dumps(str((data_dir / 'test.jsonl').resolve()))}",
            "",
        ]
    )
    (task_dir / f"{LOCAL_TASK}.yaml").write_text(yaml_text)
    return LOCAL_TASK


def lm_eval_argv(cfg: EvalConfig, task: str, include: Path | None, out: Path) -> list[str]:
    model_args = ",".join(
        [
            f"model={cfg.model}",
            f"base_url={cfg.url.rstrip('/')}/v1/completions",
            f"num_concurrent={cfg.num_concurrent}",
            "max_retries=3",
            "tokenizer_backend=none",
            "tokenized_requests=False",
            f"max_gen_toks={cfg.max_gen_toks}",
        ]
    )
    argv = [
        *cfg.lm_eval_cmd,
        "run",
        "--model",
        "local-completions",
        "--model_args",
        model_args,
        "--tasks",
        task,
        "--num_fewshot",
        str(cfg.num_fewshot),
        "--batch_size",
        "1",
        "--output_path",
        str(out),
        "--seed",
        "0",
    ]
    if include is not None:
        argv += ["--include_path", str(include)]
    if cfg.limit is not None:
        argv += ["--limit", str(cfg.limit)]
    return argv


def _newest_results(out: Path, since: float) -> Path:
    found = [p for p in out.rglob("results_*.json") if p.stat().st_mtime >= since - 1]
    if not found:
        raise EvalError(f"{out}: lm-eval wrote no results_*.json")
    return max(found, key=lambda p: p.stat().st_mtime)


def evaluate(cfg: EvalConfig) -> dict:
    """Run lm-eval; return the summary (also written to ``out_dir/eval.json``)."""
    with client(cfg.url, cfg.api_key, timeout=60) as http:
        cfg.model = resolve_model(http, cfg.model)
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    task, include = cfg.task, None
    if cfg.local_task is not None:
        include = cfg.out_dir / "tasks"
        task = write_local_task(cfg.local_task, include)
    env = dict(os.environ)
    env["OPENAI_API_KEY"] = cfg.api_key or ""
    if cfg.local_task is not None:
        env.setdefault("HF_DATASETS_OFFLINE", "1")
        env.setdefault("HF_HUB_OFFLINE", "1")
    argv = lm_eval_argv(cfg, task, include, cfg.out_dir / "lm_eval")
    log = cfg.out_dir / "lm_eval.log"
    t0 = time.time()
    with open(log, "wb") as f:
        proc = subprocess.run(
            argv, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=cfg.timeout_s, check=False
        )
    if proc.returncode != 0:
        tail = "\n".join(log.read_text("utf-8", "replace").splitlines()[-15:])
        raise EvalError(f"lm-eval exited with {proc.returncode}; log {log}:\n{tail}")
    results_file = _newest_results(cfg.out_dir / "lm_eval", t0)
    results = json.loads(results_file.read_text())
    metrics = results["results"][task]
    n = (results.get("n-samples") or {}).get(task, {}).get("effective")
    summary = {
        "url": cfg.url,
        "model": cfg.model,
        "task": task,
        "num_fewshot": cfg.num_fewshot,
        "samples": n,
        "strict_match": metrics.get(STRICT),
        "flexible_extract": metrics.get(FLEXIBLE),
        "stderr_strict": metrics.get("exact_match_stderr,strict-match"),
        "anchors": ANCHORS,
        "min_score": cfg.min_score,
        "passed": None if cfg.min_score is None else metrics.get(STRICT, 0.0) >= cfg.min_score,
        "seconds": round(time.time() - t0, 1),
        "lm_eval_results": str(results_file),
        "command": argv,
    }
    out = cfg.out_dir / "eval.json"
    tmp = out.with_name(".eval.json.tmp")
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    os.replace(tmp, out)
    summary["json"] = str(out)
    return summary


def format_summary(s: dict) -> str:
    lines = [
        f"{s['task']} {s['num_fewshot']}-shot on {s['model']} ({s['samples']} questions): "
        f"strict-match {s['strict_match']:.4f}, flexible-extract {s['flexible_extract']:.4f}",
    ]
    lines += [f"  anchor {name}: {value:.3f}" for name, value in s["anchors"].items()]
    if s["min_score"] is not None:
        verdict = "PASS" if s["passed"] else "FAIL"
        lines.append(f"  threshold {s['min_score']:.3f}: {verdict}")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default=DEFAULT_URL)
    p.add_argument("--model", default=None, help="served model (default: first listed)")
    p.add_argument("--api-key", default=None, help="default: $VLLM_API_KEY")
    p.add_argument("--task", default="gsm8k", help="lm-eval task (gsm8k)")
    p.add_argument("--num-fewshot", type=int, default=8)
    p.add_argument("--num-concurrent", type=int, default=32, help="parallel requests (32)")
    p.add_argument("--max-gen-toks", type=int, default=256)
    p.add_argument("--limit", type=int, default=None, help="only the first N questions")
    p.add_argument(
        "--local-task",
        type=Path,
        default=None,
        help="dir with train.jsonl/test.jsonl in GSM8K format (offline)",
    )
    p.add_argument("--min-score", type=float, default=None, help="fail below this strict-match")
    p.add_argument("--out-dir", type=Path, default=Path("reports/eval"))


def config_from_args(args: argparse.Namespace) -> EvalConfig:
    return EvalConfig(
        url=args.url,
        model=args.model,
        api_key=api_key_from_env(args.api_key),
        task=args.task,
        num_fewshot=args.num_fewshot,
        num_concurrent=args.num_concurrent,
        max_gen_toks=args.max_gen_toks,
        limit=args.limit,
        local_task=args.local_task,
        out_dir=args.out_dir,
        min_score=args.min_score,
    )


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "eval", help="GSM8K 8-shot with lm-eval against the server", description=__doc__
    )
    add_arguments(p)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    try:
        summary = evaluate(config_from_args(args))
    except httpx.HTTPError as err:
        print(f"eval: {describe(err)}", file=sys.stderr)
        return 1
    except (EvalError, RuntimeError, subprocess.TimeoutExpired) as err:
        print(f"eval: {err}", file=sys.stderr)
        return 1
    print(format_summary(summary))
    print(f"eval: {summary['json']}")
    return 0 if summary["passed"] in (None, True) else 1

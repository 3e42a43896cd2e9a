"""``dsv4-nvfp4 health live|ready``: the compose healthcheck, from the command line.

Why not a second implementation: the probe compose runs is
``healthcheck/healthcheck.py`` (standard library only, inside the image). This
subcommand loads that very file and runs it, so what a user checks by hand is
exactly what the orchestrator checks: the same overall deadline (``--timeout``,
for the whole probe), the same size cap, no redirects, the same one-line
messages and exit codes (0 healthy, 1 not, 2 unusable input).
"""

from __future__ import annotations

import argparse
import sys

from dsv4_nvfp4.serving.server import ServerError, healthcheck


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("probe", choices=["live", "ready"])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--model", default=None, help="served model name (default: first listed)")
    p.add_argument(
        "--timeout",
        default=None,
        help="deadline in seconds for the whole probe (live 5, ready 25); checked by the probe",
    )
    p.add_argument("--api-key", default=None, help="default: $VLLM_API_KEY")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "health", help="liveness / readiness probe (exit 0 healthy, 1 not)", description=__doc__
    )
    add_arguments(p)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    argv = [args.probe, "--url", args.url]
    if args.model:
        argv += ["--model", args.model]
    if args.timeout is not None:
        argv.append(f"--timeout={args.timeout}")
    if args.api_key:
        argv += ["--api-key", args.api_key]
    try:
        return int(healthcheck().main(argv, prog="dsv4-nvfp4 health"))
    except ServerError as err:
        print(f"health: {err}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dsv4-nvfp4 health", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

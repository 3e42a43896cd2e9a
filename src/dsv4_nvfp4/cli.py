"""``dsv4-nvfp4``: one command line for the checkpoint toolkit, serving checks and deployment.

Each subcommand lives in its own module exposing ``add_parser(subparsers)`` and
``run(args) -> int``; this is the only ``main``, reached as the ``dsv4-nvfp4``
console script or ``python -m dsv4_nvfp4``. Only the module of the subcommand asked for is imported,
so ``dsv4-nvfp4 smoke`` never loads torch and ``dsv4-nvfp4 verify`` never loads
vLLM.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import NoReturn

# name -> module; the order is the order of `dsv4-nvfp4 --help`
COMMANDS: dict[str, str] = {
    "inspect": "dsv4_nvfp4.checkpoint.inspect",
    "verify": "dsv4_nvfp4.checkpoint.verify",
    "convert": "dsv4_nvfp4.checkpoint.convert",
    "tiny": "dsv4_nvfp4.checkpoint.tiny",
    "lock": "dsv4_nvfp4.checkpoint.lock",
    "quantize": "dsv4_nvfp4.quantize.command",
    "serve": "dsv4_nvfp4.launch.serve",
    "health": "dsv4_nvfp4.serving.probe",
    "smoke": "dsv4_nvfp4.serving.smoke",
    "bench": "dsv4_nvfp4.serving.bench",
    "eval": "dsv4_nvfp4.serving.eval",
    "acceptance": "dsv4_nvfp4.serving.acceptance",
    "canary": "dsv4_nvfp4.serving.canary",
    "demo": "dsv4_nvfp4.launch.demo",
    "doctor": "dsv4_nvfp4.deploy.doctor",
    "preflight": "dsv4_nvfp4.deploy.preflight",
}


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (exit 2), not the usage text.

    Every subcommand's parser is of this class too (argparse gives subparsers
    their parent's class), so bad input anywhere gets one clear line.
    """

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {' '.join(message.split())}\n")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="dsv4-nvfp4",
        description="DeepSeek V4 Pro with NVFP4 experts on vLLM: checkpoints, serving, checks.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module in COMMANDS.items():
        if only is not None and name != only:
            continue
        importlib.import_module(module).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    only = argv[0] if argv and argv[0] in COMMANDS else None
    args = build_parser(only).parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

"""Run one subcommand module on its own: ``python -m dsv4_nvfp4.checkpoint.<module> ...``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable


def standalone(add_parser: Callable[[argparse._SubParsersAction], argparse.ArgumentParser],
               argv: list[str] | None = None) -> int:
    """Build a parser holding just this subcommand and dispatch to its ``run``."""
    parser = argparse.ArgumentParser(prog="dsv4-nvfp4")
    sub = parser.add_subparsers(dest="command", required=True)
    p = add_parser(sub)
    args = parser.parse_args([p.prog.split()[-1], *(sys.argv[1:] if argv is None else argv)])
    return int(args.func(args))

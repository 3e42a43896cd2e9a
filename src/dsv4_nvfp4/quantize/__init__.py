"""``dsv4-nvfp4 quantize``: calibrate a BF16 DeepSeek V4 with NVIDIA ModelOpt into NVFP4.

Only :mod:`.command` is imported here; torch-heavy modules (ModelOpt,
transformers) load when the subcommand runs, so ``dsv4-nvfp4 --help`` stays
fast and works without them.
"""

from .command import add_parser, run

__all__ = ["add_parser", "run"]

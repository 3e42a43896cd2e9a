"""Tile shapes for the staging kernel. Results never depend on them (tests check several).

On the GPU a program handles a few thousand elements with 16-byte loads; in
Triton's CPU interpreter (CPU tensors) every program instance costs
milliseconds of Python, so there the tiles are made much larger.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TileConfig:
    """``rows`` tokens × ``block`` columns per program.

    ``whole_row``: hold each program's rows in registers as ``H / block`` tiles when
    they fit (:func:`row_fits`), so the input is read once; ``False`` forces the
    two-pass kernel (row amax, then quantize, the second pass reading from L2), the
    path for rows too long for registers.

    ``programs_per_sm`` (vLLM-compatible MegaMoE staging only): 0 launches one program per
    tile; n > 0 a persistent grid of n programs per multiprocessor looping over the tiles,
    whose loads Triton software-pipelines ``stages`` deep (1: not at all). ``max_registers``
    (the same kernel, GPU only): a per-thread register cap (Triton's ``maxnreg``), 0 for none.
    """

    rows: int
    block: int
    num_warps: int = 4
    whole_row: bool = True
    programs_per_sm: int = 0
    stages: int = 1
    max_registers: int = 0


def _pow2(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def check_tile(cfg: TileConfig, length: int, min_block: int) -> TileConfig:
    """A tile override must be powers of two with ``block`` dividing the row length."""
    from dsv4_nvfp4.formats.errors import expect

    expect(_pow2(cfg.rows) and _pow2(cfg.block) and _pow2(cfg.num_warps), "config",
           "powers of two for rows, block and num_warps", cfg)
    expect(cfg.block >= min_block and length % cfg.block == 0, "config",
           f"block >= {min_block} dividing the row length {length}", cfg)
    return cfg


def pow2_divisor(n: int, cap: int) -> int:
    """Largest power of two that divides ``n`` (n > 0), at most ``cap``."""
    return min(n & -n, cap)


# GPU defaults: the fastest tiles of benchmarks/kernels_bench.py on an H100 (docs/kernels.md).
GPU_STAGING_BLOCK = 1024
GPU_PER_TOKEN_ROWS = 1
# Whole-row per-token kernel: at most this many tiles per row and int32 words per thread
# (two bf16 each), so that a row stays in registers without spilling (56 words of a 7168 row
# take 152 registers with 2 warps, compiled for sm_90, no spills).
MAX_ROW_CHUNKS = 16
GPU_ROW_WORDS_PER_THREAD = 64
# Interpreter: few, large programs.
CPU_TILE_ELEMS = 1 << 16


def staging_tile(hidden: int, *, device: torch.device) -> TileConfig:
    """Tile for the staging kernel; ``hidden % 64 == 0`` so ``block`` divides it and is >= 64."""
    if device.type == "cpu":  # Triton's interpreter
        block = pow2_divisor(hidden, 8192)
        return TileConfig(rows=max(1, CPU_TILE_ELEMS // block), block=block)
    block = pow2_divisor(hidden, GPU_STAGING_BLOCK)
    # keep small-H tiles large enough
    rows = max(GPU_PER_TOKEN_ROWS, GPU_STAGING_BLOCK * GPU_PER_TOKEN_ROWS // block)
    # One whole block-16 group (8 words) per thread and tile: the group amax and the codes
    # need no shuffles. More warps only when the row would not fit in registers.
    warps = max(1, rows * block // 16 // 32)
    while warps <= 16:
        cfg = TileConfig(rows=rows, block=block, num_warps=warps)
        if row_fits(cfg, hidden, device):
            return cfg
        warps *= 2
    return TileConfig(rows=rows, block=block)


def row_fits(cfg: TileConfig, hidden: int, device: torch.device) -> bool:
    """Whether the per-token kernel can hold ``cfg.rows`` rows of ``hidden`` in registers.

    At most :data:`MAX_ROW_CHUNKS` tiles (the kernel unrolls over them) and, on the
    GPU, :data:`GPU_ROW_WORDS_PER_THREAD` input words per thread; the interpreter
    has no register file, so there only the tile count matters.
    """
    if not cfg.whole_row or hidden // cfg.block > MAX_ROW_CHUNKS:
        return False
    words_per_thread = cfg.rows * hidden // 2 // (32 * cfg.num_warps)
    return device.type == "cpu" or words_per_thread <= GPU_ROW_WORDS_PER_THREAD


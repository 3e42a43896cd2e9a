"""``dsv4-nvfp4 convert SRC DST --to nvidia-nvfp4|bf16``: streaming, resumable conversion.

Directions:

* C → B (``--to nvidia-nvfp4``): routed experts byte-identical (gate/up/down →
  w1/w3/w2); dense linears requantized to FP8 128×128 with UE8M0 scales
  (``--dense fp8``) or dequantized to BF16 and listed in ``ignored_layers``
  (``--dense bf16``) — from NVFP4, or from BF16 where the export excluded
  them (``quantize --recipe experts``); ``o_a_proj`` (BF16 in C) → FP8 ``wo_a``;
  compressor and indexer projections → BF16; everything else renamed. ``--mtp-from NATIVE``
  grafts ``mtp.*`` byte-identical from a layout-A (or B) checkpoint; without it
  ``num_nextn_predict_layers`` is set to 0, loudly.
* A → B: the lossless MXFP4 → NVFP4 cast of the routed experts (w1 and w3 of
  an expert share ``weight_scale_2``), everything else byte-identical;
  ``input_scale`` taken from ``--input-scales-from`` a layout-B checkpoint.
* any → ``bf16``: every quantized tensor dequantized, DeepSeek names.

How it runs: plan every output tensor from the input headers and validate every
input before writing anything (:mod:`.convert_plan`); take the destination's
lock and see what an earlier run of the same plan left there
(:mod:`.convert_state`); then write shard by shard, resumable after a kill, and
last ``manifest.json``, whose presence means complete (:mod:`.convert_exec`).
SRC is never written to; its code and pickles (``*.py``, ``*.bin``, ``*.pkl``,
...) and any ``auto_map`` are not carried over. This module is the command line.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
from pathlib import Path

from dsv4_nvfp4.formats import FormatError

from .convert_exec import execute
from .convert_plan import REPORT, Target, describe, plan
from .convert_state import check_dst, load_json
from .errors import CheckpointError, fail
from .layouts import Layout
from .transforms import DenseMode


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("convert", help="convert a checkpoint to layout B or BF16",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("src", type=Path)
    p.add_argument("dst", type=Path)
    p.add_argument("--to", required=True, type=Target, choices=list(Target),
                   metavar="{nvidia-nvfp4,bf16}")
    p.add_argument("--dense", type=DenseMode, choices=list(DenseMode), default=DenseMode.FP8,
                   metavar="{fp8,bf16}", help="C -> B: dense linears FP8 (default) or BF16")
    p.add_argument("--mtp-from", type=Path, metavar="NATIVE",
                   help="C: graft mtp.* byte-identical from this layout A checkpoint")
    p.add_argument("--input-scales-from", type=Path, metavar="B_CHECKPOINT",
                   help="A -> B: take each expert's input_scale from this layout B checkpoint")
    p.add_argument("--dry-run", action="store_true", help="print the plan, write nothing")
    p.add_argument("--no-fsync", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(func=run)
    return p


def _os_error_line(e: OSError, dst: Path) -> str:
    """One line for an OSError: the destination file when writing failed (shutil names the
    source of a copy in ``filename`` and the destination in ``filename2``)."""
    what = e.strerror or str(e)
    if e.filename2:
        return f"{e.filename2}: expected a writable destination, found {what}"
    if e.filename:
        f = Path(os.fsdecode(e.filename))
        inside = f.resolve() == dst.resolve() or dst.resolve() in f.resolve().parents
        if not inside and e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
            return f"{f}: expected a readable file, found {what}"
        if inside:
            return f"{f}: expected a writable destination, found {what}"
    return f"{dst}: expected a writable destination, found {what}"


def run(args: argparse.Namespace) -> int:
    try:
        check_dst(args.src, args.dst)
        pl = plan(args.src, args.to, args.dense, args.mtp_from, args.input_scales_from)
        for w in pl.warnings:
            print(w, file=sys.stderr)
        if args.dry_run:
            print(describe(pl))
            return 0
        status = execute(pl, args.dst, progress=sys.stderr.isatty(), fsync=not args.no_fsync)
    except (CheckpointError, FormatError) as e:
        return fail(str(e))
    except OSError as e:
        return fail(_os_error_line(e, args.dst))
    if status == "done":
        print(f"{args.dst}: already complete (manifest matches this conversion and its "
              "sources)")
        return 0
    rep = load_json(args.dst / REPORT) or {}
    worst = rep.get("worst_tensor")
    print(f"wrote {args.dst} ({Layout.B.title if args.to is Target.NVFP4 else 'BF16'})")
    if worst:
        e = rep["tensors"][worst]
        if e["max_rel"] is None or e["rel_l2"] is None:
            err = "relative error undefined (its exact dequantization is all zero)"
        else:
            err = f"max_rel {e['max_rel']:.4f}, rel_l2 {e['rel_l2']:.4f}"
        print(f"  {len(rep['tensors'])} tensors requantized; worst {worst}: {err} "
              f"(all in {REPORT})")
    if rep.get("lossy_mxfp4_blocks"):
        print(f"  lossless cast: {rep['lossy_mxfp4_blocks']} MXFP4 blocks were below the "
              "E4M3 range and requantized")
    for d in rep.get("dropped") or []:
        print(f"  dropped from SRC: {d}")
    return 0

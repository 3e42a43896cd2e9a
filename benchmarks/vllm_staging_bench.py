"""Bandwidth of vLLM 0.34.0's NVFP4 MegaMoE staging kernel, ours, and a copy of the same bytes.

Side by side in one process, for each token count T at DeepSeek V4 Pro's hidden
size (H = 7168, top-k 6):

* ``vllm``: ``prepare_megamoe_nvfp4_inputs`` from the pinned wheel's
  ``prepare_megamoe.py`` (``tests/gpu/vllm_staging.py`` loads it from
  ``.cache/``; fetch it with ``scripts/fetch_vllm_source.py``), as
  ``DeepGemmMegaMoEExperts.forward`` calls it for a layer without EPLB, padding
  mask or fused shared expert: with ``w2_global_scale`` and ``l2_alpha`` of 48 local
  experts;
* ``compat``: ``dsv4_nvfp4.kernels.stage_megamoe_nvfp4_inputs``, our drop-in for
  vLLM's function (the same arguments, byte-identical outputs), called exactly as
  ``vllm``;
* ``ours``: ``dsv4_nvfp4.kernels.stage_nvfp4_activations_per_token`` (``formats``'
  per-token arithmetic, activations only);
* ``copy``: ``dst.copy_(src)`` moving the same number of bytes (half read, half
  written).

Bytes are the activation staging's: the bf16 input read once and the packed
E2M1 codes, E4M3 scale words and fp32 token scales written once,
``T * (2H + H/2 + H/16 + 4)``, the same for every kernel. ``vllm`` and ``compat``
also copy the top-k routing (``T * 6 * (4 + 4)`` bytes read, ``T * 6 * (8 + 4)``
written, 0.65 % more); their GB/s columns do not count them. The copy moves the same
total (read plus written) but half and half, where the staging reads 78 % of its bytes:
a ratio to the copy compares equal byte counts, not equal read/write mixes.

``--sweep``: also times ``compat`` with each tile of ``SWEEP_TILES`` at every T (the
source of ``kernels.megamoe_staging.GPU_MEGAMOE_TILES``; ``r1w2m96p8s1``: 1 row, 2 warps,
a 96-register cap, a persistent grid of 8 programs per multiprocessor, no pipelining),
the split launch up to 256 tokens, and records how many of the random rows compat stages
on its quick path (``compat_quick_rows``; the others take its two-division path).
``--compile-only SHARD SHARDS``: launch each variant once and exit; several such
processes in parallel warm Triton's cache before the timed run.

GPU time: CUDA-graph replays of ``--reps`` back-to-back launches, events around
each replay, median of ``--iters`` replays (``kernels_bench.graph_ms``); the three
are measured in turn, ``--rounds`` times, and the median round is kept. Twice:
``hot``, every launch on the same buffers (below about 2048 tokens inputs and
outputs then stay in the 60 MB L2 between launches, and the copy runs faster
than HBM), and ``rotating``, launches cycling through enough buffer sets that one
replay touches at least four times the L2 (at most one set per launch, so the
smallest T stays L2-resident either way).

Usage (GPU machine, repo root): ``PYTHONPATH=src python3 benchmarks/vllm_staging_bench.py
--sweep --out benchmarks/results/megamoe_staging_h200.json``
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import triton

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "gpu"))

import vllm_staging  # noqa: E402
from kernels_bench import graph_ms  # noqa: E402

from dsv4_nvfp4.kernels import (  # noqa: E402
    TileConfig,
    stage_megamoe_nvfp4_inputs,
    stage_nvfp4_activations_per_token,
)
from dsv4_nvfp4.kernels.megamoe_staging import megamoe_tile, quick_rows  # noqa: E402

HIDDEN = 7168
TOP_K = 6
TOKENS = [1, 16, 64, 256, 512, 2048, 4096, 8192, 16384]
NUM_LOCAL_EXPERTS = 48
SWEEP_TILES = [TileConfig(rows=r, block=1024, num_warps=w, programs_per_sm=p, max_registers=m)
               for r, w, p, m in ((1, 2, 0, 0), (1, 2, 0, 96), (1, 2, 0, 80), (1, 4, 0, 0),
                                  (2, 4, 0, 0), (1, 2, 8, 96))]


def tile_name(cfg: TileConfig) -> str:
    name = f"r{cfg.rows}w{cfg.num_warps}"
    if cfg.max_registers:
        name += f"m{cfg.max_registers}"
    if cfg.programs_per_sm:
        name += f"p{cfg.programs_per_sm}s{cfg.stages}"
    return name


def activation_bytes(t: int, h: int) -> int:
    return t * (2 * h + h // 2 + h // 16 + 4)


def routing_bytes(t: int, k: int) -> int:
    return t * k * (4 + 4 + 8 + 4)


def vllm_launch(t: int, h: int) -> str:
    """The grid and tile ``prepare_megamoe_nvfp4_inputs`` picks (read from its source)."""
    block_h = triton.next_power_of_2(h)
    if t <= 512:
        block_k = min(1024, block_h)
        return f"grid ({t}, {triton.cdiv(h, block_k)}), BLOCK_K {block_k}"
    return f"grid ({t}, 1), BLOCK_K {min(2048, block_h)}"


def machine() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                              "--format=csv,noheader"], capture_output=True, text=True,
                             check=True).stdout.strip().splitlines()
        return out[0]
    except (OSError, subprocess.CalledProcessError):
        return torch.cuda.get_device_name()


def buffer_sets(t: int, h: int, n: int) -> list[dict[str, torch.Tensor]]:
    """``n`` independent sets of inputs and outputs (random bf16 rows, top-k routing)."""
    g = torch.Generator(device="cuda").manual_seed(t)
    nbytes = activation_bytes(t, h)
    sets = []
    for _ in range(n):
        x = (torch.randn(t, h, generator=g, device="cuda")
             * torch.exp(torch.randn(t, 1, generator=g, device="cuda"))).to(torch.bfloat16)
        sets.append({
            "x": x,
            "ids": torch.randint(0, 384, (t, TOP_K), generator=g, device="cuda",
                                 dtype=torch.int32),
            "w": torch.rand(t, TOP_K, generator=g, device="cuda"),
            "vllm_out": (torch.empty(t, h // 2, dtype=torch.uint8, device="cuda"),
                         torch.empty(t, h // 64, dtype=torch.int32, device="cuda"),
                         torch.empty(t, dtype=torch.float32, device="cuda"),
                         torch.empty(t, TOP_K, dtype=torch.int64, device="cuda"),
                         torch.empty(t, TOP_K, dtype=torch.float32, device="cuda")),
            "compat_out": (torch.empty(t, h // 2, dtype=torch.uint8, device="cuda"),
                           torch.empty(t, h // 64, dtype=torch.int32, device="cuda"),
                           torch.empty(t, dtype=torch.float32, device="cuda"),
                           torch.empty(t, TOP_K, dtype=torch.int64, device="cuda"),
                           torch.empty(t, TOP_K, dtype=torch.float32, device="cuda")),
            "w2gs": torch.rand(NUM_LOCAL_EXPERTS, generator=g, device="cuda"),
            "l2a": torch.empty(NUM_LOCAL_EXPERTS, device="cuda"),
            "l2a_c": torch.empty(NUM_LOCAL_EXPERTS, device="cuda"),
            "ours_out": (torch.empty(t, h // 2, dtype=torch.uint8, device="cuda"),
                         torch.empty(t, h // 64, dtype=torch.int32, device="cuda"),
                         torch.empty(t, dtype=torch.float32, device="cuda")),
            "src": torch.randint(0, 255, (nbytes // 2,), dtype=torch.uint8, device="cuda"),
            "dst": torch.empty(nbytes // 2, dtype=torch.uint8, device="cuda"),
        })
    return sets


def cycling(sets: list[dict[str, torch.Tensor]], call) -> Callable[[], object]:
    """A launch that uses the next buffer set each time it is called (also while captured)."""
    order = itertools.cycle(sets)
    return lambda: call(next(order))


def _vllm_call(b: dict) -> None:
    vllm_staging.load().prepare_megamoe_nvfp4_inputs(
        b["x"], b["w"], b["ids"], *b["vllm_out"], w2_global_scale=b["w2gs"], l2_alpha=b["l2a"],
        l2_activation_scale=0.5)


def _compat_call(b: dict, cfg: TileConfig | None = None, split: bool | None = None) -> None:
    stage_megamoe_nvfp4_inputs(b["x"], b["w"], b["ids"], *b["compat_out"],
                               w2_global_scale=b["w2gs"], l2_alpha=b["l2a_c"],
                               l2_activation_scale=0.5, config=cfg, split=split)


def compile_jobs(t: int, h: int, sweep: bool) -> list[Callable[[], object]]:
    """One call of each kernel variant :func:`measure` launches at ``t`` tokens (Triton
    specializes on ``t`` only by ``t == 1`` and divisibility by 16; compat's tile by the
    ``GPU_MEGAMOE_TILES`` bounds)."""
    b = buffer_sets(t, h, 1)[0]
    jobs = [lambda: _vllm_call(b), lambda: _compat_call(b),
            lambda: stage_nvfp4_activations_per_token(b["x"], *b["ours_out"])]
    if sweep:
        jobs += [lambda c=cfg: _compat_call(b, c, False) for cfg in SWEEP_TILES]
        jobs += [lambda w=w: _compat_call(b, TileConfig(rows=1, block=1024, num_warps=w), True)
                 for w in (4, 8)]
    return jobs


def measure(t: int, h: int, iters: int, reps: int, rounds: int, l2_bytes: int,
            sweep: bool = False) -> dict:
    """Each kernel timed on one buffer set (``hot``: inputs and outputs stay in L2 when they
    fit) and cycling through enough sets that one graph replay touches at least 4x the L2
    (``rotating``, at most ``reps`` sets)."""
    nbytes = activation_bytes(t, h)
    n_rot = min(reps, max(1, math.ceil(4 * l2_bytes / nbytes)))
    dev = torch.device("cuda")
    out: dict = {"T": t, "H": h, "bytes": nbytes, "vllm_routing_bytes": routing_bytes(t, TOP_K),
                 "vllm_launch": vllm_launch(t, h),
                 "compat_tile": str(megamoe_tile(t, h, device=dev)),
                 "rotating_sets": n_rot, "rotating_working_set_bytes": nbytes * n_rot}
    if sweep:  # how the test data splits over compat's paths
        x = buffer_sets(t, h, 1)[0]["x"]
        out["compat_quick_rows"] = int(quick_rows(x).sum())
    for mode, n in (("hot", 1), ("rotating", n_rot)):
        sets = buffer_sets(t, h, n)
        fns = {
            "copy": cycling(sets, lambda b: b["dst"].copy_(b["src"])),
            "vllm": cycling(sets, _vllm_call),
            "compat": cycling(sets, _compat_call),
            "ours": cycling(sets, lambda b: stage_nvfp4_activations_per_token(
                b["x"], *b["ours_out"])),
        }
        if sweep and mode == "rotating":
            for cfg in SWEEP_TILES:
                fns[f"compat {tile_name(cfg)}"] = cycling(
                    sets, lambda b, c=cfg: _compat_call(b, c, False))
            if t <= 256:
                for w in (4, 8):
                    cfg = TileConfig(rows=1, block=1024, num_warps=w)
                    fns[f"compat split-w{w}"] = cycling(
                        sets, lambda b, c=cfg: _compat_call(b, c, True))
        ms: dict[str, list[float]] = {k: [] for k in fns}
        for _ in range(rounds):
            for k, fn in fns.items():
                ms[k].append(graph_ms(fn, iters, reps))
        med = {k: statistics.median(v) for k, v in ms.items()}
        copy_bytes = 2 * sets[0]["src"].numel()
        gbps = {k: nbytes / v / 1e6 for k, v in med.items()}
        gbps["copy"] = copy_bytes / med["copy"] / 1e6
        out[mode] = {"median_ms": med, "rounds_ms": ms, "GB/s": gbps, "copy_bytes": copy_bytes,
                     "ratio_to_copy": {k: v / gbps["copy"] for k, v in gbps.items()},
                     "ratio_vllm_to_copy": gbps["vllm"] / gbps["copy"],
                     "ratio_compat_to_copy": gbps["compat"] / gbps["copy"],
                     "ratio_ours_to_copy": gbps["ours"] / gbps["copy"],
                     "vllm_time_over_compat": med["vllm"] / med["compat"],
                     "vllm_time_over_ours": med["vllm"] / med["ours"]}
        del sets, fns
        torch.cuda.empty_cache()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=TOKENS)
    ap.add_argument("--hidden", type=int, default=HIDDEN)
    ap.add_argument("--iters", type=int, default=30, help="timed graph replays (median)")
    ap.add_argument("--reps", type=int, default=20, help="launches per graph")
    ap.add_argument("--rounds", type=int, default=3, help="copy/vllm/ours rounds (median)")
    ap.add_argument("--sweep", action="store_true", help="also time compat's tiles")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--compile-only", type=int, nargs=2, metavar=("SHARD", "SHARDS"),
                    help="only compile (launch once) this shard of the kernels, then exit: run "
                    "the shards in parallel processes first, the timed run then finds Triton's "
                    "cache warm")
    a = ap.parse_args()
    vllm_staging.load()
    if a.compile_only:
        shard, shards = a.compile_only
        reps = {1 if t == 1 else 16 if t <= 32 else 64 if t <= 64 else 256 for t in a.tokens}
        jobs = [fn for t in sorted(reps) for fn in compile_jobs(t, a.hidden, a.sweep)]
        for fn in jobs[shard::shards]:
            fn()
        torch.cuda.synchronize()
        return 0
    props = torch.cuda.get_device_properties(0)
    l2 = int(getattr(props, "L2_cache_size", 0)) or 60 * 2**20
    results = [measure(t, a.hidden, a.iters, a.reps, a.rounds, l2, a.sweep) for t in a.tokens]
    info = {"machine": machine(), "device": torch.cuda.get_device_name(),
            "torch": torch.__version__, "triton": triton.__version__,
            "cuda": torch.version.cuda, "l2_bytes": l2,
            "vllm_source": f"vllm {vllm_staging.VLLM_VERSION} "
            "wheel, vllm/model_executor/layers/fused_moe/prepare_megamoe.py",
            "method": f"median of {a.rounds} rounds of (median of {a.iters} CUDA-graph "
            f"replays of {a.reps} launches) per kernel; bytes = T*(2H + H/2 + H/16 + 4); "
            "hot: one buffer set; rotating: launches cycle through buffer sets so that one "
            "replay touches >= 4x the L2 (at most one set per launch)",
            "results": results}
    print(f"{info['machine']}; torch {info['torch']}; triton {info['triton']}; L2 {l2 >> 20} MiB")
    print(f"{'T':>6} {'mode':>8} {'sets':>4} {'copy GB/s':>10} {'vllm':>7} {'compat':>7} "
          f"{'ours':>7} {'vllm ms':>9} {'compat ms':>9} {'ours ms':>9}  (kernel/copy ratios)")
    for r in results:
        for mode in ("hot", "rotating"):
            m = r[mode]
            q = m["ratio_to_copy"]
            sets = 1 if mode == "hot" else r["rotating_sets"]
            print(f"{r['T']:>6} {mode:>8} {sets:>4} {m['GB/s']['copy']:10.1f} {q['vllm']:7.3f} "
                  f"{q['compat']:7.3f} {q['ours']:7.3f} {m['median_ms']['vllm']:9.4f} "
                  f"{m['median_ms']['compat']:9.4f} {m['median_ms']['ours']:9.4f}")
        tiles = {k: v for k, v in r["rotating"]["ratio_to_copy"].items()
                 if k.startswith("compat ")}
        if tiles:
            print("        sweep:", "  ".join(f"{k[7:]} {v:.3f}" for k, v in tiles.items()),
                  f"(default {r['compat_tile']})")
    if a.out:
        tmp = a.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(info, indent=1) + "\n")
        tmp.replace(a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

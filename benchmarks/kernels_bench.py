"""Bandwidth of the Triton staging kernel against a device-to-device copy of the same bytes.

For the kernel: the fewest bytes it must move (input read once, outputs
written once), its median GPU time, GB/s, and the GB/s of ``dst.copy_(src)``
moving the same number of bytes (half read, half written) measured the same
way in the same run; the ratio is the figure of merit.

GPU time is measured on CUDA-graph replays of ``--reps`` back-to-back
launches (events around each replay, median of ``--iters`` replays), so the
~20-40 us of Python/Triton launch overhead per call is not counted; serving
runs this kernel inside CUDA graphs too. The median of plain eager calls
(events around one call, host overhead included) is listed beside it. The
torch-eager reference from ``dsv4_nvfp4.formats`` (which synchronises with the
host) is timed eagerly.
Tile shapes are swept (results never depend on them; the GPU tests check);
the table lists the default tile and the best one.

Usage (on the GPU machine): ``PYTHONPATH=src python3 benchmarks/kernels_bench.py --out f.json``
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable
from pathlib import Path

import torch

from dsv4_nvfp4.formats import quantize_nvfp4_activation_per_token
from dsv4_nvfp4.kernels import TileConfig, stage_nvfp4_activations_per_token

# (rows, block, warps[, whole_row]): the whole-row kernel, and the two-pass one for comparison
PER_TOKEN_TILES = [(1, 1024, 2), (2, 1024, 4), (1, 1024, 4), (4, 1024, 8), (1, 512, 2),
                   (1, 1024, 4, False)]


def graph_ms(fn: Callable[[], object], iters: int, reps: int) -> float:
    """Median GPU time of one call, from CUDA-graph replays of ``reps`` calls."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop) / reps)
    return statistics.median(times)


def median_ms(fn: Callable[[], object], iters: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    return statistics.median(times)


def copy_gbps(nbytes: int, iters: int, reps: int) -> float:
    """Device-to-device copy moving ``nbytes`` in total (nbytes/2 read + nbytes/2 written)."""
    src = torch.randint(0, 255, (nbytes // 2,), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = graph_ms(lambda: dst.copy_(src), iters, reps)
    return 2 * src.numel() / ms / 1e6


def row(name: str, shape: str, nbytes: int, ms: float, copy: float, iters: int,
        tile: str = "", eager_ms: float | None = None) -> dict:
    gbps = nbytes / ms / 1e6
    return {"kernel": name, "shape": shape, "tile": tile, "bytes": nbytes, "median_ms": ms,
            "GB/s": gbps, "copy_GB/s": copy, "ratio": gbps / copy, "runs": iters,
            "eager_call_ms": eager_ms}


def sweep(name: str, shape: str, nbytes: int, copy: float, iters: int, reps: int,
          tiles: list[tuple], run: Callable[[TileConfig | None], object]) -> list:
    rows = [row(name, shape, nbytes, graph_ms(lambda: run(None), iters, reps), copy, iters,
                "default", median_ms(lambda: run(None), iters))]
    for tile in tiles:
        cfg = TileConfig(*tile)
        label = f"rows={cfg.rows} block={cfg.block} warps={cfg.num_warps}"
        rows.append(row(name, shape, nbytes, graph_ms(lambda c=cfg: run(c), iters, reps), copy,
                        iters, label + ("" if cfg.whole_row else " two-pass")))
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--hidden", type=int, default=7168)
    ap.add_argument("--iters", type=int, default=30, help="timed graph replays (median)")
    ap.add_argument("--reps", type=int, default=20, help="kernel launches per graph")
    ap.add_argument("--ref-iters", type=int, default=20)
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    t, h, iters = a.tokens, a.hidden, a.iters
    torch.manual_seed(0)
    results: list[dict] = []

    x = (torch.randn(t, h, device="cuda") * 3).to(torch.bfloat16)
    ox = torch.empty(t, h // 2, dtype=torch.uint8, device="cuda")
    osf = torch.empty(t, h // 64, dtype=torch.int32, device="cuda")
    pts = torch.empty(t, dtype=torch.float32, device="cuda")
    nbytes = t * h * 2 + t * h // 2 + t * h // 16 + t * 4
    shape = f"T={t} H={h}"
    copy = copy_gbps(nbytes, iters, a.reps)
    tiles = [] if a.no_sweep else PER_TOKEN_TILES
    results += sweep("stage per-token", shape, nbytes, copy, iters, a.reps, tiles,
                     lambda c: stage_nvfp4_activations_per_token(x, ox, osf, pts, config=c))
    results.append(row("torch formats per-token", shape, nbytes, median_ms(
        lambda: quantize_nvfp4_activation_per_token(x), a.ref_iters), copy, a.ref_iters))

    device = torch.cuda.get_device_name()
    print(f"device: {device}; torch {torch.__version__}; kernel and copy: median of {iters} "
          f"CUDA-graph replays of {a.reps} launches; torch reference: median of "
          f"{a.ref_iters} eager calls")
    print(f"{'kernel':26} {'shape':16} {'tile':26} {'ms':>8} {'GB/s':>8} {'copy':>8} {'ratio':>6}"
          f" {'eager ms':>9}")
    for r in results:
        eager = f"{r['eager_call_ms']:9.4f}" if r["eager_call_ms"] is not None else ""
        print(f"{r['kernel']:26} {r['shape']:16} {r['tile']:26} {r['median_ms']:8.4f} "
              f"{r['GB/s']:8.1f} {r['copy_GB/s']:8.1f} {r['ratio']:6.3f} {eager}")
    best = {}
    for r in results:
        if r["tile"] and (r["kernel"] not in best or r["ratio"] > best[r["kernel"]]["ratio"]):
            best[r["kernel"]] = r
    print("best tiles: " + "; ".join(f"{k}: {v['tile']} ({v['ratio']:.3f})"
                                     for k, v in best.items()))
    if a.out:
        tmp = a.out.with_suffix(".tmp")
        tmp.write_text(json.dumps({"device": device, "torch": torch.__version__,
                                   "results": results}, indent=1))
        tmp.replace(a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Load-time cost of serving layout C as is: the C → B stream on the CPU vs on the GPU.

When vLLM loads a layout-C directory through the plugin, every rank streams
every tensor through :class:`dsv4_nvfp4.checkpoint.c_stream.LayoutCStream`;
the routed experts are renamed bytes, the cost is re-encoding the dense
linears (NVFP4 → FP8 128x128) and the compressor/indexer projections
(NVFP4 → BF16). This builds the re-encoded modules of two DeepSeek V4 Pro
layers (one CSA layer with its indexer, one HCA layer; ``full`` recipe:
NVFP4 everywhere ModelOpt quantizes) in memory, and times the stream over
them on the CPU (torch's threads on this machine) and with ``device=cuda``
(the plugin's choice on NVIDIA), alternating, after a warm-up. It reports
the median, the range, NVFP4 input GB/s, the GPU/CPU speed-up measured side
by side, and the time extrapolated to V4 Pro's 61 layers (about 30 CSA + 31
HCA, per rank).

Usage (on the GPU machine): ``PYTHONPATH=src python3 benchmarks/c_stream_bench.py --out f.json``
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from convert_bench import PRO_SHAPES

from dsv4_nvfp4.checkpoint.c_stream import LayoutCStream
from dsv4_nvfp4.checkpoint.config import dims_from_config
from dsv4_nvfp4.checkpoint.layouts import Layout, LayoutContext, storage_for, stored_name
from dsv4_nvfp4.checkpoint.quant_config import c_quantization_config
from dsv4_nvfp4.checkpoint.schema import Role, Storage, expand, modules
from dsv4_nvfp4.checkpoint.tiny import c_exclude
from dsv4_nvfp4.checkpoint.tiny_bf16 import tiny_config

# V4 Pro's shapes as convert_bench.py uses them; two layers, few experts (renamed bytes)
SHAPES = {**PRO_SHAPES, "n_routed_experts": 8, "num_hidden_layers": 2,
          "compress_ratios": [4, 128]}
PRO_LAYERS = 61


def re_encoded_tensors(recipe: str) -> tuple[dict, list[tuple[str, torch.Tensor]], int]:
    """(config, [(layout-C name, tensor)] of the re-encoded modules, NVFP4/BF16 input bytes)."""
    cfg = tiny_config(mtp=False)
    cfg.update(SHAPES)
    cfg["quantization_config"] = c_quantization_config(c_exclude(2, recipe))
    ctx = LayoutContext(c_exclude=tuple(c_exclude(2, recipe)))
    gen = torch.Generator().manual_seed(0)
    items: list[tuple[str, torch.Tensor]] = []
    nbytes = 0
    for m in modules(dims_from_config(cfg), mtp=False):
        st = storage_for(Layout.C, m, ctx)
        if m.role is Role.EXPERT or (m.role is not Role.DENSE and st is not Storage.NVFP4):
            continue  # renamed bytes: free
        if m.role is Role.BF16_LINEAR and m.name.rsplit(".", 1)[-1] in ("gate", "embed", "head"):
            continue
        base = stored_name(Layout.C, m.name)
        for spec in expand(st, m, base):
            if spec.part == "weight" and st is Storage.NVFP4:
                t = torch.randint(0, 256, spec.shape, dtype=torch.uint8, generator=gen)
            elif spec.part == "weight_scale":  # finite positive E4M3 bytes
                t = torch.randint(0x30, 0x7F, spec.shape, dtype=torch.uint8,
                                  generator=gen).view(torch.float8_e4m3fn)
            elif spec.part in ("weight_scale_2", "input_scale"):
                t = torch.tensor(1e-3, dtype=torch.float32)
            else:  # BF16 weight
                t = (torch.randn(spec.shape, generator=gen) * 0.02).to(torch.bfloat16)
            items.append((spec.name, t))
            nbytes += t.numel() * t.element_size()
    return cfg, items, nbytes


def run_once(cfg: dict, items: list[tuple[str, torch.Tensor]], device: str | None) -> float:
    stream = LayoutCStream.from_config(cfg, None, [n for n, _ in items], device=device)
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in stream.convert(items):
        pass
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def h2d_seconds(items: list[tuple[str, torch.Tensor]]) -> float:
    """The floor of the GPU path: just copying the inputs to the GPU (pageable memory)."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    moved = [t.to("cuda") for _, t in items]
    torch.cuda.synchronize()
    del moved
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--recipe", choices=("full", "experts"), default="full")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    cfg, items, nbytes = re_encoded_tensors(args.recipe)
    devices: list[str | None] = [None] + (["cuda"] if torch.cuda.is_available() else [])
    times: dict[str, list[float]] = {str(d or "cpu"): [] for d in devices}
    for d in devices:  # warm-up (allocator, CUDA context, lazy tables)
        run_once(cfg, items, d)
    for r in range(args.rounds):
        for d in (devices if r % 2 == 0 else devices[::-1]):
            times[str(d or "cpu")].append(run_once(cfg, items, d))
    rows = {}
    for name, ts in times.items():
        med = statistics.median(ts)
        rows[name] = {"median_s": med, "min_s": min(ts), "max_s": max(ts),
                      "input_GBps": nbytes / med / 1e9,
                      "pro_61_layers_s": med * PRO_LAYERS / 2}
    result = {
        "machine": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu only",
        "cpu_threads": torch.get_num_threads(), "recipe": args.recipe,
        "layers": "2 (one CSA with indexer, one HCA), DeepSeek V4 Pro shapes",
        "modules_re_encoded": len({n.rsplit(".", 1)[0] for n, _ in items}),
        "input_GB": nbytes / 1e9, "rounds": args.rounds, "results": rows,
    }
    if "cuda" in rows:
        result["gpu_speedup_vs_cpu"] = rows["cpu"]["median_s"] / rows["cuda"]["median_s"]
        result["h2d_only_s"] = statistics.median(h2d_seconds(items) for _ in range(3))
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

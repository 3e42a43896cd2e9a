"""Benchmark ``convert`` C → B on a multi-GB synthetic layout-C checkpoint.

Compares the converter's throughput with a plain safetensors read + write of the
same shards (``load_file`` + ``save_file``, shard by shard) in the same run, and
reports each one's peak RSS (``wait4`` on its own process). Goals:
converter ≥ 0.8× the plain copy, RSS ≤ 2 GB + the largest tensor.

The synthetic checkpoint uses DeepSeek V4 Pro's shapes (hidden 7168,
moe_intermediate 3072, q_lora 1536, 128 heads × 512, o_groups 16 × 1024, 384
experts) for ``--layers`` layers (default 1, a CSA layer: the one with the most
dense tensors) and a 16k vocabulary: one Pro layer is 14.7 GB, of which the
dense linears that get requantized are ~2 %, as in the full model. Fewer
``--experts`` raise the dense share (harder for the converter). Values are
random bytes (valid E4M3 scales): the converter's speed does not depend on them.
``--recipe experts`` writes the dense linears BF16 and excluded, as
``quantize --recipe experts`` exports them (4x the dense bytes of ``full``).

    python benchmarks/convert_bench.py [--dir /tmp/dsv4_convert_bench] [--experts 64]
                                       [--recipe full|experts]

Everything is written under ``--dir`` and removed at the end (``--keep`` keeps it).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from dsv4_nvfp4.checkpoint.config import dims_from_config, to_transformers_config
from dsv4_nvfp4.checkpoint.layouts import Layout, LayoutContext, storage_for, stored_name
from dsv4_nvfp4.checkpoint.quant_config import c_hf_quant_config, c_quantization_config
from dsv4_nvfp4.checkpoint.reader import DTYPES, expected_nbytes
from dsv4_nvfp4.checkpoint.schema import expand, modules
from dsv4_nvfp4.checkpoint.tiny import c_exclude
from dsv4_nvfp4.checkpoint.tiny_bf16 import tiny_config
from dsv4_nvfp4.checkpoint.writer import ShardWriter

PRO_SHAPES = {
    "hidden_size": 7168, "moe_intermediate_size": 3072, "q_lora_rank": 1536,
    "num_attention_heads": 128, "head_dim": 512, "o_groups": 16, "o_lora_rank": 1024,
    "index_n_heads": 64, "index_head_dim": 128, "hc_mult": 4, "num_experts_per_tok": 6,
    "num_hash_layers": 0, "vocab_size": 16384, "num_nextn_predict_layers": 0,
}
SHARD_BYTES = 1 << 30
COPY = "plain copy (load_file + save_file)"
POOL = 1 << 26


def synth_config(n_layers: int, n_experts: int) -> dict:
    """Pro's shapes; layers alternate CSA (ratio 4, with indexer) and HCA (ratio 128)."""
    cfg = tiny_config(mtp=False)
    cfg.update(PRO_SHAPES, n_routed_experts=n_experts, num_hidden_layers=n_layers,
               compress_ratios=[4 if i % 2 == 0 else 128 for i in range(n_layers)])
    return cfg


def write_synthetic_c(root: Path, n_layers: int, n_experts: int, recipe: str = "full"
                      ) -> tuple[int, int]:
    """Write the checkpoint; returns (bytes, largest tensor bytes)."""
    root.mkdir(parents=True)
    cfg = synth_config(n_layers, n_experts)
    exclude = c_exclude(n_layers, recipe)
    ctx = LayoutContext(c_exclude=tuple(exclude))
    # every tensor layout C holds, by on-disk name, in module order
    entries = [(s.name, s.dtypes[0], s.shape)
               for m in modules(dims_from_config(cfg), mtp=False)
               if (base := stored_name(Layout.C, m.name)) is not None
               for s in expand(storage_for(Layout.C, m, ctx), m, base)]
    gen = torch.Generator().manual_seed(0)
    pool = torch.randint(0, 256, (POOL,), dtype=torch.uint8, generator=gen)
    scale_pool = torch.randint(0x30, 0x7F, (POOL,), dtype=torch.uint8, generator=gen)
    shards: list[list[tuple[str, str, tuple[int, ...]]]] = [[]]
    used = 0
    for ent in entries:
        n = expected_nbytes(ent[1], ent[2])
        if shards[-1] and used + n > SHARD_BYTES:
            shards.append([])
            used = 0
        shards[-1].append(ent)
        used += n
    files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map, total, largest = {}, 0, 0
    for fname, ents in zip(files, shards, strict=True):
        w = ShardWriter(root / fname, ents, {"format": "pt"}, fsync=False)
        for name, dt, shape in ents:
            nbytes = expected_nbytes(dt, shape)
            if dt == "F32":
                t = torch.full(shape, 1e-3, dtype=torch.float32)
            elif dt == "I64":
                t = torch.randint(0, cfg["n_routed_experts"], shape, generator=gen)
            else:
                src = scale_pool if name.endswith("weight_scale") else pool
                reps = -(-nbytes // POOL)
                raw = (src.repeat(reps) if reps > 1 else src)[:nbytes]
                if dt == "BF16":  # keep it finite: clear the exponent's top bit
                    raw = raw.clone()
                    raw[1::2] &= 0x3F
                t = raw.view(DTYPES[dt][0]).reshape(shape)
            w.write(name, t)
            total += nbytes
            largest = max(largest, nbytes)
        w.close()
        for name, _, _ in ents:
            weight_map[name] = fname
    (root / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}))
    c_cfg = to_transformers_config(cfg)
    c_cfg["num_nextn_predict_layers"] = 1
    c_cfg["quantization_config"] = c_quantization_config(exclude)
    (root / "config.json").write_text(json.dumps(c_cfg, indent=2))
    (root / "hf_quant_config.json").write_text(json.dumps(c_hf_quant_config(exclude)))
    return total, largest


_PLAIN_COPY = """
import sys
from pathlib import Path
from safetensors.torch import load_file, save_file
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
dst.mkdir()
for f in sorted(src.glob("*.safetensors")):
    save_file(load_file(f), dst / f.name, metadata={"format": "pt"})
"""


def timed(cmd: list[str]) -> tuple[float, int, str]:
    """(wall seconds, peak RSS bytes, stderr tail) of one child process."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, status, ru = os.wait4(p.pid, 0)
    dt = time.perf_counter() - t0
    err = p.stderr.read().decode() if p.stderr else ""
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        raise SystemExit(f"{cmd[:4]} failed ({p.returncode}): {err[-2000:]}")
    return dt, ru.ru_maxrss * 1024, err[-300:]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", type=Path, default=Path("/tmp/dsv4_convert_bench"))
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--experts", type=int, default=384, help="per layer (Pro: 384)")
    ap.add_argument("--recipe", choices=("full", "experts"), default="full",
                    help="dense linears NVFP4 (full) or BF16 and excluded (experts)")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    if args.dir.exists():
        shutil.rmtree(args.dir)
    print("load average at start " + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    src = args.dir / "c"
    try:
        t0 = time.perf_counter()
        total, largest = write_synthetic_c(src, args.layers, args.experts, args.recipe)
        print(f"synthetic layout C ({args.recipe} recipe): {total / 1e9:.2f} GB in "
              f"{len(list(src.glob('*.safetensors')))} shards, largest tensor "
              f"{largest / 1e6:.0f} MB (written in {time.perf_counter() - t0:.0f} s)")
        py = sys.executable
        conv = [py, "-m", "dsv4_nvfp4.checkpoint.convert", str(src), None, "--to",
                "nvidia-nvfp4"]
        runs = {COPY: [py, "-c", _PLAIN_COPY, str(src), None],
                "convert C->B (no fsync)": [*conv, "--no-fsync"],
                "convert C->B (fsync per shard)": conv}
        results: dict[str, list[tuple[float, float, int]]] = {k: [] for k in runs}
        labels = list(runs)
        # Warm-up (not counted): the first pass after writing the source finds it all in the
        # page cache, which would flatter whichever method runs first.
        for rnd in range(args.repeat + 1):
            order = labels[rnd % len(labels):] + labels[:rnd % len(labels)]
            for label in order if rnd else [COPY]:
                dst = args.dir / "out"
                if dst.exists():
                    shutil.rmtree(dst)
                os.sync()
                dt, rss, _ = timed([str(dst) if c is None else c for c in runs[label]])
                t0 = time.perf_counter()
                os.sync()  # what the process left in the page cache, written out
                synced = dt + time.perf_counter() - t0
                if rnd:
                    results[label].append((dt, synced, rss))
                print(f"  {'warm-up ' if not rnd else ''}{label:34s} {dt:7.1f} s  "
                      f"{total / dt / 1e9:6.3f} GB/s  (on disk: {synced:6.1f} s)  "
                      f"peak RSS {rss / 1e9:5.2f} GB", flush=True)
        print(f"median of {args.repeat} (rotated order, after a warm-up); 'on disk' adds the "
              "sync of what each left in the page cache; load average "
              + " ".join(f"{x:.2f}" for x in os.getloadavg()) + f" on {os.cpu_count()} cores")
        med = {k: statistics.median(r[0] for r in v) for k, v in results.items()}
        med_s = {k: statistics.median(r[1] for r in v) for k, v in results.items()}
        for label in results:
            gbs = total / med[label] / 1e9
            lo, hi = min(r[0] for r in results[label]), max(r[0] for r in results[label])
            print(f"  {label:34s} {gbs:6.3f} GB/s {med[COPY] / med[label]:5.2f}x copy"
                  f" ({med[label]:.1f} s, {lo:.1f}-{hi:.1f})"
                  f" | on disk {total / med_s[label] / 1e9:6.3f} GB/s "
                  f"{med_s[COPY] / med_s[label]:5.2f}x | peak RSS "
                  f"{max(r[2] for r in results[label]) / 1e9:5.2f} GB")
        print(f"  RSS goal: <= 2 GB + largest tensor = {(2e9 + largest) / 1e9:.2f} GB")
    finally:
        if not args.keep:
            shutil.rmtree(args.dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

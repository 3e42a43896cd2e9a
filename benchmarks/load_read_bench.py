"""Cold read of safetensors shards into one GPU: vLLM 0.34.0's default reader vs the faster ones.

What each mode does is what one tensor-parallel rank's loader does with the
shards of a layout-B checkpoint (vLLM 0.34.0,
``vllm/model_executor/model_loader/weight_utils.py``):

* ``safetensors``: ``safe_open`` + ``get_tensor`` of every tensor, copied to the
  GPU (the default ``safetensors_weights_iterator``, lazy strategy);
* ``safetensors_ep8``: the same, skipping the ``.weight`` of experts another of
  8 expert-parallel ranks owns (``--enable-ep-weight-filter``: vLLM's
  ``ep_weight_filter.should_skip_weight`` rule, linear placement, rank 0);
* ``prefetch``: every file read into the page cache on 8 threads first
  (``--safetensors-load-strategy prefetch``, 16 MiB blocks), then ``safetensors``;
* ``fastsafetensors``: the fastsafetensors library, file by file into GPU memory
  without GDS (``--load-format fastsafetensors``; vLLM passes no expert filter);
* ``fastsafetensors_ep8``: the same with its tensor filter set to the EP rule.

Each mode starts cold: the page cache is dropped (``/proc/sys/vm/drop_caches``
when writable, else ``POSIX_FADV_DONTNEED`` per file); the report says which.
GB/s is the checkpoint's bytes over the wall time, so a mode that reads fewer
bytes (the EP filter) shows as faster for the same disk.

    python benchmarks/load_read_bench.py --make DIR --gb 10      # synthetic shards
    python benchmarks/load_read_bench.py --dir DIR --out result.json

``--make`` writes layout-B-shaped shards: per shard one MoE layer of Pro-shaped
NVFP4 experts (w1/w3 U8 [3072, 3584], w2 U8 [7168, 1536], E4M3 block scales,
F32 global and input scales) and a BF16 dense tensor. Needs torch, safetensors
and a CUDA GPU; fastsafetensors is optional (a mode it cannot run says why).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

EXPERT_RE = re.compile(r"\.experts\.(\d+)\.")
PRO_EXPERT = {"w1": (3072, 3584), "w3": (3072, 3584), "w2": (7168, 1536)}  # packed FP4 bytes


def local_experts(n_experts: int, ep_size: int = 8, rank: int = 0) -> set[int]:
    base, rem = divmod(n_experts, ep_size)
    start = rank * base + min(rank, rem)
    return set(range(start, start + base + (1 if rank < rem else 0)))


def skip(name: str, local: set[int]) -> bool:
    """vLLM 0.34.0's ep_weight_filter.should_skip_weight: only an expert's heavy .weight."""
    m = EXPERT_RE.search(name)
    return bool(m) and name.endswith((".weight", ".weight_packed")) and int(m.group(1)) not in local


def make(out: Path, gb: float, experts: int) -> None:
    import torch
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    per_expert = sum(r * c * (1 + 1 / 8) for r, c in PRO_EXPERT.values())  # bytes + E4M3 scales
    shard_bytes = experts * per_expert + 64 * 2**20
    shards = max(1, round(gb * 1e9 / shard_bytes))
    g = torch.Generator(device=dev).manual_seed(0)
    index = {}
    for s in range(shards):
        tensors = {}
        for e in range(experts):
            for w, (rows, cols) in PRO_EXPERT.items():
                base = f"layers.{s}.ffn.experts.{e}.{w}"
                tensors[f"{base}.weight"] = torch.randint(
                    0, 256, (rows, cols), dtype=torch.uint8, device=dev, generator=g).cpu()
                tensors[f"{base}.weight_scale"] = torch.randint(
                    0, 120, (rows, cols * 2 // 16), dtype=torch.uint8, device=dev,
                    generator=g).cpu().view(torch.float8_e4m3fn)
                tensors[f"{base}.weight_scale_2"] = torch.tensor(1e-3)
                tensors[f"{base}.input_scale"] = torch.tensor(1e-2)
        tensors[f"layers.{s}.attn.wq_b.weight"] = torch.randn(
            4096, 8192, device=dev, generator=g).to(torch.bfloat16).cpu()
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        save_file(tensors, str(out / name))
        index.update(dict.fromkeys(tensors, name))
    (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": index}))
    os.sync()


def drop_cache(files: list[Path]) -> str:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return "drop_caches"
    except OSError:
        for f in files:
            fd = os.open(f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        return "fadvise"


def read_safetensors(files: list[Path], local: set[int] | None) -> int:
    import torch
    from safetensors import safe_open

    moved = 0
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():  # noqa: SIM118 (safe_open has no __iter__)
                if local is not None and skip(name, local):
                    continue
                t = st.get_tensor(name).to("cuda")
                moved += t.numel() * t.element_size()
    torch.cuda.synchronize()
    return moved


def prefetch(files: list[Path], threads: int = 8, block: int = 16 << 20) -> None:
    def one(f: Path) -> None:
        with open(f, "rb", buffering=0) as fh:
            while fh.read(block):
                pass

    with ThreadPoolExecutor(max_workers=threads) as pool:
        list(pool.map(one, files))


def read_fastsafetensors(files: list[Path], local: set[int] | None) -> int:
    import torch
    from fastsafetensors import SafeTensorsFileLoader, SingleGroup

    moved = 0
    for f in files:
        loader = SafeTensorsFileLoader(SingleGroup(), device="cuda:0", nogds=True)
        try:
            if local is not None:
                loader.set_tensor_filter(lambda n: not skip(n, local))
            loader.add_filenames({0: [str(f)]})
            buf = loader.copy_files_to_device()
            try:
                for name in loader.get_keys():
                    t = buf.get_tensor(name)
                    moved += t.numel() * t.element_size()
                torch.cuda.synchronize()
            finally:
                buf.close()
        finally:
            loader.close()
    return moved


def bench(d: Path, modes: list[str], rounds: int) -> dict:
    files = sorted(d.glob("*.safetensors"))
    total = sum(f.stat().st_size for f in files)
    index = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
    n_experts = 1 + max(int(m.group(1)) for n in index if (m := EXPERT_RE.search(n)))
    local = local_experts(n_experts)
    import torch

    if torch.cuda.is_available():  # CUDA start-up outside the first timed mode
        torch.empty(1, device="cuda")
        torch.cuda.synchronize()
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    for r in range(rounds):
        order = modes if r % 2 == 0 else modes[::-1]
        for mode in order:
            how = drop_cache(files)
            t0 = time.perf_counter()
            try:
                if mode == "safetensors":
                    moved = read_safetensors(files, None)
                elif mode == "safetensors_ep8":
                    moved = read_safetensors(files, local)
                elif mode == "prefetch":
                    prefetch(files)
                    moved = read_safetensors(files, None)
                elif mode == "fastsafetensors":
                    moved = read_fastsafetensors(files, None)
                elif mode == "fastsafetensors_ep8":
                    moved = read_fastsafetensors(files, local)
                else:
                    raise ValueError(f"unknown mode {mode}")
            except Exception as e:  # a mode this machine cannot run: say why, go on
                runs[mode].append({"error": f"{type(e).__name__}: {e}"[:300]})
                continue
            s = time.perf_counter() - t0
            runs[mode].append({"seconds": round(s, 3), "gbps": round(total / 1e9 / s, 3),
                               "bytes_to_gpu": moved, "cold": how})
            print(f"{mode:>20}: {s:7.2f} s  {total / 1e9 / s:6.2f} GB/s  "
                  f"({moved / 1e9:.2f} GB to the GPU, {how})", flush=True)
    summary = {}
    for mode, rs in runs.items():
        ok = [x["gbps"] for x in rs if "gbps" in x]
        summary[mode] = ({"median_gbps": statistics.median(ok), "runs": rs} if ok
                         else {"runs": rs})
    return {"files": len(files), "bytes": total, "experts_per_layer": n_experts,
            "local_experts": len(local), "modes": summary}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--make", type=Path, help="write synthetic layout-B-shaped shards here")
    p.add_argument("--gb", type=float, default=10.0)
    p.add_argument("--experts", type=int, default=32, help="experts per shard (layer)")
    p.add_argument("--dir", type=Path, help="shards to read")
    p.add_argument("--modes", default="safetensors,safetensors_ep8,prefetch,fastsafetensors,"
                   "fastsafetensors_ep8")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--out", type=Path)
    a = p.parse_args(argv)
    if a.make:
        t0 = time.perf_counter()
        make(a.make, a.gb, a.experts)
        print(f"wrote {a.make} in {time.perf_counter() - t0:.1f} s", flush=True)
    if a.dir:
        res = bench(a.dir, a.modes.split(","), a.rounds)
        text = json.dumps(res, indent=1)
        if a.out:
            a.out.write_text(text + "\n")
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

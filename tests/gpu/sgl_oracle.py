"""An independent reference on the GPU: sgl-deep-gemm's ``mega_moe_pre_dispatch_kernel``.

SGLang's DeepGEMM fork quantizes mega-MoE activations for ``nvfp4xnvfp4`` with
this plain CUDA kernel (``deep_gemm/include/deep_gemm/impls/
sm100_mega_moe_pre_dispatch.cuh`` in the sgl-deep-gemm wheel). It compiles
unmodified for sm_90a, so on the H100 it is an exact oracle for the per-token
convention. Nothing of it is committed here: the header comes from the wheel
unpacked by ``scripts/setup_venv.sh`` (``.venv/oracles/sgl_deep_gemm``) and the
cubin is built with nvcc at test time (or beforehand on a machine with nvcc:
``python tests/gpu/sgl_oracle.py OUT_DIR``, then point ``DSV4_SGL_CUBIN_DIR``
at it).

Launch contract (read from the kernel source): block = hidden / 8 threads,
grid = T (no padding rows), one fp32 ``pts`` per token, scale bytes row-major.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
INCLUDE = REPO / ".venv" / "oracles" / "sgl_deep_gemm" / "deep_gemm" / "include"
HEADER = "deep_gemm/impls/sm100_mega_moe_pre_dispatch.cuh"
SYMBOL = ("_ZN9deep_gemm28mega_moe_pre_dispatch_kernelILj16ELNS_7MmaKindE3ELb0EEEvPK13__nv_"
          "bfloat16PKiPKfS8_PvPiPfPlSB_jjjjj")
# Our explicit instantiation of the wheel's template for NVFP4 (group 16, no PDL).
STUB = f"""#include <{HEADER}>
template __global__ void deep_gemm::mega_moe_pre_dispatch_kernel<16u, deep_gemm::MmaKind::NVFP4,
    false>(const __nv_bfloat16*, const int32_t*, const float*, const float*, void*, int32_t*,
    float*, int64_t*, float*, const uint32_t, const uint32_t, const uint32_t, const uint32_t,
    const uint32_t);
"""
VARIANTS = {"fastmath": ["--use_fast_math"], "ieee": []}  # the fork's JIT uses --use_fast_math


def build(out_dir: Path, include: Path = INCLUDE) -> dict[str, Path]:
    """Compile the kernel for sm_90a, with and without fast math; returns variant → cubin."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        raise FileNotFoundError("nvcc not found")
    if not (include / HEADER).exists():
        raise FileNotFoundError(f"{include / HEADER} missing (run scripts/setup_venv.sh)")
    out_dir.mkdir(parents=True, exist_ok=True)
    src = out_dir / "pre_dispatch_stub.cu"
    src.write_text(STUB)
    out = {}
    for name, flags in VARIANTS.items():
        cubin = out_dir / f"pre_dispatch_sm90a_{name}.cubin"
        cmd = [nvcc, "-std=c++20", "-O3", "-gencode=arch=compute_90a,code=sm_90a", "-cubin",
               *flags, "--expt-relaxed-constexpr", "--expt-extended-lambda", "-I", str(include),
               str(src), "-o", str(cubin)]
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        out[name] = cubin
    return out


def cubins() -> dict[str, Path]:
    """Prebuilt cubins from ``DSV4_SGL_CUBIN_DIR``, else built now into a temp dir."""
    pre = os.environ.get("DSV4_SGL_CUBIN_DIR")
    if pre:
        found = {n: Path(pre) / f"pre_dispatch_sm90a_{n}.cubin" for n in VARIANTS}
        if all(p.exists() for p in found.values()):
            return found
    return build(Path(tempfile.mkdtemp(prefix="sgl_pd_")))


class PreDispatch:
    """The compiled kernel, callable on a bf16 CUDA tensor [T, H] → (x uint8, x_sf int32, pts)."""

    def __init__(self, cubin: Path) -> None:
        import cupy

        self._cp = cupy
        self._fn = cupy.RawModule(path=str(cubin)).get_function(SYMBOL)

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        import numpy as np

        t, h = x.shape
        assert x.dtype == torch.bfloat16 and x.is_contiguous() and h % 64 == 0 and h <= 8192
        dev = x.device
        out_x = torch.full((t, h // 2), 0xAB, dtype=torch.uint8, device=dev)
        out_sf = torch.full((t, h // 64), 0x5A5A5A5A, dtype=torch.int32, device=dev)
        pts = torch.full((t,), float("nan"), dtype=torch.float32, device=dev)
        topk_idx = torch.zeros(t, 1, dtype=torch.int32, device=dev)
        topk_w = torch.ones(t, 1, dtype=torch.float32, device=dev)
        buf_idx = torch.empty(t, 1, dtype=torch.int64, device=dev)
        buf_w = torch.empty(t, 1, dtype=torch.float32, device=dev)
        if t == 0:
            return out_x, out_sf, pts
        torch.cuda.synchronize()
        ptr = [np.uint64(a.data_ptr()) for a in (x, topk_idx, topk_w)]
        args = (*ptr, np.uint64(0), np.uint64(out_x.data_ptr()), np.uint64(out_sf.data_ptr()),
                np.uint64(pts.data_ptr()), np.uint64(buf_idx.data_ptr()),
                np.uint64(buf_w.data_ptr()), np.uint32(t), np.uint32(t), np.uint32(h),
                np.uint32(h // 16), np.uint32(1))
        self._fn((t,), (h // 8,), args)
        self._cp.cuda.runtime.deviceSynchronize()
        return out_x, out_sf, pts


if __name__ == "__main__":
    paths = build(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("sgl_cubins"))
    for name, path in paths.items():
        print(name, path)

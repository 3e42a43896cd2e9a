"""H100: the layout C → B conversion gives the same bits on CUDA as on the CPU.

The vLLM plugin converts a layout-C directory's re-encoded modules on each
rank's GPU while vLLM loads it (``LayoutCStream(device=cuda)``); ``convert``
runs the same ``c_to_b_module`` on the CPU. Both must write the same bytes:
checked here at DeepSeek V4 Pro's shapes for every kind of re-encoded module
(NVFP4 → FP8 128x128, BF16 → FP8, NVFP4 → BF16), and for the whole tiny
layout-C checkpoint against ``convert``'s output.

Run on the device machine: ``PYTHONPATH=src python3 -m pytest -q tests/gpu/test_c_stream_gpu.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dsv4_nvfp4.checkpoint.transforms import c_to_b_module
from dsv4_nvfp4.formats import quantize_nvfp4_weight

pytestmark = pytest.mark.h100

L = "model.layers.0.self_attn."
# (layout-C module, DeepSeek V4 Pro shape, how the export stores it)
PRO_MODULES = [
    (f"{L}q_a_proj", (1536, 7168), "nvfp4"),
    (f"{L}q_b_proj", (65536, 1536), "nvfp4"),
    (f"{L}kv_proj", (512, 7168), "nvfp4"),
    (f"{L}o_a_proj", (16384, 4096), "bf16"),  # BF16 in every C export
    (f"{L}o_b_proj", (7168, 16384), "nvfp4"),
    (f"{L}compressor.kv_proj", (1024, 7168), "nvfp4"),  # -> BF16
    (f"{L}compressor.indexer.q_b_proj", (8192, 1536), "nvfp4"),
    ("model.layers.0.mlp.shared_experts.down_proj", (7168, 3072), "nvfp4"),
    (f"{L}q_b_proj", (65536, 1536), "bf16"),  # the experts recipe's BF16 dense
]


def _parts(shape: tuple[int, int], source: str) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(sum(shape))
    w = torch.randn(shape, generator=gen) * 0.02
    w[0, :16] *= 40  # an outlier block, so block scales spread
    if source == "bf16":
        return {"weight": w.to(torch.bfloat16)}
    t = quantize_nvfp4_weight(w)
    return {"weight": t.packed, "weight_scale": t.block_scale,
            "weight_scale_2": t.global_scale.reshape(()), "input_scale": torch.tensor(0.01)}


def _raw(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


@pytest.mark.parametrize(("c_module", "shape", "source"), PRO_MODULES,
                         ids=[f"{m.rsplit('.', 1)[-1]}-{s}" for m, _, s in PRO_MODULES])
def test_c_to_b_module_same_bits_on_cuda(c_module: str, shape: tuple[int, int], source: str,
                                         report: dict) -> None:
    parts = _parts(shape, source)
    cpu, cpu_err = c_to_b_module(c_module, parts)
    gpu, gpu_err = c_to_b_module(c_module, {k: v.cuda() for k, v in parts.items()})
    assert sorted(gpu) == sorted(cpu)
    for name, t in cpu.items():
        g = gpu[name]
        assert g.device.type == "cuda"
        assert (g.dtype, tuple(g.shape)) == (t.dtype, tuple(t.shape)), name
        assert torch.equal(_raw(g.cpu()), _raw(t)), name
    assert cpu_err is not None and gpu_err is not None
    # the error report sums in a different order on the GPU: equal to float rounding
    assert gpu_err.max_abs == cpu_err.max_abs
    assert gpu_err.rel_l2 == pytest.approx(cpu_err.rel_l2, rel=1e-4)
    report.setdefault("c_to_b_module_cuda", {})[f"{c_module}:{source}"] = {
        "bit_identical": True, "rel_l2": cpu_err.rel_l2}


def test_stream_on_cuda_equals_convert(tmp_path: Path) -> None:
    from safetensors import safe_open

    from dsv4_nvfp4.checkpoint.c_stream import LayoutCStream
    from dsv4_nvfp4.checkpoint.convert_exec import execute
    from dsv4_nvfp4.checkpoint.convert_plan import Target, plan
    from dsv4_nvfp4.checkpoint.layouts import Layout
    from dsv4_nvfp4.checkpoint.tiny import write_tiny

    def stream(d: Path):  # type: ignore[no-untyped-def]
        for f in sorted(d.glob("*.safetensors")):
            with safe_open(f, "pt") as h:
                for k in h.keys():  # noqa: SIM118 (safe_open is not a dict)
                    yield k, h.get_tensor(k)

    for recipe in ("full", "experts"):
        c = write_tiny(tmp_path / f"C-{recipe}", Layout.C, recipe=recipe)
        b = tmp_path / f"B-{recipe}"
        execute(plan(c, Target.NVFP4), b, fsync=False)
        got = dict(LayoutCStream.open(c, device="cuda").convert(stream(c)))
        want = dict(stream(b))
        assert sorted(got) == sorted(want)
        on_gpu = {n for n, t in got.items() if t.device.type == "cuda"}
        assert on_gpu and any(n.endswith(".scale") for n in on_gpu)  # re-encoded stay there
        assert not any(".ffn.experts." in n for n in on_gpu)  # renamed bytes never move
        for name, w in want.items():
            g = got[name].cpu()
            assert g.dtype == w.dtype and torch.equal(_raw(g), _raw(w)), name

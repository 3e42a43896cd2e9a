"""H100: ModelOpt NVFP4 quantization of a DeepSeek V4 on a real GPU, both recipes, end to end.

Runs ``dsv4-nvfp4 quantize`` with ``--device-map auto`` (accelerate, the
multi-GPU code path) and ModelOpt's own CUDA fake-quant kernels, then, for
both ``--recipe experts`` and ``--recipe full``: ``verify`` the export,
``convert`` it to layout B (``mtp.*`` grafted from layout A by
``--mtp-from``), ``verify`` again against layout A, and compare every
dequantized weight with the BF16 original (relative error
``||deq - w|| / ||w||`` per tensor kind). With ``experts`` the routed experts
of layout B must be the export's bytes and every dense linear FP8 128x128
quantized once from BF16 (~0.026 on Gaussian weights). Also checks that the
CPU kernel CI uses (``cpu_fakequant``) agrees with ModelOpt's CUDA kernel.

The model is generated here (no download) at sizes a bit larger than the CPU
tests' so the per-kind statistics mean something. Results go to
``$QUANTIZE_REPORT_DIR`` (``quantize_h100.json`` and ``.md``) when set.

Run on the device machine (ModelOpt, transformers and their pure-Python
dependencies installed without network from wheels downloaded beforehand)::

    python3 -m pip install -q --no-index --no-deps --target "$TMPDIR/site" WHEELS/*.whl
    PYTHONPATH=src:"$TMPDIR/site" QUANTIZE_REPORT_DIR=REPORTS \
        python3 -m pytest -q -s tests/gpu/test_quantize_h100.py
"""

from __future__ import annotations

import itertools
import json
import os
import sys
from collections import defaultdict
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

pytestmark = pytest.mark.h100

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from test_quantize_support import small_config  # noqa: E402

from dsv4_nvfp4.checkpoint.layouts import Layout  # noqa: E402
from dsv4_nvfp4.checkpoint.names import c_to_deepseek, is_mtp  # noqa: E402
from dsv4_nvfp4.checkpoint.tiny import build, write_checkpoint  # noqa: E402
from dsv4_nvfp4.cli import main as cli_main  # noqa: E402
from dsv4_nvfp4.formats import (  # noqa: E402
    dequantize_fp8_block,
    dequantize_mxfp4,
    dequantize_nvfp4,
)


def quantize_cli(argv: list[str]) -> int:
    """`dsv4-nvfp4 quantize ARGV`, in process."""
    return cli_main(["quantize", *argv])



MEDIUM = {"hidden_size": 512, "num_attention_heads": 4, "head_dim": 128, "qk_rope_head_dim": 64,
          "q_lora_rank": 256, "o_groups": 2, "o_lora_rank": 256, "n_routed_experts": 16,
          "num_experts_per_tok": 4, "moe_intermediate_size": 256, "index_n_heads": 4,
          "index_head_dim": 64, "index_topk": 64, "sliding_window": 64}
RESULTS: dict = {}


def medium_config() -> dict:
    cfg = small_config(mtp=True)
    cfg.update(MEDIUM)
    return cfg


@pytest.fixture(scope="module")
def srcs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("h100")
    out = {}
    for key, layout in (("bf16", Layout.BF16), ("a", Layout.A)):
        t, c, side = build(layout, medium_config(), seed=0)
        out[key] = write_checkpoint(root / key, t, c, side, max_shard_bytes=16 << 20)
    out["root"] = root
    return out


def _load(d: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    out = {}
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(f, "pt") as s:
            for k in s.keys():   # noqa: SIM118
                out[k] = s.get_tensor(k)
    return out


def _kind(ds_module: str) -> str:
    """A DeepSeek module name → its tensor kind (layer and expert indices dropped)."""
    parts = [p for p in ds_module.split(".") if not p.isdigit()]
    if parts[0] == "mtp":
        return "mtp." + ".".join(parts[1:])
    return ".".join(parts[1:] if parts[0] == "layers" else parts)


def _dequant(t: dict[str, torch.Tensor], base: str) -> tuple[str, torch.Tensor] | None:
    w = t.get(base + ".weight")
    if w is None:
        return None
    if base + ".weight_scale" in t:
        return "nvfp4", dequantize_nvfp4(w.view(torch.uint8), t[base + ".weight_scale"],
                                         t[base + ".weight_scale_2"])
    if base + ".scale" in t and w.dtype == torch.float8_e4m3fn:
        return "fp8", dequantize_fp8_block(w, t[base + ".scale"].view(torch.uint8))
    if base + ".scale" in t and w.dtype == torch.int8:
        return "mxfp4", dequantize_mxfp4(w.view(torch.uint8), t[base + ".scale"].view(torch.uint8))
    if w.dtype in (torch.bfloat16, torch.float32):
        return "bf16", w.float()
    return None


def error_table(src: dict, out: dict, to_ds) -> dict[str, dict]:
    """Relative error of every dequantized linear weight, grouped by (kind, storage)."""
    groups: dict[tuple[str, str], list[float]] = defaultdict(list)
    for name in out:
        if not name.endswith(".weight") or out[name].dim() != 2:
            continue
        base = name[: -len(".weight")]
        ds = to_ds(base)
        if ds is None or ds + ".weight" not in src:
            continue
        got = _dequant(out, base)
        if got is None:
            continue
        storage, deq = got
        ref = src[ds + ".weight"].float()
        rel = float((deq - ref).norm() / ref.norm().clamp_min(1e-30))
        groups[(_kind(ds), storage)].append(rel)
    return {f"{k} [{s}]": {"n": len(v), "mean": sum(v) / len(v), "max": max(v)}
            for (k, s), v in sorted(groups.items())}


def _verify(path: Path, against: Path | None = None) -> list[str]:
    from dsv4_nvfp4.checkpoint.verify import verify

    return [f.line() for f in verify(path, against_path=against).findings]


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def routed_experts_identical(exported: dict, b: dict) -> tuple[int, list[str]]:
    """Every routed-expert tensor of the export against its layout-B name, byte for byte.

    ``convert`` only renames NVFP4 experts; any byte it changed would be a
    second, unmeasured rounding. Returns (tensors compared, names that differ).
    """
    n, bad = 0, []
    for name, t in exported.items():
        ds = c_to_deepseek(name)
        if ds is None or ".ffn.experts." not in ds:
            continue
        n += 1
        if ds not in b or not torch.equal(_bytes(b[ds]), _bytes(t)):
            bad.append(ds)
    return n, bad


def _snap(grid: list[float], r: float) -> float:
    return min(grid, key=lambda v: abs(v - r))


def test_cpu_kernel_matches_modelopt_cuda() -> None:
    """CI's CPU fake quant equals ModelOpt's CUDA kernel except at exact E2M1 rounding ties.

    ModelOpt's Triton kernel multiplies by a reciprocal where the reference
    divides, so a value within an ulp of a rounding boundary may land on the
    other neighbour. Every
    differing element must be such a tie, off by exactly one code.
    """
    import modelopt.torch.quantization.tensor_quant as tq

    from dsv4_nvfp4.formats import E2M1_VALUES
    from dsv4_nvfp4.quantize.cpu_fakequant import _fake_quant_cpu

    g = torch.Generator(device="cuda").manual_seed(0)
    x = (torch.randn(512, 1024, device="cuda", generator=g) * 0.05).to(torch.bfloat16)
    amax = x.float().abs().amax()
    cuda = tq.dynamic_block_quantize_op(x, 16, amax, 4, 2, 8, 4).cpu().float()
    cpu = _fake_quant_cpu(x.cpu(), 16, amax.cpu(), 4, 2, 8, 4).float()
    xs = x.cpu().float()
    gs = float(amax) / 2688.0
    blocks = xs.reshape(-1, 16)
    sf = (blocks.abs().amax(-1) / (6 * gs)).clamp(2**-9, 448).to(torch.float8_e4m3fn).float()
    scale = (sf * gs).repeat_interleave(16).reshape(xs.shape)
    diff = (cuda != cpu).nonzero().tolist()
    grid = sorted({abs(v) for v in E2M1_VALUES})
    bounds = [(a + b) / 2 for a, b in itertools.pairwise(grid)]
    non_ties = 0
    for i, j in diff:
        s_val = abs(float(xs[i, j])) / float(scale[i, j])
        b = min(bounds, key=lambda t: abs(t - s_val))
        lo, hi = grid[bounds.index(b)], grid[bounds.index(b) + 1]
        # outputs are bf16, so value/scale is a grid point only to ~2^-9: snap to the grid
        got = {_snap(grid, abs(float(t[i, j])) / float(scale[i, j])) for t in (cuda, cpu)}
        if abs(s_val - b) > 1e-5 * b or got != {lo, hi}:
            non_ties += 1
    RESULTS["cpu_vs_cuda_fakequant"] = {"elements": x.numel(), "differing": len(diff),
                                        "differing_not_at_a_tie": non_ties}
    assert non_ties == 0 and len(diff) < x.numel() // 1000


@pytest.mark.parametrize("recipe", ["experts", "full"])
def test_quantize_convert_verify(srcs, recipe: str) -> None:
    out = srcs["root"] / f"{recipe}_b"
    argv = [str(srcs["bf16"]), str(out), "--recipe", recipe, "--num-samples", "32",
            "--seq-len", "256", "--batch-size", "4", "--mtp-from", str(srcs["a"]),
            "--no-progress"]
    res: dict = {}
    RESULTS[recipe] = res
    assert quantize_cli([*argv, "--export-only"]) == 0
    export = out.with_name(out.name + ".work") / "export"
    report = json.loads((export / "quantize_report.json").read_text())
    res["report"] = {k: report[k] for k in ("unquantized_by_modelopt", "added_to_ignore",
                                            "norms_in_bf16", "norms_cast_after_load",
                                            "experts", "quantized_modules", "versions")}
    res["verify_export"] = _verify(export)
    src = _load(srcs["bf16"])
    exported = _load(export)
    res["export_errors"] = error_table(src, exported, c_to_deepseek)
    rc = quantize_cli(argv)
    res["convert_rc"] = rc
    assert rc == 0
    res["verify_b"] = _verify(out, against=srcs["a"])     # also: mtp.* bytes == layout A
    b = _load(out)
    res["b_errors"] = error_table(src, b, lambda n: n)
    n_exp, differ = routed_experts_identical(exported, b)
    res["routed_expert_tensors_identical_to_export"] = f"{n_exp - len(differ)}/{n_exp}"
    a = _load(srcs["a"])
    mtp = [k for k in a if is_mtp(k)]
    res["mtp_tensors_identical_to_a"] = \
        f"{sum(k in b and torch.equal(_bytes(b[k]), _bytes(a[k])) for k in mtp)}/{len(mtp)}"
    nv = [v for k, v in res["export_errors"].items() if "[nvfp4]" in k]
    assert nv and all(0.07 < v["mean"] < 0.12 for v in nv)
    assert res["verify_b"] == []
    # 16 experts x 3 projections x 4 tensors x 3 layers
    assert n_exp == 16 * 3 * 4 * 3 and differ == []
    assert mtp and res["mtp_tensors_identical_to_a"] == f"{len(mtp)}/{len(mtp)}"
    if recipe == "experts":
        fp8 = {k: v for k, v in res["b_errors"].items() if "[fp8]" in k}
        bf16 = {k: v for k, v in res["b_errors"].items() if "[bf16]" in k}
        # attention, indexer wq_b, shared experts (and MTP's, from A): BF16 -> FP8 once
        assert any(k.startswith("attn.wq_a ") for k in fp8)
        assert any(k.startswith("ffn.shared_experts.w2 ") for k in fp8)
        assert all(v["mean"] > 0.02 and v["max"] < 0.03 for v in fp8.values()), fp8
        # compressors, indexer weights_proj, router, embed, head: the BF16 bytes
        assert bf16 and all(v["max"] == 0 for v in bf16.values()), bf16


@pytest.fixture(scope="module", autouse=True)
def _write_results():
    yield
    d = os.environ.get("QUANTIZE_REPORT_DIR")
    text = json.dumps(RESULTS, indent=2, default=str)
    print(text)
    if d:
        Path(d).mkdir(parents=True, exist_ok=True)
        (Path(d) / "quantize_h100.json").write_text(text + "\n")
        lines = [f"device: {torch.cuda.get_device_name(0)}", ""]
        for recipe in ("experts", "full"):
            r = RESULTS.get(recipe, {})
            for title, key in (("export (layout C)", "export_errors"),
                               ("converted (layout B)", "b_errors")):
                if key not in r:
                    continue
                lines += [f"### {recipe}: {title}", "", "| tensor kind [storage] | n | mean rel "
                          "err | max rel err |", "|---|---|---|---|"]
                lines += [f"| {k} | {v['n']} | {v['mean']:.4f} | {v['max']:.4f} |"
                          for k, v in r[key].items()]
                lines.append("")
            for key in ("routed_expert_tensors_identical_to_export",
                        "mtp_tensors_identical_to_a", "verify_b"):
                if key in r:
                    lines.append(f"{recipe}: {key}: {r[key]}")
            lines.append("")
        (Path(d) / "quantize_h100.md").write_text("\n".join(lines) + "\n")

"""convert: C→B and A→B then verify clean, experts bit-identical where promised, dense values
equal to the formats functions, --to bf16 from every layout, bad input refused whole, and a
SIGKILL mid-shard followed by a rerun giving byte-identical output."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from bitwise import assert_bitwise_equal

from dsv4_nvfp4.checkpoint import convert_exec, transforms
from dsv4_nvfp4.checkpoint.convert_exec import execute
from dsv4_nvfp4.checkpoint.convert_plan import Target, plan
from dsv4_nvfp4.checkpoint.layouts import Layout
from dsv4_nvfp4.checkpoint.names import deepseek_to_c, is_mtp
from dsv4_nvfp4.checkpoint.reader import TensorReader, open_checkpoint
from dsv4_nvfp4.checkpoint.schema import Storage, expert_key
from dsv4_nvfp4.checkpoint.tiny import write_tiny
from dsv4_nvfp4.checkpoint.transforms import DenseMode, c_to_b_module, convert_parts
from dsv4_nvfp4.checkpoint.verify import verify
from dsv4_nvfp4.cli import main as cli_main
from dsv4_nvfp4.formats import (
    NVFP4Tensor,
    ScaleFormat,
    dequantize_fp8_block,
    dequantize_mxfp4,
    dequantize_nvfp4,
    nvfp4_to_bf16,
    nvfp4_to_fp8_block,
    quantize_fp8_block,
    quantize_nvfp4_weight,
)

pytestmark = [pytest.mark.cpu, pytest.mark.usefixtures("one_torch_thread")]
E8M0 = torch.float8_e8m0fnu


@pytest.fixture(scope="module")
def tinies(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    out = {lay.name: write_tiny(root / lay.name, lay, mtp=True) for lay in Layout}
    out["C-experts"] = write_tiny(root / "C-experts", Layout.C, recipe="experts")
    return out


def _convert(src: Path, dst: Path, target: Target, **kw) -> Path:
    execute(plan(src, target, **kw), dst, fsync=False)
    return dst


@pytest.fixture(scope="module")
def outs(tinies: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("out")
    t = tinies
    return {
        "CB": _convert(t["C"], root / "CB", Target.NVFP4, mtp_from=t["A"]),
        "CB-bf16": _convert(t["C"], root / "CB-bf16", Target.NVFP4, dense=DenseMode.BF16),
        "AB": _convert(t["A"], root / "AB", Target.NVFP4, input_scales_from=t["B"]),
        "A16": _convert(t["A"], root / "A16", Target.BF16),
        "B16": _convert(t["B"], root / "B16", Target.BF16),
        "C16": _convert(t["C"], root / "C16", Target.BF16, mtp_from=t["A"]),
        "CeB": _convert(t["C-experts"], root / "CeB", Target.NVFP4, mtp_from=t["A"]),
        "CeB-bf16": _convert(t["C-experts"], root / "CeB-bf16", Target.NVFP4,
                             dense=DenseMode.BF16),
    }


def _tensors(d: Path) -> dict[str, torch.Tensor]:
    ck = open_checkpoint(d)
    with TensorReader() as r:
        return {n: r.read(t) for n, t in ck.tensors.items()}


@pytest.mark.parametrize(("out", "layout"), [("CB", "B"), ("CB-bf16", "B"), ("AB", "B"),
                                             ("A16", "BF16"), ("B16", "BF16"), ("C16", "BF16"),
                                             ("CeB", "B"), ("CeB-bf16", "B")])
def test_output_verifies_clean(outs: dict[str, Path], tinies: dict[str, Path], out: str,
                               layout: str) -> None:
    against = tinies["A"] if out in ("CB", "AB", "CeB") else None
    rep = verify(outs[out], against_path=against)
    assert rep.layout.name == layout
    assert rep.findings == [], "\n".join(f.line() for f in rep.findings)
    manifest = json.loads((outs[out] / "manifest.json").read_text())
    files = sorted(f.name for f in outs[out].iterdir() if f.name != "manifest.json")
    assert sorted(manifest["files"]) == files  # no state dir, no .partial left behind


def _c(name: str) -> str:
    c = deepseek_to_c(name)
    assert c is not None
    return c


def assert_experts_copied_from_c(b: dict[str, torch.Tensor], c: dict[str, torch.Tensor]) -> None:
    """Every routed-expert tensor of layout B is its layout-C tensor, bit for bit (3 layers)."""
    n_exp = 0
    for name in b:
        mod, _, part = name.rpartition(".")
        ep = expert_key(mod)
        if ep and not is_mtp(mod):
            assert_bitwise_equal(b[name], c[f"{_c(mod)}.{part}"], name)
            n_exp += 1
    assert n_exp == 3 * 8 * 3 * 4


def test_c_to_b_experts_bit_identical_and_dense_equal_to_formats(
        outs: dict[str, Path], tinies: dict[str, Path]) -> None:
    c, b, a = _tensors(tinies["C"]), _tensors(outs["CB"]), _tensors(tinies["A"])
    assert_experts_copied_from_c(b, c)
    for mod in ("layers.1.attn.wq_b", "layers.2.ffn.shared_experts.w2",
                "layers.1.attn.indexer.wq_b"):
        t = NVFP4Tensor(c[f"{_c(mod)}.weight"], c[f"{_c(mod)}.weight_scale"],
                        c[f"{_c(mod)}.weight_scale_2"])
        q, s, _ = nvfp4_to_fp8_block(t, ScaleFormat.UE8M0)
        assert_bitwise_equal(b[f"{mod}.weight"], q, mod)
        assert_bitwise_equal(b[f"{mod}.scale"], s.view(E8M0), mod)
    q, s = quantize_fp8_block(c[f"{_c('layers.0.attn.wo_a')}.weight"].float(),
                              scale_format=ScaleFormat.UE8M0)
    assert_bitwise_equal(b["layers.0.attn.wo_a.weight"], q, "wo_a")
    for mod in ("layers.1.attn.compressor.wkv", "layers.1.attn.indexer.weights_proj"):
        t = NVFP4Tensor(c[f"{_c(mod)}.weight"], c[f"{_c(mod)}.weight_scale"],
                        c[f"{_c(mod)}.weight_scale_2"])
        assert_bitwise_equal(b[f"{mod}.weight"], nvfp4_to_bf16(t)[0], mod)
    for ds in ("layers.1.attn.attn_sink", "layers.1.attn.compressor.ape",
               "layers.0.ffn.gate.tid2eid", "hc_head_fn", "embed.weight",
               "layers.2.ffn.gate.bias"):
        assert_bitwise_equal(b[ds], c[_c(ds)], ds)
    for name in (n for n in a if is_mtp(n)):
        assert_bitwise_equal(b[name], a[name], name)
    cfg = json.loads((outs["CB"] / "config.json").read_text())
    assert cfg["num_nextn_predict_layers"] == 1 and cfg["compress_ratios"] == [0, 4, 128, 0]
    assert cfg["quantization_config"]["moe_quant_algo"] == "NVFP4"
    assert "layer_types" not in cfg
    rep = json.loads((outs["CB"] / "conversion_report.json").read_text())
    e = rep["tensors"]["layers.1.attn.wq_b.weight"]
    assert 0 < e["max_rel"] < 0.07 and 0 < e["rel_l2"] < 0.04  # E4M3 requant of E2M1 values


def test_c_to_b_dense_bf16_lists_ignored_layers(outs: dict[str, Path],
                                                 tinies: dict[str, Path]) -> None:
    c, b = _tensors(tinies["C"]), _tensors(outs["CB-bf16"])
    t = NVFP4Tensor(c[f"{_c('layers.1.attn.wq_a')}.weight"],
                    c[f"{_c('layers.1.attn.wq_a')}.weight_scale"],
                    c[f"{_c('layers.1.attn.wq_a')}.weight_scale_2"])
    assert_bitwise_equal(b["layers.1.attn.wq_a.weight"], nvfp4_to_bf16(t)[0], "wq_a")
    assert_bitwise_equal(b["layers.1.attn.wo_a.weight"], c[f"{_c('layers.1.attn.wo_a')}.weight"])
    qc = json.loads((outs["CB-bf16"] / "config.json").read_text())["quantization_config"]
    assert "model.layers.1.attn.fused_wqa_wkv" in qc["ignored_layers"]
    assert "model.layers.1.attn.indexer.wq_b" in qc["ignored_layers"]
    assert "model.layers.2.ffn.shared_experts.gate_up_proj" in qc["ignored_layers"]
    cfg = json.loads((outs["CB-bf16"] / "config.json").read_text())
    assert cfg["num_nextn_predict_layers"] == 0 and not any(is_mtp(n) for n in b)
    rep = json.loads((outs["CB-bf16"] / "conversion_report.json").read_text())
    assert "num_nextn_predict_layers = 0" in rep["warnings"][0]


# Every BF16 linear of the experts recipe's export, by kind (layers 1/2 have compressors).
CE_DENSE = ("layers.0.attn.wq_a", "layers.1.attn.wq_b", "layers.2.attn.wkv", "layers.1.attn.wo_a",
            "layers.0.attn.wo_b", "layers.1.attn.indexer.wq_b", "layers.2.ffn.shared_experts.w1",
            "layers.0.ffn.shared_experts.w2")
CE_BF16 = ("layers.1.attn.compressor.wkv", "layers.2.attn.compressor.wgate",
           "layers.1.attn.indexer.compressor.wkv", "layers.1.attn.indexer.weights_proj")


def test_c_experts_recipe_to_b_dense_equals_formats_fp8_of_the_bf16(
        outs: dict[str, Path], tinies: dict[str, Path]) -> None:
    """The experts recipe's BF16 dense linears: FP8 128x128 UE8M0 exactly as formats makes it
    from the BF16 weight; compressor/indexer projections and experts byte-identical."""
    c, b = _tensors(tinies["C-experts"]), _tensors(outs["CeB"])
    for mod in CE_DENSE:
        w = c[f"{_c(mod)}.weight"]
        assert w.dtype == torch.bfloat16
        q, s = quantize_fp8_block(w.float(), scale_format=ScaleFormat.UE8M0)
        assert_bitwise_equal(b[f"{mod}.weight"], q, mod)
        assert_bitwise_equal(b[f"{mod}.scale"], s.view(E8M0), mod)
    for mod in CE_BF16:
        assert_bitwise_equal(b[f"{mod}.weight"], c[f"{_c(mod)}.weight"], mod)
    assert_experts_copied_from_c(b, c)
    rep = json.loads((outs["CeB"] / "conversion_report.json").read_text())
    assert len(rep["tensors"]) == 25  # every dense linear of 3 layers, from BF16
    e = rep["tensors"]["layers.1.attn.wq_b.weight"]
    assert 0 < e["max_rel"] < 0.07 and 0 < e["rel_l2"] < 0.04
    qc = json.loads((outs["CeB"] / "config.json").read_text())["quantization_config"]
    assert "ignored_layers" not in qc and qc["moe_quant_algo"] == "NVFP4"


def test_c_experts_recipe_to_b_dense_bf16_is_a_byte_copy(outs: dict[str, Path],
                                                         tinies: dict[str, Path]) -> None:
    c, b = _tensors(tinies["C-experts"]), _tensors(outs["CeB-bf16"])
    for mod in CE_DENSE + CE_BF16:
        assert_bitwise_equal(b[f"{mod}.weight"], c[f"{_c(mod)}.weight"], mod)
    qc = json.loads((outs["CeB-bf16"] / "config.json").read_text())["quantization_config"]
    assert {"model.layers.0.attn.fused_wqa_wkv", "model.layers.1.attn.wo_a",
            "model.layers.1.attn.indexer.wq_b",
            "model.layers.2.ffn.shared_experts.down_proj"} <= set(qc["ignored_layers"])
    rep = json.loads((outs["CeB-bf16"] / "conversion_report.json").read_text())
    assert rep["tensors"] == {}  # nothing requantized


def test_c_bf16_linear_not_excluded_is_refused_whole(tinies: dict[str, Path], tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "c"
    shutil.copytree(tinies["C-experts"], src)
    for name, key in (("config.json", "quantization_config"),
                      ("hf_quant_config.json", "quantization")):
        cfg = json.loads((src / name).read_text())
        lst = "ignore" if key == "quantization_config" else "exclude_modules"
        cfg[key][lst] = [p for p in cfg[key][lst] if p != "model.layers.2.self_attn*"]
        (src / name).write_text(json.dumps(cfg))
    rc, _, err = _cli([str(src), str(tmp_path / "dst"), "--to", "nvidia-nvfp4"], capsys)
    assert rc == 2 and err.count("\n") == 1 and "model.layers.2.self_attn." in err
    assert "model.layers.2.self_attn.q_a_proj: expected NVFP4 (E2M1 + E4M3 per 16 + fp32 " \
        "global); BF16 only where quantization_config.ignore / exclude_modules matches the " \
        "module, found BF16 [module.storage] (and 5 more" in err
    assert not (tmp_path / "dst").exists()


def test_a_to_b_lossless_cast(outs: dict[str, Path], tinies: dict[str, Path]) -> None:
    a, b, bb = _tensors(tinies["A"]), _tensors(outs["AB"]), _tensors(tinies["B"])
    for name in a:
        mod, _, part = name.rpartition(".")
        ep = expert_key(mod)
        if ep is None or is_mtp(mod):
            assert_bitwise_equal(b[name], a[name], name)  # everything else byte-identical
            continue
        if part != "weight":
            continue
        assert_bitwise_equal(b[name], a[name].view(torch.uint8), name)  # nibbles identical
        deq_b = dequantize_nvfp4(b[name], b[f"{mod}.weight_scale"], b[f"{mod}.weight_scale_2"])
        assert torch.equal(deq_b, dequantize_mxfp4(a[name].view(torch.uint8), a[f"{mod}.scale"]))
        assert_bitwise_equal(b[f"{mod}.input_scale"], bb[f"{mod}.input_scale"], mod)
        if ep[2] == 3:
            w1 = mod[:-1] + "1"
            assert_bitwise_equal(b[f"{mod}.weight_scale_2"], b[f"{w1}.weight_scale_2"], mod)
    rep = json.loads((outs["AB"] / "conversion_report.json").read_text())
    assert rep["lossy_mxfp4_blocks"] == 0 and rep["tensors"] == {}


@pytest.mark.parametrize("out", ["A16", "B16", "C16"])
def test_to_bf16_equals_the_formats_dequantization(outs: dict[str, Path],
                                                   tinies: dict[str, Path], out: str) -> None:
    src = _tensors(tinies[out[0]])
    got = _tensors(outs[out])
    name = "layers.1.ffn.experts.4.w2"
    sname = name if out[0] != "C" else _c(name)
    if out[0] == "A":
        ref = dequantize_mxfp4(src[f"{sname}.weight"].view(torch.uint8), src[f"{sname}.scale"])
        dense = dequantize_fp8_block(src["layers.0.attn.wkv.weight"],
                                     src["layers.0.attn.wkv.scale"])
    else:
        ref = dequantize_nvfp4(src[f"{sname}.weight"], src[f"{sname}.weight_scale"],
                               src[f"{sname}.weight_scale_2"])
        if out[0] == "B":
            dense = dequantize_fp8_block(src["layers.0.attn.wkv.weight"],
                                         src["layers.0.attn.wkv.scale"])
        else:
            k = _c("layers.0.attn.wkv")
            dense = dequantize_nvfp4(src[f"{k}.weight"], src[f"{k}.weight_scale"],
                                     src[f"{k}.weight_scale_2"])
    assert_bitwise_equal(got[f"{name}.weight"], ref.to(torch.bfloat16), name)
    assert_bitwise_equal(got["layers.0.attn.wkv.weight"], dense.to(torch.bfloat16), "wkv")
    assert all(t.dtype in (torch.bfloat16, torch.float32, torch.int64) for t in got.values())
    assert any(is_mtp(n) for n in got)  # A and B carry mtp; C gets it from --mtp-from
    cfg = json.loads((outs[out] / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["num_nextn_predict_layers"] == 1


def test_streamed_copies_in_odd_pieces_give_the_same_bytes(
        outs: dict[str, Path], tinies: dict[str, Path], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Copies stream through a ring of reused buffers: pieces that split tensors anywhere
    (1000 bytes, 2 buffers) must not change a byte, nor the manifest's sha256."""
    monkeypatch.setattr(convert_exec, "PIECE_BYTES", 1000)
    monkeypatch.setattr(convert_exec, "RING", 2)
    monkeypatch.setattr(convert_exec, "dense_threads", lambda n: 1)
    torch.set_num_threads(3)  # execute runs the dense conversions on 1 and restores this
    got = _convert(tinies["C"], tmp_path / "CB", Target.NVFP4, mtp_from=tinies["A"])
    assert torch.get_num_threads() == 3
    torch.set_num_threads(1)
    ref = outs["CB"]
    names = sorted(f.name for f in ref.iterdir())
    assert sorted(f.name for f in got.iterdir()) == names
    for name in names:
        assert (got / name).read_bytes() == (ref / name).read_bytes(), name


def test_shard_writer_streams_only_what_the_plan_says(tmp_path: Path) -> None:
    from dsv4_nvfp4.checkpoint.writer import ShardWriter

    w = ShardWriter(tmp_path / "s.safetensors", [("a", "U8", (3, 4)), ("b", "F32", (2,))],
                    fsync=False)
    assert w.begin("a", "U8", (3, 4)) == 12
    w.piece(memoryview(bytes(range(5))))
    with pytest.raises(RuntimeError, match="7 owed to a"):
        w.piece(memoryview(bytes(8)))
    with pytest.raises(RuntimeError, match="b begun with 7 bytes of a still owed"):
        w.begin("b", "F32", (2,))
    w.piece(memoryview(bytes(range(5, 12))))
    with pytest.raises(RuntimeError, match="planned b F32 \\[2\\], got b BF16 \\[2\\]"):
        w.begin("b", "BF16", (2,))
    w.abort()
    assert not list(tmp_path.iterdir())


# --- pure per-module functions --------------------------------------------------------------


def test_chunked_dense_conversion_equals_formats_whole_tensor(monkeypatch: pytest.MonkeyPatch
                                                              ) -> None:
    g = torch.Generator().manual_seed(3)
    w = torch.randn(300, 256, generator=g) * torch.logspace(-3, 1, 300).unsqueeze(1)
    t = quantize_nvfp4_weight(w)
    parts = {"weight": t.packed, "weight_scale": t.block_scale, "weight_scale_2": t.global_scale}
    monkeypatch.setattr(transforms, "CHUNK_ELEMENTS", 128 * 256)  # 3 steps: 128, 128, 44 rows
    out, err = convert_parts(Storage.NVFP4, Storage.FP8_BLOCK, parts)
    q, s, ref_err = nvfp4_to_fp8_block(t, ScaleFormat.UE8M0)
    assert_bitwise_equal(out["weight"], q, "weight")
    assert_bitwise_equal(out["scale"], s.view(E8M0), "scale")
    assert err is not None
    assert err.max_abs == ref_err.max_abs and err.max_rel == ref_err.max_rel
    assert err.rel_l2 == pytest.approx(ref_err.rel_l2, rel=1e-5)
    back, _ = convert_parts(Storage.FP8_BLOCK, Storage.BF16, out)
    assert_bitwise_equal(back["weight"], dequantize_fp8_block(q, s).to(torch.bfloat16), "bf16")


def test_c_to_b_module_is_a_pure_rename_and_convert() -> None:
    g = torch.Generator().manual_seed(5)
    t = quantize_nvfp4_weight(torch.randn(64, 128, generator=g))
    parts = {"weight": t.packed, "weight_scale": t.block_scale,
             "weight_scale_2": t.global_scale, "input_scale": torch.tensor(0.01)}
    out, err = c_to_b_module("model.layers.7.mlp.experts.3.up_proj", parts)
    assert sorted(out) == [f"layers.7.ffn.experts.3.w3.{p}" for p in
                           ("input_scale", "weight", "weight_scale", "weight_scale_2")]
    assert err is None and out["layers.7.ffn.experts.3.w3.weight"] is parts["weight"]
    out, err = c_to_b_module("model.layers.7.self_attn.q_a_proj", parts)
    assert sorted(out) == ["layers.7.attn.wq_a.scale", "layers.7.attn.wq_a.weight"]
    assert out["layers.7.attn.wq_a.weight"].dtype == torch.float8_e4m3fn and err is not None
    out, _ = c_to_b_module("model.layers.7.self_attn.q_a_proj", parts, DenseMode.BF16)
    assert out["layers.7.attn.wq_a.weight"].dtype == torch.bfloat16
    out, _ = c_to_b_module("model.layers.7.self_attn.compressor.indexer.kv_proj", parts)
    assert list(out) == ["layers.7.attn.indexer.compressor.wkv.weight"]
    sink = torch.zeros(4)
    out, _ = c_to_b_module("model.layers.7.self_attn.sinks", {"": sink})
    assert out == {"layers.7.attn.attn_sink": sink}
    # an excluded (experts recipe) dense linear arrives as a bare BF16 weight
    w = torch.randn(256, 128, generator=g).to(torch.bfloat16)
    out, err = c_to_b_module("model.layers.7.mlp.shared_experts.up_proj", {"weight": w})
    q, s = quantize_fp8_block(w.float(), scale_format=ScaleFormat.UE8M0)
    assert_bitwise_equal(out["layers.7.ffn.shared_experts.w3.weight"], q, "w3")
    assert_bitwise_equal(out["layers.7.ffn.shared_experts.w3.scale"], s.view(E8M0), "w3")
    out, err = c_to_b_module("model.layers.7.self_attn.compressor.kv_proj", {"weight": w})
    assert out["layers.7.attn.compressor.wkv.weight"] is w and err is None


# --- bad input: one line, exit 2, nothing written -----------------------------------------


def _cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    rc = cli_main(["convert", *args, "--no-fsync"])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def test_bad_input_is_one_line_exit_2_and_writes_nothing(
        tinies: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dst = tmp_path / "dst"
    cases = [
        ([str(tmp_path / "missing"), str(dst), "--to", "bf16"], "config.json"),
        ([str(tinies["A"]), str(dst), "--to", "nvidia-nvfp4"], "--input-scales-from: expected"),
        ([str(tinies["B"]), str(dst), "--to", "nvidia-nvfp4"], "found layout B"),
        ([str(tinies["BF16"]), str(dst), "--to", "bf16"], "found BF16 already"),
        ([str(tinies["A"]), str(dst), "--to", "bf16", "--dense", "bf16"], "--dense bf16"),
        ([str(tinies["C"]), str(dst), "--to", "nvidia-nvfp4", "--mtp-from", str(tinies["C"])],
         "expected a native layout A"),
        ([str(tinies["A"]), str(tinies["A"] / "sub"), "--to", "bf16"], "outside SRC"),
    ]
    for args, text in cases:
        rc, _, err = _cli(args, capsys)
        assert rc == 2, args
        assert err.count("\n") == 1 and err.startswith("error: ") and text in err, err
        assert not dst.exists() and not (tinies["A"] / "sub").exists()
    # a truncated shard: found while validating, before anything is written
    bad = tmp_path / "bad"
    shutil.copytree(tinies["C"], bad)
    shard = sorted(bad.glob("model-*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-10])
    rc, _, err = _cli([str(bad), str(dst), "--to", "nvidia-nvfp4"], capsys)
    assert rc == 2 and shard.name in err and "truncated" in err and err.count("\n") == 1
    assert not dst.exists()
    # a foreign non-empty DST is left alone
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    rc, _, err = _cli([str(tinies["A"]), str(dst), "--to", "bf16"], capsys)
    assert rc == 2 and "found other files" in err
    assert sorted(p.name for p in dst.iterdir()) == ["keep.txt"]


def test_dry_run_prints_the_plan_and_writes_nothing(tinies: dict[str, Path], tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = _cli([str(tinies["C"]), str(tmp_path / "d"), "--to", "nvidia-nvfp4",
                         "--dry-run"], capsys)
    assert rc == 0 and not (tmp_path / "d").exists()
    assert "nvfp4->fp8_block" in out and "bf16->fp8_block" in out and "copy" in out
    assert "num_nextn_predict_layers = 0" in out


def test_rerun_of_a_complete_conversion_does_nothing(outs: dict[str, Path], tinies: dict[str, Path],
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    before = {p.name: p.stat().st_mtime_ns for p in outs["A16"].iterdir()}
    rc, out, _ = _cli([str(tinies["A"]), str(outs["A16"]), "--to", "bf16"], capsys)
    assert rc == 0 and "already complete" in out
    assert {p.name: p.stat().st_mtime_ns for p in outs["A16"].iterdir()} == before


# --- SIGKILL mid-shard, rerun, byte-identical ---------------------------------------------

_KILLER = """
import os, signal, sys
from dsv4_nvfp4.checkpoint import convert, writer
count = 0
def killing(real):
    # every output tensor starts with write (converted) or begin (streamed copy)
    def wrapped(self, name, *rest):
        global count
        count += 1
        if count == {kill_at}:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(self, name, *rest)
    return wrapped
writer.ShardWriter.write = killing(writer.ShardWriter.write)
writer.ShardWriter.begin = killing(writer.ShardWriter.begin)
from dsv4_nvfp4.cli import main
sys.exit(main(["convert", *{argv!r}]))
"""


def test_sigkill_mid_shard_then_rerun_is_byte_identical(tinies: dict[str, Path],
                                                        tmp_path: Path) -> None:
    args = [str(tinies["C"]), "--to", "nvidia-nvfp4", "--mtp-from", str(tinies["A"])]
    p = plan(tinies["C"], Target.NVFP4, mtp_from=tinies["A"])
    first = sum(len(u.outputs) for u in p.shards[0])
    second = sum(len(u.outputs) for u in p.shards[1])
    kill_at = first + second // 2  # in the middle of the second shard
    ref = _convert(tinies["C"], tmp_path / "ref", Target.NVFP4, mtp_from=tinies["A"])
    dst = tmp_path / "killed"
    code = textwrap.dedent(_KILLER).format(kill_at=kill_at, argv=[args[0], str(dst), *args[1:]])
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == -9, proc.stderr
    names = sorted(f.name for f in dst.iterdir())
    # killed while writing the second shard: it exists only under its temporary name (the
    # first is complete, or still being committed in the background when the kill came)
    assert f".{p.files[1]}.partial" in names and p.files[1] not in names
    assert p.files[0] in names or f".{p.files[0]}.partial" in names
    assert "manifest.json" not in names
    assert cli_main(["convert", args[0], str(dst), *args[1:], "--no-fsync"]) == 0
    got = sorted(f.name for f in dst.iterdir())
    assert got == sorted(f.name for f in ref.iterdir())
    for name in got:
        assert (dst / name).read_bytes() == (ref / name).read_bytes(), name

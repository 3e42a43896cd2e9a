"""``dsv4-nvfp4 quantize`` end to end on CPU: arguments, errors, calibration, export, resume,
convert to layout B and verify.

The small checkpoint (``test_quantize_support``) runs through the real
transformers model, real ModelOpt calibration and export; only ModelOpt's
CUDA-only NVFP4 fake-quant kernel is replaced on CPU (``cpu_fakequant``).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from test_quantize_support import block_expert, quantize_args, write_small_checkpoint

from dsv4_nvfp4.checkpoint.layouts import Layout
from dsv4_nvfp4.checkpoint.verify import verify
from dsv4_nvfp4.cli import main as cli_main
from dsv4_nvfp4.formats import ScaleFormat, dequantize_nvfp4, quantize_fp8_block


def quantize_cli(argv: list[str]) -> int:
    """`dsv4-nvfp4 quantize ARGV`, in process."""
    return cli_main(["quantize", *argv])



pytestmark = pytest.mark.cpu
pytest.importorskip("transformers")
pytest.importorskip("modelopt.torch.quantization")


@pytest.fixture(scope="module")
def srcs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("quantize_src")
    return {"bf16": write_small_checkpoint(root / "bf16"),
            "a": write_small_checkpoint(root / "native_a", layout=Layout.A),
            "b": write_small_checkpoint(root / "nvfp4_b", layout=Layout.B),
            "blocked": write_small_checkpoint(root / "blocked", edit=block_expert(1, 3))}


def _tensors(d: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(f, "pt") as s:
            out.update({k: s.get_tensor(k) for k in s.keys()})   # noqa: SIM118
    return out


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def _sha(d: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(d.glob("*.safetensors"))}


# --- argument handling and bad input: one line, exit 2 ------------------------------------


def _err_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(err)
    return err[-1]


def test_bad_arguments_exit_2(capsys) -> None:
    for argv in (["src"], ["a", "b", "--num-samples", "0"], ["a", "b", "--recipe", "fp4"],
                 ["a", "b", "--seq-len", "x"]):
        with pytest.raises(SystemExit) as e:
            quantize_cli(argv)
        assert e.value.code == 2
    capsys.readouterr()


@pytest.mark.parametrize("case, extra, pattern", [
    ("a", (), r"found quantization_config quant_method='fp8' \(native FP8/MXFP4, layout A\).*"
              r"--input-scales-from"),
    ("b", (), r"found NVIDIA NVFP4 \(layout B"),
    ("missing", (), r"expected a checkpoint directory with config.json"),
    ("bf16", ("--calib", "/nonexistent.jsonl"), r"--calib /nonexistent.jsonl: expected a "),
    ("bf16", ("--mtp-from", "/nonexistent"), r"--mtp-from /nonexistent: expected a checkpoint"),
])
def test_unusable_input(srcs, tmp_path: Path, capsys, case, extra, pattern) -> None:
    src = srcs.get(case, tmp_path / "missing")
    assert quantize_cli(quantize_args(src, tmp_path / "out", *extra)) == 2
    assert re.search(pattern, _err_line(capsys))
    assert not (tmp_path / "out").exists()


def test_non_bf16_weight(tmp_path: Path, capsys) -> None:
    def to_fp32(sd):
        sd["layers.0.attn.wq_a.weight"] = sd["layers.0.attn.wq_a.weight"].float()

    src = write_small_checkpoint(tmp_path / "f32", edit=to_fp32)
    assert quantize_cli(quantize_args(src, tmp_path / "out")) == 2
    assert re.search(r"layers\.0\.attn\.wq_a\.weight: expected BF16, found F32 \(1 such",
                     _err_line(capsys))


def test_no_gpu_for_device_map_auto(srcs, tmp_path: Path, capsys) -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    argv = quantize_args(srcs["bf16"], tmp_path / "out")
    argv[argv.index("--device-map") + 1] = "auto"
    assert quantize_cli(argv) == 2
    assert "--device-map auto: expected a visible CUDA GPU" in _err_line(capsys)


# --- experts recipe: export, numerics, resume ---------------------------------------------


@pytest.fixture(scope="module")
def experts_export(srcs, tmp_path_factory) -> tuple[Path, Path, list[str]]:
    out = tmp_path_factory.mktemp("experts") / "out"
    argv = quantize_args(srcs["bf16"], out, "--export-only")
    assert quantize_cli(argv) == 0
    return out, out.with_name("out.work") / "export", argv


def test_experts_export_numerics(srcs, experts_export) -> None:
    _, export, _ = experts_export
    src, exp = _tensors(srcs["bf16"]), _tensors(export)
    report = json.loads((export / "quantize_report.json").read_text())
    assert report["recipe"] == "experts" and report["experts"]["uncalibrated"] == {}
    assert report["norms_in_bf16"] == 16 and report["norms_cast_after_load"] == []
    assert report["unquantized_by_modelopt"] == []
    errs = []
    for layer in range(3):
        per_layer_in = {"gate_proj": set(), "up_proj": set(), "down_proj": set()}
        for e in range(8):
            ws2 = {}
            for hf, ds in (("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2")):
                p = f"model.layers.{layer}.mlp.experts.{e}.{hf}."
                w, s, g, i = (exp[p + k] for k in ("weight", "weight_scale", "weight_scale_2",
                                                   "input_scale"))
                ref = src[f"layers.{layer}.ffn.experts.{e}.{ds}.weight"].float()
                assert w.dtype == torch.uint8 and w.shape == (ref.shape[0], ref.shape[1] // 2)
                assert s.dtype == torch.float8_e4m3fn and s.shape == (ref.shape[0],
                                                                       ref.shape[1] // 16)
                assert g.shape == () and i.shape == () and float(i) > 0
                deq = dequantize_nvfp4(w, s, g)
                errs.append(float((deq - ref).norm() / ref.norm()))
                ws2[hf] = float(g)
                per_layer_in[hf].add(float(i))
            assert ws2["gate_proj"] == ws2["up_proj"]            # vLLM fuses w1/w3
        # one input_scale per layer and projection, shared by all experts
        assert all(len(v) == 1 for v in per_layer_in.values())
    assert min(errs) > 0.07 and max(errs) < 0.13                 # NVFP4 on Gaussian ~0.095
    # everything that is not a routed expert is untouched BF16 (bit-identical)
    assert torch.equal(exp["model.layers.1.self_attn.q_a_proj.weight"],
                       src["layers.1.attn.wq_a.weight"])
    assert torch.equal(exp["model.layers.2.self_attn.o_a_proj.weight"],
                       src["layers.2.attn.wo_a.weight"])
    assert torch.equal(exp["model.layers.0.mlp.shared_experts.down_proj.weight"],
                       src["layers.0.ffn.shared_experts.w2.weight"])
    assert not any(k.startswith(("mtp.", "model.mtp")) for k in exp)    # trap 4: dropped
    hf = json.loads((export / "hf_quant_config.json").read_text())
    assert "model.layers.0.self_attn*" in hf["quantization"]["exclude_modules"]
    assert (export / "tokenizer.json").is_file()


def test_rerun_skips_and_restore_reproduces(experts_export, capsys) -> None:
    _, export, argv = experts_export
    before = _sha(export)
    capsys.readouterr()
    assert quantize_cli(argv) == 0
    assert "is complete from an earlier run; skipping calibration" in capsys.readouterr().err
    assert _sha(export) == before
    # An export lost after calibration: restored from calibration.pt, byte-identical.
    import shutil

    shutil.rmtree(export)
    assert quantize_cli(argv) == 0
    err = capsys.readouterr().err
    assert "restoring calibration" in err and "calibrated in" not in err
    assert _sha(export) == before


def test_work_dir_of_other_inputs_is_refused(experts_export, capsys) -> None:
    _, _, argv = experts_export
    capsys.readouterr()
    assert quantize_cli([*argv, "--recipe", "full"]) == 2
    assert "whose recipe differ; pass --restart" in _err_line(capsys)


def test_experts_recipe_converts_to_verified_layout_b(srcs, experts_export, capsys) -> None:
    """The export keeps every non-expert linear BF16 (matched by exclude_modules); convert
    requantizes the dense ones to FP8 128x128 straight from those BF16 weights."""
    out, export, argv = experts_export
    capsys.readouterr()
    rerun = [*(a for a in argv if a != "--export-only"), "--mtp-from", str(srcs["a"])]
    assert quantize_cli(rerun) == 0
    err = capsys.readouterr().err
    assert "is complete from an earlier run; skipping calibration" in err   # no recalibration
    assert f"verify {out}: clean" in err
    rep = verify(out, against_path=srcs["a"])
    assert rep.layout is Layout.B and rep.findings == [], [f.line() for f in rep.findings]
    exp, b, src, a = _tensors(export), _tensors(out), _tensors(srcs["bf16"]), _tensors(srcs["a"])
    for ds in ("layers.0.attn.wq_a", "layers.1.attn.wq_b", "layers.2.attn.wo_a",
               "layers.1.attn.indexer.wq_b", "layers.0.ffn.shared_experts.w2"):
        q, sc = quantize_fp8_block(src[f"{ds}.weight"].float(), scale_format=ScaleFormat.UE8M0)
        assert torch.equal(_bytes(b[f"{ds}.weight"]), _bytes(q)), ds
        assert torch.equal(_bytes(b[f"{ds}.scale"]), _bytes(sc)), ds
    for ds in ("layers.1.attn.compressor.wkv", "layers.1.attn.indexer.weights_proj",
               "layers.2.ffn.gate", "embed", "head"):
        assert torch.equal(_bytes(b[f"{ds}.weight"]), _bytes(src[f"{ds}.weight"])), ds
    for part in ("weight", "weight_scale", "weight_scale_2", "input_scale"):
        assert torch.equal(_bytes(b[f"layers.1.ffn.experts.6.w1.{part}"]),
                           _bytes(exp[f"model.layers.1.mlp.experts.6.gate_proj.{part}"]))
    mtp = sorted(k for k in a if k.startswith("mtp."))
    assert mtp and all(torch.equal(_bytes(b[k]), _bytes(a[k])) for k in mtp)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_nextn_predict_layers"] == 1
    assert cfg["quantization_config"]["moe_quant_algo"] == "NVFP4"
    assert "ignored_layers" not in cfg["quantization_config"]


# --- full recipe: o_a_proj, MTP pass-through, layout B ------------------------------------


def test_full_recipe_to_verified_layout_b(srcs, tmp_path: Path, capsys) -> None:
    out = tmp_path / "b"
    assert quantize_cli(quantize_args(srcs["bf16"], out, "--recipe", "full",
                              "--mtp-from", str(srcs["a"]))) == 0
    err = capsys.readouterr().err
    assert "verify" in err and "clean" in err       # the runner ran the linter
    export = tmp_path / "b.work" / "export"
    rep = json.loads((export / "quantize_report.json").read_text())
    oa = [f"model.layers.{i}.self_attn.o_a_proj" for i in range(3)]
    assert rep["unquantized_by_modelopt"] == oa and rep["added_to_ignore"] == oa   # trap 3
    hf = json.loads((export / "hf_quant_config.json").read_text())
    cfg = json.loads((export / "config.json").read_text())
    assert set(oa) <= set(hf["quantization"]["exclude_modules"])
    assert set(oa) <= set(cfg["quantization_config"]["ignore"])
    exp, b, a = _tensors(export), _tensors(out), _tensors(srcs["a"])
    assert exp["model.layers.0.self_attn.o_a_proj.weight"].dtype == torch.bfloat16
    assert exp["model.layers.0.self_attn.q_a_proj.weight"].dtype == torch.uint8
    # layout B: experts byte-identical to the export, renamed; MTP grafted from A
    for part in ("weight", "weight_scale", "weight_scale_2", "input_scale"):
        assert torch.equal(_bytes(b[f"layers.2.ffn.experts.5.w3.{part}"]),
                           _bytes(exp[f"model.layers.2.mlp.experts.5.up_proj.{part}"]))
    mtp = sorted(k for k in a if k.startswith("mtp."))
    assert mtp and all(torch.equal(_bytes(b[k]), _bytes(a[k])) for k in mtp)
    assert b["layers.0.attn.wo_a.weight"].dtype == torch.float8_e4m3fn
    bcfg = json.loads((out / "config.json").read_text())
    assert bcfg["num_nextn_predict_layers"] == 1
    assert bcfg["quantization_config"]["moe_quant_algo"] == "NVFP4"


# --- trap 5 end to end: an expert no token reaches -----------------------------------------


def test_uncalibrated_expert_fails_then_is_reported(srcs, tmp_path: Path, capsys) -> None:
    argv = quantize_args(srcs["blocked"], tmp_path / "out", "--export-only")
    assert quantize_cli(argv) == 1
    line = _err_line(capsys)
    assert "routed experts saw no calibration token (model.layers.1.mlp.experts: experts [3])" \
        in line and "--allow-uncalibrated-experts" in line
    assert quantize_cli([*argv, "--allow-uncalibrated-experts"]) == 0
    assert "restoring calibration" in capsys.readouterr().err    # no second calibration pass
    rep = json.loads((tmp_path / "out.work" / "export" / "quantize_report.json").read_text())
    assert rep["experts"]["uncalibrated"] == {"model.layers.1.mlp.experts": [3]}
    exp = _tensors(tmp_path / "out.work" / "export")
    # its weight scales come from its weights, its input_scale is the layer's shared one
    assert float(exp["model.layers.1.mlp.experts.3.gate_proj.input_scale"]) == \
        float(exp["model.layers.1.mlp.experts.0.gate_proj.input_scale"])
    w1 = srcs["blocked"]
    src = _tensors(w1)
    amax = max(src["layers.1.ffn.experts.3.w1.weight"].float().abs().max(),
               src["layers.1.ffn.experts.3.w3.weight"].float().abs().max())
    assert float(exp["model.layers.1.mlp.experts.3.gate_proj.weight_scale_2"]) == \
        pytest.approx(float(amax) / 2688, rel=1e-2)

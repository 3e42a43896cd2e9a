"""inspect and tiny from the command line: what a user sees first."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dsv4_nvfp4.checkpoint import inspect as inspect_mod
from dsv4_nvfp4.checkpoint import tiny as tiny_mod
from dsv4_nvfp4.checkpoint.layouts import Layout
from dsv4_nvfp4.checkpoint.reader import TensorReader, open_checkpoint
from dsv4_nvfp4.checkpoint.tiny_model import tiny_config, tiny_state_dict

pytestmark = pytest.mark.cpu


@pytest.fixture(scope="module")
def tinies(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {lay.name: tiny_mod.write_tiny(root / lay.name, lay, mtp=True) for lay in Layout}


EXPECT = {
    "A": ("native", [("routed expert", "MXFP4 (E2M1 + UE8M0 per 32)", 24),
                     ("dense linear", "FP8 e4m3, UE8M0 128x128 scales", 25)],
          "Mxfp4MoEMethod", "--input-scales-from"),
    "B": ("nvidia-nvfp4", [("routed expert", "NVFP4 (E2M1 + E4M3 per 16 + fp32 global)", 24),
                           ("routed expert (mtp)", "MXFP4 (E2M1 + UE8M0 per 32)", 24)],
          "ModelOptNvFp4FusedMoE", "MTP draft-layer"),
    "C": ("modelopt-full", [("dense linear", "NVFP4 (E2M1 + E4M3 per 16 + fp32 global)", 22),
                            ("dense linear", "BF16", 3)],
          "does not load", "--to nvidia-nvfp4"),
    "BF16": ("bf16", [("routed expert", "BF16", 24)], "loads unquantized", "ModelOpt"),
}


@pytest.mark.parametrize("which", sorted(EXPECT))
def test_inspect_names_layout_groups_and_what_vllm_does(tinies: dict[str, Path], which: str,
                                                       capsys: pytest.CaptureFixture[str]
                                                       ) -> None:
    layout, groups, does, change = EXPECT[which]
    assert inspect_mod.main([str(tinies[which]), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["layout"] == layout and r["file_problems"] == []
    got = {(g["role"], g["storage"]): g["modules"] for g in r["groups"]}
    for role, storage, n in groups:
        assert got[(role, storage)] == (n if role != "routed expert" else 3 * 8 * 3), (role, got)
    assert not any(g["role"] == "unrecognised" for g in r["groups"])
    assert any(does in s for s in r["vllm_0_32"])
    assert any(change in s for s in r["to_serve"])
    assert inspect_mod.main([str(tinies[which])]) == 0
    assert f"layout: {Layout(layout).title}" in capsys.readouterr().out


def test_tiny_cli_refuses_a_non_empty_out_and_cpu_servable_bf16_is_the_tiny_model(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "t"
    assert tiny_mod.main([str(out), "--layout", "bf16", "--cpu-servable"]) == 0
    capsys.readouterr()
    sd = tiny_state_dict(tiny_config())
    ck = open_checkpoint(out)
    with TensorReader() as r:
        assert sorted(ck.tensors) == sorted(sd)
        for n, t in ck.tensors.items():
            assert torch.equal(r.read(t), sd[n]), n
    assert json.loads((out / "config.json").read_text()) == tiny_config()
    assert (out / "tokenizer.json").is_file()
    assert tiny_mod.main([str(out), "--layout", "A"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "expected an empty or new directory" in err
    with pytest.raises(SystemExit) as exc:
        tiny_mod.main([str(tmp_path / "u"), "--layout", "Q"])
    assert exc.value.code == 2
    assert "layout: expected one of A, B, C, bf16, found 'Q'" in capsys.readouterr().err
    assert not (tmp_path / "u").exists()


def test_tiny_experts_recipe_c_and_what_inspect_says(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "ce"
    assert tiny_mod.main([str(out), "--layout", "C", "--recipe", "experts"]) == 0
    assert "(experts recipe)" in capsys.readouterr().out
    assert inspect_mod.main([str(out), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    got = {(g["role"], g["storage"]): g["modules"] for g in r["groups"]}
    assert got[("dense linear", "BF16")] == 25 and got[("bf16 linear", "BF16")] == 12
    assert got[("routed expert", "NVFP4 (E2M1 + E4M3 per 16 + fp32 global)")] == 3 * 8 * 3
    assert not any(g["role"] == "dense linear" and g["storage"] != "BF16" for g in r["groups"])
    assert any("attention BF16 (excluded by the export" in s for s in r["vllm_0_32"])
    assert not any("o_a_proj" in s for s in r["vllm_0_32"])  # matched by self_attn*
    assert tiny_mod.main([str(tmp_path / "a"), "--layout", "A", "--recipe", "experts"]) == 2
    err = capsys.readouterr().err
    assert err == "error: --recipe experts: expected --layout C (the recipe of a ModelOpt " \
        "export), found --layout A\n"
    assert not (tmp_path / "a").exists()

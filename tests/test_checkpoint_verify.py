"""The linter: zero findings on every valid checkpoint, and a catalogue of corruptions each
caught with the right check and message (known file-level NVFP4 bugs included)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from dsv4_nvfp4.checkpoint.layouts import Layout
from dsv4_nvfp4.checkpoint.reader import INDEX_NAME, TensorReader, open_checkpoint
from dsv4_nvfp4.checkpoint.tiny import write_tiny
from dsv4_nvfp4.checkpoint.verify import verify
from dsv4_nvfp4.checkpoint.writer import write_shard
from dsv4_nvfp4.cli import main as cli_main
from dsv4_nvfp4.formats import ue8m0_exponent_for_amax, unpack_e2m1

pytestmark = [pytest.mark.cpu, pytest.mark.usefixtures("one_torch_thread")]

E8M0 = torch.float8_e8m0fnu


@pytest.fixture(scope="module")
def tinies(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    out = {}
    for lay in Layout:
        out[lay.name] = write_tiny(root / lay.name, lay, mtp=True)
    out["B-nomtp"] = write_tiny(root / "B-nomtp", Layout.B, mtp=False)
    out["A-cpu"] = write_tiny(root / "A-cpu", Layout.A, mtp=False, cpu_servable=True)
    out["B-cpu"] = write_tiny(root / "B-cpu", Layout.B, mtp=True, cpu_servable=True)
    out["C-cpu"] = write_tiny(root / "C-cpu", Layout.C, cpu_servable=True)
    out["C-experts"] = write_tiny(root / "C-experts", Layout.C, recipe="experts")
    out["BF16-cpu"] = write_tiny(root / "BF16-cpu", Layout.BF16, cpu_servable=True)
    return out


@pytest.mark.parametrize("which", ["A", "B", "C", "BF16", "B-nomtp", "A-cpu", "B-cpu", "C-cpu",
                                   "BF16-cpu", "C-experts"])
def test_every_valid_tiny_checkpoint_has_zero_findings(tinies: dict[str, Path], which: str
                                                       ) -> None:
    rep = verify(tinies[which])
    assert rep.layout.name == which.split("-")[0]
    assert rep.findings == [], "\n".join(f.line() for f in rep.findings)
    assert rep.exit_code == 0


def test_layout_c_gaps_are_notes_not_findings(tinies: dict[str, Path]) -> None:
    rep = verify(tinies["C"])
    assert {n.check for n in rep.notes} == {"mtp.missing", "c.o_a_proj"}
    assert all(n.severity == "note" for n in rep.notes)


def test_layout_c_experts_recipe_bf16_linears_are_the_excluded_ones(tinies: dict[str, Path]
                                                                    ) -> None:
    """The experts recipe's export: every non-expert linear BF16, all matched by the exclusions
    (o_a_proj included, so its note is gone); the routed experts NVFP4."""
    ck = open_checkpoint(tinies["C-experts"])
    bf16 = sorted(n for n, t in ck.tensors.items() if n.endswith(".weight") and t.dtype == "BF16"
                  and n.startswith("model.layers.") and "norm" not in n)
    assert "model.layers.1.self_attn.q_a_proj.weight" in bf16
    assert "model.layers.2.mlp.shared_experts.down_proj.weight" in bf16
    assert "model.layers.1.self_attn.compressor.indexer.scorer.weights_proj.weight" in bf16
    assert not any(n.endswith(".weight_scale") and ".mlp.experts." not in n for n in ck.tensors)
    assert "model.layers.0.mlp.experts.7.down_proj.weight_scale" in ck.tensors
    rep = verify(tinies["C-experts"])
    assert {n.check for n in rep.notes} == {"mtp.missing"}


def _c_exclude(fn: Callable[[list[str]], list[str]]) -> Callable[[Path], None]:
    """Edit layout C's exclusions in both files ModelOpt writes them to."""
    def apply(d: Path) -> None:
        _config_mutation(lambda c: c["quantization_config"].update(
            ignore=fn(c["quantization_config"]["ignore"])))(d)
        _config_mutation(lambda h: h["quantization"].update(
            exclude_modules=fn(h["quantization"]["exclude_modules"])), "hf_quant_config.json")(d)
    return apply


def test_layout_c_bf16_linear_not_excluded_is_a_finding(tinies: dict[str, Path],
                                                         tmp_path: Path) -> None:
    d = tmp_path / "ck"
    shutil.copytree(tinies["C-experts"], d)
    _c_exclude(lambda ex: [p for p in ex if p != "model.layers.1.mlp.shared_experts*"])(d)
    rep = verify(d)
    got = sorted((f.check, f.tensor) for f in rep.findings)
    assert got == [("module.storage", f"model.layers.1.mlp.shared_experts.{p}")
                   for p in ("down_proj", "gate_proj", "up_proj")]
    assert "BF16 only where quantization_config.ignore / exclude_modules matches" in \
        rep.findings[0].expected and rep.findings[0].found == "BF16"


def test_layout_c_nvfp4_linear_matched_by_exclusions_is_a_note(tinies: dict[str, Path],
                                                               tmp_path: Path) -> None:
    """The tensors decide: NVFP4 under an exclusion is read as NVFP4, and said."""
    d = tmp_path / "ck"
    shutil.copytree(tinies["C"], d)
    _c_exclude(lambda ex: [*ex, "model.layers.0.self_attn*"])(d)
    rep = verify(d)
    assert rep.findings == [], "\n".join(f.line() for f in rep.findings)
    notes = [n for n in rep.notes if n.check == "c.excluded_nvfp4"]
    assert len(notes) == 1 and "model.layers.0.self_attn." in notes[0].tensor
    assert "NVFP4 (4 such module(s))" in notes[0].found  # q_a, q_b, kv, o_b (no compressor)


# --- the corruption catalogue ------------------------------------------------------------


def _load(d: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    ck = open_checkpoint(d)
    with TensorReader() as r:
        tensors = {n: r.read(t).clone() for n, t in sorted(ck.tensors.items(),
                                                             key=lambda kv: kv[1].begin)}
    return tensors, {n: t.file.name for n, t in ck.tensors.items()}


def _save(d: Path, tensors: dict[str, torch.Tensor], where: dict[str, str]) -> None:
    first = sorted(set(where.values()))[0]
    files: dict[str, dict[str, torch.Tensor]] = {}
    for n, t in tensors.items():
        files.setdefault(where.get(n, first), {})[n] = t
    for f in sorted(set(where.values())):
        write_shard(d / f, files.get(f, {}), {"format": "pt"})
    idx = json.loads((d / INDEX_NAME).read_text())
    idx["weight_map"] = {n: where.get(n, first) for n in tensors}
    (d / INDEX_NAME).write_text(json.dumps(idx))


def _tensor_mutation(fn: Callable[[dict[str, torch.Tensor]], None]) -> Callable[[Path], None]:
    def apply(d: Path) -> None:
        tensors, where = _load(d)
        fn(tensors)
        _save(d, tensors, where)
    return apply


def _config_mutation(fn: Callable[[dict], None], name: str = "config.json"
                     ) -> Callable[[Path], None]:
    def apply(d: Path) -> None:
        cfg = json.loads((d / name).read_text())
        fn(cfg)
        (d / name).write_text(json.dumps(cfg))
    return apply


EXP = "layers.1.ffn.experts.2"


def _ue8m0_in_e4m3(t: dict[str, torch.Tensor]) -> None:
    """Known bug: block scales written as UE8M0 exponents where E4M3 belong."""
    ws = t[f"{EXP}.w1.weight_scale"]
    t[f"{EXP}.w1.weight_scale"] = ue8m0_exponent_for_amax(ws.float(), 1.0).view(
        torch.float8_e4m3fn)


def _ue8m0_dtype(t: dict[str, torch.Tensor]) -> None:
    ws = t[f"{EXP}.w1.weight_scale"]
    t[f"{EXP}.w1.weight_scale"] = ue8m0_exponent_for_amax(ws.float(), 1.0).view(E8M0)


def _all_ones(t: dict[str, torch.Tensor]) -> None:
    t[f"{EXP}.w3.weight_scale"] = torch.ones_like(t[f"{EXP}.w3.weight_scale"].float()).to(
        torch.float8_e4m3fn)


def _drop_scale(t: dict[str, torch.Tensor]) -> None:
    del t[f"{EXP}.w2.weight_scale"]


def _unpacked(t: dict[str, torch.Tensor]) -> None:
    t[f"{EXP}.w1.weight"] = unpack_e2m1(t[f"{EXP}.w1.weight"])


def _folded_global(t: dict[str, torch.Tensor]) -> None:
    """Known bug: weight_scale_2 folded into the E4M3 block scales."""
    for w in ("w1", "w3"):
        ws2 = t[f"{EXP}.{w}.weight_scale_2"]
        t[f"{EXP}.{w}.weight_scale"] = (t[f"{EXP}.{w}.weight_scale"].float() * ws2).to(
            torch.float8_e4m3fn)
        t[f"{EXP}.{w}.weight_scale_2"] = torch.ones_like(ws2)


def _zero_scales(t: dict[str, torch.Tensor]) -> None:
    """What folding does to real weights: small blocks' scales underflow E4M3 to 0."""
    ws = t[f"{EXP}.w2.weight_scale"].clone()
    ws.view(torch.uint8)[::2] = 0
    t[f"{EXP}.w2.weight_scale"] = ws


def _drop_mtp(t: dict[str, torch.Tensor]) -> None:
    for n in [n for n in t if n.startswith("mtp.")]:
        del t[n]


def _set(name: str, index: int, value: float) -> Callable[[dict[str, torch.Tensor]], None]:
    def fn(t: dict[str, torch.Tensor]) -> None:
        x = t[name].clone()
        x.view(-1)[index] = value
        t[name] = x
    return fn


def _set_byte(name: str, index: int, byte: int) -> Callable[[dict[str, torch.Tensor]], None]:
    def fn(t: dict[str, torch.Tensor]) -> None:
        x = t[name].clone()
        x.view(torch.uint8).view(-1)[index] = byte
        t[name] = x
    return fn


def _w13_mismatch(t: dict[str, torch.Tensor]) -> None:
    t[f"{EXP}.w3.weight_scale_2"] = t[f"{EXP}.w3.weight_scale_2"] * 1.5


def _truncate_rows(t: dict[str, torch.Tensor]) -> None:
    t["layers.0.attn.wq_b.weight"] = t["layers.0.attn.wq_b.weight"][:512].clone()


def _extra(t: dict[str, torch.Tensor]) -> None:
    t["layers.0.attn.extra.weight"] = torch.zeros(4, dtype=torch.bfloat16)


def _mxfp4_left_in_b(src: Path) -> Callable[[dict[str, torch.Tensor]], None]:
    def fn(t: dict[str, torch.Tensor]) -> None:
        a, _ = _load(src)
        for s in ("weight", "weight_scale", "weight_scale_2", "input_scale"):
            del t[f"{EXP}.w2.{s}"]
        for s in ("weight", "scale"):
            t[f"{EXP}.w2.{s}"] = a[f"{EXP}.w2.{s}"]
    return fn


def _mx_scales_in_nv(t: dict[str, torch.Tensor]) -> None:
    ws = t[f"{EXP}.w1.weight_scale"]
    t[f"{EXP}.w1.weight_scale"] = ws[:, ::2].contiguous()


def _zero_nibbles(t: dict[str, torch.Tensor]) -> None:
    """Garbled packed FP4: the values no longer reach what the block scales promise."""
    w = t[f"{EXP}.w1.weight"]
    t[f"{EXP}.w1.weight"] = (w & 0x11)  # keep only the lowest mantissa bit of each code


def _delete_file(d: Path) -> None:
    idx = json.loads((d / INDEX_NAME).read_text())
    victim = idx["weight_map"]["embed.weight"]
    (d / victim).unlink()


def _wrong_index_entry(d: Path) -> None:
    idx = json.loads((d / INDEX_NAME).read_text())
    files = sorted(set(idx["weight_map"].values()))
    cur = idx["weight_map"]["norm.weight"]
    idx["weight_map"]["norm.weight"] = next(f for f in files if f != cur)
    (d / INDEX_NAME).write_text(json.dumps(idx))


def _truncate_file(d: Path) -> None:
    idx = json.loads((d / INDEX_NAME).read_text())
    p = d / idx["weight_map"]["head.weight"]
    data = p.read_bytes()
    p.write_bytes(data[:-100])


def _rm(name: str) -> Callable[[Path], None]:
    return lambda d: (d / name).unlink()


# (id, base checkpoint, mutation, expected check, substring of the message)
CATALOGUE: list[tuple[str, str, object, str, str]] = [
    ("ue8m0_bytes_in_e4m3_scale", "B", _tensor_mutation(_ue8m0_in_e4m3), "scale.e4m3_sign",
     "UE8M0 exponent bytes stored where E4M3 belong"),
    ("ue8m0_dtype_for_nvfp4_scale", "B", _tensor_mutation(_ue8m0_dtype), "scale.dtype",
     "UE8M0 bytes where E4M3 belong"),
    ("all_ones_block_scales", "B", _tensor_mutation(_all_ones), "scale.constant",
     "scales equal 1 (byte 0x38)"),
    ("block_scale_dropped", "B", _tensor_mutation(_drop_scale), "tensor.missing",
     f"{EXP}.w2.weight_scale"),
    ("unpacked_fp4", "B", _tensor_mutation(_unpacked), "fp4.unpacked",
     "unpacked FP4, one code per byte"),
    ("underflowed_zero_block_scales", "B", _tensor_mutation(_zero_scales), "scale.zero",
     "global scale folded into the block scales"),
    ("global_scale_folded_group_max", "B", _tensor_mutation(_folded_global),
     "scale.global_mismatch", "weight_scale_2 does not match the block scales"),
    ("mtp_missing_A", "A", _tensor_mutation(_drop_mtp), "mtp.missing",
     "num_nextn_predict_layers = 1"),
    ("mtp_missing_B", "B", _tensor_mutation(_drop_mtp), "mtp.missing", "no mtp.* tensors"),
    ("nan_in_bf16", "B", _tensor_mutation(_set("embed.weight", 5, float("nan"))),
     "value.nonfinite", "1 NaN and 0 inf"),
    ("inf_in_fp32", "A", _tensor_mutation(_set("layers.2.hc_attn_fn", 7, float("inf"))),
     "value.nonfinite", "0 NaN and 1 inf"),
    ("e4m3_nan_code_in_scale", "B", _tensor_mutation(_set_byte(f"{EXP}.w2.weight_scale", 3,
                                                               0x7F)),
     "scale.e4m3_nan", "1 NaN codes"),
    ("ue8m0_nan_in_fp8_scale", "A", _tensor_mutation(_set_byte("layers.1.attn.wo_b.scale", 0,
                                                               0xFF)),
     "scale.ue8m0_nan", "1 bytes 0xFF"),
    ("ue8m0_nan_in_mxfp4_scale", "A", _tensor_mutation(_set_byte(f"{EXP}.w1.scale", 9, 0xFF)),
     "scale.ue8m0_nan", "1 bytes 0xFF"),
    ("nan_code_in_fp8_weight", "A", _tensor_mutation(_set_byte("layers.0.attn.wq_a.weight", 11,
                                                               0xFF)),
     "value.nan", "1 NaN codes"),
    ("w1_w3_global_scales_differ", "B", _tensor_mutation(_w13_mismatch), "scale.w13_mismatch",
     "w1's weight_scale_2"),
    ("shape_differs_from_config", "B", _tensor_mutation(_truncate_rows), "tensor.shape",
     "F8_E4M3 [512, 96]"),
    ("unexpected_tensor", "A", _tensor_mutation(_extra), "tensor.unexpected",
     "layers.0.attn.extra.weight"),
    ("mxfp4_expert_left_in_b", "B", None, "module.storage", "found MXFP4"),
    ("mxfp4_scales_in_nvfp4", "B", _tensor_mutation(_mx_scales_in_nv), "scale.shape",
     "one scale per 32"),
    ("garbled_fp4_bytes", "B", _tensor_mutation(_zero_nibbles), "scale.amax_ratio",
     "packed values and block scales disagree"),
    ("input_scale_zero", "B", _tensor_mutation(_set(f"{EXP}.w2.input_scale", 0, 0.0)),
     "scale.input_scale", "0.0"),
    ("weight_scale_2_negative", "B", _tensor_mutation(_set(f"{EXP}.w2.weight_scale_2", 0, -1.0)),
     "scale.weight_scale_2", "-1.0"),
    ("shard_file_missing", "A", _delete_file, "index.missing_file", "no such file"),
    ("index_names_wrong_shard", "A", _wrong_index_entry, "index.wrong_file", "norm.weight"),
    ("truncated_shard", "B", _truncate_file, "shard.unreadable", "truncated"),
    ("moe_quant_algo_missing", "B", _config_mutation(
        lambda c: c["quantization_config"].pop("moe_quant_algo")), "config.quantization",
     "moe_quant_algo"),
    ("hf_quant_config_missing", "B", _rm("hf_quant_config.json"), "config.hf_quant", "absent"),
    ("mtp_not_excluded_from_nvfp4", "B", _config_mutation(
        lambda c: c["quantization_config"]["quantized_layers"].pop(f"{EXP}.w2")),
     "config.quantized_layers", "every NVFP4 expert listed"),
    ("bf16_with_quantization_config", "BF16", _config_mutation(
        lambda c: c.update(quantization_config={"quant_method": "fp8"})), "config.quantization",
     "absent (BF16 tensors)"),
]


@pytest.mark.parametrize("case", CATALOGUE, ids=[c[0] for c in CATALOGUE])
def test_corruption_is_caught_with_the_right_message(tinies: dict[str, Path], tmp_path: Path,
                                                     case: tuple) -> None:
    _, base, mutate, check, text = case
    d = tmp_path / "ck"
    shutil.copytree(tinies[base], d)
    if mutate is None:
        mutate = _tensor_mutation(_mxfp4_left_in_b(tinies["A"]))
    mutate(d)
    rep = verify(d)
    hits = [f for f in rep.findings if f.check == check]
    assert hits, f"{check} not reported; got:\n" + "\n".join(f.line() for f in rep.findings)
    assert any(text in f.line() for f in hits), "\n".join(f.line() for f in hits)
    assert rep.exit_code == 1


def test_catalogue_covers_at_least_15_distinct_checks() -> None:
    assert len({c[3] for c in CATALOGUE}) >= 15


def test_against_requires_mtp_byte_identical(tinies: dict[str, Path], tmp_path: Path) -> None:
    assert verify(tinies["B"], against_path=tinies["A"]).findings == []
    d = tmp_path / "ck"
    shutil.copytree(tinies["B"], d)
    _tensor_mutation(_set_byte("mtp.0.attn.wq_a.weight", 17, 0x01))(d)
    rep = verify(d, against_path=tinies["A"])
    assert [f.check for f in rep.findings] == ["against.mtp"]
    assert "first difference at byte 17" in rep.findings[0].found


# --- the CLI: exit codes, one line, JSON --------------------------------------------------


def test_cli_exit_codes_and_json(tinies: dict[str, Path], tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["verify", str(tinies["A"]), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["layout"] == "native" and out["findings"] == [] and out["exit_code"] == 0
    d = tmp_path / "ck"
    shutil.copytree(tinies["B"], d)
    _tensor_mutation(_all_ones)(d)
    assert cli_main(["verify", str(d)]) == 1
    text = capsys.readouterr().out
    assert f"{EXP}.w3.weight_scale: expected block scales that follow" in text
    assert cli_main(["verify", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "config.json" in err
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("{}")
    assert cli_main(["verify", str(tmp_path / "empty")]) == 2
    assert "expected *.safetensors files, found none" in capsys.readouterr().err

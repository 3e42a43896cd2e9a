"""convert / verify / tiny under adversarial conditions: scales that would write zeros or NaN,
a source replaced or edited between runs, a conversion stopped half way, two conversions into
one destination, a full disk, code and pickles in the source."""

from __future__ import annotations

import errno
import fcntl
import json
import math
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch

from dsv4_nvfp4.checkpoint import writer as writer_mod
from dsv4_nvfp4.checkpoint.convert_exec import execute
from dsv4_nvfp4.checkpoint.convert_plan import Target, plan
from dsv4_nvfp4.checkpoint.convert_state import LOCK_NAME
from dsv4_nvfp4.checkpoint.layouts import Layout
from dsv4_nvfp4.checkpoint.reader import open_checkpoint
from dsv4_nvfp4.checkpoint.schema import Storage
from dsv4_nvfp4.checkpoint.tiny import write_tiny
from dsv4_nvfp4.checkpoint.transforms import ErrorAccumulator, convert_parts
from dsv4_nvfp4.cli import main as cli_main
from dsv4_nvfp4.formats import ConversionError

pytestmark = [pytest.mark.cpu, pytest.mark.usefixtures("one_torch_thread")]

EXPERT_WS2 = "layers.0.ffn.experts.1.w2.weight_scale_2"
C_DENSE_WS2 = "model.layers.1.self_attn.q_b_proj.weight_scale_2"
C_EXPERT_WS2 = "model.layers.0.mlp.experts.1.down_proj.weight_scale_2"
C_DENSE_WS = "model.layers.1.self_attn.q_b_proj.weight_scale"


@pytest.fixture(scope="module")
def tinies(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {lay.name: write_tiny(root / lay.name, lay) for lay in (Layout.A, Layout.B, Layout.C)}


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def poke(ckpt: Path, tensor: str, data: bytes, at: int = 0) -> None:
    """Overwrite bytes of one tensor in place (same size: the headers stay valid)."""
    info = open_checkpoint(ckpt).tensors[tensor]
    assert at + len(data) <= info.nbytes
    with open(info.file, "r+b") as f:
        f.seek(info.begin + at)
        f.write(data)


def _cli(command: str, args: list[str], capsys: pytest.CaptureFixture[str]
         ) -> tuple[int, str, str]:
    rc = cli_main([command, *args])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


# --- 1. scales that would write zeros or NaN ----------------------------------------------


@pytest.mark.parametrize(("layout", "tensor", "value", "to"), [
    ("B", EXPERT_WS2, 0.0, "bf16"),
    ("B", EXPERT_WS2, math.nan, "bf16"),
    ("B", EXPERT_WS2, -1.0, "bf16"),
    ("C", C_DENSE_WS2, 0.0, "nvidia-nvfp4"),
    ("C", C_DENSE_WS2, math.inf, "nvidia-nvfp4"),
    ("C", C_EXPERT_WS2, 0.0, "nvidia-nvfp4"),
    ("C", C_EXPERT_WS2, math.nan, "bf16"),
])
def test_zero_or_nonfinite_global_scale_is_refused_before_writing(
        tinies: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],
        layout: str, tensor: str, value: float, to: str) -> None:
    src = _copy(tinies[layout], tmp_path / "src")
    poke(src, tensor, struct.pack("<f", value))
    dst = tmp_path / "dst"
    rc, _, err = _cli("convert", [str(src), str(dst), "--to", to, "--no-fsync"], capsys)
    assert rc == 2, err
    assert err.count("\n") == 1 and tensor in err and "finite" in err, err
    assert open_checkpoint(src).tensors[tensor].file.name in err
    assert not dst.exists()


@pytest.mark.parametrize(("layout", "tensor", "byte", "to", "what"), [
    ("C", C_DENSE_WS, 0x00, "nvidia-nvfp4", "zero"),
    ("C", C_DENSE_WS, 0x7F, "bf16", "NaN"),
    ("C", C_DENSE_WS, 0xB8, "nvidia-nvfp4", "sign"),
    ("B", "layers.0.ffn.experts.0.w1.weight_scale", 0x00, "bf16", "zero"),
    ("A", "layers.0.attn.wq_a.scale", 0xFF, "bf16", "0xFF"),
    ("A", "layers.0.ffn.experts.0.w1.scale", 0xFF, "bf16", "0xFF"),
])
def test_bad_block_scale_a_conversion_consumes_is_refused_before_writing(
        tinies: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],
        layout: str, tensor: str, byte: int, to: str, what: str) -> None:
    src = _copy(tinies[layout], tmp_path / "src")
    poke(src, tensor, bytes([byte]), at=1)
    dst = tmp_path / "dst"
    rc, _, err = _cli("convert", [str(src), str(dst), "--to", to, "--no-fsync"], capsys)
    assert rc == 2, err
    assert err.count("\n") == 1 and tensor in err and what in err, err
    assert not dst.exists()


def test_error_statistic_of_an_all_zero_reference_is_never_zero() -> None:
    zeros = torch.zeros(128, 64)
    for err in (ConversionError.between(zeros, zeros),
                ConversionError.between(zeros + 1, zeros)):
        assert math.isnan(err.rel_l2) and math.isnan(err.max_rel)
    acc = ErrorAccumulator()
    acc.add(zeros, zeros)
    assert math.isnan(acc.result().rel_l2) and math.isnan(acc.result().max_rel)
    nan = torch.full((4, 4), math.nan)
    assert math.isnan(ConversionError.between(nan, nan).rel_l2)
    # the chunked accumulator and the whole-tensor statistic are one formula
    ref = torch.randn(256, 64)
    out = ref.to(torch.bfloat16).float()
    acc = ErrorAccumulator()
    acc.add(out[:128], ref[:128])
    acc.add(out[128:], ref[128:])
    whole = ConversionError.between(out, ref)
    assert acc.result().rel_l2 == pytest.approx(whole.rel_l2, rel=1e-5)
    assert acc.result().max_rel == whole.max_rel
    # an all-zero NVFP4 weight (valid scales, all codes 0) converts, and says its error is
    # undefined rather than 0
    parts = {"weight": torch.zeros(128, 32, dtype=torch.uint8),
             "weight_scale": torch.full((128, 4), 1.0).to(torch.float8_e4m3fn),
             "weight_scale_2": torch.tensor(1e-3)}
    _, err = convert_parts(Storage.NVFP4, Storage.BF16, parts)
    assert err is not None and math.isnan(err.rel_l2)


# --- 2. resume and "already complete" compare content --------------------------------------


def test_same_shaped_replacement_source_is_converted_again(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = write_tiny(tmp_path / "src", Layout.A)
    dst = tmp_path / "dst"
    args = [str(src), str(dst), "--to", "bf16", "--no-fsync"]
    assert _cli("convert", args, capsys)[0] == 0
    shutil.rmtree(src)
    write_tiny(src, Layout.A, seed=1)  # same shapes, same sizes, other values
    rc, out, _ = _cli("convert", args, capsys)
    assert rc == 0 and "already complete" not in out, out
    ref = tmp_path / "ref"
    execute(plan(src, Target.BF16), ref, fsync=False)
    assert _files(dst) == _files(ref)
    # and now it is complete, for this content
    rc, out, _ = _cli("convert", args, capsys)
    assert rc == 0 and "already complete" in out


class _Stop(Exception):
    pass


def test_expert_rewritten_in_place_after_an_interrupted_run_is_redone(
        tinies: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = _copy(tinies["B"], tmp_path / "src")
    dst = tmp_path / "dst"
    p = plan(src, Target.BF16)
    assert len(p.files) >= 2
    first = sum(len(u.outputs) for u in p.shards[0])
    count = {"n": 0}
    real_write, real_begin = writer_mod.ShardWriter.write, writer_mod.ShardWriter.begin

    def stopping(real):
        def wrapped(self, name, *rest):
            count["n"] += 1
            if count["n"] == first + 3:
                raise _Stop  # interrupted in the second shard: the first is done
            return real(self, name, *rest)
        return wrapped

    monkeypatch.setattr(writer_mod.ShardWriter, "write", stopping(real_write))
    monkeypatch.setattr(writer_mod.ShardWriter, "begin", stopping(real_begin))
    with pytest.raises(_Stop):
        execute(p, dst, fsync=False)
    monkeypatch.undo()
    assert (dst / p.files[0]).is_file() and not (dst / "manifest.json").exists()
    # rewrite one expert of the finished shard's source, same bytes count
    done_inputs = [t for u in p.shards[0] for t in u.inputs
                   if t.name.startswith("layers.0.ffn.experts.") and t.name.endswith(".weight")]
    victim = done_inputs[0]
    poke(src, victim.name, bytes(b ^ 0x11 for b in victim.file.read_bytes()[
        victim.begin:victim.begin + 64]))
    execute(plan(src, Target.BF16), dst, fsync=False)
    ref = tmp_path / "ref"
    execute(plan(src, Target.BF16), ref, fsync=False)
    assert _files(dst) == _files(ref)


# --- 3. verify reports what a stopped conversion left ------------------------------------


@pytest.fixture(scope="module")
def converted(tinies: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    dst = tmp_path_factory.mktemp("conv") / "AB16"
    execute(plan(tinies["A"], Target.BF16), dst, fsync=False)
    return dst


def _verify(d: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> tuple[int, str]:
    rc, out, _ = _cli("verify", [str(d), "--no-values", *extra], capsys)
    return rc, out


def test_verify_clean_conversion_and_each_leftover(converted: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    assert _verify(converted, capsys)[0] == 0
    no_manifest = _copy(converted, tmp_path / "no_manifest")
    (no_manifest / "manifest.json").unlink()
    rc, out = _verify(no_manifest, capsys)
    assert rc == 1 and "manifest.json" in out and "[manifest.missing]" in out, out
    partial = _copy(converted, tmp_path / "partial")
    (partial / ".tokenizer.json.partial").write_text("{")
    rc, out = _verify(partial, capsys)
    assert rc == 1 and ".tokenizer.json.partial" in out and "[files.partial]" in out, out
    tampered = _copy(converted, tmp_path / "tampered")
    poke(tampered, "layers.0.ffn.experts.0.w1.weight", b"\x00\x01")
    rc, out = _verify(tampered, capsys)
    shard = open_checkpoint(tampered).tensors["layers.0.ffn.experts.0.w1.weight"].file.name
    assert rc == 1 and f"{shard}: expected sha256" in out and "[manifest.sha256]" in out, out
    assert _verify(tampered, capsys, "--no-hash")[0] == 0
    unlisted = _copy(converted, tmp_path / "unlisted")
    (unlisted / "extra.txt").write_text("x")
    rc, out = _verify(unlisted, capsys)
    assert rc == 1 and "extra.txt" in out and "[manifest.unlisted]" in out, out
    gone = _copy(converted, tmp_path / "gone")
    (gone / "tokenizer.json").unlink()
    rc, out = _verify(gone, capsys)
    assert rc == 1 and "tokenizer.json" in out and "[manifest.file_missing]" in out, out


def test_disk_full_names_the_destination_leaves_no_partial_and_verify_says_incomplete(
        tinies: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    src = _copy(tinies["A"], tmp_path / "src")
    dst = tmp_path / "dst"

    def full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    # the side files are copied last, with shutil (which names the source in its OSError)
    monkeypatch.setattr(os, "sendfile", full)
    monkeypatch.setattr(shutil, "_USE_CP_SENDFILE", True, raising=False)
    rc, _, err = _cli("convert", [str(src), str(dst), "--to", "bf16", "--no-fsync"],
                      capsys)
    monkeypatch.undo()
    assert rc == 2 and err.count("\n") == 1, err
    assert str(dst) in err and str(src) not in err and "No space left" in err, err
    assert not list(dst.glob("*.partial")) and not list(dst.glob(".*.partial"))
    assert not (dst / "manifest.json").exists()
    rc, out = _verify(dst, capsys)
    assert rc == 1 and "[manifest.missing]" in out, out
    # space freed: the rerun completes it
    rc, _, _ = _cli("convert", [str(src), str(dst), "--to", "bf16", "--no-fsync"], capsys)
    assert rc == 0 and _verify(dst, capsys)[0] == 0


# --- 5. one conversion per destination ------------------------------------------------------


def test_second_convert_into_a_locked_destination_says_who_holds_it(
        tinies: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dst = tmp_path / "dst"
    dst.mkdir()
    lock = dst / LOCK_NAME
    with open(lock, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # what a running convert holds
        rc, _, err = _cli("convert", [str(tinies["A"]), str(dst), "--to", "bf16",
                                             "--no-fsync"], capsys)
        assert rc == 2 and err.count("\n") == 1, err
        assert "another conversion" in err and str(dst) in err, err
        assert sorted(p.name for p in dst.iterdir()) == [LOCK_NAME]
    lock.unlink()
    rc, _, _ = _cli("convert", [str(tinies["A"]), str(dst), "--to", "bf16",
                                       "--no-fsync"], capsys)
    assert rc == 0 and not (dst / LOCK_NAME).exists()


# --- 6. code, pickles and auto_map are not carried over -------------------------------------


def test_code_pickles_and_auto_map_are_dropped_and_said(
        tinies: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = _copy(tinies["A"], tmp_path / "src")
    (src / "modeling_deepseek.py").write_text("import os\n")
    (src / "training_args.bin").write_bytes(b"\x80\x04K\x01.")
    (src / "extra.pkl").write_bytes(b"\x80\x04K\x01.")
    cfg = json.loads((src / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_deepseek.DeepseekV4ForCausalLM"}
    (src / "config.json").write_text(json.dumps(cfg))
    tok = json.loads((src / "tokenizer_config.json").read_text())
    tok["auto_map"] = {"AutoTokenizer": ["tokenization_x.XTokenizer", None]}
    (src / "tokenizer_config.json").write_text(json.dumps(tok))
    dst = tmp_path / "dst"
    rc, out, err = _cli("convert", [str(src), str(dst), "--to", "bf16", "--no-fsync"],
                        capsys)
    assert rc == 0, err
    names = {p.name for p in dst.iterdir()}
    assert not names & {"modeling_deepseek.py", "training_args.bin", "extra.pkl"}
    assert "auto_map" not in json.loads((dst / "config.json").read_text())
    assert "auto_map" not in json.loads((dst / "tokenizer_config.json").read_text())
    for n in ("modeling_deepseek.py", "training_args.bin", "extra.pkl", "auto_map"):
        assert n in out, out
    rep = json.loads((dst / "conversion_report.json").read_text())
    assert any("modeling_deepseek.py" in w for w in rep["warnings"])


# --- 4. tiny into a directory it cannot write -----------------------------------------------


def test_tiny_into_a_read_only_directory_is_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    if os.geteuid() == 0:  # root ignores the mode bits: refuse writes below ro as EACCES
        real_open = writer_mod.open if hasattr(writer_mod, "open") else open
        real_mkdir = Path.mkdir

        def guarded_open(file, *a, **k):
            if str(file).startswith(str(ro)) and a and "w" in a[0]:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(file))
            return real_open(file, *a, **k)

        def guarded_mkdir(self, *a, **k):
            if str(self).startswith(str(ro) + os.sep):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
            return real_mkdir(self, *a, **k)

        monkeypatch.setattr("builtins.open", guarded_open)
        monkeypatch.setattr(Path, "mkdir", guarded_mkdir)
    for out in (ro / "new", ro):
        rc, _, err = _cli("tiny", [str(out), "--layout", "bf16"], capsys)
        assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err, err
        assert str(out) in err or str(ro) in err, err
    monkeypatch.undo()
    ro.chmod(0o755)
    assert list(ro.iterdir()) == []

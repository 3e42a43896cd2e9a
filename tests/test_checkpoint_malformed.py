"""Malformed checkpoints through every tool: ``verify``, ``inspect``, ``convert`` (and ``tiny``
for its own bad destinations).

Each case starts from a tiny checkpoint written in the test and breaks one thing: a shard
header, the index, the config, the directory, a scale. For each tool the answer must be exit
1 (findings) or 2 (unusable), exactly one line on stderr naming the file when it is 2, never a
traceback, and no destination left behind by a ``convert`` (or ``tiny``) that refused.
The tools run in process through their ``main(argv)``.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import pytest

from dsv4_nvfp4.checkpoint.layouts import Layout
from dsv4_nvfp4.checkpoint.reader import INDEX_NAME, open_checkpoint
from dsv4_nvfp4.checkpoint.tiny import write_tiny
from dsv4_nvfp4.cli import main as cli_main

pytestmark = [pytest.mark.cpu, pytest.mark.usefixtures("one_torch_thread")]

SHARD = "model-00001-of-00005.safetensors"  # tiny A's first shard (embed.weight first)
FIRST = "embed.weight"


@pytest.fixture(scope="module")
def tinies(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    out = {lay.name: write_tiny(root / lay.name, lay) for lay in (Layout.A, Layout.B, Layout.C)}
    assert (out["A"] / SHARD).is_file() and (out["A"] / INDEX_NAME).is_file()
    return out


# --- ways to break a checkpoint ---------------------------------------------------------------


def _header(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _put_header(path: Path, header: object, data: bytes) -> None:
    h = json.dumps(header).encode()
    path.write_bytes(len(h).to_bytes(8, "little") + h + data)


def header_edit(fn: Callable[[dict], object]) -> Callable[[Path], None]:
    def edit(d: Path) -> None:
        header, data = _header(d / SHARD)
        out = fn(header)
        _put_header(d / SHARD, header if out is None else out, data)
    return edit


def entry(**changes: object) -> Callable[[Path], None]:
    def fn(h: dict) -> None:
        h[FIRST].update(changes)
    return header_edit(fn)


def raw_bytes(fn: Callable[[bytes], bytes]) -> Callable[[Path], None]:
    def edit(d: Path) -> None:
        (d / SHARD).write_bytes(fn((d / SHARD).read_bytes()))
    return edit


def index_value(value: object) -> Callable[[Path], None]:
    def edit(d: Path) -> None:
        idx = json.loads((d / INDEX_NAME).read_text())
        idx["weight_map"][FIRST] = value
        (d / INDEX_NAME).write_text(json.dumps(idx))
    return edit


def index_doc(doc: object) -> Callable[[Path], None]:
    def edit(d: Path) -> None:
        (d / INDEX_NAME).write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return edit


def config(**changes: object) -> Callable[[Path], None]:
    def edit(d: Path) -> None:
        cfg = json.loads((d / "config.json").read_text())
        cfg.update(changes)
        (d / "config.json").write_text(json.dumps(cfg))
    return edit


def config_text(text: str) -> Callable[[Path], None]:
    def edit(d: Path) -> None:
        (d / "config.json").write_text(text)
    return edit


def scale_value(tensor: str, value: float) -> Callable[[Path], None]:
    def edit(d: Path) -> None:
        info = open_checkpoint(d).tensors[tensor]
        with open(info.file, "r+b") as f:
            f.seek(info.begin)
            f.write(struct.pack("<f", value))
    return edit


def _move_tensor_to_wrong_shard(d: Path) -> None:
    idx = json.loads((d / INDEX_NAME).read_text())
    idx["weight_map"][FIRST] = "model-00002-of-00005.safetensors"
    (d / INDEX_NAME).write_text(json.dumps(idx))


def _duplicate_tensor(d: Path) -> None:
    other = d / "model-00002-of-00005.safetensors"
    h2, data2 = _header(other)
    first = min((k for k in h2 if k != "__metadata__"), key=lambda k: h2[k]["data_offsets"][0])
    h2[FIRST] = h2.pop(first)  # same name as a tensor of the first shard
    _put_header(other, h2, data2)


def _overlap(h: dict) -> None:
    names = sorted((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"][0])
    h[names[1]]["data_offsets"] = list(h[names[0]]["data_offsets"])
    h[names[1]]["dtype"], h[names[1]]["shape"] = h[names[0]]["dtype"], h[names[0]]["shape"]


def _shard_dir(d: Path) -> None:
    (d / SHARD).unlink()
    (d / SHARD).mkdir()


def _rm(name: str) -> Callable[[Path], None]:
    return lambda d: (d / name).unlink()


def _write(name: str, text: str) -> Callable[[Path], None]:
    return lambda d: (d / name).write_text(text)


def _ratios_layer_types(d: Path) -> None:
    cfg = json.loads((d / "config.json").read_text())
    cfg["layer_types"] = [["sliding_attention"]] * cfg["num_hidden_layers"]
    (d / "config.json").write_text(json.dumps(cfg))


ALL = ("verify", "inspect", "convert")
VALUES = ("verify", "convert")  # inspect reads headers and config only

# (id, base tiny, break it, a name the message must contain, tools)
CASES: list[tuple[str, str, Callable[[Path], None], str, tuple[str, ...]]] = [
    # shard headers
    ("offsets-strings", "A", entry(data_offsets=["0", "384"]), SHARD, ALL),
    ("offsets-floats", "A", entry(data_offsets=[0.0, 393216.0]), SHARD, ALL),
    ("offsets-one", "A", entry(data_offsets=[0]), SHARD, ALL),
    ("offsets-bools", "A", entry(data_offsets=[False, True]), SHARD, ALL),
    ("offsets-negative", "A", entry(data_offsets=[-8, 393208]), SHARD, ALL),
    ("offsets-null", "A", entry(data_offsets=None), SHARD, ALL),
    ("offsets-overlap", "A", header_edit(_overlap), SHARD, ALL),
    ("dtype-list", "A", entry(dtype=["BF16"]), SHARD, ALL),
    ("dtype-unknown", "A", entry(dtype="BF13"), SHARD, ALL),
    ("shape-string", "A", entry(shape="1024"), SHARD, ALL),
    ("shape-floats", "A", entry(shape=[1024.0, 192.0]), SHARD, ALL),
    ("shape-negative", "A", entry(shape=[-1024, -192]), SHARD, ALL),
    ("shape-huge", "A", entry(shape=[2**62, 2**62]), SHARD, ALL),
    ("entry-number", "A", header_edit(lambda h: h.update({FIRST: 5})), SHARD, ALL),
    ("header-list", "A", header_edit(lambda h: [1, 2]), SHARD, ALL),
    ("metadata-list", "A", header_edit(lambda h: h.update({"__metadata__": [1]})), SHARD, ALL),
    ("header-not-json", "A", raw_bytes(lambda b: b[:8] + b"{" * int.from_bytes(b[:8], "little")
                                       + b[8 + int.from_bytes(b[:8], "little"):]), SHARD, ALL),
    ("header-not-utf8", "A", raw_bytes(lambda b: b[:8] + b"\xff" * int.from_bytes(b[:8], "little")
                                       + b[8 + int.from_bytes(b[:8], "little"):]), SHARD, ALL),
    ("header-length-huge", "A", raw_bytes(lambda b: (2**63).to_bytes(8, "little") + b[8:]),
     SHARD, ALL),
    ("shard-truncated", "A", raw_bytes(lambda b: b[:-10]), SHARD, ALL),
    ("shard-trailing", "A", raw_bytes(lambda b: b + b"\0" * 16), SHARD, ALL),
    ("shard-empty", "A", raw_bytes(lambda b: b""), SHARD, ALL),
    ("shard-directory", "A", _shard_dir, SHARD, ALL),
    ("tensor-in-two-shards", "A", _duplicate_tensor, FIRST, ALL),
    # the index
    ("index-value-int", "A", index_value(3), INDEX_NAME, ALL),
    ("index-value-list", "A", index_value([SHARD]), INDEX_NAME, ALL),
    ("index-value-null", "A", index_value(None), INDEX_NAME, ALL),
    ("index-value-empty", "A", index_value(""), INDEX_NAME, ALL),
    ("index-abs-path", "A", index_value("/etc/passwd"), INDEX_NAME, ALL),
    ("index-dotdot", "A", index_value("../../x.safetensors"), INDEX_NAME, ALL),
    ("index-nested-dotdot", "A", index_value("a/../../etc/passwd"), INDEX_NAME, ALL),
    ("index-missing-shard", "A", index_value("model-00009-of-00009.safetensors"),
     "model-00009-of-00009.safetensors", ALL),
    ("index-wrong-shard", "A", _move_tensor_to_wrong_shard, FIRST, ALL),
    ("index-weight-map-list", "A", index_doc({"weight_map": [SHARD]}), INDEX_NAME, ALL),
    ("index-list", "A", index_doc([1]), INDEX_NAME, ALL),
    ("index-not-json", "A", index_doc("{"), INDEX_NAME, ALL),
    # the config
    ("config-not-json", "A", config_text("{"), "config.json", ALL),
    ("config-list", "A", config_text("[]"), "config.json", ALL),
    ("config-missing", "A", _rm("config.json"), "config.json", ALL),
    ("experts-1e8-int", "A", config(n_routed_experts=100_000_000), "n_routed_experts", ALL),
    ("experts-1e8-float", "A", config(n_routed_experts=1e8), "n_routed_experts", ALL),
    ("layers-1e12", "A", config(num_hidden_layers=10**12), "num_hidden_layers", ALL),
    ("vocab-1e15", "A", config(vocab_size=10**15), "vocab_size", ALL),
    ("hidden-negative", "A", config(hidden_size=-1), "hidden_size", ALL),
    ("hidden-string", "A", config(hidden_size="192"), "hidden_size", ALL),
    ("layers-bool", "A", config(num_hidden_layers=True), "num_hidden_layers", ALL),
    ("ratios-strings", "A", config(compress_ratios=["a", "b", "c"]), "compress_ratios", ALL),
    ("ratios-short", "A", config(compress_ratios=[0]), "compress_ratios", ALL),
    ("mtp-string", "A", config(num_nextn_predict_layers="x"), "num_nextn_predict_layers", ALL),
    ("mtp-huge", "A", config(num_nextn_predict_layers=10**9), "num_nextn_predict_layers", ALL),
    ("shared-list", "A", config(n_shared_experts=[1]), "n_shared_experts", ALL),
    ("o-groups-zero", "A", config(o_groups=0), "o_groups", ALL),
    ("quant-config-list", "A", config(quantization_config=[1]), "quantization_config", ALL),
    ("quant-ignore-number", "B", config(quantization_config={
        "quant_method": "fp8", "moe_quant_algo": "NVFP4", "ignore": 5}),
     "quantization_config", ALL),
    ("quant-ignore-nested", "B", config(quantization_config={
        "quant_method": "fp8", "moe_quant_algo": "NVFP4", "ignored_layers": [["x"]]}),
     "quantization_config", ALL),
    ("hf-quant-list", "B", _write("hf_quant_config.json", "[1]"), "hf_quant_config.json", ALL),
    ("hf-quant-not-json", "B", _write("hf_quant_config.json", "{"), "hf_quant_config.json",
     ALL),
    ("layer-types-nested", "C", _ratios_layer_types, "layer_types", ALL),
    # values a conversion would consume
    ("ws2-zero", "B", scale_value("layers.0.ffn.experts.1.w2.weight_scale_2", 0.0),
     "layers.0.ffn.experts.1.w2.weight_scale_2", VALUES),
    ("ws2-nan", "C", scale_value("model.layers.1.self_attn.q_b_proj.weight_scale_2",
                                 float("nan")),
     "model.layers.1.self_attn.q_b_proj.weight_scale_2", VALUES),
]


def test_the_table_is_large_and_distinct() -> None:
    assert len(CASES) >= 40
    assert len({c[0] for c in CASES}) == len(CASES)


@pytest.fixture
def broken(request: pytest.FixtureRequest, tinies: dict[str, Path], tmp_path: Path
           ) -> tuple[Path, str, tuple[str, ...]]:
    _, base, edit, name, tools = request.param
    src = tmp_path / "src"
    shutil.copytree(tinies[base], src)
    edit(src)
    return src, name, tools


def _run(command: str, argv: list[str],
         capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    rc = cli_main([command, *argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def _assert_one_line(rc: int, out: str, err: str, name: str, tool: str) -> None:
    assert "Traceback" not in out + err, (tool, err)
    assert rc in (1, 2), (tool, rc, out, err)
    lines = err.splitlines()
    if rc == 2:
        assert len(lines) == 1 and lines[0].startswith("error: "), (tool, err)
        assert name in lines[0], (tool, name, err)
    else:  # findings: the report names the file; at most one line on stderr
        assert len(lines) <= 1, (tool, err)
        assert name in out + err, (tool, name, out, err)


@pytest.mark.parametrize("broken", CASES, ids=[c[0] for c in CASES], indirect=True)
def test_malformed_input_is_one_line_and_leaves_nothing(
        broken: tuple[Path, str, tuple[str, ...]], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    src, name, tools = broken
    before = {p.name: p.stat().st_mtime_ns for p in src.iterdir()}
    if "verify" in tools:
        argv = [str(src)] if tools is VALUES else [str(src), "--no-values"]
        _assert_one_line(*_run("verify", argv, capsys), name, "verify")
    if "inspect" in tools:
        _assert_one_line(*_run("inspect", [str(src)], capsys), name, "inspect")
    if "convert" in tools:
        dst = tmp_path / "dst"
        to = "nvidia-nvfp4" if (src / "model.safetensors.index.json").is_file() and \
            "model.layers" in (src / "model.safetensors.index.json").read_text() else "bf16"
        rc, out, err = _run("convert", [str(src), str(dst), "--to", to, "--no-fsync"],
                            capsys)
        _assert_one_line(rc, out, err, name, "convert")
        assert rc == 2 and not dst.exists(), (rc, err)
    # SRC is never written to
    assert {p.name: p.stat().st_mtime_ns for p in src.iterdir()} == before


# --- tiny's destinations ----------------------------------------------------------------------


def _tiny_cases(tmp: Path) -> list[tuple[str, Path, str]]:
    (tmp / "a-file").write_text("x")
    (tmp / "full").mkdir()
    (tmp / "full" / "keep.txt").write_text("x")
    return [("out-is-a-file", tmp / "a-file", "a-file"),
            ("out-not-empty", tmp / "full", "full"),
            ("out-below-a-file", tmp / "a-file" / "sub", "a-file")]


def test_tiny_bad_destination_is_one_line_and_leaves_nothing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for case, out, name in _tiny_cases(tmp_path):
        before = sorted(p.name for p in tmp_path.rglob("*"))
        rc, o, err = _run("tiny", [str(out), "--layout", "bf16"], capsys)
        _assert_one_line(rc, o, err, name, f"tiny {case}")
        assert rc == 2
        assert sorted(p.name for p in tmp_path.rglob("*")) == before, case


def test_tiny_on_a_filesystem_that_refuses_writes(capsys: pytest.CaptureFixture[str]) -> None:
    target = Path("/sys/dsv4-nvfp4-tiny-test")
    try:
        os.mkdir(target)
    except OSError:
        pass
    else:
        os.rmdir(target)
        pytest.skip("/sys is writable here")
    rc, o, err = _run("tiny", [str(target), "--layout", "bf16"], capsys)
    _assert_one_line(rc, o, err, str(target), "tiny /sys")
    assert rc == 2 and not target.exists()
